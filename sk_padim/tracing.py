"""Forward passes and ``torch.fx`` traces, kept apart across threads.

While ``torch.fx`` traces a model, it replaces ``nn.Module.__call__`` for every thread,
so a forward pass running meanwhile in another thread is captured by the tracer and
fails ("module is not installed as a submodule"). sk-padim traces backbones when a
transformer is fitted, and a fitted model may be scoring in other threads at that time.
:class:`TraceSafeModule` is the base of sk-padim's modules: its calls wait while a trace
runs, and :func:`tracing` makes a trace wait for running calls to end.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from torch import nn


class _TraceGuard:
    """Forward passes run together; a trace runs alone.

    A waiting trace goes before new passes, so a busy scorer cannot starve a refit; a
    pass nested in another one of the same thread (a module calling a module) never
    waits, so the guard cannot deadlock on itself.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._passes = 0
        self._tracing = False
        self._waiting_traces = 0
        self._depth = threading.local()

    @contextmanager
    def forward(self):
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._condition:
                self._condition.wait_for(lambda: not (self._tracing or self._waiting_traces))
                self._passes += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._passes -= 1
                    self._condition.notify_all()

    @contextmanager
    def trace(self):
        with self._condition:
            self._waiting_traces += 1
            self._condition.wait_for(lambda: not (self._tracing or self._passes))
            self._waiting_traces -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._condition:
                self._tracing = False
                self._condition.notify_all()


_GUARD = _TraceGuard()


def tracing():
    """Context manager for a ``torch.fx`` trace: waits for running calls, holds new ones."""
    return _GUARD.trace()


class TraceSafeModule(nn.Module):
    """An ``nn.Module`` whose calls do not run while a ``torch.fx`` trace does.

    The call goes straight to ``nn.Module``'s implementation, past the attribute fx
    patches, and holds the guard for its whole duration (submodules included).
    """

    def __call__(self, *args, **kwargs):
        with _GUARD.forward():
            return self._call_impl(*args, **kwargs)
