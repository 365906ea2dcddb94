"""The per-symbol fan-out on real engines: threads, a 2-worker LocalCluster and a `dask scheduler` with two
`dask worker` processes give the same step keys and byte-identical files, computed in worker processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, project_folder
from tests.postgres import free_port

pytestmark = [pytest.mark.flow, pytest.mark.slow]

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
SMALL = [
    f"data.symbols=[{','.join(SYMBOLS)}]",
    "data.start=2023-06-01",
    "levels.lookback_days=120",
    "dataset.timeframe=4h",
    "levels.refit_every=6",
    "flow.max_workers=2",
]


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs(result: dict) -> dict[str, dict[str, str]]:
    """Every step's key and the sha256 of each of its files."""
    steps = [*result["levels"], *result["tables"]]
    return {f"{s.step}/{s.symbol}/{s.key}": _files(Path(s.folder)) for s in steps}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> Path:
    """One validated store (3 symbols at 1d/4h/1h from mid-2023), copied into each run's project."""
    from flows.ingest import ingest

    root = project_folder(tmp_path_factory.mktemp("ingest") / "project")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRICELEVEL_HOME", str(root))
    try:
        ingest(overrides=SMALL)
    finally:
        mp.undo()
    return root / "data" / "validated"


def _run(tmp_path: Path, ingested: Path, name: str, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> dict:
    from tests.fakes.cluster_flow import tables

    root = project_folder(tmp_path / name)
    shutil.copytree(ingested, root / "data" / "validated")
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))
    return tables(overrides=[*SMALL, *overrides])


@pytest.fixture(scope="module")
def threaded(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    try:
        return _run(tmp_path_factory.mktemp("thread"), ingested, "thread", mp, "flow.task_runner=thread")
    finally:
        mp.undo()


def test_a_local_dask_cluster_gives_the_thread_runners_keys_and_files(threaded, ingested, tmp_path, monkeypatch) -> None:
    clustered = _run(tmp_path, ingested, "dask", monkeypatch, "flow.task_runner=dask")
    assert _outputs(clustered) == _outputs(threaded)
    assert len(_outputs(threaded)) == 2 * len(SYMBOLS) and all(_outputs(threaded).values())
    assert all(s.built for s in clustered["levels"] + clustered["tables"])  # computed there, not reused
    workers = set(clustered["pids"]) - {clustered["flow_pid"]}
    assert len(workers) >= 2 and clustered["flow_pid"] not in clustered["pids"], clustered["pids"]
    assert set(threaded["pids"]) == {threaded["flow_pid"]}


@pytest.fixture
def dask_cluster(tmp_path: Path):
    """`dask scheduler` and two `dask worker` processes (one thread each), reporting to the test's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    bin_dir = Path(sys.executable).parent
    log = (tmp_path / "dask.log").open("wb")
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard", "--preload", "tasks.runtime"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = [subprocess.Popen([str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
                                 "--nworkers", "1", "--no-dashboard", "--preload", "tasks.runtime", "--name", f"w{k}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
               for k in range(2)]
    processes = [scheduler, *workers]
    try:
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield f"tcp://127.0.0.1:{port}"
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
        log.close()


def test_a_real_scheduler_and_two_dask_workers_give_the_same_keys_and_files(
    threaded, ingested, dask_cluster, tmp_path, monkeypatch
) -> None:
    clustered = _run(tmp_path, ingested, "remote", monkeypatch, "flow.task_runner=dask", f"flow.dask_address={dask_cluster}")
    assert _outputs(clustered) == _outputs(threaded)
    workers = set(clustered["pids"]) - {clustered["flow_pid"]}
    assert len(workers) >= 2 and clustered["flow_pid"] not in clustered["pids"], clustered["pids"]


def test_dask_address_without_a_prefect_server_is_refused_with_one_line(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pricelevel.core.config import ConfigError, FlowConfig
    from tasks.runtime import fan_out

    with temporary_settings(restore_defaults={PREFECT_API_URL}), \
            pytest.raises(ConfigError, match="set PREFECT_API_URL"):
        fan_out(FlowConfig(task_runner="dask", dask_address="tcp://127.0.0.1:1"))


def test_training_tasks_ask_for_the_gpu_only_on_dask_with_cuda(monkeypatch) -> None:
    import dask

    from pricelevel.core.config import ConfigError, FlowConfig
    from pricelevel.ml.config import ModelConfig
    from tasks import runtime
    from tasks.runtime import routes_to_gpu, training_resources

    for runner, accelerator, wanted in [("dask", "cuda", {"GPU": 1}), ("dask", "gpu", {"GPU": 1}),
                                        ("dask", "auto", None), ("thread", "cuda", None)]:
        flow, model = FlowConfig(task_runner=runner), ModelConfig(accelerator=accelerator)
        assert routes_to_gpu(flow, model) is (wanted is not None), (runner, accelerator)
        if wanted is None:
            with training_resources(flow, model):
                assert dask.get_annotations().get("resources") is None, (runner, accelerator)
            continue
        with monkeypatch.context() as patch:
            patch.setattr(runtime, "require_gpu_worker", lambda flow: None)  # a GPU worker exists
            with training_resources(flow, model):
                assert dask.get_annotations().get("resources") == wanted, (runner, accelerator)
        # without one (the temporary local cluster has none) training is refused in one line, not left waiting
        with pytest.raises(ConfigError, match="no GPU worker"), training_resources(flow, model):
            pass
