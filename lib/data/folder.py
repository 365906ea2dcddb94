"""A folder of ``SYMBOL_TF.parquet`` candle files (the sample, a store layer, anything a user hands us).

Training reads the validated store layer through this; ``--data DIR`` commands read any folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pricelevel.core.candles import to_canonical
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.store import parse_dataset_filename, read_candles


class CandleFolderError(FileNotFoundError):
    """The folder lacks a file a step needs; ``str()`` names the folder and the missing files."""


@dataclass(frozen=True)
class CandleFolder:
    """The candle files of one folder, indexed by (symbol, timeframe)."""

    root: Path
    files: dict[tuple[str, Timeframe], Path]

    @classmethod
    def open(cls, root: Path) -> CandleFolder:
        root = Path(root)
        if not root.is_dir():
            raise CandleFolderError(f"{root}: no such folder")
        files = {}
        for path in sorted(root.glob("*.parquet")):
            parsed = parse_dataset_filename(path)
            if parsed is not None:
                files[parsed] = path
        if not files:
            raise CandleFolderError(f"{root}: no SYMBOL_TF.parquet candle files")
        return cls(root, files)

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted({symbol for symbol, _ in self.files}))

    def has(self, symbol: str, timeframe: Timeframe) -> bool:
        return (symbol, Timeframe(timeframe)) in self.files

    def path(self, symbol: str, timeframe: Timeframe) -> Path:
        try:
            return self.files[(symbol, Timeframe(timeframe))]
        except KeyError:
            raise CandleFolderError(f"{self.root}: no {symbol}_{timeframe}.parquet") from None

    def read(self, symbol: str, timeframe: Timeframe) -> pd.DataFrame:
        return to_canonical(read_candles(self.path(symbol, timeframe)))  # one version of a file being replaced

    def read_optional(self, symbol: str, timeframe: Timeframe) -> pd.DataFrame | None:
        return self.read(symbol, timeframe) if self.has(symbol, timeframe) else None

    def read_many(self, symbol: str, timeframes: Iterable[Timeframe]) -> dict[Timeframe, pd.DataFrame | None]:
        """Candles of ``symbol`` per timeframe (``None`` where the folder has none)."""
        return {Timeframe(tf): self.read_optional(symbol, tf) for tf in timeframes}

    def existing_for(self, symbols: Iterable[str]) -> list[Path]:
        """Every file of ``symbols``, whatever the timeframe (the data a training run read)."""
        wanted = set(symbols)
        return [path for (symbol, _), path in sorted(self.files.items()) if symbol in wanted]

    def existing(self, symbol: str, timeframes: Iterable[Timeframe]) -> list[Path]:
        """The files of ``symbol`` among ``timeframes`` that the folder has."""
        return [self.files[(symbol, Timeframe(tf))] for tf in timeframes if self.has(symbol, tf)]

    def require(self, symbols: Iterable[str], timeframes: Iterable[Timeframe]) -> list[Path]:
        """The files for every (symbol, timeframe); one error naming all that are missing."""
        wanted = [(s, Timeframe(tf)) for s in symbols for tf in timeframes]
        missing = [f"{s}_{tf}.parquet" for s, tf in wanted if (s, tf) not in self.files]
        if missing:
            raise CandleFolderError(f"{self.root}: missing {', '.join(missing)}")
        return [self.files[key] for key in wanted]
