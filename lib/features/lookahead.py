"""Proof that features and labels use no future data: recompute them on data cut at t and compare.

For each cut point t (the open time of a bar of the table's timeframe), every timeframe's candles are cut
to those closed by the close of bar t, which is exactly the data that existed then. The table built from the
cut data must equal the table built from all the data on every row up to t; a ``target`` (which looks
``horizon`` bars ahead) only on the rows up to t - horizon bars. A feature that peeks at a later bar, a
longer-timeframe candle joined before it closed, or a level found with later extrema all show up as a
differing value, reported with its column and timestamp. Every label kind goes through the same ``target``
column: a triple-barrier label (and its ATR-scaled barriers, taken at the decision bar) may read bars up to
``t + horizon`` and no further.

The comparison allows a relative difference of 1e-9 (``RTOL``): recomputing on a prefix is exact for every
computation here, and a leak moves values by far more.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.core.cache import DerivedStore, SymbolStep, code_fingerprint, step_key
from pricelevel.core.files import write_json
from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.folder import CandleFolder
from pricelevel.features.tables import TableSpec, read_table

#: Relative tolerance of the comparison (NaN equals NaN; warm-up rows must be NaN on both sides).
RTOL = 1e-9
#: Columns that look ahead by design and are compared only up to ``t - horizon``.
LABEL_COLUMNS = ("target",)

#: ``build(frames) -> table``: the table (with a ``timestamp`` column) computed from these candles alone.
Build = Callable[[Mapping[Timeframe, pd.DataFrame | None]], pd.DataFrame]


@dataclass(frozen=True)
class Difference:
    """One value that changed when later data was added: proof of look-ahead."""

    symbol: str
    cut: pd.Timestamp
    column: str
    timestamp: pd.Timestamp
    full: float
    cut_value: float

    def line(self) -> str:
        return (
            f"{self.symbol} cut at {self.cut}: {self.column} at {self.timestamp} is {self.cut_value!r} "
            f"on the cut data but {self.full!r} on the full data"
        )


@dataclass(frozen=True)
class SymbolCheck:
    symbol: str
    cuts: tuple[pd.Timestamp, ...]
    rows_compared: int
    values_compared: int
    differences: tuple[Difference, ...] = field(default=())


@dataclass(frozen=True)
class LookaheadReport:
    checks: tuple[SymbolCheck, ...]

    @property
    def differences(self) -> list[Difference]:
        return [d for check in self.checks for d in check.differences]

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "symbols": [c.symbol for c in self.checks],
            "cuts": {c.symbol: [str(t) for t in c.cuts] for c in self.checks},
            "rows_compared": sum(c.rows_compared for c in self.checks),
            "values_compared": sum(c.values_compared for c in self.checks),
            "differences": len(self.differences),
            "first_differences": [d.line() for d in self.differences[:50]],
        }


def cut_frames(
    frames: Mapping[Timeframe, pd.DataFrame | None], until_ns: int
) -> dict[Timeframe, pd.DataFrame | None]:
    """Every timeframe's candles that had closed by ``until_ns`` (UTC ns): the data that existed then."""
    out: dict[Timeframe, pd.DataFrame | None] = {}
    for tf, frame in frames.items():
        if frame is None:
            out[tf] = None
            continue
        close_ns = utc_ns(frame["timestamp"]) + Timeframe(tf).nanoseconds
        out[tf] = frame.iloc[: int(np.searchsorted(close_ns, until_ns, side="right"))].reset_index(drop=True)
    return out


def cut_rows(n_rows: int, cuts: int, first_row: int = 0) -> list[int]:
    """``cuts`` row positions spread evenly over ``[first_row, n_rows - 1)``: the last bar of each cut."""
    if cuts < 1:
        raise ValueError(f"cuts must be >= 1, got {cuts}")
    span = n_rows - 1 - first_row
    if span < 1:
        return []
    return sorted({first_row + (span * (j + 1)) // (cuts + 1) for j in range(cuts)})


def check_symbol(
    symbol: str,
    frames: Mapping[Timeframe, pd.DataFrame | None],
    timeframe: Timeframe,
    build: Build,
    horizon: int,
    cuts: int,
    full: pd.DataFrame | None = None,
) -> SymbolCheck:
    """Compare ``build`` on the full data (or the given ``full`` table) with ``build`` on ``cuts`` cuts."""
    timeframe = Timeframe(timeframe)
    full = build(frames) if full is None else full
    bars = frames[timeframe]
    if bars is None:
        raise ValueError(f"{symbol}: no {timeframe} candles")
    # Leave the first tenth out: a cut there has little but warm-up to compare.
    rows = cut_rows(len(bars), cuts, first_row=len(bars) // 10)
    stamps, differences = [], []
    rows_compared = values_compared = 0
    for row in rows:
        cut_at = pd.Timestamp(bars["timestamp"].iloc[row])
        until_ns = int(utc_ns(bars["timestamp"].iloc[[row]])[0]) + timeframe.nanoseconds
        table = build(cut_frames(frames, until_ns))
        found, compared = compare(symbol, cut_at, full, table, horizon)
        stamps.append(cut_at)
        differences.extend(found)
        rows_compared += len(table)
        values_compared += compared
    return SymbolCheck(symbol, tuple(stamps), rows_compared, values_compared, tuple(differences))


def compare(
    symbol: str, cut_at: pd.Timestamp, full: pd.DataFrame, cut: pd.DataFrame, horizon: int
) -> tuple[list[Difference], int]:
    """Differences between the cut table and the full table's same rows; and how many values were compared."""
    n = len(cut)
    head = full.iloc[:n]
    if n > len(full) or not pd.DatetimeIndex(head["timestamp"]).equals(pd.DatetimeIndex(cut["timestamp"])):
        first = cut["timestamp"].iloc[0] if n else cut_at
        return [Difference(symbol, cut_at, "timestamp", first, float("nan"), float("nan"))], 0
    differences: list[Difference] = []
    compared = 0
    stamps = pd.DatetimeIndex(cut["timestamp"])
    for column in full.columns:
        if column == "timestamp":
            continue
        if column not in cut.columns:
            differences.append(Difference(symbol, cut_at, column, cut_at, float("nan"), float("nan")))
            continue
        limit = n - horizon if column in LABEL_COLUMNS else n
        if limit <= 0:
            continue
        a = head[column].to_numpy(dtype=np.float64)[:limit]
        b = cut[column].to_numpy(dtype=np.float64)[:limit]
        same = np.isclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True)
        compared += limit
        for i in np.flatnonzero(~same):
            differences.append(Difference(symbol, cut_at, column, stamps[i], float(a[i]), float(b[i])))
    return differences, compared


def check_lookahead(
    frames_by_symbol: Mapping[str, Mapping[Timeframe, pd.DataFrame | None]],
    timeframe: Timeframe,
    build: Build,
    horizon: int,
    cuts: int,
    full_tables: Mapping[str, pd.DataFrame] | None = None,
) -> LookaheadReport:
    """:func:`check_symbol` for every symbol (``full_tables`` saves recomputing the full tables)."""
    checks = [
        check_symbol(symbol, frames, timeframe, build, horizon, cuts, (full_tables or {}).get(symbol))
        for symbol, frames in frames_by_symbol.items()
    ]
    return LookaheadReport(tuple(checks))


def report_lines(report: LookaheadReport, limit: int = 50) -> Sequence[str]:
    """What a person reads: one line per differing value (the first ``limit``), then the totals."""
    lines = [d.line() for d in report.differences[:limit]]
    if len(report.differences) > limit:
        lines.append(f"... and {len(report.differences) - limit} more")
    summary = report.summary()
    verdict = "no look-ahead found" if report.ok else f"LOOK-AHEAD: {summary['differences']} values differ"
    lines.append(
        f"{verdict}: {len(report.checks)} symbol(s), {sum(len(c.cuts) for c in report.checks)} cuts, "
        f"{summary['values_compared']} values compared"
    )
    return lines


class LookaheadError(RuntimeError):
    """Features or labels changed when later data was added: they use the future."""


def check_folder(
    folder: CandleFolder,
    symbols: Sequence[str],
    spec: TableSpec,
    cuts: int,
    full_tables: Mapping[str, pd.DataFrame] | None = None,
) -> LookaheadReport:
    """:func:`check_lookahead` of the tables ``spec`` builds for ``symbols`` from the candles in ``folder``."""
    folder.require(symbols, [spec.timeframe])
    frames = {symbol: spec.read_frames(folder, symbol) for symbol in symbols}
    return check_lookahead(frames, spec.timeframe, spec.table, spec.labels.horizon, cuts, full_tables)


def lookahead_step(
    folder: CandleFolder, derived: DerivedStore, tables: Sequence[SymbolStep], spec: TableSpec, cuts: int
) -> dict[str, Any]:
    """Check the training tables; raise :class:`LookaheadError` on any difference. A passed check is kept in
    the derived store (``report.json``) and not repeated for the same tables; the summary says which."""
    key = step_key("lookahead", tables=sorted(t.key for t in tables), cuts=cuts, code=code_fingerprint(check_lookahead))

    def write(out: Path) -> None:
        full = {t.symbol: read_table(t.folder, t.symbol) for t in tables}
        report = check_folder(folder, [t.symbol for t in tables], spec, cuts, full)
        if not report.ok:
            raise LookaheadError("\n".join(report_lines(report, limit=20)))
        write_json(out / "report.json", report.summary() | {"lines": list(report_lines(report))})

    out, built = derived.build("lookahead", key, write)
    summary = json.loads((out / "report.json").read_text())
    return summary | {"built": built, "folder": str(out)}
