"""``make cluster-up`` / ``make cluster-down`` themselves (``pricelevel cluster up|down``, what the Makefile runs), and
the deployed nightly on the cluster they start. One cluster serves the whole module (a start takes a minute or two):

- a port in use is refused in one line naming it, before anything starts;
- the cluster comes up with a Prefect worker polling each pool (every deployment of prefect.yaml is Ready) and the
  automation that crashes silent flow runs; a second ``up`` is refused in one line;
- a Prefect worker killed with its flow run (a host that dies) once levels and features are done: the run is
  marked Crashed by the automation;
- then a "Quick run" of the ``train-nightly`` deployment (``make deploy``'s ``prefect deploy``, picked up by the
  cluster's Prefect worker) reuses every step the dead run finished, runs every task of the DAG, the fan-out and both
  trial workers on the Dask workers, registers a version in the MLflow server, and its completion fires ``promote``;
  the same config on the thread runner gives the same step keys, byte-identical derived files and the same
  registered metrics;
- ``down`` leaves no process of the cluster behind.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pricelevel.core.cluster import (
    CRASH_AUTOMATION,
    POOL,
    TRADER_POOL,
    ClusterError,
    ClusterPlan,
    require_free_ports,
)
from pricelevel.core.postgres import pg_bindir
from tests.conftest import ROOT, project_folder

PRICELEVEL = str(Path(sys.executable).parent / "pricelevel")
PREFECT = str(Path(sys.executable).parent / "prefect")
NIGHTLY, PROMOTE = "train/train-nightly", "promote/promote"
#: A run silent this long is Crashed (the cluster's default is 90 s; heartbeats come every 30 s).
CRASH_AFTER_S = 60
#: The smallest config that still runs every task of the DAG: 2 symbols, the 4h model, 2 trials of 1 epoch.
TINY = {
    "data": {"symbols": ["BTCUSDT", "ETHUSDT"], "start": "2023-06-01"},
    "levels": {"lookback_days": 120, "refit_every": 6},
    "labels": {"threshold_frac": 0.005, "horizon": 6},
    "dataset": {"timeframe": "4h", "seq_len": 16},
    "model": {"hidden_size": 8, "num_layers": 1, "max_epochs": 1, "patience": 1, "num_threads": 1, "batch_size": 128,
              "limit_train_batches": 5},
    "tuning": {"n_trials": 2, "max_epochs": 1, "heartbeat_s": 1, "grace_s": 5,
               "space": {"hidden_size": [8], "num_layers": [1, 1], "batch_size": [128], "seq_len": [12, 16]}},
    "flow": {"max_workers": 2},
}
#: Every task of the training flow (ingest is its subflow); names as the Prefect UI shows them.
DAG_TASKS = ("load-config", "levels ", "features ", "lookahead", "dataset", "budget", "start-run", "tune-trials ",
             "tune-", "train-", "evaluate", "gbm-baseline", "deflated-sharpe", "backtest", "register")
#: Derived steps whose keys do not depend on where they ran (``budget`` measures this machine's speed).
MACHINE_FREE_STEPS = ("levels", "features", "lookahead", "trials", "models", "gbm", "backtests")


def _plan(root: Path, offset: int, workers: int = 1) -> ClusterPlan:
    return ClusterPlan(root / ".cluster", dask_workers=workers, postgres_port=5433 + offset, prefect_port=4200 + offset,
                       mlflow_port=5000 + offset, dask_port=8786 + offset, dashboard_port=8787 + offset)


def _free_offset(root: Path) -> int:
    for _ in range(200):
        offset = random.randrange(15000, 50000)
        with contextlib.suppress(ClusterError):
            require_free_ports(_plan(root, offset))
            return offset
    raise AssertionError("no free port range")


def _clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRICELEVEL_", "PGPASS"))}
    return env | {"PRICELEVEL_HOME": str(root), "PYTHONPATH": str(ROOT)}


def _cluster(root: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PRICELEVEL, "cluster", *args], env=_clean_env(root), cwd=root, capture_output=True,
                          text=True, timeout=timeout_s)


def _processes_of(root: Path) -> list[str]:
    """Processes started for the project at ``root``: its path in their command line or ``PRICELEVEL_HOME``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X") and (str(root) in cmdline or f"PRICELEVEL_HOME={root}".encode() in environ):
                found.append(cmdline[:200])
    return found


def _require_postgres() -> None:
    if pg_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("PRICELEVEL_TEST_POSTGRES") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@dataclass
class Cluster:
    """A running ``pricelevel cluster up`` in a throwaway project (flows, tasks and prefect.yaml of this checkout)."""

    root: Path
    plan: ClusterPlan
    up: subprocess.CompletedProcess
    deployed: bool = False

    @property
    def env(self) -> dict[str, str]:
        """What a shell in the project has after ``source .cluster/env``."""
        lines = [line.removeprefix("export ") for line in self.plan.env_file.read_text().splitlines()
                 if line.startswith("export ")]
        return _clean_env(self.root) | dict(line.split("=", 1) for line in lines)

    @contextlib.contextmanager
    def api(self) -> Iterator[object]:
        """A Prefect client of the cluster's server (whatever API the test session set up)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.env["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client:
            yield client


def _project(root: Path) -> Path:
    """A short path (PostgreSQL's socket must fit in 107 bytes), readable by the ``postgres`` user."""
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    project_folder(root)
    (root / "conf" / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    _require_postgres()
    root = _project(Path(tempfile.mkdtemp(prefix="plc-", dir="/tmp")))
    for name in ("flows", "tasks"):  # the deployments' entrypoints, as in a checkout
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    shutil.copy(ROOT / "prefect.yaml", root / "prefect.yaml")
    offset = _free_offset(root)
    plan = _plan(root, offset, workers=2)
    try:
        started = time.monotonic()
        up = _cluster(root, "up", "--workers", "2", "--port-offset", str(offset), "--crash-after", str(CRASH_AFTER_S))
        assert up.returncode == 0, up.stdout + up.stderr + plan.log_file.read_text()[-5000:]
        print(f"cluster up: {time.monotonic() - started:.1f} s")  # shown with `pytest -s`
        yield Cluster(root, plan, up)
    finally:
        _cluster(root, "down", timeout_s=200)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.flow
def test_cluster_up_serves_every_pool_and_refuses_a_second_up(cluster: Cluster) -> None:
    plan, project = cluster.plan, cluster.root
    assert plan.env_file.exists() and f"Prefect worker {TRADER_POOL}" in cluster.up.stdout
    offset = plan.prefect_port - 4200
    again = _cluster(project, "up", "--workers", "2", "--port-offset", str(offset), timeout_s=120)
    error = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(error) == 1 and "a cluster is running already" in error[0], again.stderr

    with cluster.api() as client:
        statuses = {name: client.read_work_pool(name).status.value for name in (POOL, TRADER_POOL)}
    assert statuses == {POOL: "READY", TRADER_POOL: "READY"}, statuses  # a worker polls each: deployments Ready
    automation = subprocess.run([PREFECT, "automation", "inspect", CRASH_AUTOMATION, "--json"], env=cluster.env,
                                capture_output=True, text=True, timeout=120)
    assert automation.returncode == 0 and f'"within": {CRASH_AFTER_S}' in automation.stdout, automation.stdout
    assert _processes_of(project)


def _deploy(cluster: Cluster) -> None:
    """``make deploy``'s ``prefect deploy`` (only the two deployments used here), then both deployments' parameters
    point at the tiny config, as "Edit" in the UI would; a "Quick run" uses them."""
    if cluster.deployed:
        return
    from prefect.client.schemas.actions import DeploymentUpdate

    deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--name", "train-nightly", "--name", "promote"],
                              env=cluster.env, cwd=cluster.root, capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with cluster.api() as client:
        for name in (NIGHTLY, PROMOTE):
            deployment = client.read_deployment_by_name(name)
            client.update_deployment(deployment.id, DeploymentUpdate(
                parameters={"config_file": str(cluster.root / "conf" / "tiny.yaml")}))
    cluster.deployed = True


def _quick_run(cluster: Cluster, name: str, parameters: dict | None = None) -> object:
    """What the UI's "Quick run" (or ``prefect deployment run``) does: a run for the deployment's pool."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: cluster.env["PREFECT_API_URL"]}):
        return run_deployment(name, parameters=parameters, timeout=0)


def _wait_final(cluster: Cluster, run_id: object, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    with cluster.api() as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state.type.name
            time.sleep(2)
    return "TIMED OUT"


def _logs(cluster: Cluster, run_id: object) -> str:
    """Every log line of a flow run, its tasks' included (also those that ran on Dask workers)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    lines: list[str] = []
    with cluster.api() as client:
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200, offset=len(lines))
            lines += [log.message for log in page]
            if len(page) < 200:
                return "\n".join(lines)


def _task_runs(cluster: Cluster, run_id: object) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with cluster.api() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=200)
    return {run.name: run.state.type.name for run in runs}


def _executed_on_dask(cluster: Cluster) -> dict[str, int]:
    """Tasks each Dask worker has run since it started."""
    from distributed import Client

    with Client(cluster.plan.scheduler, timeout=60) as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


def _derived(root: Path) -> dict[str, Path]:
    """``step/key -> folder`` of every finished derived output."""
    return {f"{folder.parent.name}/{folder.name}": folder
            for folder in (root / "data" / "derived").glob("*/*") if (folder / ".complete").exists()}


def _registered(tracking_uri: str) -> tuple[object, dict[str, float], dict[str, str]]:
    """The newest version of the registered model, its run's metrics and the best parameters."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    newest = max(client.search_model_versions("name='pricelevel'"), key=lambda v: int(v.version))
    version = client.get_model_version("pricelevel", newest.version)  # a search leaves the aliases out
    run = client.get_run(version.run_id)
    return version, run.data.metrics, {k: v for k, v in run.data.params.items() if k.startswith("best.")}


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.flow
def test_a_run_whose_worker_dies_is_crashed_and_the_deployed_nightly_reuses_its_steps_runs_on_the_cluster_and_fires_promote(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One nightly's worth of CI time for both: a host that dies mid-run, then the deployed nightly that follows it."""
    started = time.monotonic()
    _deploy(cluster)
    deployed_s = time.monotonic() - started

    # the same config on the thread runner, in a project of its own (its own store, Optuna and MLflow files); it runs
    # meanwhile, so the minute the crash detection waits is not spent idle
    threads = _project(tmp_path / "threads")
    thread_log = tmp_path / "threads.log"
    env = _clean_env(threads) | {"PREFECT_API_URL": cluster.env["PREFECT_API_URL"]}
    thread_run = subprocess.Popen([PRICELEVEL, "train", "--config", str(threads / "conf" / "tiny.yaml")], env=env,
                                  cwd=threads, stdout=thread_log.open("wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        finished = _run_until_its_host_dies(cluster, tmp_path)

        # the next nightly ("Quick run", on the cluster's worker) reuses every step the dead run finished
        before = _executed_on_dask(cluster)
        run = _quick_run(cluster, NIGHTLY)
        state = _wait_final(cluster, run.id, 900)
        nightly_s = time.monotonic() - started
        logs = _logs(cluster, run.id)
        assert state == "COMPLETED", logs[-5000:]
        assert re.search(r"levels \w+: reused", logs) and re.search(r"features \w+: reused", logs), logs[-3000:]
        assert not re.search(r"(levels|features) \w+: computed", logs), logs[-3000:]
        after_run = _derived(cluster.root)
        rebuilt = [key for key, mtime in finished.items() if (after_run[key] / ".complete").stat().st_mtime_ns != mtime]
        assert not rebuilt, rebuilt  # no step computed twice

        # every task of the DAG, the fan-out and both trial workers on the Dask workers, from the cluster's env
        tasks = _task_runs(cluster, run.id)
        missing = [name for name in DAG_TASKS if not any(task.startswith(name) for task in tasks)]
        assert not missing and set(tasks.values()) == {"COMPLETED"}, (missing, tasks)
        assert sum(task.startswith("tune-trials ") for task in tasks) == 2, tasks
        after = _executed_on_dask(cluster)
        ran = {worker: after[worker] - before.get(worker, 0) for worker in after}
        assert len(ran) == 2 and all(ran.values()) and sum(ran.values()) >= 6, ran  # 2 levels, 2 features, 2 trials
        trial_workers = re.search(r"trial workers finished \[(\d+), (\d+)\]", logs)
        assert trial_workers and int(trial_workers[1]) + int(trial_workers[2]) == 2, logs[-3000:]

        # a version in the MLflow server; its completion fired `promote`, which judged it
        version, metrics, best = _registered(cluster.env["PRICELEVEL_TRACKING__TRACKING_URI"])
        assert "challenger" in version.aliases or "champion" in version.aliases, version.aliases
        promoted = _wait_promote(cluster, version, timeout_s=600)
        print(f"deploy {deployed_s:.1f} s; crash and nightly until registered {nightly_s:.1f} s; "
              f"promote done after {time.monotonic() - started:.1f} s ({promoted})")

        # the thread runner: same keys, same files, same registered model
        thread_run.wait(900)
        assert thread_run.returncode == 0, thread_log.read_text()[-5000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(thread_run.pid, signal.SIGKILL)
    on_cluster, on_threads = _derived(cluster.root), _derived(threads)
    steps = [key for key in on_threads if key.split("/")[0] in MACHINE_FREE_STEPS]
    assert steps and set(steps) <= set(on_cluster), sorted(set(steps) - set(on_cluster))
    _, thread_metrics, thread_best = _registered(f"sqlite:///{threads / 'mlruns' / 'mlflow.db'}")
    # Trial scheduling decides which parameters are tried (two workers sample in parallel), never what a given
    # parameter set scores: with the same best parameters the final model, its backtest and every metric are the same.
    same_files = ("levels/", "features/", "lookahead/", *(("backtests/",) if best == thread_best else ()))
    for key in steps:
        if key.startswith(same_files):
            compared = filecmp.dircmp(on_cluster[key], on_threads[key])
            assert not compared.diff_files and not compared.left_only and not compared.right_only, key
    if best == thread_best:
        drift = {k: (metrics[k], thread_metrics.get(k)) for k in metrics if k.startswith(("test_", "wf_mean_"))
                 and thread_metrics.get(k) != pytest.approx(metrics[k], rel=1e-9, abs=1e-12)}
        assert not drift, drift
    print(f"best parameters on the cluster {best}, on threads {thread_best}")


def _run_until_its_host_dies(cluster: Cluster, tmp_path: Path) -> dict[str, int]:
    """A nightly on a Prefect worker of its own, killed with its flow run (a host that dies) once levels and features
    are done: the run must be marked Crashed. Returns the finished steps' completion times."""
    pool, name = "pricelevel-doomed", "train-doomed"
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env=cluster.env,
                              cwd=cluster.root, stdout=worker_log.open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    doomed = None
    try:
        with cluster.api() as client:
            deadline = time.monotonic() + 180
            while not _pool_ready(client, pool):
                assert worker.poll() is None and time.monotonic() < deadline, worker_log.read_text()[-3000:]
                time.sleep(1)
            nightly = client.read_deployment_by_name(NIGHTLY)  # the same flow, on a pool only this worker polls
            client.create_deployment(flow_id=nightly.flow_id, name=name, work_pool_name=pool,
                                     entrypoint=nightly.entrypoint, path=nightly.path, pull_steps=nightly.pull_steps,
                                     parameter_openapi_schema=nightly.parameter_openapi_schema,
                                     parameters=nightly.parameters)
        doomed = _quick_run(cluster, f"train/{name}")
        deadline = time.monotonic() + 600
        while _logs(cluster, doomed.id).count(": computed") < 4:  # levels and features of both symbols finished
            assert time.monotonic() < deadline and worker.poll() is None, worker_log.read_text()[-5000:]
            time.sleep(2)
    finally:
        # the machine dies: the worker and the flow run it started, at once
        killed = _pids_with_env(f"PREFECT__FLOW_RUN_ID={doomed.id}") if doomed is not None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait()
    assert killed, "the flow run's process was not found"
    killed_at = time.monotonic()
    state = _wait_final(cluster, doomed.id, CRASH_AFTER_S + 180)
    print(f"marked {state} {time.monotonic() - killed_at:.1f} s after the kill")
    assert state == "CRASHED", state
    finished = {key: (folder / ".complete").stat().st_mtime_ns for key, folder in _derived(cluster.root).items()}
    assert sum(key.startswith(("levels/", "features/")) for key in finished) == 4, sorted(finished)
    return finished


def _wait_promote(cluster: Cluster, version: object, timeout_s: float) -> str:
    """The promote run the nightly's completion triggered: Completed, and the version judged (``promotion.*``)."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    uri = cluster.env["PRICELEVEL_TRACKING__TRACKING_URI"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with cluster.api() as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["promote"])))
        states = [run.state.type.name for run in runs if run.state is not None]
        if "COMPLETED" in states:
            judged = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("pricelevel", version.version)
            assert any(tag.startswith("promotion.") for tag in judged.tags), judged.tags
            return f"@champion on version {judged.version}" if "champion" in judged.aliases else "@champion kept"
        assert not {"FAILED", "CRASHED"} & set(states), states
        time.sleep(3)
    raise AssertionError("the nightly's completion did not fire a promote run")


def test_a_port_in_use_is_refused_in_one_line_naming_it(project: Path) -> None:
    offset = _free_offset(project)
    plan = _plan(project, offset, workers=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", plan.mlflow_port))
        taken.listen()
        with pytest.raises(ClusterError, match=rf"^port {plan.mlflow_port} \(MLflow server\) is in use"):
            require_free_ports(plan)
        done = _cluster(project, "up", "--workers", "2", "--port-offset", str(offset), timeout_s=120)
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(error) == 1, done.stderr
    assert f"port {plan.mlflow_port} (MLflow server) is in use" in error[0]
    assert not plan.pid_file.exists() and not _processes_of(project)  # nothing was started




def _pool_ready(client: object, pool: str) -> bool:
    with contextlib.suppress(Exception):
        return client.read_work_pool(pool).status.value == "READY"
    return False


def _pids_with_env(entry: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.flow
def test_cluster_down_leaves_no_process_behind(cluster: Cluster) -> None:
    started = time.monotonic()
    down = _cluster(cluster.root, "down", timeout_s=200)
    print(f"cluster down: {time.monotonic() - started:.1f} s")
    assert down.returncode == 0 and "cluster stopped" in down.stdout, down.stdout + down.stderr
    assert not _processes_of(cluster.root), _processes_of(cluster.root)
    assert not cluster.plan.env_file.exists() and not cluster.plan.pid_file.exists()
