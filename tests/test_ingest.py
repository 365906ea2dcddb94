from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.candles import to_canonical
from pricelevel.core.files import file_sha256
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.ingest import ingest_dataset, missing_ranges
from pricelevel.data.sources import SourceError
from pricelevel.data.sources.sample import SampleSource
from pricelevel.data.store import CandleStore, DatasetKey, Layer
from tests.conftest import real_candles

T = pd.Timestamp
H1 = Timeframe.H1


def test_missing_ranges_cover_only_what_is_not_stored() -> None:
    start, end = T("2024-01-01", tz="UTC"), T("2024-01-10", tz="UTC")
    assert missing_ranges(None, None, start, end, H1) == [(start, end)]
    first, last = T("2024-01-03", tz="UTC"), T("2024-01-05 23:00", tz="UTC")
    assert missing_ranges(first, last, start, end, H1) == [(start, first), (T("2024-01-06", tz="UTC"), end)]
    assert missing_ranges(start, end - H1.delta, start, end, H1) == []


def test_sample_ingest_twice_is_a_no_op(tmp_path: Path, sample_dir: Path) -> None:
    store, source = CandleStore(tmp_path), SampleSource(sample_dir)
    start, end = T("2024-01-01", tz="UTC"), T("2024-03-01", tz="UTC")
    first = ingest_dataset(source, store, "ETHUSDT", H1, start, end)
    assert first.changed and first.rows_after == 60 * 24
    digest = file_sha256(first.path)
    second = ingest_dataset(source, store, "ETHUSDT", H1, start, end)
    assert not second.changed and second.rows_added == 0 and second.requested == ()
    assert file_sha256(first.path) == digest


def test_extending_the_range_fetches_only_the_new_part(tmp_path: Path, sample_dir: Path) -> None:
    store, source = CandleStore(tmp_path), SampleSource(sample_dir)
    ingest_dataset(source, store, "BTCUSDT", Timeframe.D1, T("2024-02-01", tz="UTC"), T("2024-03-01", tz="UTC"))
    grown = ingest_dataset(source, store, "BTCUSDT", Timeframe.D1, T("2024-01-01", tz="UTC"), T("2024-04-01", tz="UTC"))
    assert grown.rows_before == 29 and grown.rows_after == 91
    assert grown.requested == (
        ("2024-01-01T00:00:00+00:00", "2024-02-01T00:00:00+00:00"),
        ("2024-03-01T00:00:00+00:00", "2024-04-01T00:00:00+00:00"),
    )
    whole = real_candles("BTCUSDT", "1d")
    expected = whole[(whole.timestamp >= "2024-01-01") & (whole.timestamp < "2024-04-01")]
    pd.testing.assert_frame_equal(store.read(Layer.RAW, grown.key), to_canonical(expected))


class FlakySource:
    """Yields a few real pages, then fails: the pages before the failure must be kept."""

    name = "flaky"

    def __init__(self, frame: pd.DataFrame, pages_before_failure: int, page_rows: int = 100) -> None:
        self.frame, self.pages_before_failure, self.page_rows = frame, pages_before_failure, page_rows
        self.calls: list[tuple[pd.Timestamp, pd.Timestamp]] = []

    def fetch(self, symbol: str, timeframe: Timeframe, start: pd.Timestamp, end: pd.Timestamp) -> Iterator[pd.DataFrame]:
        self.calls.append((start, end))
        part = self.frame[(self.frame.timestamp >= start) & (self.frame.timestamp < end)]
        for i, offset in enumerate(range(0, len(part), self.page_rows)):
            if i == self.pages_before_failure:
                raise SourceError("rate limited for good")
            yield to_canonical(part.iloc[offset : offset + self.page_rows])


def test_failure_keeps_what_was_fetched_and_next_run_resumes(tmp_path: Path) -> None:
    store = CandleStore(tmp_path)
    frame = real_candles(rows=1000)
    start, end = frame.timestamp.iloc[0], frame.timestamp.iloc[-1] + pd.Timedelta(hours=1)
    with pytest.raises(SourceError):
        ingest_dataset(FlakySource(frame, pages_before_failure=3), store, "BTCUSDT", H1, start, end)
    key = DatasetKey("flaky", "BTCUSDT", H1)
    assert len(store.read(Layer.RAW, key)) == 300
    resumed_source = FlakySource(frame, pages_before_failure=99)
    resumed = ingest_dataset(resumed_source, store, "BTCUSDT", H1, start, end)
    assert resumed_source.calls == [(frame.timestamp.iloc[300], end)]
    assert resumed.rows_before == 300 and resumed.rows_after == 1000
    pd.testing.assert_frame_equal(store.read(Layer.RAW, key), to_canonical(frame))


def test_unknown_sample_symbol_names_what_is_available(tmp_path: Path, sample_dir: Path) -> None:
    with pytest.raises(SourceError, match="no FOOUSDT 1h candles.*BTCUSDT_1h"):
        ingest_dataset(SampleSource(sample_dir), CandleStore(tmp_path), "FOOUSDT", H1, T("2024-01-01", tz="UTC"), T("2024-02-01", tz="UTC"))
