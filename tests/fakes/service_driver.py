"""Runs fake services through ``run_services`` in a process of its own, so a test can signal it.

    python tests/fakes/service_driver.py GRACE_S PIDFILE[,default|ignore[,sleep|stubborn-child]] ...

Each spec starts one ``tests/fakes/service.py``. Prints ``sigint=ignored|handled`` (as inherited: ``cmd &``
in a script ignores it) at start, ``code=N restored=BOOL`` on return (whether the SIGINT/SIGTERM handlers
are back to what they were before), and exits with run_services' code.
"""

import os
import signal
import sys
from pathlib import Path

from pricelevel.core.services import Service, run_services

FAKE = Path(__file__).with_name("service.py")


def main(grace_s: str, *specs: str) -> int:
    services = [Service(f"fake{i}", "-", (sys.executable, str(FAKE), *spec.split(",")))
                for i, spec in enumerate(specs)]
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    print(f"sigint={'ignored' if before[0] == signal.SIG_IGN else 'handled'}", flush=True)
    code = run_services(services, env=dict(os.environ), cwd=Path.cwd(), grace_s=float(grace_s))
    restored = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
    print(f"code={code} restored={restored}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
