"""The service's running marker in the state database, so a start can tell a clean stop from a crash.

At start the marker is written (``running``); while the service runs its heartbeat is refreshed; a clean stop
(SIGTERM, Ctrl-C, even an error the service caught) clears ``running`` and says why. A start that finds the
marker still ``running`` knows the last run ended without a clean stop (kill -9, an out-of-memory kill, a power
cut) at about its last heartbeat, and says so.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pandas as pd

from pricelevel.trading.documents import SERVICE, ServiceMarker
from pricelevel.trading.state import StateStore

#: Seconds between two heartbeats: the time of an unclean stop is known to about this much.
HEARTBEAT_S = 10.0


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


class RunMarker:
    """The marker of this process's run (see the module docstring)."""

    def __init__(self, store: StateStore, now: Callable[[], pd.Timestamp] = _now, pid: int | None = None,
                 host: str | None = None) -> None:
        self.store, self.now = store, now
        self.pid = os.getpid() if pid is None else pid
        self.host = socket.gethostname() if host is None else host

    def start(self) -> ServiceMarker | None:
        """Mark this run as running; returns the previous run's marker when it never stopped cleanly."""
        stamp = str(self.now())
        with self.store.transaction() as tx:
            previous = self.store.read(tx, SERVICE)
            self.store.write(tx, SERVICE, ServiceMarker(running=True, pid=self.pid, host=self.host, started=stamp,
                                                        heartbeat=stamp))
        return previous if previous is not None and previous.running else None

    def beat(self) -> None:
        with self.store.transaction() as tx:
            marker = self.store.read(tx, SERVICE)
            if marker is not None and marker.running and marker.pid == self.pid and marker.host == self.host:
                self.store.write(tx, SERVICE, marker.model_copy(update={"heartbeat": str(self.now())}))

    def stop(self, reason: str) -> None:
        """A clean stop, and why (``SIGTERM``, ``Ctrl-C (SIGINT)``, ``error: ...``)."""
        stamp = str(self.now())
        with self.store.transaction() as tx:
            marker = self.store.read(tx, SERVICE)
            if marker is not None and marker.pid == self.pid and marker.host == self.host:
                self.store.write(tx, SERVICE, marker.model_copy(update={"running": False, "heartbeat": stamp,
                                                                        "stopped": stamp, "reason": reason}))


def unclean_stop_text(previous: ServiceMarker) -> str:
    return (f"restarted after an unclean stop at {_minute(previous.heartbeat)} (its last heartbeat; the run started "
            f"{_minute(previous.started)} as pid {previous.pid} on {previous.host} and was killed or crashed)")


def _minute(stamp: str) -> str:
    return f"{pd.Timestamp(stamp).tz_convert('UTC'):%Y-%m-%d %H:%M:%S} UTC"
