"""The whole loop, backtested (``pricelevel research rolling``): every step retrains on the candles closed by
then, is judged by the promotion gate, and its champion trades until the next step; never a later candle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.market import Market
from pricelevel.backtest.trading import TradingScore
from pricelevel.config import load_project_config
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.inference.contest import ContenderScore, Contest
from pricelevel.registry.promotion import Decision
from pricelevel.research.report import rolling_markdown, write_rolling
from pricelevel.research.rolling import (
    KEPT,
    RETIRE,
    ChainedAccount,
    Model,
    PolicyState,
    RollingConfig,
    RollingResult,
    policies_of,
    rolling_backtest,
)
from pricelevel.strategy.rules import StrategyRules

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
def test_both_policies_are_replayed_on_the_same_retrains(clean: tuple[RollingResult, Path]) -> None:
    """The retire-after-failures policy beside "kept until beaten": same steps and challengers, each policy's
    champion follows its own decisions, its own chained account, its curve and score in the JSON, page and
    summary; while no champion is retired both policies trade the same bars the same way."""
    result, out = clean
    config = tiny_config()
    json_path, html_path = write_rolling(result, out, config.tuning.metric, config.selection.metric)
    payload = json.loads(json_path.read_text())
    policies = payload["policies"]
    assert list(policies) == [KEPT, RETIRE]
    assert (policies[KEPT]["retire_after"], policies[RETIRE]["retire_after"]) == (0, config.promotion.retire_after)
    for name, policy in policies.items():
        champion = None
        for step, segment in zip(payload["steps"], policy["segments"], strict=True):
            mine = step["policies"][name]
            assert mine["champion_before"] == champion
            if mine["decision"] == "promoted":
                champion = step["challenger"]
            elif mine["retired"]:
                assert name == RETIRE and mine["champion_verdict"]["retired"]
                champion = None
            assert mine["champion_after"] == champion == segment["champion"]
        assert policy["segments"][0]["equity_start"] == config.backtest.init_cash
        assert payload["curves"][policy["curve"]][-1] == pytest.approx(policy["segments"][-1]["equity_end"])
        assert policy["score"] == payload["scores"][policy["curve"]]
    assert policies[KEPT]["segments"] == payload["segments"]  # the top level is the kept policy's
    if not any(step["policies"][RETIRE]["retired"] for step in payload["steps"]):
        assert payload["curves"]["rolling_retire"] == pytest.approx(payload["curves"]["rolling"])
    assert "retired after 2 failures" in html_path.read_text()
    summary = rolling_markdown(result)
    assert "stays until a challenger beats it" in summary and "retired after 2 hurdle failures" in summary


def contest(champion_sharpe: float | None, level_rule: float = 0.2) -> Contest:
    """A promotion window on which the champion (if any) has ``champion_sharpe``; cash 0, the controls above it."""
    def score(version: str, sharpe: float) -> ContenderScore:
        return ContenderScore(version, {}, {"pr_auc": 0.5}, 0.5, TradingScore(sharpe, 0, 0, 0, 0, 10, 0, 0, 0))

    baselines = {"cash": TradingScore.cash(), "level_rule": TradingScore(level_rule, 0, 0, 0, 0, 5, 0, 0, 0),
                 "volatility": TradingScore(0.1, 0, 0, 0, 0, 5, 0, 0, 0)}
    champion = None if champion_sharpe is None else score("champion", champion_sharpe)
    at = pd.Timestamp("2024-01-01", tz="UTC")
    return Contest(at, at, 100, 100, score("challenger", 1.0), champion, {"majority": 0.3}, baselines)


def model(name: str) -> Model:
    return Model(name, lambda features, symbol_id: np.zeros(len(symbol_id)), spec=None)  # type: ignore[arg-type]


REJECTED, PROMOTED = Decision(False, "rejected", {}), Decision(True, "promoted", {})


def test_a_champion_that_keeps_failing_the_hurdle_is_retired_only_under_the_retire_policy() -> None:
    """The gate's own champion rule (`champion_on_window`) at every step: two failures in a row retire the champion
    under `retire` (the account then has none, the retired model manages its positions); `kept` keeps it. A pass
    resets the count; a champion replaced in the same step is not retired."""
    config = tiny_config()
    kept, retire = (PolicyState(p, account=None) for p in policies_of(config.promotion))  # type: ignore[arg-type]
    first, second, third = model("step-0"), model("step-1"), model("step-2")
    for state in (kept, retire):
        assert state.decide(config, first, contest(None), PROMOTED).champion_after == "step-0"
    # fails (0.1 < level rule 0.2), passes (0.5), fails, fails: retired at the second failure in a row
    for sharpe, failures, retired in ((0.1, 1, None), (0.5, 0, None), (0.1, 1, None), (-0.3, 2, "step-0")):
        both = [state.decide(config, second, contest(sharpe), REJECTED) for state in (kept, retire)]
        assert both[0].champion_after == "step-0" and not both[0].verdict.retired
        assert both[1].retired == retired and both[1].champion_after == (None if retired else "step-0")
        assert both[0].verdict.failures == both[1].verdict.failures == failures
    assert kept.failures == 2 and kept.champion is first
    assert retire.champion is None and retire.managing is first and retire.failures == 0
    # no champion now: the next model must earn it as a first champion (no champion in its contest)
    assert retire.decide(config, third, contest(None), REJECTED).verdict is None and retire.managing is first
    assert retire.decide(config, third, contest(None), PROMOTED).champion_after == "step-2" and retire.managing is None
    # a champion replaced in the step where it reaches its limit is replaced, not retired
    retire.decide(config, first, contest(0.1), REJECTED)
    replaced = retire.decide(config, second, contest(0.1), PROMOTED)
    assert replaced.verdict.failures == 2 and not replaced.verdict.retired and replaced.retired is None
    assert replaced.champion_after == "step-1"


def test_a_retired_champion_only_exits_its_positions() -> None:
    """Without entries allowed the account opens nothing; a position open at the boundary still leaves by its
    own time stop. With entries allowed the same bars trade (so the test can fail)."""
    costs = tiny_config().backtest
    bars = 24
    timestamps = pd.date_range("2024-01-01", periods=bars, freq="4h", tz="UTC")
    price = np.full((bars, 1), 100.0) + np.arange(bars)[:, None] * 0.1
    market = Market(timestamps, ("BTCUSDT",), price, price + 0.5, price - 0.5, price, Timeframe("4h"))
    rules = StrategyRules(threshold=0.5, max_hold_bars=4)
    always = np.ones((bars, 1))
    counts = {}
    for allowed in (True, False):
        account = ChainedAccount(market, costs)
        account.trade(slice(0, 6), always[0:6], rules)
        account.trade(slice(6, bars), always[6:], rules, entries_allowed=allowed)
        trades = account.result().trades
        # a buy signalled on the segment's last bar fills at the next open (decided before the step): not counted
        counts[allowed] = int((trades["entry_bar"] > 6).sum())
        if not allowed:  # the position open at the boundary left by its own time stop; nothing is open
            assert (trades["entry_bar"] < 6).any() and (trades["exit_bar"] >= 6).any()
            assert account.state.position.sum() == 0
    assert counts[False] == 0 < counts[True]


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
