"""Candle sources: one small interface, a live implementation (Bybit) and a local one (bundled sample).

A source yields *pages*: canonical candle frames (see :mod:`pricelevel.candles`) in ascending time order,
each covering a contiguous stretch of ``[start, end)``. The ingest step stores each page as it arrives, so
whatever was fetched before a failure is kept and the next run resumes after the last stored candle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pandas as pd

from pricelevel.core.timeframes import Timeframe


class CandleSource(Protocol):
    """Where candles come from. ``name`` is part of every stored dataset's key."""

    name: str

    def fetch(
        self, symbol: str, timeframe: Timeframe, start: pd.Timestamp, end: pd.Timestamp
    ) -> Iterator[pd.DataFrame]:
        """Yield pages of *closed* candles with open time in ``[start, end)``, oldest first."""
        ...


class SourceError(RuntimeError):
    """A source failed for good (after its retries); the message says what and where. ``retryable``: the same
    request may succeed later (the exchange was away) rather than being refused for good (a bad symbol)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
