"""The incremental feature table against the full recomputation, bar by bar on the bundled real candles: the
level history and the newest rows of the table are equal to the bit at every bar (across 4h and 1d closes
and level refits), for the conf feature sets on 1h and 4h bars; gaps and several bars at once are appends;
anything else rebuilds. Also: each resumable indicator and the extended level inputs equal their whole-series
counterparts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pricelevel.config import load_project_config
from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.folder import CandleFolder
from pricelevel.features.catalogue import needed_timeframes
from pricelevel.features.incremental import WARM_BARS, WARM_CANDLES, TableBuilder
from pricelevel.features.lookahead import cut_frames
from pricelevel.features.tables import FEATURE_PREFIX, TableSpec
from pricelevel.levels.history import history_from_frames, level_context
from pricelevel.levels.walkforward import (
    CandleArrays,
    extend_level_inputs,
    level_inputs,
    levels_frame,
    refit_columns,
)
from pricelevel.ta import indicators
from tests.conftest import ROOT, SAMPLE

HOUR = Timeframe.H1.nanoseconds
#: Histories are cut here (a year of 1h bars): long enough for every lookback, quick to rebuild.
UNTIL = pd.Timestamp("2022-01-01", tz="UTC")


def spec_of(config: str = "conf/base.yaml", **changes) -> TableSpec:
    """The conf's table spec with ``features``/``labels``/``levels`` settings changed."""
    spec = load_project_config(ROOT / config).table_spec
    parts = {}
    for part in ("features", "labels", "levels"):
        current = getattr(spec, part)
        parts[part] = type(current).model_validate({**current.model_dump(), **changes.get(part, {})})
    return TableSpec(spec.timeframe, parts["levels"], parts["labels"], parts["features"])


def frames_of(spec: TableSpec, symbol: str, until: pd.Timestamp | None = UNTIL) -> dict:
    frames = spec.read_frames(CandleFolder.open(SAMPLE), symbol)
    return frames if until is None else cut_frames(frames, int(until.value))


def closes(frames: dict, timeframe: Timeframe) -> np.ndarray:
    """Close times (UTC ns) of the bars."""
    return utc_ns(frames[timeframe]["timestamp"]) + timeframe.nanoseconds


def assert_same(builder: TableBuilder, table: pd.DataFrame, want) -> None:
    """The builder's table (the newest rows) and history equal the full build's to the bit."""
    history, rows = builder.history, builder.rows
    full_history, full_table = want
    pd.testing.assert_index_equal(history.refits, full_history.refits, exact=True)
    pd.testing.assert_frame_equal(history.levels, full_history.levels, check_exact=True)
    expected = full_table.iloc[-rows:]
    pd.testing.assert_frame_equal(table, expected, check_exact=True)
    features = [c for c in table.columns if c.startswith(FEATURE_PREFIX)]
    bits, expected_bits = (t[features].to_numpy(dtype=np.float64).view(np.int64) for t in (table, expected))
    assert np.array_equal(bits, expected_bits), "a feature differs in its bits (sign of zero, NaN payload)"


def replay(spec: TableSpec, frames: dict, until_ns, rows: int = 64, builder: TableBuilder | None = None) -> TableBuilder:
    """Feed the builder the candles closed by each time in ``until_ns``, checking every output."""
    builder = builder or TableBuilder(spec, rows)
    for until in until_ns:
        cut = cut_frames(frames, int(until))
        assert_same(builder, builder.update(cut), spec.build(cut))
    return builder


# ----------------------------------------------------------------------------------------------- the builder


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, symbol, bars, changes",
    [
        ("conf/base.yaml", "BTCUSDT", 72, {}),  # 1h, rich set: 3 refits, 18 4h and 3 1d closes
        ("conf/base.yaml", "SOLUSDT", 30, {"features": {"set": "base"}}),
        ("conf/base.yaml", "XRPUSDT", 30, {"labels": {"kind": "level_label"}}),
        ("conf/base.yaml", "DOGEUSDT", 30,
         {"levels": {"filters": {"touches": {"enabled": False}, "volume": {"enabled": False}}}}),
        ("conf/quick.yaml", "ETHUSDT", 30, {}),  # 4h bars: 5 refits; the 1h candles feed the approach filter
    ],
)
def test_every_bar_equals_the_full_build(config, symbol, bars, changes) -> None:
    spec = spec_of(config, **changes)
    frames = frames_of(spec, symbol)
    builder = replay(spec, frames, closes(frames, spec.timeframe)[-bars:])
    assert builder.rebuilds == 1  # only the first update built in full


@pytest.mark.slow
def test_the_whole_sample_history_too() -> None:
    spec = spec_of()
    frames = frames_of(spec, "LINKUSDT", until=None)
    builder = replay(spec, frames, closes(frames, spec.timeframe)[-26:], rows=200)  # 3.5 years, a refit
    assert builder.rebuilds == 1


@pytest.mark.slow
def test_gaps_are_appends() -> None:
    """Missing candles (a lone hour, a whole day with its refit bar, a 4h candle) change nothing: every
    computation counts candles, and a refit falls on the first bar of its period that is there."""
    spec = spec_of()
    frames = frames_of(spec, "ETHUSDT")
    h1, h4 = frames[Timeframe.H1], frames[Timeframe.H4]
    day = (h1["timestamp"] >= UNTIL - pd.Timedelta(days=2)) & (h1["timestamp"] < UNTIL - pd.Timedelta(days=1))
    lone = h1["timestamp"].isin([UNTIL - pd.Timedelta(hours=h) for h in (5, 60, 61)])
    frames[Timeframe.H1] = h1[~(day | lone)].reset_index(drop=True)
    frames[Timeframe.H4] = h4[h4["timestamp"] != UNTIL - pd.Timedelta(hours=20)].reset_index(drop=True)
    builder = replay(spec, frames, closes(frames, spec.timeframe)[-70:])
    assert builder.rebuilds == 1


def test_several_bars_at_once_and_the_same_bar_twice() -> None:
    spec = spec_of()
    frames = frames_of(spec, "BNBUSDT")
    ends = closes(frames, spec.timeframe)
    builder = replay(spec, frames, [ends[-60], ends[-55], ends[-55], ends[-20], ends[-1]])  # 2 refits in one go
    assert builder.rebuilds == 1


def test_the_history_asked_for_late_is_that_of_the_last_update() -> None:
    spec = spec_of()
    frames = frames_of(spec, "LTCUSDT")
    ends = closes(frames, spec.timeframe)
    builder = TableBuilder(spec, 64)
    for until in ends[-80:-10]:  # three refits without anyone reading the history
        builder.update(cut_frames(frames, int(until)))
    cut = cut_frames(frames, int(ends[-11]))
    full_history, _ = spec.build(cut)
    pd.testing.assert_frame_equal(builder.history.levels, full_history.levels, check_exact=True)
    pd.testing.assert_index_equal(builder.history.refits, full_history.refits, exact=True)
    assert builder.history is builder.history  # built once


def test_anything_but_an_append_rebuilds() -> None:
    spec = spec_of()
    frames = frames_of(spec, "ADAUSDT")
    ends = closes(frames, spec.timeframe)
    builder = replay(spec, frames, ends[-30:-28])

    def check(cut: dict) -> None:
        assert_same(builder, builder.update(cut), spec.build(cut))

    rewritten = cut_frames(frames, int(ends[-27]))
    h1 = rewritten[Timeframe.H1].copy()
    h1.loc[100, "close"] *= 1.01  # an old candle corrected
    check({**rewritten, Timeframe.H1: h1})
    assert builder.rebuilds == 2
    check(cut_frames(frames, int(ends[-40])))  # a shorter history
    assert builder.rebuilds == 3
    check(cut_frames(frames, int(ends[-39])))  # and on from there by appends
    assert builder.rebuilds == 3
    # A 4h candle held back, then delivered one bar late: the rows made without it would be wrong.
    until = ends[np.flatnonzero(ends % Timeframe.H4.nanoseconds == 0)[-1]]
    late = cut_frames(frames, int(until))
    late[Timeframe.H4] = late[Timeframe.H4].iloc[:-1]
    replay(spec, frames, [until - HOUR], builder=builder)
    check(late)
    rebuilds = builder.rebuilds
    check(cut_frames(frames, int(until + HOUR)))
    assert builder.rebuilds == rebuilds + 1
    # A NaN price: built in full while it is there.
    broken = cut_frames(frames, int(until + 2 * HOUR))
    h1 = broken[Timeframe.H1].copy()
    h1.loc[len(h1) - 500, "volume"] = np.nan
    check({**broken, Timeframe.H1: h1})
    assert builder.rebuilds == rebuilds + 2


@pytest.mark.parametrize(
    "config, symbol, first, last",
    [
        ("conf/base.yaml", "DOTUSDT", WARM_BARS - 10, WARM_BARS + 10),  # base set: no context columns
        ("conf/quick.yaml", "SOLUSDT", 6 * WARM_CANDLES - 12, 6 * WARM_CANDLES + 12),  # 4h bars, 1d context
    ],
)
def test_a_short_history_builds_in_full_until_the_recursions_are_warm(config, symbol, first, last) -> None:
    spec = spec_of(config, levels={"lookback_days": 5}, features={"set": "base"} if "base" in config else {})
    frames = frames_of(spec, symbol, until=pd.Timestamp("2021-03-01", tz="UTC"))
    ends = closes(frames, spec.timeframe)[first:last]
    builder = replay(spec, frames, ends, rows=1000)  # more rows than the history has
    cuts = [cut_frames(frames, int(until)) for until in ends]
    context = needed_timeframes(spec.columns)
    cold = sum(
        len(cut[spec.timeframe]) < WARM_BARS or any(len(cut[tf]) < WARM_CANDLES for tf in context) for cut in cuts
    )
    assert 0 < cold < len(ends) - 1
    assert builder.rebuilds == cold + 1  # the cold updates, then the first warm one sets the state up


def test_a_missing_timeframe_fails_as_the_full_build_does() -> None:
    spec = spec_of()
    frames = frames_of(spec, "LTCUSDT")
    builder = TableBuilder(spec, 64)
    with pytest.raises(RuntimeError, match="no update yet"):
        builder.history  # noqa: B018
    with pytest.raises(ValueError, match="1d"):
        builder.update({**frames, Timeframe.D1: None})
    with pytest.raises(ValueError, match="rows"):
        TableBuilder(spec, 0)


# ----------------------------------------------------------------------------------------------- the parts


@pytest.mark.parametrize("symbol", ["BTCUSDT", "DOGEUSDT"])
@pytest.mark.parametrize("new", [1, 7])
def test_resumed_indicators_equal_the_whole_series(symbol: str, new: int) -> None:
    frame = pd.read_parquet(SAMPLE / f"{symbol}_1h.parquet").iloc[:3000]
    high, low, close, volume = (frame[c].to_numpy(dtype=np.float64) for c in ("high", "low", "close", "volume"))
    for begin in (100, 1234, 3000 - new):
        end = begin + new
        h, lo, c, v = high[:end], low[:end], close[:end], volume[:end]
        old = slice(0, begin)

        def same(resumed: np.ndarray, whole: np.ndarray, rows: slice = slice(begin, end)) -> None:
            assert resumed.shape == (new,)
            assert np.array_equal(resumed.view(np.int64), whole[rows].view(np.int64))

        same(indicators.sma_resume(v, 14, begin, indicators.sma_state(volume[old], 14))[0], indicators.sma(v, 14))
        same(indicators.ema_resume(c, 50, begin, indicators.ema(close[old], 50)[-1]), indicators.ema(c, 50))
        same(indicators.rsi_resume(c, 14, begin, indicators.rsi_state(close[old], 14))[0], indicators.rsi(c, 14))
        same(indicators.atr_resume(h, lo, c, 7, begin, indicators.atr(high[old], low[old], close[old], 7)[-1]),
             indicators.atr(h, lo, c, 7))
        same(indicators.force_index_resume(c, v, 13, begin, indicators.force_index(close[old], volume[old], 13)[-1]),
             indicators.force_index(c, v, 13))
        state = indicators.ease_of_movement_state(high[old], low[old], volume[old], 14)
        same(indicators.ease_of_movement_resume(h, lo, v, 14, begin, state)[0], indicators.ease_of_movement(h, lo, v, 14))
        same(indicators.rolling_volatility_resume(c, 24, begin), indicators.rolling_volatility(c, 24))
        lines, _ = indicators.macd_resume(c, 12, 26, 9, begin, indicators.macd_state(close[old], 12, 26, 9))
        for resumed, whole in zip(lines, indicators.macd(c, 12, 26, 9), strict=True):
            same(resumed, whole)
        bands, _ = indicators.bollinger_resume(c, 20, 2.0, begin, indicators.sma_state(close[old], 20))
        for resumed, whole in zip(bands, indicators.bollinger(c, 20, 2.0), strict=True):
            same(resumed, whole)


def test_states_carry_on_over_several_resumes() -> None:
    close = pd.read_parquet(SAMPLE / "SOLUSDT_1h.parquet")["close"].to_numpy()[:2000]
    state = indicators.rsi_state(close[:500], 14)
    sma = indicators.sma_state(close[:500], 20)
    macd = indicators.macd_state(close[:500])
    for begin in range(500, 2000, 150):
        rsi, state = indicators.rsi_resume(close[: begin + 150], 14, begin, state)
        mean, sma = indicators.sma_resume(close[: begin + 150], 20, begin, sma)
        lines, macd = indicators.macd_resume(close[: begin + 150], 12, 26, 9, begin, macd)
    assert np.array_equal(rsi, indicators.rsi(close, 14)[-150:])
    assert np.array_equal(mean, indicators.sma(close, 20)[-150:])
    assert np.array_equal(lines.histogram, indicators.macd(close).histogram[-150:])


@pytest.mark.parametrize("config", ["conf/base.yaml", "conf/quick.yaml"])
@pytest.mark.parametrize("new_bars", [1, 30, 700])
def test_extended_level_inputs_equal_a_fresh_preparation_and_refit_alike(config: str, new_bars: int) -> None:
    spec = spec_of(config)
    frames = frames_of(spec, "BTCUSDT")
    ends = closes(frames, spec.timeframe)
    old = cut_frames(frames, int(ends[-1 - new_bars]))
    inputs = level_inputs(old[spec.timeframe], spec.timeframe, spec.levels, level_context(old))
    arrays = {tf: CandleArrays.of(frame) for tf, frame in frames.items()}
    extended = extend_level_inputs(inputs, arrays[spec.timeframe], spec.timeframe, spec.levels, arrays)
    fresh = level_inputs(frames[spec.timeframe], spec.timeframe, spec.levels, level_context(frames))
    for name in ("bar_ns", "extremum_ns", "known_ns", "extremum_price"):
        assert np.array_equal(getattr(extended, name), getattr(fresh, name)), name
    for attr in ("d1", "h4", "h1"):
        got, want = getattr(extended, attr), getattr(fresh, attr)
        assert (got is None) == (want is None)
        for name in ("open_ns", "close_ns", "band_low", "band_high", "close", "volume", "atr"):
            assert got is None or np.array_equal(getattr(got, name), getattr(want, name), equal_nan=True), (attr, name)
    history = history_from_frames(frames, spec.timeframe, spec.levels)
    for refit in history.refits[-3:]:
        rows = levels_frame(refit_columns(extended, refit.value, spec.levels))
        expected = history.levels[history.levels["asof"] == refit].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, expected, check_exact=True)


def test_extensions_that_branch_never_write_over_each_other() -> None:
    """Extensions write into room after the arrays they extend; extending one inputs twice, or the first result
    again, leaves every result equal to a fresh preparation of its own candles."""
    spec = spec_of()
    frames = frames_of(spec, "XRPUSDT")
    ends = closes(frames, spec.timeframe)

    def inputs_at(until) -> tuple:
        cut = cut_frames(frames, int(until))
        arrays = {tf: CandleArrays.of(frame) for tf, frame in cut.items()}
        return level_inputs(cut[spec.timeframe], spec.timeframe, spec.levels, level_context(cut)), arrays

    def extend(inputs, until):
        arrays = inputs_at(until)[1]
        return extend_level_inputs(inputs, arrays[spec.timeframe], spec.timeframe, spec.levels, arrays)

    base, _ = inputs_at(ends[-40])
    first = extend(base, ends[-30])
    second = extend(base, ends[-20])  # from the same inputs: must not reuse the room the first one took
    third = extend(first, ends[-10])
    again = extend(first, ends[-25])
    for got, until in ((first, ends[-30]), (second, ends[-20]), (third, ends[-10]), (again, ends[-25])):
        want, _ = inputs_at(until)
        for attr in ("d1", "h4", "h1"):
            for name in ("open_ns", "close_ns", "band_low", "band_high", "close", "volume", "atr"):
                assert np.array_equal(getattr(getattr(got, attr), name), getattr(getattr(want, attr), name),
                                      equal_nan=True), (attr, name)


def test_extending_level_inputs_refuses_what_is_not_an_append() -> None:
    spec = spec_of()
    frames = frames_of(spec, "BTCUSDT")
    inputs = level_inputs(frames[spec.timeframe], spec.timeframe, spec.levels, level_context(frames))
    arrays = {tf: CandleArrays.of(frame.iloc[1:]) for tf, frame in frames.items()}
    with pytest.raises(ValueError, match="append"):
        extend_level_inputs(inputs, arrays[spec.timeframe], spec.timeframe, spec.levels, arrays)


def test_bracketing_a_sorted_history_by_search_equals_the_sort() -> None:
    """The per-set binary search (histories in (refit, price) order) and the joint sort agree row for row,
    closes equal to level prices and NaN included."""
    from pricelevel.levels.walkforward import _bracketing_by_sort, bracketing_levels, level_in_force_index

    spec = spec_of()
    frames = frames_of(spec, "ETHUSDT")
    history = history_from_frames(frames, spec.timeframe, spec.levels)
    stamps = pd.DatetimeIndex(frames[spec.timeframe]["timestamp"])
    close = frames[spec.timeframe]["close"].to_numpy(dtype=np.float64).copy()
    prices = history.levels["price"].to_numpy()
    close[::40] = prices[np.arange(close[::40].size) % prices.size]  # ties with a level
    close[3] = np.nan
    level_set = np.searchsorted(utc_ns(history.refits), utc_ns(history.levels["asof"]), side="left")
    expected = _bracketing_by_sort(level_in_force_index(stamps, history), close, level_set, prices)
    for got, want in zip(bracketing_levels(stamps, close, history), expected, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
