"""`pricelevel`: the command line. Each command is a thin front door to a flow or a library call.

``--config FILE``, ``--set key=value`` (repeatable) and ``--debug`` belong to every command and are taken once,
by the root callback, wherever they stand: ``pricelevel --debug train`` and ``pricelevel train --debug`` are
the same. Errors print one line and a hint; ``--debug`` shows the traceback. Exit codes: 0 success, 1 the data
or a run failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
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
    server = ctx.obj if isinstance(ctx.obj, TemporaryServer) else None
    ctx.obj = (server.session_type() if server else Session)(config, tuple(set_ or ()), debug)


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
    "ClusterError": "`make cluster-down` stops the running cluster; `CLUSTER_ARGS=\"--port-offset N\"` moves every port",
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


#: Seconds the temporary server gets to stop before it is killed.
SERVER_GRACE_S = 2.0
#: Exit codes of a command ended by SIGINT / SIGTERM (128 + the signal's number).
STOPPED_EXIT_CODES = frozenset({128 + signal.SIGINT, 128 + signal.SIGTERM})
#: Delay before a stop that Python dropped (raised inside a finaliser) is raised again.
REDELIVER_AFTER_S = 0.05


class Stopped(BaseException):
    """SIGTERM or SIGINT: the run ends now. A BaseException (not KeyboardInterrupt, which Lightning turns into
    ``sys.exit(1)``), so no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopHandler:
    """SIGTERM/SIGINT raise :class:`Stopped` in the main thread, once (a second signal is ignored while the run
    stops: within seconds). Prefect replaces the SIGTERM handler while a flow runs (its ``TerminationSignal``
    ends the flow as Crashed); it restores this one and sends SIGTERM again after that.

    A handler's exception that lands in a finaliser or a weakref callback is printed and dropped by Python
    ("Exception ignored in ..."); torch frees tensors in such callbacks all the time, so a SIGTERM during
    training was dropped more often than not. :meth:`redeliver` (``sys.unraisablehook``) sends it again."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.pending = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None or self.pending:
            self.signum, self.pending = self.signum or signum, False
            raise Stopped(self.signum)

    def redeliver(self, unraisable: object) -> bool:
        """Whether the dropped exception was a stop (ours or Prefect's); if so, the signal is raised again."""
        error = getattr(unraisable, "exc_value", None)
        if isinstance(error, Stopped):
            signum = error.signum
        elif type(error).__name__ == "TerminationSignal":
            signum = getattr(error, "signal", signal.SIGTERM)
        else:
            return False
        import _thread
        import threading

        self.pending = True
        # From another thread: called here, the handler would run at once, inside this hook, and be dropped again.
        threading.Timer(REDELIVER_AFTER_S, _thread.interrupt_main, (signum,)).start()
        return True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopHandler]:
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_hook = sys.unraisablehook

        def hook(unraisable: object) -> None:
            if not self.redeliver(unraisable):
                previous_hook(unraisable)

        sys.unraisablehook = hook
        try:
            yield self
        finally:
            sys.unraisablehook = previous_hook
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def interrupted_flow_runs(exc: BaseException) -> list:
    """The ids of the flow runs ``exc`` came through, innermost last: the flow engines on its tracebacks (and
    on those of the exceptions it was raised from). Exact, where a query by time or name could hit another run."""
    ids, seen, chain = [], set(), [exc]
    while chain:
        error = chain.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        chain += [e for e in (error.__context__, error.__cause__) if e is not None]
        tb = error.__traceback__
        while tb is not None:
            engine = tb.tb_frame.f_locals.get("self")
            run = getattr(engine, "flow_run", None) if type(engine).__name__.endswith("FlowRunEngine") else None
            if run is not None and run.id not in ids:
                ids.append(run.id)
            tb = tb.tb_next
    return ids


def cancel_flow_runs(flow_run_ids: list) -> list[str]:
    """Mark the interrupted flow runs (and the flows they ran in) Cancelled, where a server answers; Prefect
    marked them Crashed, which means "died", not "was told to stop". Returns their names."""
    if not flow_run_ids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    names = []
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        queue, seen = list(flow_run_ids), set()
        while queue:
            run = client.read_flow_run(queue.pop(0))
            if run.id in seen:
                continue
            seen.add(run.id)
            if not run.state or not run.state.is_completed():
                client.set_flow_run_state(run.id, Cancelled(message="stopped by a signal"), force=True)
                names.append(run.name)
            if run.parent_task_run_id is not None:
                queue.append(client.read_task_run(run.parent_task_run_id).flow_run_id)
    return names


class TemporaryServer:
    """A flow run without a Prefect API gets a temporary ``prefect server start`` of its own (the local SQLite
    database, as Prefect's own temporary server), started when the command's flow is about to run (a usage error
    starts nothing), in its own session so that a signal to the command's process group (Ctrl-C, ``timeout``)
    reaches the flow and not the server, and stopped last, after the flow run has been marked."""

    def __init__(self) -> None:
        self.group = None
        self.stack = contextlib.ExitStack()

    def session_type(self) -> type[Session]:
        """The session whose flow arguments, asked for right before a flow runs, start the server first."""
        server = self

        class FlowSession(Session):
            def flow_arguments(self) -> dict[str, object]:
                server.ensure()
                return super().flow_arguments()

        return FlowSession

    def ensure(self) -> None:
        from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

        if self.group is not None or get_current_settings().api.url is not None:
            return
        import socket

        from pricelevel.core.runtime import project_root
        from pricelevel.core.services import ServiceGroup, prefect_server

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = prefect_server(Path(sys.executable).parent, "127.0.0.1", port)
        # die_with_parent: a command killed with SIGKILL (or by the OOM killer) takes its server with it
        self.group = ServiceGroup([server], dict(os.environ), project_root(), grace_s=SERVER_GRACE_S, quiet=True,
                                  die_with_parent=True)
        self.group.start()
        self.group.wait_healthy(180)
        url = f"{server.url}/api"
        os.environ["PREFECT_API_URL"] = url  # for the processes the flow starts (Dask workers, subprocesses)
        self.stack.callback(os.environ.pop, "PREFECT_API_URL", None)
        self.stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))

    def close(self) -> None:
        if self.group is not None:
            _drain_prefect_clients()
            self.stack.close()
            self.group.stop()
            self.group = None


def _drain_prefect_clients(timeout_s: float = 1.5) -> None:
    """Send the logs and events still queued before the server stops; else Prefect's background workers retry
    the gone server at exit and the process hangs (what ``prefect_test_harness`` does before stopping its own)."""

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: the process runtime (quiet offline defaults, secret redaction), one-line errors.
    SIGTERM/SIGINT end a command within seconds: the flow stops what it started, its run is marked Cancelled,
    and a temporary Prefect server is stopped last."""
    argv = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    secrets = bootstrap()
    stop = StopHandler()
    try:
        with stop.installed() if _in_main_thread() else contextlib.nullcontext(stop):
            try:
                with contextlib.closing(TemporaryServer()) as server:
                    try:
                        # Without standalone mode, click returns typer.Exit's code instead of raising it.
                        code = app(args=argv, prog_name="pricelevel", standalone_mode=False, obj=server)
                        return code if isinstance(code, int) else 0
                    except BaseException as exc:
                        if stop.signum is None and type(exc).__name__ == "TerminationSignal":
                            stop.signum = signal.SIGTERM  # Prefect's own SIGTERM bridge ended the flow
                        if stop.signum is None:
                            raise
                        cancelled = cancel_flow_runs(interrupted_flow_runs(exc))  # while the server still runs
                        if cancelled:
                            print(f"flow runs marked cancelled: {', '.join(cancelled)}", file=sys.stderr)
                        if isinstance(exc, Stopped):
                            raise
                        raise Stopped(stop.signum) from exc
            except Stopped:
                pass  # the server is stopped; report below
        print(f"stopped by {signal.Signals(stop.signum or signal.SIGINT).name}", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)
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


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run() -> None:
    code = main()
    if code in STOPPED_EXIT_CODES:
        # Stopped by a signal and cleaned up (flow run marked, workers stopped, server stopped): leave now. The
        # interpreter's own teardown (torch, numba, thread pools) took 3-4 s more on a loaded 2-core machine.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
