"""Trading a signal matrix under a set of decision rules, and the few numbers that judge the result.

Shared by the rule search on validation, the strategy baselines and the walk-forward report, so every
strategy is measured the same way: same bars, same costs, same metric definitions
(:func:`pricelevel.backtest.metrics.curve_metrics`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import Market
from pricelevel.backtest.metrics import curve_metrics
from pricelevel.backtest.run import BacktestResult, run_backtest
from pricelevel.strategy.rules import RULE_KEYS, StrategyRules

#: Trading metrics a strategy may be selected and gated on (higher is better for each).
TRADING_METRICS = ("sharpe", "sortino", "calmar", "total_return")


def rules_of(config: BacktestConfig) -> StrategyRules:
    """The decision rules written in ``backtest:`` (what a model is trained with before its own are chosen)."""
    return StrategyRules.model_validate({key: getattr(config, key) for key in RULE_KEYS})


def with_rules(config: BacktestConfig, rules: StrategyRules) -> BacktestConfig:
    """``config``'s costs and account with ``rules``' decisions."""
    return config.model_copy(update=rules.model_dump())


@dataclass(frozen=True)
class TradingScore:
    """What a strategy did on a window, after fees and slippage."""

    sharpe: float
    sortino: float
    calmar: float
    total_return: float
    max_drawdown: float
    n_trades: int
    fees_paid: float
    #: Fees over the profit before fees (P&L + fees); NaN when there was no profit to pay them from.
    fee_share: float
    exposure: float

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def cash(cls) -> TradingScore:
        """Never trading: no return, no risk; its Sharpe is 0 (the risk-free rate), the bar to clear."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, math.nan, 0.0)


def score_result(result: BacktestResult) -> TradingScore:
    """The :class:`TradingScore` of a backtest (portfolio level)."""
    market = result.market
    bars_per_year = (result.config.timeframe or market.timeframe).bars_per_year
    curve = curve_metrics(result.equity.to_numpy(), result.config.init_cash, bars_per_year, market.timeframe.delta)
    trades = result.trades
    fees = float(trades["entry_fees"].sum() + trades["exit_fees"].sum())
    gross = float(trades["pnl"].sum()) + fees
    held = np.zeros(market.n_bars, dtype=bool)
    for entry, exit_ in zip(trades["entry_bar"], trades["exit_bar"], strict=True):
        held[entry : exit_ + 1] = True
    return TradingScore(
        sharpe=curve["sharpe"], sortino=curve["sortino"], calmar=curve["calmar"], total_return=curve["total_return"],
        max_drawdown=curve["max_drawdown"], n_trades=int((trades["exit_reason"] != "open").sum()), fees_paid=fees,
        fee_share=fees / gross if gross > 0 else math.nan, exposure=float(held.mean()) if market.n_bars else math.nan,
    )


def trade(
    market: Market,
    entries: np.ndarray,
    exits: np.ndarray,
    costs: BacktestConfig,
    rules: StrategyRules,
    entry_sl: np.ndarray | None = None,
    entry_tp: np.ndarray | None = None,
) -> BacktestResult:
    """Backtest signals under ``rules`` with ``costs``' fees, slippage, fills and account."""
    return run_backtest(market, entries, exits, with_rules(costs, rules), entry_sl=entry_sl, entry_tp=entry_tp)


def probability_matrix(market: Market, scored: pd.DataFrame) -> np.ndarray:
    """``(bars, symbols)`` probabilities of ``scored`` (``timestamp, symbol, probability``) on ``market``'s
    bars; NaN where the model said nothing (no full window yet, or a row of another window)."""
    out = np.full(market.close.shape, np.nan)
    rows = market.timestamps.get_indexer(pd.DatetimeIndex(scored["timestamp"]))
    cols = pd.Index(market.symbols).get_indexer(scored["symbol"])
    keep = (rows >= 0) & (cols >= 0)
    out[rows[keep], cols[keep]] = scored["probability"].to_numpy(dtype=np.float64)[keep]
    return out


def trade_probabilities(
    market: Market, probability: np.ndarray, costs: BacktestConfig, rules: StrategyRules
) -> BacktestResult:
    """The model's strategy: ``rules`` applied to a probability matrix (the shared signal path)."""
    entries, exits = rules.signals(probability)
    return trade(market, entries, exits, costs, rules)
