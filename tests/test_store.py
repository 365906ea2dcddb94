from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.candles import CANDLE_COLUMNS, to_canonical
from pricelevel.core.files import file_sha256
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.store import CandleStore, DatasetKey, Layer, parse_dataset_filename, write_candles
from tests.conftest import real_candles

KEY = DatasetKey("sample", "BTCUSDT", Timeframe.H1)


def test_upsert_creates_canonical_file(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    result = store.upsert(Layer.RAW, KEY, real_candles(rows=100))
    assert result.changed and result.rows_added == 100
    assert result.path == tmp_path / "raw" / "sample" / "BTCUSDT_1h.parquet"
    assert result.path.stat().st_mode & 0o777 == 0o644  # readable by others, like any file open() makes
    back = store.read(Layer.RAW, KEY)
    assert list(back.columns) == list(CANDLE_COLUMNS)
    assert str(back["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert back["turnover"].isna().all()
    pd.testing.assert_frame_equal(back, to_canonical(real_candles(rows=100)))


def test_reingesting_same_range_is_byte_identical_and_untouched(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    store.upsert(Layer.RAW, KEY, real_candles(rows=500))
    path = store.path(Layer.RAW, KEY)
    digest, mtime = file_sha256(path), path.stat().st_mtime_ns
    time.sleep(0.01)
    again = store.upsert(Layer.RAW, KEY, real_candles(rows=500).iloc[100:300])
    assert not again.changed and again.rows_added == 0
    assert file_sha256(path) == digest and path.stat().st_mtime_ns == mtime


def test_overlapping_ranges_merge_without_duplicates(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    full = real_candles(rows=1000)
    store.upsert(Layer.RAW, KEY, full.iloc[:600])
    store.upsert(Layer.RAW, KEY, full.iloc[400:])
    merged = store.read(Layer.RAW, KEY)
    assert len(merged) == 1000 and merged["timestamp"].is_unique and merged["timestamp"].is_monotonic_increasing
    # Same content as writing everything at once, byte for byte.
    other = CandleStore(tmp_path / "other")
    other.upsert(Layer.RAW, KEY, full)
    assert file_sha256(other.path(Layer.RAW, KEY)) == file_sha256(store.path(Layer.RAW, KEY))


def test_upsert_newer_values_win(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    frame = real_candles(rows=10)
    store.upsert(Layer.RAW, KEY, frame)
    corrected = frame.iloc[[5]].copy()
    corrected["close"] = corrected["close"] + 1.0
    store.upsert(Layer.RAW, KEY, corrected)
    back = store.read(Layer.RAW, KEY)
    assert len(back) == 10 and back.loc[5, "close"] == frame.loc[5, "close"] + 1.0


def test_unsorted_input_is_stored_sorted(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    store.upsert(Layer.RAW, KEY, real_candles(rows=50).iloc[::-1])
    assert store.read(Layer.RAW, KEY)["timestamp"].is_monotonic_increasing


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CandleStore(tmp_path)
    store.upsert(Layer.RAW, KEY, real_candles(rows=100))
    path = store.path(Layer.RAW, KEY)
    digest = file_sha256(path)

    def broken_write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr("pricelevel.data.store.pq.write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        store.upsert(Layer.RAW, KEY, real_candles(rows=200))
    assert file_sha256(path) == digest
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _write_forever(path: str) -> None:
    frames = [real_candles(rows=n) for n in (2000, 3000)]
    i = 0
    while True:
        write_candles(Path(path), frames[i % 2])
        i += 1


def test_kill_during_writes_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites the file in a loop: what remains is always one whole version."""
    path = tmp_path / "BTCUSDT_1h.parquet"
    write_candles(path, real_candles(rows=2000))
    ctx = multiprocessing.get_context("fork")
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = ctx.Process(target=_write_forever, args=(str(path),))
        proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert len(pd.read_parquet(path)) in (2000, 3000)


def test_datasets_lists_layer(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    store.upsert(Layer.RAW, KEY, real_candles(rows=5))
    other = DatasetKey("sample", "ETHUSDT", Timeframe.D1)
    store.upsert(Layer.RAW, other, real_candles("ETHUSDT", "1d", rows=5))
    assert list(store.datasets(Layer.RAW)) == [KEY, other]
    assert list(store.datasets(Layer.VALIDATED)) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [("BTCUSDT_1h.parquet", ("BTCUSDT", Timeframe.H1)), ("ETHUSDT_15m.parquet", ("ETHUSDT", Timeframe.M15)),
     ("BTCUSDT_2h.parquet", None), ("notes.md", None), ("BTCUSDT_1h.abc123.parquet", None)],
)
def test_parse_dataset_filename(name: str, expected) -> None:
    assert parse_dataset_filename(name) == expected
