"""Prefect tasks of the tuning step: the Optuna study, and its trial workers when ``tuning.workers`` > 1 (each
one library call and a log line).

Trial workers never outlive the flow that started them. ``tune`` waits for them inside its runner, and when it
stops for any reason (a failed worker, SIGTERM/SIGINT, a cancelled run) it writes a stop file that every
worker watches: a worker ends its trial at the next epoch (its thread is interrupted if it has not stopped
within :data:`INTERRUPT_AFTER_S`), and ``tune`` waits :data:`STOP_GRACE_S` for them before it cancels the
rest. A Dask ``cancel`` alone would leave a running trial computing, and finishing the study, in the background.

A flow that dies without a word (SIGKILL, the machine lost) writes no stop file, so ``tune`` also holds a
:class:`Lease`: it rewrites a file every ``tuning.heartbeat_s``, and a worker that sees no change for
``tuning.grace_s`` stops as if the stop file were there (Optuna's heartbeat, the other way round: there the
study learns that a worker died, here a worker learns that its flow died).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.core.files import atomic_write
from pricelevel.ml.dataset import DatasetPlan
from pricelevel.ml.tuning import StudySummary, trial_worker_step, tune_step
from pricelevel.registry.experiment import StartedRun
from tasks.runtime import cancel_all, fan_out, raise_in_thread, training_resources, wait_all

#: How long ``tune`` waits for its trial workers to stop before it cancels them and goes on failing.
STOP_GRACE_S = 6.0
#: A trial worker still running this long after the stop (a long epoch) has its thread interrupted.
INTERRUPT_AFTER_S = 2.0
#: Interrupts sent at most (a second apart), so that one landing outside the trial cannot repeat for ever.
INTERRUPT_TRIES = 3


class TrialsStopped(RuntimeError):
    """The flow that started this trial worker has stopped: the trial is abandoned (failed, not counted)."""


@dataclass(frozen=True)
class StopFile:
    """The stop request of one ``tune`` call to its trial workers: a file in the tuning folder, which every
    worker sees (workers share ``data.root``, docs/how-to/scale-out.md "Scaling out")."""

    path: Path

    @classmethod
    def new(cls, work_dir: Path) -> StopFile:
        return cls(work_dir / "stop" / uuid.uuid4().hex)

    def request(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def requested(self) -> bool:
        return self.path.exists()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def lease_path(self) -> Path:
        """Where the flow's :class:`Lease` for the same workers lives."""
        return self.path.with_name(self.path.name + ".lease")


class Lease:
    """The flow's sign of life to its trial workers: a file whose content the flow changes every few seconds
    (:meth:`renew`, see :func:`renewing`). A watcher counts the time since it last saw the content change on its
    own ``clock``, never the file's mtime, so clocks on other hosts do not matter; a missing file counts from the
    first look. Thread-safe (the epoch check and the interrupt watcher both ask)."""

    def __init__(self, path: Path, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.timeout_s, self.clock = path, timeout_s, clock
        self.lock = threading.Lock()
        self.seen: str | None = None
        self.changed_at: float | None = None
        self.count = 0

    def renew(self) -> None:
        """Write a new content atomically (a reader never sees a half-written file)."""
        self.count += 1
        content = f"{os.getpid()} {self.count} {uuid.uuid4().hex}"
        atomic_write(self.path, lambda temporary: temporary.write_text(content))

    def expired(self) -> bool:
        try:
            content: str | None = self.path.read_text()
        except OSError:
            content = None
        with self.lock:
            now = self.clock()
            if self.changed_at is None or (content is not None and content != self.seen):
                self.seen, self.changed_at = content, now
            return now - self.changed_at > self.timeout_s

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def renewing(lease: Lease, every_s: float) -> Iterator[Lease]:
    """Renew ``lease`` every ``every_s`` in a daemon thread while the block runs; the file is removed after."""
    lease.renew()
    done = threading.Event()

    def renew() -> None:
        while not done.wait(every_s):
            with contextlib.suppress(OSError):  # a full or flaky disk: the workers stop, which is the safe side
                lease.renew()

    thread = threading.Thread(target=renew, name="trial-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        done.set()
        thread.join()
        lease.clear()


@dataclass(frozen=True)
class WorkerStop:
    """What stops a trial worker: its flow's stop file, or its flow's lease gone stale (the flow died)."""

    file: StopFile
    lease: Lease | None = None

    def requested(self) -> bool:
        return self.file.requested() or (self.lease is not None and self.lease.expired())


class StoppingObserver:
    """A trial observer that ends the trial (:class:`TrialsStopped`) at its start or next epoch once a stop is
    requested; forwards to ``inner`` (the MLflow trial runs) otherwise."""

    def __init__(self, inner: Any | None, stop: StopFile | WorkerStop) -> None:
        self.inner, self.stop, self.started = inner, stop, set()

    def _check(self, number: int) -> None:
        if self.stop.requested():
            raise TrialsStopped(f"trial {number}: the flow that started this trial worker has stopped")

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self._check(number)
        if self.inner is not None:
            self.inner.trial_started(number, params)
            self.started.add(number)

    def epoch_ended(self, number: int, epoch: int, metrics: dict[str, float]) -> None:
        if number in self.started:
            self.inner.epoch_ended(number, epoch, metrics)
        self._check(number)

    def trial_ended(self, number: int, state: str, value: float | None) -> None:
        if number in self.started:
            self.started.discard(number)
            self.inner.trial_ended(number, state, value)


class StoppingRun:
    """What a trial worker logs to: ``run``'s trial runs (``None``: nothing), stopped by ``stop``."""

    def __init__(self, run: Any | None, stop: StopFile | WorkerStop) -> None:
        self.run, self.stop = run, stop

    def trials(self, study_name: str) -> StoppingObserver:
        return StoppingObserver(self.run.trials(study_name) if self.run is not None else None, self.stop)


class RecordingRun:
    """The training run as the trials in this process log to it (``tuning.workers: 1``), remembering which trials
    began: a stop (SIGTERM, Ctrl-C) is a BaseException, which Optuna does not catch, so it would leave its trial
    RUNNING in the study for ever; :meth:`fail_unfinished` marks it failed instead."""

    def __init__(self, run: Any) -> None:
        self.run, self.began, self.study_name = run, [], None
        #: When the study was opened here: a stop that lands between a trial's creation (RUNNING in the study) and
        #: its ``trial_started`` leaves a trial that ``began`` misses; its start time gives it away.
        self.opened_at: datetime.datetime | None = None

    def __getattr__(self, name: str) -> Any:  # everything else is the run's (log_json, log_params, ...)
        return getattr(self.run, name)

    def trials(self, study_name: str) -> Any:
        self.study_name = study_name
        self.opened_at = datetime.datetime.now()  # Optuna dates trials with the naive local clock too
        inner, began = self.run.trials(study_name), self.began

        class Observer:
            def trial_started(self, number: int, params: dict[str, Any]) -> None:
                began.append(number)
                inner.trial_started(number, params)

            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

        return Observer()

    def fail_unfinished(self, storage: str, tuning: Any) -> list[int]:
        """Mark this process's trials still RUNNING as FAIL (they are not counted, and not resumed as running)."""
        if self.study_name is None:
            return []
        import optuna
        from optuna.trial import TrialState

        from pricelevel.ml.tuning import study_storage

        study = optuna.load_study(study_name=self.study_name, storage=study_storage(storage, tuning))
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number in self.began or (t.datetime_start is not None and self.opened_at is not None
                                                 and t.datetime_start >= self.opened_at)]
        for number in running:
            study.tell(number, state=TrialState.FAIL)
        return running


@task(name="tune", cache_policy=NO_CACHE)
def tune(config: Config, plan: DatasetPlan, started: StartedRun) -> StudySummary:
    """Optuna study over the search space; resumes a study of the same inputs, a no-op once it is complete.
    With ``tuning.workers`` > 1 the trials run in that many ``tune-trials`` tasks on the flow's runner."""
    places = config.catalogue.tuning_places(config.tuning.storage)

    def run_workers() -> None:
        stop = StopFile.new(Path(places[1]))
        lease = Lease(stop.lease_path, config.tuning.grace_s)
        with renewing(lease, config.tuning.heartbeat_s), fan_out(config.flow) as runner, \
                training_resources(config.flow, config.model):
            workers = [runner.submit(tune_trials, {"config": config, "plan": plan, "started": started, "worker": k,
                                                   "stop_file": str(stop.path), "lease_file": str(lease.path)})
                       for k in range(config.tuning.workers)]
            try:
                finished = wait_all(workers)
            except BaseException:  # a worker failed, SIGTERM/SIGINT, cancellation: no trial may outlive the flow
                stop.request()
                if not cancel_all(workers, STOP_GRACE_S):
                    get_run_logger().warning("trial workers did not stop within %g s; cancelled", STOP_GRACE_S)
                raise  # the stop file stays: a worker that has not started yet stops at its first trial
        stop.clear()
        get_run_logger().info("trial workers finished %s trials", finished)

    in_process = config.tuning.workers == 1 and started.log is not None
    run = RecordingRun(started.log) if in_process else started.log
    try:
        study = tune_step(plan, config.model_inputs, config.tuning, config.strategy, *places, run,
                          run_workers if config.tuning.workers > 1 else None)
    except BaseException:
        if isinstance(run, RecordingRun):
            with contextlib.suppress(Exception):
                run.fail_unfinished(places[0], config.tuning)
        raise
    get_run_logger().info("%s", study.describe())
    return study


@task(name="tune-trials", task_run_name="tune-trials {worker}", cache_policy=NO_CACHE)
def tune_trials(config: Config, plan: DatasetPlan, started: StartedRun, worker: int, stop_file: str | None = None,
                lease_file: str | None = None) -> int:
    """One trial worker of the shared study (``tuning.workers`` of them): trials until ``n_trials`` in total, or
    until the flow's ``stop_file`` appears or its ``lease_file`` stops changing for ``tuning.grace_s``."""
    places = config.catalogue.tuning_places(config.tuning.storage)
    run: Any = started.log
    if stop_file is not None:
        lease = Lease(Path(lease_file), config.tuning.grace_s) if lease_file is not None else None
        stop = WorkerStop(StopFile(Path(stop_file)), lease)
        run = StoppingRun(started.log, stop)
        with interrupt_when_stopped(stop):
            done = trial_worker_step(plan, config.model_inputs, config.tuning, config.strategy, *places, run, worker)
    else:
        done = trial_worker_step(plan, config.model_inputs, config.tuning, config.strategy, *places, run, worker)
    get_run_logger().info("trial worker %d finished %d trials", worker, done)
    return done


class interrupt_when_stopped:  # noqa: N801 - used as a context manager
    """Raise :class:`TrialsStopped` in this thread if it is still inside the block :data:`INTERRUPT_AFTER_S`
    after ``stop`` was requested (an epoch longer than that); the epoch check normally ends it sooner."""

    def __init__(self, stop: StopFile | WorkerStop, poll_s: float = 0.5) -> None:
        self.stop, self.poll_s = stop, poll_s
        self.thread_id = threading.get_ident()
        self.left = threading.Event()
        self.lock = threading.Lock()  # no interrupt once the block is left
        self.watcher = threading.Thread(target=self._watch, name="trial-stop-watcher", daemon=True)

    def _watch(self) -> None:
        while not self.stop.requested():
            if self.left.wait(self.poll_s):
                return
        if self.left.wait(INTERRUPT_AFTER_S):
            return
        for _ in range(INTERRUPT_TRIES):  # again each second, in case a handler swallowed it
            with self.lock:
                if self.left.is_set():
                    return
                raise_in_thread(self.thread_id, TrialsStopped)
            if self.left.wait(1.0):
                return

    def __enter__(self) -> interrupt_when_stopped:
        self.watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.left.set()
        with self.lock:  # an interrupt in flight lands here, inside the block's caller
            pass
        self.watcher.join()
