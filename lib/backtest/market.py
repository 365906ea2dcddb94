"""Frames in, aligned arrays out: the one place where candles and signals of many symbols meet one clock.

Candles are a long frame ``timestamp, open, high, low, close[, volume][, symbol]``; signals are
``timestamp, entry, exit[, symbol]`` (booleans) or ``timestamp, probability[, symbol]``. All symbols are put
on the union of their timestamps: a symbol without a candle at some time has NaN there (the engine neither
trades nor stops it on that bar and values it at its last close). A bar with no signal row has no signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricelevel.core.candles import PRICE_COLUMNS
from pricelevel.core.timeframes import Timeframe
from pricelevel.strategy.signals import signals_from_probability

#: Symbol given to candles and signals without a ``symbol`` column.
DEFAULT_SYMBOL = "ASSET"


class MarketDataError(ValueError):
    """Candles or signals that cannot be backtested as given; ``str()`` says which and why."""


@dataclass(frozen=True)
class Market:
    """Candles of one or many symbols on one shared time axis, as ``(bars, symbols)`` arrays."""

    timestamps: pd.DatetimeIndex
    symbols: tuple[str, ...]
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    timeframe: Timeframe

    @property
    def n_bars(self) -> int:
        return len(self.timestamps)


def _utc_timestamps(values: pd.Series, what: str) -> pd.Series:
    try:
        ts = pd.to_datetime(values, utc=True)
    except (ValueError, TypeError) as exc:
        raise MarketDataError(f"{what}: column 'timestamp' is not a time: {exc}") from None
    return ts.astype("datetime64[ns, UTC]")


def _with_symbol(frame: pd.DataFrame, symbol: str | None) -> pd.DataFrame:
    if "symbol" in frame.columns:
        return frame
    return frame.assign(symbol=symbol or DEFAULT_SYMBOL)


def infer_timeframe(timestamps: pd.DatetimeIndex, symbols: pd.Series | None = None) -> Timeframe:
    """The candle length: the most common spacing between consecutive candles of a symbol."""
    if symbols is None:
        steps = np.diff(timestamps.asi8)
    else:
        frame = pd.DataFrame({"t": timestamps.asi8, "s": symbols.to_numpy()})
        steps = frame.groupby("s")["t"].diff().dropna().to_numpy(dtype=np.int64)
    if len(steps) == 0:
        raise MarketDataError("need at least two candles of a symbol to infer the timeframe (or set backtest.timeframe)")
    values, counts = np.unique(steps, return_counts=True)
    step = int(values[np.argmax(counts)])
    for tf in Timeframe:
        if tf.nanoseconds == step:
            return tf
    raise MarketDataError(
        f"candles are {pd.Timedelta(step)} apart, which is none of {', '.join(tf.value for tf in Timeframe)}; "
        "set backtest.timeframe"
    )


def market_from_candles(
    candles: pd.DataFrame, symbol: str | None = None, timeframe: Timeframe | None = None
) -> Market:
    """Align a long candle frame (one or many symbols) into a :class:`Market`."""
    missing = [c for c in ("timestamp", *PRICE_COLUMNS) if c not in candles.columns]
    if missing:
        raise MarketDataError(f"candles: missing column(s) {', '.join(missing)} (have {', '.join(map(str, candles.columns))})")
    frame = _with_symbol(candles, symbol)[["timestamp", "symbol", *PRICE_COLUMNS]].copy()
    frame["timestamp"] = _utc_timestamps(frame["timestamp"], "candles")
    frame["symbol"] = frame["symbol"].astype(str)
    dupes = frame.duplicated(["symbol", "timestamp"], keep=False)
    if dupes.any():
        first = frame.loc[dupes].iloc[0]
        raise MarketDataError(
            f"candles: {int(dupes.sum())} rows share a (symbol, timestamp), e.g. {first['symbol']} {first['timestamp']}"
        )
    if frame.empty:
        raise MarketDataError("candles: no rows")
    prices = frame[list(PRICE_COLUMNS)].to_numpy(dtype=np.float64)
    if not np.isfinite(prices).all() or (prices <= 0).any():
        raise MarketDataError("candles: prices must be finite and > 0 (validate the file first)")
    frame = frame.sort_values(["symbol", "timestamp"], kind="stable")
    tf = timeframe or infer_timeframe(pd.DatetimeIndex(frame["timestamp"]), frame["symbol"])
    wide = frame.pivot(index="timestamp", columns="symbol", values=list(PRICE_COLUMNS)).sort_index()
    symbols = tuple(sorted(frame["symbol"].unique()))

    def block(column: str) -> np.ndarray:
        return np.ascontiguousarray(wide[column].reindex(columns=list(symbols)).to_numpy(dtype=np.float64))

    return Market(
        timestamps=pd.DatetimeIndex(wide.index), symbols=symbols,
        open=block("open"), high=block("high"), low=block("low"), close=block("close"), timeframe=tf,
    )


def align_signals(
    market: Market,
    signals: pd.DataFrame,
    threshold: float = 0.5,
    exit_threshold: float | None = None,
    symbol: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(bars, symbols)`` entries and exits for ``market`` from a signal frame.

    Signal rows must fall on candle timestamps of a known symbol: a signal for a bar that does not exist
    is an error rather than silently dropped.
    """
    if "timestamp" not in signals.columns:
        raise MarketDataError("signals: missing column 'timestamp'")
    frame = _with_symbol(signals, symbol if symbol is not None else (market.symbols[0] if len(market.symbols) == 1 else None)).copy()
    frame["timestamp"] = _utc_timestamps(frame["timestamp"], "signals")
    frame["symbol"] = frame["symbol"].astype(str)
    if {"entry", "exit"} <= set(frame.columns):
        entry = _as_bool(frame["entry"], "entry")
        exit_ = _as_bool(frame["exit"], "exit")
    elif "probability" in frame.columns:
        entry, exit_ = signals_from_probability(frame["probability"].to_numpy(dtype=np.float64), threshold, exit_threshold)
    else:
        raise MarketDataError("signals: need columns 'entry' and 'exit' (booleans) or 'probability'")
    if frame.duplicated(["symbol", "timestamp"]).any():
        raise MarketDataError("signals: more than one row for a (symbol, timestamp)")
    col = pd.Index(market.symbols).get_indexer(frame["symbol"])
    row = market.timestamps.get_indexer(pd.DatetimeIndex(frame["timestamp"]))
    unknown = (col < 0) | (row < 0)
    if unknown.any():
        bad = frame.loc[unknown].iloc[0]
        raise MarketDataError(
            f"signals: {int(unknown.sum())} row(s) match no candle, e.g. {bad['symbol']} at {bad['timestamp']} "
            f"(candle symbols: {', '.join(market.symbols)})"
        )
    entries = np.zeros(market.close.shape, dtype=bool)
    exits = np.zeros(market.close.shape, dtype=bool)
    entries[row, col] = entry
    exits[row, col] = exit_
    return entries, exits


def _as_bool(column: pd.Series, name: str) -> np.ndarray:
    if column.isna().any():
        raise MarketDataError(f"signals: column '{name}' has missing values")
    if column.dtype == bool:
        return column.to_numpy()
    values = column.to_numpy()
    if np.isin(values, (0, 1)).all():
        return values.astype(bool)
    raise MarketDataError(f"signals: column '{name}' must be boolean (or 0/1), got {column.dtype}")
