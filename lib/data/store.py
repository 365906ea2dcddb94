"""The candle store: one Parquet file per (layer, source, symbol, timeframe) under ``data.root``.

Layers (each a folder under the root):

- ``raw/``        candles exactly as fetched, upserted by timestamp;
- ``validated/``  a copy of a raw dataset that passed validation: the only layer anything downstream reads;
- ``quarantine/`` raw datasets that failed validation, kept for inspection (named by content hash).

Inside each layer, ``<source>/<SYMBOL>_<TF>.parquet``: the same layout as ``data/sample``, so a layer folder
can be handed to any command that takes ``--data DIR``.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``): a kill at any moment leaves the
old file or the new one, never a torn one. An upsert holds its dataset's inter-process lock around the read,
merge and write, so two processes ingesting overlapping ranges at once end with exactly the union; dropping a
bad tail (:meth:`CandleStore.drop_from`, so that the next ingest fetches it again) holds the same lock. A write
whose bytes equal the file already there is skipped, so re-running an ingest with nothing new leaves every
file (content and mtime) untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pricelevel.core.candles import CANDLE_SCHEMA, TIMESTAMP, to_canonical
from pricelevel.core.files import atomic_write
from pricelevel.core.locks import FileLock
from pricelevel.core.timeframes import Timeframe


class Layer(StrEnum):
    RAW = "raw"
    VALIDATED = "validated"
    QUARANTINE = "quarantine"


@dataclass(frozen=True, order=True)
class DatasetKey:
    """Identifies one candle dataset."""

    source: str
    symbol: str
    timeframe: Timeframe

    @property
    def filename(self) -> str:
        return f"{self.symbol}_{self.timeframe}.parquet"

    def __str__(self) -> str:
        return f"{self.source} {self.symbol} {self.timeframe}"


@dataclass(frozen=True)
class UpsertResult:
    path: Path
    rows_before: int
    rows_after: int
    changed: bool

    @property
    def rows_added(self) -> int:
        return self.rows_after - self.rows_before


class CandleStore:
    """Reads and writes canonical candle files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, layer: Layer, key: DatasetKey) -> Path:
        return self.root / Layer(layer).value / key.source / key.filename

    def layer_dir(self, layer: Layer, source: str) -> Path:
        return self.root / Layer(layer).value / source

    def exists(self, layer: Layer, key: DatasetKey) -> bool:
        return self.path(layer, key).exists()

    def read(self, layer: Layer, key: DatasetKey) -> pd.DataFrame | None:
        path = self.path(layer, key)
        return read_candles(path) if path.exists() else None

    def upsert(self, layer: Layer, key: DatasetKey, candles: pd.DataFrame) -> UpsertResult:
        """Merge ``candles`` into the dataset by timestamp (new values win) and write it if anything changed."""
        path = self.path(layer, key)
        incoming = to_canonical(candles)
        with self.lock(layer, key):  # read-modify-write: another writer's candles are never lost
            existing = read_candles(path) if path.exists() else None
            rows_before = 0 if existing is None else len(existing)
            merged = incoming if existing is None else merge_candles(existing, incoming)
            changed = write_candles(path, merged)
        return UpsertResult(path=path, rows_before=rows_before, rows_after=len(merged), changed=changed)

    def drop_from(self, layer: Layer, key: DatasetKey, first: pd.Timestamp) -> UpsertResult:
        """Remove the candles opening at or after ``first`` (under the dataset's lock), so that the next
        incremental ingest, which resumes after the last stored candle, fetches them again."""
        path = self.path(layer, key)
        first = pd.Timestamp(first)
        first = first.tz_localize("UTC") if first.tz is None else first.tz_convert("UTC")
        with self.lock(layer, key):
            if not path.exists():
                return UpsertResult(path=path, rows_before=0, rows_after=0, changed=False)
            existing = read_candles(path)
            kept = existing.loc[pd.to_datetime(existing[TIMESTAMP], utc=True) < first]
            changed = len(kept) < len(existing) and write_candles(path, kept)
        return UpsertResult(path=path, rows_before=len(existing), rows_after=len(kept), changed=changed)

    def lock(self, layer: Layer, key: DatasetKey) -> FileLock:
        """The inter-process lock of one dataset of one layer (``<root>/.locks/<layer>/<source>/<S>_<TF>.lock``)."""
        return FileLock(self.root / ".locks" / Layer(layer).value / key.source / f"{key.filename.removesuffix('.parquet')}.lock")

    def datasets(self, layer: Layer) -> Iterator[DatasetKey]:
        """Every dataset present in ``layer``, sorted."""
        base = self.root / Layer(layer).value
        keys = []
        for path in base.glob("*/*.parquet"):
            parsed = parse_dataset_filename(path.name)
            if parsed is not None:
                keys.append(DatasetKey(path.parent.name, *parsed))
        yield from sorted(keys)


_DATASET_FILENAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)_(?P<timeframe>[0-9]+[a-z]+)\.parquet$")


def parse_dataset_filename(path: str | Path) -> tuple[str, Timeframe] | None:
    """``.../BTCUSDT_1h.parquet`` -> ``("BTCUSDT", Timeframe.H1)``; ``None`` for any other name."""
    match = _DATASET_FILENAME.match(Path(path).name)
    if not match:
        return None
    try:
        return match["symbol"], Timeframe(match["timeframe"])
    except ValueError:
        return None


def merge_candles(existing: pd.DataFrame, incoming: pd.DataFrame) -> pd.DataFrame:
    """Union by timestamp; where both have a candle, the incoming one wins (a re-fetch corrects)."""
    both = pd.concat([existing, incoming], ignore_index=True)
    both = both.drop_duplicates(subset=TIMESTAMP, keep="last")
    return both.sort_values(TIMESTAMP, kind="stable").reset_index(drop=True)


def read_candles(path: Path) -> pd.DataFrame:
    """Read a candle file without reshaping it (validation must see the file as it is). Through one open handle:
    pyarrow given a path looks it up twice (its size, then its pages), and another process's atomic replace in
    between made it read the new file's pages with the old size ("Page was smaller than expected", seen in
    tests/test_concurrency.py); a handle pins one version of the file."""
    with open(path, "rb") as handle:
        return pd.read_parquet(handle)


def candles_to_table(candles: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(to_canonical(candles), schema=CANDLE_SCHEMA, preserve_index=False)


def write_candles(path: Path, candles: pd.DataFrame) -> bool:
    """Atomically write ``candles`` to ``path``; return False (and touch nothing) if the bytes are unchanged."""
    table = candles_to_table(candles)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
