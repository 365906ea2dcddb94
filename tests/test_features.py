"""Features: hand-checked values, no NaN, and no look-ahead (truncating the candles changes no earlier row)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pricelevel.features import FEATURES, compute_features


def candles() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "timestamp": pd.date_range("2024-01-01", periods=4, freq="1h", tz="UTC"),
            "open": [100.0, 100.0, 110.0, 99.0],
            "high": [101.0, 112.0, 111.0, 100.0],
            "low": [99.0, 99.0, 98.0, 97.0],
            "close": [100.0, 110.0, 99.0, 99.0],
            "volume": [0.0, 9.0, 99.0, 99.0],
        }
    )


def test_values_on_a_hand_made_frame() -> None:
    distance = np.array([0.001, np.nan, 0.2, -0.0])
    out = compute_features(candles(), FEATURES, distance)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    expected = np.array(
        [
            [0.0, np.log(101 / 99), 0.0, 0.001],
            [np.log(1.1), np.log(112 / 99), np.log(10.0), 0.05],
            [np.log(0.9), np.log(111 / 98), np.log(100.0) - np.log(10.0), 0.05],
            [0.0, np.log(100 / 97), 0.0, 0.0],
        ]
    )
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_columns_follow_the_requested_order() -> None:
    full = compute_features(candles(), FEATURES, np.zeros(4))
    some = compute_features(candles(), ("volume_change", "log_return"))
    np.testing.assert_array_equal(some, full[:, [2, 0]])


def test_no_nan_even_on_bad_prices() -> None:
    frame = candles()
    frame.loc[2, "close"] = 0.0
    frame.loc[1, "low"] = 0.0
    out = compute_features(frame, FEATURES, np.full(4, np.nan))
    assert np.isfinite(out).all()


def test_no_look_ahead() -> None:
    rng = np.random.default_rng(0)
    n = 200
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    frame = pd.DataFrame(
        {
            "close": close,
            "high": close * (1 + rng.uniform(0, 0.01, n)),
            "low": close * (1 - rng.uniform(0, 0.01, n)),
            "volume": rng.uniform(0, 1000, n),
        }
    )
    distance = rng.uniform(0, 0.1, n)
    full = compute_features(frame, FEATURES, distance)
    for k in (1, 2, 57, 199):
        cut = compute_features(frame.iloc[:k], FEATURES, distance[:k])
        np.testing.assert_array_equal(cut, full[:k])


def test_unknown_name_and_missing_level_distance_are_rejected() -> None:
    with pytest.raises(ValueError, match="known: log_return"):
        compute_features(candles(), ("log_return", "rsi"))
    with pytest.raises(ValueError, match="level_distance"):
        compute_features(candles(), ("level_distance",))
    with pytest.raises(ValueError, match="shape"):
        compute_features(candles(), ("level_distance",), np.zeros(3))
