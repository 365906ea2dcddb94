"""SIGTERM to a ``pricelevel train`` that runs without a Prefect API, as ``timeout`` sends it (to the whole process
group) while the trials run in the flow's process: the command ends within 10 s, its flow run is marked
Cancelled in the database of its temporary Prefect server, and that server, started in a session of its own so
that the group's signal does not kill it first, is stopped last: nothing is left running. The same command
again completes (and exits: the temporary server goes after the flow's last logs and events), resuming the
study. (The Dask path: test_cluster_faults.py.)"""

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

from tests.cluster import TINY, _group_alive
from tests.conftest import project_folder

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
    root = project_folder(tmp_path / "project")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PRICELEVEL_HOME": str(root), "PREFECT_HOME": str(home)}
    args = [str(Path(sys.executable).parent / "pricelevel"), "train"]
    for override in THREADS:
        args += ["--set", override]
    log, study = tmp_path / "train.log", root / "data" / "optuna" / "optuna.db"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not _running_trials(study):
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
        _kill_servers(home)
    text = log.read_text()
    assert process.returncode == 128 + signal.SIGTERM and exit_s < 10, (process.returncode, exit_s, text[-5000:])
    assert not left and not server_left, (left, server_left)
    assert "stopped by SIGTERM" in text and "Traceback" not in text, text[-3000:]
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        states = dict(db.execute("select flow.name, flow_run.state_type from flow_run join flow on flow.id = flow_run.flow_id"))
    assert states["train"] == "CANCELLED", states
    assert not _running_trials(study)
    with contextlib.closing(sqlite3.connect(study)) as db:
        kept = db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]

    # the same command again: ingest, levels, features and the finished trials are reused; it ends, and exits
    rerun = subprocess.run([*args, "--skip-ingest"], env=env, capture_output=True, text=True, timeout=400)
    left = _using(home)
    _kill_servers(home)
    assert rerun.returncode == 0 and not left, (left, rerun.stdout[-3000:] + rerun.stderr[-3000:])
    assert "passed before" in rerun.stdout + rerun.stderr  # the look-ahead check of the same tables
    with contextlib.closing(sqlite3.connect(study)) as db:
        complete = db.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
        run_now = db.execute("select count(*) from trials").fetchone()[0]
    assert complete == 6 and run_now <= 6 + 1, (kept, complete, run_now)  # resumed: only the missing trials


def _kill_servers(home: Path) -> None:
    """What a failed assertion would leave behind (the server is in a session of its own)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
