"""The position plan (:mod:`pricelevel.backtest.plan`): hand-computed cases of each rule, and a property that the
engine's loop and the Python callers (the brokers) reach the same size, stops, exit and price on random bars."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.engine import EngineState, open_trades, step
from pricelevel.backtest.plan import (
    DUST,
    FILLED,
    NO_CASH,
    NO_EXIT,
    ExitReason,
    PositionPlan,
    Sizing,
    bar_exit,
    entry_fill,
    exit_at_bar,
    intrabar_exit,
    order_value,
    plan_position,
    stop_prices,
    time_stop_bar,
    time_stop_reached,
)
from pricelevel.backtest.run import engine_params
from pricelevel.backtest.trading import with_rules
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.risk import effective_rules, position_value

NAN = math.nan
SL, TP = 98.0, 104.0  # the stops of a position entered at 100 with sl_stop 0.02, tp_stop 0.04


# ------------------------------------------------------------------------------------------------ size


@pytest.mark.parametrize(("sizing", "fraction", "risk", "sl_stop", "value"), [
    (Sizing.ALL_IN, 0.1, 0.02, NAN, math.inf),
    (Sizing.FRACTION, 0.1, 0.02, NAN, 1_000.0),
    (Sizing.RISK, 0.5, 0.02, 0.05, 4_000.0),  # lose 2 % of 10 000 at a 5 % stop: 4 000 (under the 5 000 cap)
    (Sizing.RISK, 0.1, 0.02, 0.05, 1_000.0),  # the same capped at 10 % of equity
    (Sizing.RISK, 0.5, 0.02, 0.5, 400.0),  # a wide stop: the risk rule binds
])
def test_order_value_by_sizing(sizing, fraction, risk, sl_stop, value):
    assert order_value(int(sizing), fraction, risk, sl_stop, 10_000.0) == pytest.approx(value)


def test_a_fill_pays_slippage_on_the_price_and_fees_on_top_of_the_value():
    verdict, size, price, fee, spent = entry_fill(1_000.0, 10_000.0, 100.0, 0.001, 0.01, 5.0)
    assert verdict == FILLED and price == pytest.approx(101.0)
    assert size == pytest.approx(1_000 / 101) and fee == pytest.approx(1.0) and spent == pytest.approx(1_001.0)


@pytest.mark.parametrize(("value", "cash", "bought", "fee"), [
    (1_000.0, 500.5, 500.0, 0.5),  # short of cash: what 500.5 buys, fees included
    (math.inf, 1_001.0, 1_000.0, 1.0),  # all in
    (1_000.0, 1_001.0 * (1 + 1e-12), 1_000.0, 1.0),  # within rounding of the cash: the order itself, no partial
])
def test_what_the_cash_covers(value, cash, bought, fee):
    verdict, size, price, paid, spent = entry_fill(value, cash, 100.0, 0.001, 0.0, 0.0)
    assert verdict == FILLED and size * price == pytest.approx(bought) and paid == pytest.approx(fee)
    assert spent == pytest.approx(min(cash, bought + fee))


@pytest.mark.parametrize(("value", "cash", "verdict"), [(1_000.0, 0.0, NO_CASH), (1_000.0, 1e-13, NO_CASH),
                                                         (4.0, 1_000.0, DUST), (1_000.0, 4.0, DUST)])
def test_no_cash_or_dust_buys_nothing(value, cash, verdict):
    assert entry_fill(value, cash, 100.0, 0.0, 0.0, 5.0)[:2] == (verdict, 0.0)


# ------------------------------------------------------------------------------------------------ stops


def test_stop_prices_from_the_reference_price():
    assert stop_prices(100.0, 0.02, 0.04) == pytest.approx((SL, TP))
    assert all(math.isnan(p) for p in stop_prices(100.0, NAN, NAN))


@pytest.mark.parametrize(("bar", "reason", "price"), [
    ((100, 103, 99), NO_EXIT, NAN),
    ((100, 103, 97), ExitReason.STOP_LOSS, SL),  # the low touches the stop: its price
    ((95, 99, 94), ExitReason.STOP_LOSS, 95.0),  # a gap through the stop: the open
    ((98, 99, 97), ExitReason.STOP_LOSS, 98.0),  # opening at the stop is through it
    ((100, 105, 97), ExitReason.STOP_LOSS, SL),  # both inside one bar: the stop-loss wins
    ((100, 105, 99), ExitReason.TAKE_PROFIT, TP),  # the high touches the target: its price
    ((106, 108, 105), ExitReason.TAKE_PROFIT, 106.0),  # a gap above the target: the open
])
def test_intrabar_exit(bar, reason, price):
    got_reason, got_price = intrabar_exit(*map(float, bar), SL, TP)
    assert got_reason == reason
    assert got_price == pytest.approx(price, nan_ok=True)


@pytest.mark.parametrize(("sl", "tp"), [(NAN, NAN), (0.0, math.inf)])  # off: the engine's NaN, the broker's 0 / inf
def test_stops_that_are_off_never_trigger(sl, tp):
    assert intrabar_exit(1.0, 1e9, 1e-9, sl, tp)[0] == NO_EXIT


# ------------------------------------------------------------------------------------------ time stop, order


def test_the_time_stop():
    assert time_stop_reached(3, 3) and time_stop_reached(4, 3)
    assert not time_stop_reached(2, 3) and not time_stop_reached(10**9, 0)
    assert time_stop_bar(10, 3, False) == 13  # filled at bar 10's close: the close 3 bars later
    assert time_stop_bar(10, 3, True) == 12  # filled at bar 10's open: bar 10 is the first bar held
    assert time_stop_bar(10, 0, False) == -1


@pytest.mark.parametrize(("bar", "held", "signal", "reason", "price"), [
    ((100, 103, 97, 101), 5, True, ExitReason.STOP_LOSS, SL),  # a stop wins over the time stop and the signal
    ((100, 105, 99, 101), 5, True, ExitReason.TAKE_PROFIT, TP),
    ((100, 103, 99, 101), 5, True, ExitReason.TIME_STOP, 101.0),  # the time stop, at the close
    ((100, 103, 99, 101), 4, True, ExitReason.SIGNAL, 101.0),  # the model's exit, at the close
    ((100, 103, 99, 101), 4, False, NO_EXIT, NAN),
])
def test_exit_priority(bar, held, signal, reason, price):
    got_reason, got_price = exit_at_bar(*map(float, bar), SL, TP, held, 5, signal)
    assert got_reason == reason
    assert got_price == pytest.approx(price, nan_ok=True)
    assert bar_exit(*bar, SL, TP, held, 5, signal) == ((None, pytest.approx(NAN, nan_ok=True)) if reason == NO_EXIT
                                                       else (ExitReason(reason), pytest.approx(price)))


# ------------------------------------------------------------------------------------------------ the plan


def test_a_plan_from_the_rules():
    rules = StrategyRules(threshold=0.5, sl_stop=0.02, tp_stop=0.04, max_hold_bars=6, sizing="risk", risk=0.02,
                          fraction=0.1)
    plan = plan_position(rules, 100.0, equity=10_000.0, cash=10_000.0, fees=0.001, slippage=0.001)
    assert plan == PositionPlan(size=pytest.approx(1_000 / 100.1), value=pytest.approx(1_000.0), fee=pytest.approx(1.0),
                                fill_price=pytest.approx(100.1), stop_loss=pytest.approx(SL),
                                take_profit=pytest.approx(TP), max_hold_bars=6)
    assert plan.cost == pytest.approx(1_001.0)
    own = plan_position(rules, 100.0, equity=10_000.0, cash=10_000.0, sl_stop=0.5, tp_stop=0.1)  # an entry's stops
    assert own.value == pytest.approx(400.0) and own.stop_loss == pytest.approx(50.0) and own.take_profit == pytest.approx(110.0)


def test_a_plan_without_stops_or_cash():
    rules = StrategyRules(threshold=0.5, sizing="fraction", fraction=0.5)
    plan = plan_position(rules, 100.0, equity=10_000.0, cash=10_000.0)
    assert plan.value == pytest.approx(5_000.0) and math.isnan(plan.stop_loss) and math.isnan(plan.take_profit)
    assert plan.max_hold_bars == 0 and plan.refused is None
    assert plan_position(rules, 100.0, equity=10_000.0, cash=0.0).refused == "no_cash"
    dust = plan_position(rules, 100.0, equity=10_000.0, cash=10_000.0, min_order_value=6_000.0)
    assert dust.refused == "dust" and dust.size == 0.0


def test_the_risk_managers_size_is_the_plans():
    risk = RiskConfig(max_stop_loss=0.03, risk_per_trade=0.01, max_position_fraction=0.2)
    rules = effective_rules(StrategyRules(threshold=0.5, sl_stop=0.05, sizing="fraction", fraction=0.5), risk)
    plan = plan_position(rules, 50.0, equity=9_000.0, cash=9_000.0)
    assert plan.value == pytest.approx(position_value(9_000.0, 0.03, 0.01, 0.2)) == pytest.approx(1_800.0)
    assert plan.stop_loss == pytest.approx(50.0 * 0.97)


# --------------------------------------------------------------------------------- engine and plan agree


def random_bars(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) consistent OHLC with frequent gaps at the open (so gaps through the stops happen)."""
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.015, n)))
    open_ = np.r_[100.0, close[:-1]] * np.exp(rng.normal(0, 0.015, n) * (rng.random(n) < 0.3))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.01, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.01, n)))
    return np.column_stack([open_, high, low, close])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), sizing=st.sampled_from(["all_in", "fraction", "risk"]),
       sl=st.sampled_from([None, 0.01, 0.03]), tp=st.sampled_from([None, 0.02, 0.05]),
       hold=st.sampled_from([None, 1, 4, 20]), fill=st.sampled_from(["close", "next_open"]),
       fees=st.sampled_from([0.0, 0.001]), slippage=st.sampled_from([0.0, 0.002]),
       own_stops=st.booleans(), min_value=st.sampled_from([0.0, 5.0, 2_000.0]))
def test_the_engine_and_the_python_plan_agree(seed, n, sizing, sl, tp, hold, fill, fees, slippage, own_stops, min_value):
    """An entry signal at bar 0, then random bars (and exit signals with fill at the close): the engine's
    position (size, fill price, fees, stops) is :func:`plan_position`'s, and its exit (bar, reason, price) is
    the first :func:`bar_exit` of the bars after it, whatever the sizing, stops, time stop and costs."""
    if sizing == "risk" and sl is None:
        sl = 0.02
    rng = np.random.default_rng(seed)
    rules = StrategyRules(threshold=0.5, sl_stop=sl, tp_stop=tp, max_hold_bars=hold, sizing=sizing, fraction=0.3,
                          risk=0.01)
    costs = BacktestConfig(init_cash=10_000.0, fees=fees, slippage=slippage, fill=fill, min_order_value=min_value,
                           protections=None)
    bars = random_bars(rng, n)
    entries = np.zeros((n, 1), dtype=bool)
    entries[0] = True
    exits = (rng.random((n, 1)) < 0.1) & (fill == "close")  # next_open exits fill a bar later: not compared here
    exits[0] = False
    entry_sl = np.where(rng.random((n, 1)) < 0.5, rng.uniform(0.005, 0.05, (n, 1)), np.nan) if own_stops else None
    entry_tp = np.where(rng.random((n, 1)) < 0.5, rng.uniform(0.005, 0.08, (n, 1)), np.nan) if own_stops else None

    state = EngineState.initial(1, costs.init_cash)
    out = step(state, engine_params(with_rules(costs, rules)), *(bars[:, [k]] for k in range(4)), entries, exits,
               entry_sl=entry_sl, entry_tp=entry_tp)
    trades = {k: np.concatenate([out.trades[k], v]) for k, v in open_trades(state).items()}

    fill_bar = 0 if fill == "close" else 1
    if fill_bar >= n:  # the order is still pending at the end
        assert len(trades["size"]) == 0
        return
    ref = bars[fill_bar, 3] if fill == "close" else bars[fill_bar, 0]
    plan = plan_position(rules, ref, equity=costs.init_cash, cash=costs.init_cash, fees=fees, slippage=slippage,
                         min_order_value=min_value, sl_stop=signal_bar_stop(entry_sl), tp_stop=signal_bar_stop(entry_tp))
    if plan.refused is not None:
        assert len(trades["size"]) == 0 and state.rejected[["no_cash", "dust"].index(plan.refused)] == 1
        return
    (entry_price, size, entry_fees) = (trades[k][0] for k in ("entry_price", "size", "entry_fees"))
    assert (size, entry_price, entry_fees) == (plan.size, plan.fill_price, plan.fee)

    expected = ("open", n - 1, bars[-1, 3])
    first = fill_bar if fill == "next_open" else 1  # a close fill's own bar is never checked
    for g in range(first, n):
        reason, price = bar_exit(*bars[g], plan.stop_loss, plan.take_profit, g, plan.max_hold_bars, bool(exits[g, 0]))
        if reason is not None:
            market = reason in (ExitReason.SIGNAL, ExitReason.TIME_STOP)  # market exits pay the slippage
            expected = (reason.label, g, price * (1 - slippage) if market else price)
            break
    assert len(trades["size"]) == 1
    assert (ExitReason(trades["exit_reason"][0]).label, trades["exit_bar"][0], trades["exit_price"][0]) == expected


def signal_bar_stop(values: np.ndarray | None) -> float | None:
    """The entry's own stop fraction at the signal bar (``None``: the rules')."""
    return None if values is None or np.isnan(values[0, 0]) else float(values[0, 0])
