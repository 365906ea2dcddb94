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

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from pricelevel.core.candles import CANDLE_COLUMNS, PRICE_COLUMNS
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
from pricelevel.trading.streams import PushedCandle, StreamDown, StreamEvent, StreamUp

Frames = dict[str, dict[Timeframe, pd.DataFrame | None]]


ProblemKind = Literal["bad_data", "unavailable", "error", "stream"]


@dataclass(frozen=True)
class FeedProblem:
    """Why one (symbol, timeframe) has no fresh candles for this bar.

    ``kind``: ``"bad_data"`` the candles failed validation (the reason names the file, the rules and the rows;
    they are fetched again at the next attempt); ``"unavailable"`` the candle source did not answer (after its
    retries: an outage, a rate-limit storm, timeouts); ``"error"`` anything else (a request the source refuses
    for good, a local failure), said as it is; ``"stream"`` (a :class:`StreamFeed` only) the kline stream did not
    bring this candle (down, silent, or late): it was fetched over REST instead, and only a REST problem beside
    it keeps the symbol from being decided.
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
        problems = self.refresh([(symbol, Timeframe(tf)) for symbol in self.symbols for tf in self.timeframes], until)
        self.problems = tuple(problems)
        blind = {problem.symbol for problem in problems}
        until_ns = int(utc_ns(pd.DatetimeIndex([until]))[0])
        return {
            symbol: {Timeframe(tf): None for tf in self.timeframes} if symbol in blind
            or (validated := self.read_validated(symbol, self.timeframes)) is None
            else cut_frames(validated, until_ns)
            for symbol in self.symbols
        }

    def refresh(self, datasets: Sequence[tuple[str, Timeframe]], until: pd.Timestamp) -> list[FeedProblem]:
        """Ingest, validate and publish each (symbol, timeframe) up to ``until``; what went wrong, in order.
        Once the source has failed, the datasets after it are not asked this time (see the class)."""
        problems: list[FeedProblem] = []
        source = self.source
        for symbol, tf in datasets:
            problem = self._refresh(source, symbol, Timeframe(tf), until)
            if problem is None:
                continue
            problems.append(problem)
            if problem.kind == "unavailable" and not isinstance(source, _Unanswered):
                source = _Unanswered(self.source.name, problem.reason)
        return problems

    def read_validated(self, symbol: str, timeframes: Sequence[Timeframe]) -> dict[Timeframe, pd.DataFrame | None] | None:
        """The validated layer's candles of ``symbol``; ``None`` while nothing is validated yet (a first start
        while the exchange is away)."""
        try:
            folder = CandleFolder.open(self.catalogue.layer_dir(Layer.VALIDATED, self.source.name))
        except CandleFolderError:
            return None
        return folder.read_many(symbol, timeframes)

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


Dataset = tuple[str, Timeframe]


class StreamFeed:
    """Live candles as the exchange pushes them (:class:`~pricelevel.trading.streams.KlineStream` hands its
    events to :meth:`deliver`, from any thread), each checked alone against the store's rules
    (:func:`candle_faults`) and appended to an in-memory frame per (symbol, timeframe); ``rest`` (the
    :class:`StoreFeed`: the ingest path, great-expectations validation, the validated layer) seeds those frames
    at the first :meth:`closed_by` and fills in whatever the stream could not give.

    :meth:`closed_by` waits up to ``wait_s`` for the candles closing at ``until`` to be pushed; then fetches
    over REST, before anything is decided, every dataset that (a) is not seeded yet, (b) may have missed a
    candle while the stream was down (one with a candle closing between the last message heard before a
    disconnect, less ``margin_s``, and the reconnect), (c) has a gap (a pushed candle that does not follow the
    last one), (d) had a pushed candle refused, or (e) still lacks the candle closing at ``until``. A stream
    down, or one that has pushed nothing for longer than the smallest timeframe (plus ``margin_s``), is not
    waited for. :attr:`problems` names what the stream did not bring (``"stream"``), every refused candle
    (``"bad_data"``) and every REST problem; only the symbols with a REST problem go without candles.
    A candle that is not ``confirm``-ed (its bar still open) is never used.
    """

    def __init__(self, rest: StoreFeed, *, wait_s: float = 5.0, margin_s: float = 60.0,
                 now: Callable[[], float] = time.time, stopping: threading.Event | None = None) -> None:
        self.rest, self.wait_s, self.margin_s, self.now = rest, wait_s, margin_s, now
        self.stopping = stopping or threading.Event()
        self.symbols, self.timeframes = rest.symbols, tuple(Timeframe(tf) for tf in rest.timeframes)
        self.datasets: tuple[Dataset, ...] = tuple((s, tf) for s in self.symbols for tf in self.timeframes)
        self.silent_after_s = min(tf.delta.total_seconds() for tf in self.timeframes) + margin_s
        self.problems: tuple[FeedProblem, ...] = ()
        #: Datasets fetched over REST at the last :meth:`closed_by` (empty when the stream brought everything).
        self.fetched: tuple[Dataset, ...] = ()
        #: Seconds the last :meth:`closed_by` spent on each part: ``wait`` (for pushes), ``append`` (checking and
        #: appending pushed candles), ``rest`` (fetching and validating over REST), ``cut`` (the frames handed out).
        self.timings: dict[str, float] = {}
        self._append_s = 0.0
        self._events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        self._series: dict[Dataset, CandleSeries | None] = dict.fromkeys(self.datasets)
        self._pending: dict[Dataset, dict[int, PushedCandle]] = {key: {} for key in self.datasets}  # by open ns
        self._stale: dict[Dataset, str] = dict.fromkeys(self.datasets, "not seeded yet")  # why REST is needed
        self._refused: list[FeedProblem] = []
        self._down: StreamDown | None = StreamDown(None, "not connected yet")
        self._heard: float | None = None  # wall-clock second of the last event (a candle or an open)

    def deliver(self, event: StreamEvent) -> None:
        """The stream's ``deliver``: called on the stream's thread, so it only queues."""
        self._events.put(event)

    # -------------------------------------------------------------------------------------- the trader's

    def closed_by(self, until: pd.Timestamp) -> Frames:
        until = pd.Timestamp(until)
        started, self._append_s = time.perf_counter(), 0.0
        self._drain()
        deadline = time.monotonic() + self.wait_s
        due = self._due(until)
        while self._listening() and self._awaited(due) and not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._apply(self._events.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                continue
            self._drain()
        listened = time.perf_counter()
        problems: list[FeedProblem] = []
        why = self._why_not_listening()
        for key in self._awaited(due):
            self._stale[key] = why or f"no closed candle pushed within {self.wait_s:g} s of {until.isoformat()}"
        need = [key for key in self.datasets if key in self._stale]
        problems += [FeedProblem(s, tf, "stream", f"{self._stale[(s, tf)]}; fetched over REST") for s, tf in need]
        problems += self._refused
        self._refused = []
        rest_problems = self.rest.refresh(need, until) if need else []
        failed = {(p.symbol, p.timeframe) for p in rest_problems}
        for symbol in {s for s, _ in need}:
            fetched = [tf for s, tf in need if s == symbol and (s, tf) not in failed]
            validated = self.rest.read_validated(symbol, fetched) if fetched else None
            for tf in fetched:
                frame = validated.get(tf) if validated is not None else None
                if frame is not None:
                    self._series[(symbol, tf)] = CandleSeries(frame)
                    del self._stale[(symbol, tf)]
                    self._absorb((symbol, tf))
        self.fetched = tuple(need)
        self.problems = tuple(problems + rest_problems)
        blind = {p.symbol for p in rest_problems}
        until_ns = int(utc_ns(pd.DatetimeIndex([until]))[0])
        fetched = time.perf_counter()
        frames = {
            symbol: {tf: None for tf in self.timeframes} if symbol in blind
            else {tf: _closed_by(self._series[(symbol, tf)], tf, until_ns) for tf in self.timeframes}
            for symbol in self.symbols
        }
        append = self._append_s  # REST's absorbing of pending candles is counted in "rest"
        self.timings = {"wait": listened - started - append, "append": append, "rest": fetched - listened,
                        "cut": time.perf_counter() - fetched}
        return frames

    # ------------------------------------------------------------------------------------------ events

    def _drain(self) -> None:
        while True:
            try:
                self._apply(self._events.get_nowait())
            except queue.Empty:
                return

    def _apply(self, event: StreamEvent) -> None:
        started = time.perf_counter()
        self._on(event)
        self._append_s += time.perf_counter() - started

    def _on(self, event: StreamEvent) -> None:
        if isinstance(event, StreamDown):
            if self._down is None:  # the first word of an outage keeps the earliest "last heard"
                self._down = event
        elif isinstance(event, StreamUp):
            down, self._down, self._heard = self._down, None, event.at
            if down is not None and down.since is not None:
                self._mark_missed(down.since - self.margin_s, event.at, f"stream down from "
                                  f"{_stamp(down.since)} to {_stamp(event.at)} ({down.reason})")
        elif isinstance(event, PushedCandle):
            self._heard = max(self._heard or event.received, event.received)
            self._take(event)

    def _mark_missed(self, since: float, until: float, reason: str) -> None:
        """Every dataset with a candle closing between ``since`` and ``until`` (wall-clock seconds)."""
        for key in self.datasets:
            step = key[1].nanoseconds
            last_close = int(until * 1e9) // step * step
            if last_close >= since * 1e9:
                self._stale.setdefault(key, reason)

    def _take(self, candle: PushedCandle) -> None:
        key = (candle.symbol, candle.timeframe)
        if not candle.confirmed or key not in self._pending:
            return
        faults = candle_faults(candle.timestamp, candle.values, candle.timeframe)
        if faults:
            values = " ".join(f"{k}={v:g}" for k, v in candle.values.items())
            self._refused.append(FeedProblem(candle.symbol, candle.timeframe, "bad_data",
                                             f"pushed candle {candle.timestamp.isoformat()} refused: {values} "
                                             f"breaks {', '.join(faults)}"))
            self._stale.setdefault(key, f"pushed candle {candle.timestamp.isoformat()} refused")
            return
        self._pending[key][candle.timestamp.value] = candle
        self._absorb(key)

    def _absorb(self, key: Dataset) -> None:
        """Append the pending candles that follow the series' last one; a hole before one is a gap."""
        series, pending = self._series[key], self._pending[key]
        if series is None or not pending:
            return
        step = key[1].nanoseconds
        last = series.last_ns
        for stamp in sorted(pending):
            if last is not None and stamp <= last:
                del pending[stamp]
            elif last is None or stamp == last + step:
                series.append(stamp, pending.pop(stamp).values)
                last = stamp
            else:
                self._stale.setdefault(key, f"candles missing from {_iso(last + step)} to {_iso(stamp - step)} "
                                            "(a gap in the stream)")
                break

    # ------------------------------------------------------------------------------------------- state

    def _due(self, until: pd.Timestamp) -> dict[Timeframe, int]:
        """Per timeframe, the open (UTC ns) of the newest candle closed by ``until``."""
        until_ns = pd.Timestamp(until).value
        return {tf: until_ns // tf.nanoseconds * tf.nanoseconds - tf.nanoseconds for tf in self.timeframes}

    def _awaited(self, due: Mapping[Timeframe, int]) -> list[Dataset]:
        """Datasets without the candle closing at or before ``until`` (``due``: :meth:`_due`) that waiting could
        still bring."""
        out = []
        for key in self.datasets:
            if key in self._stale:
                continue
            series = self._series[key]
            last = series.last_ns if series is not None else None
            if last is None or last < due[key[1]]:
                out.append(key)
        return out

    def _listening(self) -> bool:
        return self._why_not_listening() is None

    def _why_not_listening(self) -> str | None:
        if self._down is not None:
            since = f" (last heard {_stamp(self._down.since)})" if self._down.since is not None else ""
            return f"kline stream down: {self._down.reason}{since}"
        if self._heard is not None and self.now() - self._heard > self.silent_after_s:
            return f"kline stream silent for {self.now() - self._heard:.0f} s (more than {self.silent_after_s:.0f} s)"
        return None


class CandleSeries:
    """One dataset's candles in column buffers that grow by doubling: appending a pushed candle costs a few
    stores (a DataFrame concatenation per candle cost ~8 ms), and :meth:`frame` is the canonical candle frame
    (:func:`~pricelevel.core.candles.to_canonical`'s columns and dtypes) viewing the filled rows, made once per
    change. Rows are only ever added, so a frame handed out earlier keeps the rows it had, in the same memory
    (the feature builder then recognises them without comparing them: ``incremental._same``); a frame handed
    out must not be written to."""

    VALUES = CANDLE_COLUMNS[1:]

    def __init__(self, frame: pd.DataFrame) -> None:
        size = len(frame)
        capacity = max(64, 2 * size)
        self._ns = np.empty(capacity, dtype=np.int64)
        self._ns[:size] = utc_ns(frame["timestamp"])
        self._values = {}
        for column in self.VALUES:
            self._values[column] = np.empty(capacity, dtype=np.float64)
            self._values[column][:size] = frame[column].to_numpy(dtype=np.float64)
        self.size = size
        self._frame: pd.DataFrame | None = None

    @property
    def last_ns(self) -> int | None:
        """The newest candle's open time (UTC ns); ``None`` when there is none."""
        return int(self._ns[self.size - 1]) if self.size else None

    def append(self, open_ns: int, values: Mapping[str, float]) -> None:
        if self.size == self._ns.size:  # full: new buffers (frames handed out keep viewing the old ones)
            self._ns = np.concatenate([self._ns, np.empty_like(self._ns)])
            self._values = {c: np.concatenate([v, np.empty_like(v)]) for c, v in self._values.items()}
        self._ns[self.size] = open_ns
        for column, buffer in self._values.items():
            buffer[self.size] = values[column]
        self.size += 1
        self._frame = None

    def frame(self, rows: int | None = None) -> pd.DataFrame:
        """The first ``rows`` candles (all by default) as a canonical candle frame, without copying them."""
        rows = self.size if rows is None else rows
        if rows == self.size and self._frame is not None:
            return self._frame
        stamps = pd.DatetimeIndex(self._ns[:rows].view("datetime64[ns]")).tz_localize("UTC")
        columns = {"timestamp": stamps, **{c: v[:rows] for c, v in self._values.items()}}
        frame = pd.DataFrame(columns, copy=False)
        if rows == self.size:
            self._frame = frame
        return frame

    def rows_closed_by(self, until_ns: int, step_ns: int) -> int:
        """How many candles had closed by ``until_ns``."""
        return int(np.searchsorted(self._ns[:self.size] + step_ns, until_ns, side="right"))


def _closed_by(series: CandleSeries | None, timeframe: Timeframe, until_ns: int) -> pd.DataFrame | None:
    """The series' candles closed by ``until_ns`` (:func:`~pricelevel.features.lookahead.cut_frames`' cut)."""
    if series is None:
        return None
    step = timeframe.nanoseconds
    last = series.last_ns
    if last is not None and last + step <= until_ns:  # the usual case: every candle held has closed
        return series.frame()
    return series.frame(series.rows_closed_by(until_ns, step))


def _iso(ns: int) -> str:
    return pd.Timestamp(ns, unit="ns", tz="UTC").isoformat()


def candle_faults(timestamp: pd.Timestamp, values: Mapping[str, float], timeframe: Timeframe) -> list[str]:
    """The store's candle rules (:mod:`pricelevel.data.validation`, by the same wording) that one candle
    breaks, checked without great-expectations (milliseconds, not seconds, per pushed candle). The rules
    between candles (unique, sorted, gaps) are the feed's: an older candle is ignored, a gap is fetched."""
    faults = []
    for column in (*PRICE_COLUMNS, "volume"):
        if math.isnan(values[column]):
            faults.append(f"{column} is not null")
    for column in (*PRICE_COLUMNS, "volume", "turnover"):
        if math.isinf(values[column]):
            faults.append(f"{column} is finite" if column != "turnover" else "turnover is finite or null")
    faults += [f"{column} > 0" for column in PRICE_COLUMNS if values[column] <= 0]
    if values["volume"] < 0:
        faults.append("volume >= 0")
    for upper, lower in (("high", "open"), ("high", "close"), ("open", "low"), ("close", "low"), ("high", "low")):
        if values[upper] < values[lower]:  # False with a NaN: the not-null rule has said it
            faults.append(f"{upper} >= {lower}")
    if pd.Timestamp(timestamp).value % Timeframe(timeframe).nanoseconds:  # .value: UTC ns whatever the unit
        faults.append(f"open time is a multiple of {timeframe} since 1970-01-01 UTC")
    return faults


def _stamp(seconds: float | None) -> str:
    return "never" if seconds is None else pd.Timestamp(seconds, unit="s", tz="UTC").floor("s").isoformat()


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
