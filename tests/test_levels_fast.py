"""The compiled levels against an independent, slow oracle (tests/reference_levels.py: the documented rules written
afresh around scikit-learn's DBSCAN): equal to the bit on real candles and on random ones, every column, filters
on and off, raw or not."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricelevel.core.timeframes import Timeframe
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import (
    MultiTimeframe,
    _touch_sums,
    cluster_prices,
    levels_asof,
    local_extrema,
    walk_forward_levels,
)
from tests import reference_levels as reference
from tests.conftest import real_candles

FILTERS = ("touches", "age", "volume", "approach")


def config(filtered: bool = True, **overrides) -> LevelsConfig:
    """The default levels settings with ``overrides``; every filter off unless ``filtered``."""
    off = {"filters": {name: {"enabled": False} for name in FILTERS}}
    return LevelsConfig.model_validate({**({} if filtered else off), **overrides})


def context_of(symbol: str, timeframe: str) -> MultiTimeframe:
    """The symbol's other filter timeframes, whole: each refit must ignore the candles after it."""
    own = {"4h": "h4", "1h": "h1"}.get(timeframe)
    timeframes = (("d1", "1d"), ("h4", "4h"), ("h1", "1h"))
    return MultiTimeframe(**{attr: real_candles(symbol, tf) for attr, tf in timeframes if attr != own})


def test_the_reference_shares_no_code_with_production():
    """A helper imported from production would carry its bugs into the oracle, where no comparison can see them."""
    allowed = {"pricelevel.core.timeframes": {"Timeframe"}, "pricelevel.levels.config": {"LevelsConfig"}}
    tree = ast.parse(Path(reference.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("pricelevel") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pricelevel"):
            assert {alias.name for alias in node.names} <= allowed.get(node.module, set()), node.module


def assert_same_history(candles, timeframe, levels_config, context, raw):
    fast = walk_forward_levels(candles, timeframe, levels_config, context, raw=raw)
    slow = reference.walk_forward_levels(candles, timeframe, levels_config, context, raw=raw)
    assert fast.refits.equals(slow.refits)
    pd.testing.assert_frame_equal(fast.levels, slow.levels, check_exact=True)
    return fast


# ----------------------------------------------------------------------------------------------- real candles


CASES = [
    # symbol, timeframe, rows, filters, raw, overrides
    ("BTCUSDT", "1h", 5000, True, False, {}),
    ("BTCUSDT", "1h", 5000, True, True, {}),
    ("ETHUSDT", "4h", None, True, False, {}),
    ("DOGEUSDT", "1h", 8000, False, False, {"lookback_days": 30, "min_samples": 2}),
    ("SOLUSDT", "4h", None, False, True, {"lookback_days": 60, "eps_frac": 0.01}),
    ("XRPUSDT", "1h", 4000, True, True, {"lookback_days": 30, "refit_every": 7}),
    ("BTCUSDT", "15m", 6000, True, False, {"refit_every": 96, "lookback_days": 20, "window": 4}),
    ("LINKUSDT", "1h", 3000, True, True, {"lookback_days": 45, "filters": {"age": {"enabled": False}}}),
]


@pytest.mark.parametrize(("symbol", "timeframe", "rows", "filters", "raw", "overrides"), CASES)
def test_walk_forward_equals_the_reference_on_real_candles(symbol, timeframe, rows, filters, raw, overrides):
    candles = real_candles(symbol, timeframe, rows)
    history = assert_same_history(
        candles, Timeframe(timeframe), config(filters, **overrides), context_of(symbol, timeframe), raw
    )
    assert len(history.levels) > 0


def test_levels_asof_equals_the_reference_at_any_time():
    candles = real_candles("ADAUSDT", "1h", 6000)
    context = context_of("ADAUSDT", "1h")
    stamps = candles["timestamp"]
    times = [
        stamps.iloc[0] - pd.Timedelta(days=1),  # before the data
        stamps.iloc[100] + pd.Timedelta(minutes=17),  # between bars
        stamps.iloc[3000],
        stamps.iloc[-1] + pd.Timedelta(days=3),  # after the data
    ]
    for levels_config in (config(True), config(False, lookback_days=20)):
        for asof in times:
            for raw in (False, True):
                fast = levels_asof(candles, Timeframe.H1, asof, levels_config, context, raw=raw)
                slow = reference.levels_asof(candles, Timeframe.H1, asof, levels_config, context, raw=raw)
                pd.testing.assert_frame_equal(fast, slow, check_exact=True)


def test_a_zero_median_raises_the_reference_error():
    close = np.r_[np.full(60, 0.0), np.linspace(1, 2, 60)]
    candles = synthetic_candles(close)
    with pytest.raises(ValueError) as slow:
        reference.walk_forward_levels(candles, Timeframe.H1, config(False, refit_every=1))
    with pytest.raises(ValueError) as fast:
        walk_forward_levels(candles, Timeframe.H1, config(False, refit_every=1))
    assert str(fast.value) == str(slow.value)
    with pytest.raises(ValueError, match="eps"):
        cluster_prices(np.zeros(3), 0.005, 1)


# ----------------------------------------------------------------------------------------------- random candles


def synthetic_candles(close, seed: int = 0, start: str = "2024-01-01") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = np.asarray(close, dtype=np.float64)
    open_ = np.r_[close[:1], close[:-1]]
    return pd.DataFrame(
        {
            "timestamp": pd.date_range(start, periods=close.size, freq="1h", tz="UTC", unit="ns"),
            "open": open_,
            "high": np.maximum(open_, close) + rng.integers(0, 3, close.size),
            "low": np.minimum(open_, close) - rng.integers(0, 3, close.size),
            "close": close,
            "volume": rng.integers(1, 20, close.size).astype(np.float64),
            "turnover": close,
        }
    )


def resampled(candles: pd.DataFrame, rule: str) -> pd.DataFrame:
    groups = candles.set_index("timestamp").resample(rule)
    frame = pd.DataFrame(
        {
            "open": groups["open"].first(),
            "high": groups["high"].max(),
            "low": groups["low"].min(),
            "close": groups["close"].last(),
            "volume": groups["volume"].sum(),
            "turnover": groups["turnover"].sum(),
        }
    )
    return frame.dropna().reset_index()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 320),
    window=st.integers(1, 4),
    min_samples=st.integers(1, 5),
    lookback_days=st.sampled_from([0.5, 2.0, 5.0, 30.0]),
    refit_every=st.integers(5, 30),
    raw=st.booleans(),
    filters=st.booleans(),
    holes=st.booleans(),
)
def test_walk_forward_equals_the_reference_on_integer_random_walks(
    seed, n, window, min_samples, lookback_days, refit_every, raw, filters, holes
):
    """Integer closes: repeated prices (plateaus are several extrema), distances exactly eps (median / 16)."""
    rng = np.random.default_rng(seed)
    close = 160 + np.cumsum(rng.integers(-3, 4, n)).astype(np.float64)
    candles = synthetic_candles(np.maximum(close, 16.0), seed)
    if holes and n:
        candles = candles[rng.random(n) > 0.1].reset_index(drop=True)  # missing bars
    levels_config = config(
        window=window,
        min_samples=min_samples,
        eps_frac=1 / 16,
        lookback_days=lookback_days,
        refit_every=refit_every,
        filters={"touches": {"min_touches": 1, "atr_period": 2}, "approach": {"atr_period": 3, "bars": 2}}
        if filters
        else {name: {"enabled": False} for name in FILTERS},
    )
    if len(candles):
        context = MultiTimeframe(d1=resampled(candles, "1D"), h4=resampled(candles, "4h"))
    else:
        context = MultiTimeframe(d1=candles, h4=candles)  # no candles of any timeframe
    assert_same_history(candles, Timeframe.H1, levels_config, context, raw)


@pytest.mark.parametrize("seed", range(4))
def test_local_extrema_equal_the_reference(seed):
    rng = np.random.default_rng(seed)
    close = rng.integers(0, 5, 3000).astype(np.float64)
    close[rng.random(close.size) < 0.01] = np.nan
    close[rng.random(close.size) < 0.002] = np.inf
    close[rng.random(close.size) < 0.002] = -np.inf
    for window in (1, 2, 5, 12, 40):
        for fast, slow in zip(local_extrema(close, window), reference.local_extrema(close, window), strict=True):
            np.testing.assert_array_equal(fast, slow)
    for n in range(0, 8):
        for fast, slow in zip(local_extrema(close[:n], 2), reference.local_extrema(close[:n], 2), strict=True):
            np.testing.assert_array_equal(fast, slow)


def test_touch_sums_replay_numpys_row_sums_bit_for_bit():
    """Every window length across numpy's summation blocks (8, 128, splits), NaN bands, levels on band edges."""
    rng = np.random.default_rng(7)
    n = 12_000
    mid = 100 + np.cumsum(rng.normal(0, 0.5, n))
    band_low = mid - rng.uniform(0, 2, n)
    band_high = mid + rng.uniform(0, 2, n)
    band_low[:30] = band_high[:30] = np.nan  # no ATR yet
    volume = rng.lognormal(0, 1, n)
    lengths = [*range(0, 300), 1000, 1024, 4380, 8192, 8200, 11_000]
    window_lo = np.array([int(rng.integers(0, n - length + 1)) for length in lengths], dtype=np.int64)
    window_hi = window_lo + np.array(lengths, dtype=np.int64)
    per_refit = rng.integers(0, 4, len(lengths))
    offsets = np.r_[0, np.cumsum(per_refit)].astype(np.int64)
    price = np.empty(offsets[-1])
    for r, (lo, hi) in enumerate(zip(window_lo, window_hi, strict=True)):
        span = mid[lo:hi] if hi > lo else mid[:1]
        choices = np.r_[rng.uniform(span.min() - 1, span.max() + 1, 3), band_low[lo:hi][-1:], band_high[lo:hi][:1]]
        price[offsets[r] : offsets[r + 1]] = rng.choice(choices[np.isfinite(choices)], per_refit[r])
    counts, sums, window_sums = _touch_sums(price, offsets, window_lo, window_hi, band_low, band_high, volume, True)
    only_counts, _, _ = _touch_sums(price, offsets, window_lo, window_hi, band_low, band_high, volume, False)
    np.testing.assert_array_equal(counts, only_counts)
    for r, (lo, hi) in enumerate(zip(window_lo, window_hi, strict=True)):
        rows = slice(offsets[r], offsets[r + 1])
        if hi > lo and rows.stop > rows.start:
            assert window_sums[r] == volume[lo:hi].sum()
        level = price[rows][:, None]
        touching = (band_low[lo:hi] <= level) & (level <= band_high[lo:hi])
        np.testing.assert_array_equal(counts[rows], touching.sum(axis=1))
        np.testing.assert_array_equal(sums[rows], np.where(touching, volume[lo:hi], 0.0).sum(axis=1))
