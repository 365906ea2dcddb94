"""Hand-computed cases, one per rule in the engine's docstring (prices chosen so the arithmetic is short)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.engine import EngineParams, EngineState, ExitReason, Sizing, open_trades, step
from pricelevel.core.timeframes import utc_ns

NAN = float("nan")
HOUR = 3600 * 10**9


def run(bars, entries, exits, entry_sl=None, entry_tp=None, **params):
    """One symbol. ``bars``: list of (open, high, low, close). Returns (trades incl. open ones, equity, state)."""
    wrap = lambda a: None if a is None else [a]  # noqa: E731
    return run_many([bars], [entries], [exits], entry_sl=wrap(entry_sl), entry_tp=wrap(entry_tp), **params)


def run_many(bars_by_symbol, entries_by_symbol, exits_by_symbol, entry_sl=None, entry_tp=None, start=None,
             **params):
    """Like :func:`run` for several symbols; ``entry_sl``/``entry_tp``: per-symbol lists of per-bar fractions.
    ``start`` (a UTC time): hourly bars from then on, with the account protections on."""
    params.setdefault("init_cash", 1000.0)
    p = EngineParams(protections=start is not None, **params)
    ohlc = np.array(bars_by_symbol, dtype=float).transpose(1, 0, 2)  # (bars, symbols, 4)
    state = EngineState.initial(ohlc.shape[1], p.init_cash)
    per_bar = lambda a: None if a is None else np.array(a, dtype=float).T  # noqa: E731
    times = None if start is None else utc_ns(pd.date_range(start, periods=ohlc.shape[0], freq="1h", tz="UTC"))
    out = step(
        state, p, ohlc[..., 0], ohlc[..., 1], ohlc[..., 2], ohlc[..., 3],
        np.array(entries_by_symbol, dtype=bool).T, np.array(exits_by_symbol, dtype=bool).T,
        entry_sl=per_bar(entry_sl), entry_tp=per_bar(entry_tp), times=times, bar_ns=HOUR,
    )
    trades = {k: np.concatenate([out.trades[k], v]) for k, v in open_trades(state).items()}
    return trades, out.equity, state


def flat(*closes):
    """Bars whose open/high/low equal the close: no stop can trigger inside them by accident."""
    return [(c, c, c, c) for c in closes]


def reasons(trades):
    return [ExitReason(r).label for r in trades["exit_reason"]]


# ------------------------------------------------------------------------------------------- fills, costs


def test_round_trip_at_close_without_costs():
    trades, equity, state = run(flat(10, 11, 12, 13), [1, 0, 0, 0], [0, 0, 1, 0])
    assert trades["size"][0] == 100
    assert (trades["entry_bar"][0], trades["exit_bar"][0]) == (0, 2)
    assert np.allclose(equity, [1000, 1100, 1200, 1200])
    assert state.cash[0] == pytest.approx(1200)
    assert reasons(trades) == ["signal"]


def test_fees_are_charged_on_both_fills():
    trades, equity, _ = run(flat(10, 12), [1, 0], [0, 1], fees=0.01)
    size = 1000 / 1.01 / 10  # all cash, fees included
    assert trades["size"][0] == pytest.approx(size)
    assert trades["entry_fees"][0] == pytest.approx(1000 - 1000 / 1.01)
    assert trades["exit_fees"][0] == pytest.approx(size * 12 * 0.01)
    assert equity[-1] == pytest.approx(size * 12 * 0.99)


def test_slippage_moves_signal_fills_against_us():
    trades, equity, _ = run(flat(10, 12), [1, 0], [0, 1], slippage=0.01)
    assert trades["entry_price"][0] == pytest.approx(10.1)
    assert trades["exit_price"][0] == pytest.approx(11.88)
    assert equity[-1] == pytest.approx(1000 / 10.1 * 11.88)


# ---------------------------------------------------------------------------------------------------- stops


def test_stop_loss_fills_at_the_stop_price_with_fees_and_no_slippage():
    bars = [(100, 100, 100, 100), (98, 99, 89, 95)]
    trades, equity, _ = run(bars, [1, 0], [0, 0], sl_stop=0.1, slippage=0.01, fees=0.001)
    assert reasons(trades) == ["stop_loss"]
    assert trades["exit_price"][0] == pytest.approx(90)
    # the stop is measured from the unslipped close (100), not from the slipped fill (101)
    size = 1000 / 1.001 / 101
    assert equity[-1] == pytest.approx(size * 90 * 0.999)


def test_take_profit_fills_at_the_target():
    bars = [(100, 100, 100, 100), (101, 111, 100, 105)]
    trades, _, _ = run(bars, [1, 0], [0, 0], tp_stop=0.1)
    assert reasons(trades) == ["take_profit"]
    assert trades["exit_price"][0] == pytest.approx(110)


def test_stop_loss_counts_first_when_both_are_inside_one_bar():
    bars = [(100, 100, 100, 100), (100, 115, 85, 100)]
    trades, _, _ = run(bars, [1, 0], [0, 0], sl_stop=0.1, tp_stop=0.1)
    assert reasons(trades) == ["stop_loss"]
    assert trades["exit_price"][0] == pytest.approx(90)


@pytest.mark.parametrize(
    ("gap_open", "reason"), [(80.0, "stop_loss"), (120.0, "take_profit")], ids=["below-stop", "above-target"]
)
def test_a_bar_opening_beyond_a_stop_fills_at_its_open(gap_open, reason):
    bars = [(100, 100, 100, 100), (gap_open, gap_open + 1, gap_open - 1, gap_open)]
    trades, _, _ = run(bars, [1, 0], [0, 0], sl_stop=0.1, tp_stop=0.1)
    assert reasons(trades) == [reason]
    assert trades["exit_price"][0] == gap_open


def test_the_entry_bar_is_not_checked_when_filling_at_the_close():
    bars = [(100, 100, 50, 100), (100, 100, 100, 100)]  # bar 0's low is far below the stop
    trades, _, _ = run(bars, [1, 0], [0, 0], sl_stop=0.1)
    assert reasons(trades) == ["open"]


def test_signals_on_a_stop_bar_are_ignored_and_reentry_waits_a_bar():
    bars = [(100, 100, 100, 100), (95, 95, 85, 90), (90, 90, 90, 90), (90, 90, 90, 90)]
    trades, _, _ = run(bars, [1, 1, 1, 0], [0, 0, 0, 0], sl_stop=0.1)
    assert reasons(trades) == ["stop_loss", "open"]
    assert list(trades["entry_bar"]) == [0, 2]


# ------------------------------------------------------------------------------------------------ time stop


def rising(n):
    """Bar k opens at 10 + k and closes at 10.5 + k (low = open, high = close): opens and closes differ."""
    return [(10.0 + k, 10.5 + k, 10.0 + k, 10.5 + k) for k in range(n)]


@pytest.mark.parametrize("hold", [1, 3])
def test_time_stop_at_close_exits_at_the_close_n_bars_after_the_entry_bar(hold):
    trades, equity, state = run(flat(10, 11, 12, 13, 14, 15), [1, 0, 0, 0, 0, 0], [0] * 6, max_hold_bars=hold,
                                fees=0.01, slippage=0.01)
    assert reasons(trades) == ["time_stop"]
    assert (trades["entry_bar"][0], trades["exit_bar"][0]) == (0, hold)
    size = 1000 / 1.01 / 10.1
    exit_price = (10 + hold) * 0.99  # a market exit: the close, slipped against us
    assert trades["size"][0] == pytest.approx(size)
    assert trades["exit_price"][0] == pytest.approx(exit_price)
    assert trades["exit_fees"][0] == pytest.approx(size * exit_price * 0.01)
    pnl = size * (exit_price - 10.1) - trades["entry_fees"][0] - trades["exit_fees"][0]
    assert pnl == pytest.approx(size * exit_price * 0.99 - 1000)
    assert np.allclose(equity[hold:], size * exit_price * 0.99)  # flat from the exit on
    assert state.cash[0] == pytest.approx(size * exit_price * 0.99)


@pytest.mark.parametrize("hold", [1, 3])
def test_time_stop_with_next_open_counts_the_fill_bar_as_the_first_bar_held(hold):
    trades, _, _ = run(rising(6), [1, 0, 0, 0, 0, 0], [0] * 6, max_hold_bars=hold, next_open=True, slippage=0.01)
    # signal at bar 0, filled at bar 1's open (11), out at the close of bar 0 + hold: the label's horizon
    assert reasons(trades) == ["time_stop"]
    assert (trades["entry_bar"][0], trades["exit_bar"][0]) == (1, hold)
    assert trades["entry_price"][0] == pytest.approx(11 * 1.01)
    assert trades["exit_price"][0] == pytest.approx((10.5 + hold) * 0.99)


def test_a_stop_loss_before_the_due_bar_wins():
    bars = [(100, 100, 100, 100), (95, 96, 89, 92), (92, 92, 92, 92), (92, 92, 92, 92)]
    trades, _, _ = run(bars, [1, 0, 0, 0], [0] * 4, max_hold_bars=3, sl_stop=0.1)
    assert reasons(trades) == ["stop_loss"]
    assert trades["exit_bar"][0] == 1 and trades["exit_price"][0] == pytest.approx(90)


@pytest.mark.parametrize(
    ("due_bar", "reason", "price"),
    [((101, 111, 100, 105), "take_profit", 110.0), ((99, 100, 85, 95), "stop_loss", 90.0)],
    ids=["take-profit", "stop-loss"],
)
def test_a_stop_inside_the_due_bar_wins_over_the_time_stop(due_bar, reason, price):
    bars = [(100, 100, 100, 100), (100, 100, 100, 100), due_bar]
    trades, _, _ = run(bars, [1, 0, 0], [0] * 3, max_hold_bars=2, sl_stop=0.1, tp_stop=0.1, slippage=0.01)
    assert reasons(trades) == [reason]  # intrabar first; the time stop would have sold at 95 or 105 * 0.99
    assert trades["exit_bar"][0] == 2 and trades["exit_price"][0] == pytest.approx(price)


def test_signals_on_the_time_stop_bar_are_ignored():
    trades, _, _ = run(flat(10, 10, 10, 10), [1, 1, 1, 0], [0, 0, 0, 0], max_hold_bars=1)
    assert reasons(trades) == ["time_stop", "time_stop"]
    assert list(trades["entry_bar"]) == [0, 2] and list(trades["exit_bar"]) == [1, 3]  # no re-entry at bar 1
    trades, _, state = run(flat(10, 10, 10, 10, 10), [1, 0, 1, 0, 0], [0] * 5, max_hold_bars=2, next_open=True)
    assert reasons(trades) == ["time_stop"] and trades["exit_bar"][0] == 2  # the entry at bar 2 is not queued
    assert state.pending[0] == 0 and state.position[0] == 0


def test_an_exit_signal_before_the_due_bar_closes_first():
    trades, _, _ = run(rising(5), [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], max_hold_bars=2, next_open=True)
    assert reasons(trades) == ["signal"]  # queued at bar 1's close, filled at the due bar's open
    assert (trades["exit_bar"][0], trades["exit_price"][0]) == (2, 12.0)


def test_a_symbol_without_a_bar_at_the_due_bar_exits_at_its_next_close():
    bars = [(10, 10, 10, 10), (10, 10, 10, 10), (NAN, NAN, NAN, NAN), (12, 12, 12, 12)]
    trades, _, _ = run(bars, [1, 0, 0, 0], [0] * 4, max_hold_bars=2)
    assert reasons(trades) == ["time_stop"]
    assert trades["exit_bar"][0] == 3 and trades["exit_price"][0] == 12


def test_time_stop_off_or_beyond_the_data_keeps_the_position():
    for hold in (0, 4, 10**30):  # 0 is off; longer holds never come due (huge ones are capped, not overflowed)
        trades, _, _ = run(flat(10, 11, 12, 13), [1, 0, 0, 0], [0] * 4, max_hold_bars=hold)
        assert reasons(trades) == ["open"], hold


def chunked(p, n_symbols, arrays, cut, entry_sl=None, entry_tp=None):
    """``step`` over bars ``[:cut]`` then ``[cut:]``; trades of both chunks, open ones last, and the state."""
    state = EngineState.initial(n_symbols, p.init_cash)
    parts = []
    for part in (slice(0, cut), slice(cut, None)):
        out = step(state, p, *(a[part] for a in arrays),
                   entry_sl=None if entry_sl is None else entry_sl[part],
                   entry_tp=None if entry_tp is None else entry_tp[part])
        parts.append(out.trades)
    parts.append(open_trades(state))
    return {k: np.concatenate([t[k] for t in parts]) for k in parts[0]}, state


def as_arrays(bars, entries, exits):
    ohlc = np.array(bars, dtype=float)[:, None, :]
    col = lambda a: np.array(a, dtype=bool)[:, None]  # noqa: E731
    return (ohlc[..., 0], ohlc[..., 1], ohlc[..., 2], ohlc[..., 3], col(entries), col(exits))


@pytest.mark.parametrize("next_open", [False, True], ids=["close", "next_open"])
def test_a_time_stop_due_in_the_next_chunk_fires_there(next_open):
    arrays = as_arrays(flat(10, 11, 12, 13, 14, 15, 16, 17), [0, 1, 0, 0, 0, 0, 0, 0], [0] * 8)
    p = EngineParams(init_cash=1000.0, max_hold_bars=3, next_open=next_open, slippage=0.001)
    whole = step(EngineState.initial(1, p.init_cash), p, *arrays)
    # close: entered at bar 1's close (the last bar of chunk 1); next_open: still pending at the cut
    trades, state = chunked(p, 1, arrays, cut=2)
    assert reasons(trades) == ["time_stop"]
    assert trades["exit_bar"][0] == 4  # the signal bar 1 + 3, in both fill modes
    assert trades["exit_price"][0] == pytest.approx(14 * 0.999)
    for name, column in whole.trades.items():
        assert np.array_equal(trades[name], column), name


# ------------------------------------------------------------------------------------------ per-entry stops


@pytest.mark.parametrize("next_open", [False, True], ids=["close", "next_open"])
def test_entry_stops_differ_per_signal_and_symbol(next_open):
    # A: take-profit 5 % (target 105, hit on bar 1); B: stop-loss 2 % (98, hit on bar 1). The scalar stops
    # (20 %) would hit neither. Bar 1's values are decoys: with next_open the order fills on bar 1 but must
    # carry the fractions of its signal bar 0.
    bars_a = [(100, 100, 100, 100), (100, 106, 100, 102), (102, 102, 102, 102)]
    bars_b = [(100, 100, 100, 100), (100, 101, 97, 99), (99, 99, 99, 99)]
    trades, _, _ = run_many(
        [bars_a, bars_b], [[1, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]],
        entry_sl=[[NAN, 0.5, NAN], [0.02, 0.5, NAN]], entry_tp=[[0.05, 0.5, NAN], [NAN, 0.5, NAN]],
        sl_stop=0.2, tp_stop=0.2, next_open=next_open, sizing=Sizing.FRACTION, fraction=0.4,
    )
    by_symbol = {int(s): i for i, s in enumerate(trades["symbol_idx"])}
    a, b = by_symbol[0], by_symbol[1]
    assert [reasons(trades)[i] for i in (a, b)] == ["take_profit", "stop_loss"]
    assert trades["exit_price"][a] == pytest.approx(105) and trades["exit_price"][b] == pytest.approx(98)
    assert list(trades["exit_bar"]) == [1, 1]
    assert list(trades["entry_bar"]) == [int(next_open)] * 2


def test_a_nan_entry_stop_falls_back_to_the_scalar_and_fractions_do_not_leak():
    bars = [(100, 100, 100, 100), (101, 106, 100, 102), (100, 100, 100, 100), (100, 108, 100, 107),
            (107, 111, 106, 110)]
    trades, _, _ = run(bars, [1, 0, 1, 0, 0], [0] * 5, entry_tp=[0.05, NAN, NAN, NAN, NAN], tp_stop=0.1)
    assert reasons(trades) == ["take_profit", "take_profit"]
    # first entry: its own 5 % (105 on bar 1); second: the scalar 10 % (110 on bar 4, not 105 on bar 3)
    assert list(trades["exit_bar"]) == [1, 4]
    assert list(trades["exit_price"]) == pytest.approx([105, 110])
    trades, _, _ = run(bars, [1, 0, 0, 0, 0], [0] * 5, entry_sl=[NAN] * 5, entry_tp=[NAN] * 5)
    assert reasons(trades) == ["open"]  # NaN with the scalar off: no stop at all


@pytest.mark.parametrize("next_open", [False, True], ids=["close", "next_open"])
@pytest.mark.parametrize(
    ("entry_sl", "value"), [(0.1, 200.0), (NAN, 400.0), (0.01, 500.0)], ids=["own-stop", "scalar", "fraction-cap"]
)
def test_risk_sizing_uses_the_entry_s_own_stop(entry_sl, value, next_open):
    trades, _, _ = run(flat(10, 10, 10), [1, 0, 0], [0] * 3, entry_sl=[entry_sl, 0.5, 0.5], sizing=Sizing.RISK,
                       risk=0.02, sl_stop=0.05, fraction=0.5, next_open=next_open)
    assert trades["size"][0] * 10 == pytest.approx(value)  # 2 % of 1000 over the stop, at most 50 % of 1000


@pytest.mark.parametrize("second", ["nan", "none"], ids=["chunk2-nan", "chunk2-no-arrays"])
@pytest.mark.parametrize("next_open", [False, True], ids=["close", "next_open"])
def test_entry_stops_survive_a_chunk_boundary(next_open, second):
    # signal at bar 1 with its own 5 % stop; with next_open it is still pending at the cut, and chunk 2
    # (arrays of NaN, i.e. the scalar: none; or no arrays at all) must not replace the fraction it carries
    bars = [(100, 100, 100, 100), (100, 100, 100, 100), (100, 100, 100, 100), (96, 97, 94, 95)]
    arrays = as_arrays(bars, [0, 1, 0, 0], [0] * 4)
    sl = np.array([[NAN], [0.05], [NAN], [NAN]])
    p = EngineParams(init_cash=1000.0, next_open=next_open)
    state = EngineState.initial(1, p.init_cash)
    first = step(state, p, *(a[:2] for a in arrays), entry_sl=sl[:2])
    rest = step(state, p, *(a[2:] for a in arrays), entry_sl=sl[2:] if second == "nan" else None)
    trades = {k: np.concatenate([first.trades[k], rest.trades[k]]) for k in first.trades}
    assert reasons(trades) == ["stop_loss"]
    assert trades["exit_bar"][0] == 3 and trades["exit_price"][0] == pytest.approx(95)
    whole = step(EngineState.initial(1, p.init_cash), p, *arrays, entry_sl=sl)
    for name, column in whole.trades.items():
        assert np.array_equal(trades[name], column), name


@pytest.mark.parametrize(
    ("name", "value"), [("entry_sl", 1.0), ("entry_sl", 0.0), ("entry_tp", -0.1), ("entry_tp", 0.0)], ids=str
)
def test_invalid_entry_stops_on_entry_bars_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        run(flat(10, 10), [1, 0], [0, 0], **{name: [value, NAN]})
    trades, _, _ = run(flat(10, 10), [0, 1], [0, 0], **{name: [value, NAN]})  # not an entry bar: unused
    assert reasons(trades) == ["open"]


def test_entry_stops_of_the_wrong_shape_are_refused():
    state = EngineState.initial(1, 1000)
    one = np.ones((3, 1))
    with pytest.raises(ValueError, match="entry_tp must have the shape"):
        step(state, EngineParams(), one, one, one, one, one.astype(bool), one.astype(bool), entry_tp=np.ones((2, 1)))


# -------------------------------------------------------------------------------------------------- signals


def test_entry_and_exit_on_one_bar_cancel_out():
    trades, equity, _ = run(flat(10, 11, 12), [1, 1, 0], [1, 1, 0])
    assert len(trades["size"]) == 0  # flat: no entry at bar 0; bar 1 also has both
    trades, _, _ = run(flat(10, 11, 12), [1, 1, 0], [0, 1, 0])
    assert reasons(trades) == ["open"]  # long: the exit on bar 1 is cancelled by the entry
    assert trades["entry_bar"][0] == 0


def test_no_pyramiding_and_no_exit_while_flat():
    trades, _, _ = run(flat(10, 11, 12, 13), [1, 1, 1, 0], [0, 0, 0, 1])
    assert list(trades["entry_bar"]) == [0]
    trades, _, _ = run(flat(10, 11), [0, 0], [1, 1])
    assert len(trades["size"]) == 0


def test_next_open_fills_at_the_following_open_and_checks_stops_on_that_bar():
    bars = [(10, 10, 10, 10), (11, 11, 9.8, 10.5), (10.5, 10.5, 10.5, 10.5)]
    trades, _, _ = run(bars, [1, 0, 0], [0, 0, 0], next_open=True, sl_stop=0.1, slippage=0.01)
    # entry at bar 1's open (11, slipped to 11.11); the stop (11 * 0.9 = 9.9) is hit later in bar 1
    assert trades["entry_price"][0] == pytest.approx(11.11)
    assert (trades["entry_bar"][0], trades["exit_bar"][0]) == (1, 1)
    assert reasons(trades) == ["stop_loss"]
    assert trades["exit_price"][0] == pytest.approx(9.9)


def test_next_open_exit_signal_fills_at_the_next_open():
    bars = [(10, 10, 10, 10), (11, 11, 11, 11), (12, 12, 12, 12), (14, 14, 14, 14)]
    trades, equity, _ = run(bars, [1, 0, 0, 0], [0, 0, 1, 0], next_open=True)
    assert (trades["entry_bar"][0], trades["exit_bar"][0]) == (1, 3)
    assert trades["exit_price"][0] == 14
    assert equity[-1] == pytest.approx(1000 / 11 * 14)


def test_a_signal_on_the_last_bar_stays_pending():
    _, equity, state = run(flat(10, 11), [0, 1], [0, 0], next_open=True)
    assert list(equity) == [1000, 1000]
    assert state.pending[0] == 1  # fills at the next chunk's first open


# --------------------------------------------------------------------------------------------------- sizing


def test_fraction_sizing_invests_a_share_of_equity():
    trades, _, state = run(flat(10, 10), [1, 0], [0, 0], sizing=Sizing.FRACTION, fraction=0.1, fees=0.001)
    assert trades["size"][0] == pytest.approx(10)  # 10 % of 1000 at 10
    assert state.cash[0] == pytest.approx(1000 - 100 - 0.1)


@pytest.mark.parametrize(("fraction", "value"), [(0.5, 400.0), (0.3, 300.0)], ids=["risk-bound", "fraction-cap"])
def test_risk_sizing_loses_the_risk_at_the_stop_capped_by_the_fraction(fraction, value):
    trades, _, _ = run(flat(10, 10), [1, 0], [0, 0], sizing=Sizing.RISK, risk=0.02, sl_stop=0.05, fraction=fraction)
    assert trades["size"][0] * 10 == pytest.approx(value)  # 2 % of 1000 / 5 % stop = 400


def test_dust_orders_are_rejected():
    trades, _, state = run(flat(10, 10), [1, 0], [0, 0], sizing=Sizing.FRACTION, fraction=0.01, min_order_value=50)
    assert len(trades["size"]) == 0
    assert state.rejected.tolist() == [0, 1, 0]


def test_a_short_cash_balance_buys_what_it_covers():
    bars = [flat(10, 10), flat(20, 20)]
    trades, _, state = run_many(bars, [[1, 0], [1, 0]], [[0, 0], [0, 0]], sizing=Sizing.FRACTION, fraction=0.6,
                                fees=0.01)
    cash_left = 1000 - 600 * 1.01
    assert trades["size"][1] == pytest.approx(cash_left / 1.01 / 20)
    assert state.cash[0] == pytest.approx(0, abs=1e-9)


# ------------------------------------------------------------------------------------------------ portfolio


def test_max_positions_caps_concurrent_positions_in_symbol_order():
    bars = [flat(10, 10)] * 3
    trades, _, state = run_many(bars, [[1, 0]] * 3, [[0, 0]] * 3, sizing=Sizing.FRACTION, fraction=0.2,
                                max_positions=2)
    assert sorted(trades["symbol_idx"].tolist()) == [0, 1]
    assert state.rejected.tolist() == [0, 0, 1]


def test_symbols_share_one_cash_balance():
    trades, _, state = run_many([flat(10, 10), flat(10, 10)], [[1, 0], [1, 0]], [[0, 0], [0, 0]])
    assert trades["symbol_idx"].tolist() == [0]  # all-in on the first; nothing left for the second
    assert state.rejected.tolist() == [1, 0, 0]


def test_exits_release_cash_before_entries_at_the_same_close():
    trades, _, _ = run_many([flat(10, 20, 20), flat(5, 5, 5)], [[1, 0, 0], [0, 1, 0]], [[0, 1, 0], [0, 0, 0]])
    assert reasons(trades) == ["signal", "open"]
    assert trades["size"][1] == pytest.approx(2000 / 5)  # bought with the proceeds of symbol 0


def test_a_symbol_without_a_bar_is_neither_traded_nor_stopped_and_keeps_its_value():
    a = [(100, 100, 100, 100), (NAN, NAN, NAN, NAN), (100, 100, 100, 100)]
    trades, equity, _ = run(a, [1, 1, 0], [0, 0, 0], sl_stop=0.01)
    assert reasons(trades) == ["open"]
    assert list(equity) == [1000, 1000, 1000]


def test_an_open_position_is_valued_at_the_last_close():
    trades, equity, _ = run(flat(10, 15), [1, 0], [0, 0], fees=0.01)
    assert reasons(trades) == ["open"]
    assert trades["exit_price"][0] == 15 and trades["exit_fees"][0] == 0
    assert equity[-1] == pytest.approx(1000 / 1.01 / 10 * 15)


def test_chunks_and_single_bars_give_the_same_result_as_one_run():
    rng = np.random.default_rng(3)
    n, s = 400, 3
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, (n, s)), axis=0))
    open_ = close * (1 + rng.normal(0, 0.005, (n, s)))
    high = np.maximum(open_, close) * 1.01
    low = np.minimum(open_, close) * 0.99
    entries, exits = rng.random((n, s)) < 0.1, rng.random((n, s)) < 0.1
    p = EngineParams(fees=0.001, slippage=0.001, sl_stop=0.03, tp_stop=0.05, next_open=True,
                     sizing=Sizing.FRACTION, fraction=0.4, max_positions=2)
    whole = EngineState.initial(s, p.init_cash)
    expected = step(whole, p, open_, high, low, close, entries, exits)
    streamed = EngineState.initial(s, p.init_cash)
    equity, trades = [], []
    for t in range(n):  # the live trader's way: one bar at a time
        out = step(streamed, p, open_[t:t + 1], high[t:t + 1], low[t:t + 1], close[t:t + 1], entries[t:t + 1],
                   exits[t:t + 1])
        equity.append(out.equity)
        trades.append(out.trades)
    assert np.array_equal(np.concatenate(equity), expected.equity)
    for name, column in expected.trades.items():
        assert np.array_equal(np.concatenate([t[name] for t in trades]), column), name
    assert streamed.cash[0] == whole.cash[0]


@pytest.mark.parametrize(
    "bad",
    [dict(init_cash=0), dict(fees=-0.1), dict(sl_stop=1.5), dict(sl_stop=0.0), dict(fraction=0),
     dict(sizing=Sizing.RISK), dict(max_positions=0), dict(max_hold_bars=-1)],
    ids=str,
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        EngineParams(**bad)


def test_shape_mismatch_is_refused():
    state = EngineState.initial(2, 1000)
    one = np.ones((3, 1))
    with pytest.raises(ValueError, match="shape"):
        step(state, EngineParams(), one, one, one, one, one.astype(bool), one.astype(bool))
    assert math.isclose(state.cash[0], 1000)


# ---------------------------------------------------------------------------------- account protections
# The trader's protections (pricelevel.backtest.protections), one hand-computed case each: flat bars, fill at
# the close, all-in, no costs, hourly bars (``start=`` switches them on).


def guarded(bars, entries, exits, start="2024-01-01 00:00", **params):
    return run_many([bars], [entries], [exits], start=start, **params)


def spans(trades):
    return list(zip(trades["entry_bar"].tolist(), trades["exit_bar"].tolist(), reasons(trades), strict=True))


def test_the_drawdown_halt_latches_after_the_bar_that_breached_it():
    # bar 0: in at 10 (equity 1000, the peak); bar 1 closes at 7.9: equity 790, 21 % below the peak >= 20 %:
    # halted after bar 1; the exit at bar 2 goes through (exits are never refused), the entries at 3 and 4 not
    trades, _, state = guarded(flat(10, 7.9, 7.9, 10, 10), [1, 0, 0, 1, 1], [0, 0, 1, 0, 0], max_drawdown=0.2)
    assert spans(trades) == [(0, 2, "signal")]
    assert state.refused.tolist() == [2, 0, 0, 0]
    assert state.guard_f[0] == 1000 and state.guard_i[3] == 1
    # 7.9 -> 8.1: 19 % is not 20 %
    trades, _, state = guarded(flat(10, 8.1, 8.1, 10, 10), [1, 0, 0, 1, 0], [0, 0, 1, 0, 0], max_drawdown=0.2)
    assert spans(trades) == [(0, 2, "signal"), (3, 4, "open")] and state.refused.sum() == 0


def test_the_daily_loss_limit_counts_from_the_equity_after_the_days_first_bar():
    # 21:00 in at 10 (day start 1000); 22:00 out at 9.4 (equity 940, 6 % down); 23:00 entry refused; 00:00 is a
    # new UTC day but the trader judges its entries before the bar, against yesterday's start: refused; after
    # it the day's start is 940, so the entry at 01:00 goes through
    trades, _, state = guarded(flat(10, 9.4, 9.4, 9.4, 9.4), [1, 0, 1, 1, 1], [0, 1, 0, 0, 0],
                               start="2024-01-01 21:00", daily_loss_limit=0.05)
    assert spans(trades) == [(0, 1, "signal"), (4, 4, "open")]
    assert state.refused.tolist() == [0, 2, 0, 0]
    trades, _, state = guarded(flat(10, 9.6, 9.6, 9.6, 9.6), [1, 0, 1, 1, 1], [0, 1, 0, 0, 0],
                               start="2024-01-01 21:00", daily_loss_limit=0.05)  # 4 % down: no refusal
    assert spans(trades) == [(0, 1, "signal"), (2, 4, "open")] and state.refused.sum() == 0


def test_the_cooldown_follows_consecutive_losses_for_cooldown_bars_bars():
    # losses close at 01:00 and 03:00: two in a row, cool-down until 03:00 + 3 h; entries at 04:00 and 05:00
    # are refused, the one at 06:00 goes through
    trades, _, state = guarded(flat(10, 9, 9, 8, 8, 8, 8, 8), [1, 0, 1, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 0, 0, 0],
                               cooldown_losses=2, cooldown_bars=3)
    assert spans(trades) == [(0, 1, "signal"), (2, 3, "signal"), (6, 7, "open")]
    assert state.refused.tolist() == [0, 0, 2, 0]
    # loss, win, loss: the win starts the streak again, no cool-down
    trades, _, state = guarded(flat(10, 9, 9, 10, 10, 9, 9), [1, 0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0],
                               cooldown_losses=2, cooldown_bars=3)
    assert len(trades["size"]) == 4 and state.refused.sum() == 0


def test_max_positions_is_judged_before_the_bars_fills_and_counts_this_bars_entries():
    both = [flat(10, 10), flat(10, 10)]
    trades, _, state = run_many(both, [[1, 0], [1, 0]], [[0, 0], [0, 0]], start="2024-01-01", sizing=Sizing.FRACTION,
                                fraction=0.2, protect_max_positions=1)
    assert trades["symbol_idx"].tolist() == [0] and state.refused.tolist() == [0, 0, 0, 1]
    # symbol 0 is stopped out inside bar 1 (stop 9); the trader saw it held when it judged symbol 1's entry
    stopped = [[(10, 10, 10, 10), (10, 10, 8, 9)], flat(10, 10)]
    signals = dict(entries_by_symbol=[[1, 0], [0, 1]], exits_by_symbol=[[0, 0], [0, 0]], sl_stop=0.1,
                   sizing=Sizing.FRACTION, fraction=0.2)
    trades, _, state = run_many(stopped, **signals, start="2024-01-01", protect_max_positions=1)
    assert reasons(trades) == ["stop_loss"] and state.refused.tolist() == [0, 0, 0, 1]
    trades, _, _ = run_many(stopped, **signals, max_positions=1)  # the engine's own limit counts after the stop
    assert reasons(trades) == ["stop_loss", "open"]


def test_with_protections_a_held_symbols_entry_signal_is_not_passed_on_as_by_the_trader():
    # entry and exit while held: the trader asks nothing for a held symbol, so the exit goes through
    trades, _, _ = guarded(flat(10, 11, 12), [1, 1, 0], [0, 1, 0])
    assert spans(trades) == [(0, 1, "signal")]
    # next open: the exit queued at bar 1 fills at bar 2's open; bar 2's entry came while still held: dropped
    trades, _, state = guarded(flat(10, 11, 12, 13), [1, 0, 1, 0], [0, 1, 0, 0], next_open=True)
    assert spans(trades) == [(1, 2, "signal")] and state.pending.tolist() == [0]
    trades, _, _ = run(flat(10, 11, 12, 13), [1, 0, 1, 0], [0, 1, 0, 0], next_open=True)  # the plain engine re-enters
    assert spans(trades) == [(1, 2, "signal"), (3, 3, "open")]


def test_protections_need_the_bars_times():
    one = np.ones((2, 1))
    with pytest.raises(ValueError, match="times"):
        step(EngineState.initial(1, 1000), EngineParams(protections=True), one, one, one, one, one.astype(bool),
             one.astype(bool))
