"""``cluster up|down|run|status``: the local scaled-out cluster of :mod:`pricelevel.core.cluster`.

    python -m flows.commands.cluster up      # what `make cluster-up` runs: starts it detached, prints the env file
    python -m flows.commands.cluster down    # what `make cluster-down` runs: stops everything it started
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

cluster_app = typer.Typer(no_args_is_help=True, help="A local cluster: PostgreSQL, Prefect, MLflow, Dask (no Docker).")

Workers = Annotated[int, typer.Option(help="Dask workers (one process, one thread each).")]
Offset = Annotated[int, typer.Option(help="Added to every port (PostgreSQL 5433, Prefect 4200, MLflow 5000, Dask 8786+).")]
CrashAfter = Annotated[int, typer.Option(help="A flow run without a heartbeat (every 30 s) for this long is marked "
                                              "Crashed: its process, Prefect worker or machine died.", min=45)]


def _plan(workers: int = 2, offset: int = 0, crash_after: int = 90):
    from pricelevel.core.cluster import ClusterPlan
    from pricelevel.core.runtime import project_root

    return ClusterPlan(project_root() / ".cluster", dask_workers=workers, postgres_port=5433 + offset,
                       prefect_port=4200 + offset, mlflow_port=5000 + offset, dask_port=8786 + offset,
                       dashboard_port=8787 + offset, crash_after_s=crash_after)


@cluster_app.command("up")
def up(workers: Workers = 2, port_offset: Offset = 0, crash_after: CrashAfter = 90) -> None:
    """Start the cluster in the background; returns once every service answers."""
    from pricelevel.core.cluster import start_detached
    from pricelevel.core.runtime import project_root

    plan = _plan(workers, port_offset, crash_after)
    argv = [sys.executable, "-m", "flows.commands.cluster", "run", "--workers", str(workers),
            "--port-offset", str(port_offset), "--crash-after", str(crash_after)]
    if start_detached(plan, argv, dict(os.environ), project_root()) != 0:
        typer.echo(f"cluster did not start; see {plan.log_file}", err=True)
        raise typer.Exit(1)
    startup = json.loads(plan.startup_file.read_text()) if plan.startup_file.exists() else {}
    for name, seconds in startup.items():
        typer.echo(f"{name:<28} up after {seconds:6.1f} s")
    typer.echo(f"Prefect http://{plan.host}:{plan.prefect_port} · MLflow http://{plan.host}:{plan.mlflow_port} "
               f"· Dask {plan.scheduler} (dashboard http://{plan.host}:{plan.dashboard_port})")
    typer.echo(f"source {plan.env_file}    # then pricelevel train, make deploy ... run on the cluster")


@cluster_app.command("down")
def down() -> None:
    """Stop every service of the cluster (process groups, then PostgreSQL); data stays in .cluster/."""
    from pricelevel.core.cluster import stop_detached

    typer.echo("cluster stopped" if stop_detached(_plan()) else "no cluster running")


@cluster_app.command("run")
def run(workers: Workers = 2, port_offset: Offset = 0, crash_after: CrashAfter = 90) -> None:
    """Run the cluster in the foreground until Ctrl-C or SIGTERM (what `up` starts in the background)."""
    from pricelevel.core.cluster import run_cluster
    from pricelevel.core.runtime import bootstrap, project_root

    bootstrap()
    code = run_cluster(_plan(workers, port_offset, crash_after), Path(sys.executable).parent, dict(os.environ), project_root())
    raise typer.Exit(code)


@cluster_app.command("prefect-setup")
def prefect_setup(crash_after: CrashAfter = 90) -> None:
    """Create the work pools, the one-run `training` queue and the Crashed-run automation on the Prefect server
    at PREFECT_API_URL (idempotent; `make deploy` and the compose `prefect-worker` run it)."""
    from pricelevel.core.cluster import ClusterPlan, crash_automation, setup_prefect

    if not os.environ.get("PREFECT_API_URL"):
        typer.echo("PREFECT_API_URL is not set: start a server (`make cluster-up`, `make ui`) and export it", err=True)
        raise typer.Exit(2)
    setup_prefect(crash_automation(crash_after, ClusterPlan.heartbeat_s), Path(sys.executable).parent, dict(os.environ))
    typer.echo("work pools pricelevel-process (queue training, one run at a time) and pricelevel-trader ready; "
               f"runs silent for {crash_after} s are marked Crashed")


@cluster_app.command("status")
def status() -> None:
    """Whether the cluster runs, and the environment its clients use."""
    plan = _plan()
    if not plan.env_file.exists():
        typer.echo("no cluster running")
        raise typer.Exit(1)
    typer.echo(plan.env_file.read_text(), nl=False)


if __name__ == "__main__":
    cluster_app()
