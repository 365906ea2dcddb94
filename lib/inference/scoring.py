"""Score a trained model on candles it has never seen, exactly as it was trained: the one inference path.

Levels, labels and features are recomputed from the given data alone with the settings stored in the model's
:class:`~pricelevel.ml.spec.ModelSpec`; every bar with ``seq_len`` bars of history gets a probability. The
backtest (``pricelevel backtest --model``), the promotion flow and the live trader all go through here, and
turn probabilities into orders with :func:`pricelevel.strategy.signals.signals_from_probability`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.files import write_result_json
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.metrics import BacktestMetrics, compute_metrics
from pricelevel.backtest.run import BacktestResult
from pricelevel.backtest.trading import probability_matrix, trade_probabilities
from pricelevel.core.cache import DerivedStore, code_fingerprint, step_key
from pricelevel.core.runlog import RunLog
from pricelevel.data.folder import CandleFolder, CandleFolderError
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.dataset import (
    DatasetPlan,
    SymbolFrame,
    SymbolTable,
    build_windows,
    labels_at,
    symbol_table,
)
from pricelevel.ml.spec import ModelSpec
from pricelevel.strategy.rules import StrategyRules

#: ``predict(features [B, T, F] float32, symbol_id [B] int64) -> probabilities [B]``
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


def tables_for_spec(folder: CandleFolder, spec: ModelSpec, symbols: Sequence[str] | None = None) -> dict[str, SymbolTable]:
    """Levels, features and labels of every symbol in ``folder`` that has candles of the model's timeframe."""
    table_spec = spec.table_spec()
    timeframe = table_spec.timeframe
    wanted = list(symbols) if symbols else [s for s in folder.symbols if folder.has(s, timeframe)]
    if not wanted:
        raise CandleFolderError(f"{folder.root}: no {timeframe} candle files (the model reads {timeframe})")
    tables = {}
    for symbol in wanted:
        history, table = table_spec.build(table_spec.read_frames(folder, symbol))
        tables[symbol] = symbol_table(symbol, table, history, spec.features)
    return tables


def predict_tables(
    predict: Predict, spec: ModelSpec, tables: Mapping[str, SymbolTable], batch_size: int = 2048,
    since: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """One row per bar that has a full window (ending at ``since`` or later, when given: the trader scores
    only the bar that just closed): ``timestamp, symbol, probability, near_level, target``."""
    frames = [tables[s].frame for s in sorted(tables)]
    windows = build_windows(
        frames, spec.normalization, {s: spec.symbol_id(s) for s in tables}, spec.seq_len,
        start=None, end=None, require_target=False,
    )
    if since is not None:
        keep = np.array([windows.timestamps[f][end] >= since for f, end in windows.index], dtype=bool)
        windows.index = windows.index[keep]
    probability = np.empty(len(windows), dtype=np.float64)
    for f, array in enumerate(windows.arrays):
        positions = np.flatnonzero(windows.index[:, 0] == f)
        # (n - seq_len + 1, F, seq_len) strided view: a batch is gathered from it without per-window copies.
        view = np.lib.stride_tricks.sliding_window_view(array, spec.seq_len, axis=0)
        for first in range(0, len(positions), batch_size):
            chunk = positions[first:first + batch_size]
            starts = windows.index[chunk, 1] - spec.seq_len + 1
            features = np.ascontiguousarray(view[starts].transpose(0, 2, 1))
            symbol_id = np.full(len(chunk), windows.symbol_ids[f], dtype=np.int64)
            probability[chunk] = predict(features, symbol_id)
    rows = windows.ends()
    rows["probability"] = probability
    rows["near_level"] = labels_at(tables, rows, "near_level")
    rows["target"] = labels_at(tables, rows, "target")
    return rows.sort_values(["timestamp", "symbol"], kind="stable").reset_index(drop=True)


def predict_at(predict: Predict, spec: ModelSpec, frames: Sequence[SymbolFrame], at: pd.Timestamp) -> dict[str, float]:
    """The probability of the window ending at ``at`` of every frame that has one (the bar that just closed, for
    the trader): the windows :func:`predict_tables` scores (same normalisation, same completeness rule), in
    one call of the model instead of a frame of every window."""
    windows = build_windows(sorted(frames, key=lambda f: f.symbol), spec.normalization,
                            {f.symbol: spec.symbol_id(f.symbol) for f in frames}, spec.seq_len,
                            start=None, end=at, require_target=False)
    batch, ids, symbols = [], [], []
    for f, array in enumerate(windows.arrays):
        ends = windows.index[windows.index[:, 0] == f, 1]
        if len(ends) and windows.timestamps[f][ends[-1]] == at:
            batch.append(array[ends[-1] - spec.seq_len + 1 : ends[-1] + 1])
            ids.append(windows.symbol_ids[f])
            symbols.append(windows.symbols[f])
    if not batch:
        return {}
    probability = predict(np.ascontiguousarray(np.stack(batch)), np.asarray(ids, dtype=np.int64))
    return dict(zip(symbols, np.asarray(probability, dtype=np.float64).tolist(), strict=True))


@dataclass(frozen=True)
class ScoredBacktest:
    result: BacktestResult
    metrics: BacktestMetrics
    levels: dict[str, list[float]]
    rules: StrategyRules


def backtest_probabilities(
    tables: Mapping[str, SymbolTable],
    scored: pd.DataFrame,
    costs: BacktestConfig,
    rules: StrategyRules,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
) -> ScoredBacktest:
    """Trade the probabilities with ``rules`` (the shared signal path) and ``costs`` on the candles of
    ``[start, end]`` (either may be open)."""
    candles = pd.concat([t.candles.assign(symbol=s) for s, t in tables.items()], ignore_index=True)
    keep = pd.Series(True, index=candles.index)
    if start is not None:
        keep &= candles["timestamp"] >= start
    if end is not None:
        keep &= candles["timestamp"] <= end
    market = market_from_candles(candles[keep], timeframe=costs.timeframe)
    result = trade_probabilities(market, probability_matrix(market, scored), costs, rules)
    return ScoredBacktest(result, compute_metrics(result), levels_at_end(tables), rules)


def model_rules(spec: ModelSpec, overrides: Mapping[str, object] | None = None) -> StrategyRules:
    """The model's own decision rules, with the keys in ``overrides`` replaced (an explicit ``--set
    backtest.<rule>`` on the command line: printed by the caller, never taken from the base config)."""
    rules = spec.strategy_rules()
    return rules.model_copy(update=dict(overrides)) if overrides else rules


def backtest_model(
    predict: Predict, spec: ModelSpec, folder: CandleFolder, costs: BacktestConfig, rules: StrategyRules,
    start: pd.Timestamp | None = None,
) -> ScoredBacktest:
    """Score every bar of ``folder`` with the model (its own inputs, recomputed from that folder alone) and
    trade the probabilities from ``start`` on with ``rules`` (normally the model's own: :func:`model_rules`)."""
    tables = tables_for_spec(folder, spec)
    return backtest_probabilities(tables, predict_tables(predict, spec, tables), costs, rules, start=start)


def write_backtest(traded: ScoredBacktest, folder: Path) -> tuple[Path, Path]:
    """``report.html`` (+ one page per symbol) and ``backtest.json`` (metrics and every trade) in ``folder``."""
    from pricelevel.backtest.report import write_report

    pages = write_report(traded.result, traded.metrics, folder / "report.html", levels=traded.levels)
    return pages[0], write_result_json(traded.result, traded.metrics, folder / "backtest.json")


def backtest_step(
    plan: DatasetPlan, trained: TrainedModel, costs: BacktestConfig, derived: DerivedStore, run: RunLog | None
) -> dict[str, object]:
    """Trade the registered (newest fold's) model on its test segment with its own rules: report, JSON,
    metrics to ``run``. Kept under a key of the model, the costs and the backtest code (an engine fix trades
    again)."""
    key = step_key("backtest", model=trained.key, backtest=costs.model_dump(mode="json"), code=code_fingerprint(backtest_step))
    newest = trained.newest

    def write(out: Path) -> None:
        spec = newest.spec
        start = pd.Timestamp(spec.extra["test_start"])
        write_backtest(backtest_probabilities(plan.load(), newest.predictions("test"), costs, spec.strategy_rules(), start), out)

    out, _ = derived.build("backtests", key, write)
    portfolio = json.loads((out / "backtest.json").read_text())["metrics"]["portfolio"]
    metrics = {f"backtest_{k}": v for k, v in portfolio.items() if isinstance(v, int | float)}
    if run is not None:
        run.log_metrics(metrics)
        run.log_artifact(out, "backtest")
    return {"metrics": metrics, "report": str(out / "report.html"), "folder": str(out), "rules": newest.spec.rules}


def levels_at_end(tables: Mapping[str, SymbolTable]) -> dict[str, list[float]]:
    """The levels in force at each symbol's last bar (drawn on the report's charts)."""
    out = {}
    for symbol, table in tables.items():
        if len(table.history.refits):
            levels = table.history.levels
            in_force = levels["asof"] == table.history.refits[-1]
            out[symbol] = sorted(levels.loc[in_force, "price"].astype(float).tolist())
    return out


def newest_window(tables: Mapping[str, SymbolTable], days: float, not_before: pd.Timestamp | None) -> pd.Timestamp:
    """Start of the last ``days`` of data, never earlier than ``not_before`` (where the model's test began)."""
    end = max(t.candles["timestamp"].iloc[-1] for t in tables.values())
    start = end - pd.Timedelta(days=days)
    return max(start, not_before) if not_before is not None else start
