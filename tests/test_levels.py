"""Levels: hand-made cases with known answers, the walk-forward property and the filters on real candles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import DBSCAN

from pricelevel.core.timeframes import Timeframe
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import (
    LEVEL_COLUMNS,
    LevelHistory,
    MultiTimeframe,
    cluster_prices,
    levels_asof,
    local_extrema,
    refit_times,
    walk_forward_levels,
)
from pricelevel.ta.indicators import atr as wilder_atr
from tests.conftest import real_candles

H1 = Timeframe.H1
ROWS = 6000  # BTCUSDT 1h from 2021-01-12: ~250 days, ~250 refits
NO_FILTERS = {name: {"enabled": False} for name in ("touches", "age", "volume", "approach")}


def _config(**overrides) -> LevelsConfig:
    """Hand-made cases: filters off unless given."""
    return LevelsConfig.model_validate({"filters": NO_FILTERS, **overrides})


def _candles(close, start: str = "2024-01-01", freq: str = "1h") -> pd.DataFrame:
    close = np.asarray(close, dtype=np.float64)
    return pd.DataFrame(
        {
            "timestamp": pd.date_range(start, periods=close.size, freq=freq, tz="UTC", unit="ns"),
            "open": close,
            "high": close + 1.0,
            "low": close - 1.0,
            "close": close,
            "volume": np.ones_like(close),
            "turnover": close,
        }
    )


def _block(history: LevelHistory, asof: pd.Timestamp) -> pd.DataFrame:
    rows = history.levels[history.levels["asof"] == asof]
    return rows.drop(columns="asof").reset_index(drop=True)


def _keys(history: LevelHistory) -> set[tuple[pd.Timestamp, float]]:
    return set(zip(history.levels["asof"], history.levels["price"], strict=True))


# ----------------------------------------------------------------------------------------------- extrema


def test_extrema_known_positions_and_edges_are_not_reported():
    close = [1, 2, 3, 2, 1, 2, 3, 2, 1]  # bars 0 and 8 are the lowest, but have no full window
    is_max, is_min = local_extrema(np.array(close, dtype=float), 2)
    assert np.flatnonzero(is_max).tolist() == [2, 6]
    assert np.flatnonzero(is_min).tolist() == [4]


def test_extrema_ties_with_the_window_max_count():
    # A flat top: both bars equal the max of their windows, so both are maxima (documented rule).
    close = np.array([1, 2, 5, 5, 2, 1, 0, 1, 2], dtype=float)
    is_max, is_min = local_extrema(close, 2)
    assert np.flatnonzero(is_max).tolist() == [2, 3]
    assert np.flatnonzero(is_min).tolist() == [6]
    # A fully flat window is both a maximum and a minimum.
    flat_max, flat_min = local_extrema(np.full(5, 7.0), 2)
    assert flat_max.tolist() == flat_min.tolist() == [False, False, True, False, False]


def test_extrema_short_series_and_nan_windows():
    is_max, is_min = local_extrema(np.array([1.0, 3.0, 1.0, 2.0]), 2)  # shorter than 2w+1
    assert not is_max.any() and not is_min.any()
    close = np.array([1, 2, 3, 2, 1, 2, np.nan, 2, 1, 0, 1], dtype=float)
    is_max, is_min = local_extrema(close, 2)
    assert np.flatnonzero(is_max).tolist() == [2]  # bars 4..8 see the NaN
    assert not is_min.any()
    with pytest.raises(ValueError, match="window"):
        local_extrema(close, 0)


def test_extrema_match_the_definition_on_random_ties():
    close = np.random.default_rng(1).integers(0, 6, size=400).astype(float)  # many ties
    for window in (1, 3, 12):
        is_max, is_min = local_extrema(close, window)
        for i in range(close.size):
            full = window <= i < close.size - window
            around = close[max(i - window, 0) : i + window + 1]
            assert is_max[i] == (full and close[i] == around.max())
            assert is_min[i] == (full and close[i] == around.min())


# ----------------------------------------------------------------------------------------------- clustering


def test_cluster_prices_known_means_and_noise_dropped():
    prices = np.array([100.0, 100.1, 200.0, 100.2, 99.9, 150.0, 200.2, 200.1, 199.9])
    # median 150 -> eps 0.75: two groups of four, 150 alone is noise.
    labels, levels = cluster_prices(prices, eps_frac=0.005, min_samples=4)
    assert labels.tolist() == [0, 0, 1, 0, 0, -1, 1, 1, 1]
    np.testing.assert_allclose(levels, [100.05, 200.05], rtol=0, atol=1e-9)


def test_cluster_prices_empty_and_all_noise():
    labels, levels = cluster_prices(np.array([]), 0.005, 4)
    assert labels.shape == levels.shape == (0,)
    labels, levels = cluster_prices(np.array([100.0, 100.1, 100.2]), 0.005, 4)  # fewer than min_samples
    assert labels.tolist() == [-1, -1, -1] and levels.size == 0
    with pytest.raises(ValueError, match="eps"):
        cluster_prices(np.array([0.0, 0.0]), 0.005, 1)


def test_cluster_prices_is_sklearn_dbscan():
    prices = real_candles("ETHUSDT", "4h", 3000)["close"].to_numpy()
    labels, levels = cluster_prices(prices, 0.002, 5)
    expected = DBSCAN(eps=0.002 * np.median(prices), min_samples=5).fit(prices[:, None]).labels_
    np.testing.assert_array_equal(labels, expected)
    assert levels.size == expected.max() + 1
    for label, level in enumerate(levels):
        assert level == pytest.approx(prices[labels == label].mean(), rel=1e-12)


def test_wilder_atr_by_hand():
    high = np.array([10.0, 12.0, 13.0, 12.0, 15.0])
    low = np.array([8.0, 9.0, 11.0, 10.0, 11.0])
    close = np.array([9.0, 11.0, 12.0, 11.0, 14.0])
    # True ranges from the 2nd candle: 3, 2, 2, 4. Period 2: first ATR (3+2)/2 at candle 2, then Wilder.
    atr = wilder_atr(high, low, close, 2)
    np.testing.assert_allclose(atr, [np.nan, np.nan, 2.5, 2.25, 3.125])
    assert np.isnan(wilder_atr(high[:2], low[:2], close[:2], 2)).all()


# ----------------------------------------------------------------------------------------------- refits


def test_refits_are_anchored_to_the_epoch_and_gaps_move_them():
    stamps = pd.date_range("2024-01-01 05:00", periods=60, freq="1h", tz="UTC")
    expected = pd.DatetimeIndex(["2024-01-01 05:00", "2024-01-02 00:00", "2024-01-03 00:00"], tz="UTC")
    assert refit_times(stamps, H1, 24).equals(expected)  # the first bar present is always one
    # Appending data does not move earlier refits; a gap over midnight moves it to the next bar present.
    gapped = stamps[(stamps < "2024-01-01 22:00") | (stamps >= "2024-01-02 03:00")]
    assert refit_times(gapped, H1, 24)[1] == pd.Timestamp("2024-01-02 03:00", tz="UTC")
    assert refit_times(stamps[:30], H1, 24).equals(expected[:2])
    four_hours = pd.date_range("2024-01-01", periods=12, freq="4h", tz="UTC")
    assert refit_times(four_hours, Timeframe.H4, 3).hour.tolist() == [0, 12, 0, 12]  # 3 x 4h = 12h


def test_confirmation_delay_and_lookback_edges():
    # Rising closes, one spike at bar 30: the only extremum (a max). window=12 -> known at bar 42's close.
    close = 100.0 + 0.01 * np.arange(80)
    close[30] = 200.0
    candles = _candles(close)
    stamps = candles["timestamp"]
    config = _config(window=12, min_samples=1, lookback_days=1, refit_every=1)
    known = stamps[42] + H1.delta
    assert levels_asof(candles, H1, known - pd.Timedelta(1, "ns"), config).empty
    assert levels_asof(candles, H1, stamps[42], config).empty  # refit at bar i+w's open: not yet known
    found = levels_asof(candles, H1, known, config)
    assert found["price"].tolist() == [200.0] and found["n_extrema"].tolist() == [1]
    assert found["first_seen"].tolist() == found["last_seen"].tolist() == [stamps[30]]
    # Lookback: the extremum bar must have opened at or after T - lookback_days.
    assert len(levels_asof(candles, H1, stamps[30] + pd.Timedelta(days=1), config)) == 1
    assert levels_asof(candles, H1, stamps[30] + pd.Timedelta(days=1, microseconds=1), config).empty

    history = walk_forward_levels(candles, H1, config)
    assert len(history.refits) == len(candles)
    assert history.levels["asof"].min() == stamps[43] == known
    assert history.levels["asof"].max() == stamps[54]  # bar 30 opened a day before bar 54


def test_levels_are_cluster_means_with_counts_and_seen_times():
    # Maxima near 110 and minima near 90, alternating every 4 bars (window 2).
    tops = [110.0, 110.2, 109.8, 110.0, 110.1, 109.9]
    bottoms = [90.0, 90.1, 89.9, 90.2, 89.8, 90.0]
    close = []
    for top, bottom in zip(tops, bottoms, strict=True):
        close += [100.0, top, 100.0, bottom]
    close += [100.0]  # the last bar has no full window
    candles = _candles(close)
    config = _config(window=1, min_samples=3, eps_frac=0.01)
    asof = candles["timestamp"].iloc[-1] + H1.delta
    found = levels_asof(candles, H1, asof, config)
    assert found["price"].tolist() == pytest.approx([np.mean(bottoms), np.mean(tops)], abs=1e-12)
    assert found["n_extrema"].tolist() == [6, 6]
    stamps = candles["timestamp"]
    assert found["first_seen"].tolist() == [stamps[3], stamps[1]]
    assert found["last_seen"].tolist() == [stamps[23], stamps[21]]
    assert found[["touches", "age_days", "volume_ratio", "approach_speed"]].isna().all().all()
    assert list(found.columns) == list(LEVEL_COLUMNS)


# ----------------------------------------------------------------------------------------------- real candles


@pytest.fixture(scope="module")
def btc():
    candles = real_candles("BTCUSDT", "1h", ROWS)
    # The full context on purpose: candles after a refit time must be ignored, whatever is passed.
    context = MultiTimeframe(d1=real_candles("BTCUSDT", "1d"), h4=real_candles("BTCUSDT", "4h"))
    config = LevelsConfig()
    filtered = walk_forward_levels(candles, H1, config, context)
    raw = walk_forward_levels(candles, H1, config, context, raw=True)
    return candles, context, config, filtered, raw


def test_real_history_shape(btc):
    candles, _, _, filtered, raw = btc
    assert filtered.refits.equals(refit_times(candles["timestamp"], H1, 24))
    assert len(filtered.levels) > 200 and len(raw.levels) > len(filtered.levels)
    assert list(filtered.levels.columns) == ["asof", *LEVEL_COLUMNS]
    for history in (filtered, raw):
        levels = history.levels
        assert levels.equals(levels.sort_values(["asof", "price"]).reset_index(drop=True))
        assert levels["asof"].isin(history.refits).all()
        assert not levels[["touches", "age_days", "volume_ratio", "approach_speed"]].isna().any().any()
        # Every extremum used was confirmed by the refit (window=12 bars later, closed) and in the lookback.
        assert (levels["last_seen"] + 13 * H1.delta <= levels["asof"]).all()
        assert (levels["first_seen"] >= levels["asof"] - pd.Timedelta(days=365)).all()


@pytest.mark.parametrize("cut", [700, 2001, 3500, 5999])
def test_walk_forward_sets_do_not_change_when_later_candles_arrive(btc, cut):
    candles, context, config, filtered, raw = btc
    last_open = candles["timestamp"].iloc[cut - 1]
    # What a store holds at the cut's last close, and everything (later candles must be ignored).
    stored = MultiTimeframe(
        **{
            attr: frame[frame["timestamp"] + Timeframe(tf).delta <= last_open + H1.delta]
            for attr, tf, frame in (("d1", "1d", context.d1), ("h4", "4h", context.h4))
        }
    )
    for history, is_raw in ((filtered, False), (raw, True)):
        earlier = history.levels[history.levels["asof"] <= last_open].reset_index(drop=True)
        for cut_context in (stored, context):
            shorter = walk_forward_levels(candles.iloc[:cut], H1, config, cut_context, raw=is_raw)
            assert shorter.refits.equals(history.refits[history.refits <= last_open])
            pd.testing.assert_frame_equal(shorter.levels, earlier, check_exact=True)


def test_a_cut_on_a_refit_bar_keeps_that_refit(btc):
    candles, context, config, filtered, _ = btc
    refit = filtered.levels["asof"].iloc[-1]
    cut = int(np.flatnonzero(candles["timestamp"] == refit)[0]) + 1  # the refit bar is the last bar
    stored = MultiTimeframe(
        d1=context.d1[context.d1["timestamp"] + Timeframe.D1.delta <= refit + H1.delta],
        h4=context.h4[context.h4["timestamp"] + Timeframe.H4.delta <= refit + H1.delta],
    )
    shorter = walk_forward_levels(candles.iloc[:cut], H1, config, stored)
    assert shorter.refits[-1] == refit
    pd.testing.assert_frame_equal(_block(shorter, refit), _block(filtered, refit), check_exact=True)


def test_levels_asof_equals_the_walk_forward_set(btc):
    candles, context, config, filtered, raw = btc
    counts = filtered.levels.groupby("asof").size()
    empty = filtered.refits.difference(counts.index)
    chosen = [filtered.refits[0], empty[-1], *counts.index[[0, len(counts) // 2, -1]]]
    for asof in chosen:
        for history, is_raw in ((filtered, False), (raw, True)):
            at = levels_asof(candles, H1, asof, config, context, raw=is_raw)
            pd.testing.assert_frame_equal(at, _block(history, asof), check_exact=True)
    # Bars after asof in the input change nothing.
    asof = counts.index[-1]
    cut = candles[candles["timestamp"] < asof]
    pd.testing.assert_frame_equal(
        levels_asof(cut, H1, asof, config, context), _block(filtered, asof), check_exact=True
    )


def test_filtered_is_raw_with_the_rules_applied(btc):
    _, _, config, filtered, raw = btc
    rules = config.filters
    levels = raw.levels
    keep = (
        (levels["touches"] >= rules.touches.min_touches)
        & (levels["age_days"] <= rules.age.max_age_days)
        & (levels["volume_ratio"] >= rules.volume.factor)
        & (levels["approach_speed"] <= rules.approach.max_speed)
    )
    assert 0 < keep.sum() < len(levels)
    pd.testing.assert_frame_equal(levels[keep].reset_index(drop=True), filtered.levels, check_exact=True)


@pytest.mark.parametrize("name", ["touches", "age", "volume", "approach"])
def test_disabling_a_filter_never_removes_levels(btc, name):
    candles, context, config, filtered, _ = btc
    settings = config.model_dump()
    settings["filters"][name]["enabled"] = False
    off = LevelsConfig.model_validate(settings)
    relaxed = walk_forward_levels(candles, H1, off, context)
    assert _keys(filtered) <= _keys(relaxed)
    metric = {"touches": "touches", "age": "age_days", "volume": "volume_ratio", "approach": "approach_speed"}
    assert relaxed.levels[metric[name]].isna().all()


@pytest.mark.parametrize(
    ("name", "missing", "timeframe"),
    [("touches", "d1", "1d"), ("volume", "h4", "4h"), ("approach", "h1", "1h")],
)
def test_a_missing_timeframe_is_a_clear_error(name, missing, timeframe):
    frames = {tf: real_candles("BTCUSDT", tf, 400) for tf in ("1d", "4h", "1h")}
    candles = real_candles("BTCUSDT", "15m", 400)
    present = {attr: frames[tf] for attr, tf in (("d1", "1d"), ("h4", "4h"), ("h1", "1h")) if attr != missing}
    context = MultiTimeframe(**present)
    config = LevelsConfig()
    asof = candles["timestamp"].iloc[-1]
    with pytest.raises(
        ValueError, match=rf"levels\.filters\.{name}.*{timeframe}.*levels\.filters\.{name}\.enabled"
    ):
        walk_forward_levels(candles, Timeframe.M15, config, context)
    with pytest.raises(ValueError, match=rf"needs {timeframe} candles"):
        levels_asof(candles, Timeframe.M15, asof, config, context)
    raw = levels_asof(candles, Timeframe.M15, asof, config, context, raw=True)  # raw: no error, metric NaN
    metric = {"touches": "touches", "volume": "volume_ratio", "approach": "approach_speed"}[name]
    assert raw[metric].isna().all()
    off = LevelsConfig.model_validate({"filters": {name: {"enabled": False}}})
    levels_asof(candles, Timeframe.M15, asof, off, context)  # switched off: no error


def test_the_levels_own_candles_serve_their_timeframe_filter():
    candles = real_candles("BTCUSDT", "1h", 3000)
    context = MultiTimeframe(d1=real_candles("BTCUSDT", "1d"), h4=real_candles("BTCUSDT", "4h"))
    asof = candles["timestamp"].iloc[-1]
    implicit = levels_asof(candles, H1, asof, LevelsConfig(), context, raw=True)
    explicit_context = MultiTimeframe(d1=context.d1, h4=context.h4, h1=candles)
    explicit = levels_asof(candles, H1, asof, LevelsConfig(), explicit_context, raw=True)
    pd.testing.assert_frame_equal(implicit, explicit, check_exact=True)
    assert implicit["approach_speed"].notna().all()


def test_filter_metrics_match_a_loop_over_the_rules(btc):
    """The vectorised metrics against the rules written as plain loops over candles closed by T."""
    candles, context, config, _, raw = btc
    rules = config.filters
    lookback = pd.Timedelta(days=config.lookback_days).value
    frames = {"1d": context.d1, "4h": context.h4, "1h": candles}
    periods = {
        "1d": rules.touches.atr_period,
        "4h": rules.touches.atr_period,
        "1h": rules.approach.atr_period,
    }
    arrays = {
        tf: {
            "open": pd.DatetimeIndex(frame["timestamp"]).as_unit("ns").asi8,
            "low": frame["low"].to_numpy(),
            "high": frame["high"].to_numpy(),
            "close": frame["close"].to_numpy(),
            "volume": frame["volume"].to_numpy(),
            "atr": wilder_atr(*(frame[c].to_numpy() for c in ("high", "low", "close")), periods[tf]),
            "delta": Timeframe(tf).nanoseconds,
        }
        for tf, frame in frames.items()
    }

    def in_lookback(tf, t):
        a = arrays[tf]
        return [
            i
            for i in range(a["open"].size)
            if t - lookback <= a["open"][i] and a["open"][i] + a["delta"] <= t
        ]

    def touching(tf, level, t):
        a, out = arrays[tf], []
        for i in in_lookback(tf, t):
            buf = rules.touches.atr_buffer * a["atr"][i]
            if not np.isnan(buf) and a["low"][i] - buf <= level <= a["high"][i] + buf:
                out.append(i)
        return out

    asofs = raw.levels["asof"].unique()
    for asof in asofs[[0, len(asofs) // 3, -1]]:
        t = asof.value
        h1 = arrays["1h"]
        last = max(i for i in range(h1["open"].size) if h1["open"][i] + h1["delta"] <= t)
        bars = rules.approach.bars
        mean_4h = arrays["4h"]["volume"][in_lookback("4h", t)].mean()
        for row in _block(raw, asof).itertuples():
            assert row.touches == len(touching("1d", row.price, t))
            assert row.age_days == pytest.approx((asof - row.last_seen) / pd.Timedelta(days=1), rel=1e-12)
            touched = arrays["4h"]["volume"][touching("4h", row.price, t)]
            assert row.volume_ratio == pytest.approx(touched.mean() / mean_4h, rel=1e-9)
            c = h1["close"]
            speed = (abs(c[last - bars] - row.price) - abs(c[last] - row.price)) / (bars * h1["atr"][last])
            assert row.approach_speed == pytest.approx(speed, rel=1e-9)


def test_empty_input_gives_empty_frames():
    candles = _candles([])
    config = _config()
    history = walk_forward_levels(candles, H1, config)
    assert history.refits.empty and history.levels.empty
    assert list(history.levels.columns) == ["asof", *LEVEL_COLUMNS]
    assert levels_asof(candles, H1, pd.Timestamp("2024-01-01", tz="UTC"), config).empty


def test_each_refit_equals_a_computation_from_only_the_data_closed_by_then(btc):
    """The strongest no-look-ahead check: hand each refit exactly what existed at its time, nothing more."""
    candles, context, config, filtered, _ = btc
    for asof in filtered.refits:
        known = MultiTimeframe(
            d1=context.d1[context.d1["timestamp"] + Timeframe.D1.delta <= asof],
            h4=context.h4[context.h4["timestamp"] + Timeframe.H4.delta <= asof],
        )
        past = candles[candles["timestamp"] + H1.delta <= asof]
        at = levels_asof(past, H1, asof, config, known)
        pd.testing.assert_frame_equal(at, _block(filtered, asof), check_exact=True)
