"""A champion is judged again at every promotion run by the same hurdle on the same newest window; after
``promotion.retire_after`` failures in a row ``@champion`` is taken off it, and the trader then opens nothing
(exits go on) until a version holds the alias again, said once."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest

from pricelevel.backtest.trading import TradingScore
from pricelevel.inference.contest import ContenderScore, Contest
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.gate import champion_on_window, rejudge_champion
from pricelevel.registry.promotion import failures_after, judge_champion, retires
from pricelevel.registry.versions import (
    CHAMPION_FAILURES_TAG,
    CHAMPION_VERDICT_TAG,
    alias_version,
    champion_history,
    champion_status,
    list_versions,
    rollback_champion,
    set_alias,
)
from pricelevel.trading.models import NO_VERSION, ModelProvider

HURDLE = {"cash": 0.0, "level_rule": 0.4, "volatility": 0.9, "buy_and_hold": 1.5}


def _score(sharpe: float) -> TradingScore:
    return dataclasses.replace(TradingScore.cash(), sharpe=sharpe, n_trades=20)


def _contest(champion_sharpe: float) -> Contest:
    stamp = pd.Timestamp("2024-06-01", tz="UTC")
    return Contest(start=stamp, end=stamp + pd.Timedelta(days=90), rows=100, bars=540,
                   challenger=ContenderScore("2", {}, {}, 0.5, _score(0.1)),
                   champion=ContenderScore("1", {}, {}, 0.4, _score(champion_sharpe)),
                   classifier_baselines={"majority": 0.3}, strategy_baselines={k: _score(v) for k, v in HURDLE.items()})


# ------------------------------------------------------------------------------------ the rule (pure)


def test_the_champion_faces_the_challengers_hurdle_and_is_retired_after_retire_after_failures_in_a_row() -> None:
    config = PromotionConfig()
    assert config.retire_after == 2
    passed = judge_champion("1", 1.0, HURDLE, config, previous_failures=1)
    assert passed.passed and passed.failures == 0 and not passed.retired and "still clears" in passed.reason
    assert "buy_and_hold 1.50, not in the hurdle" in passed.reason  # the market beside it
    first = judge_champion("1", 0.5, HURDLE, config, previous_failures=0)
    assert not first.passed and first.failures == 1 and not first.retired
    assert "does not beat volatility 0.90" in first.reason and "1 failure(s) in a row" in first.reason
    second = judge_champion("1", 0.5, HURDLE, config, previous_failures=first.failures)
    assert second.retired and second.failures == 2 and "RETIRED" in second.reason
    # 0 = never; a champion replaced in the same run is not retired (the alias already moved)
    assert not judge_champion("1", 0.5, HURDLE, PromotionConfig(retire_after=0), previous_failures=9).retired
    replaced = judge_champion("1", 0.5, HURDLE, config, previous_failures=1, replaced_by="2")
    assert not replaced.retired and "replaced by v2" in replaced.reason
    assert [failures_after(f, p) for f, p in ((0, False), (3, False), (3, True))] == [1, 4, 0]
    assert [retires(n, 2) for n in (1, 2, 3)] == [False, True, True] and not retires(5, 0)
    # a NaN strategy (never traded) fails, as for a challenger
    assert not judge_champion("1", float("nan"), HURDLE, config, 0).passed
    assert champion_on_window(_contest(0.5).champion, _contest(0.5), config, "sharpe", 1).retired


# ------------------------------------------------------------------------------------ the registry


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("pricelevel")
    for _ in range(2):
        client.create_model_version("pricelevel", source=str(folder / "artifacts"), run_id=None)
    return client


def test_failures_are_counted_on_the_version_and_the_second_retires_it(client) -> None:
    set_alias(client, "pricelevel", "champion", "1")
    config = PromotionConfig()

    def judged(sharpe: float):
        contest = _contest(sharpe)
        return rejudge_champion(client, "pricelevel", contest.champion, contest, config, "sharpe", "2024-09-01T00:00:00")

    assert judged(0.5).failures == 1
    assert client.get_model_version("pricelevel", "1").tags[CHAMPION_FAILURES_TAG] == "1"
    assert alias_version(client, "pricelevel", "champion") == "1"
    assert judged(1.0).passed  # passing starts the count again
    assert client.get_model_version("pricelevel", "1").tags[CHAMPION_FAILURES_TAG] == "0"
    assert not judged(0.5).retired
    verdict = judged(0.2)
    assert verdict.retired and alias_version(client, "pricelevel", "champion") is None
    tags = client.get_model_version("pricelevel", "1").tags
    assert (tags[CHAMPION_FAILURES_TAG], tags[CHAMPION_VERDICT_TAG]) == ("2", "retired")
    # `pricelevel models` says it; the retired version can be put back by hand
    status = champion_status(list_versions(client, "pricelevel"))
    assert status is not None and "RETIRED" in status and "volatility" in status
    assert champion_history(client, "pricelevel")[-1] == "1"
    assert rollback_champion(client, "pricelevel") == (None, "1")
    assert alias_version(client, "pricelevel", "champion") == "1"


# ------------------------------------------------------------------------------------ the trader's side


class _Registry:
    """The alias map a ModelProvider resolves (a retired champion: no entry)."""

    def __init__(self, version: str | None) -> None:
        self.version = version

    def resolve(self, uri: str) -> str:
        if self.version is None:
            raise LookupError(f"no version of pricelevel holds @champion ({uri})")
        return self.version

    @staticmethod
    def load(uri: str) -> SimpleNamespace:
        version = uri.rsplit("/", 1)[-1] if "@" not in uri else "1"
        spec = SimpleNamespace(symbols=("BTCUSDT",), timeframe="4h", rules={"threshold": 0.5},
                               table_spec=lambda: SimpleNamespace(input_timeframes=("4h",)))
        return SimpleNamespace(version=version, spec=spec)


def test_without_a_champion_the_trader_keeps_its_model_for_exits_and_opens_nothing_said_once() -> None:
    registry = _Registry("1")
    models = ModelProvider("models:/pricelevel@champion", registry.resolve, registry.load)
    assert models.refresh() is None and models.entry_refusal() is None
    registry.version = None  # retired by the gate
    switch = models.refresh()
    assert switch is not None and not switch.accepted and switch.to_version == NO_VERSION
    assert "no new entries" in switch.reason and "exits go on" in switch.reason
    assert models.current.version == "1"  # still loaded: it manages the open positions
    assert "no new entries" in models.entry_refusal()
    assert models.refresh() is None  # said once
    registry.version = "1"  # re-earned
    back = models.refresh()
    assert back is not None and back.accepted and models.entry_refusal() is None
    registry.version = None
    models.refresh()
    registry.version = "2"  # another version earns it: switch and entries again
    moved = models.refresh()
    assert moved.accepted and models.current.version == "2" and models.entry_refusal() is None


def test_a_trader_restarted_after_retirement_loads_its_last_version_with_entries_off() -> None:
    registry = _Registry(None)
    models = ModelProvider("models:/pricelevel@champion", registry.resolve, registry.load, last_version="3")
    assert models.current.version == "3" and models.entry_refusal() is not None
    assert models.refresh() is None  # already said at start-up by the refusal
    fresh = ModelProvider("models:/pricelevel@champion", _Registry("4").resolve, registry.load, last_version="3")
    assert fresh.current.version == "4" and fresh.entry_refusal() is None


def test_a_replayed_trader_stops_entering_when_the_champion_is_retired_and_its_positions_still_exit(tmp_path) -> None:
    from pricelevel.backtest.config import BacktestConfig
    from pricelevel.data.folder import CandleFolder
    from pricelevel.trading.config import RiskConfig
    from pricelevel.trading.events import RecordingNotifier
    from pricelevel.trading.service import open_replay
    from pricelevel.trading.state import DECISIONS, TRADES, StateStore
    from tests.conftest import SAMPLE
    from tests.test_telegram import SPEC, FakeModel

    for symbol in SPEC.symbols:
        h4 = pd.read_parquet(SAMPLE / f"{symbol}_4h.parquet").iloc[:240]
        h4.to_parquet(tmp_path / f"{symbol}_4h.parquet")
        for tf in ("1d", "1h"):
            frame = pd.read_parquet(SAMPLE / f"{symbol}_{tf}.parquet")
            frame[frame["timestamp"] < h4["timestamp"].iloc[-1] + pd.Timedelta(hours=4)].to_parquet(tmp_path / f"{symbol}_{tf}.parquet")
    registry = {"champion": "1"}

    def resolve(uri: str) -> str:
        if "champion" not in registry:
            raise LookupError("no version holds @champion")
        return registry["champion"]

    models = ModelProvider("models:/fake@champion", resolve, lambda uri: FakeModel())
    store, notes = StateStore(f"sqlite:///{tmp_path / 'state.db'}"), RecordingNotifier()
    replay = open_replay(CandleFolder.open(tmp_path), models, store, BacktestConfig(), RiskConfig(), notifier=notes)
    bars = replay.bars[-60:]
    replay.trader.replay(bars[:30])
    entered = len(store.frame(TRADES)) + len(replay.trader.execution.positions())
    assert entered > 0
    del registry["champion"]  # the gate retired it
    replay.trader.replay(bars[30:])
    decisions = store.frame(DECISIONS)
    late = decisions[pd.to_datetime(decisions["bar_time"], utc=True) >= bars[30]]
    refused = late[late["signal"] == "entry"]
    assert len(refused) > 0 and refused["verdict"].str.contains("no version holds @champion").all()
    trades = store.frame(TRADES)
    assert (pd.to_datetime(trades["entry_time"], utc=True) < bars[31]).all()  # nothing opened after the retirement
    assert not replay.trader.execution.positions()  # what was open when it was retired has exited
    removed = [text for kind, text in notes.messages if "@champion was removed" in text]
    assert len(removed) == 1  # said once
