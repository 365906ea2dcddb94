"""The whole loop, backtested: retrain, promote and trade as the nightly pipeline will, step by step.

At each step time ``T`` (``start``, ``start + every``, ... before the data's end):

1. **Cut**: every candle file of the training symbols is cut to the candles closed by ``T`` (open time +
   timeframe <= ``T``) and written to a folder of its own; nothing later is read at that step.
2. **Retrain** on that folder with the training pipeline's library steps (levels, features and labels,
   dataset, Optuna study, final fit of every fold with its rules chosen on validation, deflated Sharpe), in a
   throwaway work area under the output folder (derived store, Optuna database; no MLflow).
3. **Promote**: the new model (challenger) and the current champion are scored on the newest
   ``promotion.window_days`` of that folder by :func:`pricelevel.inference.contest.score_contest` and judged by
   :func:`pricelevel.registry.gate.judge`, the promotion flow's own functions.
4. **Trade** the champion from ``T`` to the next step with its own rules: the backtest engine's state (cash,
   positions, their stops and time stops, pending orders) carries over from one step to the next, as the paper
   trader keeps its positions through a champion switch; a segment's probabilities come from the folder cut at
   the segment's end, so they are what the trader would have computed bar by bar (features are causal: the
   look-ahead check). Before the first promotion the account holds cash.

Beside it, over the same bars and costs: cash, equal-weight buy-and-hold, and the controls of
:mod:`pricelevel.backtest.baselines` (the level rule with the parameters each step's training chose on
validation; the volatility control when the module has one), each traded segment by segment with the previous
segment's final equity as its cash (a position open at a step boundary is valued at that close).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.backtest import baselines
from pricelevel.backtest.engine import REJECT_LABELS, TRADE_FIELDS, EngineState, open_trades, step
from pricelevel.backtest.market import Market, market_from_candles
from pricelevel.backtest.protections import REFUSAL_LABELS
from pricelevel.backtest.run import BacktestResult, engine_params, trades_frame
from pricelevel.backtest.trading import (
    TradingScore,
    probability_matrix,
    rules_of,
    score_result,
    with_rules,
)
from pricelevel.config import Config
from pricelevel.core.config import Frozen, UtcDatetime
from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.folder import CandleFolder
from pricelevel.features.tables import features_step
from pricelevel.inference.contest import Contender, Contest, score_contest
from pricelevel.inference.scoring import Predict, predict_tables, tables_for_spec
from pricelevel.levels.history import levels_step
from pricelevel.ml.artifacts import SPEC, WEIGHTS, FoldModel, TrainedModel
from pricelevel.ml.dataset import SymbolTable, dataset_step
from pricelevel.ml.deflation import METRIC as DEFLATED_SHARPE
from pricelevel.ml.deflation import run_deflated_sharpe
from pricelevel.ml.spec import ModelSpec
from pricelevel.ml.tuning import tune_step
from pricelevel.ml.walkforward import train_step
from pricelevel.registry.experiment import training_keys
from pricelevel.registry.gate import judge
from pricelevel.registry.promotion import Decision
from pricelevel.registry.tracking import PriceLevelPyfunc
from pricelevel.strategy.rules import StrategyRules


class RollingConfig(Frozen):
    """When the loop runs: the first step, the time between steps, and where the replay ends (``None``: the
    data's end)."""

    start: UtcDatetime
    every: timedelta
    end: UtcDatetime | None = None
    #: Keep each step's cut candle folder (to inspect what a step saw); off: deleted once the step is done.
    keep_candles: bool = False


@dataclass(frozen=True)
class Model:
    """A model the loop trained: how it predicts, its spec (inputs and rules), its name in the replay."""

    name: str
    predict: Predict
    spec: ModelSpec

    @classmethod
    def load(cls, name: str, fold: FoldModel) -> Model:
        """The registered pyfunc's own predict path, loaded from the fold's files (no MLflow store)."""
        pyfunc = PriceLevelPyfunc()
        pyfunc.load_context(SimpleNamespace(artifacts={"spec": str(fold.folder / SPEC), "weights": str(fold.folder / WEIGHTS)}))

        def predict(features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
            return np.asarray(pyfunc.predict(None, {"features": features, "symbol_id": symbol_id}))

        return cls(name, predict, pyfunc.spec)

    def contender(self) -> Contender:
        return Contender(self.predict, self.spec, self.name)


@dataclass(frozen=True)
class StepOutcome:
    """What one step decided, and on what."""

    index: int
    at: pd.Timestamp
    last_candle: pd.Timestamp
    challenger: str
    champion_before: str | None
    champion_after: str | None
    decision: Decision
    contest: Contest
    deflated_sharpe: float | None
    study: dict[str, Any]
    trained_seconds: float

    def to_dict(self, metric: str, trading_metric: str) -> dict[str, Any]:
        def score(s: Any) -> dict[str, Any] | None:
            return None if s is None else {
                "version": s.version, metric: s.metric, "classification": s.classification,
                "trading": s.trading.to_dict(), "rules": s.rules}

        return {
            "step": self.index, "at": str(self.at), "trained_on_candles_to": str(self.last_candle),
            "challenger": self.challenger, "champion_before": self.champion_before, "champion_after": self.champion_after,
            "decision": "promoted" if self.decision.promote else "rejected", "reason": self.decision.reason,
            "details": self.decision.details, "deflated_sharpe": self.deflated_sharpe,
            "window": {"start": str(self.contest.start), "end": str(self.contest.end), "rows": self.contest.rows,
                       "bars": self.contest.bars},
            "scores": {"challenger": score(self.contest.challenger), "champion": score(self.contest.champion)},
            "baselines": {name: s.to_dict() for name, s in self.contest.strategy_baselines.items()},
            "classifier_baselines": self.contest.classifier_baselines,
            "study": self.study, "trained_seconds": self.trained_seconds,
        }


@dataclass(frozen=True)
class Segment:
    """The bars ``[start, end)`` traded by the champion chosen at a step."""

    step: int
    start: pd.Timestamp
    end: pd.Timestamp
    champion: str | None
    equity_start: float
    equity_end: float
    trades: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "start": str(self.start), "end": str(self.end), "champion": self.champion,
                "equity_start": self.equity_start, "equity_end": self.equity_end,
                "return": self.equity_end / self.equity_start - 1.0, "trades": self.trades}


@dataclass(frozen=True)
class RollingResult:
    steps: list[StepOutcome]
    segments: list[Segment]
    #: The loop's chained result over every segment (equity, trades), as one backtest.
    loop: BacktestResult
    #: Equity curves on the loop's bars: ``rolling`` (the loop), ``cash``, ``buy_and_hold``, each control.
    curves: pd.DataFrame
    scores: dict[str, TradingScore]
    settings: dict[str, Any] = field(default_factory=dict)


def step_times(first_close: pd.Timestamp, data_end: pd.Timestamp, rolling: RollingConfig) -> list[pd.Timestamp]:
    """``start, start + every, ...`` strictly before the replay's end; a step needs candles before it."""
    every = pd.Timedelta(rolling.every)
    if every <= pd.Timedelta(0):
        raise ValueError(f"every must be positive, got {every}")
    end = replay_end(data_end, rolling)
    times = list(pd.date_range(pd.Timestamp(rolling.start), end, freq=every, inclusive="left"))
    if not times or times[0] <= first_close:
        raise ValueError(f"no step between {rolling.start} and {end} after the first candles ({first_close})")
    return times


def replay_end(data_end: pd.Timestamp, rolling: RollingConfig) -> pd.Timestamp:
    return min(pd.Timestamp(rolling.end), data_end) if rolling.end is not None else data_end


def cut_folder(source: CandleFolder, symbols: tuple[str, ...], at: pd.Timestamp, out: Path) -> CandleFolder:
    """The candles of ``symbols`` (every timeframe) closed by ``at``, as a folder: what existed at ``at``."""
    out.mkdir(parents=True, exist_ok=True)
    for (symbol, timeframe), path in source.files.items():
        if symbol in symbols:
            frame = source.read(symbol, timeframe)
            frame[frame["timestamp"] + Timeframe(timeframe).delta <= at].to_parquet(out / path.name, index=False)
    return CandleFolder.open(out)


def retrain(config: Config, folder: CandleFolder, work: DataCatalogue) -> tuple[TrainedModel, dict[str, Any], float | None]:
    """The training flow's library steps on ``folder`` alone: ``(trained model, study summary, deflated
    Sharpe or None when the gate does not ask for it)``. The flow's tasks wrap these same calls."""
    derived, timeframe = work.derived, config.dataset.timeframe
    levels = [levels_step(folder, derived, s, timeframe, config.levels) for s in config.training_symbols]
    tables = [features_step(folder, derived, lv, config.table_spec) for lv in levels]
    plan = dataset_step(tables, levels, config.table_spec, config.dataset, config.tuning.space.seq_len,
                        config.evaluation.folds)
    keys = training_keys(plan, config.model_inputs, config.tuning, config.strategy)
    storage, trials = work.tuning_places(None)
    study = tune_step(plan, config.model_inputs, config.tuning, config.strategy, storage, trials, None)
    trained = train_step(plan, config.model_inputs, config.tuning, study.best_params, keys.model, config.strategy,
                         derived, None)
    deflated = None
    if config.promotion.min_deflated_sharpe > 0:
        _, metrics = run_deflated_sharpe(plan, trained, study.trials_complete, config.strategy)
        deflated = float(metrics[DEFLATED_SHARPE])
    summary = {"best_params": study.best_params, "best_value": study.best_value, "trials": study.trials_complete,
               "model_key": trained.key}
    return trained, summary, deflated


def decide_step(config: Config, challenger: Model, champion: Model | None, folder: CandleFolder,
                deflated: float | None) -> tuple[Contest, Decision]:
    """The promotion flow's scoring and rule on the cut folder (challenger vs champion, the hurdle)."""
    contest = score_contest(challenger.contender(), champion.contender() if champion else None, folder,
                            config.promotion.window_days, config.tuning.metric, config.backtest, rules_of(config.backtest))
    decision = judge(contest, config.promotion, config.tuning.metric, config.tuning.direction, config.selection.metric,
                     deflated)
    return contest, decision


class ChainedAccount:
    """One engine state traded segment after segment, each with the champion of its step and its rules."""

    def __init__(self, market: Market, costs: Any) -> None:
        self.market, self.costs = market, costs
        self.state = EngineState.initial(len(market.symbols), costs.init_cash)
        self.equity: list[np.ndarray] = []
        self.trades: list[dict[str, np.ndarray]] = []

    @property
    def value(self) -> float:
        filled = [part for part in self.equity if len(part)]
        return float(filled[-1][-1]) if filled else float(self.costs.init_cash)

    def trade(self, rows: slice, probability: np.ndarray | None, rules: StrategyRules) -> int:
        """Trade bars ``rows`` of the market: ``probability`` under ``rules`` (``None``: no entries)."""
        m = self.market
        shape = m.close[rows].shape
        if probability is None:
            entries, exits = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
        else:
            entries, exits = rules.signals(probability)
        config = with_rules(self.costs, rules)
        chunk = step(self.state, engine_params(config), m.open[rows], m.high[rows], m.low[rows], m.close[rows],
                     entries, exits, times=utc_ns(m.timestamps[rows]), bar_ns=(config.timeframe or m.timeframe).nanoseconds)
        self.equity.append(chunk.equity)
        self.trades.append(chunk.trades)
        return len(chunk.trades["entry_bar"])

    def result(self) -> BacktestResult:
        parts = [*self.trades, open_trades(self.state)]
        columns = {name: np.concatenate([p[name] for p in parts]) for name in TRADE_FIELDS}
        protections = self.costs.protections is not None
        return BacktestResult(
            market=self.market, config=self.costs,
            equity=pd.Series(np.concatenate(self.equity), index=self.market.timestamps, name="equity"),
            trades=trades_frame(columns, self.market),
            rejected={label: int(n) for label, n in zip(REJECT_LABELS, self.state.rejected, strict=True)},
            refused={label: int(n) for label, n in zip(REFUSAL_LABELS, self.state.refused, strict=True)} if protections else {},
        )


def rows_between(market: Market, start: pd.Timestamp, end: pd.Timestamp) -> slice:
    first, last = market.timestamps.searchsorted(start), market.timestamps.searchsorted(end)
    return slice(int(first), int(last))


def sub_market(market: Market, rows: slice) -> Market:
    return Market(market.timestamps[rows], market.symbols, market.open[rows], market.high[rows], market.low[rows],
                  market.close[rows], market.timeframe)


def control_curves(market: Market, tables: dict[str, SymbolTable], chosen: dict[str, Any], costs: Any,
                   cash: dict[str, float]) -> dict[str, pd.Series]:
    """The no-model controls on one segment, each from its own ``cash``, with the parameters the step's training
    chose on validation (``chosen``: the new model's ``spec.extra``): the level rule, and the volatility control
    when the model stores its rules."""
    candles = {s: t.candles for s, t in tables.items()}
    history = {s: t.history for s, t in tables.items()}
    sizing = rules_of(costs)

    def funded(name: str) -> Any:
        return costs.model_copy(update={"init_cash": cash.get(name, float(costs.init_cash))})

    level = baselines.LevelRule.model_validate(chosen["level_rule"])
    curves = {"level_rule": baselines.trade_level_rule(market, candles, history, level, funded("level_rule"), sizing).equity}
    volatility = baselines.volatility_rules_of(chosen)
    if volatility is not None:
        curves["volatility"] = baselines.trade_volatility(market, candles, volatility, funded("volatility")).equity
    return curves


def rolling_backtest(
    config: Config, source: CandleFolder, rolling: RollingConfig, out: Path,
    log: Callable[[str], None] = lambda line: None, clock: Callable[[], float] | None = None,
) -> RollingResult:
    """Replay the loop over ``source`` (see the module docstring); the work area is ``out/work``."""
    import time

    clock = clock or time.monotonic
    symbols, timeframe, costs = config.training_symbols, config.dataset.timeframe, config.backtest
    source.require(symbols, [timeframe])
    candles = pd.concat([source.read(s, timeframe).assign(symbol=s) for s in symbols], ignore_index=True)
    closes = candles["timestamp"] + Timeframe(timeframe).delta
    data_end = closes.max()
    times = step_times(closes.min(), data_end, rolling)
    end = replay_end(data_end, rolling)
    span = candles[(candles["timestamp"] >= times[0]) & (closes <= end)]
    market = market_from_candles(span, timeframe=costs.timeframe or Timeframe(timeframe))
    account = ChainedAccount(market, costs)
    chained: dict[str, float] = {}
    control_parts: dict[str, list[pd.Series]] = {}
    work = DataCatalogue(out / "work", "rolling")

    steps: list[StepOutcome] = []
    segments: list[Segment] = []
    champion: Model | None = None
    newest: Model | None = None  # the latest step's model: its spec builds the tables, its extra the controls
    bounds = [*times, end]
    for index, at in enumerate(bounds):
        folder = cut_folder(source, symbols, at, out / "candles" / f"{at:%Y%m%dT%H%M}")
        if index > 0 and newest is not None:  # trade the segment that ends here with the champion of its step
            segments.append(trade_segment(account, champion, newest, folder, bounds[index - 1], at, index - 1,
                                          chained, control_parts))
        if index < len(times):
            started = clock()
            trained, study, deflated = retrain(config, folder, work)
            newest = Model.load(f"step-{index}", trained.newest)
            contest, decision = decide_step(config, newest, champion, folder, deflated)
            before, champion = champion, (newest if decision.promote else champion)
            steps.append(StepOutcome(index, at, folder_last_candle(folder, symbols, timeframe), newest.name,
                                     before.name if before else None, champion.name if champion else None, decision,
                                     contest, deflated, study, clock() - started))
            log(f"step {index} at {at:%Y-%m-%d}: {'PROMOTED' if decision.promote else 'not promoted'} {newest.name}: "
                f"{decision.reason}; champion {champion.name if champion else 'none'} ({clock() - started:.0f} s)")
        if not rolling.keep_candles:
            shutil.rmtree(folder.root, ignore_errors=True)

    loop = account.result()
    hold = baselines.buy_and_hold(market, costs)
    curves = pd.DataFrame({"rolling": loop.equity, "cash": float(costs.init_cash), "buy_and_hold": hold.equity})
    for name, parts in control_parts.items():
        curves[name] = pd.concat(parts).reindex(market.timestamps)
    scores = {"rolling": score_result(loop), "cash": TradingScore.cash(), "buy_and_hold": score_result(hold)}
    for name in control_parts:
        scores[name] = curve_score(curves[name], market, costs)
    settings = {"start": str(times[0]), "every": str(rolling.every), "end": str(end), "steps": len(times),
                "symbols": list(symbols), "timeframe": str(timeframe), "window_days": config.promotion.window_days,
                "hurdle": list(config.promotion.hurdle)}
    return RollingResult(steps, segments, loop, curves, scores, settings)


def trade_segment(
    account: ChainedAccount, champion: Model | None, newest: Model, folder: CandleFolder, start: pd.Timestamp,
    end: pd.Timestamp, index: int, chained: dict[str, float], control_parts: dict[str, list[pd.Series]],
) -> Segment:
    """Bars ``[start, end)`` traded by ``champion`` (none: no entries) on ``folder`` (the candles closed by
    ``end``), and the controls with the parameters of ``newest`` (the step's new model) on the same bars."""
    market = account.market
    rows = rows_between(market, start, end)
    segment_market = sub_market(market, rows)
    tables = tables_for_spec(folder, (champion or newest).spec, market.symbols)
    value = account.value
    if champion is None:
        n = account.trade(rows, None, rules_of(account.costs))
    else:
        scored = predict_tables(champion.predict, champion.spec, tables, since=start)
        n = account.trade(rows, probability_matrix(segment_market, scored), champion.spec.strategy_rules())
    costs = account.costs
    for name, curve in control_curves(segment_market, tables, newest.spec.extra, costs, chained).items():
        control_parts.setdefault(name, []).append(curve)
        chained[name] = float(curve.iloc[-1]) if len(curve) else chained.get(name, float(costs.init_cash))
    return Segment(index, start, end, champion.name if champion else None, value, account.value, n)


def curve_score(equity: pd.Series, market: Market, costs: Any) -> TradingScore:
    """Sharpe, return and drawdown of a chained curve (trade counts are per segment, not kept here)."""
    from pricelevel.backtest.metrics import curve_metrics

    bars_per_year = (costs.timeframe or market.timeframe).bars_per_year
    m = curve_metrics(equity.to_numpy(dtype=np.float64), costs.init_cash, bars_per_year, market.timeframe.delta)
    return TradingScore(m["sharpe"], m["sortino"], m["calmar"], m["total_return"], m["max_drawdown"], 0, math.nan,
                        math.nan, math.nan)


def folder_last_candle(folder: CandleFolder, symbols: tuple[str, ...], timeframe: Timeframe) -> pd.Timestamp:
    return max(folder.read(s, timeframe)["timestamp"].max() for s in symbols)
