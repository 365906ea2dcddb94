"""The file edge of the backtest: read candle and signal Parquet files, write the JSON result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import MarketDataError, align_signals, market_from_candles
from pricelevel.backtest.metrics import BacktestMetrics, compute_metrics
from pricelevel.backtest.run import BacktestResult, run_backtest
from pricelevel.core.files import atomic_write
from pricelevel.data.store import parse_dataset_filename


def read_frame(path: Path, what: str) -> pd.DataFrame:
    """A Parquet file as a frame; a file without a ``symbol`` column named ``SYMBOL_TF.parquet`` gets one."""
    path = Path(path)
    if not path.is_file():
        raise MarketDataError(f"{what} {path}: no such file")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for non-Parquet input
        raise MarketDataError(f"{what} {path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    if "symbol" not in frame.columns and (parsed := parse_dataset_filename(path)) is not None:
        frame = frame.assign(symbol=parsed[0])
    return frame


def result_document(result: BacktestResult, metrics: BacktestMetrics) -> dict[str, object]:
    """Everything a reader needs to trust the numbers: inputs, rules, metrics, and every trade."""
    market = result.market
    trades = result.trades
    rows = trades.assign(
        entry_time=trades["entry_time"].map(pd.Timestamp.isoformat),
        exit_time=trades["exit_time"].map(pd.Timestamp.isoformat),
        fees=trades["entry_fees"] + trades["exit_fees"],
    )
    columns = ["symbol", "entry_time", "exit_time", "entry_price", "exit_price", "size", "pnl", "return",
               "exit_reason", "fees"]
    trade_rows = rows[columns].to_dict("records")
    return {
        "period": {
            "start": market.timestamps[0].isoformat() if market.n_bars else None,
            "end": market.timestamps[-1].isoformat() if market.n_bars else None,
            "bars": market.n_bars,
            "timeframe": str(market.timeframe),
            "symbols": list(market.symbols),
        },
        "config": result.config.model_dump(mode="json"),
        "metrics": metrics.to_json_dict(),
        "rejected_entries": result.rejected,
        "refused_entries": result.refused,  # by the account protections (backtest.protections)
        "trades": trade_rows,
    }


def write_result_json(result: BacktestResult, metrics: BacktestMetrics, path: Path) -> Path:
    document = result_document(result, metrics)
    text = json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
    return Path(path)


def _json_default(value: object) -> object:
    if value is pd.NaT:  # e.g. the holding time of a symbol that never traded
        return None
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def backtest_files(candles: Path, signals: Path, config: BacktestConfig) -> tuple[BacktestResult, BacktestMetrics]:
    """Backtest a signal file on a candle file with ``config`` (``pricelevel backtest --candles --signals``)."""
    market = market_from_candles(read_frame(candles, "candles"), timeframe=config.timeframe)
    entries, exits = align_signals(market, read_frame(signals, "signals"), config.threshold, config.exit_threshold)
    result = run_backtest(market, entries, exits, config)
    return result, compute_metrics(result)
