"""Training runs left RUNNING by a process that died (kill -9, an out-of-memory kill, a worker or host lost).

MLflow never hears from such a run again, so its UI would show it running for ever, beside the run that redid
the work. Each training run is tagged with its owner (host, PID namespace, pid and the process's start time, so
a reused pid is not mistaken for it) and, under an orchestrator, its flow run. The next training run ends every RUNNING
training run whose owner is gone, on this host, or whose flow run the orchestrator has ended (Crashed,
Cancelled, ...), on any host, as FAILED, with the reason in ``pricelevel.ended_by``; their RUNNING trial runs
too. A run whose owner may be alive (another host, no orchestrator to ask) is left alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from pricelevel.core.processes import pid_namespace, process_alive, process_start

#: host@pid:start:pid-namespace of the process that created a training run.
OWNER_TAG = "pricelevel.owner"
#: The orchestrator's run (Prefect's flow run id) a training run belongs to.
FLOW_RUN_TAG = "pricelevel.flow_run_id"
#: Why a run was ended by another one.
ENDED_BY_TAG = "pricelevel.ended_by"
PARENT_TAG = "mlflow.parentRunId"

#: The final state of an orchestrator's run by its id (``CRASHED``, ``CANCELLED``, ...), or None while it runs
#: or when it cannot be told (unknown id, orchestrator unreachable).
FlowRunEnded = Callable[[str], str | None]


@dataclass(frozen=True)
class Owner:
    """The process that created a run."""

    host: str
    pid: int
    started: str = ""
    namespace: str = ""

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), pid_namespace())

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        host, _, rest = text.rpartition("@")
        pid, _, rest = rest.partition(":")
        started, _, namespace = rest.partition(":")
        return cls(host, int(pid), started, namespace) if host and pid.isdigit() else None

    def tag(self) -> str:
        return f"{self.host}@{self.pid}:{self.started}:{self.namespace}"

    def gone(self, host: str | None = None) -> bool | None:
        """True when it no longer runs; None on another host or in another PID namespace (nothing here can tell)."""
        if self.host != (socket.gethostname() if host is None else host) or self.namespace != pid_namespace():
            return None
        if not process_alive(self.pid):
            return True
        started = process_start(self.pid)
        return bool(self.started and started and started != self.started)  # the pid now names another process


def owner_tags(flow_run_id: str | None = None) -> dict[str, str]:
    """The tags a new training run carries so that a later one can tell whether it was orphaned."""
    return {OWNER_TAG: Owner.current().tag()} | ({FLOW_RUN_TAG: flow_run_id} if flow_run_id else {})


def orphan_reason(tags: dict[str, str], flow_run_ended: FlowRunEnded) -> str | None:
    """Why a RUNNING run with these tags can never finish, or None when it may still be running."""
    owner = Owner.parse(tags.get(OWNER_TAG, ""))
    if owner is not None and owner.gone():
        return f"its process {owner.pid} on {owner.host} is gone (killed or crashed)"
    flow_run = tags.get(FLOW_RUN_TAG)
    ended = flow_run_ended(flow_run) if flow_run else None
    if ended:
        return f"its flow run {flow_run} ended {ended}"
    return None


def end_orphaned_runs(client: MlflowClient, experiment_id: str, key_tag: str, ended_by: str,
                      flow_run_ended: FlowRunEnded = lambda flow_run: None) -> dict[str, str]:
    """End as FAILED every RUNNING training run (it has ``key_tag``) that can never finish, and its RUNNING trial
    runs. Returns {run id: reason}. ``ended_by`` names who ended them (the new run)."""
    ended: dict[str, str] = {}
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        tags = run.data.tags
        if key_tag not in tags or PARENT_TAG in tags:
            continue
        reason = orphan_reason(tags, flow_run_ended)
        if reason is None:
            continue
        trials = client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{PARENT_TAG}` = '{run.info.run_id}'"))
        for trial in trials:
            client.set_tag(trial.info.run_id, ENDED_BY_TAG, f"{ended_by}: its training run {reason}")
            client.set_terminated(trial.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, ENDED_BY_TAG, f"{ended_by}: {reason}")
        client.set_terminated(run.info.run_id, "FAILED")
        ended[run.info.run_id] = reason
    return ended
