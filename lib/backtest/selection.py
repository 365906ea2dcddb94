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
