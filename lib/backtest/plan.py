"""The position plan, once: how big a new position is, where its stop-loss and take-profit sit, when the time
stop closes it, and which exit a bar triggers at which price.

The compiled functions below are the arithmetic of :mod:`pricelevel.backtest.engine`'s loop (it calls them for
every entry and every open position) and of every caller outside it (:func:`plan_position` and
:func:`exit_at_bar` for the paper and exchange brokers and the risk manager), so the backtest and every broker
size and exit a position the same way (the pattern of :mod:`pricelevel.backtest.protections`). They take and
return plain numbers; "off" is NaN for a stop fraction or price, 0 for the time stop.

The rules (each hand-computed in ``tests/test_position_plan.py`` and ``tests/test_backtest_engine.py``):

- **size**: the order's value before fees ``V`` is ``inf`` (``all_in``: all the cash, fees included), ``fraction *
  equity`` (``fraction``), or ``min(risk * equity / sl_stop, fraction * equity)`` (``risk``: lose ``risk`` of
  equity if the stop-loss fills at its price). The fill price is the reference price moved ``slippage`` against
  us; a buy of value ``V`` costs ``V * (1 + fees)``; when that exceeds the cash the order shrinks to what the
  cash buys, fees included. No cash, or a value below ``min_order_value`` (dust), and there is no order;
- **stop prices** from the *unslipped* reference price (the entry bar's close, or the fill bar's open with
  ``next_open``): ``SL = ref * (1 - sl_stop)``, ``TP = ref * (1 + tp_stop)``;
- **exits inside a bar**, stop-loss first: a bar opening at or below the stop-loss fills at its open (a gap
  through the stop), else a low at or below it fills at the stop-loss; only then a bar opening at or above the
  take-profit fills at its open, else a high at or above it fills at the take-profit. Both inside one bar: the
  stop-loss (pessimistic). No slippage on these (the price is the order's);
- **the time stop**: a position held ``max_hold_bars`` bars exits at that bar's close (a market exit with
  slippage). Bars held count the bar the position existed at the open of as 1: the entry bar is bar 0 when
  filling at its close, the fill bar is bar 1 when filling at the next open;
- then the model's exit signal, at the close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from numba import njit

from pricelevel.strategy.rules import StrategyRules


class ExitReason(IntEnum):
    SIGNAL = 0
    STOP_LOSS = 1
    TAKE_PROFIT = 2
    OPEN = 3  # still open at the end of the data
    TIME_STOP = 4  # held max_hold_bars bars (codes are stored in trade records: append, never renumber)

    @property
    def label(self) -> str:
        return self.name.lower()


class Sizing(IntEnum):
    ALL_IN = 0
    FRACTION = 1
    RISK = 2


#: :func:`intrabar_exit` / :func:`exit_at_bar`: the position stays.
NO_EXIT = -1
# The codes as plain ints (numba freezes module-level ints as constants).
_SIGNAL, _STOP_LOSS, _TAKE_PROFIT, _TIME_STOP = (int(ExitReason.SIGNAL), int(ExitReason.STOP_LOSS),
                                                 int(ExitReason.TAKE_PROFIT), int(ExitReason.TIME_STOP))
_ALL_IN, _FRACTION = int(Sizing.ALL_IN), int(Sizing.FRACTION)
#: :func:`entry_fill`'s verdicts: filled, or why not (the index of the engine's rejection counter).
FILLED, NO_CASH, DUST = -1, 0, 1
REFUSAL_LABELS = ("no_cash", "dust")


@njit(cache=True, inline="always")
def is_zero(x):
    return abs(x) <= 1e-12


@njit(cache=True, inline="always")
def order_value(sizing, fraction, risk, sl_stop, equity):
    """The value a new position is bought for, before fees (``inf``: all the cash)."""
    if sizing == _ALL_IN:
        return np.inf
    if sizing == _FRACTION:
        return fraction * equity
    return min(risk * equity / sl_stop, fraction * equity)


@njit(cache=True, inline="always")
def entry_fill(value, cash, price, fees, slippage, min_value):
    """A buy of ``value`` (before fees; ``inf``: all the cash) at reference ``price``: ``(verdict, size, fill
    price, fees paid, cash spent)``; the verdict is ``FILLED``, ``NO_CASH`` or ``DUST`` (then nothing is bought).
    When ``value * (1 + fees)`` exceeds the cash it buys what the cash covers, fees included (vectorbt's partial
    fill); a value within 1e-9 of the cash is the cash (rounding must not turn "all of it" into a partial)."""
    fill_price = price * (1.0 + slippage)
    if is_zero(cash) or cash <= 0.0:
        return NO_CASH, 0.0, fill_price, 0.0, 0.0
    needed = value * (1.0 + fees)
    if needed <= cash or (needed < np.inf and abs(needed - cash) <= max(1e-9 * max(needed, cash), 1e-12)):
        size = value / fill_price
        paid = value * fees
        spent = value + paid
    else:
        most = cash / (1.0 + fees)
        size = most / fill_price
        paid = cash - most
        spent = cash
    if size * fill_price < min_value or size <= 0.0:
        return DUST, 0.0, fill_price, 0.0, 0.0
    return FILLED, size, fill_price, paid, spent


@njit(cache=True, inline="always")
def stop_prices(ref_price, sl_stop, tp_stop):
    """``(stop-loss, take-profit)`` prices from the unslipped reference price; NaN where the fraction is NaN."""
    return ref_price * (1.0 - sl_stop), ref_price * (1.0 + tp_stop)


@njit(cache=True, inline="always")
def intrabar_exit(open_, high, low, sl_price, tp_price):
    """The stop a bar triggers: ``(reason, fill price)``, reason ``STOP_LOSS``, ``TAKE_PROFIT`` or ``NO_EXIT``.
    A NaN price (or 0 / ``inf`` for a stop-loss / take-profit that is off) never triggers."""
    if open_ <= sl_price:  # a gap through the stop-loss: the open
        return _STOP_LOSS, open_
    if low <= sl_price:
        return _STOP_LOSS, sl_price
    if open_ >= tp_price:
        return _TAKE_PROFIT, open_
    if high >= tp_price:
        return _TAKE_PROFIT, tp_price
    return NO_EXIT, np.nan


@njit(cache=True, inline="always")
def time_stop_reached(bars_held, max_hold_bars):
    """The time stop fires at this bar's close (``max_hold_bars`` 0: off)."""
    return max_hold_bars > 0 and bars_held >= max_hold_bars


@njit(cache=True, inline="always")
def time_stop_bar(entry_bar, max_hold_bars, fills_at_open):
    """The bar index at whose close :func:`time_stop_reached` first holds for a position entered at bar index
    ``entry_bar`` (-1: no time stop). The bars held at bar ``g`` are ``g - entry_bar``, plus one when the
    position was filled at that bar's open (``fills_at_open``): it existed during the fill bar."""
    if max_hold_bars <= 0:
        return -1
    return entry_bar + max_hold_bars - (1 if fills_at_open else 0)


@njit(cache=True)
def exit_at_bar(open_, high, low, close, sl_price, tp_price, bars_held, max_hold_bars, signal):
    """Why and at what price an open position exits in this bar (``NO_EXIT``: it stays): the stop-loss, the
    take-profit (:func:`intrabar_exit`), then the time stop at the close, then the model's exit ``signal`` at
    the close (the price before slippage)."""
    reason, price = intrabar_exit(open_, high, low, sl_price, tp_price)
    if reason != NO_EXIT:
        return reason, price
    if time_stop_reached(bars_held, max_hold_bars):
        return _TIME_STOP, close
    if signal:
        return _SIGNAL, close
    return NO_EXIT, np.nan


# -------------------------------------------------------------------------------------------- for Python


def _fraction(value: float | None) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class PositionPlan:
    """What to buy and how it leaves: the engine's numbers for one entry (see the module docstring)."""

    #: Units bought (0 when ``refused``).
    size: float
    #: Quote value bought, before fees (``size * fill_price``), and the fees on it.
    value: float
    fee: float
    #: The reference price moved by the slippage against us.
    fill_price: float
    #: Exit prices (NaN: off); they come from the unslipped reference price.
    stop_loss: float
    take_profit: float
    #: Bars held after which the position exits at the close (0: off).
    max_hold_bars: int
    #: Why nothing is bought: "no_cash" or "dust" (``None``: the plan fills).
    refused: str | None = None

    @property
    def cost(self) -> float:
        """Cash spent: the value and its fees."""
        return self.value + self.fee


def plan_position(
    rules: StrategyRules, ref_price: float, equity: float, cash: float, *, fees: float = 0.0, slippage: float = 0.0,
    min_order_value: float = 0.0, sl_stop: float | None = None, tp_stop: float | None = None,
) -> PositionPlan:
    """The position ``rules`` open at ``ref_price`` (the unslipped reference: the entry bar's close) with this
    ``equity`` (valued at the fill) and ``cash``. ``rules`` are the executed ones (the trader's are the model's
    bounded by the risk limits: :func:`pricelevel.trading.risk.effective_rules`); ``sl_stop``/``tp_stop``
    override the rules' fractions for this entry (an entry's own stops; ``None``: the rules')."""
    sl = _fraction(rules.sl_stop if sl_stop is None else sl_stop)
    tp = _fraction(rules.tp_stop if tp_stop is None else tp_stop)
    value = order_value(int(Sizing[rules.sizing.upper()]), rules.fraction, rules.risk, sl, float(equity))
    verdict, size, fill_price, fee, spent = entry_fill(float(value), float(cash), float(ref_price), float(fees),
                                                    float(slippage), float(min_order_value))
    stop_loss, take_profit = stop_prices(float(ref_price), sl, tp)
    return PositionPlan(
        size=float(size), value=float(spent - fee), fee=float(fee), fill_price=float(fill_price),
        stop_loss=float(stop_loss), take_profit=float(take_profit), max_hold_bars=int(rules.max_hold_bars or 0),
        refused=None if verdict == FILLED else REFUSAL_LABELS[verdict],
    )


def bar_exit(
    open_: float, high: float, low: float, close: float, stop_loss: float, take_profit: float, bars_held: int,
    max_hold_bars: int | None, signal: bool,
) -> tuple[ExitReason | None, float]:
    """:func:`exit_at_bar` for Python callers: ``(reason, price)``, ``(None, nan)`` when the position stays.
    The price is where a stop fills (no slippage), or the close for the time stop and the signal."""
    reason, price = exit_at_bar(float(open_), float(high), float(low), float(close), float(stop_loss),
                                float(take_profit), int(bars_held), int(max_hold_bars or 0), bool(signal))
    return (None, math.nan) if reason == NO_EXIT else (ExitReason(reason), float(price))
