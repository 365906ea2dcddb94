"""Training runs a dead process left RUNNING are ended by the next training run (lib/registry/orphans.py); a run
whose owner may be alive is left alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pricelevel.core.processes import process_start
from pricelevel.registry.experiment import RUN_KEY_TAG
from pricelevel.registry.orphans import (
    ENDED_BY_TAG,
    FLOW_RUN_TAG,
    OWNER_TAG,
    PARENT_TAG,
    Owner,
    end_orphaned_runs,
    owner_tags,
)


@pytest.fixture
def client(tmp_path: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client, client.create_experiment("pricelevel", artifact_location=str(tmp_path / "artifacts"))


def _dead_owner() -> Owner:
    """A process of this host that ran and exited (its pid is free or reused by now)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    started = process_start(child.pid)
    child.wait()
    return Owner(socket.gethostname(), child.pid, started, Owner.current().namespace)


def _training_run(client: MlflowClient, experiment: str, key: str, tags: dict[str, str]) -> str:
    return client.create_run(experiment, tags={RUN_KEY_TAG: key, **tags}).info.run_id


def _trial(client: MlflowClient, experiment: str, parent: str) -> str:
    return client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id


def _status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


def test_a_dead_processs_runs_and_their_trials_are_ended_and_live_or_finished_ones_are_left(client) -> None:
    client, experiment = client
    dead = _training_run(client, experiment, "k1", {OWNER_TAG: _dead_owner().tag()})
    dead_trial, done_trial = _trial(client, experiment, dead), _trial(client, experiment, dead)
    client.set_terminated(done_trial, "FINISHED")
    alive = _training_run(client, experiment, "k2", owner_tags())  # this process: running
    alive_trial = _trial(client, experiment, alive)
    finished = _training_run(client, experiment, "k3", {OWNER_TAG: _dead_owner().tag()})
    client.set_terminated(finished, "FINISHED")
    untagged = _training_run(client, experiment, "k4", {})  # made before owners were tagged: nothing to go on

    ended = end_orphaned_runs(client, experiment, RUN_KEY_TAG, "ended by test")

    assert list(ended) == [dead] and "is gone" in ended[dead]
    assert _status(client, dead) == "FAILED" and _status(client, dead_trial) == "FAILED"
    assert client.get_run(dead).data.tags[ENDED_BY_TAG].startswith("ended by test: its process")
    assert _status(client, done_trial) == "FINISHED"
    assert {_status(client, r) for r in (alive, alive_trial, untagged)} == {"RUNNING"}
    assert _status(client, finished) == "FINISHED"
    assert end_orphaned_runs(client, experiment, RUN_KEY_TAG, "again") == {}  # nothing left to end


def test_a_reused_pid_is_not_taken_for_the_owner() -> None:
    me = Owner.current()
    assert me.gone() is False
    assert Owner(me.host, me.pid, "1", me.namespace).gone() is True  # same pid, another start time: another process
    dead = _dead_owner()
    assert dead.gone() is True
    # a container with the same host name (host networking) but its own PIDs: nothing here can tell
    assert Owner(dead.host, dead.pid, dead.started, "4026599999").gone() is None
    assert Owner.parse(me.tag()) == me and Owner.parse("garbage") is None


def test_another_hosts_run_is_ended_only_when_the_orchestrator_says_its_flow_run_ended(client) -> None:
    client, experiment = client
    elsewhere = {OWNER_TAG: Owner("gpu-box-7", os.getpid(), "123").tag(), FLOW_RUN_TAG: "0199-flow-run"}
    run = _training_run(client, experiment, "k1", elsewhere)
    asked: list[str] = []

    def still_running(flow_run: str) -> str | None:
        asked.append(flow_run)
        return None

    assert end_orphaned_runs(client, experiment, RUN_KEY_TAG, "t", still_running) == {}
    assert asked == ["0199-flow-run"] and _status(client, run) == "RUNNING"
    ended = end_orphaned_runs(client, experiment, RUN_KEY_TAG, "t", lambda flow_run: "CRASHED")
    assert ended == {run: "its flow run 0199-flow-run ended CRASHED"} and _status(client, run) == "FAILED"


@pytest.mark.flow
def test_the_prefect_lookup_tells_a_crashed_flow_run_from_a_running_or_unknown_one(prefect_harness) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from tasks.runtime import flow_run_ended

    with get_client(sync_client=True) as prefect:
        runs = [prefect.create_flow_run(flow=_named_flow("train"), state=Running()) for _ in range(2)]
        prefect.set_flow_run_state(runs[1].id, Crashed(message="no heartbeat"), force=True)
    assert flow_run_ended(str(runs[0].id)) is None
    assert flow_run_ended(str(runs[1].id)) == "CRASHED"
    assert flow_run_ended("00000000-0000-0000-0000-000000000000") is None  # unknown: cannot tell


def _named_flow(name: str):  # noqa: ANN202 (a prefect Flow)
    from prefect import flow

    @flow(name=name)
    def named() -> None:
        return None

    return named
