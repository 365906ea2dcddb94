"""The volatility control (no model: bars ranked by ATR(14)/close, its rules chosen on validation by the model's
own rule search) and the gate that asks every model to beat it: a "model" that only picks volatile bars is
refused, naming the control; one that knows the direction passes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.baselines import (
    VOLATILITY_KEY,
    LevelRule,
    choose_volatility_rules,
    strategy_baselines,
    trade_volatility,
    volatility_matrix,
    volatility_rules_of,
)
from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.selection import StrategyContext, choose_rules, rule_grid
from pricelevel.backtest.trading import score_result, trade_probabilities
from pricelevel.inference.contest import ContenderScore, Contest
from pricelevel.levels.walkforward import LevelHistory
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.gate import judge
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules

COSTS = BacktestConfig()
SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT")
N, SPLIT, HORIZON, MOVE = 1600, 800, 6, 0.03


def _candles(seed: int = 3) -> dict[str, pd.DataFrame]:
    """Calm and volatile regimes; the volatile bars drift up (so picking them pays, as on the real data), but
    within a regime a bar's own direction is a coin toss that only the future knows."""
    rng = np.random.default_rng(seed)
    stamps = pd.date_range("2024-01-01", periods=N, freq="4h", tz="UTC")
    out = {}
    for symbol in SYMBOLS:
        volatile = np.repeat(rng.random(N // 40) < 0.35, 40)[:N]
        sigma = np.where(volatile, 0.02, 0.004)
        returns = rng.normal(np.where(volatile, 0.002, 0.0), sigma)
        close = 100 * np.exp(np.cumsum(returns))
        open_ = np.r_[close[0], close[:-1]]
        wick = np.abs(rng.normal(0, sigma / 2))
        out[symbol] = pd.DataFrame({"timestamp": stamps, "open": open_, "high": np.maximum(open_, close) * (1 + wick),
                                    "low": np.minimum(open_, close) * (1 - wick), "close": close, "volume": 1.0})
    return out


def _segment(candles: dict[str, pd.DataFrame], rows: slice):
    frame = pd.concat([c.iloc[rows].assign(symbol=s) for s, c in candles.items()], ignore_index=True)
    return market_from_candles(frame)


def _far_levels(candles: dict[str, pd.DataFrame]) -> dict[str, LevelHistory]:
    """One support far below every price: the level rule never trades (its Sharpe is no obstacle here)."""
    first = candles[SYMBOLS[0]]["timestamp"].iloc[0]
    return {s: LevelHistory(refits=pd.DatetimeIndex([first]), levels=pd.DataFrame({"asof": [first], "price": [1.0]}))
            for s in candles}


def _context() -> StrategyContext:
    return StrategyContext(costs=COSTS, selection=SelectionConfig(), base=StrategyRules(threshold=0.5), move=MOVE,
                           horizon=HORIZON)


def test_the_control_ranks_by_atr_over_close_on_the_segments_bars() -> None:
    stamps = pd.date_range("2024-01-01", periods=40, freq="4h", tz="UTC")
    close = np.full(40, 50.0)
    bars = pd.DataFrame({"timestamp": stamps, "open": close, "high": close + 1.0, "low": close - 1.0, "close": close,
                         "volume": 1.0})
    market = market_from_candles(bars.iloc[20:].assign(symbol="AAAUSDT"))
    ratio = volatility_matrix(market, {"AAAUSDT": bars})
    # true range 2 on every bar: ATR(14) = 2, so ATR/close = 2/50, defined from the segment's first bar (warm-up
    # on the history before it)
    assert ratio.shape == (20, 1) and ratio[:, 0] == pytest.approx(np.full(20, 0.04))
    early = volatility_matrix(market_from_candles(bars.iloc[:20].assign(symbol="AAAUSDT")), {"AAAUSDT": bars})
    assert np.isnan(early[:14, 0]).all() and early[14:, 0] == pytest.approx(0.04)


def test_its_rules_come_from_the_models_rule_search_with_the_same_exits() -> None:
    candles = _candles()
    validation = _segment(candles, slice(0, SPLIT))
    chosen = choose_volatility_rules(validation, candles, _context())
    grid = rule_grid(volatility_matrix(validation, candles), SelectionConfig(), StrategyRules(threshold=0.5), MOVE, HORIZON)
    assert [c.choice for c in chosen.candidates] == grid  # the model's grid, over ATR/close quantiles
    assert chosen.chosen in grid and (chosen.chosen.tp_stop, chosen.chosen.max_hold_bars) == (MOVE, HORIZON)
    # stored with the model, read back for every backtest of it
    assert volatility_rules_of({VOLATILITY_KEY: chosen.chosen.model_dump()}) == chosen.chosen
    assert volatility_rules_of({}) is None
    test = _segment(candles, slice(SPLIT, N))
    scores = strategy_baselines(test, candles, _far_levels(candles), LevelRule(proximity_atr=0.5, stop_atr=0.25), COSTS,
                                StrategyRules(threshold=0.5), chosen.chosen)
    assert set(scores) == {"cash", "buy_and_hold", "level_rule", "volatility"}
    assert scores["volatility"] == score_result(trade_volatility(test, candles, chosen.chosen, COSTS))
    assert scores["volatility"].n_trades > 0


def _gate(candles, probability_of, config: PromotionConfig):
    """A model (its probability on every bar) chosen and traded like the training flow does, then judged by the
    gate beside the baselines on the newest (test) bars, as the first champion."""
    validation, test = _segment(candles, slice(0, SPLIT)), _segment(candles, slice(SPLIT, N))
    context = _context()
    rules = choose_rules(validation, probability_of(validation), COSTS, context.selection, context.base, MOVE, HORIZON).chosen
    traded = score_result(trade_probabilities(test, probability_of(test), COSTS, rules))
    control = choose_volatility_rules(validation, candles, context).chosen
    baselines = strategy_baselines(test, candles, _far_levels(candles), LevelRule(proximity_atr=0.5, stop_atr=0.25), COSTS,
                                   context.base, control)
    challenger = ContenderScore("2", rules.model_dump(), {}, 0.9, traded)
    contest = Contest(start=test.timestamps[0], end=test.timestamps[-1], rows=test.n_bars, bars=test.n_bars,
                      challenger=challenger, champion=None, classifier_baselines={"majority": 0.3},
                      strategy_baselines=baselines)
    return judge(contest, config, "val_pr_auc", "maximize", "sharpe"), traded, baselines


def test_a_model_that_only_picks_volatile_bars_is_refused_naming_the_volatility_control() -> None:
    candles = _candles()
    assert PromotionConfig().hurdle == ("cash", "level_rule", "volatility")
    decision, traded, baselines = _gate(candles, lambda market: volatility_matrix(market, candles), PromotionConfig())
    # picking the volatile bars pays on this market: it beats cash and the level rule...
    assert traded.sharpe > 0 and baselines["volatility"].sharpe > 0
    # ...and is exactly the control, so it does not beat it
    assert traded.sharpe == baselines["volatility"].sharpe
    assert not decision.promote
    assert "does not beat volatility" in decision.reason and "cash" not in decision.reason.split("(also")[0]
    assert decision.details["hurdle.volatility"] == baselines["volatility"].sharpe
    # the same model under the old hurdle was promoted: the control is what refuses it
    old, _, _ = _gate(candles, lambda market: volatility_matrix(market, candles), PromotionConfig(hurdle=("cash", "level_rule")))
    assert old.promote


def test_a_model_with_direction_skill_passes_the_volatility_hurdle() -> None:
    candles = _candles()

    def knows_the_next_bars(market) -> np.ndarray:
        """A model that knows the direction: the next 6 bars' return from the next open, squashed into (0, 1)."""
        ahead = np.full(market.close.shape, np.nan)
        n = len(market.timestamps)
        ahead[: n - HORIZON - 1] = market.close[HORIZON + 1:] / market.open[1: n - HORIZON] - 1
        return 1 / (1 + np.exp(-20 * ahead))

    decision, traded, baselines = _gate(candles, knows_the_next_bars, PromotionConfig())
    assert decision.promote, decision.reason
    assert traded.sharpe > baselines["volatility"].sharpe > 0
    assert "volatility" in decision.reason and "buy_and_hold" in decision.reason  # the market is said beside it
    assert math.isfinite(decision.details["hurdle.buy_and_hold"])
