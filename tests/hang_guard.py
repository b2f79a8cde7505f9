"""Bound a call that might hang, for the tests."""

import signal
from contextlib import contextmanager

import pytest


@contextmanager
def time_limit(seconds: float):
    """Turn a hang into a TimeoutError (SIGALRM; the main thread of a POSIX process)."""

    if not hasattr(signal, "SIGALRM"):
        pytest.skip("needs SIGALRM (POSIX) to bound a possible hang")

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the call hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
