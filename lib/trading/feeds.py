"""Where the trader's candles come from: the candles of every timeframe the model reads, closed by a bar's
close. A replay cuts a folder of history at each bar; the live feed brings the store up to the bar through the
ingest path (the same candle sources, retries and great-expectations validation as training data) and reads
the validated layer.

The live feed never raises for a market-data problem: what went wrong is returned per (symbol, timeframe)
as a :class:`FeedProblem` (``feed.problems`` after each :meth:`StoreFeed.closed_by`), and only the symbols
concerned go without candles for that bar. A candle that fails validation is dropped from the raw layer so
that the next attempt fetches it again (exchanges correct bad candles); an exchange that does not answer
leaves the validated layer as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import ValidationConfig
from pricelevel.data.folder import CandleFolder, CandleFolderError
from pricelevel.data.ingest import forget_bad_candles, ingest_dataset
from pricelevel.data.publish import DatasetQuarantined, validate_and_publish
from pricelevel.data.sources import CandleSource, SourceError
from pricelevel.data.store import Layer
from pricelevel.data.validation import DataValidationError, ValidationReport
from pricelevel.features.lookahead import cut_frames

Frames = dict[str, dict[Timeframe, pd.DataFrame | None]]


ProblemKind = Literal["bad_data", "unavailable", "error"]


@dataclass(frozen=True)
class FeedProblem:
    """Why one (symbol, timeframe) has no fresh candles for this bar.

    ``kind``: ``"bad_data"`` the candles failed validation (the reason names the file, the rules and the rows;
    they are fetched again at the next attempt); ``"unavailable"`` the candle source did not answer (after its
    retries: an outage, a rate-limit storm, timeouts); ``"error"`` anything else (a request the source refuses
    for good, a local failure), said as it is.
    """

    symbol: str
    timeframe: Timeframe
    kind: ProblemKind
    reason: str

    def __str__(self) -> str:
        return f"{self.symbol} {self.timeframe}: {self.reason}"


class CandleFeed(Protocol):
    #: What kept candles from the last :meth:`closed_by` (empty when every dataset is fresh).
    problems: tuple[FeedProblem, ...]

    def closed_by(self, until: pd.Timestamp) -> Frames:
        """Per symbol and timeframe, the candles closed at or before ``until`` (a bar's close time)."""
        ...


class ReplayFeed:
    """History as it was: a folder's candles cut at each bar's close (nothing later is ever handed out)."""

    def __init__(self, folder: CandleFolder, symbols: Sequence[str], timeframes: Sequence[Timeframe]) -> None:
        folder.require(symbols, [timeframes[0]])
        self.frames = {symbol: folder.read_many(symbol, timeframes) for symbol in symbols}
        self.problems: tuple[FeedProblem, ...] = ()  # history as it was has none

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
    then read the validated layer.

    A symbol with a problem at this attempt (see :attr:`problems`) gets no candles for the bar (every
    timeframe ``None``), so it is not decided on; the other symbols are returned as usual. Once the source has
    failed, the datasets after it that need a new candle are not asked this time (each would wait out the
    same retries); those already up to date are still published and returned.
    """

    def __init__(self, source: CandleSource, catalogue: DataCatalogue, validation: ValidationConfig,
                 symbols: Sequence[str], timeframes: Sequence[Timeframe], start: pd.Timestamp) -> None:
        self.source, self.catalogue, self.validation = source, catalogue, validation
        self.symbols, self.timeframes, self.start = tuple(symbols), tuple(timeframes), start
        self.problems: tuple[FeedProblem, ...] = ()

    def closed_by(self, until: pd.Timestamp) -> Frames:
        problems: list[FeedProblem] = []
        source = self.source
        for symbol in self.symbols:
            for tf in self.timeframes:
                problem = self._refresh(source, symbol, Timeframe(tf), until)
                if problem is None:
                    continue
                problems.append(problem)
                if problem.kind == "unavailable" and not isinstance(source, _Unanswered):
                    source = _Unanswered(self.source.name, problem.reason)
        self.problems = tuple(problems)
        blind = {problem.symbol for problem in problems}
        until_ns = int(utc_ns(pd.DatetimeIndex([until]))[0])
        try:
            folder: CandleFolder | None = CandleFolder.open(self.catalogue.layer_dir(Layer.VALIDATED, self.source.name))
        except CandleFolderError:  # nothing validated yet (a first start while the exchange is away)
            folder = None
        return {
            symbol: {Timeframe(tf): None for tf in self.timeframes} if folder is None or symbol in blind
            else cut_frames(folder.read_many(symbol, self.timeframes), until_ns)
            for symbol in self.symbols
        }

    def _refresh(self, source: CandleSource, symbol: str, tf: Timeframe, until: pd.Timestamp) -> FeedProblem | None:
        """Bring one dataset up to ``until`` and publish it; what went wrong, or ``None``."""
        store = self.catalogue.store
        try:
            result = ingest_dataset(source, store, symbol, tf, self.start, until)
        except SourceError as exc:
            # A source that knows says whether asking again can help; otherwise the exchange is taken as away.
            kind: ProblemKind = "unavailable" if getattr(exc, "retryable", True) else "error"
            return FeedProblem(symbol, tf, kind, _one_line(exc))
        except Exception as exc:  # a local failure makes its symbol stale, not the trader stop
            return FeedProblem(symbol, tf, "error", f"{type(exc).__name__}: {_one_line(exc)}")
        try:
            validate_and_publish(self.catalogue, result.key, self.validation)
        except DataValidationError as exc:
            refetch = forget_bad_candles(store, result.key, exc.report)
            kept = exc.quarantine_path if isinstance(exc, DatasetQuarantined) else None
            return FeedProblem(symbol, tf, "bad_data", _validation_reason(exc.report, kept, refetch))
        except Exception as exc:
            return FeedProblem(symbol, tf, "error", f"{type(exc).__name__}: {_one_line(exc)}")
        return None


class _Unanswered:
    """Stands in for the source once it has failed in this attempt: a dataset that needs no new candle is
    still published, one that does fails at once with the first failure instead of waiting out the retries."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def fetch(self, symbol: str, timeframe: Timeframe, start: pd.Timestamp, end: pd.Timestamp) -> Iterator[pd.DataFrame]:
        raise SourceError(f"not asked, the candle source is unavailable: {self.reason}")


def _validation_reason(report: ValidationReport, quarantine: Path | None, refetch_from: pd.Timestamp | None) -> str:
    """One line: the file, each offending row with the rules it breaks, where the copy is, what happens next."""
    rows: dict[object, tuple[Mapping[str, Any], list[str]]] = {}
    summaries = []
    for issue in report.failures:
        for row in issue.examples:
            rows.setdefault(row.get("row"), (row, []))[1].append(issue.check or issue.title)
        if issue.unexpected_count > len(issue.examples) or not issue.examples:
            summaries.append(f"{issue.title}: {issue.summary}")
    parts = [f"candle validation failed for {report.dataset}"]
    parts += [f"row {position}: {_values(row)} breaks {', '.join(checks)}" for position, (row, checks) in rows.items()]
    parts += summaries
    if quarantine is not None:
        parts.append(f"copy kept in {quarantine}")
    if refetch_from is not None:
        parts.append(f"candles from {refetch_from.isoformat()} on are fetched again at the next attempt")
    return "; ".join(parts)


def _values(row: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k != "row")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
