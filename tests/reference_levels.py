"""Test-only oracle for the walk-forward levels, written afresh from the rules in the docstring of
``pricelevel.levels.walkforward``.

It shares no code with production (only the settings object ``LevelsConfig`` and ``Timeframe``'s lengths), so a
wrong rule there (a confirmation one bar early, a shifted refit grid, a filter off by one candle) cannot hide by
being copied into its own test. Slow on purpose: one refit at a time, plain Python loops, scikit-learn's DBSCAN.
Where the production result is defined by numpy's summation order (touch counts and volume sums), the oracle
simply does those sums the numpy way, on a levels x candles matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.cluster import DBSCAN

from pricelevel.core.timeframes import Timeframe
from pricelevel.levels.config import LevelsConfig

DAY_NS = 24 * 60 * 60 * 10**9
#: Columns of a level set, in order; a walk-forward history puts ``asof`` first.
COLUMNS = ("price", "n_extrema", "first_seen", "last_seen", "touches", "age_days", "volume_ratio", "approach_speed")
#: Filter -> (timeframe of the candles it reads, attribute of the context holding them).
FILTER_TIMEFRAMES = {
    "touches": (Timeframe.D1, "d1"),
    "volume": (Timeframe.H4, "h4"),
    "approach": (Timeframe.H1, "h1"),
}


@dataclass(frozen=True)
class History:
    """What ``walk_forward_levels`` returns: every refit time and the levels each refit put in force."""

    refits: pd.DatetimeIndex
    levels: pd.DataFrame


@dataclass(frozen=True)
class Extremum:
    """A local extremum of the closes: when its bar opened, when it became known, its close."""

    open_ns: int
    known_ns: int
    price: float


@dataclass(frozen=True)
class Cluster:
    """One DBSCAN cluster of extrema, as a level."""

    label: int
    price: float
    n_extrema: int
    first_seen: int
    last_seen: int


@dataclass(frozen=True, eq=False)
class FilterCandles:
    """The candles one filter reads, with their ATR and touch band (arrays, for the levels x candles sums)."""

    open_ns: np.ndarray
    close_ns: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    atr: np.ndarray
    band_low: np.ndarray  # low - atr_buffer x ATR; NaN before the ATR exists
    band_high: np.ndarray  # high + atr_buffer x ATR


@dataclass(frozen=True, eq=False)
class Inputs:
    """What every refit reads: the extrema of the whole input and each enabled filter's candles (None: the
    filter is not computed)."""

    bar_open_ns: list[int]
    extrema: list[Extremum]
    touches: FilterCandles | None
    volume: FilterCandles | None
    approach: FilterCandles | None


# ----------------------------------------------------------------------------------------------- public


def walk_forward_levels(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    config: LevelsConfig,
    context=None,
    raw: bool = False,
) -> History:
    """Every refit of the run, each computed on its own by :func:`levels_at` and stacked in refit order.

    ``context``: anything with ``d1``/``h4``/``h1`` candle attributes (production's ``MultiTimeframe``).
    """
    timeframe = Timeframe(timeframe)
    inputs = prepare(candles, timeframe, config, context, raw)
    refits = refit_open_times(inputs.bar_open_ns, timeframe, config.refit_every)
    rows = [row for refit_ns in refits for row in levels_at(inputs, refit_ns, config, raw)]
    return History(refits=utc_times(refits), levels=levels_frame(rows, with_asof=True))


def levels_asof(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    asof: pd.Timestamp,
    config: LevelsConfig,
    context=None,
    raw: bool = False,
) -> pd.DataFrame:
    """The level set of a refit at ``asof`` (any time, not only a bar's open)."""
    inputs = prepare(candles, Timeframe(timeframe), config, context, raw)
    rows = levels_at(inputs, timestamp_ns(asof), config, raw)
    return levels_frame(rows, with_asof=False)


def local_extrema(close: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_max, is_min)``: the close equals the max/min of the ``2 * window + 1`` closes centred on it.

    Ties count; bars without ``window`` bars on both sides, and windows holding a NaN, are not extrema.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    closes = [float(value) for value in np.asarray(close, dtype=np.float64).ravel()]
    is_max = np.zeros(len(closes), dtype=bool)
    is_min = np.zeros(len(closes), dtype=bool)
    for i in range(window, len(closes) - window):
        neighbourhood = closes[i - window : i + window + 1]
        if any(math.isnan(value) for value in neighbourhood):
            continue
        is_max[i] = closes[i] == max(neighbourhood)
        is_min[i] = closes[i] == min(neighbourhood)
    return is_max, is_min


def wilder_atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, period: int) -> np.ndarray:
    """Wilder's ATR as TA-Lib computes it; NaN until ``period`` true ranges exist.

    True range from the second candle on; the first ATR is the mean of the first ``period`` true ranges (added
    one after the other), then ``atr = (atr * (period - 1) + tr) / period``. Only earlier candles are read.
    """
    atr = np.full(len(close), np.nan)
    total = 0.0
    average = math.nan
    for i in range(1, len(close)):
        previous = float(close[i - 1])
        true_range = max(float(high[i] - low[i]), abs(float(high[i]) - previous), abs(float(low[i]) - previous))
        if i < period:
            total += true_range
            continue
        if i == period:
            total += true_range
            average = total / period
        else:
            average = (average * (period - 1) + true_range) / period
        atr[i] = average
    return atr


def refit_open_times(bar_open_ns: list[int], timeframe: Timeframe, refit_every: int) -> list[int]:
    """Open times of the first bar present in each ``refit_every x timeframe`` period counted from the epoch."""
    period_ns = refit_every * timeframe.nanoseconds
    refits: list[int] = []
    for open_ns in bar_open_ns:
        if not refits or open_ns // period_ns != refits[-1] // period_ns:
            refits.append(open_ns)
    return refits


# ----------------------------------------------------------------------------------------------- one refit


def prepare(candles: pd.DataFrame, timeframe: Timeframe, config: LevelsConfig, context, raw: bool) -> Inputs:
    """Extrema of the whole input and the filters' candles, once per run: neither depends on later data (an
    extremum is used only once confirmed, an ATR reads only earlier candles), so every refit may share them."""
    bar_open_ns = canonical_open_times(candles, f"{timeframe} candles")
    filters = config.filters
    filter_candles: dict[str, FilterCandles | None] = {}
    for name, (filter_timeframe, attribute) in FILTER_TIMEFRAMES.items():
        frame = getattr(context, attribute, None) if context is not None else None
        if frame is None and filter_timeframe == timeframe:
            frame = candles
        if not getattr(filters, name).enabled or (frame is None and raw):
            filter_candles[name] = None
        elif frame is None:
            raise ValueError(f"levels.filters.{name} needs {filter_timeframe} candles (context.{attribute})")
        else:
            period = filters.approach.atr_period if name == "approach" else filters.touches.atr_period
            filter_candles[name] = candles_with_bands(frame, filter_timeframe, period, filters.touches.atr_buffer)
    return Inputs(
        bar_open_ns=bar_open_ns,
        extrema=find_extrema(candles, bar_open_ns, timeframe, config.window),
        **filter_candles,
    )


def levels_at(inputs: Inputs, refit_ns: int, config: LevelsConfig, raw: bool) -> list[dict]:
    """The level rows of a refit at ``refit_ns``: cluster the extrema known by then and inside the lookback,
    measure every level, and keep those that pass every computed filter (all of them when ``raw``)."""
    start_ns = refit_ns - pd.Timedelta(days=config.lookback_days).value
    window = [e for e in inputs.extrema if e.known_ns <= refit_ns and e.open_ns >= start_ns]
    clusters = cluster_extrema(window, config.eps_frac, config.min_samples)
    if not clusters:
        return []
    prices = np.array([cluster.price for cluster in clusters], dtype=np.float64)
    filters = config.filters
    not_computed = [math.nan] * len(clusters)
    touches = ages = ratios = speeds = not_computed
    if inputs.touches is not None:
        touches = [float(count) for count in touch_counts(inputs.touches, prices, start_ns, refit_ns)]
    if filters.age.enabled:
        ages = [float(refit_ns - cluster.last_seen) / DAY_NS for cluster in clusters]
    if inputs.volume is not None:
        ratios = volume_ratios(inputs.volume, prices, start_ns, refit_ns).tolist()
    if inputs.approach is not None:
        speeds = approach_speeds(inputs.approach, prices, refit_ns, filters.approach.bars).tolist()

    rows = []
    for i, cluster in enumerate(clusters):
        keep = (
            (inputs.touches is None or touches[i] >= filters.touches.min_touches)
            and (not filters.age.enabled or ages[i] <= filters.age.max_age_days)
            and (inputs.volume is None or ratios[i] >= filters.volume.factor)
            and (inputs.approach is None or speeds[i] <= filters.approach.max_speed)
        )
        if keep or raw:
            rows.append({
                "asof": refit_ns,
                "price": cluster.price,
                "n_extrema": cluster.n_extrema,
                "first_seen": cluster.first_seen,
                "last_seen": cluster.last_seen,
                "touches": touches[i],
                "age_days": ages[i],
                "volume_ratio": ratios[i],
                "approach_speed": speeds[i],
            })
    return rows


def find_extrema(candles: pd.DataFrame, bar_open_ns: list[int], timeframe: Timeframe, window: int) -> list[Extremum]:
    """Every extremum in bar order (a bar both max and min once), known at the close of the bar ``window`` later."""
    close = candles["close"].to_numpy(dtype=np.float64)
    is_max, is_min = local_extrema(close, window)
    return [
        Extremum(
            open_ns=bar_open_ns[i],
            known_ns=bar_open_ns[i + window] + timeframe.nanoseconds,
            price=float(close[i]),
        )
        for i in range(len(close))
        if is_max[i] or is_min[i]
    ]


def cluster_extrema(extrema: list[Extremum], eps_frac: float, min_samples: int) -> list[Cluster]:
    """scikit-learn's DBSCAN of the prices in bar order, ``eps = eps_frac x median``; clusters sorted by price,
    then label. A level's price is its members' mean, added in bar order."""
    if not extrema:
        return []
    prices = [extremum.price for extremum in extrema]
    eps = eps_frac * median(prices)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps = eps_frac x median price must be a positive number, got {eps}")
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(np.array(prices).reshape(-1, 1)).labels_
    members: dict[int, list[Extremum]] = {}
    for extremum, label in zip(extrema, labels.tolist(), strict=True):
        if label >= 0:
            members.setdefault(label, []).append(extremum)
    clusters = [
        Cluster(
            label=label,
            price=sum_in_order([e.price for e in group]) / len(group),
            n_extrema=len(group),
            first_seen=min(e.open_ns for e in group),
            last_seen=max(e.open_ns for e in group),
        )
        for label, group in members.items()
    ]
    return sorted(clusters, key=lambda cluster: (cluster.price, cluster.label))


# ----------------------------------------------------------------------------------------------- filters


def candles_with_bands(frame: pd.DataFrame, timeframe: Timeframe, atr_period: int, atr_buffer: float) -> FilterCandles:
    """A filter's candles with ATR and touch band ``[low - buf, high + buf]``, ``buf = atr_buffer x ATR``."""
    open_ns = np.array(canonical_open_times(frame, f"{timeframe} context candles"), dtype=np.int64)
    high = frame["high"].to_numpy(dtype=np.float64)
    low = frame["low"].to_numpy(dtype=np.float64)
    close = frame["close"].to_numpy(dtype=np.float64)
    atr = wilder_atr(high, low, close, atr_period)
    return FilterCandles(
        open_ns=open_ns,
        close_ns=open_ns + timeframe.nanoseconds,
        close=close,
        volume=frame["volume"].to_numpy(dtype=np.float64),
        atr=atr,
        band_low=low - atr_buffer * atr,
        band_high=high + atr_buffer * atr,
    )


def in_lookback(candles: FilterCandles, start_ns: int, refit_ns: int) -> np.ndarray:
    """Mask of the candles closed at or before the refit and opened at or after the lookback's start."""
    return (candles.open_ns >= start_ns) & (candles.close_ns <= refit_ns)


def touching(candles: FilterCandles, prices: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Levels x candles of the window: the candle's band contains the level (a NaN band never does)."""
    level = prices[:, None]
    return (candles.band_low[window] <= level) & (level <= candles.band_high[window])


def touch_counts(candles: FilterCandles, prices: np.ndarray, start_ns: int, refit_ns: int) -> np.ndarray:
    """Per level, the candles of the lookback whose band contains it."""
    return touching(candles, prices, in_lookback(candles, start_ns, refit_ns)).sum(axis=1)


def volume_ratios(candles: FilterCandles, prices: np.ndarray, start_ns: int, refit_ns: int) -> np.ndarray:
    """Mean volume of the touching candles over the mean volume of all candles of the lookback; NaN where no
    candle touches (or the lookback holds none)."""
    window = in_lookback(candles, start_ns, refit_ns)
    volume = candles.volume[window]
    if volume.size == 0:
        return np.full(prices.shape, np.nan)
    touched = touching(candles, prices, window)
    with np.errstate(invalid="ignore", divide="ignore"):
        touched_mean = np.where(touched, volume, 0.0).sum(axis=1) / touched.sum(axis=1)
        return touched_mean / volume.mean()


def approach_speeds(candles: FilterCandles, prices: np.ndarray, refit_ns: int, bars: int) -> np.ndarray:
    """``(|c[-1-bars] - L| - |c[-1] - L|) / (bars x ATR[-1])`` on the candles closed by the refit; NaN where
    there are too few of them or no ATR yet."""
    closed = np.flatnonzero(candles.close_ns <= refit_ns)
    if closed.size == 0:
        return np.full(prices.shape, np.nan)
    last = int(closed[-1])
    if last - bars < 0 or not math.isfinite(candles.atr[last]):
        return np.full(prices.shape, np.nan)
    then, now = candles.close[last - bars], candles.close[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.abs(then - prices) - np.abs(now - prices)) / (bars * candles.atr[last])


# ----------------------------------------------------------------------------------------------- plumbing


def levels_frame(rows: list[dict], with_asof: bool) -> pd.DataFrame:
    """The rows as the documented frame: ``asof`` (when asked) then :data:`COLUMNS`, times in UTC ns."""
    def column(name: str) -> list:
        return [row[name] for row in rows]

    data: dict[str, object] = {"asof": utc_times(column("asof"))} if with_asof else {}
    data["price"] = np.array(column("price"), dtype=np.float64)
    data["n_extrema"] = np.array(column("n_extrema"), dtype=np.int64)
    data["first_seen"] = utc_times(column("first_seen"))
    data["last_seen"] = utc_times(column("last_seen"))
    for name in ("touches", "age_days", "volume_ratio", "approach_speed"):
        data[name] = np.array(column(name), dtype=np.float64)
    return pd.DataFrame(data)


def median(values: list[float]) -> float:
    """The middle value, or the mean of the two middle ones."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def sum_in_order(values: list[float]) -> float:
    """Left to right, plain float additions (``sum`` may compensate rounding on some Pythons)."""
    total = 0.0
    for value in values:
        total += value
    return total


def canonical_open_times(frame: pd.DataFrame, what: str) -> list[int]:
    """Open times in UTC ns; the candles must be sorted with unique timestamps."""
    open_ns = utc_nanoseconds(frame["timestamp"])
    if any(open_ns[i + 1] <= open_ns[i] for i in range(len(open_ns) - 1)):
        raise ValueError(f"{what}: timestamps must be sorted and unique (canonical candles)")
    return open_ns


def utc_nanoseconds(values) -> list[int]:
    """Timestamps as UTC nanoseconds since the epoch (naive ones taken as UTC)."""
    times = pd.DatetimeIndex(values)
    if times.tz is None:
        times = times.tz_localize("UTC")
    return [int(value) for value in times.tz_convert("UTC").as_unit("ns").asi8]


def timestamp_ns(value) -> int:
    return utc_nanoseconds([pd.Timestamp(value)])[0]


def utc_times(ns: list[int]) -> pd.DatetimeIndex:
    return pd.to_datetime(np.array(ns, dtype=np.int64), unit="ns", utc=True)
