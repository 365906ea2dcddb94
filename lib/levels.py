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
  sklearn's DBSCAN, ``eps = eps_frac * median(prices)``; a level is a cluster's mean price, noise makes none.
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

  ATR is Wilder's (as TA-Lib): true range from the second candle on, first ATR the mean of the first
  ``atr_period`` true ranges, then ``atr = (atr * (p - 1) + tr) / p``; it depends only on earlier candles.
  A filter needs its timeframe's candles: taken from ``context``, or from ``candles`` when the levels are
  computed on that timeframe. ``raw=True`` computes the metrics it can but drops nothing.

Everything computed per bar from the whole input (extrema, ATR) depends only on that bar's past (extrema: on
``w`` later bars, which the confirmation time accounts for), so levels at ``T`` are the same whatever data
follows ``T``: :func:`walk_forward_levels` on a prefix of the candles reproduces every earlier refit exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import sklearn
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.cluster import DBSCAN

from pricelevel.config import LevelsConfig
from pricelevel.timeframes import Timeframe

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
_DAY_NS = 86_400 * 10**9
#: filter name -> (timeframe it reads, MultiTimeframe attribute).
_FILTER_TIMEFRAMES = {
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
    values = np.asarray(close, dtype=np.float64)
    n = values.shape[0]
    is_max = np.zeros(n, dtype=bool)
    is_min = np.zeros(n, dtype=bool)
    if n >= 2 * window + 1:
        view = sliding_window_view(values, 2 * window + 1)
        center = values[window : n - window]
        is_max[window : n - window] = center == view.max(axis=1)
        is_min[window : n - window] = center == view.min(axis=1)
    return is_max, is_min


def cluster_prices(prices: np.ndarray, eps_frac: float, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D DBSCAN with ``eps = eps_frac * median(prices)``: ``(label per point, -1 = noise; mean per label)``.

    The eps scales with the price so one setting works for every symbol and era.
    """
    values = np.asarray(prices, dtype=np.float64).ravel()
    if values.size == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float64)
    eps = eps_frac * float(np.median(values))
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps = eps_frac x median price must be a positive number, got {eps}")
    # Validation skipped: inputs are checked above, and sklearn's checks cost more than the clustering.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(values[:, None]).labels_
    n_clusters = int(labels.max()) + 1
    if n_clusters <= 0:
        return labels, np.empty(0, dtype=np.float64)
    member = labels >= 0
    sums = np.bincount(labels[member], weights=values[member], minlength=n_clusters)
    counts = np.bincount(labels[member], minlength=n_clusters)
    return labels, sums / counts


def wilder_atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """Wilder's ATR as TA-Lib computes it; NaN for the first ``period`` candles (no ATR yet).

    A recursion over all earlier candles: ATR at a candle never depends on later ones.
    """
    high = np.asarray(high, dtype=np.float64)
    low = np.asarray(low, dtype=np.float64)
    close = np.asarray(close, dtype=np.float64)
    n = high.shape[0]
    atr = np.full(n, np.nan)
    if n <= period:
        return atr
    prev = close[:-1]
    true_range = np.maximum(high[1:] - low[1:], np.maximum(np.abs(high[1:] - prev), np.abs(low[1:] - prev)))
    value = float(np.mean(true_range[:period]))
    out = [value]
    for tr in true_range[period:].tolist():
        value = (value * (period - 1) + tr) / period
        out.append(value)
    atr[period:] = out
    return atr


def refit_times(
    timestamps: pd.DatetimeIndex | pd.Series, timeframe: Timeframe, refit_every: int
) -> pd.DatetimeIndex:
    """Open times of the refit bars: the first bar present in each ``refit_every x delta`` epoch period."""
    ns = _as_ns(timestamps)
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
    return _frame(_refit(prepared, _timestamp_ns(asof), config, raw))


def walk_forward_levels(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    config: LevelsConfig,
    context: MultiTimeframe | None = None,
    raw: bool = False,
) -> LevelHistory:
    """Every refit over ``candles``: each set equals ``levels_asof`` at its refit time.

    Extrema, confirmation times and ATRs are computed once; each refit selects its slice by binary search.
    """
    timeframe = Timeframe(timeframe)
    prepared = _prepare(candles, timeframe, config, context, raw)
    refit_ns = prepared.bar_ns[_refit_mask(prepared.bar_ns, config.refit_every * timeframe.nanoseconds)]
    blocks = [_refit(prepared, int(t), config, raw) for t in refit_ns]
    sizes = np.array([len(block["price"]) for block in blocks], dtype=np.intp)
    columns: dict[str, np.ndarray] = {"asof": np.repeat(refit_ns, sizes)}
    for name in LEVEL_COLUMNS:
        parts = [block[name] for block in blocks]
        columns[name] = np.concatenate(parts) if parts else _EMPTY_LEVELS[name]
    levels = _frame(columns)
    return LevelHistory(refits=_to_utc(refit_ns), levels=levels)


def level_in_force_index(timestamps: pd.DatetimeIndex | pd.Series, history: LevelHistory) -> np.ndarray:
    """Index into ``history.refits`` of the set in force at each timestamp; -1 before the first refit."""
    refit_ns = _as_ns(history.refits)
    return np.searchsorted(refit_ns, _as_ns(timestamps), side="right").astype(np.intp) - 1


def nearest_level(
    timestamps: pd.DatetimeIndex | pd.Series, close: np.ndarray, history: LevelHistory
) -> np.ndarray:
    """Price of the level in force closest to each close; NaN where no level is in force."""
    close = np.asarray(close, dtype=np.float64)
    which = level_in_force_index(timestamps, history)
    if which.shape != close.shape:
        raise ValueError(f"timestamps ({which.shape[0]}) and close ({close.shape[0]}) differ in length")
    out = np.full(close.shape, np.nan)
    asof_ns = _as_ns(history.levels["asof"])
    prices = history.levels["price"].to_numpy(dtype=np.float64)
    order = np.lexsort((prices, asof_ns))  # a no-op for walk_forward_levels' output; cheap insurance
    asof_ns, prices = asof_ns[order], prices[order]
    refit_ns = _as_ns(history.refits)
    starts = np.searchsorted(asof_ns, refit_ns, side="left")
    ends = np.searchsorted(asof_ns, refit_ns, side="right")

    bars = np.argsort(which, kind="stable")
    groups, group_starts = np.unique(which[bars], return_index=True)
    group_ends = np.append(group_starts[1:], bars.shape[0])
    for refit, first, last in zip(groups.tolist(), group_starts.tolist(), group_ends.tolist(), strict=True):
        if refit < 0 or starts[refit] == ends[refit]:
            continue
        block = prices[starts[refit] : ends[refit]]
        rows = bars[first:last]
        values = close[rows]
        pos = np.searchsorted(block, values)
        below = block[np.maximum(pos - 1, 0)]
        above = block[np.minimum(pos, block.shape[0] - 1)]
        nearest = np.where(np.abs(values - below) <= np.abs(above - values), below, above)
        out[rows] = np.where(np.isnan(values), np.nan, nearest)
    return out


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


@dataclass(frozen=True, eq=False)
class _Prepared:
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
) -> _Prepared:
    bar_ns = _candle_ns(candles, f"{timeframe} candles")
    is_max, is_min = local_extrema(candles["close"].to_numpy(dtype=np.float64), config.window)
    index = np.flatnonzero(is_max | is_min)
    known_ns = bar_ns[index + config.window] + timeframe.nanoseconds
    filters = config.filters
    touch = filters.touches
    contexts: dict[str, _Context | None] = {}
    for name, (frame_tf, attr) in _FILTER_TIMEFRAMES.items():
        frame = getattr(context, attr) if context is not None else None
        if frame is None and frame_tf == timeframe:
            frame = candles
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
        period = filters.approach.atr_period if name == "approach" else touch.atr_period
        contexts[attr] = _context(frame, frame_tf, period, touch.atr_buffer)
    return _Prepared(
        bar_ns=bar_ns,
        extremum_ns=bar_ns[index],
        known_ns=known_ns,
        extremum_price=candles["close"].to_numpy(dtype=np.float64)[index],
        lookback_ns=round(config.lookback_days * _DAY_NS),
        **contexts,
    )


def _context(frame: pd.DataFrame, timeframe: Timeframe, atr_period: int, atr_buffer: float) -> _Context:
    open_ns = _candle_ns(frame, f"{timeframe} context candles")
    high = frame["high"].to_numpy(dtype=np.float64)
    low = frame["low"].to_numpy(dtype=np.float64)
    close = frame["close"].to_numpy(dtype=np.float64)
    atr = wilder_atr(high, low, close, atr_period)
    return _Context(
        open_ns=open_ns,
        close_ns=open_ns + timeframe.nanoseconds,
        band_low=low - atr_buffer * atr,
        band_high=high + atr_buffer * atr,
        close=close,
        volume=frame["volume"].to_numpy(dtype=np.float64),
        atr=atr,
    )


def _refit(prepared: _Prepared, t_ns: int, config: LevelsConfig, raw: bool) -> dict[str, np.ndarray]:
    """One level set at ``t_ns`` (sorted by price), as column arrays."""
    start_ns = t_ns - prepared.lookback_ns
    lo = int(np.searchsorted(prepared.extremum_ns, start_ns, side="left"))
    hi = int(np.searchsorted(prepared.known_ns, t_ns, side="right"))
    if hi <= lo:
        return _EMPTY_LEVELS
    labels, level_price = cluster_prices(prepared.extremum_price[lo:hi], config.eps_frac, config.min_samples)
    if level_price.size == 0:
        return _EMPTY_LEVELS
    member = labels >= 0
    by_label = np.argsort(labels[member], kind="stable")  # chronological within each cluster
    seen_ns = prepared.extremum_ns[lo:hi][member][by_label]
    counts = np.bincount(labels[member], minlength=level_price.size)
    group_end = np.cumsum(counts)
    first_seen = seen_ns[group_end - counts]
    last_seen = seen_ns[group_end - 1]

    order = np.argsort(level_price, kind="stable")
    price, counts, first_seen, last_seen = (
        level_price[order],
        counts[order],
        first_seen[order],
        last_seen[order],
    )
    nan = np.full(price.shape, np.nan)
    filters = config.filters
    keep = np.ones(price.shape, dtype=bool)

    touches = nan
    if prepared.d1 is not None:
        touching, _ = _touching(prepared.d1, price, t_ns, start_ns)
        touches = touching.sum(axis=1).astype(np.float64)
        keep &= touches >= filters.touches.min_touches
    age_days = nan
    if filters.age.enabled:
        age_days = (t_ns - last_seen) / _DAY_NS
        keep &= age_days <= filters.age.max_age_days
    volume_ratio = nan
    if prepared.h4 is not None:
        volume_ratio = _volume_ratio(prepared.h4, price, t_ns, start_ns)
        keep &= volume_ratio >= filters.volume.factor
    approach_speed = nan
    if prepared.h1 is not None:
        approach_speed = _approach_speed(prepared.h1, price, t_ns, filters.approach.bars)
        keep &= approach_speed <= filters.approach.max_speed

    columns = {
        "price": price,
        "n_extrema": counts.astype(np.int64),
        "first_seen": first_seen,
        "last_seen": last_seen,
        "touches": touches,
        "age_days": age_days,
        "volume_ratio": volume_ratio,
        "approach_speed": approach_speed,
    }
    if raw:
        return columns
    return {name: values[keep] for name, values in columns.items()}


def _window(ctx: _Context, t_ns: int, start_ns: int) -> slice:
    """Candles closed at or before ``t_ns`` and opened at or after ``start_ns``."""
    lo = int(np.searchsorted(ctx.open_ns, start_ns, side="left"))
    hi = int(np.searchsorted(ctx.close_ns, t_ns, side="right"))
    return slice(lo, max(lo, hi))


def _touching(ctx: _Context, price: np.ndarray, t_ns: int, start_ns: int) -> tuple[np.ndarray, slice]:
    """``(levels x candles)`` boolean: the candle's ATR-widened range contains the level."""
    window = _window(ctx, t_ns, start_ns)
    level = price[:, None]
    return (ctx.band_low[window] <= level) & (level <= ctx.band_high[window]), window


def _volume_ratio(ctx: _Context, price: np.ndarray, t_ns: int, start_ns: int) -> np.ndarray:
    touching, window = _touching(ctx, price, t_ns, start_ns)
    volume = ctx.volume[window]
    if volume.size == 0:
        return np.full(price.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        touched_mean = np.where(touching, volume, 0.0).sum(axis=1) / touching.sum(axis=1)
        return touched_mean / volume.mean()


def _approach_speed(ctx: _Context, price: np.ndarray, t_ns: int, bars: int) -> np.ndarray:
    last = int(np.searchsorted(ctx.close_ns, t_ns, side="right")) - 1
    if last - bars < 0 or not np.isfinite(ctx.atr[last]):
        return np.full(price.shape, np.nan)
    then, now = ctx.close[last - bars], ctx.close[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.abs(then - price) - np.abs(now - price)) / (bars * ctx.atr[last])


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
    ns = _as_ns(frame["timestamp"])
    if ns.size > 1 and not bool(np.all(ns[1:] > ns[:-1])):
        raise ValueError(f"{what}: timestamps must be sorted and unique (canonical candles)")
    return ns


def _as_ns(values: pd.DatetimeIndex | pd.Series | np.ndarray) -> np.ndarray:
    """UTC nanoseconds since the epoch (naive timestamps are taken as UTC)."""
    index = pd.DatetimeIndex(values)
    if index.tz is None:
        index = index.tz_localize("UTC")
    return index.as_unit("ns").asi8


def _timestamp_ns(value: pd.Timestamp) -> int:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.as_unit("ns").value)


def _to_utc(ns: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(np.asarray(ns, dtype=np.int64).view("datetime64[ns]")).tz_localize("UTC")
