"""Model output to trading intent: the one signal path shared by the backtest and the live trader.

Both call :func:`signals_from_probability` with the same ``threshold``/``exit_threshold`` from
``BacktestConfig``, so a strategy that was backtested is the strategy that trades.
"""

from __future__ import annotations

import numpy as np


def signals_from_probability(
    probability: np.ndarray, threshold: float, exit_threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``entry = p >= threshold``; ``exit = p < exit_threshold`` (never, when it is ``None``).

    A missing probability (NaN: no model output for that bar) is neither an entry nor an exit.
    """
    p = np.asarray(probability, dtype=np.float64)
    valid = ~np.isnan(p)
    entries = valid & (p >= threshold)
    exits = valid & (p < exit_threshold) if exit_threshold is not None else np.zeros(p.shape, dtype=bool)
    return entries, exits
