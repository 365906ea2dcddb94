"""`pricelevel`: the command line. Each command is a thin front door to a flow or a library call.

Errors print one line and a hint; ``--debug`` shows the traceback. Exit codes: 0 success, 1 the data or a
run failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pricelevel.config import Config, ConfigError, data_overrides
from pricelevel.project import apply_quiet_environment, load_project_config, project_root
from pricelevel.secrets import MissingSecretError, Secrets, install_log_redaction, redact

app = typer.Typer(add_completion=False, no_args_is_help=True, help="pricelevel: crypto support/resistance ML pipeline")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the candle store.")
app.add_typer(data_app, name="data")

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML file overlaid on conf/base.yaml.")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override one key: section.key=value (repeatable).")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


class UsageError(Exception):
    """Bad command-line input; exit code 2."""


def _split(values: list[str] | None) -> list[str] | None:
    """Accept both ``--symbols A --symbols B`` and ``--symbols A,B``."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _load(config_file: Path | None, overrides: list[str] | None, extra: list[str] = ()) -> Config:
    return load_project_config(config_file, [*(overrides or []), *extra])


def _console() -> Console:
    """Stdout console; when piped (CI, logs) it is 140 columns wide rather than rich's 80."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=140)


# --------------------------------------------------------------------------------------------- ingest


@app.command()
def ingest(
    symbols: Annotated[list[str] | None, typer.Option(help="Symbols (comma-separated or repeated).")] = None,
    timeframes: Annotated[list[str] | None, typer.Option(help="Timeframes: 1d, 4h, 1h, 15m, 1m.")] = None,
    start: Annotated[str | None, typer.Option(help="UTC start, inclusive (e.g. 2024-07-01).")] = None,
    end: Annotated[str | None, typer.Option(help="UTC end, exclusive.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Run the ingest flow: fetch new candles, validate them, publish the ones that pass."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.ingest import ingest as ingest_flow

    if not debug:
        _hide_tracebacks_on_console()
    arguments = {"symbols": _split(symbols), "timeframes": _split(timeframes), "start": start, "end": end}
    cfg = _load(config, set_, data_overrides(**arguments))  # fail fast, before the flow run is created
    flow = ingest_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=cfg.flow.max_workers))
    rows = flow(**arguments, config_file=str(config) if config else None, overrides=set_ or [])
    table = Table(title=f"ingest ({cfg.data.source}) -> {cfg.data.root}")
    for column in ("dataset", "status", "rows", "warnings", "validated"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["dataset"], row["status"], str(row["rows"]), str(row["warnings"]), _relative(row["validated"]))
    _console().print(table)
    _console().print(f"validation reports: {cfg.data.root / 'reports' / 'validation'}")


class _NoTracebackFormatter(logging.Formatter):
    """Formats like ``inner`` without the traceback: the console gets one line, the Prefect UI the rest."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _hide_tracebacks_on_console() -> None:
    """Prefect's console handlers print every task failure's traceback; without --debug, keep them out."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("prefect")]
    for logger in [logging.getLogger(), *loggers]:
        for handler in logger.handlers:
            if type(handler).__name__.endswith("ConsoleHandler") and not isinstance(
                handler.formatter, _NoTracebackFormatter
            ):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter))


def _short(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def _relative(path: object) -> str:
    try:
        return str(Path(str(path)).relative_to(project_root()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- validate


@app.command()
def validate(
    files: Annotated[list[Path] | None, typer.Argument(help="Parquet files named SYMBOL_TF.parquet.")] = None,
    timeframe: Annotated[str | None, typer.Option(help="Timeframe, when file names do not say it.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Validate the given files (read-only), or the whole raw store (publishing what passes)."""
    from pricelevel.publish import validate_and_publish, validate_file
    from pricelevel.store import CandleStore, DatasetKey, Layer, parse_dataset_filename
    from pricelevel.timeframes import Timeframe
    from pricelevel.validation import DataValidationError

    cfg = _load(config, set_)
    console = _console()
    failures: list[str] = []
    if files:
        jobs = []
        for path in files:
            parsed = parse_dataset_filename(path.name)
            if timeframe is None and parsed is None:
                raise UsageError(f"{path}: cannot tell the timeframe from the name; pass --timeframe")
            if not path.exists():
                raise UsageError(f"{path}: no such file")
            symbol = parsed[0] if parsed else path.stem
            tf = Timeframe(timeframe) if timeframe else parsed[1]
            jobs.append((path, DatasetKey("file", symbol, tf)))
        for path, key in _progress(jobs, "validating"):
            report = validate_file(path, key, cfg.validation)
            if report.success:
                console.print(f"[green]ok[/green] {path} ({report.rows} rows)" + _warn_suffix(report.warnings))
            else:
                failures.append(report.error_message())
    else:
        store = CandleStore(cfg.data.root)
        keys = list(store.datasets(Layer.RAW))
        if not keys:
            raise UsageError(f"no raw datasets under {store.root / 'raw'}; run `pricelevel ingest` first")
        for key in _progress(keys, "validating store"):
            try:
                outcome = validate_and_publish(store, key, cfg.validation)
                console.print(f"[green]{outcome.status}[/green] {key} ({outcome.rows} rows) -> {outcome.validated_path}")
            except DataValidationError as exc:
                failures.append(str(exc))
    if failures:
        for failure in failures:
            console.print(f"[red]FAILED[/red] {failure}", soft_wrap=True)
        raise typer.Exit(1)


def _warn_suffix(warnings) -> str:
    return "".join(f"\n  [yellow]warning[/yellow] {w.summary}" for w in warnings)


def _progress(items: list, label: str):
    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
        disable=len(items) < 2 or not sys.stderr.isatty(), console=Console(stderr=True),
    )
    with progress:
        yield from progress.track(items)


# --------------------------------------------------------------------------------------------- data status


@data_app.command("status")
def data_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Per dataset: layer, path, rows, first and last candle, gaps."""
    from pricelevel.status import store_status
    from pricelevel.store import CandleStore

    cfg = _load(config, set_)
    statuses = store_status(CandleStore(cfg.data.root))
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
        return
    table = Table(title=f"candle store {cfg.data.root}")
    for column in ("dataset", "layer", "rows", "first", "last", "gaps", "missing", "path"):
        table.add_column(column, no_wrap=True)
    for s in statuses:
        table.add_row(f"{s.source} {s.symbol} {s.timeframe}", s.layer, str(s.rows), _short(s.first),
                      _short(s.last), str(s.gaps), str(s.missing_bars), _relative(s.path))
    _console().print(table if statuses else f"no datasets under {cfg.data.root}; run `pricelevel ingest`")


# --------------------------------------------------------------------------------------------- backtest


@app.command()
def backtest(
    candles: Annotated[
        Path | None, typer.Option(help="Parquet: timestamp, open, high, low, close[, volume][, symbol].")
    ] = None,
    signals: Annotated[
        Path | None, typer.Option(help="Parquet: timestamp, entry, exit[, symbol] (booleans), or timestamp, probability.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A registered model, e.g. models:/pricelevel@champion (with --data).")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Folder of SYMBOL_TF.parquet candles to score --model on.")] = None,
    start: Annotated[str | None, typer.Option(help="With --model: trade from this UTC time on.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics and every trade here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the HTML summary here (+ one page per symbol).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Backtest signals on candles, or a registered model on a data folder, with the rules in `backtest.*`."""
    from pricelevel.backtest.files import read_frame, write_result_json
    from pricelevel.backtest.market import align_signals, market_from_candles
    from pricelevel.backtest.metrics import compute_metrics
    from pricelevel.backtest.run import run_backtest

    cfg = _load(config, set_)
    levels = None
    if model is not None:
        if data is None or candles is not None or signals is not None:
            raise UsageError("--model needs --data DIR (and no --candles/--signals)")
        from pricelevel.datafolder import CandleFolder
        from pricelevel.scoring import backtest_probabilities, predict_tables, tables_for_spec
        from pricelevel.tracking import load_model, mlflow_client

        loaded = load_model(model, mlflow_client(cfg.tracking))
        tables = tables_for_spec(CandleFolder.open(data), loaded.spec)
        scored = predict_tables(loaded.predict, loaded.spec, tables)
        traded = backtest_probabilities(tables, scored, cfg.backtest, start=pd_timestamp(start))
        result, metrics, levels = traded.result, traded.metrics, traded.levels
        what = f"{model} (version {loaded.version}) on {data}"
    else:
        if candles is None or signals is None:
            raise UsageError("give --candles and --signals, or --model and --data")
        market = market_from_candles(read_frame(candles, "candles"), timeframe=cfg.backtest.timeframe)
        entries, exits = align_signals(
            market, read_frame(signals, "signals"), cfg.backtest.threshold, cfg.backtest.exit_threshold
        )
        result = run_backtest(market, entries, exits, cfg.backtest)
        metrics = compute_metrics(result)
        what = "backtest"
    market = result.market
    _print_metrics(metrics, f"{what}: {', '.join(market.symbols)} {market.timeframe} "
                   f"{market.timestamps[0]:%Y-%m-%d} .. {market.timestamps[-1]:%Y-%m-%d} ({market.n_bars} bars)")
    if any(result.rejected.values()):
        _console().print("rejected entries: " + ", ".join(f"{k} {v}" for k, v in result.rejected.items() if v))
    if json_out:
        _console().print(f"json: {write_result_json(result, metrics, json_out)}")
    if report:
        from pricelevel.backtest.report import write_report

        pages = write_report(result, metrics, report, levels=levels)
        _console().print(f"report: {pages[0]} (+{len(pages) - 1} files)")


def pd_timestamp(text: str | None):
    import pandas as pd

    if text is None:
        return None
    try:
        return pd.Timestamp(text, tz="UTC") if pd.Timestamp(text).tzinfo is None else pd.Timestamp(text).tz_convert("UTC")
    except ValueError:
        raise UsageError(f"not a time: {text!r} (e.g. 2024-06-01 or 2024-06-01T12:00)") from None


# --------------------------------------------------------------------------------------------- levels


@app.command()
def levels(
    data: Annotated[Path, typer.Option(help="Folder of SYMBOL_TF.parquet candles (1d/4h/1h for the filters).")],
    symbol: Annotated[str, typer.Option(help="e.g. BTCUSDT")],
    timeframe: Annotated[str, typer.Option(help="Timeframe whose closes make the extrema: 1d, 4h, 1h, 15m, 1m.")],
    asof: Annotated[str, typer.Option(help="UTC time: only candles closed by then are used.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the levels here.")],
    raw: Annotated[bool, typer.Option("--raw", help="Before the multi-timeframe filter.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Write the support/resistance levels in force at --asof (walk-forward: nothing after it is read)."""
    from pricelevel.datafolder import CandleFolder
    from pricelevel.levels import levels_asof
    from pricelevel.store import atomic_write
    from pricelevel.training import read_context

    cfg = _load(config, set_).levels
    tf = _timeframe(timeframe)
    when = pd_timestamp(asof)
    folder = CandleFolder.open(data)
    context = None if raw else read_context(folder, symbol, cfg)
    found = levels_asof(folder.read(symbol, tf), tf, when, cfg, context, raw=raw)
    document = {
        "symbol": symbol, "timeframe": str(tf), "asof": when.isoformat(), "raw": raw, "config": cfg.model_dump(mode="json"),
        "levels": json.loads(found.to_json(orient="records", date_format="iso")),
    }
    atomic_write(json_out, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=2)))
    table = Table(title=f"{symbol} {tf} levels in force at {when:%Y-%m-%d %H:%M} UTC{' (raw)' if raw else ''}")
    for column in ("price", "n_extrema", "touches", "age_days", "volume_ratio"):
        table.add_column(column, justify="right")
    for row in found.itertuples():
        table.add_row(*(f"{getattr(row, c):.6g}" if isinstance(getattr(row, c), float) else str(getattr(row, c))
                        for c in ("price", "n_extrema", "touches", "age_days", "volume_ratio")))
    _console().print(table)
    _console().print(f"json: {json_out}")


def _timeframe(text: str):
    from pricelevel.timeframes import Timeframe

    try:
        return Timeframe(text)
    except ValueError:
        raise UsageError(f"unknown timeframe {text!r}; use one of {', '.join(t.value for t in Timeframe)}") from None


# --------------------------------------------------------------------------------------------- features


@app.command()
def features(
    data: Annotated[Path, typer.Option(help="Folder of SYMBOL_TF.parquet candles (with the longer timeframes the set reads).")],
    symbol: Annotated[str, typer.Option(help="e.g. BTCUSDT")],
    timeframe: Annotated[str, typer.Option(help="Timeframe of the rows: 1d, 4h, 1h, 15m, 1m.")],
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Write the timestamped feature and label table training uses (levels, labels and features per conf)."""
    from pricelevel.datafolder import CandleFolder
    from pricelevel.store import atomic_write
    from pricelevel.training import build_table, input_timeframes, read_frames

    cfg = _load(config, set_)
    tf = _timeframe(timeframe)
    folder = CandleFolder.open(data)
    folder.require([symbol], [tf])
    frames = read_frames(folder, symbol, input_timeframes(tf, cfg.levels, cfg.features))
    history, table = build_table(frames, tf, cfg.levels, cfg.labels, cfg.features)
    atomic_write(out, lambda tmp: table.to_parquet(tmp, index=False))
    labelled = table["target"].notna()
    feature_count = sum(c.startswith("feature_") for c in table.columns)
    ready = table.filter(like="feature_").notna().all(axis=1)
    _console().print(
        f"{symbol} {tf}: {len(table)} rows, {feature_count} features (set {cfg.features.set!r}, complete from row "
        f"{int(ready.to_numpy().argmax()) if ready.any() else '-'}), {len(history.refits)} level refits; "
        f"{cfg.labels.kind} target on {int(labelled.sum())} rows, {100 * table.loc[labelled, 'target'].mean():.2f}% positive"
    )
    _console().print(f"parquet: {out}")


# --------------------------------------------------------------------------------------------- check

check_app = typer.Typer(no_args_is_help=True, help="Research-integrity checks.")
app.add_typer(check_app, name="check")


@check_app.command("lookahead")
def check_lookahead_command(
    data: Annotated[Path | None, typer.Option(help="Candle folder; default: the validated store, else the bundled sample.")] = None,
    symbols: Annotated[list[str] | None, typer.Option(help="Symbols (repeat or comma-separate); default: the training symbols.")] = None,
    cuts: Annotated[int | None, typer.Option(help="Cut points per symbol; default: lookahead.cuts.")] = None,
    timeframe: Annotated[str | None, typer.Option(help="Rows' timeframe; default: dataset.timeframe.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report here.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Recompute features and labels on data cut at K points and compare with the full data: exit 1 on any change."""
    from pricelevel.datafolder import CandleFolder
    from pricelevel.lookahead import check_lookahead, report_lines
    from pricelevel.store import CandleStore, Layer
    from pricelevel.training import build_table, input_timeframes, read_frames

    cfg = _load(config, set_)
    tf = _timeframe(timeframe) if timeframe else cfg.dataset.timeframe
    if data is None:
        validated = CandleStore(cfg.data.root).layer_dir(Layer.VALIDATED, cfg.data.source)
        data = validated if any(validated.glob("*.parquet")) else cfg.data.sample_dir
    folder = CandleFolder.open(data)
    wanted = _split(symbols) or [s for s in cfg.training_symbols if folder.has(s, tf)]
    if not wanted:
        raise UsageError(f"{data}: none of {', '.join(cfg.training_symbols)} has {tf} candles; pass --symbols")
    folder.require(wanted, [tf])
    count = cuts if cuts is not None else cfg.lookahead.cuts
    if count < 1:
        raise UsageError(f"--cuts must be >= 1, got {count}")
    timeframes = input_timeframes(tf, cfg.levels, cfg.features)
    frames = {symbol: read_frames(folder, symbol, timeframes) for symbol in wanted}
    _console().print(
        f"checking {len(wanted)} symbol(s) at {tf} in {_relative(data)}: {count} cuts each, feature set "
        f"{cfg.features.set!r}, label {cfg.labels.kind} (horizon {cfg.labels.horizon})"
    )
    report = check_lookahead(
        frames, tf, lambda f: build_table(f, tf, cfg.levels, cfg.labels, cfg.features)[1], cfg.labels.horizon, count
    )
    for line in report_lines(report):
        _console().print(line, markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.summary(), indent=2))
    if not report.ok:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------- train / promote


QUICK_CONFIG = Path("conf") / "quick.yaml"


@app.command()
def train(
    quick: Annotated[bool, typer.Option("--quick", help="Demo-sized run: conf/quick.yaml (minutes on a laptop).")] = False,
    skip_ingest: Annotated[bool, typer.Option("--skip-ingest", help="Train on the validated store as it is.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Run the training flow: ingest, levels, labels, dataset, tune, train, evaluate, backtest, register."""
    from flows.train import train as train_flow

    if not debug:
        _hide_tracebacks_on_console()
    if quick and config:
        raise UsageError("--quick is conf/quick.yaml; put your keys in --set or a --config of your own, not both")
    config_file = project_root() / QUICK_CONFIG if quick else config
    cfg = _load(config_file, set_)
    outcome = train_flow(config_file=str(config_file) if config_file else None, overrides=set_ or [], skip_ingest=skip_ingest)
    scores = outcome["scores"]
    metric = cfg.tuning.metric
    table = Table(title=f"{cfg.tracking.registered_model} version {outcome['version']} (@challenger)"
                  + (" — reused, nothing new" if outcome["reused"] else ""))
    for column in ("", "PR-AUC", "ROC-AUC", "F1", "precision", "recall"):
        table.add_column(column, justify="right")
    for label, prefix in (("LSTM (test)", "test"), ("majority", "baseline_majority"),
                          ("near level now", "baseline_near_level_now")):
        table.add_row(label, *(f"{scores.get(f'{prefix}_{m}', float('nan')):.4f}"
                               for m in ("pr_auc", "roc_auc", "f1", "precision", "recall")))
    _console().print(table)
    bt = outcome["backtest"]
    _console().print(
        f"best {metric} {scores[f'best_{metric}']:.4f} · backtest on the test segment: total return "
        f"{bt.get('backtest_total_return', float('nan')):+.2%}, sharpe {bt.get('backtest_sharpe', float('nan')):.2f}, "
        f"trades {bt.get('backtest_n_trades', 0):.0f}"
    )
    _console().print(f"report: {_relative(outcome['report'])}")
    _console().print("next: `pricelevel promote` (challenger vs champion) · `pricelevel models` · `pricelevel ui`")


@app.command()
def promote(
    rollback: Annotated[bool, typer.Option("--rollback", help="Put @champion back on the previous champion.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Run the promotion flow: @champion moves to @challenger only if it wins (README "Promotion")."""
    from flows.promote import promote as promote_flow

    if not debug:
        _hide_tracebacks_on_console()
    cfg = _load(config, set_)
    outcome = promote_flow(config_file=str(config) if config else None, overrides=set_ or [], rollback_champion=rollback)
    name = cfg.tracking.registered_model
    if rollback:
        _console().print(f"{name}@champion: version {outcome['from']} -> {outcome['to']}")
        return
    verdict = "PROMOTED" if outcome.get("promote") else "not promoted"
    _console().print(f"{verdict}: {outcome.get('reason')}")
    _console().print(f"load it with: mlflow.pyfunc.load_model('models:/{name}@champion') · `pricelevel models`")


@app.command()
def models(
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the versions here as JSON.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Registered model versions, their aliases and key metrics."""
    from pricelevel.registry import list_versions
    from pricelevel.tracking import mlflow_client

    cfg = _load(config, set_)
    name = cfg.tracking.registered_model
    metric = f"best_{cfg.tuning.metric}"
    versions = list_versions(mlflow_client(cfg.tracking), name, metric=metric)
    if json_out:
        from pricelevel.store import atomic_write

        atomic_write(json_out, lambda tmp: Path(tmp).write_text(json.dumps(versions, indent=2, default=str)))
    table = Table(title=f"registered model {name} ({cfg.tracking.tracking_uri})")
    for column in ("version", "aliases", "created", metric, "test PR-AUC", "backtest return", "sharpe", "promotion"):
        table.add_column(column)
    for v in versions:
        m = v.get("metrics", {})
        table.add_row(
            str(v["version"]), ",".join(v.get("aliases", [])) or "-", _short(v.get("created")),
            _num(m.get(metric)), _num(m.get("test_pr_auc")), _num(m.get("backtest_total_return"), pct=True),
            _num(m.get("backtest_sharpe")), v.get("tags", {}).get("promotion.decision", "-"),
        )
    _console().print(table)
    if not versions:
        _console().print("no versions yet: run `pricelevel train`")
    if json_out:
        _console().print(f"json: {json_out}")


def _num(value: object, pct: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:+.2%}" if pct else f"{value:.4f}"


@app.command()
def ui(
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port.")] = 5000,
    config: ConfigOption = None,
    set_: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1; Ctrl-C stops both, leaving nothing behind."""
    from pricelevel.services import run_services, ui_commands

    cfg = _load(config, set_)
    commands = ui_commands(Path(sys.executable).parent, cfg.tracking, prefect_port, mlflow_port)
    for service in commands:
        _console().print(f"{service.name}: {service.url}")
    _console().print("Ctrl-C stops both.")
    run_services(commands, env=dict(os.environ), cwd=project_root())


def _print_metrics(metrics, title: str) -> None:
    """Metrics down, portfolio and symbols across (ten symbols still fit a terminal)."""
    from pricelevel.backtest.metrics import METRIC_LABELS, format_metric

    frame = metrics.table()
    table = Table(title=title)
    table.add_column("metric")
    for label in frame.index:
        table.add_column(str(label), justify="right")
    for name, label_text in METRIC_LABELS.items():
        table.add_row(label_text, *(format_metric(name, frame.at[label, name]) for label in frame.index))
    _console().print(table)


# --------------------------------------------------------------------------------------------- entry point


_HINTS = {
    "ConfigError": "check the key in conf/base.yaml, your --config file, PRICELEVEL_* variables and --set",
    "UsageError": "see `pricelevel --help`",
    "DataValidationError": "inspect the report; the validated store was left unchanged",
    "IngestFailed": "see the validation reports and the Prefect run logs; the validated store kept its last good data",
    "SourceError": "check the network/endpoint (bybit.endpoint) and rerun: what was fetched is kept",
    "MissingSecretError": "export the variable in your shell or your scheduler's environment",
    "MarketDataError": "check the candle/signal files' columns and timestamps (see `pricelevel backtest --help`)",
    "CandleFolderError": "the folder needs SYMBOL_TF.parquet files (the layout of data/sample)",
    "ModelNotFoundError": "run `pricelevel train` (registers @challenger) and `pricelevel promote` (sets @champion)",
    "NothingToRollBackError": "`pricelevel models` shows the versions and their aliases",
    "ValueError": "rerun with --debug for the traceback",
}


def main(argv: list[str] | None = None) -> int:
    """Console entry point: quiet offline defaults, secret redaction, one-line errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    with contextlib.suppress(FileNotFoundError):  # outside a checkout: no project defaults to apply
        apply_quiet_environment(project_root())
    secrets = Secrets.from_env(os.environ)
    install_log_redaction(secrets)
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
        first = redact(str(exc), secrets).strip() or name
        print(f"error: {first}", file=sys.stderr)
        hint = _HINTS.get(name, "rerun with --debug for the traceback")
        print(f"hint: {hint}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError | UsageError | MissingSecretError) else 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
