"""A fake long-running service that spawns a child, for the tests of ``pricelevel.core.services``.

    python tests/fakes/service.py PIDFILE [default|ignore] [sleep|stubborn-child]

Spawns a child (``sleep 30``, or with ``stubborn-child`` a Python that ignores SIGTERM) in its own process
group, writes "own_pid child_pid" to PIDFILE once the child is ready (atomically: a reader never sees half),
and sleeps 30 s. ``ignore`` makes the service itself ignore SIGTERM, so only SIGKILL ends it.
"""

import os
import signal
import subprocess
import sys
import time

STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(30)")


def main(pidfile: str, term: str = "default", child_kind: str = "sleep") -> None:
    if child_kind == "stubborn-child":
        child = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
    else:
        child = subprocess.Popen(["sleep", "30"])
    if term == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(30)


if __name__ == "__main__":
    main(*sys.argv[1:])
