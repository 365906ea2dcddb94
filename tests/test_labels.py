"""Level distance and level labels: hand-made histories with known answers, and a look-ahead check that bites."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from pricelevel.core.timeframes import Timeframe
from pricelevel.features.labels import level_label
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import (
    LevelHistory,
    MultiTimeframe,
    cluster_prices,
    level_in_force_index,
    local_extrema,
    nearest_level,
    nearest_level_distance,
    walk_forward_levels,
)
from tests.conftest import real_candles

T0, T1, T2 = (pd.Timestamp(day, tz="UTC") for day in ("2024-01-01", "2024-01-02", "2024-01-03"))


def _history(sets: dict[pd.Timestamp, list[float]]) -> LevelHistory:
    """Only ``asof`` and ``price`` matter to distances and labels."""
    asof = [t for t, prices in sets.items() for _ in prices]
    price = [p for prices in sets.values() for p in sorted(prices)]
    levels = pd.DataFrame(
        {"asof": pd.DatetimeIndex(asof, tz="UTC").as_unit("ns"), "price": np.array(price, float)}
    )
    return LevelHistory(refits=pd.DatetimeIndex(list(sets), tz="UTC").as_unit("ns"), levels=levels)


@pytest.fixture
def bars() -> tuple[pd.DatetimeIndex, np.ndarray, LevelHistory]:
    history = _history({T0: [110.0, 100.0], T1: [], T2: [200.0]})  # the refit at T1 found nothing
    hour = pd.Timedelta("1h")
    stamps = pd.DatetimeIndex(
        [T0 - hour, T0, T0 + 5 * hour, T0 + 6 * hour, T1, T1 + 3 * hour, T2, T2 + 240 * hour]
    )
    close = np.array([100.0, 100.05, 104.0, 105.0, 100.0, 200.0, 199.0, 210.0])
    return stamps, close, history


def test_the_set_in_force_is_the_latest_refit_at_or_before_the_bar(bars):
    stamps, _, history = bars
    assert level_in_force_index(stamps, history).tolist() == [-1, 0, 0, 0, 1, 1, 2, 2]
    assert level_in_force_index(pd.Series(stamps), history).tolist() == [-1, 0, 0, 0, 1, 1, 2, 2]


def test_distance_to_the_nearest_level_in_force(bars):
    stamps, close, history = bars
    expected = [np.nan, 0.05 / 100.05, 4 / 104, 5 / 105, np.nan, np.nan, 1 / 199, 10 / 210]
    distance = nearest_level_distance(stamps, close, history)
    assert distance.dtype == np.float64
    np.testing.assert_allclose(distance, expected, rtol=1e-12)  # NaN before the first refit / empty set
    np.testing.assert_array_equal(
        nearest_level(stamps, close, history), [np.nan, 100, 100, 100, np.nan, np.nan, 200, 200]
    )


def test_label_is_zero_without_a_level_and_one_within_the_threshold(bars):
    stamps, close, history = bars
    labels = level_label(stamps, close, history, threshold_frac=0.001)
    assert labels.dtype == np.int8
    assert labels.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    # 200 at T1 + 3h sits on a level that is only found at T2: still 0 (no level in force).
    assert level_label(stamps, close, history, threshold_frac=0.06).tolist() == [0, 1, 1, 1, 0, 0, 1, 1]


def test_threshold_boundary_is_inclusive():
    stamps = pd.DatetimeIndex([T0, T0, T0], tz="UTC")
    close = np.array([160.0, 160.0, 160.0])
    for levels, expected in (([170.0], 1), ([150.0], 1), ([170.0 + 1e-9], 0), ([150.0 - 1e-9], 0)):
        history = _history({T0: levels})
        assert level_label(stamps, close, history, 0.0625).tolist() == [expected] * 3  # 0.0625 x 160 = 10
    assert 0.001 * 1000.0 == 1.0
    history = _history({T0: [1001.0, 5000.0]})
    assert level_label(stamps[:1], np.array([1000.0]), history, 0.001).tolist() == [1]
    history = _history({T0: [1001.0 + 1e-9]})
    assert level_label(stamps[:1], np.array([1000.0]), history, 0.001).tolist() == [0]


def test_bars_in_any_order_and_empty_histories(bars):
    stamps, close, history = bars
    order = np.random.default_rng(3).permutation(len(stamps))
    np.testing.assert_array_equal(
        nearest_level_distance(stamps[order], close[order], history),
        nearest_level_distance(stamps, close, history)[order],
    )
    empty = _history({})
    assert np.isnan(nearest_level_distance(stamps, close, empty)).all()
    assert level_label(stamps, close, empty, 0.5).tolist() == [0] * len(stamps)
    assert (level_in_force_index(stamps, empty) == -1).all()
    with pytest.raises(ValueError, match="differ in length"):
        nearest_level(stamps, close[:3], history)


# ----------------------------------------------------------------------------------------------- real candles

ROWS = 3000
H1 = Timeframe.H1


@pytest.fixture(scope="module")
def btc():
    candles = real_candles("BTCUSDT", "1h", ROWS)
    context = MultiTimeframe(d1=real_candles("BTCUSDT", "1d"), h4=real_candles("BTCUSDT", "4h"))
    return candles, context


def test_vectorised_nearest_level_equals_a_loop(btc):
    candles, context = btc
    history = walk_forward_levels(candles, H1, LevelsConfig(), context, raw=True)
    stamps, close = candles["timestamp"], candles["close"].to_numpy()
    distance = nearest_level_distance(stamps, close, history)
    labels = level_label(stamps, close, history, 0.002)
    refits = list(history.refits)
    by_refit = {t: block["price"].to_numpy() for t, block in history.levels.groupby("asof")}
    for i, (stamp, c) in enumerate(zip(stamps, close, strict=True)):
        in_force = [t for t in refits if t <= stamp]
        prices = by_refit.get(in_force[-1], np.array([])) if in_force else np.array([])
        if prices.size == 0:
            assert np.isnan(distance[i]) and labels[i] == 0
            continue
        gap = min(abs(c - p) for p in prices)
        assert distance[i] == gap / c
        assert labels[i] == int(any(abs(c - p) <= 0.002 * c for p in prices))
    assert 0 < labels.mean() < 0.5 and np.isfinite(distance).mean() > 0.5


def _leaky_history(
    candles: pd.DataFrame, timeframe: Timeframe, config: LevelsConfig, context
) -> LevelHistory:
    """Look-ahead on purpose: one clustering of every extremum in the data, in force from the first bar."""
    close = candles["close"].to_numpy()
    is_max, is_min = local_extrema(close, config.window)
    _, prices = cluster_prices(close[is_max | is_min], config.eps_frac, config.min_samples)
    first = pd.DatetimeIndex(candles["timestamp"].iloc[:1])
    levels = pd.DataFrame({"asof": first.repeat(prices.size), "price": np.sort(prices)})
    return LevelHistory(refits=first, levels=levels)


def _labels_survive_new_data(build: Callable[..., LevelHistory], candles, context, cuts) -> bool:
    """Labels of the first k bars must not change when later candles arrive."""
    config = LevelsConfig()
    full = build(candles, H1, config, context)
    full_labels = level_label(candles["timestamp"], candles["close"].to_numpy(), full, 0.002)
    for cut in cuts:
        part = candles.iloc[:cut]
        history = build(part, H1, config, context)
        labels = level_label(part["timestamp"], part["close"].to_numpy(), history, 0.002)
        if not np.array_equal(labels, full_labels[:cut]):
            return False
    return True


def test_the_look_ahead_check_passes_walk_forward_and_catches_whole_history_clustering(btc):
    candles, context = btc
    cuts = (1200, 2100)
    assert _labels_survive_new_data(walk_forward_levels, candles, context, cuts)
    assert not _labels_survive_new_data(_leaky_history, candles, context, cuts)
