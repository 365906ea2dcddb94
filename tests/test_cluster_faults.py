"""Workers that die and flows that stop, on a real cluster: a ``dask scheduler`` with two ``dask worker --preload
tasks.runtime`` (each under its nanny, which restarts a killed worker), a throwaway PostgreSQL study and the test
session's Prefect API; ``pricelevel train`` runs as a user runs it, in a subprocess, on a tiny config.

- A Dask worker SIGKILLed while it runs a levels/features task, and later those running trial workers while a
  trial is RUNNING, in one run (:func:`disturbed`): the fan-out task runs again and its outputs are those of an undisturbed computation
  (same step keys, byte-identical files); the trial is failed by the heartbeat, retried with its parameters, and
  the study ends at exactly ``n_trials``; the flow completes.
- SIGTERM during the fan-out: the command ends within 10 s, the run is Cancelled and no task is left running on
  the Dask workers; the same command again reuses every finished step (none computed twice).
- A flow SIGKILLed mid-tuning (nobody writes the stop file): its trial workers see its lease go stale and stop
  within ``tuning.grace_s`` and a few seconds.

Which task runs is read from the workers themselves (``Worker.state.executing``), so each kill lands while the
task it targets is running.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import TINY, _group_alive, _last_flow_run_state
from tests.conftest import ROOT, project_folder
from tests.postgres import Postgres, free_port, postgres_fixture  # noqa: F401

pytestmark = [pytest.mark.flow, pytest.mark.postgres, pytest.mark.slow]

FAN_OUT = ("find_levels", "feature_bars")  # the Dask key prefixes of the levels / features tasks
TRIALS = ("tune_trials",)
#: Seconds between the checks of a polling loop.
POLL_S = 0.05
#: A refit on every bar: a levels task runs long enough (seconds, numba warm) that one left running would be seen.
SLOW_LEVELS = ("levels.refit_every=1",)
#: How long after its flow has ended a task it submitted may still run (the interrupt lands at its next bytecode).
STOPPED_WITHIN_S = 5


@dataclass
class Cluster:
    """The running cluster, and what a test asks its scheduler and workers."""

    address: str
    env: dict[str, str]
    log: Path
    client: Any
    killed: list[int] = field(default_factory=list)

    def processing(self, prefixes: tuple[str, ...]) -> dict[str, list[str]]:
        """The workers the scheduler has given a task of ``prefixes`` (one thread each: the one they run)."""
        with contextlib.suppress(Exception):
            return {worker: keys for worker, keys in
                    ((w, [str(k) for k in ks if str(k).startswith(prefixes)]) for w, ks in self.client.processing().items())
                    if keys}
        return {}

    def executing(self, timeout_s: float = 20) -> dict[str, list[str]]:
        """Each worker's tasks running in its thread now, as the worker sees them: a task its client has let go of
        still runs until it returns. A worker too busy to answer within ``timeout_s`` (a kernel holding the GIL)
        counts as running something."""
        pool = concurrent.futures.ThreadPoolExecutor(1)
        asked = pool.submit(self.client.run, lambda dask_worker: sorted(
            str(ts.key) for ts in dask_worker.state.executing | dask_worker.state.long_running))
        pool.shutdown(wait=False)
        try:
            return asked.result(timeout_s)
        except concurrent.futures.TimeoutError:
            return {"a worker that did not answer": ["busy"]}

    def task_states(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """The scheduler's state of each of ``keys`` it still knows, and how many worker deaths it was part of."""
        with contextlib.suppress(Exception):
            return self.client.run_on_scheduler(lambda dask_scheduler: {
                key: (task.state, task.suspicious) for key in keys if (task := dask_scheduler.tasks.get(key))})
        return {}

    def kill_worker(self, address: str) -> int:
        """SIGKILL the worker process at ``address`` (its nanny starts a new one); returns the killed pid."""
        pid = self.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.workers[address].pid)  # not the worker
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)
        return pid

    def wait_workers(self, n: int = 2, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.client.scheduler_info(n_workers=-1)["workers"]) < n:
            assert time.monotonic() < deadline, "the nanny did not restart the killed worker"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(prefect_harness, postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    folder = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT), **postgres.env}
    port, bin_dir = free_port(), Path(sys.executable).parent
    address = f"tcp://127.0.0.1:{port}"
    log = folder / "dask.log"
    with log.open("wb") as out:
        common: dict[str, Any] = {"env": env, "stdout": out, "stderr": subprocess.STDOUT, "start_new_session": True}
        processes = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard", "--preload", "tasks.runtime"], **common)]
        processes += [subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                        "--no-dashboard", "--preload", "tasks.runtime", "--name", f"w{k}"], **common)
                      for k in range(2)]
    try:
        with Client(address, timeout=180) as client:  # the scheduler's preload imports the task modules first
            client.wait_for_workers(2, timeout=180)
            yield Cluster(address, env, log, client)
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


@pytest.fixture(scope="module")
def ingested(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One validated store for the tiny config (ingested in this process, on threads), copied into each project."""
    from flows.ingest import ingest

    root = project_folder(tmp_path_factory.mktemp("ingest") / "project")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRICELEVEL_HOME", str(root))
    try:
        ingest(overrides=[o for o in TINY if not o.startswith(("flow.", "tuning.workers"))])
    finally:
        mp.undo()
    return root / "data" / "validated"


def _new_project(folder: Path, ingested: Path) -> Path:
    root = project_folder(folder / "project")
    shutil.copytree(ingested, root / "data" / "validated")
    return root


def _config(cluster: Cluster, postgres: Postgres, *extra: str) -> list[str]:
    """The tiny config on this cluster, with a study database of its own."""
    url = postgres.url(postgres.database("optuna"))
    return [*TINY, f"flow.dask_address={cluster.address}", f"tuning.storage={url}", *extra]


def _url_of(config: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in config if o.startswith("tuning.storage="))


def _train(cluster: Cluster, root: Path, log: Path, config: list[str]) -> subprocess.Popen:
    args = [str(Path(sys.executable).parent / "pricelevel"), "train", "--skip-ingest"]
    for override in config:
        args += ["--set", override]
    return subprocess.Popen(args, env={**cluster.env, "PRICELEVEL_HOME": str(root)}, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(what: Callable[[], Any], process: subprocess.Popen, log: Path, message: str,
                timeout_s: float = 300) -> Any:
    """Poll ``what`` until it returns something true; the flow must still be running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        assert process.poll() is None, f"{message}: the flow ended first\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, message
        time.sleep(POLL_S)
    return found


def _finish(process: subprocess.Popen, log: Path, timeout_s: float = 420) -> None:
    try:
        process.wait(timeout_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log.read_text()[-5000:]


def _trials(url: str) -> list[Any]:
    """Every trial of every study in the database (surplus ones left out)."""
    import optuna

    from pricelevel.ml.tuning import SURPLUS

    trials = []
    for name in optuna.get_all_study_names(storage=url):
        study = optuna.load_study(study_name=name, storage=url)
        trials += [t for t in study.get_trials(deepcopy=True) if not t.user_attrs.get(SURPLUS)]
    return trials


def _running_trials(url: str) -> int:
    with contextlib.suppress(Exception):
        return sum(t.state.name == "RUNNING" for t in _trials(url))
    return 0


def _running_task_runs(prefixes: tuple[str, ...]) -> list[str]:
    """Names of the task runs RUNNING now (as their workers reported them to Prefect) that start with ``prefixes``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))))
        return [run.name for run in runs if run.name.startswith(prefixes)]
    return []


def _task_run_states(flow_name: str) -> dict[str, list[str]]:
    """Each task run of the newest ``flow_name`` run: its name -> its state types, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        return {t.name: [s.type.name for s in sorted(client.read_task_run_states(t.id), key=lambda s: s.timestamp)]
                for t in tasks}


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _computed(text: str) -> list[str]:
    """The ``levels X`` / ``features X`` steps a log says were computed (not reused), one entry per computation."""
    return re.findall(r"Task run '[^']+' - ((?:levels|features) \w+): computed", text)


# ---------------------------------------------------------------------------------------------------- workers that die


@dataclass
class Disturbed:
    root: Path
    config: list[str]
    log: Path
    killed_in_fan_out: list[str]
    killed_in_trials: list[str]
    task_runs: dict[str, list[str]]
    #: The scheduler's (state, times involved in a worker's death) of the killed fan-out tasks, once done again.
    rerun: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def disturbed(cluster: Cluster, postgres: Postgres, ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> Disturbed:
    """One ``train`` run, two trial workers: a Dask worker SIGKILLed while it runs a levels/features task, then the
    workers running trial workers SIGKILLed while a trial is RUNNING; the run must complete."""
    folder = tmp_path_factory.mktemp("disturbed")
    root, log = _new_project(folder, ingested), folder / "train.log"
    config = _config(cluster, postgres, "tuning.n_trials=2")
    url = _url_of(config)
    started = time.monotonic()
    process = _train(cluster, root, log, config)
    try:
        _wait_until(lambda: _running_task_runs(("levels ", "features ")), process, log, "no fan-out task ran")
        worker, killed_in_fan_out = next(iter(_wait_until(lambda: cluster.processing(FAN_OUT), process, log,
                                                          "no fan-out task on a worker").items()))
        cluster.kill_worker(worker)
        # the scheduler marks what the dead worker was running "suspicious" and runs it again elsewhere
        rerun = {key: ("processing", 0) for key in killed_in_fan_out}
        while any(state != "memory" for state, _ in rerun.values()):
            states = cluster.task_states(killed_in_fan_out)
            if not states:  # done and let go of by the flow
                break
            rerun = {key: (state, max(suspicious, rerun[key][1])) for key, (state, suspicious) in states.items()}
            assert process.poll() is None, log.read_text()[-5000:]
            time.sleep(POLL_S)
        cluster.wait_workers()
        # a trial RUNNING: every Dask worker given a trial worker dies (the trial's is among them; which one runs
        # it is not known, and a trial worker that has not begun its first trial waits on its imports)
        on_workers = _wait_until(lambda: _running_trials(url) and cluster.processing(TRIALS), process, log, "no trial ran")
        keys = [key for worker in on_workers for key in on_workers[worker]]
        for worker in on_workers:
            cluster.kill_worker(worker)
        cluster.wait_workers()
        _finish(process, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    print(f"disturbed train run: {time.monotonic() - started:.1f} s")  # shown with `pytest -s`
    return Disturbed(root, config, log, killed_in_fan_out, keys, _task_run_states("train"), rerun)


def test_a_dask_worker_killed_during_the_fan_out_has_its_task_run_again_with_the_same_outputs(
    disturbed: Disturbed, tmp_path: Path, ingested: Path
) -> None:
    from pricelevel.config import load_project_config
    from pricelevel.features.tables import features_step
    from pricelevel.levels.history import levels_step

    assert disturbed.killed_in_fan_out, "the kill did not land on a fan-out task"
    # running on the killed worker when it died (suspicious), then computed again: in memory on a live worker
    assert all(suspicious >= 1 for _, suspicious in disturbed.rerun.values()), disturbed.rerun
    fan_out = {name: states for name, states in disturbed.task_runs.items() if name.startswith(("levels ", "features "))}
    assert len(fan_out) == 4 and all(states[-1] == "COMPLETED" for states in fan_out.values()), fan_out

    # the same steps computed undisturbed, in this process, from a copy of the same candles
    reference = _new_project(tmp_path, ingested)
    config = load_project_config(None, disturbed.config, env={"PRICELEVEL_HOME": str(reference)})
    data = config.catalogue
    expected: dict[str, dict[str, str]] = {}
    for symbol in config.training_symbols:
        levels = levels_step(data.validated(), data.derived, symbol, config.dataset.timeframe, config.levels)
        table = features_step(data.validated(), data.derived, levels, config.table_spec)
        for step in (levels, table):
            expected[str(Path(step.folder).relative_to(reference))] = _files(Path(step.folder))
    got = {relative: _files(disturbed.root / relative) for relative in expected}
    assert got == expected and all(expected.values()), (sorted(got), sorted(expected))


def test_a_trial_worker_killed_mid_trial_has_its_trial_retried_and_the_study_ends_at_n_trials(
    disturbed: Disturbed,
) -> None:
    from optuna.storages import RetryFailedTrialCallback

    assert disturbed.killed_in_trials, "the kill did not land on a trial worker"
    trials = _trials(_url_of(disturbed.config))
    states = sorted(t.state.name for t in trials)
    assert states.count("COMPLETE") == 2 and "RUNNING" not in states, states  # exactly n_trials
    failed = {t.number: t.params for t in trials if t.state.name == "FAIL"}
    retried = {RetryFailedTrialCallback.retried_trial_number(t): t for t in trials if t.state.name == "COMPLETE"}
    assert failed and set(failed) <= set(retried), (failed, retried)  # the killed trial, failed then retried
    # retried with the failed trial's parameters (a trial killed while suggesting has only some of them yet)
    assert all(retried[number].params.items() >= params.items() for number, params in failed.items()), (failed, retried)
    trial_runs = {name: states for name, states in disturbed.task_runs.items() if name.startswith("tune-trials")}
    assert len(trial_runs) == 2 and all(s[-1] == "COMPLETED" for s in trial_runs.values()), trial_runs
    assert any(s.count("RUNNING") >= 2 for s in trial_runs.values()), trial_runs  # run again after the kill
    assert _last_flow_run_state("train") == "COMPLETED"


# ------------------------------------------------------------------------------------------------ flows that stop


@dataclass
class Stopped:
    root: Path
    config: list[str]
    log: Path
    computed: list[str]


@pytest.fixture(scope="module")
def stopped_in_fan_out(cluster: Cluster, postgres: Postgres, ingested: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stopped]:
    folder = tmp_path_factory.mktemp("stopped")
    root, log = _new_project(folder, ingested), folder / "train.log"
    config = _config(cluster, postgres, "tuning.n_trials=40", *SLOW_LEVELS)
    yield Stopped(root, config, log, [])


def test_sigterm_during_the_fan_out_stops_the_run_within_10_s_and_leaves_no_task_running(
    cluster: Cluster, stopped_in_fan_out: Stopped
) -> None:
    run = stopped_in_fan_out
    offset = cluster.log.stat().st_size
    process = _train(cluster, run.root, run.log, run.config)
    try:
        _wait_until(lambda: _running_task_runs(("levels ", "features ")) and cluster.processing(FAN_OUT), process,
                    run.log, "no fan-out task ran")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
        exited = time.monotonic()
        left = _group_alive(process.pid)
        at_exit = cluster.executing()
        while any((running := cluster.executing()).values()) and time.monotonic() < exited + STOPPED_WITHIN_S:
            time.sleep(0.2)
        idle_s = time.monotonic() - exited
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    exit_s = exited - signalled
    print(f"pricelevel train exited {exit_s:.1f} s after SIGTERM during the fan-out (on the workers then: {at_exit}); "
          f"no task on the workers {idle_s:.1f} s later")
    time.sleep(2)
    run.computed += _computed(cluster.log.read_bytes()[offset:].decode(errors="replace"))
    assert process.returncode == 128 + signal.SIGTERM and exit_s < 10, (process.returncode, exit_s,
                                                                        run.log.read_text()[-5000:])
    assert not left, left
    assert not any(running.values()), running  # what the run had submitted was stopped, not left computing
    assert _last_flow_run_state("train") == "CANCELLED"
    assert not any(cluster.executing().values())  # and nothing started afterwards


def test_a_rerun_after_the_stop_reuses_the_finished_steps_and_a_sigkilled_flow_leaves_no_trial_running(
    cluster: Cluster, stopped_in_fan_out: Stopped
) -> None:
    """The rerun computes only the steps the stopped run had not finished; SIGKILLed mid-tuning (no stop file is
    written), its trial workers stop once its lease is older than ``tuning.grace_s`` (5 s here)."""
    run = stopped_in_fan_out
    offset = cluster.log.stat().st_size
    url = _url_of(run.config)
    process = _train(cluster, run.root, run.log, run.config)
    try:
        _wait_until(lambda: _running_trials(url) and cluster.processing(TRIALS), process, run.log, "no trial started")
        killed = time.monotonic()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        deadline = killed + 5 + 20  # grace_s, then an epoch or the 2 s interrupt, on a loaded machine
        while _running_trials(url) or any(cluster.executing(timeout_s=2).values()):
            assert time.monotonic() < deadline, (cluster.executing(), _running_trials(url))
            time.sleep(0.2)
        stopped_s = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    print(f"trial workers of the SIGKILLed flow stopped {stopped_s:.1f} s after the kill")
    time.sleep(2)
    assert not _running_trials(url) and not any(cluster.executing().values())  # none started afterwards
    computed = run.computed + _computed(cluster.log.read_bytes()[offset:].decode(errors="replace"))
    assert sorted(computed) == sorted(set(computed)), computed  # no step computed twice
    assert {"levels BTCUSDT", "levels ETHUSDT", "features BTCUSDT", "features ETHUSDT"} <= set(computed), computed


def test_a_flow_that_fails_during_the_fan_out_leaves_no_task_running_on_the_workers(
    cluster: Cluster, postgres: Postgres, ingested: Path, tmp_path: Path
) -> None:
    """BTCUSDT's candles are unreadable: its levels task fails at once while ETHUSDT's runs, and the flow fails on
    it. Nothing it submitted runs on after it has ended (the ETHUSDT task, let go of by the flow's client, is
    interrupted if it still runs)."""
    root, log = _new_project(tmp_path, ingested), tmp_path / "train.log"
    for path in (root / "data" / "validated").rglob("BTCUSDT_4h.parquet"):
        path.write_bytes(b"not a parquet file")
    process = _train(cluster, root, log, _config(cluster, postgres, "tuning.n_trials=2", *SLOW_LEVELS))
    try:
        process.wait(400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    ended = time.monotonic()
    assert process.returncode == 1, log.read_text()[-3000:]
    while any((running := cluster.executing()).values()) and time.monotonic() < ended + STOPPED_WITHIN_S:
        time.sleep(0.2)
    print(f"no task on the workers {time.monotonic() - ended:.1f} s after the failed flow ended")
    assert not any(running.values()), running
    states = _task_run_states("train")
    assert states["levels BTCUSDT"][-1] == "FAILED", states
    # ETHUSDT's task was running, and was stopped, or had just finished (a warm numba cache computes it in ~1 s)
    assert states["levels ETHUSDT"][-1] in ("FAILED", "COMPLETED"), states


def test_a_running_task_its_client_lets_go_of_is_interrupted_on_the_worker(cluster: Cluster) -> None:
    """The mechanism behind the three tests above, alone: Dask's cancel only forgets a running task; the workers'
    preload (``tasks.runtime``) interrupts it. A 60 s loop is cancelled after it started, and is gone in seconds."""

    def spin(seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(range(100))
        return "finished"

    future = cluster.client.submit(spin, 60, pure=False)
    deadline = time.monotonic() + 60
    while not any(cluster.executing().values()):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(POLL_S)
    future.cancel()
    cancelled = time.monotonic()
    while any((running := cluster.executing()).values()) and time.monotonic() < cancelled + STOPPED_WITHIN_S:
        time.sleep(0.1)
    print(f"a cancelled running task stopped {time.monotonic() - cancelled:.1f} s after the cancel")
    assert not any(running.values()), running


# -------------------------------------------------------------------------------------------------------- the lease


def test_a_lease_expires_only_after_its_content_stopped_changing_for_the_timeout(tmp_path: Path) -> None:
    from tasks.tuning import Lease, StopFile, WorkerStop, renewing

    now = [100.0]
    flow_side = Lease(tmp_path / "x.lease", timeout_s=5)
    worker = Lease(tmp_path / "x.lease", timeout_s=5, clock=lambda: now[0])
    assert not worker.expired()  # a missing file counts from the first look
    now[0] += 5.5
    assert worker.expired()
    flow_side.renew()
    assert not worker.expired()  # renewed: counts again from now
    now[0] += 4
    assert not worker.expired()
    flow_side.renew()
    assert not worker.expired()  # seen changing at 109.5
    now[0] += 5
    assert not worker.expired()
    now[0] += 0.5
    assert worker.expired()  # 5.5 s without a change seen
    stop = WorkerStop(StopFile(tmp_path / "x"), worker)
    assert stop.requested()
    flow_side.renew()
    assert not stop.requested()
    stop.file.request()
    assert stop.requested()

    with renewing(Lease(tmp_path / "y.lease", 5), every_s=0.05) as lease:
        first = lease.path.read_text()
        time.sleep(0.3)
        assert lease.path.read_text() != first
    assert not lease.path.exists()


def test_a_trial_worker_whose_flow_stopped_renewing_its_lease_is_interrupted(tmp_path: Path) -> None:
    """The worker side in one process: a trial that never reaches an epoch end runs while the flow renews the
    lease, and is interrupted ``grace`` + :data:`INTERRUPT_AFTER_S` after the renewals stop (the flow died)."""
    from tasks.tuning import (
        INTERRUPT_AFTER_S,
        Lease,
        StopFile,
        TrialsStopped,
        WorkerStop,
        interrupt_when_stopped,
    )

    path, grace_s = tmp_path / "stop" / "x.lease", 1.0
    flow_alive = threading.Event()
    flow_alive.set()

    def flow() -> None:
        lease = Lease(path, grace_s)
        while flow_alive.is_set():
            lease.renew()
            time.sleep(0.1)

    renewer = threading.Thread(target=flow, daemon=True)
    renewer.start()
    stop = WorkerStop(StopFile(tmp_path / "stop" / "x"), Lease(path, grace_s))
    outcome: dict[str, float] = {}

    def trial() -> None:
        started = time.monotonic()
        try:
            with interrupt_when_stopped(stop, poll_s=0.05):
                while True:
                    sum(range(1000))
                    if time.monotonic() - started > 2 and "died" not in outcome:
                        outcome["died"] = time.monotonic()
                        flow_alive.clear()  # the flow is SIGKILLed: nobody renews, nobody writes the stop file
        except TrialsStopped:
            outcome["stopped_after"] = time.monotonic() - outcome["died"]

    worker = threading.Thread(target=trial)
    worker.start()
    worker.join(grace_s + INTERRUPT_AFTER_S + 15)
    assert not worker.is_alive() and "stopped_after" in outcome, outcome  # it ran 2 s while the lease was renewed
    assert grace_s + INTERRUPT_AFTER_S - 0.1 <= outcome["stopped_after"] < grace_s + INTERRUPT_AFTER_S + 5, outcome
