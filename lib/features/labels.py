"""Labels the model learns, both computed without look-ahead.

The target of bar ``t`` is always known at the close of bar ``t + horizon`` and never earlier; the rows whose
horizon runs past the data have no target (NaN), so the last bars of a file are never given a guessed label.

- ``forward_move``: 1 when the highest high of bars ``t+1 .. t+horizon`` reaches ``open[t+1] x (1 + x)``.
  The signal is taken at the close of ``t`` and filled at the next open (the backtest's ``next_open``), so the
  move is measured from the price a trade would actually get.
- ``level_label``: 1 when bar ``t + horizon`` closes within ``threshold_frac x close`` of a level in force at
  that bar (walk-forward levels only). The same test at bar ``t`` itself is :func:`level_label`, the "near a
  level now" flag kept beside every target as a baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from pricelevel.features.config import LabelsConfig
from pricelevel.levels.walkforward import LevelHistory, nearest_level


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


def targets(candles: pd.DataFrame, near_level: np.ndarray, config: LabelsConfig) -> np.ndarray:
    """The target of every bar for ``config.kind`` (NaN where its horizon runs past the data)."""
    if config.kind == "forward_move":
        return forward_move(candles["open"], candles["high"], config.horizon, config.move_frac)
    return shifted(near_level, config.horizon)
