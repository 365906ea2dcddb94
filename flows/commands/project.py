"""Project commands: ``ui`` (the Prefect and MLflow UIs as one service) and ``config show``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import console, session, table

config_app = typer.Typer(no_args_is_help=True, help="The effective configuration.")


def ui(
    ctx: typer.Context,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port.")] = 5000,
) -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1; Ctrl-C or SIGTERM stops both, leaving nothing behind."""
    from pricelevel.core.runtime import project_root
    from pricelevel.core.services import run_services, ui_commands

    tracking = session(ctx).config().tracking
    services = ui_commands(Path(sys.executable).parent, tracking.tracking_uri, tracking.artifact_location, prefect_port, mlflow_port)
    for service in services:
        console().print(f"{service.name}: {service.url}")
    console().print("Ctrl-C (or SIGTERM) stops both.")
    code = run_services(services, env=dict(os.environ), cwd=project_root())
    if code:
        raise typer.Exit(code)


@config_app.command("show")
def show(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every key's effective value and the layer it came from: base, a --config file, PRICELEVEL_*, --set."""
    from pricelevel.config import explain_config

    state = session(ctx)
    settings = explain_config(state.config_file, state.overrides)
    if as_json:
        typer.echo(json.dumps([{"key": s.key, "value": s.value, "layer": s.layer} for s in settings], indent=2, default=str))
        return
    console().print(table("effective configuration", ("key", "value", "from"),
                          ([s.key, json.dumps(s.value, default=str), s.layer] for s in settings), wrap=True))
    changed = [s for s in settings if s.layer.startswith("PRICELEVEL_")]
    if changed:
        console().print(f"[yellow]{len(changed)} key(s) set by environment variables[/yellow]: "
                        + ", ".join(f"{s.key} ({s.layer})" for s in changed))
