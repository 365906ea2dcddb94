"""Shared by the cluster tests (test_cluster_faults, test_cluster_signals): the tiny training config that still
runs every task, a throwaway project on the bundled sample, a real ``dask scheduler`` with one-thread workers
(both with the ``tasks.runtime`` preload), and what a test reads back (trials, process groups, flow-run states)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT, SAMPLE
from tests.postgres import free_port

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
