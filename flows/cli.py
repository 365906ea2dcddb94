"""`pricelevel`: the command line. Each command is a thin front door to a flow or a library call.

``--config FILE``, ``--set key=value`` (repeatable) and ``--debug`` belong to every command and are taken once,
by the root callback, wherever they stand: ``pricelevel --debug train`` and ``pricelevel train --debug`` are
the same. Errors print one line and a hint; ``--debug`` shows the traceback. Exit codes: 0 success, 1 the data
or a run failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.commands import cluster, data, models, project, research, rolling, trading
from flows.commands.common import Session, UsageError
from pricelevel.core.config import ConfigError
from pricelevel.core.runtime import bootstrap
from pricelevel.core.secrets import MissingSecretError, redact

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="pricelevel: crypto support/resistance ML pipeline",
    epilog="--config, --set and --debug may also follow the command: `pricelevel train --set model.max_epochs=2`.",
)


@app.callback()
def options(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file overlaid on conf/base.yaml.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one key: section.key=value (repeatable).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """The options every command shares (the config layers, tracebacks)."""
    ctx.obj = Session(config, tuple(set_ or ()), debug)


for command in (data.ingest, data.validate, research.backtest, research.levels, research.features, models.train,
                models.promote, models.models, trading.trade, project.ui):
    app.command()(command)
app.add_typer(data.data_app, name="data")
app.add_typer(research.check_app, name="check")
app.add_typer(rolling.research_app, name="research")
app.add_typer(project.config_app, name="config")
app.add_typer(trading.trader_app, name="trader")
app.add_typer(cluster.cluster_app, name="cluster")

#: Global options and whether each takes a value; moved before the command so that click sees them.
GLOBAL_OPTIONS = {"--config": True, "--set": True, "--debug": False}

_HINTS = {
    "ConfigError": "check the key in conf/base.yaml, your --config file, PRICELEVEL_* variables and --set "
                   "(`pricelevel config show` names each key's layer)",
    "UsageError": "see `pricelevel --help`",
    "DataValidationError": "inspect the report; the validated store was left unchanged",
    "IngestFailed": "see the validation reports and the Prefect run logs; the validated store kept its last good data",
    "SourceError": "check the network/endpoint (bybit.endpoint) and rerun: what was fetched is kept",
    "MissingSecretError": "export the variable in your shell or your scheduler's environment",
    "MarketDataError": "check the candle/signal files' columns and timestamps (see `pricelevel backtest --help`)",
    "CandleFolderError": "the folder needs SYMBOL_TF.parquet files (the layout of data/sample)",
    "ModelNotFoundError": "run `pricelevel train` (registers @challenger) and `pricelevel promote` (sets @champion)",
    "NothingToRollBackError": "`pricelevel models` shows the versions and their aliases",
    "ProjectNotFoundError": "run from the project folder, or set PRICELEVEL_HOME",
    "LookaheadError": "a feature or label uses data from after its bar; the lines above name column and time",
    "ValueError": "rerun with --debug for the traceback",
}


def hoist_global_options(argv: list[str]) -> list[str]:
    """``pricelevel train --set a=b`` -> ``pricelevel --set a=b train``: the root callback owns these options."""
    front, rest, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if argv[i] == "--":
            rest += argv[i:]
            break
        if name in GLOBAL_OPTIONS:
            takes_value = GLOBAL_OPTIONS[name] and "=" not in argv[i]
            front += argv[i : i + 1 + takes_value]
            i += 1 + takes_value
            continue
        rest.append(argv[i])
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Console entry point: the process runtime (quiet offline defaults, secret redaction), one-line errors."""
    argv = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    secrets = bootstrap()
    try:
        # Without standalone mode, click returns typer.Exit's code instead of raising it.
        code = app(args=argv, prog_name="pricelevel", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place errors become one line + hint
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        if debug:
            raise
        name = type(exc).__name__
        print(f"error: {redact(str(exc), secrets).strip() or name}", file=sys.stderr)
        print(f"hint: {_HINTS.get(name, 'rerun with --debug for the traceback')}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError | UsageError | MissingSecretError) else 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
