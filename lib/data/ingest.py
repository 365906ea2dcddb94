"""Incremental ingest of one dataset: fetch only what the store lacks, store each page as it arrives; and
forget candles that failed validation, so that the next ingest asks the source for them again."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pricelevel.core.candles import TIMESTAMP
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import DataConfig
from pricelevel.data.sources import CandleSource
from pricelevel.data.store import CandleStore, DatasetKey, Layer
from pricelevel.data.validation import ValidationReport

if TYPE_CHECKING:
    from pricelevel.data.publish import PublishOutcome

#: Buffered rows written together; bounds both memory and the number of whole-file rewrites.
FLUSH_ROWS = 50_000


@dataclass(frozen=True)
class IngestResult:
    key: DatasetKey
    path: Path
    rows_before: int
    rows_after: int
    changed: bool
    requested: tuple[tuple[str, str], ...] = field(default=())

    @property
    def rows_added(self) -> int:
        return self.rows_after - self.rows_before

    def describe(self) -> str:
        return f"{self.key}: {self.rows_added} new candles ({self.rows_before} -> {self.rows_after}) in {self.path}"


def ingest_window(data: DataConfig, now: pd.Timestamp | None = None) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``[start, end)`` of one ingest run: ``data.end``, or the clock read once (``now``), so that every
    dataset of the run ends at the same candle."""
    end = pd.Timestamp(data.end) if data.end else (now if now is not None else pd.Timestamp.now(tz="UTC"))
    return pd.Timestamp(data.start), end


def outcome_row(dataset: str, outcome: PublishOutcome | None, failure: str | None = None) -> dict[str, object]:
    """One row of the ingest summary (the Prefect table artifact and ``pricelevel ingest``)."""
    if outcome is None:
        return {"dataset": dataset, "status": "failed", "rows": None, "warnings": None, "validated": None, "report": failure}
    return {
        "dataset": dataset, "status": outcome.status, "rows": outcome.rows, "warnings": len(outcome.warnings),
        "validated": str(outcome.validated_path), "report": str(outcome.report_markdown),
    }


def missing_ranges(
    stored_first: pd.Timestamp | None,
    stored_last: pd.Timestamp | None,
    start: pd.Timestamp,
    end: pd.Timestamp,
    timeframe: Timeframe,
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The half-open ranges of ``[start, end)`` not covered by the stored span (before it, after it).

    Holes *inside* the stored span are exchange outages already asked for once; refetching them every
    hour would cost a full history download for nothing.
    """
    if stored_first is None or stored_last is None:
        return [(start, end)] if start < end else []
    ranges = []
    if start < stored_first:
        ranges.append((start, min(stored_first, end)))
    resume = max(start, stored_last + timeframe.delta)
    if resume < end:
        ranges.append((resume, end))
    return ranges


def ingest_dataset(
    source: CandleSource,
    store: CandleStore,
    symbol: str,
    timeframe: Timeframe,
    start: pd.Timestamp,
    end: pd.Timestamp,
) -> IngestResult:
    """Bring the raw dataset of (source, symbol, timeframe) up to ``[start, end)``.

    Pages are flushed to the store as they accumulate and again if the source fails, so a failure keeps
    what was fetched and the next run resumes after the last stored candle. Re-running with nothing new
    writes nothing.
    """
    key = DatasetKey(source.name, symbol, Timeframe(timeframe))
    existing = store.read(Layer.RAW, key)
    rows_before = 0 if existing is None or existing.empty else len(existing)
    first = last = None
    if rows_before:
        stamps = pd.to_datetime(existing[TIMESTAMP], utc=True)
        first, last = stamps.min(), stamps.max()
    ranges = missing_ranges(first, last, start, end, key.timeframe)

    changed = False
    rows_after = rows_before
    buffer: list[pd.DataFrame] = []

    def flush() -> None:
        nonlocal changed, rows_after
        if buffer:
            result = store.upsert(Layer.RAW, key, pd.concat(buffer, ignore_index=True))
            changed, rows_after = changed or result.changed, result.rows_after
            buffer.clear()

    try:
        for range_start, range_end in ranges:
            for page in source.fetch(symbol, key.timeframe, range_start, range_end):
                buffer.append(page)
                if sum(len(p) for p in buffer) >= FLUSH_ROWS:
                    flush()
    finally:
        flush()

    return IngestResult(
        key=key,
        path=store.path(Layer.RAW, key),
        rows_before=rows_before,
        rows_after=rows_after,
        changed=changed,
        requested=tuple((f"{s.isoformat()}", f"{e.isoformat()}") for s, e in ranges),
    )


def first_bad_candle(report: ValidationReport) -> pd.Timestamp | None:
    """The earliest open time among the candles whose values break a rule (nulls, non-finite or non-positive
    numbers, OHLC order), or ``None`` when no failure is about a candle's values (schema, gaps, grid: asking
    the source again would not change those). Each rule lists its first offending rows in file order, so the
    earliest of them is the first bad candle."""
    stamps = [
        pd.Timestamp(row[TIMESTAMP])
        for issue in report.failures
        if issue.column not in (None, TIMESTAMP)
        for row in issue.examples
        if row.get(TIMESTAMP) is not None
    ]
    return min(stamps) if stamps else None


def forget_bad_candles(store: CandleStore, key: DatasetKey, report: ValidationReport) -> pd.Timestamp | None:
    """Drop the raw candles of ``key`` from the first one ``report`` found bad onwards, under the dataset's
    lock, so that the next :func:`ingest_dataset` (which resumes after the last stored candle) fetches them
    again: exchanges correct bad candles. Returns where the refetch will start, or ``None`` when the failure
    is not about candle values (nothing is dropped)."""
    first = first_bad_candle(report)
    if first is not None:
        store.drop_from(Layer.RAW, key, first)
    return first
