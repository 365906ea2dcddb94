"""Run the engine over a :class:`Market` with a :class:`BacktestConfig` and return frames people can read."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.engine import (
    REJECT_LABELS,
    TRADE_FIELDS,
    EngineParams,
    EngineState,
    ExitReason,
    Sizing,
    open_trades,
    step,
)
from pricelevel.backtest.market import Market
from pricelevel.backtest.protections import REFUSAL_LABELS
from pricelevel.core.timeframes import utc_ns

TRADE_COLUMNS = (
    "symbol", "entry_time", "exit_time", "entry_price", "exit_price", "size", "pnl", "return", "exit_reason",
    "entry_fees", "exit_fees", "entry_bar", "exit_bar",
)


def engine_params(config: BacktestConfig) -> EngineParams:
    nan = float("nan")
    guard = config.protections
    protections = {} if guard is None else {
        "protections": True, "protect_max_positions": guard.max_positions, "max_drawdown": guard.max_drawdown,
        "daily_loss_limit": guard.daily_loss_limit, "cooldown_losses": guard.cooldown_losses,
        "cooldown_bars": guard.cooldown_bars,
    }
    return EngineParams(
        **protections,
        init_cash=config.init_cash,
        fees=config.fees,
        slippage=config.slippage,
        sl_stop=nan if config.sl_stop is None else config.sl_stop,
        tp_stop=nan if config.tp_stop is None else config.tp_stop,
        next_open=config.fill == "next_open",
        sizing=Sizing[config.sizing.upper()],
        fraction=config.fraction,
        risk=config.risk,
        min_order_value=config.min_order_value,
        max_positions=config.max_positions,
        max_hold_bars=config.max_hold_bars or 0,
    )


@dataclass(frozen=True)
class BacktestResult:
    """What one backtest produced: the equity curve, every trade, and the orders it refused."""

    market: Market
    config: BacktestConfig
    equity: pd.Series  # portfolio value at each bar's close, indexed by timestamp
    trades: pd.DataFrame  # TRADE_COLUMNS, in the order trades closed (open ones last)
    rejected: dict[str, int]  # entries refused: no_cash, dust, max_positions
    #: Entries the account protections refused (``backtest.protections``): drawdown_halt, daily_loss, cooldown,
    #: max_positions_open; empty without protections.
    refused: dict[str, int] = field(default_factory=dict)


def run_backtest(
    market: Market,
    entries: np.ndarray,
    exits: np.ndarray,
    config: BacktestConfig,
    chunk_bars: int | None = None,
    *,
    entry_sl: np.ndarray | None = None,
    entry_tp: np.ndarray | None = None,
) -> BacktestResult:
    """Backtest boolean ``(bars, symbols)`` signals on ``market``.

    ``chunk_bars`` feeds the engine that many bars at a time (as a live loop would); the result does not
    depend on it, which the tests check. ``entry_sl``/``entry_tp`` (optional float ``(bars, symbols)``) give
    each entry signal its own stop-loss/take-profit fraction (e.g. to the nearest support/resistance); NaN
    falls back to ``config.sl_stop``/``config.tp_stop``.
    """
    params = engine_params(config)
    state = EngineState.initial(len(market.symbols), params.init_cash)
    size = chunk_bars or max(market.n_bars, 1)
    times = utc_ns(market.timestamps) if params.protections else None
    bar_ns = (config.timeframe or market.timeframe).nanoseconds
    equity_parts, trade_parts = [], []
    for start in range(0, market.n_bars, size):
        stop = min(start + size, market.n_bars)
        part = step(
            state, params, market.open[start:stop], market.high[start:stop], market.low[start:stop],
            market.close[start:stop], entries[start:stop], exits[start:stop],
            entry_sl=None if entry_sl is None else entry_sl[start:stop],
            entry_tp=None if entry_tp is None else entry_tp[start:stop],
            times=None if times is None else times[start:stop], bar_ns=bar_ns,
        )
        equity_parts.append(part.equity)
        trade_parts.append(part.trades)
    trade_parts.append(open_trades(state))
    columns = {name: np.concatenate([p[name] for p in trade_parts]) for name in TRADE_FIELDS}
    return BacktestResult(
        market=market,
        config=config,
        equity=pd.Series(np.concatenate(equity_parts), index=market.timestamps, name="equity"),
        trades=trades_frame(columns, market),
        rejected={label: int(n) for label, n in zip(REJECT_LABELS, state.rejected, strict=True)},
        refused={label: int(n) for label, n in zip(REFUSAL_LABELS, state.refused, strict=True)} if params.protections else {},
    )


def trades_frame(columns: dict[str, np.ndarray], market: Market) -> pd.DataFrame:
    """Engine trade columns to a readable frame: symbols, times, pnl, return and reason names."""
    size, entry, exit_ = columns["size"], columns["entry_price"], columns["exit_price"]
    pnl = size * exit_ - size * entry - columns["entry_fees"] - columns["exit_fees"]
    reasons = np.array([ExitReason(code).label for code in range(len(ExitReason))])  # indexed by code
    return pd.DataFrame(
        {
            "symbol": pd.Categorical.from_codes(columns["symbol_idx"], categories=list(market.symbols)).astype(str),
            "entry_time": market.timestamps[columns["entry_bar"]],
            "exit_time": market.timestamps[columns["exit_bar"]],
            "entry_price": entry,
            "exit_price": exit_,
            "size": size,
            "pnl": pnl,
            "return": pnl / (size * entry),
            "exit_reason": reasons[columns["exit_reason"].astype(np.int64)],
            "entry_fees": columns["entry_fees"],
            "exit_fees": columns["exit_fees"],
            "entry_bar": columns["entry_bar"],
            "exit_bar": columns["exit_bar"],
        },
        columns=list(TRADE_COLUMNS),
    )
