"""The canonical candle frame: its columns, dtypes and the one function that produces it."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

TIMESTAMP = "timestamp"
PRICE_COLUMNS = ("open", "high", "low", "close")
CANDLE_COLUMNS = (TIMESTAMP, *PRICE_COLUMNS, "volume", "turnover")
REQUIRED_COLUMNS = CANDLE_COLUMNS[:-1]  # turnover is nullable and may be absent in a source

#: Arrow schema of every stored candle file. ``timestamp`` is the candle *open* time in UTC.
CANDLE_SCHEMA = pa.schema(
    [pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC"), nullable=False)]
    + [pa.field(c, pa.float64(), nullable=False) for c in (*PRICE_COLUMNS, "volume")]
    + [pa.field("turnover", pa.float64(), nullable=True)]
)


def to_canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with exactly the canonical columns and dtypes, sorted by timestamp.

    Values are not checked here (validation does that); only the shape is made uniform so that two
    frames with the same candles compare and serialise identically.
    """
    out = pd.DataFrame(index=range(len(frame)))
    ts = pd.to_datetime(frame[TIMESTAMP].to_numpy(), utc=True)
    out[TIMESTAMP] = pd.DatetimeIndex(ts).as_unit("ns")
    for col in (*PRICE_COLUMNS, "volume"):
        out[col] = pd.to_numeric(frame[col].to_numpy(), errors="coerce").astype("float64")
    turnover = frame["turnover"] if "turnover" in frame.columns else None
    out["turnover"] = (
        pd.to_numeric(turnover.to_numpy(), errors="coerce").astype("float64")
        if turnover is not None
        else float("nan")
    )
    return out.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True)


def empty_candles() -> pd.DataFrame:
    return CANDLE_SCHEMA.empty_table().to_pandas()
