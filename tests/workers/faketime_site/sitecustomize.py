"""Loaded only by processes that ``bench/chaos.py`` runs under libfaketime (this folder on their ``PYTHONPATH``).

libfaketime fakes ``CLOCK_MONOTONIC`` too (so ``time.sleep`` and asyncio's timers run at the fake speed), but
not ``sem_clockwait``, with which CPython waits on a lock with a timeout: the deadline, computed from the fake
monotonic clock, lies decades past the real one, and ``threading.Event().wait(1.0)`` never returns. Here the
waiter locks of ``threading.Condition`` (behind ``Event.wait``, ``queue.Queue.get(timeout=)``, ...) wait in
short ``time.sleep`` slices instead, which libfaketime scales. Nothing else changes.
"""

from __future__ import annotations

import os
import threading
import time

_real_allocate = threading._allocate_lock  # type: ignore[attr-defined]
#: Fake seconds per polling slice (at x360, 0.36 s is 1 ms of real time).
_SLICE_S = float(os.environ.get("PRICELEVEL_FAKETIME_SLICE_S", "0.36"))


class _SlicedLock:
    """A lock whose timed ``acquire`` polls, so that it ends under a fake monotonic clock."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _real_allocate()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not blocking or timeout is None or timeout < 0:
            return self._lock.acquire(blocking)
        deadline = time.monotonic() + timeout
        while True:
            if self._lock.acquire(False):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_SLICE_S, left))

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


if os.environ.get("FAKETIME"):
    threading._allocate_lock = _SlicedLock  # type: ignore[attr-defined]
