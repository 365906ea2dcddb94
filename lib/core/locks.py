"""Inter-process locks on files: what makes read-modify-write steps safe when several processes run at once
(the nightly training's ingest and the hourly ingest overlap; promotions must not interleave).

``fcntl.flock`` locks belong to an open file description, so two threads of one process exclude each other
too, and the kernel drops a lock when its process dies: a killed writer never leaves a stale lock. Locks
hold across processes of one machine and on file systems that pass flock through (local disks, NFSv4);
the lock files are empty and never deleted (deleting one while held would let a second holder in).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

#: Seconds between attempts while waiting for a lock with a timeout.
POLL_S = 0.05


class LockTimeout(TimeoutError):
    """A lock was not acquired within its timeout; ``str()`` names the lock file."""


class FileLock:
    """An exclusive lock on ``path`` (created with its folder if missing), as a context manager.

    ``timeout_s=None`` waits as long as it takes; otherwise :class:`LockTimeout` after that many seconds.
    """

    def __init__(self, path: Path, timeout_s: float | None = None) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this lock object is already held (locks are not re-entrant)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                self._wait(fd, time.monotonic() + self.timeout_s)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _wait(self, fd: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{self.path}: still held by another process after {self.timeout_s:g} s") from None
                time.sleep(POLL_S)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
