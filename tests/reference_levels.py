"""Test-only oracle: the levels as they were computed before the compiled path, with scikit-learn's DBSCAN.

A verbatim copy of the earlier ``pricelevel.levels`` extrema, clustering and per-refit loop (only the
bookkeeping helpers that did not change are imported). The fast path must reproduce it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import sklearn
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.cluster import DBSCAN

from pricelevel.config import LevelsConfig
from pricelevel.levels import (
    _DAY_NS,
    FILTER_TIMEFRAMES,
    LEVEL_COLUMNS,
    LevelHistory,
    MultiTimeframe,
    _candle_ns,
    _frame,
    _refit_mask,
    _timestamp_ns,
    _to_utc,
)
from pricelevel.timeframes import Timeframe


def wilder_atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """The ATR the levels used before ``pricelevel.indicators.atr`` (Wilder, as TA-Lib); NaN for the first ``period`` candles (no ATR yet).

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


def local_extrema(close: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
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
    values = np.asarray(prices, dtype=np.float64).ravel()
    if values.size == 0:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float64)
    eps = eps_frac * float(np.median(values))
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps = eps_frac x median price must be a positive number, got {eps}")
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(values[:, None]).labels_
    n_clusters = int(labels.max()) + 1
    if n_clusters <= 0:
        return labels, np.empty(0, dtype=np.float64)
    member = labels >= 0
    sums = np.bincount(labels[member], weights=values[member], minlength=n_clusters)
    counts = np.bincount(labels[member], minlength=n_clusters)
    return labels, sums / counts


def levels_asof(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    asof: pd.Timestamp,
    config: LevelsConfig,
    context: MultiTimeframe | None = None,
    raw: bool = False,
) -> pd.DataFrame:
    prepared = _prepare(candles, Timeframe(timeframe), config, context, raw)
    return _frame(_refit(prepared, _timestamp_ns(asof), config, raw))


def walk_forward_levels(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    config: LevelsConfig,
    context: MultiTimeframe | None = None,
    raw: bool = False,
) -> LevelHistory:
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


@dataclass(frozen=True, eq=False)
class _Context:
    open_ns: np.ndarray
    close_ns: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    atr: np.ndarray


@dataclass(frozen=True, eq=False)
class _Prepared:
    bar_ns: np.ndarray
    extremum_ns: np.ndarray
    known_ns: np.ndarray
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
    for name, (frame_tf, attr) in FILTER_TIMEFRAMES.items():
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
    start_ns = t_ns - prepared.lookback_ns
    lo = int(np.searchsorted(prepared.extremum_ns, start_ns, side="left"))
    hi = int(np.searchsorted(prepared.known_ns, t_ns, side="right"))
    if hi <= lo:
        return _EMPTY_LEVELS
    labels, level_price = cluster_prices(prepared.extremum_price[lo:hi], config.eps_frac, config.min_samples)
    if level_price.size == 0:
        return _EMPTY_LEVELS
    member = labels >= 0
    by_label = np.argsort(labels[member], kind="stable")
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
    lo = int(np.searchsorted(ctx.open_ns, start_ns, side="left"))
    hi = int(np.searchsorted(ctx.close_ns, t_ns, side="right"))
    return slice(lo, max(lo, hi))


def _touching(ctx: _Context, price: np.ndarray, t_ns: int, start_ns: int) -> tuple[np.ndarray, slice]:
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
