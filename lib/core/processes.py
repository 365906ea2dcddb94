"""What Linux says about a process by its pid (``/proc``): whether it runs, when it started, its PID namespace.
Elsewhere the answers degrade to "running" and "" (unknown)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name (which may hold spaces and parentheses): field 3 onwards."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return []


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) is gone: it runs nothing and holds no port."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    fields = _stat_fields(pid)
    return not fields or fields[0] not in ("Z", "X")


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (stat field 22), "" where unknown: with the pid, it names
    one process (a pid is reused, a start time with it is not)."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""


def pid_namespace() -> str:
    """This process's PID namespace: containers that share a host name (host networking) still differ here."""
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    return ""
