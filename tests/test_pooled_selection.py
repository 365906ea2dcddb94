"""Rules chosen on the pooled validation segments of the walk-forward folds: a recipe in the grid's units placed
on each fold's own probability scale, scored on the concatenated validation returns, qualified only with
``min_trades`` in every fold; the default grid has the top 1 % and 2 % entries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.selection import (
    RuleRecipe,
    ValidationFold,
    choose_pooled_rules,
    choose_rules,
    rule_recipes,
    score_recipe,
)
from pricelevel.backtest.trading import trade_probabilities
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules

COSTS = BacktestConfig()
BASE = StrategyRules(threshold=0.5)
ROOT = Path(__file__).resolve().parents[1]


def _market(n: int, seed: int, drift: float, start: str = "2024-01-01"):
    rng = np.random.default_rng(seed)
    frames = []
    for symbol in ("AAAUSDT", "BBBUSDT"):
        close = 100 * np.exp(np.cumsum(rng.normal(drift, 0.01, n)))
        open_ = np.r_[close[0], close[:-1]]
        frames.append(pd.DataFrame({
            "timestamp": pd.date_range(start, periods=n, freq="4h", tz="UTC"), "symbol": symbol, "open": open_,
            "high": np.maximum(open_, close) * 1.004, "low": np.minimum(open_, close) * 0.996, "close": close,
            "volume": 1.0,
        }))
    return market_from_candles(pd.concat(frames, ignore_index=True))


def _fold(fold: int, n: int, seed: int, drift: float, low: float, high: float, start: str) -> ValidationFold:
    market = _market(n, seed, drift, start)
    probability = np.random.default_rng(100 + seed).uniform(low, high, market.close.shape)
    return ValidationFold(fold, market, probability, move=0.03, horizon=6, down=None)


def test_a_recipe_is_placed_on_each_folds_own_probability_scale_and_label_exits() -> None:
    low = _fold(0, 300, 0, 0.0, 0.0, 0.1, "2024-01-01")
    high = ValidationFold(1, low.market, 0.5 + 5 * low.probability, move=0.05, horizon=6, down=0.02)
    recipe = RuleRecipe(entry_quantile=0.1, exit_quantile=0.5, sl_stop="down", tp_stop="move", max_hold_bars="horizon")
    a, b = low.rules(recipe, BASE), high.rules(recipe, BASE)
    assert a.threshold == pytest.approx(np.quantile(low.probability, 0.9))
    assert b.threshold == pytest.approx(0.5 + 5 * a.threshold)  # same share of bars on another scale
    assert a.exit_threshold == pytest.approx(np.quantile(low.probability, 0.5)) and a.exit_threshold < a.threshold
    assert (a.sl_stop, a.tp_stop, a.max_hold_bars) == (None, 0.03, 6) and (b.sl_stop, b.tp_stop) == (0.02, 0.05)
    # the same share of bars enters on both folds, whatever the scale
    assert (low.probability >= a.threshold).sum() == (high.probability >= b.threshold).sum()


def test_the_pooled_score_is_the_metric_of_the_concatenated_validation_returns() -> None:
    folds = [_fold(0, 400, 1, 0.001, 0.0, 1.0, "2024-01-01"), _fold(1, 300, 2, -0.001, 0.2, 0.4, "2024-04-01")]
    recipe = RuleRecipe(entry_quantile=0.2, tp_stop="move", max_hold_bars="horizon")
    pooled = score_recipe(recipe, folds, COSTS, BASE)
    returns, trades = [], 0
    for fold in folds:
        result = trade_probabilities(fold.market, fold.probability, COSTS, fold.rules(recipe, BASE))
        equity = np.r_[COSTS.init_cash, result.equity.to_numpy()]
        returns.append(np.diff(equity) / equity[:-1])
        trades += int((result.trades["exit_reason"] != "open").sum())
    r = np.concatenate(returns)
    bars_per_year = folds[0].market.timeframe.bars_per_year
    assert pooled.score.sharpe == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(bars_per_year), rel=1e-9)
    assert pooled.score.total_return == pytest.approx(np.prod(1 + r) - 1, rel=1e-9)
    assert pooled.score.n_trades == trades == sum(s.n_trades for s in pooled.folds) > 0
    # not the mean of the folds' Sharpes: one curve through both segments
    assert pooled.score.sharpe != pytest.approx(np.mean([s.sharpe for s in pooled.folds]))


def test_a_candidate_needs_min_trades_in_every_fold_not_in_total() -> None:
    folds = [_fold(0, 2000, 3, 0.0, 0.0, 1.0, "2023-01-01"), _fold(1, 120, 4, 0.0, 0.0, 1.0, "2024-06-01")]
    selection = SelectionConfig(entry_quantiles=(0.02, 0.3), tp_stop=("move",), max_hold_bars=("horizon",), min_trades=8)
    pooled = choose_pooled_rules(folds, COSTS, selection, BASE)
    rare = next(c for c in pooled.selection.candidates if c.choice.entry_quantile == 0.02)
    rare_folds = score_recipe(rare.choice, folds, COSTS, BASE).folds
    assert rare.score.n_trades >= 8 and rare_folds[1].n_trades < 8  # enough in total, too few in the short fold
    assert not rare.qualified and pooled.selection.chosen.entry_quantile == 0.3 and pooled.selection.qualified
    # the rules traded are the chosen recipe on the newest pooled fold's own probabilities
    assert pooled.rules == folds[-1].rules(pooled.selection.chosen, BASE) and pooled.folds == (0, 1)
    assert pooled.to_dict()["rules"]["threshold"] == pytest.approx(np.quantile(folds[1].probability, 0.7))


def test_pooling_outvotes_one_folds_noise() -> None:
    """Newest fold falling, older fold rising: alone the newest fold picks the rarest entry, pooled the commonest
    wins; the pooled choice is the best qualified candidate by the pooled metric."""
    folds = [_fold(0, 900, 5, 0.004, 0.0, 1.0, "2023-06-01"), _fold(1, 300, 6, -0.002, 0.0, 1.0, "2024-06-01")]
    selection = SelectionConfig(entry_quantiles=(0.02, 0.3), tp_stop=("move",), max_hold_bars=("horizon",), min_trades=3)
    alone = choose_rules(folds[1].market, folds[1].probability, COSTS, selection, BASE, 0.03, 6)
    pooled = choose_pooled_rules(folds, COSTS, selection, BASE)
    assert alone.chosen.threshold == pytest.approx(np.quantile(folds[1].probability, 0.98))
    assert pooled.selection.chosen.entry_quantile == 0.3
    best = max(c.score.sharpe for c in pooled.selection.candidates if c.qualified)
    assert pooled.selection.score.sharpe == best and pooled.value() == best


def test_the_default_grid_has_the_top_1_and_2_percent_and_shares_are_checked() -> None:
    import yaml

    assert {0.01, 0.02} <= set(SelectionConfig().entry_quantiles)
    base = yaml.safe_load((ROOT / "conf" / "base.yaml").read_text())["selection"]
    assert {0.01, 0.02} <= set(base["entry_quantiles"])
    recipes = rule_recipes(SelectionConfig(sl_stop=("down",)), BASE, has_down=False)
    assert [r.entry_quantile for r in recipes] == [0.2, 0.1, 0.05, 0.02, 0.01] and {r.sl_stop for r in recipes} == {None}
    with pytest.raises(ValueError, match="entry_quantiles"):
        SelectionConfig(entry_quantiles=(0.0, 0.02))
