"""Choosing a strategy's decision rules on the validation segment, never on test.

The search is a small grid: entry thresholds at quantiles of the model's validation probabilities (the share
of bars that may enter: a threshold in probability units would mean something else for every model), and
stop-loss, take-profit and time stop values, where ``move``, ``down`` and ``horizon`` stand for the label's own
barriers and horizon (the label asks "does price rise ``move`` within ``horizon`` bars" (before it falls
``down``, for a triple barrier), so take-profit = move, stop-loss = down and time stop = horizon is the strategy
the model was trained for). Every candidate is traded with the same costs and
scored by ``selection.metric`` after fees, so the search sees turnover; one with fewer than
``selection.min_trades`` trades cannot be chosen (a lucky handful of trades is not evidence). Every candidate
also trades under the trader's account protections, ``costs.protections`` (the ``risk:`` defaults unless the
configuration says otherwise: :func:`pricelevel.backtest.config.with_protections`), so the rules chosen are
judged as the trader would run them.

**Pooled over the walk-forward folds** (:func:`choose_pooled_rules`): one validation window is noise (the same
model with four seeds chose four thresholds that made -35 % .. +28 % on unseen months), so the registered
model's rules are chosen on the validation segments of every fold at once. A candidate is a
:class:`RuleRecipe` in the grid's own units (the share of bars that may enter, exit quantile, stops): on each
fold it becomes that fold's rules with the thresholds at the quantiles of *that fold's own model's* validation
probabilities (folds with different probability scales pool correctly) and the label's exits resolved on that
fold's validation segment. Each fold trades its own validation segment; the pooled score is the metric of the
concatenated per-bar returns (one equity curve chained through the folds' validation segments in time order);
a candidate qualifies only with at least ``min_trades`` trades in *every* fold.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import Market
from pricelevel.backtest.metrics import curve_metrics
from pricelevel.backtest.run import BacktestResult
from pricelevel.backtest.trading import TradingScore, score_result, trade_probabilities
from pricelevel.core.config import Frozen
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules


@dataclass(frozen=True)
class StrategyContext:
    """What choosing and trading rules needs besides the model: costs (with the account protections every
    backtest simulates, ``costs.protections``), the search, the rules' defaults, and the label's move and
    horizon (what ``"move"`` / ``"horizon"`` stand for in the grid), and its lower barrier (``"down"``: none for a
    label without one)."""

    costs: BacktestConfig
    selection: SelectionConfig
    base: StrategyRules
    move: float
    horizon: int
    down: float | None = None


#: What a search chooses among: a model's decision rules, or a baseline's parameters (frozen config models).
Choice = TypeVar("Choice", bound=Frozen)
@dataclass(frozen=True)
class Candidate(Generic[Choice]):
    choice: Choice
    score: TradingScore
    qualified: bool

    def to_dict(self) -> dict[str, object]:
        return {"choice": self.choice.model_dump(), **self.score.to_dict(), "qualified": self.qualified}


@dataclass(frozen=True)
class Selection(Generic[Choice]):
    """The chosen candidate (a model's rules, the level rule's parameters), its validation score, and every
    candidate tried (logged with the model)."""

    chosen: Choice
    score: TradingScore
    metric: str
    qualified: bool
    candidates: tuple[Candidate[Choice], ...] = field(default=())

    def value(self) -> float:
        """The chosen rules' validation metric; -inf when none qualified (fewer trades than required)."""
        value = self.score.metric(self.metric)
        return value if self.qualified and math.isfinite(value) else -math.inf

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric, "qualified": self.qualified, "chosen": self.chosen.model_dump(),
            "score": self.score.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
        }


def resolve(value: object, move: float, horizon: int, down: float | None = None) -> object:
    """``"move"`` / ``"horizon"`` / ``"down"`` to the label's numbers; anything else as it is."""
    return move if value == "move" else horizon if value == "horizon" else down if value == "down" else value


def rule_grid(
    probability: np.ndarray, selection: SelectionConfig, base: StrategyRules, move: float, horizon: int,
    down: float | None = None,
) -> list[StrategyRules]:
    """Every rule set to try: entry quantiles of the finite validation probabilities x exit quantiles x stops x
    time stops; sizing stays ``base``'s. An exit threshold at or above the entry threshold is skipped."""
    finite = probability[np.isfinite(probability)]
    if finite.size == 0:
        return []
    thresholds = sorted({float(np.quantile(finite, 1.0 - q)) for q in selection.entry_quantiles})
    exits = [None if q is None else float(np.quantile(finite, q)) for q in selection.exit_quantiles]
    stops = list(dict.fromkeys(resolve(sl, move, horizon, down) for sl in selection.sl_stop))
    grid = itertools.product(thresholds, exits, stops, selection.tp_stop, selection.max_hold_bars)
    rules = []
    for threshold, exit_threshold, sl, tp, hold in grid:
        if (base.sizing == "risk" and sl is None) or (exit_threshold is not None and exit_threshold >= threshold):
            continue
        update = {"threshold": threshold, "exit_threshold": exit_threshold, "sl_stop": sl,
                  "tp_stop": resolve(tp, move, horizon), "max_hold_bars": resolve(hold, move, horizon)}
        rules.append(base.model_copy(update=update))
    return rules


def best_of(
    candidates: Iterable[Choice], run: Callable[[Choice], BacktestResult], metric: str, min_trades: int
) -> Selection[Choice]:
    """Trade every candidate with ``run`` and keep the best by ``metric`` among those with ``min_trades``
    trades (ties: the earlier candidate); if none qualifies, the best anyway, marked not qualified."""
    tried = []
    for choice in candidates:
        score = score_result(run(choice))
        tried.append(Candidate(choice, score, score.n_trades >= min_trades and math.isfinite(score.metric(metric))))
    if not tried:
        raise ValueError("no candidate rules to choose from (no finite validation probability)")

    def key(candidate: Candidate) -> tuple[bool, float]:
        value = candidate.score.metric(metric)
        return candidate.qualified, value if math.isfinite(value) else -math.inf

    best = max(tried, key=key)  # max keeps the first of equal keys
    return Selection(best.choice, best.score, metric, best.qualified, tuple(tried))


def choose_rules(
    market: Market,
    probability: np.ndarray,
    costs: BacktestConfig,
    selection: SelectionConfig,
    base: StrategyRules,
    move: float,
    horizon: int,
    down: float | None = None,
) -> Selection[StrategyRules]:
    """The model's rules for this validation market: the grid of :func:`rule_grid`, each traded on it."""
    grid = rule_grid(probability, selection, base, move, horizon, down)
    return best_of(grid, lambda rules: trade_probabilities(market, probability, costs, rules), selection.metric,
                   selection.min_trades)


def aggregate(values: Sequence[float], how: Literal["mean", "worst"]) -> float:
    """Fold values as one number (NaN and -inf count as the worst possible)."""
    clean = [v if math.isfinite(v) else -math.inf for v in values]
    if not clean:
        return -math.inf
    return min(clean) if how == "worst" else (float(np.mean(clean)) if all(math.isfinite(v) for v in clean) else -math.inf)


class RuleRecipe(Frozen):
    """A rule set in the grid's own units, resolved per fold by :meth:`resolve`: ``entry_quantile`` is the share
    of validation bars that may enter, ``exit_quantile`` the probability exit's quantile (``None``: none), and the
    stops as configured (numbers, ``None``, or the label's ``"move"`` / ``"down"`` / ``"horizon"``)."""

    entry_quantile: float
    exit_quantile: float | None = None
    sl_stop: float | str | None = None
    tp_stop: float | str | None = None
    max_hold_bars: int | str | None = None

    def resolve(self, probability: np.ndarray, base: StrategyRules, move: float, horizon: int,
                down: float | None = None) -> StrategyRules:
        """The recipe as one fold's rules: thresholds at the quantiles of that fold's finite validation
        ``probability``, the label's stops resolved on its ``move`` / ``down`` / ``horizon``; sizing from ``base``."""
        finite = probability[np.isfinite(probability)]
        if finite.size == 0:
            raise ValueError("no finite validation probability to place the thresholds")
        threshold = float(np.quantile(finite, 1.0 - self.entry_quantile))
        exit_threshold = None if self.exit_quantile is None else float(np.quantile(finite, self.exit_quantile))
        if exit_threshold is not None and exit_threshold >= threshold:  # ties in p: never exit at entry
            exit_threshold = None
        return base.model_copy(update={
            "threshold": threshold, "exit_threshold": exit_threshold, "sl_stop": resolve(self.sl_stop, move, horizon, down),
            "tp_stop": resolve(self.tp_stop, move, horizon), "max_hold_bars": resolve(self.max_hold_bars, move, horizon),
        })


def rule_recipes(selection: SelectionConfig, base: StrategyRules, *, has_down: bool = True) -> list[RuleRecipe]:
    """Every recipe of the grid, in :func:`rule_grid`'s order (the commonest entry first); a probability exit at or
    above its entry quantile, and a ``risk``-sized recipe without a stop-loss, are skipped. ``has_down=False``
    (no fold has a lower barrier) resolves ``"down"`` to no stop-loss at once, so it is not tried twice."""
    stops = list(dict.fromkeys(sl if (sl != "down" or has_down) else None for sl in selection.sl_stop))
    grid = itertools.product(sorted(set(selection.entry_quantiles), reverse=True), selection.exit_quantiles, stops,
                             selection.tp_stop, selection.max_hold_bars)
    out = []
    for entry, exit_q, sl, tp, hold in grid:
        if (base.sizing == "risk" and sl is None) or (exit_q is not None and exit_q >= 1.0 - entry):
            continue
        out.append(RuleRecipe(entry_quantile=entry, exit_quantile=exit_q, sl_stop=sl, tp_stop=tp, max_hold_bars=hold))
    return out


@dataclass(frozen=True)
class ValidationFold:
    """One walk-forward fold's validation segment as the pooled search sees it: its market, *that fold's own
    model's* probabilities on it, and the label's exits resolved on it (:func:`pricelevel.ml.walkforward.label_exits`)."""

    fold: int
    market: Market
    probability: np.ndarray
    move: float
    horizon: int
    down: float | None = None

    def rules(self, recipe: RuleRecipe, base: StrategyRules) -> StrategyRules:
        return recipe.resolve(self.probability, base, self.move, self.horizon, self.down)


def pooled_score(results: Sequence[BacktestResult]) -> TradingScore:
    """One score of several segments' backtests (oldest first): ratios, return and drawdown of their per-bar
    returns concatenated (one equity curve chained from segment to segment, annualised by the bars per year of
    the first), trades and fees summed, exposure weighted by bars."""
    if not results:
        raise ValueError("no segment to pool")
    first = results[0]
    returns = []
    for result in results:
        equity = np.concatenate([[result.config.init_cash], result.equity.to_numpy(dtype=np.float64)])
        returns.append(np.diff(equity) / equity[:-1])
    chained = first.config.init_cash * np.cumprod(1.0 + np.concatenate(returns))
    bars_per_year = (first.config.timeframe or first.market.timeframe).bars_per_year
    curve = curve_metrics(chained, first.config.init_cash, bars_per_year, first.market.timeframe.delta)
    scores = [score_result(result) for result in results]
    fees = float(sum(s.fees_paid for s in scores))
    gross = float(sum(float(r.trades["pnl"].sum()) for r in results)) + fees
    bars = np.array([r.market.n_bars for r in results], dtype=np.float64)
    exposure = np.array([s.exposure for s in scores], dtype=np.float64)
    return TradingScore(
        sharpe=curve["sharpe"], sortino=curve["sortino"], calmar=curve["calmar"], total_return=curve["total_return"],
        max_drawdown=curve["max_drawdown"], n_trades=int(sum(s.n_trades for s in scores)), fees_paid=fees,
        fee_share=fees / gross if gross > 0 else math.nan,
        exposure=float(np.sum(exposure * bars) / bars.sum()) if bars.sum() and np.isfinite(exposure).all() else math.nan,
    )


@dataclass(frozen=True)
class PooledScore:
    """A recipe traded on every pooled fold: the pooled score and each fold's own."""

    recipe: RuleRecipe
    score: TradingScore
    folds: tuple[TradingScore, ...]

    def qualified(self, metric: str, min_trades: int) -> bool:
        """At least ``min_trades`` trades in every fold, and a finite pooled metric."""
        return min(s.n_trades for s in self.folds) >= min_trades and math.isfinite(self.score.metric(metric))


def score_recipe(recipe: RuleRecipe, folds: Sequence[ValidationFold], costs: BacktestConfig,
                 base: StrategyRules) -> PooledScore:
    """``recipe`` resolved and traded on each fold's validation segment, pooled (:func:`pooled_score`)."""
    results = [trade_probabilities(f.market, f.probability, costs, f.rules(recipe, base)) for f in folds]
    return PooledScore(recipe, pooled_score(results), tuple(score_result(r) for r in results))


@dataclass(frozen=True)
class PooledSelection:
    """The recipe chosen on the pooled validation segments (``selection``: every candidate with its pooled
    score), each fold's score under it, and the rules it gives the newest pooled fold (the model traded)."""

    selection: Selection[RuleRecipe]
    folds: tuple[int, ...]
    fold_scores: tuple[TradingScore, ...]
    rules: StrategyRules

    def value(self) -> float:
        return self.selection.value()

    def to_dict(self) -> dict[str, object]:
        """``selection.json``'s ``model`` entry: the search (``chosen`` is the recipe), the rules traded, and the
        chosen recipe's score on each pooled fold."""
        return {**self.selection.to_dict(), "pooled_folds": list(self.folds), "rules": self.rules.model_dump(),
                "fold_scores": [s.to_dict() for s in self.fold_scores]}


def choose_pooled_rules(
    folds: Sequence[ValidationFold], costs: BacktestConfig, selection: SelectionConfig, base: StrategyRules,
) -> PooledSelection:
    """The best recipe by ``selection.metric`` on the pooled validation segments of ``folds`` (oldest first)
    among those with ``selection.min_trades`` trades in every fold (ties: the earlier recipe, the commoner entry);
    if none qualifies, the best anyway, marked not qualified. The rules returned are the recipe on the last fold."""
    if not folds:
        raise ValueError("no validation fold to choose rules on")
    recipes = rule_recipes(selection, base, has_down=any(f.down is not None for f in folds))
    tried: list[Candidate[RuleRecipe]] = []
    pooled: list[PooledScore] = []
    for recipe in recipes:
        scored = score_recipe(recipe, folds, costs, base)
        pooled.append(scored)
        tried.append(Candidate(recipe, scored.score, scored.qualified(selection.metric, selection.min_trades)))
    if not tried:
        raise ValueError("no candidate rules to choose from")

    def key(index: int) -> tuple[bool, float]:
        value = tried[index].score.metric(selection.metric)
        return tried[index].qualified, value if math.isfinite(value) else -math.inf

    best = max(range(len(tried)), key=key)  # max keeps the first of equal keys
    chosen = tried[best]
    return PooledSelection(
        Selection(chosen.choice, chosen.score, selection.metric, chosen.qualified, tuple(tried)),
        tuple(f.fold for f in folds), pooled[best].folds, folds[-1].rules(chosen.choice, base),
    )
