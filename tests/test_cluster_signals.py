"""SIGTERM to a ``pricelevel train`` that runs without a Prefect API, as ``timeout`` sends it (to the whole process
group) while the trials run in the flow's process: the command ends within 10 s, its flow run is marked
Cancelled in the database of its temporary Prefect server, and that server, started in a session of its own so
that the group's signal does not kill it first, is stopped last: nothing is left running.
(The Dask path, with trial workers, and the rerun that resumes are in test_cluster_train.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cluster_train import TINY, _group_alive, _project

pytestmark = [pytest.mark.flow, pytest.mark.slow]

THREADS = [o for o in TINY if not o.startswith(("tuning.workers", "flow.task_runner"))] + ["tuning.n_trials=6"]


def _running_trials(database: Path) -> int:
    if not database.exists():
        return 0
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(database, timeout=1)) as db:
        return db.execute("select count(*) from trials where state = 'RUNNING'").fetchone()[0]
    return 0


def _using(folder: Path) -> list[str]:
    """Command lines of the processes whose environment names ``folder`` (the run's Prefect home)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if f"PREFECT_HOME={folder}".encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_text().replace("\0", " ")[:200])
    return found


def test_sigterm_mid_tuning_stops_the_run_marks_it_cancelled_and_stops_its_temporary_server_last(tmp_path: Path) -> None:
    root = _project(tmp_path / "project")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PRICELEVEL_HOME": str(root), "PREFECT_HOME": str(home)}
    args = [str(Path(sys.executable).parent / "pricelevel"), "train"]
    for override in THREADS:
        args += ["--set", override]
    log = tmp_path / "train.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not _running_trials(root / "data" / "optuna" / "optuna.db"):
            assert process.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no trial started"
            time.sleep(0.2)
        signalled = time.monotonic()
        os.killpg(process.pid, signal.SIGTERM)  # the whole group, as `timeout` does
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        exit_s = time.monotonic() - signalled
        print(f"pricelevel train exited {exit_s:.1f} s after SIGTERM to its group")  # shown with `pytest -s`
        left, server_left = _group_alive(process.pid), _using(home)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM and exit_s < 10, (process.returncode, exit_s, text[-5000:])
    assert not left and not server_left, (left, server_left)
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        states = dict(db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id"))
    assert states["train"] == "CANCELLED", states
    assert not _running_trials(root / "data" / "optuna" / "optuna.db")
