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

**Two champion policies**, replayed side by side on the same retrains (only the decisions and the traded
segments differ; each has its own account):

- ``kept`` (curve ``rolling``): the champion stays until a challenger beats it (``promotion.retire_after`` 0);
- ``retire`` (curve ``rolling_retire``): the champion is judged again on every step's window by the hurdle
  (:func:`pricelevel.registry.gate.champion_on_window`, the promotion flow's own rule) and retired after
  ``promotion.retire_after`` failures in a row (2 when that is 0): the account then opens no position until a
  model earns the champion again as a first champion must; the retired model keeps managing the positions it
  opened (their exits, its probability exits) as the live trader does.

Each policy's contest is scored against its own champion (once when both hold the same one).

Beside them, over the same bars and costs: cash, equal-weight buy-and-hold, and the controls of
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
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.experiment import training_keys
from pricelevel.registry.gate import champion_on_window, judge
from pricelevel.registry.model_baseline import window_hurdle
from pricelevel.registry.promotion import ChampionVerdict, Decision
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


#: The champion kept until a challenger beats it (never retired).
KEPT = "kept"
#: The champion retired after ``promotion.retire_after`` hurdle failures in a row.
RETIRE = "retire"
#: Used by the ``retire`` policy when ``promotion.retire_after`` is 0 (the config's default).
DEFAULT_RETIRE_AFTER = int(PromotionConfig.model_fields["retire_after"].default)


@dataclass(frozen=True)
class Policy:
    """How the loop treats a champion that fails the hurdle: ``retire_after`` failures in a row retire it (0:
    never). ``curve`` names its equity curve and scores."""

    name: str
    curve: str
    retire_after: int

    def describe(self) -> str:
        if self.retire_after == 0:
            return "the champion stays until a challenger beats it"
        return f"the champion is retired after {self.retire_after} hurdle failures in a row"


def policies_of(promotion: PromotionConfig) -> tuple[Policy, Policy]:
    """``kept`` and ``retire`` (``promotion.retire_after``; :data:`DEFAULT_RETIRE_AFTER` when that is 0)."""
    return (Policy(KEPT, "rolling", 0),
            Policy(RETIRE, "rolling_retire", promotion.retire_after or DEFAULT_RETIRE_AFTER))


@dataclass(frozen=True)
class PolicyStep:
    """One policy's decision at a step: the challenger against its champion, and the champion judged again."""

    policy: str
    champion_before: str | None
    champion_after: str | None
    decision: Decision
    contest: Contest
    #: The champion judged by the hurdle on the window (``None``: no champion before the step).
    verdict: ChampionVerdict | None
    #: The champion retired at this step (its positions are still managed), else ``None``.
    retired: str | None

    def to_dict(self, metric: str) -> dict[str, Any]:
        def score(s: Any) -> dict[str, Any] | None:
            return None if s is None else {
                "version": s.version, metric: s.metric, "classification": s.classification,
                "trading": s.trading.to_dict(), "rules": s.rules}

        verdict = None if self.verdict is None else {
            "passed": self.verdict.passed, "failures": self.verdict.failures, "retired": self.verdict.retired,
            "reason": self.verdict.reason}
        return {
            "champion_before": self.champion_before, "champion_after": self.champion_after,
            "decision": "promoted" if self.decision.promote else "rejected", "reason": self.decision.reason,
            "details": self.decision.details, "champion_verdict": verdict, "retired": self.retired,
            "scores": {"challenger": score(self.contest.challenger), "champion": score(self.contest.champion)},
        }


@dataclass(frozen=True)
class StepOutcome:
    """What one step decided under each policy, and on what. ``decision``, ``contest`` and the champions are
    the ``kept`` policy's (the first)."""

    index: int
    at: pd.Timestamp
    last_candle: pd.Timestamp
    challenger: str
    policies: dict[str, PolicyStep]
    deflated_sharpe: float | None
    study: dict[str, Any]
    trained_seconds: float

    @property
    def kept(self) -> PolicyStep:
        return next(iter(self.policies.values()))

    @property
    def decision(self) -> Decision:
        return self.kept.decision

    @property
    def contest(self) -> Contest:
        return self.kept.contest

    @property
    def champion_before(self) -> str | None:
        return self.kept.champion_before

    @property
    def champion_after(self) -> str | None:
        return self.kept.champion_after

    def to_dict(self, metric: str, trading_metric: str) -> dict[str, Any]:
        kept = self.kept.to_dict(metric)
        return {
            "step": self.index, "at": str(self.at), "trained_on_candles_to": str(self.last_candle),
            "challenger": self.challenger, **{k: v for k, v in kept.items() if k != "retired"},
            "deflated_sharpe": self.deflated_sharpe,
            "window": {"start": str(self.contest.start), "end": str(self.contest.end), "rows": self.contest.rows,
                       "bars": self.contest.bars},
            "baselines": {name: s.to_dict() for name, s in self.contest.strategy_baselines.items()},
            "classifier_baselines": self.contest.classifier_baselines,
            "policies": {name: p.to_dict(metric) for name, p in self.policies.items()},
            "study": self.study, "trained_seconds": self.trained_seconds,
        }


@dataclass(frozen=True)
class Segment:
    """The bars ``[start, end)`` traded under one policy by the champion chosen at a step (``managed_by``: no
    champion, a retired one still managing its open positions)."""

    step: int
    start: pd.Timestamp
    end: pd.Timestamp
    champion: str | None
    equity_start: float
    equity_end: float
    trades: int
    managed_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "start": str(self.start), "end": str(self.end), "champion": self.champion,
                "managed_by": self.managed_by, "equity_start": self.equity_start, "equity_end": self.equity_end,
                "return": self.equity_end / self.equity_start - 1.0, "trades": self.trades}


@dataclass(frozen=True)
class RollingResult:
    steps: list[StepOutcome]
    #: Each policy's segments, by policy name (``kept`` first).
    policy_segments: dict[str, list[Segment]]
    #: Each policy's chained result over every segment (equity, trades), as one backtest.
    loops: dict[str, BacktestResult]
    #: Equity curves on the loop's bars: one per policy (``rolling``, ``rolling_retire``), ``cash``,
    #: ``buy_and_hold``, each control.
    curves: pd.DataFrame
    scores: dict[str, TradingScore]
    policies: tuple[Policy, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def segments(self) -> list[Segment]:
        """The ``kept`` policy's segments."""
        return next(iter(self.policy_segments.values()))

    @property
    def loop(self) -> BacktestResult:
        """The ``kept`` policy's chained backtest."""
        return next(iter(self.loops.values()))


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


def window_promotion(promotion: PromotionConfig) -> PromotionConfig:
    """The gate's settings judged on the window: ``gbm`` is judged on the training run's MLflow metrics, which the
    replay does not log (as the promotion flow does, :func:`pricelevel.registry.model_baseline.window_hurdle`)."""
    return promotion.model_copy(update={"hurdle": window_hurdle(promotion.hurdle)})


def decide_step(config: Config, challenger: Model, champion: Model | None, folder: CandleFolder,
                deflated: float | None) -> tuple[Contest, Decision]:
    """The promotion flow's scoring and rule on the cut folder (challenger vs champion, the hurdle)."""
    contest = score_contest(challenger.contender(), champion.contender() if champion else None, folder,
                            config.promotion.window_days, config.tuning.metric, config.backtest, rules_of(config.backtest))
    decision = judge(contest, window_promotion(config.promotion), config.tuning.metric, config.tuning.direction,
                     config.selection.metric, deflated)
    return contest, decision


@dataclass
class PolicyState:
    """One policy's running state: its champion, the champion's hurdle failures in a row, the retired model that
    still manages the positions it opened, and its account."""

    policy: Policy
    account: ChainedAccount
    champion: Model | None = None
    failures: int = 0
    managing: Model | None = None
    segments: list[Segment] = field(default_factory=list)

    def decide(self, config: Config, newest: Model, contest: Contest, decision: Decision) -> PolicyStep:
        """Apply the step's decision and judge the champion again (:func:`champion_on_window`, the promotion
        flow's rule); a retired champion leaves the account without one (it still manages its positions)."""
        before, verdict, retired = self.champion, None, None
        if contest.champion is not None and before is not None:
            promotion = window_promotion(config.promotion).model_copy(update={"retire_after": self.policy.retire_after})
            verdict = champion_on_window(contest.champion, contest, promotion, config.selection.metric, self.failures,
                                         replaced_by=newest.name if decision.promote else None)
            self.failures = verdict.failures
        if decision.promote:
            self.champion, self.failures, self.managing = newest, 0, None
        elif verdict is not None and verdict.retired:
            retired = before.name if before else None
            self.champion, self.failures, self.managing = None, 0, before
        return PolicyStep(self.policy.name, before.name if before else None,
                          self.champion.name if self.champion else None, decision, contest, verdict, retired)


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

    def trade(self, rows: slice, probability: np.ndarray | None, rules: StrategyRules, entries_allowed: bool = True) -> int:
        """Trade bars ``rows`` of the market: ``probability`` under ``rules`` (``None``: no entries; without
        ``entries_allowed``, only the exits: a retired champion managing its open positions)."""
        m = self.market
        shape = m.close[rows].shape
        if probability is None:
            entries, exits = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
        else:
            entries, exits = rules.signals(probability)
            if not entries_allowed:
                entries = np.zeros(shape, dtype=bool)
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
    """Replay the loop over ``source`` under both policies (see the module docstring); the work area is
    ``out/work``."""
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
    policies = policies_of(config.promotion)
    states = [PolicyState(policy, ChainedAccount(market, costs)) for policy in policies]
    chained: dict[str, float] = {}
    control_parts: dict[str, list[pd.Series]] = {}
    work = DataCatalogue(out / "work", "rolling")

    steps: list[StepOutcome] = []
    newest: Model | None = None  # the latest step's model: its spec builds the tables, its extra the controls
    bounds = [*times, end]
    for index, at in enumerate(bounds):
        folder = cut_folder(source, symbols, at, out / "candles" / f"{at:%Y%m%dT%H%M}")
        if index > 0 and newest is not None:  # trade the segment that ends here under each policy
            trade_segment(states, newest, folder, bounds[index - 1], at, index - 1, chained, control_parts)
        if index < len(times):
            started = clock()
            trained, study, deflated = retrain(config, folder, work)
            newest = Model.load(f"step-{index}", trained.newest)
            contests: dict[str | None, tuple[Contest, Decision]] = {}  # one contest per distinct champion
            outcomes: dict[str, PolicyStep] = {}
            for state in states:
                key = state.champion.name if state.champion else None
                if key not in contests:
                    contests[key] = decide_step(config, newest, state.champion, folder, deflated)
                outcomes[state.policy.name] = state.decide(config, newest, *contests[key])
            steps.append(StepOutcome(index, at, folder_last_candle(folder, symbols, timeframe), newest.name, outcomes,
                                     deflated, study, clock() - started))
            for name, outcome in outcomes.items():
                verdict = f"; {outcome.verdict.reason}" if outcome.verdict else ""
                log(f"step {index} at {at:%Y-%m-%d} [{name}]: {'PROMOTED' if outcome.decision.promote else 'not promoted'} "
                    f"{newest.name}: {outcome.decision.reason}{verdict}; champion {outcome.champion_after or 'none'} "
                    f"({clock() - started:.0f} s)")
        if not rolling.keep_candles:
            shutil.rmtree(folder.root, ignore_errors=True)

    loops = {state.policy.name: state.account.result() for state in states}
    hold = baselines.buy_and_hold(market, costs)
    curves = pd.DataFrame({**{s.policy.curve: loops[s.policy.name].equity for s in states},
                           "cash": float(costs.init_cash), "buy_and_hold": hold.equity})
    for name, parts in control_parts.items():
        curves[name] = pd.concat(parts).reindex(market.timestamps)
    scores = {s.policy.curve: score_result(loops[s.policy.name]) for s in states}
    scores |= {"cash": TradingScore.cash(), "buy_and_hold": score_result(hold)}
    for name in control_parts:
        scores[name] = curve_score(curves[name], market, costs)
    settings = {"start": str(times[0]), "every": str(rolling.every), "end": str(end), "steps": len(times),
                "symbols": list(symbols), "timeframe": str(timeframe), "window_days": config.promotion.window_days,
                "hurdle": list(window_hurdle(config.promotion.hurdle)),
                "policies": {p.name: {"curve": p.curve, "retire_after": p.retire_after, "description": p.describe()}
                             for p in policies}}
    return RollingResult(steps, {s.policy.name: s.segments for s in states}, loops, curves, scores, policies, settings)


def trade_segment(
    states: list[PolicyState], newest: Model, folder: CandleFolder, start: pd.Timestamp, end: pd.Timestamp,
    index: int, chained: dict[str, float], control_parts: dict[str, list[pd.Series]],
) -> None:
    """Bars ``[start, end)`` traded under each policy by its champion (none: no entries; a retired one: only its
    exits) on ``folder`` (the candles closed by ``end``), and the controls with the parameters of ``newest`` (the
    step's new model) on the same bars. A model's probabilities are computed once for all policies."""
    market = states[0].account.market
    rows = rows_between(market, start, end)
    segment_market = sub_market(market, rows)
    tables: dict[str, dict[str, SymbolTable]] = {}
    probabilities: dict[str, np.ndarray] = {}

    def tables_of(model: Model) -> dict[str, SymbolTable]:
        if model.name not in tables:
            tables[model.name] = tables_for_spec(folder, model.spec, market.symbols)
        return tables[model.name]

    def probability_of(model: Model) -> np.ndarray:
        if model.name not in probabilities:
            scored = predict_tables(model.predict, model.spec, tables_of(model), since=start)
            probabilities[model.name] = probability_matrix(segment_market, scored)
        return probabilities[model.name]

    for state in states:
        account, trader = state.account, state.champion or state.managing
        value = account.value
        if trader is None:
            n = account.trade(rows, None, rules_of(account.costs))
        else:
            n = account.trade(rows, probability_of(trader), trader.spec.strategy_rules(),
                              entries_allowed=state.champion is not None)
        state.segments.append(Segment(index, start, end, state.champion.name if state.champion else None, value,
                                      account.value, n, None if state.champion else trader.name if trader else None))
    costs = states[0].account.costs
    for name, curve in control_curves(segment_market, tables_of(states[0].champion or newest), newest.spec.extra, costs,
                                      chained).items():
        control_parts.setdefault(name, []).append(curve)
        chained[name] = float(curve.iloc[-1]) if len(curve) else chained.get(name, float(costs.init_cash))


def curve_score(equity: pd.Series, market: Market, costs: Any) -> TradingScore:
    """Sharpe, return and drawdown of a chained curve (trade counts are per segment, not kept here)."""
    from pricelevel.backtest.metrics import curve_metrics

    bars_per_year = (costs.timeframe or market.timeframe).bars_per_year
    m = curve_metrics(equity.to_numpy(dtype=np.float64), costs.init_cash, bars_per_year, market.timeframe.delta)
    return TradingScore(m["sharpe"], m["sortino"], m["calmar"], m["total_return"], m["max_drawdown"], 0, math.nan,
                        math.nan, math.nan)


def folder_last_candle(folder: CandleFolder, symbols: tuple[str, ...], timeframe: Timeframe) -> pd.Timestamp:
    return max(folder.read(s, timeframe)["timestamp"].max() for s in symbols)
