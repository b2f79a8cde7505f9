"""Calls of sk-padim's modules and torch.fx traces exclude each other across threads."""

import threading
import time

import torch
from torch import nn

from sk_padim.tracing import TraceSafeModule, tracing


class Slow(TraceSafeModule):
    def __init__(self, started: threading.Event, release: threading.Event):
        super().__init__()
        self.started, self.release = started, release
        self.inner = nn.Identity()

    def forward(self, x):
        self.started.set()
        self.release.wait(5)
        return self.inner(x)


def test_a_call_waits_for_a_running_trace():
    done = threading.Event()
    module = Slow(threading.Event(), threading.Event())
    module.release.set()
    with tracing():
        thread = threading.Thread(target=lambda: (module(torch.ones(1)), done.set()))
        thread.start()
        assert not done.wait(0.3)  # held while the trace runs
    assert done.wait(5)
    thread.join()


def test_a_trace_waits_for_running_calls_and_new_calls_wait_for_it():
    started, release = threading.Event(), threading.Event()
    module = Slow(started, release)
    caller = threading.Thread(target=lambda: module(torch.ones(1)))
    caller.start()
    assert started.wait(5)
    traced = threading.Event()

    def trace():
        with tracing():
            traced.set()
            time.sleep(0.3)

    tracer = threading.Thread(target=trace)
    tracer.start()
    assert not traced.wait(0.3)  # the call is still running
    release.set()
    assert traced.wait(5)
    caller.join()
    late = threading.Event()
    quick = Slow(threading.Event(), threading.Event())
    quick.release.set()
    threading.Thread(target=lambda: (quick(torch.ones(1)), late.set())).start()
    assert not late.wait(0.1)  # the trace still holds new calls
    tracer.join()
    assert late.wait(5)


def test_nested_calls_in_one_thread_do_not_wait_on_themselves():
    class Outer(TraceSafeModule):
        def __init__(self):
            super().__init__()
            self.inner = Slow(threading.Event(), threading.Event())
            self.inner.release.set()

        def forward(self, x):
            return self.inner(x) + 1

    assert Outer()(torch.zeros(1)).item() == 1
