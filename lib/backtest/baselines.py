"""Strategy baselines a model's strategy must beat, traded on the same bars with the same costs:

- **cash**: never trades (Sharpe 0, the risk-free rate);
- **buy-and-hold**: equal weight across the symbols, bought on the first bar, held to the end, same fees;
- **level rule** (no model): buy a close within ``proximity_atr`` ATR(14) above a support level in force, take
  profit at the nearest resistance in force above (none: no take-profit), stop ``stop_atr`` ATR below the
  support, optionally a time stop; its parameters are chosen on validation, like the model's rules;
- **volatility control** (no model): the bars ranked by ATR(14)/close, traded as if that were a model's
  probability: its entry threshold (a quantile of the validation values), exits and time stop are chosen on
  validation by the model's own rule search (:func:`pricelevel.backtest.selection.choose_rules`) with the same
  exits. A model that only finds the volatile bars (where a +move is most likely to be touched, and so is a
  -move) does no better than this; one that knows the direction does.

Levels are the walk-forward ones in force at each bar, so the rule uses nothing after the bar it trades on.
Stops are fractions of the signal bar's close, applied to the entry's reference price (with fill
``next_open`` the next open: the levels move by the overnight gap, as a trader's resting orders would not).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import Market
from pricelevel.backtest.run import BacktestResult
from pricelevel.backtest.selection import Selection, StrategyContext, best_of, choose_rules, resolve
from pricelevel.backtest.trading import TradingScore, score_result, trade, trade_probabilities
from pricelevel.core.config import Frozen
from pricelevel.levels.walkforward import LevelHistory, bracketing_levels
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.ta.indicators import atr

BASELINE_NAMES = ("cash", "buy_and_hold", "level_rule", "volatility")
ATR_PERIOD = 14
#: Where a model's spec keeps the volatility control's rules chosen on its validation segment (``spec.extra``).
VOLATILITY_KEY = "volatility_rules"


class LevelRule(Frozen):
    """One set of the level rule's parameters (chosen on validation, stored with the model)."""

    proximity_atr: float
    stop_atr: float
    max_hold_bars: int | None = None


def buy_and_hold(market: Market, costs: BacktestConfig) -> BacktestResult:
    """Equal weights bought at each symbol's first bar and never sold (valued at the last close), without the
    account protections (a drawdown halt would otherwise keep a later-listed symbol out of the market)."""
    n = len(market.symbols)
    entries = np.zeros(market.close.shape, dtype=bool)
    first = np.argmax(np.isfinite(market.close), axis=0)
    entries[first, np.arange(n)] = True
    rules = StrategyRules(threshold=0.5, sizing="fraction", fraction=1.0 / n)
    # the market itself, a benchmark the trader never runs: no position limit, no account protections
    account = costs.model_copy(update={"max_positions": max(n, 1), "protections": None})
    return trade(market, entries, np.zeros_like(entries), account, rules)


def level_signals(
    market: Market, candles: Mapping[str, pd.DataFrame], history: Mapping[str, LevelHistory], rule: LevelRule
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(entries, entry_sl, entry_tp)`` on ``market``'s bars: entries and their per-entry stop fractions."""
    shape = market.close.shape
    entries, sl, tp = np.zeros(shape, dtype=bool), np.full(shape, np.nan), np.full(shape, np.nan)
    for col, symbol in enumerate(market.symbols):
        bars = candles[symbol]
        close = bars["close"].to_numpy(dtype=np.float64)
        width = atr(bars["high"].to_numpy(np.float64), bars["low"].to_numpy(np.float64), close, ATR_PERIOD)
        below, above = bracketing_levels(pd.DatetimeIndex(bars["timestamp"]), close, history[symbol])
        price = history[symbol].levels["price"].to_numpy(dtype=np.float64)
        support = np.where(below >= 0, price[np.maximum(below, 0)] if len(price) else np.nan, np.nan)
        resistance = np.where(above >= 0, price[np.maximum(above, 0)] if len(price) else np.nan, np.nan)
        with np.errstate(invalid="ignore"):
            near = (close - support <= rule.proximity_atr * width) & np.isfinite(width)
            stop = (close - (support - rule.stop_atr * width)) / close
            target = (resistance - close) / close
        rows = market.timestamps.get_indexer(pd.DatetimeIndex(bars["timestamp"]))
        keep = rows >= 0
        entries[rows[keep], col] = near[keep]
        sl[rows[keep], col] = np.where(near & (stop > 0) & (stop < 1), stop, np.nan)[keep]
        tp[rows[keep], col] = np.where(near & (target > 0), target, np.nan)[keep]
    return entries, sl, tp


def trade_level_rule(
    market: Market, candles: Mapping[str, pd.DataFrame], history: Mapping[str, LevelHistory], rule: LevelRule,
    costs: BacktestConfig, sizing: StrategyRules,
) -> BacktestResult:
    """The level rule traded with ``costs`` and ``sizing``'s position sizing (its own stops and time stop)."""
    entries, sl, tp = level_signals(market, candles, history, rule)
    rules = sizing.model_copy(update={"threshold": 0.5, "exit_threshold": None, "sl_stop": None, "tp_stop": None,
                                      "max_hold_bars": rule.max_hold_bars, "sizing": "fraction"})
    return trade(market, entries, np.zeros_like(entries), costs, rules, entry_sl=sl, entry_tp=tp)


def choose_level_rule(
    market: Market, candles: Mapping[str, pd.DataFrame], history: Mapping[str, LevelHistory], costs: BacktestConfig,
    selection: SelectionConfig, sizing: StrategyRules, horizon: int,
) -> Selection[LevelRule]:
    """The level rule's parameters for this validation market, chosen like a model's rules."""
    grid = selection.level_rule
    rules = [LevelRule(proximity_atr=p, stop_atr=s, max_hold_bars=resolve(h, 0.0, horizon))
             for p in grid.proximity_atr for s in grid.stop_atr for h in grid.max_hold_bars]
    return best_of(rules, lambda rule: trade_level_rule(market, candles, history, rule, costs, sizing),
                   selection.metric, selection.min_trades)


def volatility_matrix(market: Market, candles: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """ATR(14)/close at each of ``market``'s bars and symbols (NaN where ATR is not defined yet): the volatility
    control's "probability". ATR is computed on each symbol's whole history, so a segment's first bars have it."""
    out = np.full(market.close.shape, np.nan)
    for col, symbol in enumerate(market.symbols):
        bars = candles[symbol]
        close = bars["close"].to_numpy(dtype=np.float64)
        width = atr(bars["high"].to_numpy(np.float64), bars["low"].to_numpy(np.float64), close, ATR_PERIOD)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = width / close
        rows = market.timestamps.get_indexer(pd.DatetimeIndex(bars["timestamp"]))
        keep = rows >= 0
        out[rows[keep], col] = ratio[keep]
    return out


def choose_volatility_rules(
    market: Market, candles: Mapping[str, pd.DataFrame], exits: StrategyContext
) -> Selection[StrategyRules]:
    """The volatility control's rules on this validation market: the model's rule search (entry quantiles x exit
    quantiles x stops x time stops, ``min_trades``, ``selection.metric`` after costs) on ATR/close, with the exits
    ``exits`` resolves ``move`` / ``down`` / ``horizon`` to (pass the model's own, so both trade the same exits)."""
    return choose_rules(market, volatility_matrix(market, candles), exits.costs, exits.selection, exits.base, exits.move,
                        exits.horizon, exits.down)


def trade_volatility(
    market: Market, candles: Mapping[str, pd.DataFrame], rules: StrategyRules, costs: BacktestConfig
) -> BacktestResult:
    """The volatility control traded with its rules (chosen on validation) through the one engine."""
    return trade_probabilities(market, volatility_matrix(market, candles), costs, rules)


def volatility_rules_of(extra: Mapping[str, object]) -> StrategyRules | None:
    """The volatility control's rules a model's spec stores (``None``: trained before the control existed)."""
    stored = extra.get(VOLATILITY_KEY)
    return StrategyRules.model_validate(stored) if stored else None


def strategy_baselines(
    market: Market, candles: Mapping[str, pd.DataFrame], history: Mapping[str, LevelHistory], rule: LevelRule,
    costs: BacktestConfig, sizing: StrategyRules, volatility: StrategyRules | None = None,
) -> dict[str, TradingScore]:
    """The baselines' scores on ``market``: cash, buy-and-hold, the level rule with ``rule`` and the volatility
    control with ``volatility`` (both chosen on validation; no ``volatility`` rules: the control is left out, and
    a hurdle that names it is then failed, never skipped)."""
    scores = {
        "cash": TradingScore.cash(),
        "buy_and_hold": score_result(buy_and_hold(market, costs)),
        "level_rule": score_result(trade_level_rule(market, candles, history, rule, costs, sizing)),
    }
    if volatility is not None:
        scores["volatility"] = score_result(trade_volatility(market, candles, volatility, costs))
    return scores
