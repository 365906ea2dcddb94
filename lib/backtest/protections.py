"""The account-level protections, once: compiled functions on a few numbers, called by the backtest engine's
loop for every bar and by the live trader's risk manager (:class:`pricelevel.trading.risk.RiskManager`) for every
bar it trades, so the backtest, the walk-forward folds, the promotion gate, ``trade --replay`` and the trader
refuse the same entries (freqtrade's idea of running the same protection classes in backtesting).

The order of events in one bar is the trader's:

1. **before the bar's fills**, every entry signal of a symbol that has this bar and holds no position is judged
   by :func:`entry_refusal` with the equity as it stood at the previous close (cash + positions at their last
   close) and the positions open or pending plus the entries already admitted at this bar. An entry signal of a
   symbol already held is not passed on (the trader does not ask for it), nor is a refused one;
2. the bar is executed (fills, stops, signals);
3. **after the bar**, :func:`account_after_bar` with the bar's closing equity (peak, UTC day, drawdown halt),
   then :func:`trade_closed` once per trade closed in the bar, in the order they closed (the losing streak and
   the cool-down, which ends ``cooldown_bars`` bar lengths after the bar's open time).

The rules (each refusal has a code; the first that applies is the reason):

- ``HALTED``: equity fell ``max_drawdown`` below its peak (peak and drawdown measured on closing equity after
  each bar); latched: no entry until re-armed (a backtest never re-arms);
- ``DAILY_LOSS``: the equity is ``daily_loss_limit`` below the day's start equity, the equity after the first bar
  of the UTC day (of the bar's open time); the first bar of a new day is still judged against the previous day's
  start, since the day rolls over after that bar;
- ``COOLDOWN``: ``cooldown_losses`` losing trades (P&L after fees below 0) in a row set a cool-down: no entry at
  bars opening before the last loss's bar time + ``cooldown_bars`` bars; the streak then starts again from 0;
- ``MAX_POSITIONS``: ``max_positions`` positions already open or pending (entries admitted at this bar count).

The functions take and return plain numbers (so the engine keeps the state in registers through its loop);
between calls the state is kept as ``guard_f = [peak equity (NaN: none yet), day start equity (NaN: none
yet)]`` and ``guard_i = [UTC day number (NO_TIME: none yet), losing streak, cool-down end in ns (NO_TIME:
none), halted 0/1]``. Times are int64 nanoseconds since the epoch (UTC), days ``time // DAY_NS``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PEAK, DAY_START = 0, 1  # guard_f
DAY, LOSSES, COOLDOWN_UNTIL, HALTED = 0, 1, 2, 3  # guard_i
#: "Never" for a day or a cool-down end (earlier than any bar).
NO_TIME = -(2**62)
DAY_NS = 86_400 * 10**9

#: Refusal codes (0: admitted); ``REFUSAL_LABELS[code - 1]`` names them in results.
ADMITTED, REFUSED_HALTED, REFUSED_DAILY_LOSS, REFUSED_COOLDOWN, REFUSED_MAX_POSITIONS = 0, 1, 2, 3, 4
REFUSAL_LABELS = ("drawdown_halt", "daily_loss", "cooldown", "max_positions_open")


def initial_guard() -> tuple[np.ndarray, np.ndarray]:
    """The state before the first bar: no peak, no day, no streak, no cool-down, armed."""
    return np.array([np.nan, np.nan]), np.array([NO_TIME, 0, NO_TIME, 0], dtype=np.int64)


@njit(cache=True, inline="always")
def drawdown_reached(equity, peak, limit):
    """Equity at least ``limit`` below ``peak`` (never with no positive peak)."""
    drawdown = 1.0 - equity / peak if peak > 0 else 0.0
    return drawdown >= limit


@njit(cache=True, inline="always")
def daily_loss_reached(equity, day_start, limit):
    """Equity at least ``limit`` below the day's start equity (never without a positive one)."""
    loss = 1.0 - equity / day_start if day_start > 0 else 0.0
    return loss >= limit


@njit(cache=True, inline="always")
def entry_refusal(halted, day_start_equity, cooldown_until, max_positions, daily_loss_limit, now, equity, held):
    """Why an entry at the bar opening at ``now`` may not be opened (a code; ``ADMITTED``: it may), with
    ``equity`` as of the previous close and ``held`` positions open, pending or admitted at this bar."""
    if halted:
        return REFUSED_HALTED
    if daily_loss_reached(equity, day_start_equity, daily_loss_limit):
        return REFUSED_DAILY_LOSS
    if now < cooldown_until:
        return REFUSED_COOLDOWN
    if held >= max_positions:
        return REFUSED_MAX_POSITIONS
    return ADMITTED


@njit(cache=True, inline="always")
def account_after_bar(peak, day, day_start_equity, halted, max_drawdown, today, equity):
    """The bar's closing ``equity`` on UTC day ``today``: the new (peak, day, day start equity, halted) and
    whether the drawdown halt latched at this bar."""
    if peak != peak or equity > peak:  # none yet, or a new high
        peak = equity
    if day != today:
        day, day_start_equity = today, equity
    if not halted and drawdown_reached(equity, peak, max_drawdown):
        return peak, day, day_start_equity, True, True
    return peak, day, day_start_equity, halted, False


@njit(cache=True, inline="always")
def trade_closed(losses, cooldown_until, cooldown_losses, until_if_fired, pnl):
    """One trade closed with ``pnl``: the new (losing streak, cool-down end) and whether the streak reached
    ``cooldown_losses``, which sets the cool-down to end at ``until_if_fired`` and starts the streak again."""
    losses = losses + 1 if pnl < 0 else 0
    if losses >= cooldown_losses:
        return 0, until_if_fired, True
    return losses, cooldown_until, False
