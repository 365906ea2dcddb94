"""The look-ahead checker: passes on the real pipeline, and catches a feature that peeks at the next bar, a
longer timeframe joined before its candle closed, and a label whose horizon is understated."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import pytest

import pricelevel.features.tables as training
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.features.lookahead import check_lookahead, compare, cut_frames, cut_rows, report_lines
from pricelevel.features.tables import TableSpec
from pricelevel.levels.config import LevelsConfig
from tests.conftest import SAMPLE

LEVELS = LevelsConfig.model_validate({"lookback_days": 120, "refit_every": 6, "filters": {"volume": {"factor": 0.8}}})
FORWARD = LabelsConfig(kind="forward_move", move_frac=0.02, horizon=6)
BARRIER = LabelsConfig(kind="triple_barrier", upper=0.03, lower=0.02, horizon=6)
BARRIER_ATR = LabelsConfig(kind="triple_barrier", barrier_unit="atr", upper=2.0, lower=1.0, horizon=6)
RICH = FeaturesConfig()
TF = Timeframe.H4
ROWS = 2500


def _frames(symbol: str) -> dict[Timeframe, pd.DataFrame | None]:
    """The first ROWS 4h bars of a symbol and the other timeframes up to the same time."""
    frames = TableSpec(TF, LEVELS, FORWARD, RICH).read_frames(CandleFolder.open(SAMPLE), symbol)
    end = frames[TF]["timestamp"].iloc[ROWS - 1] + TF.delta
    return cut_frames(frames, int(end.value))


@pytest.fixture(scope="module")
def frames() -> dict[str, dict[Timeframe, pd.DataFrame | None]]:
    return {symbol: _frames(symbol) for symbol in ("BTCUSDT", "SOLUSDT")}


def real_build(labels: LabelsConfig = FORWARD):
    return TableSpec(TF, LEVELS, labels, RICH).table


def test_cut_frames_keep_only_candles_closed_by_then(frames) -> None:
    btc = frames["BTCUSDT"]
    until = btc[TF]["timestamp"].iloc[100] + TF.delta
    cut = cut_frames(btc, int(until.value))
    assert len(cut[TF]) == 101
    assert (cut[Timeframe.D1]["timestamp"] + pd.Timedelta(days=1) <= until).all()
    assert btc[Timeframe.D1]["timestamp"].iloc[len(cut[Timeframe.D1])] + pd.Timedelta(days=1) > until
    assert cut_rows(1000, 3, first_row=100) == [324, 549, 774]
    assert cut_rows(1, 3) == []


@pytest.mark.parametrize("labels", [FORWARD, LabelsConfig(kind="level_label", threshold_frac=0.005, horizon=2),
                                    BARRIER, BARRIER_ATR],
                         ids=["forward_move", "level_label", "triple_barrier", "triple_barrier_atr"])
def test_the_real_pipeline_has_no_look_ahead(frames, labels: LabelsConfig) -> None:
    report = check_lookahead(frames, TF, real_build(labels), labels.horizon, cuts=2)
    assert report.ok, report_lines(report)
    summary = report.summary()
    columns = len(real_build(labels)(frames["BTCUSDT"]).columns) - 1
    assert summary["values_compared"] > 2 * 2 * 500 * columns  # every column of every row up to each cut
    assert len(report.checks) == 2 and all(len(c.cuts) == 2 for c in report.checks)


def test_a_feature_peeking_at_the_next_bar_is_caught(frames) -> None:
    def leaky(f: Mapping[Timeframe, pd.DataFrame | None]) -> pd.DataFrame:
        table = real_build()(f)
        table["feature_next_close"] = table["close"].shift(-1)  # the bug: tomorrow's close as today's input
        return table

    report = check_lookahead({"BTCUSDT": frames["BTCUSDT"]}, TF, leaky, FORWARD.horizon, cuts=3)
    assert not report.ok
    differences = report.differences
    assert {d.column for d in differences} == {"feature_next_close"}
    # exactly the last bar of each cut: NaN there on the cut data, the next close on the full data
    assert [d.timestamp for d in differences] == list(report.checks[0].cuts)
    assert all(np.isnan(d.cut_value) and np.isfinite(d.full) for d in differences)
    assert "feature_next_close at" in report_lines(report)[0] and "LOOK-AHEAD" in report_lines(report)[-1]


def test_a_daily_candle_joined_at_its_open_is_caught(frames) -> None:
    """A classic multi-timeframe bug: the day's close used from the first 4h bar of that day on."""

    def leaky(f: Mapping[Timeframe, pd.DataFrame | None]) -> pd.DataFrame:
        table = real_build()(f)
        daily = f[Timeframe.D1][["timestamp", "close"]].rename(columns={"close": "feature_daily_close"})
        joined = pd.merge_asof(table[["timestamp"]], daily, on="timestamp")  # joined by open time: leaks
        table["feature_daily_close"] = joined["feature_daily_close"].to_numpy() / table["close"]
        return table

    report = check_lookahead({"BTCUSDT": frames["BTCUSDT"]}, TF, leaky, FORWARD.horizon, cuts=3)
    assert not report.ok and {d.column for d in report.differences} == {"feature_daily_close"}
    assert all(d.timestamp.floor("1D") == d.cut.floor("1D") for d in report.differences)


@pytest.mark.parametrize("labels", [FORWARD, BARRIER, BARRIER_ATR], ids=["forward_move", "triple_barrier", "atr"])
def test_a_label_horizon_understated_is_caught(frames, labels: LabelsConfig) -> None:
    report = check_lookahead({"SOLUSDT": frames["SOLUSDT"]}, TF, real_build(labels), labels.horizon - 1, cuts=2)
    assert not report.ok and {d.column for d in report.differences} == {"target"}


def test_a_triple_barrier_looking_one_bar_past_its_horizon_is_caught(frames) -> None:
    """The label of bar t may read bars up to t + horizon: one that also reads the bar after is a leak."""
    def leaky(f: Mapping[Timeframe, pd.DataFrame | None]) -> pd.DataFrame:
        table = real_build(BARRIER)(f)
        longer = BARRIER.model_copy(update={"horizon": BARRIER.horizon + 1})
        table["target"] = training.targets(f[TF], table["near_level"].to_numpy(), longer)
        return table

    report = check_lookahead({"BTCUSDT": frames["BTCUSDT"]}, TF, leaky, BARRIER.horizon, cuts=3)
    assert not report.ok and {d.column for d in report.differences} == {"target"}


def test_compare_reports_changed_rows_and_a_shifted_timeline() -> None:
    stamps = pd.date_range("2024-01-01", periods=5, freq="4h", tz="UTC")
    full = pd.DataFrame({"timestamp": stamps, "feature_a": [1.0, np.nan, 3, 4, 5], "target": [0.0, 1, 0, 1, 0]})
    cut = full.iloc[:4].copy()
    cut.loc[3, "target"] = np.nan  # allowed: within the horizon of the cut
    assert compare("X", stamps[3], full, cut, horizon=1) == ([], 4 + 3)
    cut.loc[2, "feature_a"] = 3.0 + 1e-6
    found, _ = compare("X", stamps[3], full, cut, horizon=1)
    assert [(d.column, d.timestamp) for d in found] == [("feature_a", stamps[2])]
    shifted = cut.assign(timestamp=cut["timestamp"] + pd.Timedelta(hours=1))
    assert compare("X", stamps[3], full, shifted, horizon=1)[0][0].column == "timestamp"


def test_the_check_runs_on_every_bundled_symbol_from_the_command_line(cli, project) -> None:
    code, out, err = cli("check", "lookahead", "--data", str(SAMPLE), "--cuts", "1",
                         "--set", "dataset.timeframe=1d", "--set", "labels.horizon=3")
    assert code == 0, err
    assert "no look-ahead found: 10 symbol(s), 10 cuts" in out


def test_the_command_fails_naming_the_column_when_a_feature_leaks(cli, project, monkeypatch) -> None:
    real = training.compute_features

    def peeking(candles, timeframe, columns, history=None, context=None):
        values = real(candles, timeframe, columns, history, context)
        values["log_return"] = values["log_return"].shift(-1)  # next bar's return
        return values

    monkeypatch.setattr(training, "compute_features", peeking)
    code, out, _ = cli("check", "lookahead", "--data", str(SAMPLE), "--symbols", "ETHUSDT", "--cuts", "2",
                       "--set", "dataset.timeframe=4h")
    assert code == 1
    assert "ETHUSDT cut at" in out and "feature_log_return at" in out and "LOOK-AHEAD" in out
