"""`pricelevel levels`, `backtest --model`, `models` and `train` as a user meets them: exit codes, one-line
errors with hints, and levels that are walk-forward at the command line too."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SAMPLE

ASOF = "2023-06-01"


def _levels(cli, out: Path, *extra: str, data: str = "data/sample", asof: str = ASOF) -> tuple[int, str, str]:
    return cli("levels", "--data", data, "--symbol", "BTCUSDT", "--timeframe", "4h", "--asof", asof,
               "--json", str(out), *extra)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def in_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    return project


def test_levels_writes_sorted_prices_in_force_at_asof(cli, in_project: Path, tmp_path: Path) -> None:
    out = tmp_path / "levels.json"
    code, stdout, err = _levels(cli, out)
    assert code == 0, err
    document = json.loads(out.read_text())
    assert document["asof"] == "2023-06-01T00:00:00+00:00"
    assert (document["symbol"], document["timeframe"], document["raw"]) == ("BTCUSDT", "4h", False)
    prices = [level["price"] for level in document["levels"]]
    assert prices and prices == sorted(prices)
    for level in document["levels"]:  # every kept level passed the filters of conf/base.yaml
        config = document["config"]["filters"]
        assert level["touches"] >= config["touches"]["min_touches"]
        assert level["age_days"] <= config["age"]["max_age_days"]
        assert level["volume_ratio"] >= config["volume"]["factor"]
        assert pd.Timestamp(level["last_seen"]) < pd.Timestamp(document["asof"])
    flat = "".join(stdout.split())  # rich may wrap long lines
    assert "levelsinforceat2023-06-0100:00UTC" in flat and str(out) in flat

    # the same instant written with an offset is the same asof
    other = tmp_path / "offset.json"
    code, _, err = _levels(cli, other, asof="2023-06-01T02:00+02:00")
    assert code == 0, err
    assert json.loads(other.read_text()) == document


def test_raw_levels_are_a_superset(cli, in_project: Path, tmp_path: Path) -> None:
    filtered, raw = tmp_path / "filtered.json", tmp_path / "raw.json"
    assert _levels(cli, filtered)[0] == 0
    code, _, err = _levels(cli, raw, "--raw")
    assert code == 0, err
    kept = {level["price"] for level in json.loads(filtered.read_text())["levels"]}
    raw_document = json.loads(raw.read_text())
    everything = [level["price"] for level in raw_document["levels"]]
    assert raw_document["raw"] is True and everything == sorted(everything)
    assert kept < set(everything)  # strictly more before the filters


def test_a_bad_timeframe_is_a_usage_error(cli, in_project: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    code, _, err = cli("levels", "--data", "data/sample", "--symbol", "BTCUSDT", "--timeframe", "3h",
                       "--asof", ASOF, "--json", str(out))
    assert code == 2
    assert _error_lines(err) == ["error: unknown timeframe '3h'; use one of 1d, 4h, 1h, 15m, 1m"]
    assert not out.exists()


def test_a_missing_folder_is_one_line_and_exit_1(cli, in_project: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    code, _, err = _levels(cli, out, data=str(tmp_path / "nowhere"))
    assert code == 1
    assert _error_lines(err) == [f"error: {tmp_path / 'nowhere'}: no such folder"]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint:") and "SYMBOL_TF.parquet" in lines[1]
    assert "Traceback" not in err and not out.exists()


def test_levels_before_the_data_starts_are_empty(cli, in_project: Path, tmp_path: Path) -> None:
    out = tmp_path / "early.json"
    code, _, err = _levels(cli, out, asof="2020-06-01")
    assert code == 0, err
    document = json.loads(out.read_text())
    assert document["levels"] == [] and document["asof"] == "2020-06-01T00:00:00+00:00"


def test_levels_at_asof_do_not_change_when_later_data_is_cut(cli, in_project: Path, tmp_path: Path) -> None:
    asof = pd.Timestamp(ASOF, tz="UTC")
    cut = tmp_path / "cut"
    cut.mkdir()
    for tf in ("1d", "4h", "1h"):
        frame = pd.read_parquet(SAMPLE / f"BTCUSDT_{tf}.parquet")
        frame[frame["timestamp"] <= asof].to_parquet(cut / f"BTCUSDT_{tf}.parquet")
    full, short = tmp_path / "full.json", tmp_path / "short.json"
    assert _levels(cli, full)[0] == 0
    code, _, err = _levels(cli, short, data=str(cut))
    assert code == 0, err
    full_document = json.loads(full.read_text())
    assert full_document["levels"]  # not trivially equal
    assert json.loads(short.read_text()) == full_document
    # and for raw levels too
    assert _levels(cli, full, "--raw")[0] == 0 and _levels(cli, short, "--raw", data=str(cut))[0] == 0
    assert json.loads(short.read_text()) == json.loads(full.read_text())


def test_backtest_model_without_a_registry_names_the_model_and_hints_at_train(cli, project: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    pd.read_parquet(SAMPLE / "BTCUSDT_4h.parquet").iloc[:300].to_parquet(data / "BTCUSDT_4h.parquet")
    code, _, err = cli("backtest", "--model", "models:/pricelevel@champion", "--data", str(data))
    assert code == 1
    errors = _error_lines(err)
    assert len(errors) == 1 and "'pricelevel'" in errors[0] and "`pricelevel train`" in errors[0]
    hint = [line for line in err.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1 and "`pricelevel train`" in hint[0] and "@champion" in hint[0]
    assert "Traceback" not in err


def test_models_in_a_fresh_project_says_there_are_none(cli, project: Path) -> None:
    code, out, err = cli("models")
    assert code == 0, err
    assert "no versions yet" in out and "pricelevel train" in out
    assert str(project / "mlruns" / "mlflow.db") in "".join(out.split())  # the title may wrap


def test_backtest_needs_signals_or_a_model(cli, project: Path, tmp_path: Path) -> None:
    code, _, err = cli("backtest")
    assert code == 2 and _error_lines(err) == ["error: give --candles and --signals, or --model and --data"]
    code, _, err = cli("backtest", "--model", "models:/pricelevel@champion")  # no --data
    assert code == 2 and "--model needs --data" in err


def test_train_quick_and_config_together_is_a_usage_error(cli, project: Path, tmp_path: Path) -> None:
    config = tmp_path / "x.yaml"
    config.write_text("model:\n  hidden_size: 4\n")
    code, _, err = cli("train", "--quick", "--config", str(config))
    assert code == 2
    assert len(_error_lines(err)) == 1 and "--quick" in _error_lines(err)[0]
    assert not (project / "mlruns").exists() and not (project / "data" / "derived").exists()  # nothing started
