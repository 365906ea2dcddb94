"""Triple-barrier labels and the direction classes: hand-made paths with known answers, a loop on real candles,
ATR-scaled barriers, and agreement with the backtest engine trading the same barriers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.run import run_backtest
from pricelevel.features.config import LabelsConfig
from pricelevel.features.labels import (
    DOWN_FIRST,
    TIMEOUT,
    UP_FIRST,
    barrier_fractions,
    direction_classes,
    first_touch,
    forward_move,
    targets,
)
from pricelevel.ta.indicators import atr
from tests.conftest import real_candles

NAN = np.nan


def _bars(open_, high, low, close=None) -> dict[str, np.ndarray]:
    open_ = np.asarray(open_, float)
    return {"open": open_, "high": np.asarray(high, float), "low": np.asarray(low, float),
            "close": open_ if close is None else np.asarray(close, float)}


def test_first_touch_by_hand() -> None:
    # entry = next open = 100; barriers +2 % (102) and -1 % (99); horizon 2 (bars t+1, t+2)
    cases = {
        "up on the first bar": ([100, 100, 100], [100, 102, 100], [100, 99.5, 100], UP_FIRST),
        "down on the second bar": ([100, 100, 100], [100, 101, 103], [100, 99.5, 98], DOWN_FIRST),
        "up, then down": ([100, 100, 100], [100, 103, 100], [100, 100, 90], UP_FIRST),
        "both in one bar: down": ([100, 100, 100], [100, 105, 100], [100, 95, 100], DOWN_FIRST),
        "neither: timeout": ([100, 100, 100], [100, 101.9, 101.99], [100, 99.01, 99.5], TIMEOUT),
        "touch at the barrier counts": ([100, 100, 100], [100, 101, 102], [100, 99.5, 100], UP_FIRST),
        "lower touch counts": ([100, 100, 100], [100, 101, 101], [100, 99.5, 99], DOWN_FIRST),
        "the bar after the horizon does not count": ([100, 100, 100, 100], [100, 101, 101, 150],
                                                     [100, 100, 100, 100], TIMEOUT),
    }
    for name, (open_, high, low, expected) in cases.items():
        out = first_touch(np.asarray(open_, float), np.asarray(high, float), np.asarray(low, float), 2, 0.02, 0.01)
        assert out.dtype == np.float32
        assert out[0] == expected, name
        assert np.isnan(out[-2:]).all(), name  # their horizon runs past the data


def test_the_entry_is_the_next_open_not_the_close() -> None:
    # close of t is 100 but the next bar opens at 90: +2 % from 90 is 91.8, touched
    bars = _bars([100, 90, 90], [100, 92, 90], [100, 90, 90], close=[100, 90, 90])
    assert first_touch(bars["open"], bars["high"], bars["low"], 1, 0.02, 0.02)[0] == UP_FIRST


def test_first_touch_equals_a_loop_on_real_candles() -> None:
    candles = real_candles("ETHUSDT", "4h", 1500)
    o, h, lo = (candles[c].to_numpy() for c in ("open", "high", "low"))
    rng = np.random.default_rng(7)
    up, down = rng.uniform(0.005, 0.05, len(o)), rng.uniform(0.005, 0.05, len(o))
    up[[3, 50]] = NAN
    horizon = 7
    out = first_touch(o, h, lo, horizon, up, down)
    for t in range(len(o)):
        if t + horizon >= len(o) or np.isnan(up[t]):
            assert np.isnan(out[t])
            continue
        entry, expected = o[t + 1], TIMEOUT
        for k in range(t + 1, t + horizon + 1):
            if lo[k] <= entry * (1 - down[t]):
                expected = DOWN_FIRST
                break
            if h[k] >= entry * (1 + up[t]):
                expected = UP_FIRST
                break
        assert out[t] == expected, t
    assert {UP_FIRST, DOWN_FIRST, TIMEOUT} <= set(np.unique(out[np.isfinite(out)]))


def test_triple_barrier_target_is_up_first_and_keeps_the_classes_apart() -> None:
    candles = real_candles("BTCUSDT", "4h", 2000)
    config = LabelsConfig(kind="triple_barrier", upper=0.03, lower=0.02, horizon=6)
    classes = direction_classes(candles, config)
    target = targets(candles, np.zeros(len(candles)), config)
    assert target.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(target), np.isnan(classes))
    known = np.isfinite(classes)
    np.testing.assert_array_equal(target[known] == 1, classes[known] == UP_FIRST)
    assert np.isnan(target[-6:]).all() and known[:-6].all()
    # up first implies "+3 % was reached", so the forward-move label holds whenever up-first does
    reached = forward_move(candles["open"], candles["high"], 6, 0.03)
    assert (reached[classes == UP_FIRST] == 1).all()
    assert 0.05 < np.nanmean(target) < np.nanmean(reached)
    # a wider lower barrier can only turn down-first bars into up-first or timeout
    wider = direction_classes(candles, config.model_copy(update={"lower": 0.05}))
    assert (wider[classes == UP_FIRST] == UP_FIRST).all()


def test_direction_of_the_existing_labels_uses_plus_minus_move() -> None:
    candles = real_candles("SOLUSDT", "4h", 1000)
    for kind in ("forward_move", "level_label"):
        config = LabelsConfig(kind=kind, move_frac=0.03, horizon=6)
        expected = first_touch(candles["open"], candles["high"], candles["low"], 6, 0.03, 0.03)
        np.testing.assert_array_equal(direction_classes(candles, config), expected)


def test_atr_barriers_are_multiples_of_the_atr_at_the_decision_bar() -> None:
    n = 40
    close = np.full(n, 100.0)
    bars = _bars(close, close + 1.0, close - 1.0)  # true range 2 on every bar: ATR(5) = 2 from row 5
    config = LabelsConfig(kind="triple_barrier", barrier_unit="atr", upper=2.0, lower=0.5, atr_window=5, horizon=3)
    up, down = barrier_fractions(bars, config)
    assert np.isnan(up[:5]).all() and np.isnan(up[-1])
    np.testing.assert_allclose(up[5:-1], 2.0 * 2 / 100)
    np.testing.assert_allclose(down[5:-1], 0.5 * 2 / 100)
    classes = direction_classes(bars, config)
    assert np.isnan(classes[:5]).all()  # no ATR yet: no label (not a guessed one)
    assert (classes[5:-3] == DOWN_FIRST).all()  # a low of 99 is -1 % = 0.5 ATR below 100, 101 is +1 % < 4 %
    # the ATR is the decision bar's: a spike at bar 20 moves the barriers from row 20 on, never before
    spiked = {k: v.copy() for k, v in bars.items()}
    spiked["high"][20] = 130.0
    up2, _ = barrier_fractions(spiked, config)
    np.testing.assert_array_equal(up2[:20], up[:20])
    assert up2[20] > up[20]
    scale = atr(spiked["high"], spiked["low"], spiked["close"], 5)
    np.testing.assert_allclose(up2[:-1], 2.0 * scale[:-1] / spiked["open"][1:])


def test_label_config_barriers() -> None:
    config = LabelsConfig(kind="triple_barrier", move_frac=0.04)
    assert (config.up_barrier, config.down_barrier) == (0.04, 0.04)
    assert LabelsConfig(kind="triple_barrier", upper=0.05, lower=0.02).down_barrier == 0.02
    assert LabelsConfig(kind="triple_barrier", upper=0.05).down_barrier == 0.05
    with pytest.raises(ValidationError, match="needs labels.upper"):
        LabelsConfig(kind="triple_barrier", barrier_unit="atr")
    with pytest.raises(ValidationError, match="below 1"):
        LabelsConfig(kind="triple_barrier", upper=0.05, lower=1.0)
    assert LabelsConfig(kind="triple_barrier", barrier_unit="atr", upper=2, lower=3).down_barrier == 3


@pytest.mark.parametrize("unit", ["fraction", "atr"])
def test_the_engine_trading_the_barriers_exits_as_the_label_says(unit: str) -> None:
    """An entry signal at bar t, filled at the next open with take-profit u, stop-loss d and a time stop of
    horizon bars, exits by take-profit exactly when the label is up-first, by stop-loss when down-first, and
    by the time stop on a timeout."""
    horizon = 6
    candles = real_candles("BTCUSDT", "4h", 3000)
    config = (LabelsConfig(kind="triple_barrier", upper=0.03, lower=0.02, horizon=horizon) if unit == "fraction" else
              LabelsConfig(kind="triple_barrier", barrier_unit="atr", upper=2.0, lower=1.5, horizon=horizon))
    classes = direction_classes(candles, config)
    up, down = barrier_fractions(candles, config)
    signal_bars = np.arange(20, len(candles) - horizon - 1, horizon + 2)  # one position at a time
    entries = np.zeros((len(candles), 1), bool)
    entries[signal_bars, 0] = True
    market = market_from_candles(candles, symbol="BTCUSDT")
    costs = BacktestConfig(fill="next_open", sl_stop=None, tp_stop=None, max_hold_bars=horizon, protections=None,
                           fees=0.0, slippage=0.0, sizing="fraction", fraction=0.5)
    result = run_backtest(market, entries, np.zeros_like(entries), costs, entry_sl=down[:, None], entry_tp=up[:, None])
    trades = result.trades
    assert len(trades) == len(signal_bars)
    by_class = {UP_FIRST: "take_profit", DOWN_FIRST: "stop_loss", TIMEOUT: "time_stop"}
    stamps = pd.DatetimeIndex(candles["timestamp"])
    entry_bar = stamps.get_indexer(pd.DatetimeIndex(trades["entry_time"]))
    signal = entry_bar - 1  # filled at the open after the signal
    np.testing.assert_array_equal(signal, signal_bars)
    np.testing.assert_array_equal(trades["exit_reason"].to_numpy(), [by_class[c] for c in classes[signal]])
    assert set(trades["exit_reason"]) == set(by_class.values())
