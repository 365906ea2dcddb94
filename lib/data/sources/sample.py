"""The bundled sample: real Binance spot candles shipped in ``data/sample`` (see its PROVENANCE.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from pricelevel.core.candles import TIMESTAMP, to_canonical
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.sources import SourceError


class SampleSource:
    """Serves candles from a folder of ``SYMBOL_TF.parquet`` files, as if it were an exchange."""

    name = "sample"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, symbol: str, timeframe: Timeframe) -> Path:
        return self.directory / f"{symbol}_{timeframe}.parquet"

    def fetch(
        self, symbol: str, timeframe: Timeframe, start: pd.Timestamp, end: pd.Timestamp
    ) -> Iterator[pd.DataFrame]:
        path = self.path(symbol, timeframe)
        if not path.exists():
            available = sorted(p.stem for p in self.directory.glob("*.parquet"))
            raise SourceError(
                f"sample source has no {symbol} {timeframe} candles ({path} missing); "
                f"available: {', '.join(available) or 'none'}"
            )
        frame = pd.read_parquet(path)
        ts = pd.to_datetime(frame[TIMESTAMP], utc=True)
        page = frame.loc[(ts >= start) & (ts < end)]
        if len(page):
            yield to_canonical(page)
