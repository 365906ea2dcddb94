"""The backtest engine: one compiled loop over bars, exact fill rules, state that survives chunking.

Inputs are aligned 2-D arrays ``(bars, symbols)`` of open/high/low/close and boolean entry/exit signals
(see :mod:`pricelevel.backtest.market`). Everything the loop knows between bars lives in :class:`EngineState`
(cash, positions, stop prices, time-stop due bars, pending orders with their stop fractions), so a run over the
whole history and the same run fed in chunks (or one bar at a time, as the live trader does) produce
identical trades and equity.

Trade semantics (each rule is tested by a hand-computed case in ``tests/test_backtest_engine.py``)
----------------------------------------------------------------------------------------------------
Long only. Within one bar, for every symbol:

1. **Pending orders** (fill ``next_open`` only). A signal seen at bar ``t``'s close is filled at bar ``t+1``'s
   open: all pending exits first, then pending entries in symbol order. A symbol without a bar (NaN open)
   keeps its order pending until its next bar.
2. **Stops** on open positions. The stop reference is the *unslipped* entry price: the entry bar's close
   (fill ``close``; this is vectorbt's ``stop_entry_price="close"``) or the fill bar's open (``next_open``).
   ``SL = ref * (1 - sl_stop)``, ``TP = ref * (1 + tp_stop)``. With fill ``close`` the entry bar itself is
   never checked (the position did not exist during it); with ``next_open`` the fill bar is checked, since
   the position existed from its open on. ``sl_stop``/``tp_stop`` are the entry's own fractions when the
   caller passes ``entry_sl``/``entry_tp`` arrays (the value at the entry *signal* bar; with ``next_open``
   it travels with the pending order), else the scalar parameters; NaN in an array means "the scalar".
   - stop-loss first: if ``open <= SL`` the exit fills at the **open** (a gap through the stop), else if
     ``low <= SL`` it fills at ``SL``;
   - only when the stop-loss did not trigger: if ``open >= TP`` the exit fills at the open, else if
     ``high >= TP`` at ``TP``. So when both are inside one bar's range the stop-loss wins (pessimistic);
   - a stop exit pays fees but **no slippage** (vectorbt's default ``stop_exit_price="stoplimit"``);
   - on a bar with a stop exit, that symbol's entry and exit signals are ignored (no re-entry on the same
     bar; the next entry can come at the next bar).
3. **Time stop** (``max_hold_bars = N``, 0: off), only when no stop-loss/take-profit triggered on the bar: a
   position held for N bars exits at the close of its N-th bar. The fill bar is bar 1 with ``next_open``
   (the position existed from its open), the bar after the entry bar with ``close``; in both modes that is
   the close N bars after the signal bar, the horizon of an "x within N bars" label. It is a market exit:
   close with slippage against us, plus fees, reason ``time_stop``; like a stop it makes the symbol ignore
   its signals on that bar. The due bar is a global bar index: a symbol without a bar then exits at the
   close of its next bar. A pending signal exit fills at the next open, so it always comes first.
4. **Signals** at the close. An entry and an exit on the same bar cancel each other (vectorbt's
   ``upon_long_conflict="ignore"``), whether or not a position is open. An exit while flat and an entry
   while already long do nothing (no pyramiding). Exits are handled for all symbols before entries, so
   cash released by an exit at this close can fund an entry at the same close.
   Fill ``close``: the order fills now at ``close``; ``next_open``: it is queued for the next open.
5. **Valuation**: ``equity = cash + sum(position * last close)``; a symbol with no bar keeps its last close.

The sizing, the stop prices, the exits inside a bar and the time stop's due bar are the compiled functions of
:mod:`pricelevel.backtest.plan` (the position plan the brokers use too), inlined into this loop.

Fills and costs (the same arithmetic as vectorbt's ``buy_nb``/``sell_nb``, so results agree to rounding):

- slippage applies to signal fills only, against us: buy at ``price * (1 + slippage)``, sell at
  ``price * (1 - slippage)``;
- fees are a fraction of the traded value on every fill: a buy of ``size`` at ``p`` costs
  ``size * p * (1 + fees)``; a sell returns ``size * p * (1 - fees)``;
- sizing decides the order's value before fees, ``V``, then ``size = V / fill_price``:
  ``all_in``: all cash, fees included (``size = cash / (1 + fees) / fill_price``, vectorbt's ``size=inf``);
  ``fraction``: ``V = fraction * equity``; ``risk``: ``V = min(risk * equity / sl_stop, fraction * equity)``,
  i.e. lose ``risk`` of equity if the stop-loss fills at its price (``sl_stop``: the entry's own fraction
  when given, else the scalar, which risk sizing therefore requires). Equity is valued at the fill moment.
  When ``V * (1 + fees)`` exceeds the cash, the order shrinks to what the cash buys (a partial fill);
- an entry is rejected (and counted) when the cash is zero, when its value is below ``min_order_value``
  (dust), or when ``max_positions`` positions are already open or pending;
- positions are fractional; a sell always closes the whole position.

Account protections (``EngineParams.protections``; off by default here, on by default in ``BacktestConfig``):
the live trader's max positions, drawdown halt, daily loss limit and cool-down, judged by the compiled
functions of :mod:`pricelevel.backtest.protections` (the trader's risk manager calls the same ones) in the
trader's order: before the bar's fills each entry signal of a symbol with a bar and no position is judged
(equity at the previous close, positions open or pending plus those admitted at this bar); entry signals of
symbols already held and refused ones are dropped for the whole bar (so they cancel no exit); after the bar's
valuation the account and each closed trade update the protections. They need the bars' times (``step(...,
times=, bar_ns=)``): the UTC day and the cool-down's end are times, as in the trader.

A position still open at the end of the data is reported as a trade with ``exit_reason="open"`` valued at
the last close with no exit fee (vectorbt's open trades). ``pnl = size * (exit - entry) - fees`` and
``return = pnl / (size * entry_price)``, entry price including slippage (vectorbt's trade records).

Differences from vectorbt's defaults, by design: vectorbt also rejects orders below ``min_size=1e-8``
units (ours is ``min_order_value`` in quote currency); its multi-column runs are independent portfolios
unless ``cash_sharing=True``, whereas ours share one cash balance across symbols.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from pricelevel.backtest.plan import (
    DUST,
    FILLED,
    NO_CASH,
    NO_EXIT,
    ExitReason,
    Sizing,
    entry_fill,
    intrabar_exit,
    is_zero,
    order_value,
    stop_prices,
    time_stop_bar,
)
from pricelevel.backtest.protections import (
    ADMITTED,
    COOLDOWN_UNTIL,
    DAY,
    DAY_NS,
    DAY_START,
    HALTED,
    LOSSES,
    PEAK,
    account_after_bar,
    entry_refusal,
    initial_guard,
    trade_closed,
)

# Integer codes the compiled loop uses (numba freezes module-level ints as constants).
_NONE, _BUY, _SELL = 0, 1, 2  # EngineState.pending
_BY_SIGNAL = int(ExitReason.SIGNAL)
_BY_TIME_STOP = int(ExitReason.TIME_STOP)
#: Longest time stop the loop represents (due bars are int64); any longer one never fires anyway.
_MAX_HOLD_CAP = 2**62
# Rejection counters (EngineState.rejected).
REJECT_NO_CASH, REJECT_DUST, REJECT_MAX_POSITIONS = NO_CASH, DUST, 2
REJECT_LABELS = ("no_cash", "dust", "max_positions")


@dataclass(frozen=True)
class EngineParams:
    """Plain numbers the compiled loop needs (built from ``BacktestConfig`` by the caller)."""

    init_cash: float = 10_000.0
    fees: float = 0.0
    slippage: float = 0.0
    sl_stop: float = float("nan")  # NaN: no stop-loss
    tp_stop: float = float("nan")  # NaN: no take-profit
    next_open: bool = False
    sizing: Sizing = Sizing.ALL_IN
    fraction: float = 1.0
    risk: float = 0.02
    min_order_value: float = 0.0
    max_positions: int = 1_000_000
    max_hold_bars: int = 0  # time stop after this many bars held; 0: off
    #: The account protections (:mod:`pricelevel.backtest.protections`); off: the plain engine.
    protections: bool = False
    protect_max_positions: int = 1_000_000
    max_drawdown: float = 1.0
    daily_loss_limit: float = 1.0
    cooldown_losses: int = 1_000_000
    cooldown_bars: int = 1

    def __post_init__(self) -> None:
        if not (self.init_cash > 0 and np.isfinite(self.init_cash)):
            raise ValueError(f"init_cash must be a positive number, got {self.init_cash}")
        for name in ("fees", "slippage", "min_order_value"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("sl_stop", "tp_stop"):
            value = getattr(self, name)
            if not (np.isnan(value) or value > 0):
                raise ValueError(f"{name} must be > 0 or NaN (off), got {value}")
        if self.sl_stop >= 1:
            raise ValueError(f"sl_stop must be below 1 (a fraction of the entry price), got {self.sl_stop}")
        if not 0 < self.fraction <= 1 or not 0 < self.risk <= 1:
            raise ValueError("fraction and risk must be in (0, 1]")
        if self.sizing == Sizing.RISK and np.isnan(self.sl_stop):
            raise ValueError("risk sizing needs a stop-loss (sl_stop): the risk is measured to the stop")
        if self.max_positions < 1:
            raise ValueError("max_positions must be >= 1")
        if self.max_hold_bars < 0:
            raise ValueError(f"max_hold_bars must be >= 0 (0: off), got {self.max_hold_bars}")
        if min(self.protect_max_positions, self.cooldown_losses, self.cooldown_bars) < 1:
            raise ValueError("protect_max_positions, cooldown_losses and cooldown_bars must be >= 1")
        if not (0 < self.max_drawdown <= 1 and 0 < self.daily_loss_limit <= 1):
            raise ValueError("max_drawdown and daily_loss_limit must be in (0, 1]")

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        floats = np.array(
            [self.fees, self.slippage, self.sl_stop, self.tp_stop, self.fraction, self.risk, self.min_order_value,
             self.max_drawdown, self.daily_loss_limit]
        )
        ints = np.array(
            [int(self.next_open), int(self.sizing), self.max_positions, min(int(self.max_hold_bars), _MAX_HOLD_CAP),
             self.protect_max_positions, self.cooldown_losses, self.cooldown_bars],
            dtype=np.int64,
        )
        return floats, ints


@dataclass
class EngineState:
    """Everything carried from one bar to the next. Mutated in place by :func:`step`."""

    cash: np.ndarray  # shape (1,)
    position: np.ndarray  # units held, per symbol
    entry_price: np.ndarray  # fill price incl. slippage
    entry_fees: np.ndarray
    entry_bar: np.ndarray  # global bar index of the entry fill
    sl_price: np.ndarray  # NaN when no stop-loss
    tp_price: np.ndarray
    last_close: np.ndarray  # valuation price (last finite close)
    pending: np.ndarray  # 0 none, 1 buy, 2 sell at the next open
    stopped_bar: np.ndarray  # last global bar with a stop or time-stop exit (signals ignored on it)
    due_bar: np.ndarray  # global bar at whose close the time stop fires; -1: none
    pending_sl: np.ndarray  # stop fractions a pending buy carries from its signal bar (NaN: the scalar)
    pending_tp: np.ndarray
    rejected: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))
    bars_done: int = 0
    #: The protections' state (:mod:`pricelevel.backtest.protections`) and the entries they refused, by code - 1.
    guard_f: np.ndarray = field(default_factory=lambda: initial_guard()[0])
    guard_i: np.ndarray = field(default_factory=lambda: initial_guard()[1])
    refused: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))

    @classmethod
    def initial(cls, n_symbols: int, init_cash: float) -> EngineState:
        def nan() -> np.ndarray:
            return np.full(n_symbols, np.nan)

        return cls(
            cash=np.array([float(init_cash)]),
            position=np.zeros(n_symbols),
            entry_price=nan(),
            entry_fees=np.zeros(n_symbols),
            entry_bar=np.full(n_symbols, -1, dtype=np.int64),
            sl_price=nan(),
            tp_price=nan(),
            last_close=nan(),
            pending=np.zeros(n_symbols, dtype=np.int8),
            stopped_bar=np.full(n_symbols, -1, dtype=np.int64),
            due_bar=np.full(n_symbols, -1, dtype=np.int64),
            pending_sl=nan(),
            pending_tp=nan(),
        )

    @property
    def n_symbols(self) -> int:
        return len(self.position)


@dataclass(frozen=True)
class ChunkResult:
    """Output of one :func:`step` call: equity per bar and the trades closed during the chunk."""

    equity: np.ndarray  # (bars,)
    trades: dict[str, np.ndarray]  # columns of TRADE_FIELDS, one row per closed trade


TRADE_FIELDS = (
    "symbol_idx", "entry_bar", "exit_bar", "entry_price", "exit_price", "size", "entry_fees", "exit_fees",
    "exit_reason",
)


def step(
    state: EngineState,
    params: EngineParams,
    open_: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    close: np.ndarray,
    entries: np.ndarray,
    exits: np.ndarray,
    *,
    entry_sl: np.ndarray | None = None,
    entry_tp: np.ndarray | None = None,
    times: np.ndarray | None = None,
    bar_ns: int = 0,
) -> ChunkResult:
    """Advance ``state`` over a chunk of bars (2-D ``(bars, symbols)`` arrays) and return what happened.

    ``entry_sl``/``entry_tp`` (optional, same shape, float): an entry signal's own stop-loss/take-profit as
    fractions of the reference price, e.g. from the nearest support/resistance; NaN: the scalar parameter.
    ``times`` (int64 ns since the epoch, UTC, one per bar: the bars' open times) and ``bar_ns`` (the bar's
    length in ns) are needed with ``params.protections`` (the UTC day and the cool-down's end are times).
    """
    arrays = [np.ascontiguousarray(a, dtype=np.float64) for a in (open_, high, low, close)]
    signals = [np.ascontiguousarray(a, dtype=np.bool_) for a in (entries, exits)]
    shape = arrays[3].shape
    if len(shape) != 2 or shape[1] != state.n_symbols:
        raise ValueError(f"expected arrays of shape (bars, {state.n_symbols}), got {shape}")
    if any(a.shape != shape for a in (*arrays, *signals)):
        raise ValueError("open, high, low, close, entries and exits must have the same shape")
    stops = [_entry_fractions(a, name, signals[0], state.n_symbols)
             for a, name in ((entry_sl, "entry_sl"), (entry_tp, "entry_tp"))]
    floats, ints = params.as_arrays()
    if params.protections:
        if times is None or bar_ns <= 0:
            raise ValueError("protections need the bars' times (times=, int64 ns) and the bar length (bar_ns=)")
        times = np.ascontiguousarray(times, dtype=np.int64)
        if times.shape != (shape[0],):
            raise ValueError(f"times must have one value per bar ({shape[0]}), got shape {times.shape}")
    else:
        times = np.empty(0, dtype=np.int64)
    flags = np.array([entry_sl is not None, entry_tp is not None])
    carried = state.pending == _BUY  # a pending buy with its own fractions needs the full loop to fill
    full = bool(flags.any() or params.max_hold_bars > 0
                or (~np.isnan(state.pending_sl[carried])).any() or (~np.isnan(state.pending_tp[carried])).any())
    capacity = int(np.count_nonzero(signals[0])) + 2 * state.n_symbols
    out_i = np.empty((capacity, 4), dtype=np.int64)  # symbol, entry bar, exit bar, reason
    out_f = np.empty((capacity, 5))  # entry price, exit price, size, entry fees, exit fees
    equity = np.empty(shape[0])
    n = _simulate(
        *arrays, *signals, *stops, flags, floats, ints, state.bars_done, True if full else None,
        True if params.protections else None, times, int(bar_ns),
        state.cash, state.position, state.entry_price, state.entry_fees, state.entry_bar, state.sl_price,
        state.tp_price, state.last_close, state.pending, state.stopped_bar, state.due_bar, state.pending_sl,
        state.pending_tp, state.rejected, state.guard_f, state.guard_i, state.refused, equity, out_i, out_f,
    )
    state.bars_done += shape[0]
    trades = {
        "symbol_idx": out_i[:n, 0].copy(), "entry_bar": out_i[:n, 1].copy(), "exit_bar": out_i[:n, 2].copy(),
        "entry_price": out_f[:n, 0].copy(), "exit_price": out_f[:n, 1].copy(), "size": out_f[:n, 2].copy(),
        "entry_fees": out_f[:n, 3].copy(), "exit_fees": out_f[:n, 4].copy(),
        "exit_reason": out_i[:n, 3].astype(np.int8),
    }
    return ChunkResult(equity=equity, trades=trades)


def _entry_fractions(values: np.ndarray | None, name: str, entries: np.ndarray, n_symbols: int) -> np.ndarray:
    """A per-entry stop array, checked where it matters (entry bars); an empty stand-in when not given.

    Values elsewhere are never read, so callers may leave anything there. The stand-in keeps one compiled
    signature and costs no memory per bar (the loop reads an array only when its flag says it was given).
    """
    if values is None:
        return np.empty((0, n_symbols))
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.shape != entries.shape:
        raise ValueError(f"{name} must have the shape of the signals {entries.shape}, got {values.shape}")
    used = values[entries]
    is_sl = name == "entry_sl"
    with np.errstate(invalid="ignore"):
        bad = ~np.isnan(used) & ((used <= 0) | ((used >= 1) if is_sl else False))
    if bad.any():
        rule = "in (0, 1)" if is_sl else "> 0"
        raise ValueError(f"{name} must be {rule} or NaN (the scalar) on entry bars, got {used[bad][0]}")
    return values


def open_trades(state: EngineState) -> dict[str, np.ndarray]:
    """Positions still open, as trades valued at the last close with no exit fee (``exit_reason=open``)."""
    idx = np.flatnonzero(state.position > 0)
    last_bar = state.bars_done - 1
    return {
        "symbol_idx": idx.astype(np.int64), "entry_bar": state.entry_bar[idx].copy(),
        "exit_bar": np.full(len(idx), last_bar, dtype=np.int64), "entry_price": state.entry_price[idx].copy(),
        "exit_price": state.last_close[idx].copy(), "size": state.position[idx].copy(),
        "entry_fees": state.entry_fees[idx].copy(), "exit_fees": np.zeros(len(idx)),
        "exit_reason": np.full(len(idx), ExitReason.OPEN, dtype=np.int8),
    }


# ------------------------------------------------------------------------------------------ compiled core
# The functions below are compiled by numba (cached on disk next to this file, so the compile cost is paid
# once per machine). They touch only numbers and preallocated arrays: no Python objects per bar or trade.
# The sizing, stop and exit arithmetic is :mod:`pricelevel.backtest.plan`'s (inlined here; numba's cache does
# not see a change there: after editing plan.py or protections.py, touch this file or clear its cache).


@njit(cache=True)
def _buy(s, price, g, equity_now, sl_stop, tp_stop, floats, ints, cash, position, entry_price, entry_fees,
         entry_bar, sl_price, tp_price, rejected):
    """Open a position at ``price`` (unslipped reference price) with these stop fractions. True if filled."""
    cash_now = cash[0]
    value = order_value(ints[1], floats[4], floats[5], sl_stop, equity_now)
    verdict, size, adj_price, paid, spent = entry_fill(value, cash_now, price, floats[0], floats[1], floats[6])
    if verdict != FILLED:
        rejected[verdict] += 1
        return False
    rest = cash_now - spent
    cash[0] = 0.0 if is_zero(rest) else rest
    position[s] = size
    entry_price[s] = adj_price
    entry_fees[s] = paid
    entry_bar[s] = g
    sl_price[s], tp_price[s] = stop_prices(price, sl_stop, tp_stop)
    return True


@njit(cache=True, inline="always")
def _fraction(given, values, t, s, scalar):
    """The entry's own stop fraction at signal bar ``t`` when given and not NaN, else the scalar."""
    if given:
        x = values[t, s]
        if x == x:
            return x
    return scalar


@njit(cache=True)
def _sell(s, price, slip, g, reason, fees, cash, position, entry_price, entry_fees, entry_bar,
          sl_price, tp_price, out_i, out_f, n):
    """Close the whole position at ``price`` (slippage ``slip``); record the trade in row ``n``."""
    size = position[s]
    adj_price = price * (1.0 - slip)
    value = size * adj_price
    paid = value * fees
    cash[0] = cash[0] + (value - paid)
    out_i[n, 0] = s
    out_i[n, 1] = entry_bar[s]
    out_i[n, 2] = g
    out_i[n, 3] = reason
    out_f[n, 0] = entry_price[s]
    out_f[n, 1] = adj_price
    out_f[n, 2] = size
    out_f[n, 3] = entry_fees[s]
    out_f[n, 4] = paid
    position[s] = 0.0
    entry_price[s] = np.nan
    entry_fees[s] = 0.0
    entry_bar[s] = -1
    sl_price[s] = np.nan
    tp_price[s] = np.nan
    return n + 1


@njit(cache=True)
def account_equity(cash, position, last_close):
    """Cash plus the positions at their last close (the paper trader's ``equity()`` is this very function)."""
    total = cash[0]
    for s in range(position.shape[0]):
        if position[s] != 0.0:
            total += position[s] * last_close[s]
    return total


@njit(cache=True, nogil=True)
def _simulate(open_, high, low, close, entries, exits, entry_sl, entry_tp, flags, floats, ints, offset, full,
              guard, times, bar_ns, cash, position, entry_price, entry_fees, entry_bar, sl_price, tp_price,
              last_close, pending, stopped_bar, due_bar, pending_sl, pending_tp, rejected, guard_f, guard_i,
              refused, equity, out_i, out_f):
    # ``full`` is None or True, so numba compiles two loops from this one source and prunes the branches
    # ``if full is not None`` from the first: runs without time stops or per-entry stops keep the plain loop
    # (the extra code alone, never executed, cost about 20 % of its speed). ``guard`` (the protections) likewise.
    fees, slippage, sl_stop, tp_stop = floats[0], floats[1], floats[2], floats[3]
    max_drawdown, daily_loss_limit = floats[7], floats[8]
    protect_max_positions, cooldown_losses, cooldown_bars = ints[4], ints[5], ints[6]
    # the entry signals the bar acts on: all of them, or (protections) those the protections admitted
    admitted = np.zeros(entries.shape[1] if guard is not None else 0, dtype=np.bool_)
    today, today_start, today_end = 0, 0, 0  # the UTC day of the bar (an integer division only when it changes)
    # the protections' state, in locals through the loop (written back at the end)
    peak, day_start_equity = guard_f[PEAK], guard_f[DAY_START]
    day, losses, cooldown_until, halted = guard_i[DAY], guard_i[LOSSES], guard_i[COOLDOWN_UNTIL], guard_i[HALTED] != 0
    next_open = ints[0] == 1
    max_positions = ints[2]
    max_hold = ints[3]
    time_stop = max_hold > 0
    has_sl, has_tp = flags[0], flags[1]
    n_bars, n_sym = close.shape
    n = 0
    n_open = 0
    n_pending_buys = 0
    for s in range(n_sym):
        if position[s] > 0.0:
            n_open += 1
        if pending[s] == _BUY:
            n_pending_buys += 1

    for t in range(n_bars):
        g = offset + t
        if guard is not None:  # 0. the trader's risk check, before the bar's fills
            now = times[t]
            if now < today_start or now >= today_end:
                today = now // DAY_NS
                today_start = today * DAY_NS
                today_end = today_start + DAY_NS
            equity_before = np.nan  # computed at the bar's first entry signal: cash + positions at the last close
            held = n_open + n_pending_buys
            for s in range(n_sym):
                ok = entries[t, s] and position[s] == 0.0
                if ok and close[t, s] == close[t, s]:
                    if equity_before != equity_before:
                        equity_before = account_equity(cash, position, last_close)
                    code = entry_refusal(halted, day_start_equity, cooldown_until, protect_max_positions,
                                         daily_loss_limit, now, equity_before, held)
                    if code == ADMITTED:
                        held += 1
                    else:
                        refused[code - 1] += 1
                        ok = False
                admitted[s] = ok
            n_before = n

        # 1. orders queued at the previous close fill at this open: exits first, then entries
        if next_open and (n_pending_buys > 0 or n_open > 0):
            for s in range(n_sym):
                if pending[s] == _SELL and open_[t, s] == open_[t, s]:
                    n = _sell(s, open_[t, s], slippage, g, _BY_SIGNAL, fees, cash, position, entry_price, entry_fees,
                              entry_bar, sl_price, tp_price, out_i, out_f, n)
                    pending[s] = _NONE
                    n_open -= 1
            if n_pending_buys > 0:
                for s in range(n_sym):
                    if pending[s] == _BUY and open_[t, s] == open_[t, s]:
                        pending[s] = _NONE
                        n_pending_buys -= 1
                        eq = cash[0]
                        for k in range(n_sym):
                            if position[k] != 0.0:
                                eq += position[k] * (open_[t, k] if open_[t, k] == open_[t, k] else last_close[k])
                        sl, tp = sl_stop, tp_stop
                        if full is not None:  # the fractions of the signal bar, carried with the order
                            if pending_sl[s] == pending_sl[s]:
                                sl = pending_sl[s]
                            if pending_tp[s] == pending_tp[s]:
                                tp = pending_tp[s]
                            pending_sl[s] = np.nan
                            pending_tp[s] = np.nan
                        if _buy(s, open_[t, s], g, eq, sl, tp, floats, ints, cash, position, entry_price,
                                entry_fees, entry_bar, sl_price, tp_price, rejected):
                            n_open += 1
                            if full is not None:
                                due_bar[s] = time_stop_bar(g, max_hold, True)

        # 2. stops, the time stop at the close, then exit signals at the close, for each open position
        if n_open > 0:
            for s in range(n_sym):
                if position[s] == 0.0:
                    continue
                o = open_[t, s]
                if o != o:  # no bar for this symbol: no stop, no signal, valued at its last close
                    continue
                reason, fill = intrabar_exit(o, high[t, s], low[t, s], sl_price[s], tp_price[s])
                if reason != NO_EXIT:
                    n = _sell(s, fill, 0.0, g, reason, fees, cash, position, entry_price, entry_fees,
                              entry_bar, sl_price, tp_price, out_i, out_f, n)
                    n_open -= 1
                    stopped_bar[s] = g
                    continue
                c = close[t, s]
                last_close[s] = c
                if full is not None and time_stop and g >= due_bar[s]:  # a market exit at the close
                    n = _sell(s, c, slippage, g, _BY_TIME_STOP, fees, cash, position, entry_price, entry_fees,
                              entry_bar, sl_price, tp_price, out_i, out_f, n)
                    n_open -= 1
                    stopped_bar[s] = g
                    continue
                entry = entries[t, s]
                if guard is not None:
                    entry = admitted[s]
                if exits[t, s] and not entry and pending[s] == _NONE:
                    if next_open:
                        pending[s] = _SELL
                    else:
                        n = _sell(s, c, slippage, g, _BY_SIGNAL, fees, cash, position, entry_price, entry_fees,
                                  entry_bar, sl_price, tp_price, out_i, out_f, n)
                        n_open -= 1

        # 3. entry signals at the close, with their own stop fractions when given
        for s in range(n_sym):
            entry = entries[t, s]
            if guard is not None:
                entry = admitted[s]
            if entry and not exits[t, s] and position[s] == 0.0 and pending[s] == _NONE \
                    and stopped_bar[s] != g:
                c = close[t, s]
                if c != c:
                    continue
                if n_open + n_pending_buys >= max_positions:
                    rejected[REJECT_MAX_POSITIONS] += 1
                elif next_open:
                    pending[s] = _BUY
                    if full is not None:  # raw: NaN stays "the scalar" until the fill
                        pending_sl[s] = entry_sl[t, s] if has_sl else np.nan
                        pending_tp[s] = entry_tp[t, s] if has_tp else np.nan
                    n_pending_buys += 1
                else:
                    sl, tp = sl_stop, tp_stop
                    if full is not None:
                        sl = _fraction(has_sl, entry_sl, t, s, sl_stop)
                        tp = _fraction(has_tp, entry_tp, t, s, tp_stop)
                    if _buy(s, c, g, account_equity(cash, position, last_close), sl, tp, floats, ints, cash, position,
                            entry_price, entry_fees, entry_bar, sl_price, tp_price, rejected):
                        last_close[s] = c
                        n_open += 1
                        if full is not None:
                            due_bar[s] = time_stop_bar(g, max_hold, False)

        # 4. mark to market (last_close is current for every open position)
        if n_open == 0:
            equity[t] = cash[0]
        else:
            equity[t] = account_equity(cash, position, last_close)

        # 5. the protections see the bar's closing equity, then each trade it closed (the trader's after_bar)
        if guard is not None:
            peak, day, day_start_equity, halted, _ = account_after_bar(
                peak, day, day_start_equity, halted, max_drawdown, today, equity[t])
            for k in range(n_before, n):
                size = out_f[k, 2]
                pnl = size * out_f[k, 1] - size * out_f[k, 0] - out_f[k, 3] - out_f[k, 4]
                losses, cooldown_until, _ = trade_closed(losses, cooldown_until, cooldown_losses,
                                                         now + bar_ns * cooldown_bars, pnl)
    if guard is not None:
        guard_f[PEAK], guard_f[DAY_START] = peak, day_start_equity
        guard_i[DAY], guard_i[LOSSES], guard_i[COOLDOWN_UNTIL], guard_i[HALTED] = day, losses, cooldown_until, halted
    return n
