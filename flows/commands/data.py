"""Data commands: ``ingest``, ``validate``, ``data status``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import UsageError, console, relative, run_flow, session, short, split, table

data_app = typer.Typer(no_args_is_help=True, help="Inspect the candle store.")


def ingest(
    ctx: typer.Context,
    symbols: Annotated[list[str] | None, typer.Option(help="Symbols (comma-separated or repeated).")] = None,
    timeframes: Annotated[list[str] | None, typer.Option(help="Timeframes: 1d, 4h, 1h, 15m, 1m.")] = None,
    start: Annotated[str | None, typer.Option(help="UTC start, inclusive (e.g. 2024-07-01).")] = None,
    end: Annotated[str | None, typer.Option(help="UTC end, exclusive.")] = None,
) -> None:
    """Run the ingest flow: fetch new candles, validate them, publish the ones that pass."""
    from flows.ingest import ingest as ingest_flow
    from pricelevel.config import data_overrides

    arguments = {"symbols": split(symbols), "timeframes": split(timeframes), "start": start, "end": end}
    cfg = session(ctx).config(*data_overrides(**arguments))  # fail fast, before the flow run is created
    rows = run_flow(ctx, ingest_flow, **arguments)
    columns = ("dataset", "status", "rows", "warnings", "validated")
    console().print(table(f"ingest ({cfg.data.source}) -> {cfg.data.root}", columns,
                          ([*(r[c] for c in columns[:-1]), relative(r["validated"])] for r in rows)))
    console().print(f"validation reports: {cfg.catalogue.reports_dir}")


def validate(
    ctx: typer.Context,
    files: Annotated[list[Path] | None, typer.Argument(help="Parquet files named SYMBOL_TF.parquet.")] = None,
    timeframe: Annotated[str | None, typer.Option(help="Timeframe, when file names do not say it.")] = None,
) -> None:
    """Validate the given files (read-only), or the whole raw store (publishing what passes)."""
    from pricelevel.data.publish import file_keys, publish_all, validate_file

    cfg = session(ctx).config()
    out, failures = console(), []
    if files:
        try:
            jobs = file_keys(files, timeframe)
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(str(exc)) from None
        for path, key in _progress(jobs, "validating"):
            report = validate_file(path, key, cfg.validation)
            if not report.success:
                failures.append(report.error_message())
                continue
            warnings = "".join(f"\n  [yellow]warning[/yellow] {w.summary}" for w in report.warnings)
            out.print(f"[green]ok[/green] {path} ({report.rows} rows){warnings}")
    else:
        try:
            outcomes = list(publish_all(cfg.catalogue, cfg.validation))
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        for key, outcome in outcomes:
            if isinstance(outcome, Exception):
                failures.append(str(outcome))
            else:
                out.print(f"[green]{outcome.status}[/green] {key} ({outcome.rows} rows) -> {outcome.validated_path}")
    for failure in failures:
        out.print(f"[red]FAILED[/red] {failure}", soft_wrap=True)
    if failures:
        raise typer.Exit(1)


def _progress(items: list, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
        disable=len(items) < 2 or not sys.stderr.isatty(), console=Console(stderr=True),
    )
    with progress:
        yield from progress.track(items)


@data_app.command("status")
def data_status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Per dataset: layer, path, rows, first and last candle, gaps."""
    from pricelevel.data.status import store_status

    cfg = session(ctx).config()
    statuses = store_status(cfg.catalogue.store)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
        return
    rows = ([f"{s.source} {s.symbol} {s.timeframe}", s.layer, s.rows, short(s.first), short(s.last), s.gaps,
             s.missing_bars, relative(s.path)] for s in statuses)
    columns = ("dataset", "layer", "rows", "first", "last", "gaps", "missing", "path")
    console().print(table(f"candle store {cfg.data.root}", columns, rows) if statuses
                    else f"no datasets under {cfg.data.root}; run `pricelevel ingest`")
