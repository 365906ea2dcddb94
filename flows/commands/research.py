"""Research commands: ``backtest``, ``levels``, ``features``, ``check lookahead``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import UsageError, console, relative, session, split, table, timeframe, timestamp

check_app = typer.Typer(no_args_is_help=True, help="Research-integrity checks.")
DataOption = Annotated[Path, typer.Option(help="Folder of SYMBOL_TF.parquet candles (with the longer timeframes it reads).")]
SymbolOption = Annotated[str, typer.Option(help="e.g. BTCUSDT")]
TimeframeOption = Annotated[str, typer.Option("--timeframe", help="The bars' timeframe: 1d, 4h, 1h, 15m, 1m.")]


def backtest(
    ctx: typer.Context,
    candles: Annotated[Path | None, typer.Option(help="Parquet: timestamp, open, high, low, close[, volume][, symbol].")] = None,
    signals: Annotated[Path | None, typer.Option(help="Parquet: timestamp, entry, exit[, symbol] (booleans), or timestamp, probability.")] = None,
    model: Annotated[str | None, typer.Option(help="A registered model, e.g. models:/pricelevel@champion (with --data).")] = None,
    data: Annotated[Path | None, typer.Option(help="Folder of SYMBOL_TF.parquet candles to score --model on.")] = None,
    start: Annotated[str | None, typer.Option(help="With --model: trade from this UTC time on.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics and every trade here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the HTML summary here (+ one page per symbol).")] = None,
) -> None:
    """Backtest signals on candles with the rules in `backtest.*`, or a registered model on a data folder with
    the rules stored in the model (a `--set backtest.<rule>=...` overrides one, and says so). Either way under
    the trader's account protections from `risk:` (max positions, drawdown halt, daily loss limit, cool-down;
    `--set backtest.protections=null` switches them off)."""
    from pricelevel.backtest.config import with_protections
    from pricelevel.backtest.files import backtest_files

    state = session(ctx)
    cfg = state.config()
    # The protections simulated are the trader's: taken from risk: (the same defaults when it is not set).
    costs = with_protections(cfg.backtest, cfg.risk)
    levels = None
    if model is not None:
        if data is None or candles is not None or signals is not None:
            raise UsageError("--model needs --data DIR (and no --candles/--signals)")
        from pricelevel.config import explicit_settings
        from pricelevel.data.folder import CandleFolder
        from pricelevel.inference.scoring import backtest_model, model_rules
        from pricelevel.registry.tracking import load_model, mlflow_client
        from pricelevel.strategy.rules import RULE_KEYS

        loaded = load_model(model, mlflow_client(cfg.tracking))
        chosen = {k: v for k, v in explicit_settings("backtest.", state.config_file, state.overrides).items() if k in RULE_KEYS}
        rules = model_rules(loaded.spec, chosen)
        console().print(f"rules stored with {model} (version {loaded.version}): {loaded.spec.strategy_rules().describe()}")
        if chosen:
            console().print(f"[yellow]overridden[/yellow] by you: {chosen} -> {rules.describe()}")
        traded = backtest_model(loaded.predict, loaded.spec, CandleFolder.open(data), costs, rules, timestamp(start))
        result, metrics, levels = traded.result, traded.metrics, traded.levels
        what = f"{model} (version {loaded.version}) on {data}"
    elif candles is None or signals is None:
        raise UsageError("give --candles and --signals, or --model and --data")
    else:
        result, metrics = backtest_files(candles, signals, costs)
        what = "backtest"
    show_backtest(what, result, metrics, json_out, report, levels)


def show_backtest(what: str, result, metrics, json_out: Path | None, report: Path | None, levels=None) -> None:
    """The metrics table, the refused entries, and the JSON / HTML files asked for (`backtest`, `trade --replay`)."""
    from pricelevel.backtest.files import write_result_json
    from pricelevel.backtest.metrics import METRIC_LABELS, format_metric

    market, frame = result.market, metrics.table()
    title = (f"{what}: {', '.join(market.symbols)} {market.timeframe} {market.timestamps[0]:%Y-%m-%d} .. "
             f"{market.timestamps[-1]:%Y-%m-%d} ({market.n_bars} bars)")
    rows = ([label, *(format_metric(name, frame.at[s, name]) for s in frame.index)] for name, label in METRIC_LABELS.items())
    console().print(table(title, ["metric", *map(str, frame.index)], rows, justify="right"))
    if any(result.rejected.values()):
        console().print("rejected entries: " + ", ".join(f"{k} {v}" for k, v in result.rejected.items() if v))
    if any(result.refused.values()):
        console().print("refused by the risk limits: " + ", ".join(f"{k} {v}" for k, v in result.refused.items() if v))
    if json_out:
        console().print(f"json: {write_result_json(result, metrics, json_out)}")
    if report:
        from pricelevel.backtest.report import write_report

        pages = write_report(result, metrics, report, levels=levels)
        console().print(f"report: {pages[0]} (+{len(pages) - 1} files)")


def levels(
    ctx: typer.Context,
    data: DataOption,
    symbol: SymbolOption,
    timeframe_: TimeframeOption,
    asof: Annotated[str, typer.Option(help="UTC time: only candles closed by then are used.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the levels here.")],
    raw: Annotated[bool, typer.Option("--raw", help="Before the multi-timeframe filter.")] = False,
) -> None:
    """Write the support/resistance levels in force at --asof (walk-forward: nothing after it is read)."""
    from pricelevel.core.files import write_text
    from pricelevel.data.folder import CandleFolder
    from pricelevel.levels.history import levels_document

    tf, when = timeframe(timeframe_), timestamp(asof)
    found, document = levels_document(CandleFolder.open(data), symbol, tf, when, session(ctx).config().levels, raw)
    write_text(json_out, json.dumps(document, indent=2))
    columns = ("price", "n_extrema", "touches", "age_days", "volume_ratio")
    rows = ([f"{v:.6g}" if isinstance(v, float) else v for v in (getattr(r, c) for c in columns)] for r in found.itertuples())
    console().print(table(f"{symbol} {tf} levels in force at {when:%Y-%m-%d %H:%M} UTC{' (raw)' if raw else ''}",
                          columns, rows, justify="right"))
    console().print(f"json: {json_out}")


def features(
    ctx: typer.Context,
    data: DataOption,
    symbol: SymbolOption,
    timeframe_: TimeframeOption,
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
) -> None:
    """Write the timestamped feature and label table training uses (levels, labels and features per conf)."""
    from pricelevel.core.files import atomic_write
    from pricelevel.data.folder import CandleFolder
    from pricelevel.features.tables import TableSpec

    cfg = session(ctx).config()
    spec = TableSpec(timeframe(timeframe_), cfg.levels, cfg.labels, cfg.features)
    history, frame = spec.build_for(CandleFolder.open(data), symbol)
    atomic_write(out, lambda tmp: frame.to_parquet(tmp, index=False))
    labelled, ready = frame["target"].notna(), frame.filter(like="feature_").notna().all(axis=1)
    console().print(
        f"{symbol} {spec.timeframe}: {len(frame)} rows, {len(spec.columns)} features (set {cfg.features.set!r}, complete "
        f"from row {int(ready.to_numpy().argmax()) if ready.any() else '-'}), {len(history.refits)} level refits; "
        f"{cfg.labels.kind} target on {int(labelled.sum())} rows, {100 * frame.loc[labelled, 'target'].mean():.2f}% positive"
    )
    console().print(f"parquet: {out}")


@check_app.command("lookahead")
def check_lookahead(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Candle folder; default: the validated store, else the bundled sample.")] = None,
    symbols: Annotated[list[str] | None, typer.Option(help="Symbols (repeat or comma-separate); default: the training symbols.")] = None,
    cuts: Annotated[int | None, typer.Option(help="Cut points per symbol; default: lookahead.cuts.")] = None,
    timeframe_: Annotated[str | None, typer.Option("--timeframe", help="Rows' timeframe; default: dataset.timeframe.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report here.")] = None,
) -> None:
    """Recompute features and labels on data cut at K points and compare with the full data: exit 1 on any change."""
    from pricelevel.data.folder import CandleFolder
    from pricelevel.data.store import Layer
    from pricelevel.features.lookahead import check_folder, report_lines
    from pricelevel.features.tables import TableSpec

    cfg = session(ctx).config()
    spec = TableSpec(timeframe(timeframe_) if timeframe_ else cfg.dataset.timeframe, cfg.levels, cfg.labels, cfg.features)
    if data is None:
        validated = cfg.catalogue.layer_dir(Layer.VALIDATED)
        data = validated if any(validated.glob("*.parquet")) else cfg.data.sample_dir
    folder = CandleFolder.open(data)
    wanted = split(symbols) or [s for s in cfg.training_symbols if folder.has(s, spec.timeframe)]
    if not wanted:
        raise UsageError(f"{data}: none of {', '.join(cfg.training_symbols)} has {spec.timeframe} candles; pass --symbols")
    count = cuts if cuts is not None else cfg.lookahead.cuts
    if count < 1:
        raise UsageError(f"--cuts must be >= 1, got {count}")
    console().print(f"checking {len(wanted)} symbol(s) at {spec.timeframe} in {relative(data)}: {count} cuts each, feature set "
                    f"{cfg.features.set!r}, label {cfg.labels.kind} (horizon {cfg.labels.horizon})")
    report = check_folder(folder, wanted, spec, count)
    for line in report_lines(report):
        console().print(line, markup=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.summary(), indent=2))
    if not report.ok:
        raise typer.Exit(1)
