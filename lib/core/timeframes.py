"""Timeframes: one canonical spelling ("1d", "4h", "1h", "15m", "1m") and what follows from it."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import pandas as pd


class Timeframe(StrEnum):
    """A candle length; the value is the canonical spelling used in file names and config."""

    D1 = "1d"
    H4 = "4h"
    H1 = "1h"
    M15 = "15m"
    M1 = "1m"

    @property
    def delta(self) -> pd.Timedelta:
        return pd.Timedelta(_DELTAS[self])

    @property
    def nanoseconds(self) -> int:
        return self.delta.value

    @property
    def bybit_interval(self) -> str:
        """Bybit v5 kline ``interval`` parameter."""
        return _BYBIT_INTERVALS[self]

    @property
    def bars_per_year(self) -> float:
        """Bars in 365 days of a market that trades around the clock (used to annualise)."""
        return pd.Timedelta(days=365) / self.delta


_DELTAS = {"1d": "1D", "4h": "4h", "1h": "1h", "15m": "15min", "1m": "1min"}
_BYBIT_INTERVALS = {"1d": "D", "4h": "240", "1h": "60", "15m": "15", "1m": "1"}


def utc_ns(values: pd.DatetimeIndex | pd.Series | np.ndarray) -> np.ndarray:
    """UTC nanoseconds since the epoch of timestamps (naive ones are taken as UTC): the unit time is
    compared in wherever "known by" rules are applied."""
    index = pd.DatetimeIndex(values)
    if index.tz is None:
        index = index.tz_localize("UTC")
    return index.as_unit("ns").asi8
