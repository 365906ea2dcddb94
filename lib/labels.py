"""Labels the model learns: is the close at a support/resistance level in force at that bar?"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pricelevel.levels import LevelHistory, nearest_level


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
