"""Candle validation: real bundled files pass; each kind of corruption fails, naming the rule and the rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricelevel.core.candles import to_canonical
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import GapPolicy, ValidationConfig
from pricelevel.data.store import parse_dataset_filename
from pricelevel.data.validation import (
    DataValidationError,
    ValidationIssue,
    ValidationReport,
    validate_candles,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
DEFAULT = ValidationConfig()

NOT_NULL = "expect_column_values_to_not_be_null"
BETWEEN = "expect_column_values_to_be_between"
PAIR = "expect_column_pair_values_a_to_be_greater_than_b"
UNIQUE = "expect_column_values_to_be_unique"
INCREASING = "expect_column_values_to_be_increasing"
IN_SET = "expect_column_values_to_be_in_set"
SUM_BETWEEN = "expect_column_sum_to_be_between"
COLUMNS = "expect_table_columns_to_match_set"
COLUMN_COUNT = "expect_table_column_count_to_equal"
DTYPE = "expect_column_type_to_be"
ROW_COUNT = "expect_table_row_count_to_be_between"

GAP_WARNING = (BETWEEN, "no missing candles (warning only)")


def read_sample(name: str) -> pd.DataFrame:
    return pd.read_parquet(SAMPLE / f"{name}.parquet")


@pytest.fixture(scope="module")
def btc_4h() -> pd.DataFrame:
    """120 real, gap-free 4h candles: small enough to validate in a blink."""
    return read_sample("BTCUSDT_4h").iloc[:120].reset_index(drop=True)


def validate(
    frame: pd.DataFrame, config: ValidationConfig = DEFAULT, timeframe: str = "4h"
) -> ValidationReport:
    return validate_candles(frame, Timeframe(timeframe), config, dataset=f"test BTCUSDT {timeframe}")


def failed(report: ValidationReport) -> set[tuple[str, str]]:
    return {(issue.expectation, issue.check) for issue in report.failures}


def issue_for(issues: tuple[ValidationIssue, ...], expectation: str, check: str) -> ValidationIssue:
    matches = [i for i in issues if (i.expectation, i.check) == (expectation, check)]
    assert len(matches) == 1, [(i.expectation, i.check) for i in issues]
    return matches[0]


def example_times(issue: ValidationIssue) -> list[str]:
    return [row["timestamp"] for row in issue.examples]


def iso(ts: pd.Timestamp) -> str:
    return ts.isoformat()


# --------------------------------------------------------------------------------------------- real files


def test_real_1h_file_passes_with_a_warning_listing_the_outage_gaps() -> None:
    frame = read_sample("BTCUSDT_1h")

    report = validate(frame, timeframe="1h")

    assert report.success, report.error_message()
    assert report.failures == ()
    assert [(w.expectation, w.check) for w in report.warnings] == [GAP_WARNING]
    assert report.rows == 30362
    assert iso(report.first_timestamp) == "2021-01-12T08:00:00+00:00"
    assert iso(report.last_timestamp) == "2024-06-30T23:00:00+00:00"
    gaps = report.gaps
    assert (gaps.gap_count, gaps.missing_bars, gaps.largest_gap_bars) == (7, 14, 4)
    assert gaps.first_gaps[0] == {"first_missing": "2021-02-11T04:00:00+00:00", "missing_bars": 1}
    assert gaps.first_gaps[4] == {"first_missing": "2021-08-13T02:00:00+00:00", "missing_bars": 4}
    warning = report.warnings[0]
    assert warning.unexpected_count == 7
    assert example_times(warning)[:2] == ["2021-02-11T05:00:00+00:00", "2021-03-06T03:00:00+00:00"]
    assert warning.examples[4]["missing_bars_before"] == 4
    assert "14 missing bars" in warning.summary and "largest 4 bars" in warning.summary
    # The two flat zero-volume candles next to the outages are real and allowed (volume >= 0).
    assert (frame["volume"] == 0).sum() == 2
    assert all(e.status == "passed" for e in report.expectations if e.check != GAP_WARNING[1])


@pytest.mark.parametrize(("name", "timeframe"), [("ETHUSDT_4h", "4h"), ("SOLUSDT_1d", "1d")])
def test_real_4h_and_1d_files_pass_without_warnings(name: str, timeframe: str) -> None:
    report = validate(read_sample(name), timeframe=timeframe)

    assert report.success, report.error_message()
    assert report.warnings == ()
    assert report.gaps.gap_count == 0
    assert {e.status for e in report.expectations} == {"passed"}
    assert report.error_message().startswith("Candle validation passed for test BTCUSDT")


def test_real_file_stored_without_turnover_passes_with_null_turnover() -> None:
    """The bundled files have no turnover; stored in the canonical form it is all null, which is allowed."""
    frame = to_canonical(read_sample("BNBUSDT_1d"))
    assert frame["turnover"].isna().all()

    report = validate(frame, timeframe="1d")

    assert report.success, report.error_message()
    assert report.warnings == ()
    finite = {
        e.check: e.status for e in report.expectations if e.check.endswith(("is finite", "finite or null"))
    }
    assert finite == {
        "open is finite": "passed",
        "high is finite": "passed",
        "low is finite": "passed",
        "close is finite": "passed",
        "volume is finite": "passed",
        "turnover is finite or null": "passed",
    }


# --------------------------------------------------------------------------------------------- values


def _nan_close(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[5, "close"] = np.nan
    return f, [5]


def _high_below_low(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[7, "high"] = f.loc[7, "low"] - 1.0
    return f, [7]


def _open_above_high(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[9, "open"] = f.loc[9, "high"] * 1.01
    return f, [9]


def _close_below_low(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[11, "close"] = f.loc[11, "low"] * 0.99
    return f, [11]


def _negative_volume(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[13, "volume"] = -1.0
    return f, [13]


def _zero_low(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[15, "low"] = 0.0
    return f, [15]


def _duplicated_row(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    return pd.concat([f.iloc[:21], f.iloc[[20]], f.iloc[21:]], ignore_index=True), [20, 21]


def _swapped_rows(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.iloc[[30, 31]] = f.iloc[[31, 30]].to_numpy()
    return f, [31]  # the row whose open time is earlier than the row before it


def _off_grid(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[25, "timestamp"] += pd.Timedelta(minutes=1)
    return f, [25]


# Infinities pass "> 0" and the OHLC order rules (inf >= anything), so only the finite rule catches them.
def _inf_high(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[17, "high"] = np.inf
    return f, [17]


def _minus_inf_low(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[19, "low"] = -np.inf
    return f, [19]


def _inf_volume(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f.loc[23, "volume"] = np.inf
    return f, [23]


def _inf_turnover(f: pd.DataFrame) -> tuple[pd.DataFrame, list[int]]:
    f = f.assign(turnover=f["close"] * f["volume"])
    f.loc[[4, 8], "turnover"] = np.nan  # null turnover is allowed and must not be reported
    f.loc[27, "turnover"] = np.inf
    return f, [27]


VALUE_CORRUPTIONS: dict[str, tuple[Callable, set[tuple[str, str]]]] = {
    "nan": (_nan_close, {(NOT_NULL, "close is not null")}),
    "high<low": (_high_below_low, {(PAIR, "high >= low"), (PAIR, "high >= open"), (PAIR, "high >= close")}),
    "open>high": (_open_above_high, {(PAIR, "high >= open")}),
    "close<low": (_close_below_low, {(PAIR, "close >= low")}),
    "negative volume": (_negative_volume, {(BETWEEN, "volume >= 0")}),
    "zero price": (_zero_low, {(BETWEEN, "low > 0")}),
    "duplicate timestamp": (_duplicated_row, {(UNIQUE, "timestamps are unique")}),
    "out of order": (_swapped_rows, {(INCREASING, "timestamps increase row by row")}),
    "off grid": (_off_grid, {(IN_SET, "open time is a multiple of 4h since 1970-01-01 UTC")}),
    "+inf high": (_inf_high, {(BETWEEN, "high is finite")}),
    # -inf is not > 0 either; both rules are true, and the finite one says what is really wrong.
    "-inf low": (_minus_inf_low, {(BETWEEN, "low is finite"), (BETWEEN, "low > 0")}),
    "+inf volume": (_inf_volume, {(BETWEEN, "volume is finite")}),
    "+inf turnover": (_inf_turnover, {(BETWEEN, "turnover is finite or null")}),
}


@pytest.mark.parametrize("case", list(VALUE_CORRUPTIONS))
def test_value_corruption_fails_naming_the_rule_and_the_rows(btc_4h: pd.DataFrame, case: str) -> None:
    corrupt, expected = VALUE_CORRUPTIONS[case]
    frame, bad_rows = corrupt(btc_4h.copy())

    report = validate(frame)

    assert not report.success
    assert failed(report) == expected
    bad_times = [iso(frame.loc[i, "timestamp"]) for i in bad_rows]
    for issue in report.failures:
        assert [row["row"] for row in issue.examples] == bad_rows
        assert example_times(issue) == bad_times
        assert issue.unexpected_count == len(bad_rows)
    message = report.error_message()
    first_line, rest = message.split("\n", 1)
    assert first_line.startswith("Candle validation failed for test BTCUSDT 4h:")
    for expectation, check in expected:
        assert f"{expectation} [{check}]" in first_line
    assert all(t in rest for t in bad_times)


@pytest.mark.parametrize(
    ("column", "value", "row"),
    [("high", np.inf, 17), ("low", -np.inf, 19), ("volume", np.inf, 23), ("turnover", np.inf, 27)],
)
def test_infinity_is_shown_with_its_row_and_the_file_in_the_message(
    btc_4h: pd.DataFrame, column: str, value: float, row: int
) -> None:
    frame = btc_4h.assign(turnover=btc_4h["close"] * btc_4h["volume"])
    frame.loc[row, column] = value
    dataset = "sample BTCUSDT 4h (data/raw/sample/BTCUSDT_4h.parquet)"

    report = validate_candles(frame, Timeframe("4h"), DEFAULT, dataset=dataset)

    check = f"{column} is finite" if column != "turnover" else "turnover is finite or null"
    issue = issue_for(report.failures, BETWEEN, check)
    assert issue.column == column
    assert issue.unexpected_count == 1
    assert [r["row"] for r in issue.examples] == [row]
    assert issue.examples[0][column] == ("inf" if value > 0 else "-inf")
    assert issue.summary == f"1 of 120 rows break '{check}'"
    # No rule crashed on the infinity (a GE exception would be a failure with "could not evaluate").
    assert not any("could not evaluate" in i.summary for i in report.failures)
    table = [e for e in report.expectations if e.check == check]
    assert [(e.expectation, e.column, e.status, e.unexpected_count) for e in table] == [
        (BETWEEN, column, "failed", 1)
    ]
    message = report.error_message()
    assert message.splitlines()[0].startswith(f"Candle validation failed for {dataset}: ")
    assert f"{BETWEEN} [{check}]" in message.splitlines()[0]
    inf_text = "inf" if value > 0 else "-inf"
    assert f"    row {row}: timestamp={iso(frame.loc[row, 'timestamp'])} " in message
    assert f" {column}={inf_text}" in message
    json.dumps(report.to_dict(), allow_nan=False)


def test_nan_close_is_reported_by_not_null_only_not_as_infinite(btc_4h: pd.DataFrame) -> None:
    """GE's value rules skip nulls, so the finite rule must not report the NaN a second time."""
    frame = btc_4h.copy()
    frame.loc[5, "close"] = np.nan

    report = validate(frame)

    assert failed(report) == {(NOT_NULL, "close is not null")}
    finite_close = [e for e in report.expectations if e.check == "close is finite"]
    assert [(e.status, e.unexpected_count) for e in finite_close] == [("passed", 0)]
    assert "row 5: " in report.error_message()


def test_null_value_is_reported_once_not_as_an_ohlc_violation_too(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.copy()
    frame.loc[[3, 40], "high"] = np.nan

    report = validate(frame)

    assert failed(report) == {(NOT_NULL, "high is not null")}
    issue = report.failures[0]
    assert [row["row"] for row in issue.examples] == [3, 40]
    assert issue.examples[0]["high"] is None


def test_null_timestamp_fails_and_its_missing_bar_counts_as_a_gap(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.copy()
    frame.loc[2, "timestamp"] = pd.NaT

    report = validate(frame)

    issue = issue_for(report.failures, NOT_NULL, "timestamp is not null")
    assert issue.examples[0]["row"] == 2 and issue.examples[0]["timestamp"] is None
    assert report.gaps.missing_bars == 1


def test_examples_are_capped_at_example_rows_but_the_count_is_complete(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.copy()
    frame.loc[[10, 20, 30, 40, 50], "volume"] = -5.0

    report = validate(frame, ValidationConfig(example_rows=2))

    issue = issue_for(report.failures, BETWEEN, "volume >= 0")
    assert issue.unexpected_count == 5
    assert [row["row"] for row in issue.examples] == [10, 20]


def test_first_and_last_timestamp_are_the_extremes_even_when_unsorted(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.iloc[::-1]

    report = validate(frame)

    assert failed(report) == {(INCREASING, "timestamps increase row by row")}
    assert report.first_timestamp == btc_4h["timestamp"].iloc[0]
    assert report.last_timestamp == btc_4h["timestamp"].iloc[-1]


# --------------------------------------------------------------------------------------------- gaps


@pytest.mark.parametrize(("max_gap_bars", "passes"), [(4, False), (5, True)])
def test_a_gap_longer_than_max_gap_bars_fails(btc_4h: pd.DataFrame, max_gap_bars: int, passes: bool) -> None:
    frame = btc_4h.drop(index=range(50, 55))  # one gap of 5 bars, 5/120 of the span
    config = ValidationConfig(gaps=GapPolicy(max_gap_bars=max_gap_bars, max_missing_fraction=0.5))

    report = validate(frame, config)

    assert report.success is passes
    check = f"no gap longer than max_gap_bars={max_gap_bars}"
    assert failed(report) == (set() if passes else {(BETWEEN, check)})
    warning = issue_for(report.warnings, *GAP_WARNING)
    assert example_times(warning) == [iso(btc_4h.loc[55, "timestamp"])]
    assert warning.examples[0]["missing_bars_before"] == 5
    if not passes:
        issue = report.failures[0]
        assert example_times(issue) == [iso(btc_4h.loc[55, "timestamp"])]
        assert "largest: 5 bars" in issue.summary
        assert report.error_message().splitlines()[0].endswith(f"{BETWEEN} [{check}]")


# 3 / 100 is exactly 0.03, where float arithmetic (0.03 * 97 / 0.97 = 2.999...) would wrongly fail.
@pytest.mark.parametrize(("max_missing_fraction", "passes"), [(0.0299, False), (0.03, True)])
def test_too_many_missing_candles_fail_even_when_each_gap_is_short(
    btc_4h: pd.DataFrame, max_missing_fraction: float, passes: bool
) -> None:
    frame = btc_4h.iloc[:100].drop(index=[30, 60, 90])  # 3 one-bar gaps: exactly 3% of the span
    config = ValidationConfig(gaps=GapPolicy(max_gap_bars=24, max_missing_fraction=max_missing_fraction))

    report = validate(frame, config)

    assert report.success is passes
    assert report.gaps.missing_fraction == pytest.approx(0.03)
    assert (report.gaps.gap_count, report.gaps.largest_gap_bars, report.gaps.span_bars) == (3, 1, 100)
    check = f"missing candles <= max_missing_fraction={max_missing_fraction:g} of the span"
    assert failed(report) == (set() if passes else {(SUM_BETWEEN, check)})
    if not passes:
        issue = report.failures[0]
        assert issue.unexpected_count == 3
        assert sorted(example_times(issue)) == [iso(btc_4h.loc[i, "timestamp"]) for i in (31, 61, 91)]
        assert "3.000% of the 100-bar span" in issue.summary


def test_default_policy_fails_a_day_long_hole_in_hourly_data() -> None:
    hourly = read_sample("BTCUSDT_1h").iloc[-400:].reset_index(drop=True)
    frame = hourly.drop(index=range(100, 130))  # 30 hours missing > max_gap_bars=24; 30/400 > 1%

    report = validate(frame, timeframe="1h")

    assert failed(report) == {
        (BETWEEN, "no gap longer than max_gap_bars=24"),
        (SUM_BETWEEN, "missing candles <= max_missing_fraction=0.01 of the span"),
    }
    longest = issue_for(report.failures, BETWEEN, "no gap longer than max_gap_bars=24")
    assert example_times(longest) == [iso(hourly.loc[130, "timestamp"])]
    assert longest.examples[0]["missing_bars_before"] == 30


# --------------------------------------------------------------------------------------------- schema


def _only_schema_failure(report: ValidationReport, expectation: str, check: str) -> ValidationIssue:
    """Schema failures must short-circuit: every value rule is listed as skipped, none is run."""
    assert not report.success
    assert failed(report) == {(expectation, check)}
    assert report.gaps is None
    value_rules = [e for e in report.expectations if e.check == "timestamps are unique"]
    assert [e.status for e in value_rules] == ["skipped"]
    return report.failures[0]


def test_missing_column_fails_before_any_value_rule(btc_4h: pd.DataFrame) -> None:
    report = validate(btc_4h.drop(columns="volume"))

    issue = _only_schema_failure(report, COLUMNS, "required columns present, no unknown columns")
    assert "missing required column(s): volume" in issue.summary
    assert example_times(issue)[:2] == [iso(t) for t in btc_4h["timestamp"].iloc[:2]]
    assert "volume" not in issue.examples[0]
    assert "missing required column(s): volume" in report.error_message()


def test_unknown_column_fails(btc_4h: pd.DataFrame) -> None:
    report = validate(btc_4h.assign(exchange="binance"))

    issue = _only_schema_failure(report, COLUMNS, "required columns present, no unknown columns")
    assert "unknown column(s): exchange" in issue.summary
    assert issue.examples[0]["exchange"] == "binance"


def test_repeated_column_name_fails(btc_4h: pd.DataFrame) -> None:
    report = validate(pd.concat([btc_4h, btc_4h[["close"]]], axis=1))

    issue = _only_schema_failure(report, COLUMN_COUNT, "column names are unique")
    assert "repeated column name(s): close" in issue.summary


def test_optional_turnover_column_is_allowed_and_may_be_null(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.assign(turnover=btc_4h["close"] * btc_4h["volume"])
    frame.loc[3, "turnover"] = np.nan

    report = validate(frame)

    assert report.success, report.error_message()
    assert any(e.check == "turnover has dtype float64" for e in report.expectations)
    assert [e.status for e in report.expectations if e.check == "turnover is finite or null"] == ["passed"]


def test_finite_turnover_rule_only_exists_when_the_column_does(btc_4h: pd.DataFrame) -> None:
    """turnover is optional: a frame without it must not get a rule on it (GE would error on the column)."""
    report = validate(btc_4h)

    assert report.success, report.error_message()
    checks = [e.check for e in report.expectations]
    assert "volume is finite" in checks and "turnover is finite or null" not in checks


@pytest.mark.parametrize(
    ("column", "convert", "observed"),
    [
        ("close", lambda s: s.astype(str), "str"),
        ("volume", lambda s: s.astype("float32"), "float32"),
        ("timestamp", lambda s: s.astype("int64"), "int64"),
        ("timestamp", lambda s: s.dt.tz_localize(None), "datetime64[ns]"),
        ("timestamp", lambda s: s.dt.tz_convert("Europe/Berlin"), "datetime64[ns, Europe/Berlin]"),
    ],
    ids=["close-as-string", "volume-float32", "timestamp-as-int", "timestamp-naive", "timestamp-not-utc"],
)
def test_wrong_dtype_fails_naming_the_observed_dtype(
    btc_4h: pd.DataFrame, column: str, convert: Callable[[pd.Series], pd.Series], observed: str
) -> None:
    frame = btc_4h.assign(**{column: convert(btc_4h[column])})

    report = validate(frame)

    expected_dtype = "datetime64[ns, UTC]" if column == "timestamp" else "float64"
    issue = _only_schema_failure(report, DTYPE, f"{column} has dtype {expected_dtype}")
    assert issue.column == column
    assert issue.summary == f"column {column} has dtype {observed}, expected {expected_dtype}"
    assert [row["row"] for row in issue.examples] == [0, 1, 2, 3, 4]
    assert issue.examples[0][column] == _first_value_as_json(frame[column])
    json.dumps(report.to_dict(), allow_nan=False)


def _first_value_as_json(series: pd.Series) -> object:
    value = series.iloc[0]
    return (
        value.isoformat()
        if isinstance(value, pd.Timestamp)
        else (str(value) if isinstance(value, str) else value.item())
    )


def test_empty_frame_with_the_right_columns_fails_on_row_count(btc_4h: pd.DataFrame) -> None:
    report = validate(btc_4h.iloc[:0])

    issue = _only_schema_failure(report, ROW_COUNT, "at least one row")
    assert issue.summary == "the frame has no rows"
    assert issue.examples == ()
    assert report.rows == 0 and report.first_timestamp is None
    assert report.error_message().splitlines()[0].endswith(f"{ROW_COUNT} [at least one row]")


def test_frame_without_any_column_fails_on_columns_and_row_count() -> None:
    report = validate(pd.DataFrame())

    assert failed(report) == {
        (COLUMNS, "required columns present, no unknown columns"),
        (ROW_COUNT, "at least one row"),
    }


# --------------------------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def broken_report(btc_4h: pd.DataFrame) -> ValidationReport:
    frame = btc_4h.copy()
    frame.loc[5, "close"] = np.nan
    frame.loc[6, "volume"] = -np.inf
    frame.loc[7, "high"] = frame.loc[7, "low"] - 1.0
    return validate(frame)


def test_to_dict_is_json_serialisable_and_complete(broken_report: ValidationReport) -> None:
    data = json.loads(json.dumps(broken_report.to_dict(), allow_nan=False))

    assert data["success"] is False
    assert data["timeframe"] == "4h"
    assert data["first_timestamp"] == "2021-01-01T00:00:00+00:00"
    names = {(f["expectation"], f["check"]) for f in data["failures"]}
    assert (NOT_NULL, "close is not null") in names and (PAIR, "high >= low") in names
    null_close = next(f for f in data["failures"] if f["check"] == "close is not null")
    assert null_close["examples"][0]["close"] is None
    negative_volume = next(f for f in data["failures"] if f["check"] == "volume >= 0")
    assert negative_volume["examples"][0]["volume"] == "-inf"
    assert len(data["expectations"]) == len(broken_report.expectations) > 25
    assert json.loads(broken_report.to_json()) == data


def test_to_markdown_lists_every_rule_and_the_failures_with_rows(broken_report: ValidationReport) -> None:
    markdown = broken_report.to_markdown()

    assert "**FAILED**" in markdown.splitlines()[0]
    assert "| expect_column_values_to_not_be_null | close | close is not null | **FAIL** | 1 |" in markdown
    assert "| expect_column_values_to_be_unique | timestamp | timestamps are unique | pass | 0 |" in markdown
    assert f"### {NOT_NULL} [close is not null]" in markdown
    assert f"### {PAIR} [high >= low]" in markdown
    assert "| 5 | 2021-01-01T20:00:00+00:00 |" in markdown  # the NaN row, by position and open time


def test_data_validation_error_carries_the_report_and_its_message(broken_report: ValidationReport) -> None:
    with pytest.raises(DataValidationError) as raised:
        raise DataValidationError(broken_report)

    assert raised.value.report is broken_report
    assert str(raised.value) == broken_report.error_message()
    first_line = str(raised.value).splitlines()[0]
    assert "test BTCUSDT 4h" in first_line
    assert f"{NOT_NULL} [close is not null]" in first_line and f"{PAIR} [high >= low]" in first_line


def test_input_frame_is_not_mutated(btc_4h: pd.DataFrame) -> None:
    frame = btc_4h.iloc[::-1].copy()  # unsorted, with a non-default index
    frame.index = frame.index + 1000
    frame.loc[1005, "close"] = np.nan
    before = frame.copy(deep=True)

    report = validate(frame)

    assert not report.success
    pd.testing.assert_frame_equal(frame, before, check_exact=True)
    assert list(frame.columns) == list(before.columns)


def test_ge_prints_no_progress_bars(btc_4h: pd.DataFrame, capfd: pytest.CaptureFixture[str]) -> None:
    validate(btc_4h)

    captured = capfd.readouterr()
    assert "Calculating Metrics" not in captured.err + captured.out


def test_report_is_frozen(broken_report: ValidationReport) -> None:
    with pytest.raises(AttributeError):
        broken_report.success = True  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("BTCUSDT_1h.parquet", ("BTCUSDT", Timeframe.H1)),
        ("data/raw/sample/ETHUSDT_4h.parquet", ("ETHUSDT", Timeframe.H4)),
        (Path("/x/SOLUSDT_1d.parquet"), ("SOLUSDT", Timeframe.D1)),
        ("BTCUSDT_15m.parquet", ("BTCUSDT", Timeframe.M15)),
        ("BTCUSDT_2h.parquet", None),
        ("BTCUSDT_1h.csv", None),
        ("btcusdt_1h.parquet", None),
        ("PROVENANCE.md", None),
        ("BTCUSDT_1h.parquet.tmp", None),
    ],
)
def test_dataset_filename_parsing(path: str | Path, expected: tuple[str, Timeframe] | None) -> None:
    assert parse_dataset_filename(path) == expected
