"""Hand-computed cases, one per rule in the engine's docstring (prices chosen so the arithmetic is short)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pricelevel.backtest.engine import EngineParams, EngineState, ExitReason, Sizing, open_trades, step

NAN = float("nan")


def run(bars, entries, exits, **params):
    """One symbol. ``bars``: list of (open, high, low, close). Returns (trades incl. open ones, equity, state)."""
    return run_many([bars], [entries], [exits], **params)


def run_many(bars_by_symbol, entries_by_symbol, exits_by_symbol, **params):
    params.setdefault("init_cash", 1000.0)
    p = EngineParams(**params)
    ohlc = np.array(bars_by_symbol, dtype=float).transpose(1, 0, 2)  # (bars, symbols, 4)
    state = EngineState.initial(ohlc.shape[1], p.init_cash)
    out = step(
        state, p, ohlc[..., 0], ohlc[..., 1], ohlc[..., 2], ohlc[..., 3],
        np.array(entries_by_symbol, dtype=bool).T, np.array(exits_by_symbol, dtype=bool).T,
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
     dict(sizing=Sizing.RISK), dict(max_positions=0)],
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
