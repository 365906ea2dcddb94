"""Support/resistance levels: extrema of closes clustered with DBSCAN, refitted walk-forward.

A level is only useful as a feature or label if it could have been known when it is used, so every rule
below is about *when* a piece of data becomes known:

- **Extrema.** Bar ``i`` is a local maximum when ``close[i] == max(close[i-w : i+w+1])`` (minimum likewise),
  ``w = window``. Equality counts, so every bar of a flat top is a maximum (each one is a point for the
  clustering). Bars without ``w`` bars on both sides, and windows holding a NaN close, are not extrema. A
  bar that is both (a fully flat window) is one point. The window counts bars present, not clock time.
- **Confirmation.** An extremum at bar ``i`` is known at the close of bar ``i + w`` (``timestamp[i+w] +
  timeframe.delta``), when the ``w`` later closes exist.
- **Clustering.** The known extrema prices (maxima and minima together, in bar order) are clustered with
  DBSCAN, ``eps = eps_frac * median(prices)``, labelled exactly as scikit-learn's ``DBSCAN`` labels them (its
  numbering follows bar order and decides which cluster takes a border point; see
  :mod:`pricelevel.clustering`). A level is a cluster's mean price (members summed in bar order), noise makes
  none; a set is sorted by price, equal prices by cluster number.
- **Refits.** Levels are re-clustered at the first bar present of every period of
  ``refit_every * timeframe.delta`` counted from the Unix epoch (the first bar of the data is always one).
  Fixed to the epoch, refit times do not move when data is appended. A refit at the bar opening at ``T``
  uses candles closed at or before ``T`` (the bars before it, and extrema confirmed by then) whose extremum
  bar opened at or after ``T - lookback_days``; its set is in force from bar ``T`` until the next refit.
- **Multi-timeframe filters**, at each refit ``T`` and only from candles of each timeframe closed at or
  before ``T`` (and, where a lookback applies, opened at or after ``T - lookback_days``):

  * ``touches``: 1d candles whose ``[low - buf, high + buf]`` contains the level, ``buf = atr_buffer x
    ATR(atr_period)`` of that candle; candles before the ATR exists do not count. Keep ``>= min_touches``.
  * ``age``: days from the level's newest extremum (its bar open time) to ``T``. Keep ``<= max_age_days``.
  * ``volume``: mean volume of the touching 4h candles (the touch rule with the ``touches`` filter's
    ``atr_period``/``atr_buffer`` on 4h ATR) over the mean volume of all 4h candles of the lookback. Keep
    ``>= factor``; no touching candle drops the level.
  * ``approach``: on the 1h closes ``c`` closed by ``T``, ``(|c[-1-bars] - L| - |c[-1] - L|) / (bars x
    ATR_1h[-1])``, positive when price moves toward the level. Keep ``<= max_speed``; a speed that cannot
    be computed yet (too few candles) drops the level.

  ATR is Wilder's (:func:`pricelevel.indicators.atr`, equal to TA-Lib): true range from the second candle on,
  first ATR the mean of the first
  ``atr_period`` true ranges, then ``atr = (atr * (p - 1) + tr) / p``; it depends only on earlier candles.
  A filter needs its timeframe's candles: taken from ``context``, or from ``candles`` when the levels are
  computed on that timeframe. ``raw=True`` computes the metrics it can but drops nothing.

Everything computed per bar from the whole input (extrema, ATR) depends only on that bar's past (extrema: on
``w`` later bars, which the confirmation time accounts for), so levels at ``T`` are the same whatever data
follows ``T``: :func:`walk_forward_levels` on a prefix of the candles reproduces every earlier refit exactly.

How it is computed (none of it changes a value): extrema by a compiled scan; refits by one compiled pass
(:func:`pricelevel.clustering.cluster_windows`) that keeps the window's extrema sorted as refits advance, merging
in newly confirmed ones and dropping those past the lookback, and clusters each window in linear time; the
filters by compiled passes over every level row at once. The touch counts and volume sums reproduce numpy's
``(levels x candles).sum(axis=1)`` to the bit: its pairwise summation tree is replayed, skipping blocks of
candles whose widened ranges cannot contain the level (they add exact zeros).

For a live system that appends candles (:mod:`pricelevel.features.incremental`): :func:`extend_level_inputs`
brings what refits read up to the new candles from the appended ones, and :func:`refit_columns` computes one
refit from it, equal to that refit of :func:`walk_forward_levels` over all the candles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.levels.clustering import cluster_windows, dbscan_1d
from pricelevel.levels.config import LevelsConfig
from pricelevel.ta import indicators

#: Columns of a level set, in order (``walk_forward_levels`` puts ``asof`` first).
LEVEL_COLUMNS = (
    "price",
    "n_extrema",
    "first_seen",
    "last_seen",
    "touches",
    "age_days",
    "volume_ratio",
    "approach_speed",
)
_DAY_NS = Timeframe.D1.nanoseconds
#: Candle lengths in ns (``Timeframe.nanoseconds`` parses its delta at every call).
_TIMEFRAME_NS = {tf: tf.nanoseconds for tf in Timeframe}
#: filter name -> (timeframe it reads, MultiTimeframe attribute).
FILTER_TIMEFRAMES = {
    "touches": (Timeframe.D1, "d1"),
    "volume": (Timeframe.H4, "h4"),
    "approach": (Timeframe.H1, "h1"),
}


@dataclass(frozen=True, eq=False)
class MultiTimeframe:
    """Canonical candles of the same symbol on the filters' timeframes (any may be left out)."""

    d1: pd.DataFrame | None = None
    h4: pd.DataFrame | None = None
    h1: pd.DataFrame | None = None


@dataclass(frozen=True, eq=False)
class LevelHistory:
    """A walk-forward run: every refit time, and the levels each refit put in force.

    ``levels`` has ``asof`` (the refit bar's open time) then :data:`LEVEL_COLUMNS`, sorted by (asof, price).
    A refit that found no level is in ``refits`` but has no rows: no level is in force until the next one.
    """

    refits: pd.DatetimeIndex
    levels: pd.DataFrame


# ----------------------------------------------------------------------------------------------- building blocks


def local_extrema(close: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(is_max, is_min)``: the close equals the max/min of the ``2 * window + 1`` closes around it.

    Ties count (every bar of a plateau at the window's max is a maximum); the first and last ``window`` bars
    have no full window and are never extrema; a window holding a NaN has no extremum.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    values = _writable(close)
    is_max = np.zeros(values.shape[0], dtype=bool)
    is_min = np.zeros(values.shape[0], dtype=bool)
    _mark_extrema(values, int(window), is_max, is_min)
    return is_max, is_min


def cluster_prices(prices: np.ndarray, eps_frac: float, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D DBSCAN with ``eps = eps_frac * median(prices)``: ``(label per point, -1 = noise; mean per label)``.

    The eps scales with the price so one setting works for every symbol and era. Labels are scikit-learn's.
    """
    values = np.asarray(prices, dtype=np.float64).ravel()
    if values.size == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float64)
    eps = eps_frac * float(np.median(values))
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(_bad_eps_message(eps))
    labels = dbscan_1d(values, eps, min_samples)
    n_clusters = int(labels.max()) + 1
    if n_clusters <= 0:
        return labels, np.empty(0, dtype=np.float64)
    member = labels >= 0
    sums = np.bincount(labels[member], weights=values[member], minlength=n_clusters)
    counts = np.bincount(labels[member], minlength=n_clusters)
    return labels, sums / counts


def refit_times(
    timestamps: pd.DatetimeIndex | pd.Series, timeframe: Timeframe, refit_every: int
) -> pd.DatetimeIndex:
    """Open times of the refit bars: the first bar present in each ``refit_every x delta`` epoch period."""
    ns = utc_ns(timestamps)
    return _to_utc(ns[_refit_mask(ns, refit_every * timeframe.nanoseconds)])


# ----------------------------------------------------------------------------------------------- levels


def levels_asof(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    asof: pd.Timestamp,
    config: LevelsConfig,
    context: MultiTimeframe | None = None,
    raw: bool = False,
) -> pd.DataFrame:
    """The level set a refit at ``asof`` computes, from candles closed at or before ``asof`` only.

    Columns :data:`LEVEL_COLUMNS`, sorted by price; metrics of filters not computed are NaN.
    """
    prepared = _prepare(candles, Timeframe(timeframe), config, context, raw)
    columns = _refits(prepared, np.array([_timestamp_ns(asof)], dtype=np.int64), config, raw)
    del columns["asof"]
    return _frame(columns)


def walk_forward_levels(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    config: LevelsConfig,
    context: MultiTimeframe | None = None,
    raw: bool = False,
) -> LevelHistory:
    """Every refit over ``candles``: each set equals ``levels_asof`` at its refit time.

    Extrema, confirmation times and ATRs are computed once; all refits are then clustered in one compiled pass
    that updates the window's sorted extrema as it advances, and filtered in one pass over all level rows.
    """
    timeframe = Timeframe(timeframe)
    prepared = _prepare(candles, timeframe, config, context, raw)
    refit_ns = prepared.bar_ns[_refit_mask(prepared.bar_ns, config.refit_every * timeframe.nanoseconds)]
    levels = _frame(_refits(prepared, refit_ns, config, raw))
    return LevelHistory(refits=_to_utc(refit_ns), levels=levels)


@dataclass(frozen=True, eq=False)
class CandleArrays:
    """One timeframe's candles as arrays (whole columns, views where possible): open times in UTC ns, prices."""

    open_ns: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    @classmethod
    def of(cls, frame: pd.DataFrame) -> CandleArrays:
        return cls(column_ns(frame["timestamp"]), *(frame[c].to_numpy(dtype=np.float64) for c in _PRICES))


_PRICES = ("high", "low", "close", "volume")


def level_inputs(
    candles: pd.DataFrame, timeframe: Timeframe, config: LevelsConfig, context: MultiTimeframe | None = None
) -> LevelInputs:
    """What every refit over ``candles`` reads (extrema, the filters' candles and ATRs), for :func:`refit_columns`."""
    return _prepare(candles, Timeframe(timeframe), config, context, False)


def extend_level_inputs(
    inputs: LevelInputs,
    candles: CandleArrays,
    timeframe: Timeframe,
    config: LevelsConfig,
    context: Mapping[Timeframe, CandleArrays],
) -> LevelInputs:
    """``inputs`` brought up to ``candles`` and ``context`` (by timeframe), which append candles to theirs.

    Equal to :func:`level_inputs` on the longer candles, computed from the appended ones: an extremum depends
    only on the ``window`` closes around it, and the filters' ATR continues from its last value (recomputed
    while still in its warm-up or after a NaN). Only the boundary is checked: the caller vouches that the
    earlier candles are the same.
    """
    timeframe = Timeframe(timeframe)
    window = config.window
    n_old = inputs.bar_ns.size
    bar_ns = _appended(inputs.bar_ns, candles.open_ns, f"{timeframe} candles")
    close = candles.close
    first = max(window, n_old - window)  # the first bar whose extremum was not decidable before
    index = np.empty(0, dtype=np.int64)
    if close.size - window > first:
        is_max, is_min = local_extrema(close[first - window :], window)
        index = np.flatnonzero(is_max | is_min) + (first - window)
    contexts = {}
    for name, (frame_tf, attr) in FILTER_TIMEFRAMES.items():
        old = getattr(inputs, attr)
        contexts[attr] = None if old is None else _extend_context(
            old, candles if frame_tf == timeframe else context[frame_tf], frame_tf,
            _filter_atr_period(name, config.filters), config.filters.touches.atr_buffer,
        )
    return LevelInputs(
        bar_ns=bar_ns,
        extremum_ns=np.concatenate([inputs.extremum_ns, bar_ns[index]]),
        known_ns=np.concatenate([inputs.known_ns, bar_ns[index + window] + _TIMEFRAME_NS[timeframe]]),
        extremum_price=np.concatenate([inputs.extremum_price, close[index]]),
        lookback_ns=inputs.lookback_ns,
        **contexts,
    )


def refit_columns(inputs: LevelInputs, asof_ns: int, config: LevelsConfig) -> dict[str, np.ndarray]:
    """The rows a refit at ``asof_ns`` (UTC ns) adds to a history, as columns (``asof`` then
    :data:`LEVEL_COLUMNS`, times in UTC ns; :func:`levels_frame` makes them the history's rows): what
    :func:`walk_forward_levels` over the candles of ``inputs`` gives for that refit."""
    return _refits(inputs, np.array([asof_ns], dtype=np.int64), config, False)


def levels_frame(columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Level rows from their columns (times in UTC ns), as :class:`LevelHistory` holds them."""
    return _frame(dict(columns))


def level_in_force_index(timestamps: pd.DatetimeIndex | pd.Series, history: LevelHistory) -> np.ndarray:
    """Index into ``history.refits`` of the set in force at each timestamp; -1 before the first refit."""
    refit_ns = utc_ns(history.refits)
    return np.searchsorted(refit_ns, utc_ns(timestamps), side="right").astype(np.intp) - 1


def nearest_level(
    timestamps: pd.DatetimeIndex | pd.Series, close: np.ndarray, history: LevelHistory
) -> np.ndarray:
    """Price of the level in force closest to each close (the lower one on a tie); NaN where no level is in
    force."""
    close = np.asarray(close, dtype=np.float64)
    if len(timestamps) != close.shape[0]:
        raise ValueError(f"timestamps ({len(timestamps)}) and close ({close.shape[0]}) differ in length")
    below, above = bracketing_levels(timestamps, close, history)
    return nearest_of_brackets(close, history.levels["price"].to_numpy(dtype=np.float64), below, above)


def nearest_of_brackets(close: np.ndarray, prices: np.ndarray, below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """:func:`nearest_level` from :func:`bracketing_levels`' rows (for callers that need both)."""
    if not len(prices):
        return np.full(close.shape, np.nan)
    low = np.where(below >= 0, prices[np.maximum(below, 0)], np.nan)
    high = np.where(above >= 0, prices[np.maximum(above, 0)], np.nan)
    use_high = (below < 0) | ((above >= 0) & (np.abs(high - close) < np.abs(close - low)))
    return np.where(use_high, high, low)


def bracketing_levels(
    timestamps: pd.DatetimeIndex | pd.Series, close: np.ndarray, history: LevelHistory
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``history.levels`` of the nearest level in force at or below / strictly above each close;
    -1 where there is none (or the close is NaN).

    A history sorted by (refit, price), as :func:`walk_forward_levels` makes it, is searched per bar within
    its set (compiled binary search); any other order goes through one sort of bars and levels together.
    Both give the same rows: among equal prices, the last row at or below and the first row above.
    """
    close = np.asarray(close, dtype=np.float64)
    levels = history.levels
    refit_ns = utc_ns(history.refits)
    block = level_in_force_index(timestamps, history)  # -1: no set in force yet
    level_block = np.searchsorted(refit_ns, column_ns(levels["asof"]), side="left")
    price = levels["price"].to_numpy(dtype=np.float64)
    if _sorted_by_set_and_price(level_block, price):
        starts = np.searchsorted(level_block, np.arange(refit_ns.size), side="left").astype(np.int64)
        ends = np.searchsorted(level_block, np.arange(refit_ns.size), side="right").astype(np.int64)
        below = np.empty(close.shape, dtype=np.intp)
        above = np.empty(close.shape, dtype=np.intp)
        _bracket_within_sets(price, starts, ends, block.astype(np.int64), _writable(close), below, above)
        return below, above
    return _bracketing_by_sort(block, close, level_block, price)


def _sorted_by_set_and_price(level_block: np.ndarray, price: np.ndarray) -> bool:
    """Whether level rows are in (set, price) order with no NaN price (then a set's rows are a sorted run)."""
    if np.isnan(price).any():
        return False
    same_set = np.diff(level_block) == 0
    return bool(np.all(np.diff(level_block) >= 0) and np.all(np.diff(price)[same_set] >= 0))


def _bracketing_by_sort(
    block: np.ndarray, close: np.ndarray, level_block: np.ndarray, price: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bracketing_levels` for level rows in any order: one sort of bars and levels together."""
    n_levels = price.size
    # Levels (kind 0) sort before a bar (kind 1) at the same price: a level equal to the close is support.
    keys_block = np.concatenate([level_block, block])
    keys_price = np.concatenate([price, close])
    kind = np.concatenate([np.zeros(n_levels, dtype=np.int8), np.ones(len(close), dtype=np.int8)])
    order = np.lexsort((kind, keys_price, keys_block))
    levels_before = np.cumsum(kind[order] == 0)
    position = np.empty(len(order), dtype=np.intp)
    position[order] = np.arange(len(order))
    count = levels_before[position[n_levels:]]  # levels sorted before each bar (global, by block then price)
    level_order = order[kind[order] == 0]  # level rows in (block, price) order
    block_start = np.searchsorted(level_block[level_order], block, side="left")
    block_end = np.searchsorted(level_block[level_order], block, side="right")
    valid = (block >= 0) & ~np.isnan(close)
    has_below = valid & (count > block_start)
    has_above = valid & (count < block_end)
    below = np.where(has_below, level_order[np.clip(count - 1, 0, max(n_levels - 1, 0))] if n_levels else -1, -1)
    above = np.where(has_above, level_order[np.clip(count, 0, max(n_levels - 1, 0))] if n_levels else -1, -1)
    return below.astype(np.intp), above.astype(np.intp)


def nearest_level_distance(
    timestamps: pd.DatetimeIndex | pd.Series, close: np.ndarray, history: LevelHistory
) -> np.ndarray:
    """``|close - nearest level in force| / close``: a scale-free feature; NaN where no level is in force."""
    close = np.asarray(close, dtype=np.float64)
    return np.abs(close - nearest_level(timestamps, close, history)) / close


# ----------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True, eq=False)
class _Context:
    """One filter timeframe as arrays: open/close times, touch band per candle, closes, volumes, ATR."""

    open_ns: np.ndarray
    close_ns: np.ndarray
    band_low: np.ndarray  # low - atr_buffer x ATR (NaN before the ATR exists)
    band_high: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    atr: np.ndarray
    spare: _Spare | None = None  # room after the arrays for the next extension (extended contexts only)


class _Spare:
    """Buffers whose prefix a context's grown arrays view, with room after it: the next extension of that context
    writes its candles there instead of copying every array. ``used`` is how much is taken, so a second extension
    of the same context (which would write where the first one did) copies instead."""

    GROWN = ("close_ns", "band_low", "band_high", "volume", "atr")

    def __init__(self, arrays: dict[str, np.ndarray], used: int) -> None:
        self.arrays = arrays
        self.used = used


@dataclass(frozen=True, eq=False)
class LevelInputs:
    """What every refit reads, computed once: extrema with their confirmation times, filter contexts."""

    bar_ns: np.ndarray
    extremum_ns: np.ndarray  # open time of the extremum bar (sorted)
    known_ns: np.ndarray  # close time of bar i + window (sorted)
    extremum_price: np.ndarray
    lookback_ns: int
    d1: _Context | None
    h4: _Context | None
    h1: _Context | None


_EMPTY_LEVELS = {
    "price": np.empty(0, dtype=np.float64),
    "n_extrema": np.empty(0, dtype=np.int64),
    "first_seen": np.empty(0, dtype=np.int64),
    "last_seen": np.empty(0, dtype=np.int64),
    "touches": np.empty(0, dtype=np.float64),
    "age_days": np.empty(0, dtype=np.float64),
    "volume_ratio": np.empty(0, dtype=np.float64),
    "approach_speed": np.empty(0, dtype=np.float64),
}


def _prepare(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    config: LevelsConfig,
    context: MultiTimeframe | None,
    raw: bool,
) -> LevelInputs:
    bar_ns = _candle_ns(candles, f"{timeframe} candles")
    is_max, is_min = local_extrema(candles["close"].to_numpy(dtype=np.float64), config.window)
    index = np.flatnonzero(is_max | is_min)
    known_ns = bar_ns[index + config.window] + timeframe.nanoseconds
    filters = config.filters
    touch = filters.touches
    contexts: dict[str, _Context | None] = {}
    for name, (frame_tf, attr) in FILTER_TIMEFRAMES.items():
        frame = _filter_frame(candles, timeframe, context, frame_tf, attr)
        if not getattr(filters, name).enabled:
            contexts[attr] = None
            continue
        if frame is None:
            if raw:
                contexts[attr] = None
                continue
            raise ValueError(
                f"levels.filters.{name} needs {frame_tf} candles: pass context=MultiTimeframe({attr}=...) "
                f"or switch it off with levels.filters.{name}.enabled=false"
            )
        contexts[attr] = _context(frame, frame_tf, _filter_atr_period(name, filters), touch.atr_buffer)
    return LevelInputs(
        bar_ns=bar_ns,
        extremum_ns=bar_ns[index],
        known_ns=known_ns,
        extremum_price=candles["close"].to_numpy(dtype=np.float64)[index],
        lookback_ns=round(config.lookback_days * _DAY_NS),
        **contexts,
    )


def _filter_frame(
    candles: pd.DataFrame, timeframe: Timeframe, context: MultiTimeframe | None, frame_tf: Timeframe, attr: str
) -> pd.DataFrame | None:
    """A filter's candles: from ``context``, else the levels' own candles when they are of its timeframe."""
    frame = getattr(context, attr) if context is not None else None
    return candles if frame is None and frame_tf == timeframe else frame


def _filter_atr_period(name: str, filters) -> int:
    return filters.approach.atr_period if name == "approach" else filters.touches.atr_period


def _extend_context(
    old: _Context, candles: CandleArrays, timeframe: Timeframe, atr_period: int, atr_buffer: float
) -> _Context:
    """:func:`_context` of ``candles``, which append candles to those of ``old``, from the appended ones (written
    after ``old``'s arrays when it has room there, so a bar's extension does not copy the whole history)."""
    m = old.open_ns.size
    open_ns = _appended(old.open_ns, candles.open_ns, f"{timeframe} context candles")
    n = open_ns.size
    high, low, close = candles.high, candles.low, candles.close
    resumable = m > atr_period and np.isfinite(old.atr[-1])
    if resumable and np.isfinite(high[m:]).all() and np.isfinite(low[m:]).all() and np.isfinite(close[m:]).all():
        atr = indicators.atr_resume(high, low, close, atr_period, m, old.atr[-1])
    else:
        atr = indicators.atr(high, low, close, atr_period)[m:]
    new = {
        "close_ns": open_ns[m:] + _TIMEFRAME_NS[timeframe],
        "band_low": low[m:] - atr_buffer * atr,
        "band_high": high[m:] + atr_buffer * atr,
        "volume": candles.volume[m:],
        "atr": atr,
    }
    spare = old.spare
    if spare is None or spare.used != m or next(iter(spare.arrays.values())).size < n:
        capacity = 2 * n + 64
        spare = _Spare({name: _grown_copy(getattr(old, name), capacity) for name in _Spare.GROWN}, m)
    for name, values in new.items():
        spare.arrays[name][m:n] = values
    spare.used = n
    grown = {name: spare.arrays[name][:n] for name in _Spare.GROWN}
    return _Context(open_ns=open_ns, close=close, spare=spare, **grown)


def _grown_copy(values: np.ndarray, capacity: int) -> np.ndarray:
    out = np.empty(capacity, dtype=values.dtype)
    out[: values.size] = values
    return out


def _appended(old_ns: np.ndarray, ns: np.ndarray, what: str) -> np.ndarray:
    """``ns``, the open times of candles that must append to those of ``old_ns`` (checked at the boundary)."""
    m = old_ns.size
    appended = ns.size >= m and (m == 0 or ns[m - 1] == old_ns[-1])
    if not appended or (ns.size > m and not bool(np.all(np.diff(ns[max(m - 1, 0) :]) > 0))):
        raise ValueError(f"{what}: the new candles must append to the old ones, sorted and unique")
    return ns


def _context(frame: pd.DataFrame, timeframe: Timeframe, atr_period: int, atr_buffer: float) -> _Context:
    open_ns = _candle_ns(frame, f"{timeframe} context candles")
    high = frame["high"].to_numpy(dtype=np.float64)
    low = frame["low"].to_numpy(dtype=np.float64)
    close = frame["close"].to_numpy(dtype=np.float64)
    atr = indicators.atr(high, low, close, atr_period)
    return _Context(
        open_ns=open_ns,
        close_ns=open_ns + timeframe.nanoseconds,
        band_low=low - atr_buffer * atr,
        band_high=high + atr_buffer * atr,
        close=close,
        volume=_writable(frame["volume"].to_numpy(dtype=np.float64)),
        atr=atr,
    )


def _refits(prepared: LevelInputs, refit_ns: np.ndarray, config: LevelsConfig, raw: bool) -> dict[str, np.ndarray]:
    """The level sets of the refits at ``refit_ns`` (ascending) as column arrays, ``asof`` first."""
    start_ns = _window_start(refit_ns, prepared.lookback_ns)
    lo = np.searchsorted(prepared.extremum_ns, start_ns, side="left").astype(np.int64)
    hi = np.searchsorted(prepared.known_ns, refit_ns, side="right").astype(np.int64)
    # Only the extrema some window holds are clustered (one refit ranks its window alone): indices are shifted
    # by ``base``, which changes no label, mean or order.
    base = int(lo[0]) if lo.size else 0
    span = prepared.extremum_price[base : max(base, int(hi[-1]) if hi.size else base)]
    refit, price, counts, first, last, bad_refit, bad_eps = cluster_windows(
        span, lo - base, np.maximum(hi - base, 0), float(config.eps_frac), int(config.min_samples)
    )
    first, last = first + base, last + base
    if bad_refit >= 0:
        raise ValueError(_bad_eps_message(float(bad_eps)))
    if price.size == 0:
        return {"asof": np.empty(0, dtype=np.int64), **_EMPTY_LEVELS}
    # Rows of refit r are rows[offsets[r]:offsets[r + 1]]; each row reads its refit's values.
    offsets = np.searchsorted(refit, np.arange(refit_ns.size + 1), side="left").astype(np.int64)
    asof = refit_ns[refit]
    last_seen = prepared.extremum_ns[last]
    filters = config.filters
    nan = np.full(price.shape, np.nan)
    keep = np.ones(price.shape, dtype=bool)

    touches = nan
    if prepared.d1 is not None:
        window_lo, window_hi = _windows(prepared.d1, refit_ns, start_ns)
        touch_counts, _, _ = _touch_sums(
            price, offsets, window_lo, window_hi, prepared.d1.band_low, prepared.d1.band_high, prepared.d1.volume,
            False,
        )
        touches = touch_counts.astype(np.float64)
        keep &= touches >= filters.touches.min_touches
    age_days = nan
    if filters.age.enabled:
        age_days = (asof - last_seen) / _DAY_NS
        keep &= age_days <= filters.age.max_age_days
    volume_ratio = nan
    if prepared.h4 is not None:
        volume_ratio = _volume_ratio(prepared.h4, price, offsets, refit_ns, start_ns)
        keep &= volume_ratio >= filters.volume.factor
    approach_speed = nan
    if prepared.h1 is not None:
        approach_speed = _approach_speed(prepared.h1, price, refit, refit_ns, filters.approach.bars)
        keep &= approach_speed <= filters.approach.max_speed

    columns = {
        "asof": asof,
        "price": price,
        "n_extrema": counts,
        "first_seen": prepared.extremum_ns[first],
        "last_seen": last_seen,
        "touches": touches,
        "age_days": age_days,
        "volume_ratio": volume_ratio,
        "approach_speed": approach_speed,
    }
    if raw:
        return columns
    return {name: values[keep] for name, values in columns.items()}


def _window_start(refit_ns: np.ndarray, lookback_ns: int) -> np.ndarray:
    """``refit_ns - lookback_ns``, saturated at the smallest int64 (a lookback longer than the calendar)."""
    floor = np.iinfo(np.int64).min
    if lookback_ns >= 2**63:
        return np.full(refit_ns.shape, floor, dtype=np.int64)
    with np.errstate(over="ignore"):
        return np.where(refit_ns >= floor + lookback_ns, refit_ns - np.int64(lookback_ns), floor)


def _windows(ctx: _Context, refit_ns: np.ndarray, start_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per refit, ``[lo, hi)``: the candles closed at or before the refit and opened at or after its start."""
    lo = np.searchsorted(ctx.open_ns, start_ns, side="left").astype(np.int64)
    hi = np.searchsorted(ctx.close_ns, refit_ns, side="right").astype(np.int64)
    return lo, np.maximum(lo, hi)


def _volume_ratio(
    ctx: _Context, price: np.ndarray, offsets: np.ndarray, refit_ns: np.ndarray, start_ns: np.ndarray
) -> np.ndarray:
    """Mean volume of the touching candles over the mean volume of the window; NaN without a touching candle."""
    window_lo, window_hi = _windows(ctx, refit_ns, start_ns)
    counts, touched_sums, window_sums = _touch_sums(
        price, offsets, window_lo, window_hi, ctx.band_low, ctx.band_high, ctx.volume, True
    )
    sizes = window_hi - window_lo
    with np.errstate(invalid="ignore", divide="ignore"):
        window_mean = np.where(sizes > 0, window_sums / sizes, np.nan)
        row_mean = np.repeat(window_mean, np.diff(offsets))
        return touched_sums / counts / row_mean


def _approach_speed(
    ctx: _Context, price: np.ndarray, refit: np.ndarray, refit_ns: np.ndarray, bars: int
) -> np.ndarray:
    last = np.searchsorted(ctx.close_ns, refit_ns, side="right").astype(np.int64)[refit] - 1
    known = last - bars >= 0
    known[known] = np.isfinite(ctx.atr[last[known]])
    speed = np.full(price.shape, np.nan)
    at = last[known]
    then, now, level = ctx.close[at - bars], ctx.close[at], price[known]
    with np.errstate(invalid="ignore", divide="ignore"):
        speed[known] = (np.abs(then - level) - np.abs(now - level)) / (bars * ctx.atr[at])
    return speed


def _writable(values: np.ndarray) -> np.ndarray:
    """Contiguous writable float64 (a copy only when needed): one compiled variant serves every caller."""
    return np.require(values, dtype=np.float64, requirements=["C", "W"])


def _bad_eps_message(eps: float) -> str:
    return f"eps = eps_frac x median price must be a positive number, got {eps}"


# ----------------------------------------------------------------------------------------------- compiled kernels
# Compiled by numba and cached on disk next to this file. They only read arrays and write preallocated ones.

#: numpy's pairwise summation: blocks of at most this many items are summed in 8 interleaved lanes.
_PAIRWISE_BLOCK = 128


@njit(cache=True)
def _mark_extrema(values, window, is_max, is_min):
    """The definition of :func:`local_extrema`, nearest neighbours first so most bars stop after one or two.

    A comparison with NaN is false, so a NaN anywhere in the window (or at its centre) rules both out.
    """
    n = values.shape[0]
    for i in range(window, n - window):
        x = values[i]
        maximum = True
        minimum = True
        for d in range(1, window + 1):
            before = values[i - d]
            after = values[i + d]
            if maximum and not (before <= x and after <= x):
                maximum = False
            if minimum and not (before >= x and after >= x):
                minimum = False
            if not (maximum or minimum):
                break
        is_max[i] = maximum
        is_min[i] = minimum


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _pairwise_plan(n, leaf_start, leaf_size, program):
    """numpy's pairwise-summation tree over ``n`` items: its leaves and a postfix program (leaf index, -1 = add).

    numpy sums fewer than 8 items in order, up to 128 in 8 lanes, and splits longer runs at the half rounded
    down to a multiple of 8, adding the two halves' sums. Returns ``(n_leaves, program length)``.
    """
    stack_start = np.empty(64, dtype=np.int64)
    stack_size = np.empty(64, dtype=np.int64)
    stack_state = np.empty(64, dtype=np.int64)
    depth = 0
    stack_start[0] = 0
    stack_size[0] = n
    stack_state[0] = 0
    n_leaves = 0
    n_program = 0
    while depth >= 0:
        start = stack_start[depth]
        size = stack_size[depth]
        if size <= _PAIRWISE_BLOCK:
            leaf_start[n_leaves] = start
            leaf_size[n_leaves] = size
            program[n_program] = n_leaves
            n_leaves += 1
            n_program += 1
            depth -= 1
            continue
        half = size // 2
        half -= half % 8
        state = stack_state[depth]
        stack_state[depth] = state + 1
        if state == 2:
            program[n_program] = -1
            n_program += 1
            depth -= 1
            continue
        depth += 1
        stack_state[depth] = 0
        if state == 0:
            stack_start[depth] = start
            stack_size[depth] = half
        else:
            stack_start[depth] = start + half
            stack_size[depth] = size - half
    return n_leaves, n_program


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _run_plan(leaf_sums, program, n_program, stack):
    """Evaluate a postfix program of :func:`_pairwise_plan` on per-leaf sums."""
    depth = 0
    for k in range(n_program):
        op = program[k]
        if op >= 0:
            stack[depth] = leaf_sums[op]
            depth += 1
        else:
            depth -= 1
            stack[depth - 1] = stack[depth - 1] + stack[depth]
    return stack[0]


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _leaf_sum(band_low, band_high, volume, start, size, level, every, lanes):
    """``(touching candles, numpy's sum of where(touching, volume, 0))`` over one leaf of the pairwise tree.

    With ``every`` all candles count (the plain sum of ``volume``). ``lanes``: 8 floats of scratch.
    """
    touching = 0
    if size < 8:
        total = -0.0
        for q in range(start, start + size):
            hit = every or (band_low[q] <= level and level <= band_high[q])
            touching += hit
            total += volume[q] if hit else 0.0
        return touching, total
    full = start + size - size % 8
    for k in range(8):
        lanes[k] = 0.0
    for base in range(start, full, 8):
        for k in range(8):
            q = base + k
            hit = every or (band_low[q] <= level and level <= band_high[q])
            touching += hit
            lanes[k] += volume[q] if hit else 0.0
    total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    for q in range(full, start + size):
        hit = every or (band_low[q] <= level and level <= band_high[q])
        touching += hit
        total += volume[q] if hit else 0.0
    return touching, total


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _leaf_touch_sum(band_low, band_high, volume, block_low, block_high, start, size, level, lanes):
    """:func:`_leaf_sum` of the touching candles of a leaf of 8 or more, skipping the 8-candle lane groups whose
    bound blocks cannot hold the level: they would add exact zeros to their lanes, and a lane (started at
    +0.0) is never -0.0, so adding +0.0 changes nothing."""
    touching = 0
    full = start + size - size % 8
    for k in range(8):
        lanes[k] = 0.0
    for base in range(start, full, 8):
        first_block = base // _BOUND_BLOCK
        last_block = (base + 7) // _BOUND_BLOCK
        if level < min(block_low[first_block], block_low[last_block]) or \
                level > max(block_high[first_block], block_high[last_block]):
            continue
        for k in range(8):
            q = base + k
            hit = band_low[q] <= level and level <= band_high[q]
            touching += hit
            lanes[k] += volume[q] if hit else 0.0
    total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    for q in range(full, start + size):
        hit = band_low[q] <= level and level <= band_high[q]
        touching += hit
        total += volume[q] if hit else 0.0
    return touching, total


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _leaf_count(band_low, band_high, block_low, block_high, start, size, level):
    """Touching candles of a leaf, skipping the bound blocks that cannot hold the level."""
    touching = 0
    stop = start + size
    q = start
    while q < stop:
        block = q // _BOUND_BLOCK
        block_stop = min(stop, (block + 1) * _BOUND_BLOCK)
        if block_low[block] <= level <= block_high[block]:
            for i in range(q, block_stop):
                touching += (band_low[i] <= level) & (level <= band_high[i])
        q = block_stop
    return touching


#: Candles per block of the coarse band bounds that decide which leaves a level can touch.
_BOUND_BLOCK = 16


@njit(cache=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _block_bounds(band_low, band_high):
    """Lowest band low and highest band high of each ``_BOUND_BLOCK`` candles (NaN bands ignored)."""
    n_blocks = (band_low.shape[0] + _BOUND_BLOCK - 1) // _BOUND_BLOCK
    lows = np.full(n_blocks, np.inf)
    highs = np.full(n_blocks, -np.inf)
    for q in range(band_low.shape[0]):
        block = q // _BOUND_BLOCK
        if band_low[q] < lows[block]:
            lows[block] = band_low[q]
        if band_high[q] > highs[block]:
            highs[block] = band_high[q]
    return lows, highs


@njit(cache=True)
def _touch_sums(price, offsets, window_lo, window_hi, band_low, band_high, volume, with_volume):
    """Per level row: candles of its refit's window whose band contains it, and numpy's sum of their volumes.

    Exactly ``touching.sum(axis=1)`` and ``np.where(touching, volume, 0.0).sum(axis=1)`` on the
    ``(levels x window)`` matrix: the window is cut into numpy's pairwise leaves; a leaf whose candles' lowest
    band low is above the level or highest band high below it (bounds from the blocks covering it) holds no
    touch, its sum is an exact zero, and it is skipped; the leaf sums are added along numpy's tree. Also
    returns each window's volume sum (for its mean) when ``with_volume``.
    """
    n_rows = price.shape[0]
    n_refits = window_lo.shape[0]
    counts = np.zeros(n_rows, dtype=np.int64)
    touched = np.zeros(n_rows, dtype=np.float64)
    window_sums = np.zeros(n_refits, dtype=np.float64)
    block_low, block_high = _block_bounds(band_low, band_high)
    longest = 1
    for r in range(n_refits):
        longest = max(longest, window_hi[r] - window_lo[r])
    max_leaves = longest // 64 + 2
    leaf_start = np.empty(max_leaves, dtype=np.int64)
    leaf_size = np.empty(max_leaves, dtype=np.int64)
    program = np.empty(2 * max_leaves, dtype=np.int64)
    stack = np.empty(2 * max_leaves, dtype=np.float64)
    leaf_low = np.empty(max_leaves, dtype=np.float64)
    leaf_high = np.empty(max_leaves, dtype=np.float64)
    leaf_sums = np.empty(max_leaves, dtype=np.float64)
    lanes = np.empty(8, dtype=np.float64)
    planned = -1
    n_leaves = 0
    n_program = 0
    for r in range(n_refits):
        lo = window_lo[r]
        n = window_hi[r] - lo
        if n == 0 or offsets[r] == offsets[r + 1]:
            continue
        if n != planned:
            n_leaves, n_program = _pairwise_plan(n, leaf_start, leaf_size, program)
            planned = n
        for leaf in range(n_leaves):
            first = lo + leaf_start[leaf]
            low = np.inf
            high = -np.inf
            for block in range(first // _BOUND_BLOCK, (first + leaf_size[leaf] - 1) // _BOUND_BLOCK + 1):
                low = min(low, block_low[block])
                high = max(high, block_high[block])
            leaf_low[leaf] = low
            leaf_high[leaf] = high
            if with_volume:
                leaf_sums[leaf] = _leaf_sum(band_low, band_high, volume, first, leaf_size[leaf], 0.0, True, lanes)[1]
        if with_volume:
            window_sums[r] = _run_plan(leaf_sums, program, n_program, stack)
        for row in range(offsets[r], offsets[r + 1]):
            level = price[row]
            touching = 0
            for leaf in range(n_leaves):
                if level < leaf_low[leaf] or level > leaf_high[leaf]:
                    leaf_sums[leaf] = 0.0
                    continue
                if with_volume and leaf_size[leaf] >= 8:
                    found, total = _leaf_touch_sum(
                        band_low, band_high, volume, block_low, block_high, lo + leaf_start[leaf], leaf_size[leaf],
                        level, lanes,
                    )
                    leaf_sums[leaf] = total
                elif with_volume:
                    found, total = _leaf_sum(
                        band_low, band_high, volume, lo + leaf_start[leaf], leaf_size[leaf], level, False, lanes
                    )
                    leaf_sums[leaf] = total
                else:
                    found = _leaf_count(
                        band_low, band_high, block_low, block_high, lo + leaf_start[leaf], leaf_size[leaf], level
                    )
                touching += found
            counts[row] = touching
            if with_volume:
                touched[row] = _run_plan(leaf_sums, program, n_program, stack)
    return counts, touched, window_sums


@njit(cache=True)
def _bracket_within_sets(price, starts, ends, bar_set, close, below, above):
    """Per bar, binary search of its close in its set's sorted prices ``price[starts[s]:ends[s]]``: the last
    row at or below it and the first row above (-1: none, no set, NaN close)."""
    for i in range(close.shape[0]):
        below[i] = -1
        above[i] = -1
        s = bar_set[i]
        if s < 0 or np.isnan(close[i]):
            continue
        lo = starts[s]
        hi = ends[s]
        a = lo
        z = hi
        while a < z:  # the first row whose price is above the close (searchsorted side="right")
            mid = (a + z) // 2
            if price[mid] <= close[i]:
                a = mid + 1
            else:
                z = mid
        if a > lo:
            below[i] = a - 1
        if a < hi:
            above[i] = a


def _frame(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    data: dict[str, object] = {}
    for name in ("asof", *LEVEL_COLUMNS):
        if name not in columns:
            continue
        values = columns[name]
        data[name] = _to_utc(values) if name in ("asof", "first_seen", "last_seen") else values
    return pd.DataFrame(data)


def _refit_mask(bar_ns: np.ndarray, period_ns: int) -> np.ndarray:
    period = np.floor_divide(bar_ns, period_ns)
    first = np.ones(bar_ns.shape, dtype=bool)
    first[1:] = period[1:] != period[:-1]
    return first


def _candle_ns(frame: pd.DataFrame, what: str) -> np.ndarray:
    ns = column_ns(frame["timestamp"])
    if ns.size > 1 and not bool(np.all(ns[1:] > ns[:-1])):
        raise ValueError(f"{what}: timestamps must be sorted and unique (canonical candles)")
    return ns


def column_ns(timestamps: pd.Series) -> np.ndarray:
    """:func:`~pricelevel.core.timeframes.utc_ns` of a timestamp column, read off its datetime array when it is
    one (the same numbers, without building an index: naive times are UTC, aware ones are stored as UTC)."""
    values = timestamps.array
    if isinstance(values, pd.arrays.DatetimeArray):
        return (values if values.unit == "ns" else values.as_unit("ns")).asi8
    return utc_ns(timestamps)


def _timestamp_ns(value: pd.Timestamp) -> int:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.as_unit("ns").value)


def _to_utc(ns: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.asarray(ns, dtype=np.int64).view("datetime64[ns]")).tz_localize("UTC")
