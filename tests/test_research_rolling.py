"""The whole loop, backtested (``pricelevel research rolling``): every step retrains on the candles closed by
then, is judged by the promotion gate, and its champion trades until the next step; never a later candle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricelevel.config import load_project_config
from pricelevel.data.folder import CandleFolder
from pricelevel.research.report import write_rolling
from pricelevel.research.rolling import RollingConfig, RollingResult, rolling_backtest

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ("BTCUSDT", "ETHUSDT")
#: A tiny retrain: two symbols, one trial of one epoch, one fold.
TINY = [f"data.symbols=[{','.join(SYMBOLS)}]", "tuning.n_trials=1", "tuning.max_epochs=1", "model.max_epochs=1",
        "evaluation.folds=1", "tuning.space.seq_len=[24]"]
FIRST, END = pd.Timestamp("2024-03-01", tz="UTC"), pd.Timestamp("2024-06-01", tz="UTC")
TWO_STEPS = RollingConfig(start=FIRST, every=pd.Timedelta("60D"), end=END)  # 03-01, 04-30


def slice_folder(sample_dir: Path, out: Path, poison_after: pd.Timestamp | None = None) -> Path:
    """The two symbols' candles from 2022-06 on; with ``poison_after``, every candle that closes after it is
    replaced by noise (prices x random factors), in every timeframe."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for path in sorted(sample_dir.glob("*.parquet")):
        if not path.name.startswith(SYMBOLS) or "_15m" in path.name:
            continue
        frame = pd.read_parquet(path)
        frame = frame[frame["timestamp"] >= pd.Timestamp("2022-06-01", tz="UTC")].reset_index(drop=True)
        if poison_after is not None:
            step = pd.Timedelta(path.stem.split("_")[1])
            late = frame["timestamp"] + step > poison_after
            factor = rng.uniform(0.5, 1.5, int(late.sum()))
            for column in ("open", "high", "low", "close"):
                frame.loc[late, column] = frame.loc[late, column].to_numpy() * factor
            frame.loc[late, "high"] = frame.loc[late, ["open", "high", "low", "close"]].max(axis=1)
            frame.loc[late, "low"] = frame.loc[late, ["open", "high", "low", "close"]].min(axis=1)
        frame.to_parquet(out / path.name, index=False)
    return out


def tiny_config():
    return load_project_config(ROOT / "conf" / "quick.yaml", TINY)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> tuple[RollingResult, Path]:
    base = tmp_path_factory.mktemp("rolling")
    folder = slice_folder(sample_dir, base / "candles")
    out = base / "out"
    return rolling_backtest(tiny_config(), CandleFolder.open(folder), TWO_STEPS, out), out


@pytest.mark.slow
def test_every_step_has_its_decision_and_the_equity_is_chained(clean: tuple[RollingResult, Path]) -> None:
    result, out = clean
    config = tiny_config()
    json_path, html_path = write_rolling(result, out, config.tuning.metric, config.selection.metric)
    payload = json.loads(json_path.read_text())
    assert [s["at"][:10] for s in payload["steps"]] == ["2024-03-01", "2024-04-30"]
    for step in payload["steps"]:
        assert step["decision"] in ("promoted", "rejected") and step["reason"]
        assert step["trained_on_candles_to"] < step["at"]  # the last candle it saw opened before the step
        assert set(step["baselines"]) >= {"cash", "buy_and_hold", "level_rule"}
        expected = step["challenger"] if step["decision"] == "promoted" else step["champion_before"]
        assert step["champion_after"] == expected
    segments = payload["segments"]
    assert [s["champion"] for s in segments] == [s["champion_after"] for s in payload["steps"]]
    assert segments[0]["equity_start"] == config.backtest.init_cash
    assert segments[1]["equity_start"] == pytest.approx(segments[0]["equity_end"])  # one account, chained
    curves = payload["curves"]
    assert curves["rolling"][-1] == pytest.approx(segments[-1]["equity_end"])
    assert curves["timestamp"][0].startswith("2024-03-01") and curves["timestamp"][-1] < str(END)
    assert {"rolling", "cash", "buy_and_hold", "level_rule"} <= set(curves) and set(payload["scores"]) >= set(curves) - {"timestamp"}
    assert "chart-rolling" in html_path.read_text() and (out / "plotly.min.js").exists()


@pytest.mark.slow
def test_a_step_never_sees_a_candle_after_it(clean: tuple[RollingResult, Path], tmp_path: Path,
                                              sample_dir: Path) -> None:
    """Candles after the first step replaced by noise: that step's model (its key hashes the data it read) and
    its decision are unchanged; the bars it then trades are the noise (so the poison was there to be seen)."""
    result, _ = clean
    poisoned = slice_folder(sample_dir, tmp_path / "candles", poison_after=FIRST)
    one_step = RollingConfig(start=FIRST, every=pd.Timedelta("200D"), end=END)
    seen = rolling_backtest(tiny_config(), CandleFolder.open(poisoned), one_step, tmp_path / "out")
    mine, theirs = seen.steps[0], result.steps[0]
    assert mine.study == theirs.study  # same model key: same inputs, byte for byte
    assert (mine.decision.promote, mine.decision.reason) == (theirs.decision.promote, theirs.decision.reason)
    assert mine.contest.challenger.classification == theirs.contest.challenger.classification
    assert mine.last_candle == theirs.last_candle < FIRST
    assert not np.allclose(seen.curves["buy_and_hold"].to_numpy(), result.curves["buy_and_hold"].to_numpy())


@pytest.mark.slow
@pytest.mark.flow
def test_the_command_writes_the_json_and_the_page(cli, project: Path, sample_dir: Path, prefect_harness) -> None:
    folder = slice_folder(sample_dir, project / "candles")
    args = [f"--set={item}" for item in TINY]
    code, out, err = cli("research", "rolling", "--quick", "--data", str(folder), "--start", "2024-05-01",
                         "--every", "60d", "--end", "2024-06-01", "--out", str(project / "data" / "research"), *args)
    assert code == 0, err
    payload = json.loads((project / "data" / "research" / "rolling.json").read_text())
    assert len(payload["steps"]) == 1 and "The whole loop, backtested" in out
    assert (project / "data" / "research" / "rolling.html").exists()
