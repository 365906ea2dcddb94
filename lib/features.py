"""Per-bar model inputs computed from one symbol's candles.

Every value at row ``t`` uses rows ``<= t`` only, so a window ending at ``t`` never sees the future and the
same bars give the same features whether they are scored in training, in a backtest or live.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

FEATURES = ("log_return", "log_range", "volume_change", "level_distance")
#: Distances to the nearest level are clipped here: beyond 5 % a level no longer matters for the next bars,
#: and a bar with no level in force is treated as "far away".
MAX_LEVEL_DISTANCE = 0.05


def compute_features(
    candles: pd.DataFrame, names: Sequence[str], level_distance: np.ndarray | None = None
) -> np.ndarray:
    """``float32 [len(candles), len(names)]`` in ``names`` order, without NaN.

    ``level_distance`` is ``|close - nearest level in force| / close`` per row (NaN where no level is in
    force); it is required only when ``"level_distance"`` is requested.
    """
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    n = len(candles)
    columns = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in names:
            if name == "log_return":
                column = _first_difference(np.log(_column(candles, "close")))
            elif name == "log_range":
                column = np.log(_column(candles, "high") / _column(candles, "low"))
            elif name == "volume_change":
                column = _first_difference(np.log1p(_column(candles, "volume")))
            else:
                column = _level_distance(level_distance, n)
            columns.append(column)
    out = np.stack(columns, axis=1) if columns else np.empty((n, 0))
    # A zero/negative price or volume (bad data validation let through) must not poison a whole window.
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _column(candles: pd.DataFrame, name: str) -> np.ndarray:
    return candles[name].to_numpy(dtype=np.float64)


def _first_difference(values: np.ndarray) -> np.ndarray:
    """``values[t] - values[t-1]``, 0 on the first row (no earlier bar to compare with)."""
    out = np.zeros_like(values)
    out[1:] = np.diff(values)
    return out


def _level_distance(level_distance: np.ndarray | None, n: int) -> np.ndarray:
    if level_distance is None:
        raise ValueError("feature 'level_distance' needs the level_distance array")
    distance = np.asarray(level_distance, dtype=np.float64)
    if distance.shape != (n,):
        raise ValueError(f"level_distance has shape {distance.shape}, expected ({n},)")
    return np.clip(np.nan_to_num(distance, nan=MAX_LEVEL_DISTANCE), 0.0, MAX_LEVEL_DISTANCE)
