"""Per-bar model inputs computed from one symbol's candles, its walk-forward levels and longer timeframes.

Every value at row ``t`` is known at the close of bar ``t`` and uses nothing later: indicators are causal
recursions and rolling windows over rows ``<= t``; levels are those in force at ``t`` (walk-forward);
a longer-timeframe candle joins a bar only once it has closed (its close time ``<=`` the bar's close
time). ``pricelevel check lookahead`` proves this on real data by recomputing on cut data.

Warm-up is explicit: a column is NaN on the leading rows where its indicator is not yet defined, and a
non-finite value later (a zero-volume bar in Ease of Movement) is NaN too; the dataset uses only windows
whose every value is finite. Values are scale-free (ratios to the close, percentages / 100, ATR units,
log counts), so one model reads every symbol and era.

Columns by group (names are what a feature set in ``conf`` lists; groups expand to their columns):

- ``returns``, ``indicators`` (and any group an entry adds): one entry each in the feature registry
  (:data:`pricelevel.features.registry.REGISTRY`: indicators, normaliser, warm-up), computed here by
  :func:`bar_values` and bar by bar by :mod:`pricelevel.features.incremental`.
- ``levels``: ``level_distance`` (|close - nearest level| / close, capped at 5 %), ``support_distance_atr``
  and ``resistance_distance_atr`` (to the nearest level in force at or below / above the close, in ATR(14),
  capped at 10; no such level = the cap).
- ``level_strength``: ``support_touches``, ``support_extrema``, ``support_age_days`` and the same for
  ``resistance_*``: log(1 + 1d touches), log(1 + extrema in the cluster), days since the level's newest
  extremum (capped at 365; no level: 0, 0, 365; touches are 0 when the touches filter is off).
- ``context``: for each of ``features.context_timeframes`` longer than the bars' timeframe, the registry's
  ``context=True`` entries (``ctx_<tf>_log_return``, ``_rsi_14``, ``_atr_14``, ``_sma_gap_20``) computed on its
  candles, of the last closed candle, and ``ctx_<tf>_close_gap`` (log of the bar's close over that candle's close).
- ``symbol``: not a column; the model's learned symbol embedding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.features.catalogue import needed_timeframes, unknown_feature_names
from pricelevel.features.registry import (
    LEVEL_ATR,
    LEVEL_GROUPS,
    REGISTRY,
    SYMBOL,
    Bars,
    Feature,
    FeaturePlan,
    FeatureRegistry,
)
from pricelevel.levels.walkforward import LevelHistory, bracketing_levels, nearest_of_brackets

#: Distances to the nearest level are capped here: beyond 5 % a level no longer matters for the next bars,
#: and a bar with no level in force is treated as "far away".
MAX_LEVEL_DISTANCE = 0.05
#: Support/resistance distances are capped at this many ATRs (and a missing level is this far away).
MAX_LEVEL_ATR = 10.0
MAX_AGE_DAYS = 365.0
_DAY_NS = Timeframe.D1.nanoseconds
#: Every ``levels`` and ``level_strength`` column.
LEVEL_COLUMNS = frozenset(c for columns in LEVEL_GROUPS.values() for c in columns)


def compute_features(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    columns: Iterable[str],
    history: LevelHistory | None = None,
    context: Mapping[Timeframe, pd.DataFrame | None] | None = None,
    registry: FeatureRegistry = REGISTRY,
) -> pd.DataFrame:
    """``float64`` columns ``columns`` (in that order) for every row of ``candles``; NaN = not defined yet.

    ``history`` (the walk-forward levels of these candles) is needed for the ``levels`` and
    ``level_strength`` columns, ``context[tf]`` (canonical candles of the same symbol) for ``ctx_<tf>_*``.
    """
    columns = list(columns)
    groups = registry.groups
    unknown = unknown_feature_names(columns, registry)
    if unknown or SYMBOL in columns or any(c in groups for c in columns):
        raise ValueError(f"not feature columns: {unknown or [c for c in columns if c in groups or c == SYMBOL]}")
    values: dict[str, np.ndarray] = {}
    wanted = set(columns)
    entries = registry.select(wanted)
    if entries:
        values |= bar_values(bars_of(candles), entries)
    if wanted & LEVEL_COLUMNS:
        if history is None:
            raise ValueError("level features need the walk-forward level history")
        values |= _level_values(candles, history)
    for tf in needed_timeframes(columns):
        frame = (context or {}).get(tf)
        if frame is None:
            raise ValueError(f"context features need {tf} candles of the same symbol")
        values |= _context_values(candles, Timeframe(timeframe), frame, tf, registry)
    # Inf (a zero volume) is "not defined", like the warm-up: the dataset skips windows holding it.
    if not all(values[name].dtype == np.float64 for name in columns):
        out = pd.DataFrame({name: values[name] for name in columns}, index=candles.index)
        return out.replace([np.inf, -np.inf], np.nan)
    block = np.empty((len(candles), len(columns)), order="F")  # one block (pandas keeps columns contiguous)
    for k, name in enumerate(columns):
        block[:, k] = values[name]
    block[np.isinf(block)] = np.nan
    return pd.DataFrame(block, index=candles.index, columns=columns)


def _price(candles: pd.DataFrame, name: str) -> np.ndarray:
    return candles[name].to_numpy(dtype=np.float64)


def bars_of(candles: pd.DataFrame) -> Bars:
    """A frame's high, low, close and volume as float64 arrays."""
    return Bars(*(_price(candles, c) for c in ("high", "low", "close", "volume")))


def bar_values(bars: Bars, features: Iterable[Feature]) -> dict[str, np.ndarray]:
    """The registry entries ``features`` over every row of ``bars``: each indicator they read once, over the
    whole history, then each entry's normaliser (the incremental builder resumes the same indicators)."""
    plan = FeaturePlan.of(features)
    return plan.values(bars, plan.batch(bars))


def _level_values(candles: pd.DataFrame, history: LevelHistory) -> dict[str, np.ndarray]:
    timestamps = pd.DatetimeIndex(candles["timestamp"])
    bars = bars_of(candles)
    close, atr = bars.close, LEVEL_ATR.batch(bars)
    below, above = bracketing_levels(timestamps, close, history)
    levels = history.levels
    return level_columns(
        utc_ns(timestamps), close, atr, levels["price"].to_numpy(dtype=np.float64),
        levels["touches"].to_numpy(dtype=np.float64), levels["n_extrema"].to_numpy(dtype=np.float64),
        utc_ns(levels["last_seen"]), below, above,
    )


def level_columns(
    bar_ns: np.ndarray, close: np.ndarray, atr: np.ndarray, price: np.ndarray, touches: np.ndarray,
    extrema: np.ndarray, last_seen_ns: np.ndarray, below: np.ndarray, above: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ``levels`` and ``level_strength`` columns of bars whose nearest level at or below / above the
    close is row ``below`` / ``above`` (-1: none) of the level arrays ``price`` .. ``last_seen_ns``; ``atr``
    is the bars' ATR(14). Each row from its own values alone."""
    distance = np.abs(close - nearest_of_brackets(close, price, below, above)) / close
    touches = np.nan_to_num(touches, nan=0.0)
    out = {"level_distance": np.clip(np.nan_to_num(distance, nan=MAX_LEVEL_DISTANCE), 0.0, MAX_LEVEL_DISTANCE)}
    for side, row in (("support", below), ("resistance", above)):
        has = row >= 0
        at = np.where(has, row, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.abs(close - price[at]) / atr if len(price) else np.full(close.shape, np.inf)
        gap = np.where(has, gap, MAX_LEVEL_ATR)
        out[f"{side}_distance_atr"] = np.where(np.isnan(atr), np.nan, np.minimum(gap, MAX_LEVEL_ATR))
        out[f"{side}_touches"] = np.where(has, np.log1p(touches[at]) if len(price) else 0.0, 0.0)
        out[f"{side}_extrema"] = np.where(has, np.log1p(extrema[at]) if len(price) else 0.0, 0.0)
        age = (bar_ns - last_seen_ns[at]) / _DAY_NS if len(price) else np.full(close.shape, MAX_AGE_DAYS)
        out[f"{side}_age_days"] = np.where(has, np.clip(age, 0.0, MAX_AGE_DAYS), MAX_AGE_DAYS)
    return out


def _context_values(
    candles: pd.DataFrame, timeframe: Timeframe, frame: pd.DataFrame, context_tf: Timeframe, registry: FeatureRegistry
) -> dict[str, np.ndarray]:
    """Values of the last ``context_tf`` candle closed by each bar's close, joined on close times."""
    bars = bars_of(frame)
    per_candle = bar_values(bars, registry.context_features)
    candle_close_ns = utc_ns(frame["timestamp"]) + context_tf.nanoseconds
    bar_close_ns = utc_ns(candles["timestamp"]) + timeframe.nanoseconds
    return join_context(bar_close_ns, _price(candles, "close"), candle_close_ns, bars.close, per_candle, context_tf)


def join_context(
    bar_close_ns: np.ndarray, bar_close: np.ndarray, candle_close_ns: np.ndarray, candle_close: np.ndarray,
    per_candle: Mapping[str, np.ndarray], context_tf: Timeframe,
) -> dict[str, np.ndarray]:
    """The ``ctx_<tf>_*`` columns of bars closing at ``bar_close_ns``: the values of the last candle closed by
    then, and the log of the bar's close over that candle's."""
    last_closed = np.searchsorted(candle_close_ns, bar_close_ns, side="right") - 1
    known = last_closed >= 0
    at = np.where(known, last_closed, 0)
    out = {}
    for name, values in per_candle.items():
        out[f"ctx_{context_tf}_{name}"] = np.where(known, values[at] if len(values) else np.nan, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.log(bar_close / candle_close[at]) if len(candle_close) else np.full(len(bar_close), np.nan)
    out[f"ctx_{context_tf}_close_gap"] = np.where(known, gap, np.nan)
    return out
