"""Where the trader's candles come from: the candles of every timeframe the model reads, closed by a bar's
close. A replay cuts a folder of history at each bar; the live feed brings the store up to the bar through the
ingest path (the same candle sources, retries and great-expectations validation as training data) and reads
the validated layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import pandas as pd

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import ValidationConfig
from pricelevel.data.folder import CandleFolder
from pricelevel.data.ingest import ingest_dataset
from pricelevel.data.publish import validate_and_publish
from pricelevel.data.sources import CandleSource
from pricelevel.data.store import Layer
from pricelevel.features.lookahead import cut_frames

Frames = dict[str, dict[Timeframe, pd.DataFrame | None]]


class CandleFeed(Protocol):
    def closed_by(self, until: pd.Timestamp) -> Frames:
        """Per symbol and timeframe, the candles closed at or before ``until`` (a bar's close time)."""
        ...


class ReplayFeed:
    """History as it was: a folder's candles cut at each bar's close (nothing later is ever handed out)."""

    def __init__(self, folder: CandleFolder, symbols: Sequence[str], timeframes: Sequence[Timeframe]) -> None:
        folder.require(symbols, [timeframes[0]])
        self.frames = {symbol: folder.read_many(symbol, timeframes) for symbol in symbols}

    def bar_times(self, timeframe: Timeframe, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None) -> pd.DatetimeIndex:
        """Every bar of ``timeframe`` any symbol has (the backtest's clock), from ``start`` to ``end``."""
        stamps = pd.DatetimeIndex(sorted(set().union(*(set(f[timeframe]["timestamp"]) for f in self.frames.values()))))
        keep = np.ones(len(stamps), dtype=bool)
        if start is not None:
            keep &= stamps >= start
        if end is not None:
            keep &= stamps <= end
        return stamps[keep]

    def closed_by(self, until: pd.Timestamp) -> Frames:
        until_ns = int(utc_ns(pd.DatetimeIndex([until]))[0])
        return {symbol: cut_frames(frames, until_ns) for symbol, frames in self.frames.items()}


class StoreFeed:
    """Live candles: ingest each (symbol, timeframe) up to ``until`` from ``source``, validate and publish them,
    then read the validated layer (a dataset that fails validation is not traded on: its symbol goes stale)."""

    def __init__(self, source: CandleSource, catalogue: DataCatalogue, validation: ValidationConfig,
                 symbols: Sequence[str], timeframes: Sequence[Timeframe], start: pd.Timestamp) -> None:
        self.source, self.catalogue, self.validation = source, catalogue, validation
        self.symbols, self.timeframes, self.start = tuple(symbols), tuple(timeframes), start
        self.errors: list[str] = []

    def closed_by(self, until: pd.Timestamp) -> Frames:
        self.errors = []
        for symbol in self.symbols:
            for tf in self.timeframes:
                try:
                    result = ingest_dataset(self.source, self.catalogue.store, symbol, tf, self.start, until)
                    validate_and_publish(self.catalogue, result.key, self.validation)
                except Exception as exc:  # one bad dataset makes its symbol stale, not the trader stop
                    self.errors.append(f"{symbol} {tf}: {str(exc).splitlines()[0]}")
        folder = CandleFolder.open(self.catalogue.layer_dir(Layer.VALIDATED, self.source.name))
        until_ns = int(utc_ns(pd.DatetimeIndex([until]))[0])
        return {s: cut_frames(folder.read_many(s, self.timeframes), until_ns) for s in self.symbols}


def bar_ohlc(frames: Mapping[str, Mapping[Timeframe, pd.DataFrame | None]], timeframe: Timeframe,
             bar_time: pd.Timestamp) -> dict[str, tuple[float, float, float, float]]:
    """``symbol -> (open, high, low, close)`` of the bar opening at ``bar_time`` (symbols without it: absent)."""
    out = {}
    for symbol, by_tf in frames.items():
        candles = by_tf.get(timeframe)
        if candles is not None and len(candles) and candles["timestamp"].iloc[-1] == bar_time:
            last = candles.iloc[-1]
            out[symbol] = (float(last["open"]), float(last["high"]), float(last["low"]), float(last["close"]))
    return out
