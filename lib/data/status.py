"""What the store holds: per dataset its path, rows, first and last candle, and gaps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pricelevel.core.candles import TIMESTAMP
from pricelevel.data.store import CandleStore, DatasetKey, Layer, read_candles


@dataclass(frozen=True)
class DatasetStatus:
    layer: str
    source: str
    symbol: str
    timeframe: str
    path: str
    rows: int
    first: str | None
    last: str | None
    gaps: int
    missing_bars: int
    largest_gap_bars: int

    def to_dict(self) -> dict:
        return asdict(self)


def gap_lengths(timestamps: pd.Series, step_ns: int) -> np.ndarray:
    """Missing bars between consecutive sorted timestamps (only the positive ones)."""
    ns = pd.to_datetime(timestamps, utc=True).astype("int64").to_numpy()
    if len(ns) < 2:
        return np.zeros(0, dtype=np.int64)
    missing = np.diff(np.sort(ns)) // step_ns - 1
    return missing[missing > 0]


def dataset_status(path: Path, layer: Layer, key: DatasetKey) -> DatasetStatus:
    frame = read_candles(path)
    stamps = pd.to_datetime(frame[TIMESTAMP], utc=True) if TIMESTAMP in frame else pd.Series([], dtype="datetime64[ns, UTC]")
    gaps = gap_lengths(stamps, key.timeframe.nanoseconds)
    return DatasetStatus(
        layer=str(layer),
        source=key.source,
        symbol=key.symbol,
        timeframe=str(key.timeframe),
        path=str(path),
        rows=len(frame),
        first=stamps.min().isoformat() if len(stamps) else None,
        last=stamps.max().isoformat() if len(stamps) else None,
        gaps=int(len(gaps)),
        missing_bars=int(gaps.sum()),
        largest_gap_bars=int(gaps.max()) if len(gaps) else 0,
    )


def store_status(store: CandleStore, layers: tuple[Layer, ...] = (Layer.RAW, Layer.VALIDATED)) -> list[DatasetStatus]:
    return [
        dataset_status(store.path(layer, key), layer, key) for layer in layers for key in store.datasets(layer)
    ]
