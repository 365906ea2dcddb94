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

- ``returns``: ``log_return`` (1 bar), ``log_return_6``, ``log_return_24``, ``log_range`` (log high/low),
  ``volume_change`` (change of log(1 + volume)), ``volatility_24`` (std of 1-bar log returns).
- ``indicators``: ``cci_20`` / 100, ``eom_14`` (Ease of Movement x mean volume / close^2),
  ``sma_gap_20`` and ``ema_gap_50`` (close / average - 1), ``bollinger_pct_b`` and ``bollinger_width``
  (band width / middle), ``force_index_13`` (/ close x mean volume), ``roc_10`` / 100, ``rsi_14`` / 100,
  ``macd``, ``macd_signal``, ``macd_hist`` (/ close), ``atr_14`` (/ close).
- ``levels``: ``level_distance`` (|close - nearest level| / close, capped at 5 %), ``support_distance_atr``
  and ``resistance_distance_atr`` (to the nearest level in force at or below / above the close, in ATR(14),
  capped at 10; no such level = the cap).
- ``level_strength``: ``support_touches``, ``support_extrema``, ``support_age_days`` and the same for
  ``resistance_*``: log(1 + 1d touches), log(1 + extrema in the cluster), days since the level's newest
  extremum (capped at 365; no level: 0, 0, 365; touches are 0 when the touches filter is off).
- ``context``: for each of ``features.context_timeframes`` longer than the bars' timeframe,
  ``ctx_<tf>_log_return``, ``ctx_<tf>_rsi_14``, ``ctx_<tf>_atr_14``, ``ctx_<tf>_sma_gap_20`` of the last
  closed candle, and ``ctx_<tf>_close_gap`` (log of the bar's close over that candle's close).
- ``symbol``: not a column; the model's learned symbol embedding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.features.catalogue import GROUPS, SYMBOL, needed_timeframes, unknown_feature_names
from pricelevel.levels.walkforward import LevelHistory, bracketing_levels, nearest_of_brackets
from pricelevel.ta import indicators

#: Distances to the nearest level are capped here: beyond 5 % a level no longer matters for the next bars,
#: and a bar with no level in force is treated as "far away".
MAX_LEVEL_DISTANCE = 0.05
#: Support/resistance distances are capped at this many ATRs (and a missing level is this far away).
MAX_LEVEL_ATR = 10.0
MAX_AGE_DAYS = 365.0
_DAY_NS = Timeframe.D1.nanoseconds


def compute_features(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    columns: Iterable[str],
    history: LevelHistory | None = None,
    context: Mapping[Timeframe, pd.DataFrame | None] | None = None,
) -> pd.DataFrame:
    """``float64`` columns ``columns`` (in that order) for every row of ``candles``; NaN = not defined yet.

    ``history`` (the walk-forward levels of these candles) is needed for the ``levels`` and
    ``level_strength`` columns, ``context[tf]`` (canonical candles of the same symbol) for ``ctx_<tf>_*``.
    """
    columns = list(columns)
    unknown = unknown_feature_names(columns)
    if unknown or SYMBOL in columns or any(c in GROUPS for c in columns):
        raise ValueError(f"not feature columns: {unknown or [c for c in columns if c in GROUPS or c == SYMBOL]}")
    values: dict[str, np.ndarray] = {}
    wanted = set(columns)
    if wanted & {*GROUPS["returns"], *GROUPS["indicators"]}:
        values |= _bar_values(candles)
    if wanted & {*GROUPS["levels"], *GROUPS["level_strength"]}:
        if history is None:
            raise ValueError("level features need the walk-forward level history")
        values |= _level_values(candles, history)
    for tf in needed_timeframes(columns):
        frame = (context or {}).get(tf)
        if frame is None:
            raise ValueError(f"context features need {tf} candles of the same symbol")
        values |= _context_values(candles, Timeframe(timeframe), frame, tf)
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


def _bar_values(candles: pd.DataFrame) -> dict[str, np.ndarray]:
    high, low, close, volume = (_price(candles, c) for c in ("high", "low", "close", "volume"))
    return bar_columns(high, low, close, bar_series(high, low, close, volume))


def bar_series(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray) -> dict[str, np.ndarray]:
    """The indicator series the ``returns`` and ``indicators`` columns are made of: every value that reads
    earlier rows (:func:`bar_columns` only combines them row by row, so an incremental builder that extends
    these series row by row gets the same columns)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bands = indicators.bollinger(close, 20, 2.0)
        macd = indicators.macd(close, 12, 26, 9)
        return {
            "log_return_1": indicators.log_return(close, 1),
            "log_return_6": indicators.log_return(close, 6),
            "log_return_24": indicators.log_return(close, 24),
            "log_volume_change": _difference(np.log1p(volume)),
            "volatility_24": indicators.rolling_volatility(close, 24),
            "cci_20": indicators.cci(high, low, close, 20),
            "eom_14": indicators.ease_of_movement(high, low, volume, 14),
            "volume_sma_14": indicators.sma(volume, 14),
            "volume_sma_13": indicators.sma(volume, 13),
            "sma_20": indicators.sma(close, 20),
            "ema_50": indicators.ema(close, 50),
            "bollinger_upper": bands.upper,
            "bollinger_middle": bands.middle,
            "bollinger_lower": bands.lower,
            "force_index_13": indicators.force_index(close, volume, 13),
            "roc_10": indicators.rate_of_change(close, 10),
            "rsi_14": indicators.rsi(close, 14),
            "macd": macd.macd,
            "macd_signal": macd.signal,
            "macd_hist": macd.histogram,
            "atr_14": indicators.atr(high, low, close, 14),
        }


def bar_columns(
    high: np.ndarray, low: np.ndarray, close: np.ndarray, series: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The ``returns`` and ``indicators`` columns from :func:`bar_series`, each row from that row's values alone."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "log_return": series["log_return_1"],
            "log_return_6": series["log_return_6"],
            "log_return_24": series["log_return_24"],
            "log_range": np.log(high / low),
            "volume_change": series["log_volume_change"],
            "volatility_24": series["volatility_24"],
            "cci_20": series["cci_20"] / 100.0,
            "eom_14": series["eom_14"] / 1e8 * series["volume_sma_14"] / close**2,
            "sma_gap_20": close / series["sma_20"] - 1.0,
            "ema_gap_50": close / series["ema_50"] - 1.0,
            "bollinger_pct_b": (close - series["bollinger_lower"]) / (series["bollinger_upper"] - series["bollinger_lower"]),
            "bollinger_width": (series["bollinger_upper"] - series["bollinger_lower"]) / series["bollinger_middle"],
            "force_index_13": series["force_index_13"] / (close * series["volume_sma_13"]),
            "roc_10": series["roc_10"] / 100.0,
            "rsi_14": series["rsi_14"] / 100.0,
            "macd": series["macd"] / close,
            "macd_signal": series["macd_signal"] / close,
            "macd_hist": series["macd_hist"] / close,
            "atr_14": series["atr_14"] / close,
        }


def _difference(values: np.ndarray) -> np.ndarray:
    """``values[t] - values[t-1]``; NaN on the first row (no earlier bar)."""
    out = np.full_like(values, np.nan)
    out[1:] = np.diff(values)
    return out


def _level_values(candles: pd.DataFrame, history: LevelHistory) -> dict[str, np.ndarray]:
    timestamps = pd.DatetimeIndex(candles["timestamp"])
    high, low, close = (_price(candles, c) for c in ("high", "low", "close"))
    atr = indicators.atr(high, low, close, 14)
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
    candles: pd.DataFrame, timeframe: Timeframe, frame: pd.DataFrame, context_tf: Timeframe
) -> dict[str, np.ndarray]:
    """Values of the last ``context_tf`` candle closed by each bar's close, joined on close times."""
    high, low, close = (_price(frame, c) for c in ("high", "low", "close"))
    per_candle = context_candle_columns(close, context_series(high, low, close))
    candle_close_ns = utc_ns(frame["timestamp"]) + context_tf.nanoseconds
    bar_close_ns = utc_ns(candles["timestamp"]) + timeframe.nanoseconds
    return join_context(bar_close_ns, _price(candles, "close"), candle_close_ns, close, per_candle, context_tf)


def context_series(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> dict[str, np.ndarray]:
    """The indicator series of a longer timeframe's candles that the ``context`` columns read."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "log_return": indicators.log_return(close, 1),
            "rsi_14": indicators.rsi(close, 14),
            "atr_14": indicators.atr(high, low, close, 14),
            "sma_20": indicators.sma(close, 20),
        }


def context_candle_columns(close: np.ndarray, series: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each longer-timeframe candle's context values (before the join), from its own row of :func:`context_series`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "log_return": series["log_return"],
            "rsi_14": series["rsi_14"] / 100.0,
            "atr_14": series["atr_14"] / close,
            "sma_gap_20": close / series["sma_20"] - 1.0,
        }


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
