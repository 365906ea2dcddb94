"""Candle validation with great-expectations: is a candle file fit to train on?

:func:`validate_candles` takes a frame exactly as read from a file (it may be broken in any way) and
returns a :class:`ValidationReport`. Every rule is a great-expectations 1.x expectation, reported under
its GE type name, and run in two stages on an ephemeral (in-memory) GE context made per call:

1. **schema**: columns, dtypes, at least one row. If any of these fails, the value rules are skipped
   (reported as ``skipped``) because they would only crash or repeat the schema problem.
2. **values**: no nulls, finite numbers, positive prices, OHLC consistency, unique, sorted, on-grid
   timestamps, and gaps. ``turnover`` may be null (not every source has it) but never infinite.
   Two helper columns are computed first (on a copy) so that GE can check them: the open time's offset
   from the timeframe grid and the number of missing bars before each candle.

Gaps are judged by :class:`~pricelevel.config.GapPolicy`: any gap is a *warning* (exchange outages are
real); one gap longer than ``max_gap_bars`` or a missing share above ``max_missing_fraction`` is a
*failure* (that is a broken download, not an outage).

great-expectations is imported lazily: importing it takes seconds, and the CLI should not pay for it
just to print ``--help``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from pricelevel.core.candles import CANDLE_COLUMNS, CANDLE_SCHEMA, PRICE_COLUMNS, REQUIRED_COLUMNS, TIMESTAMP
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import ValidationConfig

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

__all__ = [
    "DataValidationError",
    "ExpectationResult",
    "GapStats",
    "ValidationIssue",
    "ValidationReport",
    "validate_candles",
]

#: Helper columns added to the copy GE validates (an input column of such a name fails the schema stage).
GRID_OFFSET_COLUMN = "__grid_offset_ns"
MISSING_BARS_COLUMN = "__missing_bars_before"

#: Canonical dtype of each candle column, taken from the stored-file schema so the two cannot drift.
EXPECTED_DTYPES: dict[str, str] = {
    f.name: str(pd.api.types.pandas_dtype(f.type.to_pandas_dtype())) for f in CANDLE_SCHEMA
}
OPTIONAL_COLUMNS = tuple(c for c in CANDLE_COLUMNS if c not in REQUIRED_COLUMNS)
#: Float columns that must hold finite numbers (``> 0`` and the OHLC order rules all let ``+inf`` through).
NUMERIC_COLUMNS = tuple(c for c in CANDLE_COLUMNS if c != TIMESTAMP)

Status = Literal["passed", "failed", "warning", "skipped"]


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ValidationIssue:
    """One failed (or warned) expectation, with the rows that break it."""

    expectation: str
    column: str | None
    summary: str
    unexpected_count: int
    #: Offending rows: ``row`` (position in the file), timestamp and OHLCV, as JSON-friendly values.
    examples: tuple[dict[str, Any], ...]
    #: The rule in words, e.g. ``high >= low``; tells apart two issues of the same GE type.
    check: str = ""

    @property
    def title(self) -> str:
        return f"{self.expectation} [{self.check}]" if self.check else self.expectation

    def to_dict(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation,
            "column": self.column,
            "check": self.check,
            "summary": self.summary,
            "unexpected_count": self.unexpected_count,
            "examples": [dict(row) for row in self.examples],
        }


@dataclass(frozen=True)
class ExpectationResult:
    """One line of the report's expectation table (every rule appears, passed or not)."""

    expectation: str
    column: str | None
    check: str
    status: Status
    unexpected_count: int = 0
    observed: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation,
            "column": self.column,
            "check": self.check,
            "status": self.status,
            "unexpected_count": self.unexpected_count,
            "observed": self.observed,
        }


@dataclass(frozen=True)
class GapStats:
    """Missing candles between the first and last timestamp (absent when timestamps are unusable)."""

    gap_count: int
    missing_bars: int
    largest_gap_bars: int
    #: Bars the span should hold: distinct timestamps plus missing bars.
    span_bars: int
    missing_fraction: float
    #: The first gaps in time: ``{"first_missing": ISO timestamp, "missing_bars": n}``.
    first_gaps: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "gap_count": self.gap_count,
            "missing_bars": self.missing_bars,
            "largest_gap_bars": self.largest_gap_bars,
            "span_bars": self.span_bars,
            "missing_fraction": self.missing_fraction,
            "first_gaps": [dict(g) for g in self.first_gaps],
        }

    def describe(self) -> str:
        if self.gap_count == 0:
            return "no gaps"
        firsts = ", ".join(f"{g['first_missing']} ({g['missing_bars']})" for g in self.first_gaps)
        return (
            f"{_plural(self.gap_count, 'gap')}, {_plural(self.missing_bars, 'missing bar')} "
            f"({self.missing_fraction:.3%} of {self.span_bars} bars), "
            f"largest {_plural(self.largest_gap_bars, 'bar')}; first gaps (first missing open time, bars): {firsts}"
        )


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of :func:`validate_candles`; ``success`` is False iff there is at least one failure."""

    dataset: str
    timeframe: Timeframe
    rows: int
    first_timestamp: pd.Timestamp | None
    last_timestamp: pd.Timestamp | None
    success: bool
    failures: tuple[ValidationIssue, ...]
    warnings: tuple[ValidationIssue, ...]
    gaps: GapStats | None
    expectations: tuple[ExpectationResult, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (timestamps as ISO strings, NaN as null)."""
        return {
            "dataset": self.dataset,
            "timeframe": str(self.timeframe),
            "rows": self.rows,
            "first_timestamp": _iso(self.first_timestamp),
            "last_timestamp": _iso(self.last_timestamp),
            "success": self.success,
            "failures": [i.to_dict() for i in self.failures],
            "warnings": [i.to_dict() for i in self.warnings],
            "gaps": self.gaps.to_dict() if self.gaps else None,
            "expectations": [e.to_dict() for e in self.expectations],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def error_message(self) -> str:
        """What the pipeline shows when bad data stops it: first line names dataset and failed rules."""
        if self.success:
            head = f"Candle validation passed for {self.dataset} ({_plural(len(self.warnings), 'warning')})"
        else:
            names = ", ".join(issue.title for issue in self.failures)
            head = f"Candle validation failed for {self.dataset}: {names}"
        lines = [head]
        for kind, issues in (("FAILED", self.failures), ("WARNING", self.warnings)):
            for issue in issues:
                lines.append(f"- {kind} {issue.title}: {issue.summary}")
                lines.extend(f"    {_format_row(row)}" for row in issue.examples)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Readable report: the expectation table, then failures and warnings with example rows."""
        verdict = "FAILED" if not self.success else ("PASSED with warnings" if self.warnings else "PASSED")
        span = (
            f"{_iso(self.first_timestamp)} to {_iso(self.last_timestamp)}"
            if self.first_timestamp is not None
            else "no usable timestamps"
        )
        lines = [
            f"# Candle validation: {_md(self.dataset)}: **{verdict}**",
            "",
            f"- timeframe: {self.timeframe}",
            f"- rows: {self.rows}",
            f"- candles (open time, UTC): {span}",
            f"- gaps: {self.gaps.describe() if self.gaps else 'not checked'}",
            "",
            "| expectation | column | check | result | unexpected | observed |",
            "|---|---|---|---|---|---|",
        ]
        badge = {"passed": "pass", "failed": "**FAIL**", "warning": "warn", "skipped": "skipped"}
        for e in self.expectations:
            lines.append(
                f"| {e.expectation} | {_md(e.column or '')} | {_md(e.check)} | {badge[e.status]} "
                f"| {e.unexpected_count} | {_md(e.observed)} |"
            )
        for title, issues in (("Failures", self.failures), ("Warnings", self.warnings)):
            if not issues:
                continue
            lines += ["", f"## {title}"]
            for issue in issues:
                lines += ["", f"### {issue.title}", "", _md(issue.summary)]
                lines += _markdown_rows(issue.examples)
        return "\n".join(lines) + "\n"


class DataValidationError(Exception):
    """Raised by callers when a report failed; ``str()`` is the report's error message."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.error_message())
        self.report = report

    def __str__(self) -> str:
        return self.report.error_message()


# --------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Check:
    """A GE expectation plus what the report needs to say about it."""

    key: str
    expectation: Expectation
    column: str | None
    check: str
    warning: bool = False

    @property
    def type_name(self) -> str:
        return self.expectation.expectation_type


def _schema_checks(frame: pd.DataFrame) -> list[_Check]:
    """Columns, dtypes and row count; these must hold before any value can be looked at."""
    import great_expectations.expectations as gxe

    present_optional = [c for c in OPTIONAL_COLUMNS if c in frame.columns]
    expected_columns = [*REQUIRED_COLUMNS, *present_optional]
    known_present = [c for c in CANDLE_COLUMNS if c in frame.columns]
    checks = [
        _Check(
            "columns",
            gxe.ExpectTableColumnsToMatchSet(
                column_set=expected_columns, exact_match=True, meta=_meta("columns")
            ),
            None,
            "required columns present, no unknown columns",
        ),
        _Check(
            "unique_column_names",
            # The column set check compares sets, so a repeated column name would slip through.
            gxe.ExpectTableColumnCountToEqual(
                value=int(pd.Index(frame.columns).nunique()), meta=_meta("unique_column_names")
            ),
            None,
            "column names are unique",
        ),
    ]
    for column in known_present:
        key = f"dtype:{column}"
        checks.append(
            _Check(
                key,
                gxe.ExpectColumnTypeToBe(column=column, type_=EXPECTED_DTYPES[column], meta=_meta(key)),
                column,
                f"{column} has dtype {EXPECTED_DTYPES[column]}",
            )
        )
    checks.append(
        _Check(
            "row_count",
            gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=_meta("row_count")),
            None,
            "at least one row",
        )
    )
    return checks


def _value_checks(
    timeframe: Timeframe, config: ValidationConfig, distinct_rows: int, columns: Sequence[str]
) -> list[_Check]:
    """Value rules on a frame whose schema is right (plus the two helper columns).

    ``columns`` are the frame's columns: a rule on the optional ``turnover`` is only made when it is there
    (GE would report a missing column as an error, not as a pass).
    """
    import great_expectations.expectations as gxe

    checks: list[_Check] = []
    for column in REQUIRED_COLUMNS:
        key = f"not_null:{column}"
        checks.append(
            _Check(
                key,
                gxe.ExpectColumnValuesToNotBeNull(column=column, meta=_meta(key)),
                column,
                f"{column} is not null",
            )
        )
    for column in (c for c in NUMERIC_COLUMNS if c in columns):
        key = f"finite:{column}"
        checks.append(
            _Check(
                key,
                # Finite bounds fail +-inf. GE skips nulls here, so a NaN price is reported once, by the
                # not-null rule, and a null turnover (a source without it) passes.
                gxe.ExpectColumnValuesToBeBetween(
                    column=column,
                    min_value=-sys.float_info.max,
                    max_value=sys.float_info.max,
                    meta=_meta(key),
                ),
                column,
                f"{column} is finite" if column in REQUIRED_COLUMNS else f"{column} is finite or null",
            )
        )
    for column in PRICE_COLUMNS:
        key = f"positive:{column}"
        checks.append(
            _Check(
                key,
                gxe.ExpectColumnValuesToBeBetween(
                    column=column, min_value=0, strict_min=True, meta=_meta(key)
                ),
                column,
                f"{column} > 0",
            )
        )
    checks.append(
        _Check(
            "non_negative:volume",
            gxe.ExpectColumnValuesToBeBetween(
                column="volume", min_value=0, meta=_meta("non_negative:volume")
            ),
            "volume",
            "volume >= 0",
        )
    )
    for upper, lower in (
        ("high", "open"),
        ("high", "close"),
        ("open", "low"),
        ("close", "low"),
        ("high", "low"),
    ):
        key = f"order:{upper}>={lower}"
        checks.append(
            _Check(
                key,
                gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A=upper,
                    column_B=lower,
                    or_equal=True,
                    # A null is the not-null rule's business; do not report it twice.
                    ignore_row_if="either_value_is_missing",
                    meta=_meta(key),
                ),
                f"{upper}, {lower}",
                f"{upper} >= {lower}",
            )
        )
    checks += [
        _Check(
            "unique:timestamp",
            gxe.ExpectColumnValuesToBeUnique(column=TIMESTAMP, meta=_meta("unique:timestamp")),
            TIMESTAMP,
            "timestamps are unique",
        ),
        _Check(
            "sorted:timestamp",
            # Not strictly: with uniqueness checked above, non-decreasing means strictly increasing,
            # and a duplicate is then reported once, as a duplicate.
            gxe.ExpectColumnValuesToBeIncreasing(column=TIMESTAMP, meta=_meta("sorted:timestamp")),
            TIMESTAMP,
            "timestamps increase row by row",
        ),
        _Check(
            "grid:timestamp",
            gxe.ExpectColumnValuesToBeInSet(
                column=GRID_OFFSET_COLUMN, value_set=[0], meta=_meta("grid:timestamp")
            ),
            TIMESTAMP,
            f"open time is a multiple of {timeframe} since 1970-01-01 UTC",
        ),
        _Check(
            "gaps:any",
            gxe.ExpectColumnValuesToBeBetween(
                column=MISSING_BARS_COLUMN,
                min_value=0,
                max_value=0,
                severity="warning",
                meta=_meta("gaps:any"),
            ),
            TIMESTAMP,
            "no missing candles (warning only)",
            warning=True,
        ),
        _Check(
            "gaps:longest",
            gxe.ExpectColumnValuesToBeBetween(
                column=MISSING_BARS_COLUMN,
                min_value=0,
                max_value=config.gaps.max_gap_bars,
                meta=_meta("gaps:longest"),
            ),
            TIMESTAMP,
            f"no gap longer than max_gap_bars={config.gaps.max_gap_bars}",
        ),
        _Check(
            "gaps:fraction",
            gxe.ExpectColumnSumToBeBetween(
                column=MISSING_BARS_COLUMN,
                min_value=0,
                max_value=_allowed_missing_bars(config.gaps.max_missing_fraction, distinct_rows),
                meta=_meta("gaps:fraction"),
            ),
            TIMESTAMP,
            f"missing candles <= max_missing_fraction={config.gaps.max_missing_fraction:g} of the span",
        ),
    ]
    return checks


def _meta(key: str) -> dict[str, str]:
    """GE returns results in its own order; this tag maps each result back to its check."""
    return {"pricelevel_check": key}


def _allowed_missing_bars(max_fraction: float, distinct_rows: int) -> int | None:
    """Most missing bars m with m / (rows + m) <= max_fraction, in exact arithmetic (no float edge)."""
    fraction = Fraction(str(max_fraction))
    if fraction >= 1:
        return None
    return math.floor(fraction * distinct_rows / (1 - fraction))


# --------------------------------------------------------------------------------------------- running


def validate_candles(
    frame: pd.DataFrame, timeframe: Timeframe, config: ValidationConfig, dataset: str
) -> ValidationReport:
    """Validate a candle frame as read from a file; never raises on bad data and never mutates ``frame``.

    ``dataset`` is a human label used in every message, e.g.
    ``"sample BTCUSDT 1h (data/raw/sample/BTCUSDT_1h.parquet)"``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{dataset}: expected a pandas DataFrame, got {type(frame).__name__}")
    timeframe = Timeframe(timeframe)
    # Positions become the index, so GE's unexpected index lists are row positions in the file.
    # Under copy-on-write (pandas 3) this shares the data and never writes to the caller's frame.
    working = frame.reset_index(drop=True)
    context = _ephemeral_context()

    schema_checks = _schema_checks(working)
    schema_results = _run_suite(context, "schema", working, schema_checks, config.example_rows)
    outcomes = [_outcome(c, schema_results[c.key]) for c in schema_checks]
    schema_ok = all(o.status == "passed" for o in outcomes)

    timestamps = _usable_timestamps(working)
    gaps: GapStats | None = None
    failures: list[ValidationIssue] = []
    warnings: list[ValidationIssue] = []
    for check, outcome in zip(schema_checks, outcomes, strict=True):
        if outcome.status == "failed":
            failures.append(_schema_issue(check, schema_results[check.key], working, config))

    if schema_ok:
        missing_before = _missing_bars_before(timestamps, timeframe)
        gaps = _gap_stats(timestamps, missing_before, timeframe, config.example_rows)
        distinct_rows = int(timestamps.dropna().nunique())
        helpers = working.assign(
            **{
                GRID_OFFSET_COLUMN: _grid_offset(timestamps, timeframe),
                MISSING_BARS_COLUMN: missing_before,
            }
        )
        value_checks = _value_checks(timeframe, config, distinct_rows, list(working.columns))
        value_results = _run_suite(context, "values", helpers, value_checks, config.example_rows)
        for check in value_checks:
            result = value_results[check.key]
            outcome = _outcome(check, result)
            outcomes.append(outcome)
            if outcome.status in ("failed", "warning"):
                issue = _value_issue(check, result, working, missing_before, gaps, config, timeframe)
                (warnings if outcome.status == "warning" else failures).append(issue)
    else:
        value_checks = _value_checks(timeframe, config, 0, list(working.columns))
        outcomes += [
            ExpectationResult(c.type_name, c.column, c.check, "skipped", 0, "schema failed")
            for c in value_checks
        ]

    valid_times = timestamps.dropna()
    return ValidationReport(
        dataset=dataset,
        timeframe=timeframe,
        rows=len(working),
        first_timestamp=valid_times.min() if len(valid_times) else None,
        last_timestamp=valid_times.max() if len(valid_times) else None,
        success=not failures,
        failures=tuple(failures),
        warnings=tuple(warnings),
        gaps=gaps,
        expectations=tuple(outcomes),
    )


def _ephemeral_context() -> AbstractDataContext:
    """A fresh in-memory GE context: no files, no data docs, no analytics, no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        # Progress bars default to on and print tqdm bars to stderr for every validation.
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=project_config)


def _run_suite(
    context: AbstractDataContext, name: str, frame: pd.DataFrame, checks: Sequence[_Check], example_rows: int
) -> dict[str, ExpectationValidationResult]:
    import great_expectations as gx

    source = context.data_sources.add_pandas(name)
    batch_definition = source.add_dataframe_asset("candles").add_batch_definition_whole_dataframe("whole")
    suite = gx.ExpectationSuite(name=name, expectations=[c.expectation for c in checks])
    result_format = {
        # SUMMARY gives the first `partial_unexpected_count` offending row indexes, which is all we show.
        "result_format": "SUMMARY",
        "partial_unexpected_count": example_rows,
        "return_unexpected_index_query": False,
    }
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    suite_result = batch.validate(suite, result_format=result_format)
    return {r.expectation_config.meta["pricelevel_check"]: r for r in suite_result.results}


def _outcome(check: _Check, result: ExpectationValidationResult) -> ExpectationResult:
    status: Status = "passed" if result.success else ("warning" if check.warning else "failed")
    return ExpectationResult(
        expectation=check.type_name,
        column=check.column,
        check=check.check,
        status=status,
        unexpected_count=_unexpected_count(result),
        observed=_observed(result),
    )


def _unexpected_count(result: ExpectationValidationResult) -> int:
    return int((result.result or {}).get("unexpected_count") or 0)


def _observed(result: ExpectationValidationResult) -> str:
    if _raised(result):
        return f"error: {_exception_message(result)}"
    body = result.result or {}
    if "observed_value" in body:
        value = body["observed_value"]
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    if "unexpected_count" in body:
        return f"{body['unexpected_count']} of {body.get('element_count', '?')} rows unexpected"
    return ""


def _raised(result: ExpectationValidationResult) -> bool:
    return bool((result.exception_info or {}).get("raised_exception"))


def _exception_message(result: ExpectationValidationResult) -> str:
    message = str((result.exception_info or {}).get("exception_message") or "unknown error")
    return message.splitlines()[0] if message else message


def _schema_issue(
    check: _Check, result: ExpectationValidationResult, frame: pd.DataFrame, config: ValidationConfig
) -> ValidationIssue:
    """Schema failures have no single offending row: show the first rows so the reader sees the data."""
    body = result.result or {}
    if _raised(result):
        summary = f"great-expectations could not evaluate '{check.check}': {_exception_message(result)}"
    elif check.key == "columns":
        mismatched = body.get("details", {}).get("mismatched", {})
        parts = []
        if mismatched.get("missing"):
            parts.append(f"missing required column(s): {', '.join(mismatched['missing'])}")
        if mismatched.get("unexpected"):
            parts.append(f"unknown column(s): {', '.join(mismatched['unexpected'])}")
        summary = "; ".join(parts) + f" (expected {', '.join(REQUIRED_COLUMNS)}, optionally turnover)"
    elif check.key == "unique_column_names":
        repeated = sorted({str(c) for c in pd.Index(frame.columns)[pd.Index(frame.columns).duplicated()]})
        summary = f"repeated column name(s): {', '.join(repeated)}"
    elif check.key.startswith("dtype:"):
        summary = f"column {check.column} has dtype {body.get('observed_value')}, expected {EXPECTED_DTYPES[check.column]}"
    elif check.key == "row_count":
        summary = "the frame has no rows"
    else:  # pragma: no cover - every schema check is handled above
        summary = f"'{check.check}' failed: {_observed(result)}"
    positions = range(min(len(frame), config.example_rows))
    return ValidationIssue(
        expectation=check.type_name,
        column=check.column,
        summary=summary,
        unexpected_count=len(frame) if check.key.startswith("dtype:") else 0,
        examples=_example_rows(frame, positions, all_columns=True),
        check=check.check,
    )


def _value_issue(
    check: _Check,
    result: ExpectationValidationResult,
    frame: pd.DataFrame,
    missing_before: pd.Series,
    gaps: GapStats,
    config: ValidationConfig,
    timeframe: Timeframe,
) -> ValidationIssue:
    body = result.result or {}
    count = _unexpected_count(result)
    positions = [int(i) for i in body.get("partial_unexpected_index_list") or []][: config.example_rows]
    extra: dict[str, pd.Series] = {}
    missing_before = missing_before.astype("Int64")  # whole bars: show 4, not 4.0
    if _raised(result):
        summary = f"great-expectations could not evaluate '{check.check}': {_exception_message(result)}"
    elif check.key == "gaps:any":
        summary = f"{gaps.describe()} (allowed: gap <= {config.gaps.max_gap_bars} bars, share <= {config.gaps.max_missing_fraction:.2%})"
        extra["missing_bars_before"] = missing_before
    elif check.key == "gaps:longest":
        summary = (
            f"{_plural(count, 'gap')} longer than max_gap_bars={config.gaps.max_gap_bars} {timeframe} bars "
            f"(largest: {_plural(gaps.largest_gap_bars, 'bar')}); rows shown are the candles right after each gap"
        )
        extra["missing_bars_before"] = missing_before
    elif check.key == "gaps:fraction":
        summary = (
            f"{_plural(gaps.missing_bars, f'missing {timeframe} candle')} are {gaps.missing_fraction:.3%} of the "
            f"{gaps.span_bars}-bar span, above max_missing_fraction={config.gaps.max_missing_fraction:.2%}; "
            "rows shown are the candles after the largest gaps"
        )
        largest = missing_before[missing_before > 0].sort_values(ascending=False, kind="stable")
        positions = [int(i) for i in largest.index[: config.example_rows]]
        count = gaps.missing_bars
        extra["missing_bars_before"] = missing_before
    else:
        summary = f"{count} of {len(frame)} rows break '{check.check}'"
        if check.key == "grid:timestamp":
            extra["grid_offset"] = _grid_offset(_usable_timestamps(frame), timeframe).map(
                lambda ns: pd.Timedelta(int(ns)) if pd.notna(ns) else None
            )
    return ValidationIssue(
        expectation=check.type_name,
        column=check.column,
        summary=summary,
        unexpected_count=count,
        examples=_example_rows(frame, positions, extra=extra),
        check=check.check,
    )


# --------------------------------------------------------------------------------------------- helpers


def _usable_timestamps(frame: pd.DataFrame) -> pd.Series:
    """The timestamp column as UTC datetimes, or all-NaT when it is missing or of another type."""
    column = frame[TIMESTAMP] if TIMESTAMP in frame.columns else None
    if isinstance(column, pd.Series) and isinstance(column.dtype, pd.DatetimeTZDtype):
        return column.dt.tz_convert("UTC").dt.as_unit("ns")
    return pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")


def _epoch_ns(timestamps: pd.Series) -> np.ndarray:
    return pd.DatetimeIndex(timestamps).asi8


def _grid_offset(timestamps: pd.Series, timeframe: Timeframe) -> pd.Series:
    """Nanoseconds past the last grid point (0 on the grid); NaN where the timestamp is null."""
    offset = (_epoch_ns(timestamps) % timeframe.nanoseconds).astype("float64")
    offset[timestamps.isna().to_numpy()] = np.nan
    return pd.Series(offset, index=timestamps.index)


def _missing_bars_before(timestamps: pd.Series, timeframe: Timeframe) -> pd.Series:
    """For each row, whole bars missing between it and the previous distinct timestamp in time order.

    Computed on the sorted timestamps so that gaps mean the same thing whether or not rows are sorted;
    duplicates and off-grid times count 0 here (their own rules report them). NaN for null timestamps.
    """
    result = np.full(len(timestamps), np.nan)
    valid = ~timestamps.isna().to_numpy()
    positions = np.flatnonzero(valid)
    if len(positions):
        ns = _epoch_ns(timestamps)[positions]
        order = np.argsort(ns, kind="stable")
        steps = np.diff(ns[order]) // timeframe.nanoseconds
        missing = np.concatenate([[0], np.clip(steps - 1, 0, None)])
        result[positions[order]] = missing
    return pd.Series(result, index=timestamps.index)


def _gap_stats(
    timestamps: pd.Series, missing_before: pd.Series, timeframe: Timeframe, example_gaps: int
) -> GapStats:
    gap_rows = missing_before[missing_before > 0]
    distinct = int(timestamps.dropna().nunique())
    missing = int(gap_rows.sum())
    span = distinct + missing
    in_time_order = timestamps[gap_rows.index].sort_values(kind="stable")
    first_gaps = tuple(
        {
            "first_missing": _iso(ts - int(gap_rows[pos]) * timeframe.delta),
            "missing_bars": int(gap_rows[pos]),
        }
        for pos, ts in in_time_order.iloc[:example_gaps].items()
    )
    return GapStats(
        gap_count=len(gap_rows),
        missing_bars=missing,
        largest_gap_bars=int(gap_rows.max()) if len(gap_rows) else 0,
        span_bars=span,
        missing_fraction=missing / span if span else 0.0,
        first_gaps=first_gaps,
    )


def _example_rows(
    frame: pd.DataFrame,
    positions: Sequence[int] | range,
    *,
    all_columns: bool = False,
    extra: Mapping[str, pd.Series] | None = None,
) -> tuple[dict[str, Any], ...]:
    """Rows by position as JSON-friendly dicts: ``row``, the candle columns, then any ``extra`` values."""
    if all_columns:
        columns = list(range(frame.shape[1]))
    else:
        columns = [i for i, c in enumerate(frame.columns) if c in CANDLE_COLUMNS]
        columns.sort(key=lambda i: CANDLE_COLUMNS.index(frame.columns[i]))
    rows = []
    for position in positions:
        row: dict[str, Any] = {"row": int(position)}
        for i in columns:
            row[str(frame.columns[i])] = _json_value(frame.iat[position, i])
        for name, values in (extra or {}).items():
            row[name] = _json_value(values.iloc[position])
        rows.append(row)
    return tuple(rows)


def _json_value(value: Any) -> Any:
    """A value json.dumps accepts without allow_nan: NaN/NaT/NA become None, infinities strings."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp | datetime | date):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return str(value)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return value
    return str(value)


def _iso(value: pd.Timestamp | None) -> str | None:
    return None if value is None or pd.isna(value) else value.isoformat()


def _format_row(row: Mapping[str, Any]) -> str:
    position = row.get("row")
    values = " ".join(f"{k}={v}" for k, v in row.items() if k != "row")
    return f"row {position}: {values}"


def _markdown_rows(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    header = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["", "| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(
            "| " + " | ".join(_md("" if row.get(h) is None else str(row.get(h))) for h in header) + " |"
        )
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
