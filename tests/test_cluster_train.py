"""The whole ``train`` flow on a real Dask cluster with trial workers sharing a PostgreSQL study, run as a user
runs it (``pricelevel train`` in a subprocess), and the same run stopped with SIGTERM mid-tuning.

One combined test (the expensive parts are shared): a real ``dask scheduler`` with two ``dask worker --preload
tasks.runtime`` processes, a throwaway PostgreSQL (tests/postgres.py) and the test session's Prefect API.

1. ``tuning.workers: 2`` on Dask: the run completes (it used to fail at ``tune`` with ``IOLoop is closed``), the
   study has ``n_trials`` finished trials, run by both trial workers on the Dask workers, not in the flow.
2. A new study, SIGTERM while a trial runs: the CLI exits within 10 s, the flow run is Cancelled, no trial is
   left running and none starts afterwards (the orphans of issue 24 finished the study in the background).
3. The same command again resumes: the finished steps are reused and the study ends at ``n_trials``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE
from tests.postgres import Postgres, free_port, postgres_fixture  # noqa: F401

pytestmark = [pytest.mark.flow, pytest.mark.postgres, pytest.mark.slow]

TINY = [
    "data.symbols=[BTCUSDT,ETHUSDT]",
    "data.start=2023-06-01",
    "levels.lookback_days=120",
    "labels.threshold_frac=0.005",
    "labels.horizon=6",
    "dataset.timeframe=4h",
    "dataset.seq_len=16",
    "levels.refit_every=6",
    "model.hidden_size=8",
    "model.num_layers=1",
    "model.max_epochs=1",
    "model.patience=1",
    "model.num_threads=1",
    "model.batch_size=128",
    "model.limit_train_batches=5",
    "tuning.max_epochs=1",
    "tuning.space.hidden_size=[8]",
    "tuning.space.num_layers=[1,1]",
    "tuning.space.batch_size=[128]",
    "tuning.space.seq_len=[12,16]",
    "tuning.workers=2",
    "tuning.heartbeat_s=1",
    "tuning.grace_s=5",
    "flow.max_workers=2",
    "flow.task_runner=dask",
]


def _project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "conf", root / "conf")
    (root / "data" / "sample").symlink_to(SAMPLE, target_is_directory=True)
    return root


@contextlib.contextmanager
def dask_cluster(env: dict[str, str], log_file: Path, workers: int = 2) -> Iterator[str]:
    """``dask scheduler`` and ``workers`` one-thread ``dask worker`` processes (each its own process group)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    address = f"tcp://127.0.0.1:{port}"
    with log_file.open("wb") as log:
        common = {"env": env, "stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True}
        processes = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard", "--preload", "tasks.runtime"], **common)]
        processes += [subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                        "--no-dashboard", "--preload", "tasks.runtime", "--name", f"w{k}"], **common)
                      for k in range(workers)]
        try:
            from distributed import Client

            with Client(address, timeout=180) as client:  # the scheduler's preload imports the task modules first
                client.wait_for_workers(workers, timeout=180)
            yield address
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            for process in processes:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _trials(url: str) -> list[tuple[str, str, int]]:
    """(study, state, trial number) of every trial in the database, surplus ones left out."""
    import optuna

    from pricelevel.ml.tuning import SURPLUS

    rows = []
    for name in optuna.get_all_study_names(storage=url):
        study = optuna.load_study(study_name=name, storage=url)
        rows += [(name, t.state.name, t.number) for t in study.get_trials(deepcopy=False)
                 if not t.user_attrs.get(SURPLUS)]
    return rows


def _train(env: dict[str, str], log: Path, *overrides: str) -> subprocess.Popen:
    """``pricelevel train``; after the first run, on the validated store as it is (``--skip-ingest``)."""
    args = [str(Path(sys.executable).parent / "pricelevel"), "train"]
    if (Path(env["PRICELEVEL_HOME"]) / "data" / "validated").exists():
        args.append("--skip-ingest")
    for override in overrides:
        args += ["--set", override]
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, log: Path, timeout_s: float = 420) -> None:
    try:
        process.wait(timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log.read_text()[-5000:]


def test_train_on_dask_with_two_trial_workers_completes_and_a_sigterm_mid_tuning_leaves_no_orphan(
    prefect_harness, postgres: Postgres, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    root = _project(tmp_path / "project")
    url = postgres.url(postgres.database("optuna"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PRICELEVEL_HOME": str(root),
           "PYTHONPATH": str(ROOT), **postgres.env}
    log = tmp_path / "train.log"
    with dask_cluster(env, tmp_path / "dask.log") as address:
        config = [*TINY, f"flow.dask_address={address}", f"tuning.storage={url}"]

        # 1. the whole flow, trials on two trial workers on the Dask workers
        _finish(_train(env, log, *config, "tuning.n_trials=2"), log)
        complete = _trials(url)
        assert [state for _, state, _ in complete] == ["COMPLETE", "COMPLETE"], complete
        finished = re.search(r"trial workers finished \[(\d+), (\d+)\]", log.read_text())
        assert finished and int(finished[1]) + int(finished[2]) == 2, log.read_text()[-3000:]
        on_workers = (tmp_path / "dask.log").read_text()  # the workers' own log: the trials ran there
        assert all(f"Task run 'tune-trials {k}' - Finished in state Completed()" in on_workers for k in (0, 1))

        # 2. a new study (n_trials is part of its key); SIGTERM once a trial runs, as `timeout` or a worker sends it
        log.write_text("")
        stopped = _train(env, log, *config, "tuning.n_trials=6")
        deadline = time.monotonic() + 300
        while not [t for t in _trials(url) if t[1] == "RUNNING"]:
            assert stopped.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no trial started"
            time.sleep(0.2)
        signalled = time.monotonic()
        stopped.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            stopped.wait(30)
        exit_s = time.monotonic() - signalled
        print(f"pricelevel train exited {exit_s:.1f} s after SIGTERM")  # shown with `pytest -s`
        left = _group_alive(stopped.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stopped.pid, signal.SIGKILL)
        assert stopped.returncode is not None and exit_s < 10, (exit_s, log.read_text()[-5000:])
        assert stopped.returncode != 0 and not left, (stopped.returncode, left)
        at_exit = _trials(url)
        time.sleep(4)  # an orphan would still be running, or would start the next trial, by now
        after = _trials(url)
        assert not [t for t in after if t[1] == "RUNNING"] and after == at_exit, (at_exit, after)
        state = _last_flow_run_state("train")
        assert state == "CANCELLED", state

        # 3. the same command resumes: its finished steps are reused, the study ends at n_trials
        log.write_text("")
        _finish(_train(env, log, *config, "tuning.n_trials=6"), log)
        text = log.read_text()
        assert "passed before" in text or "reused" in text, text[-3000:]
        resumed = [t for t in _trials(url) if t[0] != complete[0][0]]
        assert sum(state == "COMPLETE" for _, state, _ in resumed) == 6, resumed
        kept = {number for name, state, number in after if state == "COMPLETE" and name != complete[0][0]}
        assert kept <= {number for _, state, number in resumed if state == "COMPLETE"}


def _group_alive(pgid: int) -> list[str]:
    """The command lines of the processes still in group ``pgid`` (zombies left out)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state not in ("Z", "X"):
                alive.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:200])
    return alive


def _last_flow_run_state(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return runs[0].state.type.name
