"""Labels the model learns, all computed without look-ahead.

The target of bar ``t`` is always known at the close of bar ``t + horizon`` and never earlier; the rows whose
horizon runs past the data have no target (NaN), so the last bars of a file are never given a guessed label.

- ``forward_move``: 1 when the highest high of bars ``t+1 .. t+horizon`` reaches ``open[t+1] x (1 + x)``.
  The signal is taken at the close of ``t`` and filled at the next open (the backtest's ``next_open``), so the
  move is measured from the price a trade would actually get.
- ``triple_barrier`` (López de Prado): from the next open, an upper barrier ``+u`` and a lower barrier ``-d``
  within ``horizon`` bars; :func:`first_touch` says which was touched first (+1 up, -1 down, 0 timeout: an
  explicit class). The target is "up first" (1) against "down first or timeout" (0): the model stays a binary
  classifier and its probability ranks bars by their chance of reaching the take-profit before the stop. A bar
  whose range touches both barriers counts as down first, as the backtest engine checks the stop-loss first.
  The barriers are fractions of the entry price, or multiples of ATR at the decision bar (volatility-scaled).
- ``level_label``: 1 when bar ``t + horizon`` closes within ``threshold_frac x close`` of a level in force at
  that bar (walk-forward levels only). The same test at bar ``t`` itself is :func:`level_label`, the "near a
  level now" flag kept beside every target as a baseline.

Whatever the label, :func:`direction_classes` gives every bar's first touch (the triple barrier's own barriers,
or +/- ``move_frac`` for the other kinds): the bars where exactly one barrier was touched first are what the
direction skill (ROC-AUC of up-first against down-first) is measured on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from pricelevel.features.config import LabelsConfig
from pricelevel.levels.walkforward import LevelHistory, nearest_level
from pricelevel.ta.indicators import atr

#: The classes of :func:`first_touch`: up first, down first, neither within the horizon.
UP_FIRST, DOWN_FIRST, TIMEOUT = 1.0, -1.0, 0.0


def level_label(
    timestamps: pd.DatetimeIndex | pd.Series, close: np.ndarray, history: LevelHistory, threshold_frac: float
) -> np.ndarray:
    """int8: 1 when ``|close - level| <= threshold_frac x close`` for a level in force at that bar, else 0.

    Only the levels in force (walk-forward) are used, so a label never reflects levels found later; a bar
    with no level in force (before the first refit, or an empty set) is 0. The boundary is inclusive.
    """
    close = np.asarray(close, dtype=np.float64)
    level = nearest_level(timestamps, close, history)
    return (np.abs(close - level) <= threshold_frac * close).astype(np.int8)


def forward_move(open_: np.ndarray, high: np.ndarray, horizon: int, move_frac: float) -> np.ndarray:
    """float32: 1 when ``max(high[t+1 : t+horizon+1]) >= open[t+1] x (1 + move_frac)``, else 0; NaN on the
    last ``horizon`` rows (their horizon runs past the data). The boundary is inclusive."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    open_ = np.asarray(open_, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    n = open_.shape[0]
    target = np.full(n, np.nan, dtype=np.float32)
    if n <= horizon:
        return target
    highest = sliding_window_view(high[1:], horizon).max(axis=1)  # row t: bars t+1 .. t+horizon
    entry = open_[1 : n - horizon + 1]
    target[: n - horizon] = highest >= entry * (1.0 + move_frac)
    return target


def shifted(values: np.ndarray, horizon: int) -> np.ndarray:
    """``out[t] = values[t + horizon]`` as float32; the last ``horizon`` rows are NaN."""
    out = np.full(len(values), np.nan, dtype=np.float32)
    if horizon < len(values):
        out[: len(values) - horizon] = values[horizon:]
    return out


def first_touch(
    open_: np.ndarray, high: np.ndarray, low: np.ndarray, horizon: int, up: float | np.ndarray, down: float | np.ndarray
) -> np.ndarray:
    """float32: which barrier bars ``t+1 .. t+horizon`` touch first, from ``entry = open[t+1]``.

    The upper barrier is ``entry x (1 + up)`` (touched when a high reaches it), the lower ``entry x (1 - down)``
    (a low at or below it); ``up``/``down`` are fractions, one for all bars or one per bar (NaN: no label).
    :data:`UP_FIRST` (+1), :data:`DOWN_FIRST` (-1), :data:`TIMEOUT` (0, neither); a bar touching both counts as
    down first (the engine's stop-loss comes before its take-profit); NaN on the last ``horizon`` rows.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    open_, high, low = (np.asarray(a, dtype=np.float64) for a in (open_, high, low))
    n = open_.shape[0]
    out = np.full(n, np.nan, dtype=np.float32)
    m = n - horizon
    if m <= 0:
        return out
    up = np.broadcast_to(np.asarray(up, dtype=np.float64), (n,))[:m]
    down = np.broadcast_to(np.asarray(down, dtype=np.float64), (n,))[:m]
    entry = open_[1 : m + 1]
    up_hit = sliding_window_view(high[1:], horizon) >= (entry * (1.0 + up))[:, None]  # row t: bars t+1 .. t+horizon
    down_hit = sliding_window_view(low[1:], horizon) <= (entry * (1.0 - down))[:, None]
    first_up = np.where(up_hit.any(axis=1), up_hit.argmax(axis=1), horizon)
    first_down = np.where(down_hit.any(axis=1), down_hit.argmax(axis=1), horizon)
    classes = np.where(first_down <= first_up, DOWN_FIRST, UP_FIRST)
    classes[(first_up == horizon) & (first_down == horizon)] = TIMEOUT
    classes[~(np.isfinite(up) & np.isfinite(down) & np.isfinite(entry))] = np.nan
    out[:m] = classes
    return out


def barrier_fractions(candles: pd.DataFrame | dict, config: LabelsConfig) -> tuple[np.ndarray, np.ndarray]:
    """The triple barrier's ``(up, down)`` of every bar as fractions of its entry price (the next open): the
    configured fractions, or ``upper``/``lower`` x ATR(``atr_window``) at the decision bar / the next open (NaN
    while the ATR warms up, and on the last bar, which has no next open)."""
    open_ = np.asarray(candles["open"], dtype=np.float64)
    if config.barrier_unit == "fraction":
        return np.full(open_.shape, config.up_barrier), np.full(open_.shape, config.down_barrier)
    scale = atr(candles["high"], candles["low"], candles["close"], config.atr_window)
    per_entry = np.full(open_.shape, np.nan)
    per_entry[:-1] = scale[:-1] / open_[1:]
    return config.up_barrier * per_entry, config.down_barrier * per_entry


def direction_classes(candles: pd.DataFrame | dict, config: LabelsConfig) -> np.ndarray:
    """Every bar's :func:`first_touch` class, for the direction skill of any label: the triple barrier's own
    barriers, or +/- ``move_frac`` from the next open for ``forward_move`` and ``level_label``."""
    if config.kind == "triple_barrier":
        up, down = barrier_fractions(candles, config)
    else:
        up = down = config.move_frac
    return first_touch(candles["open"], candles["high"], candles["low"], config.horizon, up, down)


def targets(candles: pd.DataFrame | dict, near_level: np.ndarray, config: LabelsConfig) -> np.ndarray:
    """The target of every bar for ``config.kind`` (NaN where its horizon runs past the data)."""
    if config.kind == "forward_move":
        return forward_move(candles["open"], candles["high"], config.horizon, config.move_frac)
    if config.kind == "triple_barrier":
        classes = direction_classes(candles, config)
        return np.where(np.isnan(classes), np.nan, classes == UP_FIRST).astype(np.float32)
    return shifted(near_level, config.horizon)
