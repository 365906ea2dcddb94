"""The pieces that keep trial workers from outliving their flow (tasks/tuning.py, tasks/runtime.py), in seconds:
the first failure is raised at once, a stop request ends a trial at its next epoch or interrupts a long one,
and nothing is interrupted once the worker has left its trials. The whole path runs in test_cluster_faults.py."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow


def _futures(*jobs):
    from prefect.futures import PrefectConcurrentFuture

    pool = concurrent.futures.ThreadPoolExecutor(len(jobs))
    return pool, [PrefectConcurrentFuture(uuid.uuid4(), pool.submit(job)) for job in jobs]


def test_wait_all_raises_the_first_failure_without_waiting_for_the_futures_before_it() -> None:
    from tasks.runtime import cancel_all, wait_all

    release = threading.Event()

    def slow() -> int:
        release.wait(30)
        return 1

    def failing() -> int:
        raise ValueError("trial worker 1 failed")

    pool, futures = _futures(slow, failing)
    started = time.monotonic()
    with pytest.raises(ValueError, match="worker 1 failed"):
        wait_all(futures, poll_s=0.05)
    assert time.monotonic() - started < 5  # the old `[w.result() for w in workers]` waited for `slow`
    assert not cancel_all(futures, grace_s=0.2)  # `slow` ignores stop requests: reported, not hidden
    release.set()
    pool.shutdown()
    assert wait_all(_futures(lambda: 1, lambda: 2)[1]) == [1, 2]


def test_a_stop_request_ends_a_trial_at_its_next_epoch_and_interrupts_a_long_one(tmp_path: Path) -> None:
    from tasks.tuning import INTERRUPT_AFTER_S, StopFile, StoppingRun, TrialsStopped, interrupt_when_stopped

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def trials(self, study_name: str):
            return self

        def trial_started(self, number, params):
            self.calls.append(("started", number))

        def epoch_ended(self, number, epoch, metrics):
            self.calls.append(("epoch", number, epoch))

        def trial_ended(self, number, state, value):
            self.calls.append(("ended", number, state))

    stop, inner = StopFile.new(tmp_path), Recorder()
    observer = StoppingRun(inner, stop).trials("study")
    observer.trial_started(0, {})
    observer.epoch_ended(0, 0, {})
    stop.request()
    with pytest.raises(TrialsStopped):
        observer.epoch_ended(0, 1, {})  # logged, then the trial ends
    observer.trial_ended(0, "fail", None)
    with pytest.raises(TrialsStopped):
        observer.trial_started(1, {})  # a new trial does not start
    observer.trial_ended(1, "fail", None)  # never started in MLflow: nothing to end there
    assert inner.calls == [("started", 0), ("epoch", 0, 0), ("epoch", 0, 1), ("ended", 0, "fail")]
    assert StoppingRun(None, stop).trials("study").trial_ended(2, "fail", None) is None

    # an epoch that never ends: the watcher interrupts the thread
    long_stop = StopFile.new(tmp_path)
    outcome: dict[str, float | str] = {}

    def long_epoch() -> None:
        try:
            with interrupt_when_stopped(long_stop, poll_s=0.05):
                while True:
                    sum(range(1000))
        except TrialsStopped:
            outcome["stopped_after"] = time.monotonic() - outcome["requested"]

    worker = threading.Thread(target=long_epoch)
    worker.start()
    time.sleep(0.3)
    outcome["requested"] = time.monotonic()
    long_stop.request()
    worker.join(INTERRUPT_AFTER_S + 10)
    assert not worker.is_alive() and "stopped_after" in outcome, outcome
    assert INTERRUPT_AFTER_S - 0.1 <= outcome["stopped_after"] < INTERRUPT_AFTER_S + 3

    # a worker that has left its trials is never interrupted afterwards, even if the stop comes later
    late = StopFile.new(tmp_path)
    with interrupt_when_stopped(late, poll_s=0.05):
        pass
    late.request()
    time.sleep(INTERRUPT_AFTER_S + 0.5)  # a stray TrialsStopped would be raised in this thread by now


def test_a_signal_raises_stopped_once_and_the_temporary_server_waits_for_a_flow() -> None:
    import signal as signals

    from flows.cli import StopHandler, Stopped, TemporaryServer
    from flows.commands.common import Session

    server = TemporaryServer()
    session = server.session_type()(None, ("a.b=1",), False)
    assert isinstance(session, Session) and server.group is None  # nothing started before a flow runs
    server.close()  # nothing to stop

    stop = StopHandler()
    with stop.installed():
        with pytest.raises(Stopped, match="SIGTERM"):
            signals.raise_signal(signals.SIGTERM)
        signals.raise_signal(signals.SIGINT)  # a second signal while stopping: ignored, the stop goes on
    assert stop.signum == signals.SIGTERM
    assert signals.getsignal(signals.SIGTERM) is not stop  # the previous handlers are back
