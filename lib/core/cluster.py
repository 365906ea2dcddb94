"""``make cluster-up``: the scaled-out pricelevel on one machine, without Docker, in ``<project>/.cluster``.

A PostgreSQL cluster (databases ``prefect``, ``mlflow``, ``optuna``), the Prefect server and the MLflow server
on it, a Dask scheduler with ``dask_workers`` workers (one process, one thread each) and a Prefect worker on
the ``pricelevel-process`` pool, whose ``training`` queue runs one flow at a time. When every service answers,
``.cluster/env`` is written: ``source`` it and the same commands and deployments run on the cluster, chosen
by configuration only (``PRICELEVEL_FLOW__TASK_RUNNER=dask`` ...).

One supervisor process owns it all (:func:`run_cluster`); ``cluster-down`` sends it SIGTERM and it stops every
process group (:mod:`pricelevel.core.services`), then PostgreSQL (``pg_ctl stop -m fast``). The database
password comes from ``PGPASSWORD`` or is generated once; it is kept only in ``.cluster/postgres/pgpass``
(mode 600, ``PGPASSFILE``), never in a URL, the env file or a log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pricelevel.core.postgres import LocalPostgres
from pricelevel.core.processes import process_alive
from pricelevel.core.services import (
    Service,
    ServiceGroup,
    dask_scheduler,
    dask_worker,
    mlflow_server,
    prefect_server,
    prefect_worker,
    stop_on_signals,
)

#: The databases of the cluster's services, one each.
DATABASES = ("prefect", "mlflow", "optuna")
#: The work pool of ``prefect.yaml``'s deployments and its queue that runs one training or promotion at a time.
POOL, TRAINING_QUEUE = "pricelevel-process", "training"
#: The trader's own pool (``prefect.yaml``'s ``trade``): one run at a time, its worker in paper mode.
TRADER_POOL = "pricelevel-trader"
#: The automation that marks a flow run Crashed when its heartbeats stop (its process, worker or host died).
CRASH_AUTOMATION = "pricelevel: crash flow runs whose heartbeats stop"


class ClusterError(RuntimeError):
    """The cluster cannot start: one already runs here, or a port it needs is taken (the message names it)."""


@dataclass(frozen=True)
class ClusterPlan:
    """Where the local cluster lives and listens (127.0.0.1 only)."""

    folder: Path
    host: str = "127.0.0.1"
    postgres_port: int = 5433
    prefect_port: int = 4200
    mlflow_port: int = 5000
    dask_port: int = 8786
    dask_workers: int = 2
    #: Worker dashboards and the Prefect worker's health check use the ports after this one.
    dashboard_port: int = 8787
    #: Every flow run sends a heartbeat this often (Prefect's minimum is 30 s) ...
    heartbeat_s: int = 30
    #: ... and one silent this long is marked Crashed (its process, its Prefect worker or its machine died).
    crash_after_s: int = 90

    @property
    def postgres(self) -> LocalPostgres:
        return LocalPostgres(self.folder / "postgres", self.postgres_port, self.host)

    @property
    def env_file(self) -> Path:
        return self.folder / "env"

    @property
    def pid_file(self) -> Path:
        return self.folder / "supervisor.pid"

    @property
    def log_file(self) -> Path:
        return self.folder / "cluster.log"

    @property
    def startup_file(self) -> Path:
        return self.folder / "startup.json"

    @property
    def scheduler(self) -> str:
        return f"tcp://{self.host}:{self.dask_port}"

    def client_environment(self) -> dict[str, str]:
        """What ``.cluster/env`` exports: every client (CLI, flows, deployments, workers) uses the cluster."""
        return {
            "PREFECT_API_URL": f"http://{self.host}:{self.prefect_port}/api",
            "PRICELEVEL_FLOW__TASK_RUNNER": "dask",
            "PRICELEVEL_FLOW__DASK_ADDRESS": self.scheduler,
            "PRICELEVEL_TUNING__STORAGE": self.postgres.url("optuna"),
            "PRICELEVEL_TUNING__WORKERS": str(self.dask_workers),
            "PRICELEVEL_TRACKING__TRACKING_URI": f"http://{self.host}:{self.mlflow_port}",
            "PGPASSFILE": str(self.postgres.pgpass),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_s),
        }

    def crash_automation(self) -> dict[str, object]:
        """This cluster's :func:`crash_automation`."""
        return crash_automation(self.crash_after_s, self.heartbeat_s)

    def stages(self, bin_dir: Path) -> list[list[Service]]:
        """Servers first; then what connects to them (the workers), once they answer."""
        servers = [
            prefect_server(bin_dir, self.host, self.prefect_port, self.postgres.url("prefect", driver="asyncpg")),
            mlflow_server(bin_dir, self.postgres.url("mlflow"), str(self.folder / "artifacts"), self.host,
                          self.mlflow_port),
            dask_scheduler(bin_dir, self.host, self.dask_port, self.dashboard_port),
        ]
        workers = [dask_worker(bin_dir, self.scheduler, f"cpu-{k}", self.host, self.dashboard_port + 1 + k)
                   for k in range(self.dask_workers)]
        workers.append(prefect_worker(bin_dir, POOL, self.host, self.dashboard_port + 1 + self.dask_workers))
        trader = prefect_worker(bin_dir, TRADER_POOL, self.host, self.dashboard_port + 2 + self.dask_workers)
        # paper whatever the shell says: a local cluster never trades real money by accident
        workers.append(replace(trader, env=(*trader.env, ("PRICELEVEL_TRADER__MODE", "paper"))))
        return [servers, workers]

    def ports(self) -> dict[int, str]:
        """Every port the cluster listens on, and what listens there."""
        named = {self.postgres_port: "PostgreSQL", self.prefect_port: "Prefect server", self.mlflow_port: "MLflow server",
                 self.dask_port: "Dask scheduler", self.dashboard_port: "Dask dashboard"}
        named |= {self.dashboard_port + 1 + k: f"Dask worker cpu-{k} dashboard" for k in range(self.dask_workers)}
        named[self.dashboard_port + 1 + self.dask_workers] = f"Prefect worker {POOL} health check"
        named[self.dashboard_port + 2 + self.dask_workers] = f"Prefect worker {TRADER_POOL} health check"
        return named


def require_free_ports(plan: ClusterPlan) -> None:
    """Refuse in one line, naming the port and what needs it, before anything starts."""
    for port, name in plan.ports().items():
        with socket.socket() as probe:
            # as the servers bind: a port whose last connections linger in TIME_WAIT (a `cluster-down` just
            # before) is free for them, only a listener makes it taken
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((plan.host, port))
            except OSError:
                raise ClusterError(f"port {port} ({name}) is in use on {plan.host}; stop what uses it "
                                   f"(`ss -ltnp 'sport = :{port}'`) or pass --port-offset") from None


def write_env_file(plan: ClusterPlan) -> Path:
    """``export KEY=value`` lines to ``source`` (no password: ``PGPASSFILE`` names the file that holds it)."""
    lines = ["# Written by `make cluster-up`; `source` it to run pricelevel on the local cluster."]
    lines += [f"export {key}={value}" for key, value in plan.client_environment().items()]
    plan.env_file.write_text("\n".join(lines) + "\n")
    return plan.env_file


def _password(plan: ClusterPlan, env: Mapping[str, str]) -> str:
    """``PGPASSWORD`` when set, else the one this cluster was made with (its pgpass file), else a new one."""
    if env.get("PGPASSWORD"):
        return env["PGPASSWORD"]
    with contextlib.suppress(OSError, IndexError):
        return plan.postgres.pgpass.read_text().strip().split(":", 4)[4]
    return secrets.token_urlsafe(24)


def crash_automation(crash_after_s: int, heartbeat_s: int) -> dict[str, object]:
    """Prefect's "zombie flow run" automation (docs: detect-zombie-flows): a flow run whose last heartbeat is
    followed by neither another one nor a final state within ``crash_after_s`` is set to Crashed."""
    final = [f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")]
    return {
        "name": CRASH_AUTOMATION,
        "description": f"A flow run silent for {crash_after_s} s (heartbeat every {heartbeat_s} s) "
                       "has lost its process: mark it Crashed, so the next run starts (`make cluster-up`).",
        "trigger": {"type": "event", "posture": "Proactive", "threshold": 1, "within": crash_after_s,
                    "after": ["prefect.flow-run.heartbeat"], "expect": ["prefect.flow-run.heartbeat", *final],
                    "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
                    "for_each": ["prefect.resource.id"]},
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {crash_after_s} s: its process or worker died"}],
    }


def setup_prefect(automation: Mapping[str, object], bin_dir: Path, env: Mapping[str, str]) -> None:
    """The work pool of the deployments, and its ``training`` queue limited to one run at a time; the trader's
    pool; the automation that marks runs Crashed when their heartbeats stop (made once, kept in the database).
    Idempotent: ``cluster up``, ``make deploy`` and the compose ``prefect-worker`` all call it."""
    prefect = str(bin_dir / "prefect")
    known = subprocess.run([prefect, "automation", "inspect", CRASH_AUTOMATION], env=dict(env), capture_output=True,
                           timeout=120)
    if known.returncode != 0:
        subprocess.run([prefect, "automation", "create", "--from-json", json.dumps(automation)],
                       env=dict(env), check=True, capture_output=True, timeout=120)
    subprocess.run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=dict(env),
                   check=True, capture_output=True, timeout=120)
    created = subprocess.run([prefect, "work-queue", "create", TRAINING_QUEUE, "--pool", POOL, "--limit", "1"],
                             env=dict(env), capture_output=True, timeout=120)
    if created.returncode != 0:  # it exists: make sure of its limit
        subprocess.run([prefect, "work-queue", "set-concurrency-limit", TRAINING_QUEUE, "1", "--pool", POOL],
                       env=dict(env), check=True, capture_output=True, timeout=120)
    subprocess.run([prefect, "work-pool", "create", TRADER_POOL, "--type", "process", "--overwrite"], env=dict(env),
                   check=True, capture_output=True, timeout=120)
    subprocess.run([prefect, "work-pool", "set-concurrency-limit", TRADER_POOL, "1"], env=dict(env), check=True,
                   capture_output=True, timeout=120)


def run_cluster(plan: ClusterPlan, bin_dir: Path, env: Mapping[str, str], cwd: Path,
                stop: threading.Event | None = None, timeout_s: float = 300) -> int:
    """Start everything, write the env file, and run until SIGTERM/SIGINT, ``stop``, or a service exits (its
    exit code); then stop every process group and PostgreSQL, and remove the env file."""
    stop = stop or threading.Event()
    plan.folder.mkdir(parents=True, exist_ok=True)
    (plan.folder / ".gitignore").write_text("*\n")
    pg = plan.postgres
    password = _password(plan, env)
    groups: list[ServiceGroup] = []
    startup: dict[str, float] = {}
    with stop_on_signals(stop):
        try:
            started = time.monotonic()
            pg.init(password)
            pg.start(timeout_s=timeout_s)
            for database in DATABASES:
                pg.create_database(database, password)
            pg.write_pgpass(password)
            startup["PostgreSQL"] = time.monotonic() - started
            service_env = {**env, **plan.client_environment(), "PRICELEVEL_HOME": str(cwd)}
            service_env.pop("PGPASSWORD", None)  # the pgpass file only: not inherited by every flow run
            for number, stage in enumerate(plan.stages(bin_dir)):
                group = ServiceGroup(stage, service_env, cwd)
                groups.append(group)
                group.start()
                if not group.wait_healthy(timeout_s, stop):
                    return 0
                startup |= group.ready_s
                if number == 0:
                    setup_prefect(plan.crash_automation(), bin_dir, service_env)
            plan.startup_file.write_text(json.dumps({k: round(v, 2) for k, v in startup.items()}, indent=2))
            write_env_file(plan)
            while not stop.is_set():
                for group in groups:
                    code = group.exit_code()
                    if code is not None:
                        return code
                time.sleep(0.5)
            return 0
        finally:
            plan.env_file.unlink(missing_ok=True)
            for group in reversed(groups):
                group.stop()
            pg.stop()


def start_detached(plan: ClusterPlan, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                   timeout_s: float = 300) -> int:
    """Start the supervisor (``argv`` runs :func:`run_cluster`) in a session of its own, logging to
    ``.cluster/cluster.log``; returns once the env file is written (0) or it died (1). Raises
    :class:`ClusterError` when one runs already, or when a port it needs is taken."""
    if plan.pid_file.exists() and process_alive(int(plan.pid_file.read_text())):
        raise ClusterError(f"a cluster is running already (supervisor pid {plan.pid_file.read_text().strip()}, "
                           f"{plan.folder}); `make cluster-down` stops it")
    require_free_ports(plan)
    plan.folder.mkdir(parents=True, exist_ok=True)
    plan.env_file.unlink(missing_ok=True)
    with plan.log_file.open("ab") as log:
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    plan.pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while not plan.env_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_detached(plan)
            return 1
        time.sleep(0.5)
    return 0


def stop_detached(plan: ClusterPlan, timeout_s: float = 120) -> bool:
    """SIGTERM the supervisor and wait for it to have stopped everything; SIGKILL its group after
    ``timeout_s``. Returns whether one was running."""
    if not plan.pid_file.exists():
        return False
    pid = int(plan.pid_file.read_text())
    running = process_alive(pid)
    if running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    plan.pid_file.unlink(missing_ok=True)
    return running
