"""The one-dimensional DBSCAN against scikit-learn itself: same labels, numbering and border rule included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

from pricelevel.levels.clustering import cluster_windows, dbscan_1d
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import local_extrema
from tests.conftest import real_candles

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sklearn_labels(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    return DBSCAN(eps=eps, min_samples=min_samples).fit(np.asarray(points, dtype=np.float64)[:, None]).labels_


# ----------------------------------------------------------------------------------------------- hand-made


def test_border_point_goes_to_the_cluster_met_first_in_input_order():
    # eps 2, min_samples 4: cores -2..0 and 4..6; the point at 2 has 3 neighbours (0, 2, 4), so it is a border
    # point within eps of a core of each cluster. Clusters are numbered by their first core in input order,
    # and the first one expanded takes the border point.
    right_first = np.array([4.0, 5.0, 5.5, 6.0, 2.0, -2.0, -1.5, -1.0, 0.0])
    labels = dbscan_1d(right_first, 2.0, 4)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1] == sklearn_labels(right_first, 2.0, 4).tolist()
    left_first = right_first[[5, 6, 7, 8, 4, 0, 1, 2, 3]]
    labels = dbscan_1d(left_first, 2.0, 4)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1] == sklearn_labels(left_first, 2.0, 4).tolist()
    # The border point first in input order changes nothing: only cores start clusters.
    border_first = right_first[[4, 5, 6, 7, 8, 0, 1, 2, 3]]
    labels = dbscan_1d(border_first, 2.0, 4)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1] == sklearn_labels(border_first, 2.0, 4).tolist()


def test_distance_equal_to_eps_is_a_neighbour():
    points = np.array([0.0, 1.0, 2.0, 10.0])
    assert dbscan_1d(points, 1.0, 3).tolist() == [0, 0, 0, -1] == sklearn_labels(points, 1.0, 3).tolist()
    assert dbscan_1d(points, np.nextafter(1.0, 0.0), 2).tolist() == [-1, -1, -1, -1]


def test_edge_inputs():
    assert dbscan_1d(np.array([]), 1.0, 3).shape == (0,)
    assert dbscan_1d(np.array([5.0]), 1.0, 1).tolist() == [0]
    assert dbscan_1d(np.array([5.0]), 1.0, 2).tolist() == [-1]
    assert dbscan_1d(np.full(7, 3.0), 0.5, 7).tolist() == [0] * 7
    assert dbscan_1d(np.arange(5.0) * 10, 1.0, 2).tolist() == [-1] * 5
    assert dbscan_1d(np.arange(5.0) * 10, 1.0, 1).tolist() == [0, 1, 2, 3, 4]
    assert dbscan_1d(np.array([1.0, 2.0]), 1.0, 1).dtype == np.intp
    for eps in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="eps"):
            dbscan_1d(np.array([1.0]), eps, 1)
    with pytest.raises(ValueError, match="min_samples"):
        dbscan_1d(np.array([1.0]), 1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        dbscan_1d(np.array([1.0, np.nan]), 1.0, 1)


# ----------------------------------------------------------------------------------------------- against sklearn


@pytest.mark.parametrize("extra", [0, 3, 9, 10, 30])
def test_decimal_prices_exactly_eps_apart_match_sklearn(extra):
    """Up to 11 points scikit-learn squares by ``a*a - 2ab + b*b``: a pair exactly eps apart may fall out."""
    rng = np.random.default_rng(extra)
    for _ in range(150):
        low = round(float(rng.uniform(1000, 2000)), 2)
        high = round(low + float(rng.uniform(0.01, 5)), 2)
        points = np.r_[low, high, np.round(low + rng.uniform(-8, 8, extra), 2)][rng.permutation(extra + 2)]
        for min_samples in (1, 2, 3):
            eps = high - low
            np.testing.assert_array_equal(dbscan_1d(points, eps, min_samples), sklearn_labels(points, eps, min_samples))


@SETTINGS
@given(
    points=st.lists(st.integers(-30, 30), min_size=1, max_size=80),
    eps=st.integers(1, 6),
    min_samples=st.integers(1, 7),
)
def test_integer_points_with_integer_eps_match_sklearn(points, eps, min_samples):
    """Integers: every distance is exact, and many equal eps exactly; duplicates are common."""
    x = np.array(points, dtype=np.float64)
    np.testing.assert_array_equal(dbscan_1d(x, float(eps), min_samples), sklearn_labels(x, eps, min_samples))


@SETTINGS
@given(
    points=st.lists(st.floats(0.5, 2000.0, allow_nan=False, width=64), min_size=1, max_size=60),
    eps_frac=st.floats(0.001, 0.2),
    min_samples=st.integers(1, 6),
)
def test_float_points_match_sklearn(points, eps_frac, min_samples):
    x = np.array(points, dtype=np.float64)
    eps = eps_frac * float(np.median(x))
    np.testing.assert_array_equal(dbscan_1d(x, eps, min_samples), sklearn_labels(x, eps, min_samples))


@pytest.mark.parametrize("seed", range(6))
def test_random_clumps_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 100, size=int(rng.integers(1, 8)))
    x = np.concatenate([c + rng.normal(0, rng.uniform(0.1, 2), size=int(rng.integers(1, 60))) for c in centres])
    x = np.concatenate([x, rng.uniform(0, 100, size=30)])[rng.permutation(x.size + 30)]
    for eps in (0.3, 1.0, 2.5):
        for min_samples in (1, 2, 4, 9):
            np.testing.assert_array_equal(dbscan_1d(x, eps, min_samples), sklearn_labels(x, eps, min_samples))


@pytest.mark.parametrize(("symbol", "timeframe"), [("BTCUSDT", "1h"), ("ETHUSDT", "4h"), ("DOGEUSDT", "1h")])
def test_real_extrema_prices_match_sklearn(symbol, timeframe):
    """Windows of real extrema prices (tick-rounded: exact ties and repeated prices), as the levels cluster."""
    close = real_candles(symbol, timeframe)["close"].to_numpy()
    is_max, is_min = local_extrema(close, 12)
    prices = close[is_max | is_min]
    config = LevelsConfig()
    for start in range(0, prices.size - 50, max(prices.size // 12, 1)):
        window = prices[start : start + 700]
        eps = config.eps_frac * float(np.median(window))
        for min_samples in (2, config.min_samples, 9):
            np.testing.assert_array_equal(dbscan_1d(window, eps, min_samples), sklearn_labels(window, eps, min_samples))


# ----------------------------------------------------------------------------------------------- sliding windows


def windows_by_sklearn(values, lo, hi, eps_frac, min_samples):
    """Rows of ``cluster_windows`` computed window by window: sklearn labels, bincount means, stable sort."""
    rows = []
    for w, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        if b <= a:
            continue
        points = values[a:b]
        labels = sklearn_labels(points, eps_frac * float(np.median(points)), min_samples)
        k = labels.max() + 1
        if k == 0:
            continue
        member = labels >= 0
        means = np.bincount(labels[member], weights=points[member], minlength=k) / np.bincount(labels[member])
        for c in np.argsort(means, kind="stable"):
            where = np.flatnonzero(labels == c)
            rows.append((w, means[c], where.size, a + where[0], a + where[-1]))
    return rows


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    width=st.integers(1, 120),
    integer=st.booleans(),
    min_samples=st.integers(1, 6),
)
def test_sliding_windows_match_sklearn_window_by_window(seed, n, width, integer, min_samples):
    """Small steps (spliced), jumps and empty windows (merged), integer prices with exact eps distances."""
    rng = np.random.default_rng(seed)
    if integer:
        values = rng.integers(60, 68, size=n).astype(np.float64) * 16  # median / 16 = eps: exact distances
        eps_frac = 1 / 16
    else:
        values = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, size=n)))
        eps_frac = float(rng.choice([0.002, 0.01, 0.05]))
    stops = np.sort(rng.integers(0, n + 1, size=int(rng.integers(1, 40))))
    starts = np.maximum.accumulate(np.maximum(stops - rng.integers(0, width + 1, size=stops.size), 0))
    lo, hi = starts.astype(np.int64), stops.astype(np.int64)
    window, mean, size, first, last, bad, _ = cluster_windows(values, lo, hi, eps_frac, min_samples)
    assert bad == -1
    got = list(zip(window.tolist(), mean.tolist(), size.tolist(), first.tolist(), last.tolist(), strict=True))
    assert got == windows_by_sklearn(values, lo, hi, eps_frac, min_samples)


def test_sliding_windows_report_the_first_bad_eps():
    values = np.array([1.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    lo = np.array([0, 2, 3], dtype=np.int64)
    hi = np.array([2, 5, 6], dtype=np.int64)
    window, *_, bad, eps = cluster_windows(values, lo, hi, 0.5, 1)
    assert bad == 1 and eps == 0.0
    assert window.tolist() == [0, 0]  # rows before the bad window are kept
