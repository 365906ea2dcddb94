"""The Telegram companion against a fake Bot API on 127.0.0.1 (tests/fakes/telegram_api.py): every command from
an authorised chat answers and acts; from anyone else, nothing; /kill, /rearm and /rollback only after their
button; pending updates dropped at start; a Telegram outage during a replay changes no trade; the token is in
no log line and no message; notification kinds switch off; the outbox's limits, retries, 429s and splitting."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from telegram import Update
from telegram.error import BadRequest, NetworkError, RetryAfter

from pricelevel.backtest.config import BacktestConfig
from pricelevel.core.locks import FileLock
from pricelevel.core.secrets import MissingSecretError
from pricelevel.data.folder import CandleFolder
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.levels.config import LevelsConfig
from pricelevel.ml.spec import POOLED, FeatureStats, ModelSpec
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.versions import move_champion, set_alias, version_for_alias
from pricelevel.strategy.rules import StrategyRules
from pricelevel.telegram import commands
from pricelevel.telegram.bot import auth_filter, authorised
from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.outbox import (
    MAX_MESSAGE,
    Counters,
    MemoryQueue,
    Outbox,
    Outgoing,
    StoredQueue,
    split_message,
)
from pricelevel.telegram.service import (
    TelegramNotifier,
    _daily_summaries,
    message_text,
    seconds_until,
    send_lifecycle,
    telegram_companion,
)
from pricelevel.trading import control
from pricelevel.trading.config import RiskConfig, TraderConfig
from pricelevel.trading.documents import SERVICE
from pricelevel.trading.events import EVENT_KINDS, NoNotifier, RecordingNotifier
from pricelevel.trading.models import ModelProvider
from pricelevel.trading.risk import RiskState
from pricelevel.trading.service import open_replay
from pricelevel.trading.state import EQUITY, OUTBOX, TRADES, StateStore
from tests.conftest import SAMPLE
from tests.fakes.telegram_api import FakeBotAPI, Sent, visible

TOKEN = "123456789:AAFakeTokenForTestsOnly_abcdefghijk"
ENV = {"TELEGRAM_BOT_TOKEN": TOKEN}
ALICE, DESK, BOB, CAROL, EVE, DAVE = 111, -100500, 222, 333, 666, 444  # DESK: a group; EVE, DAVE: strangers
T0 = pd.Timestamp("2024-06-01", tz="UTC")


def tg_config(fake: FakeBotAPI | None, **overrides) -> TelegramConfig:
    """Authorised: Alice's private chat, and Bob and Carol in the desk group. Fast limits for tests."""
    values = dict(enabled=True, chat_ids=(ALICE, DESK), user_ids=(BOB, CAROL), base_url=fake.url if fake else "http://x",
                  per_chat_interval_s=0.0, poll_timeout_s=0.5, request_timeout_s=10.0, retry_backoff_s=0.05,
                  flush_timeout_s=10.0, summary_hour=None)
    return TelegramConfig(**(values | overrides))


@pytest.fixture
def fake():
    with FakeBotAPI(TOKEN) as api:
        yield api


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return trader_store(tmp_path)


def trader_store(tmp_path: Path) -> StateStore:
    """A trader's state after four daily bars: two closed trades, one open BTCUSDT position."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    with store.transaction() as tx:
        for day, (equity, cash) in enumerate([(10_000, 10_000), (10_050, 10_050), (10_020, 10_020), (10_110, 9_610)]):
            store.add_equity(tx, T0 + pd.Timedelta(days=day), equity, cash)
        trade = dict(entry_price=100.0, size=1.0, entry_fees=0.1, exit_fees=0.1, model_version="2")
        store.add_trades(tx, [
            dict(trade, symbol="ETHUSDT", entry_time=T0, exit_time=T0 + pd.Timedelta(days=1), exit_price=160.0, pnl=60.0,
                 exit_reason="take_profit"),
            dict(trade, symbol="SOLUSDT", entry_time=T0, exit_time=T0 + pd.Timedelta(days=3), exit_price=75.0, pnl=-25.0,
                 exit_reason="stop_loss"),
        ])
        store.put(tx, "mode", "paper")
        store.put(tx, "model", {"uri": "models:/pricelevel@champion", "version": "2"})
        store.put(tx, "risk", RiskState(peak_equity=10_110.0).to_dict())
        store.put(tx, "last_bar", str(T0 + pd.Timedelta(days=3)))
        store.put(tx, "execution", {"positions": {"BTCUSDT": {"size": 0.01, "entry_price": 50_000.0, "last_close": 51_000.0}}})
    return store


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def session(fake: FakeBotAPI, store: StateStore, config: TelegramConfig, tracking: TrackingConfig | None = None,
                  lock: Callable = contextlib.nullcontext, **options) -> AsyncIterator[TelegramNotifier]:
    """The companion, entered and polling the fake."""
    async with telegram_companion(config, store, tracking or TrackingConfig(), lock, ENV, **options) as notifier:
        await until(lambda: fake.polls > 0)
        yield notifier


async def ask(fake: FakeBotAPI, text: str, chat: int = ALICE, **user) -> Sent:
    """Send ``text`` as a user and return the bot's first answer."""
    seen = len(fake.sent)
    fake.message(chat, text, **user)
    await until(lambda: len(fake.sent) > seen)
    return fake.sent[seen]


async def press(fake: FakeBotAPI, question: Sent, label: str, chat: int = ALICE, **user) -> str:
    """Press ``label`` under ``question``; returns what the presser sees: the question edited to its outcome (the
    edit must be of ``question`` and remove its buttons), or a short notice when nothing was done."""
    sent, edited, noticed = len(fake.sent), len(fake.edited), len(fake.notices)
    fake.press(chat, question.buttons()[label], message_id=question.message_id, **user)
    await until(lambda: len(fake.edited) > edited or len(fake.sent) > sent
                or any(n not in (None, "expired") for n in fake.notices[noticed:]))
    if len(fake.edited) > edited:
        edit = fake.edited[edited]
        assert (edit.chat_id, edit.message_id) == (chat, question.message_id) and not edit.reply_markup
        return edit.text
    if len(fake.sent) > sent:
        return fake.sent[sent].text
    return next(n for n in fake.notices[noticed:] if n not in (None, "expired"))


STAMP = r"at \d\d:\d\d UTC by @"


def pairs(messages) -> list[tuple[str, str]]:
    """A recorder's messages as ``(kind, text)``: tuples, or notices with ``.kind`` and ``.text``."""
    return [(m.kind, m.text) if hasattr(m, "kind") else tuple(m) for m in messages]


def shown(kind: str, text: str) -> str:
    """A notification as the person sees it (the HTML Telegram renders)."""
    return visible(message_text(kind, text), "HTML")


def pending(store: StateStore) -> list[tuple[str, list[str], str]]:
    return [(c["kind"], c["symbols"], c["by"]) for c in control.status(store)["pending_commands"]]


# ------------------------------------------------------------------------------------------------ commands


def test_every_command_from_an_authorised_chat_answers_and_acts(fake: FakeBotAPI, store: StateStore) -> None:
    async def conversation() -> dict[str, str]:
        answers = {}
        async with session(fake, store, tg_config(fake)):
            for text in ("/help", "/status", "/positions", "/balance", "/profit", "/profit 1", "/profit abc", "/trades 1",
                         "/stop", "/start", "/forceexit BTCUSDT", "/forceexit all", "/forceexit NEARUSDT",
                         "/forceexit a b", "/frobnicate"):
                answers[text] = (await ask(fake, text)).text
            answers["group /status"] = (await ask(fake, "/status", chat=DESK, user_id=BOB, chat_type="group",
                                                  username="bob")).text
        return answers

    answers = asyncio.run(conversation())
    assert all(f"/{name}" in answers["/help"] for name in commands.COMMANDS)
    status = answers["/status"]
    assert "mode: paper" in status and "version 2" in status and "equity: 10,110.00 (cash 9,610.00)" in status
    assert "positions: 1 open (BTCUSDT)" in status and "risk: armed" in status and "over 2 trades" in status
    assert answers["/positions"] == "1 open:\nBTCUSDT: 0.01 at 50000, now 51000 (+2.00%, +10.00)"
    assert "equity: 10,110.00 · cash: 9,610.00 · in positions: 500.00" in answers["/balance"]
    assert "+1.10%" in answers["/balance"] and "realised P&L +35.00" in answers["/balance"]
    assert "2 closed trades (1 won, 1 lost): P&L +35.00" in answers["/profit"] and "all time" in answers["/profit"]
    assert "1 closed trade (0 won, 1 lost): P&L -25.00" in answers["/profit 1"]
    assert "equity 10,020.00 -> 10,110.00" in answers["/profit 1"]
    assert answers["/profit abc"] == "days must be a number, got 'abc'"
    assert answers["/trades 1"].splitlines()[1] == "2024-06-04 00:00 UTC SOLUSDT stop_loss: 100 -> 75 (-25.00%), P&L -25.00"
    assert answers["/stop"].startswith("queued stop: no new entries")
    assert answers["/start"].startswith("Allow new entries again")  # asks first: Telegram's Start button sends it too
    assert answers["/forceexit BTCUSDT"].startswith("queued forceexit BTCUSDT")
    assert answers["/forceexit all"].startswith("queued forceexit all")
    assert answers["/forceexit NEARUSDT"] == "no open position in NEARUSDT: nothing queued (open: BTCUSDT)"
    assert answers["/forceexit a b"].startswith("usage: /forceexit SYMBOL|all")
    assert answers["/frobnicate"] == "unknown command /frobnicate; /help lists them"
    assert "mode: paper" in answers["group /status"] and fake.sent[-1].chat_id == DESK
    # The effect: exactly what `pricelevel trader stop|start|forceexit` queue, by whom.
    assert pending(store) == [("stop", [], "telegram:alice"), ("forceexit", ["BTCUSDT"], "telegram:alice"),
                              ("forceexit", [], "telegram:alice")]


def test_strangers_get_no_reply_and_change_nothing(fake: FakeBotAPI, store: StateStore,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def conversation() -> None:
        async with session(fake, store, tg_config(fake)):
            question = await ask(fake, "/kill")  # Alice asks: a valid button exists
            for text in ("/status", "/kill", "/stop", "/forceexit SECRETXYZUSDT", "/rollback", "hello there"):
                fake.message(EVE, text, username="eve")
            fake.message(DESK, "/stop", user_id=DAVE, chat_type="group", username="dave")  # a listed group, unlisted user
            fake.press(EVE, question.buttons()["Yes, kill"], username="eve")
            fake.press(DESK, question.buttons()["Yes, kill"], user_id=DAVE, chat_type="supergroup", username="dave")
            await ask(fake, "/help")  # handled in order: once answered, every update before it was handled

    caplog.set_level(logging.INFO)
    asyncio.run(conversation())
    assert [s.chat_id for s in fake.sent] == [ALICE, ALICE]  # Alice's question and help: nothing else, to nobody else
    assert pending(store) == [] and fake.answered == []
    ignored = [r.getMessage() for r in caplog.records if "not authorised" in r.getMessage()]
    assert len(ignored) == 9
    assert "telegram: ignored /kill from chat 666 (user 666): not authorised" in ignored
    assert "telegram: ignored button from chat -100500 (user 444): not authorised" in ignored
    assert "SECRETXYZ" not in caplog.text and "hello there" not in caplog.text  # chat id and command, never content


@pytest.mark.parametrize(("chat", "chat_type", "user", "admitted"), [
    (ALICE, "private", ALICE, True), (EVE, "private", EVE, False), (DESK, "group", BOB, True),
    (DESK, "supergroup", CAROL, True), (DESK, "group", DAVE, False), (-999, "group", BOB, False),
])
def test_the_filters_and_the_rule_agree(chat: int, chat_type: str, user: int, admitted: bool) -> None:
    config = tg_config(None)
    update = Update.de_json({"update_id": 1, "message": {
        "message_id": 1, "date": 0, "chat": {"id": chat, "type": chat_type}, "text": "/status",
        "from": {"id": user, "is_bot": False, "first_name": "x"}}}, None)
    assert authorised(config, chat, chat_type, user) is admitted
    assert bool(auth_filter(config).check_update(update)) is admitted
    nobody = TelegramConfig()
    assert not authorised(nobody, chat, chat_type, user) and not auth_filter(nobody).check_update(update)


# ------------------------------------------------------------------------------------------------ confirmation


class FakeRegistryClient:
    """The few ``MlflowClient`` calls of :mod:`pricelevel.registry.versions`, in memory: creating a real MLflow
    store takes seconds, and ``rollback_champion``/``list_versions`` are tested on real MLflow in test_tracking.py."""

    def __init__(self, name: str, metrics: dict[str, float]) -> None:
        self.name, self.metrics = name, metrics
        self.aliases: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.versions: dict[str, dict[str, str]] = {}

    def create_version(self) -> str:
        version = str(len(self.versions) + 1)
        self.versions[version] = {}
        return version

    def get_registered_model(self, name: str) -> SimpleNamespace:
        if name != self.name:
            raise MlflowException(f"Registered Model with name={name} not found")
        return SimpleNamespace(name=name, aliases=dict(self.aliases), tags=dict(self.tags))

    def get_model_version(self, name: str, version: str) -> SimpleNamespace:
        if name != self.name or str(version) not in self.versions:
            raise MlflowException(f"Model Version (name={name}, version={version}) not found")
        return SimpleNamespace(version=str(version), run_id="run-1", creation_timestamp=1_717_200_000_000, status="READY",
                               tags=dict(self.versions[str(version)]))

    def search_model_versions(self, filter_string: str) -> list[SimpleNamespace]:
        return [self.get_model_version(self.name, v) for v in self.versions]

    def get_run(self, run_id: str) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(metrics=dict(self.metrics)))

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = str(version)

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self.tags[key] = value

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.versions[str(version)][key] = value


@pytest.fixture
def registry() -> FakeRegistryClient:
    """Versions 1, 2, 3 of tg-model: 2 is champion (it replaced 1), 3 a rejected challenger."""
    client = FakeRegistryClient("tg-model", {"test_pr_auc": 0.41, "backtest_sharpe": 1.25, "val_pr_auc": 0.44})
    for _ in range(3):
        client.create_version()
    move_champion(client, "tg-model", "1")
    move_champion(client, "tg-model", "2")
    set_alias(client, "tg-model", "challenger", "3")
    for key, value in {"promotion.decision": "rejected", "promotion.decided_at": "2024-06-03T10:00:00+00:00",
                       "promotion.reason": "challenger sharpe 0.80 does not beat level_rule 0.95"}.items():
        client.set_model_version_tag("tg-model", "3", key, value)
    return client


def test_kill_rearm_and_rollback_act_only_after_their_button(fake: FakeBotAPI, store: StateStore,
                                                            registry: FakeRegistryClient, tmp_path: Path) -> None:
    def champion() -> str:
        return str(version_for_alias(registry, "tg-model", "champion").version)

    locks = []

    @contextlib.contextmanager
    def lock():  # the store's registry lock, as `pricelevel promote --rollback` takes it
        with FileLock(tmp_path / "registry.lock", timeout_s=5):
            locks.append(champion())
            yield

    seen: dict[str, object] = {}

    async def conversation() -> None:
        async with session(fake, store, tg_config(fake), TrackingConfig(registered_model="tg-model"), lock,
                           mlflow=lambda tracking: registry):
            question = await ask(fake, "/kill")
            seen["question"], seen["after question"] = question, pending(store)
            seen["cancel"] = await press(fake, question, "Cancel")
            seen["after cancel"] = pending(store)
            question = await ask(fake, "/kill")
            seen["yes"] = await press(fake, question, "Yes, kill")
            seen["again"] = await press(fake, question, "Yes, kill")
            group = dict(chat=DESK, chat_type="group")
            question = await ask(fake, "/rearm", user_id=BOB, username="bob", **group)
            seen["carol"] = await press(fake, question, "Yes, re-arm", user_id=CAROL, username="carol", **group)
            seen["bob"] = await press(fake, question, "Yes, re-arm", user_id=BOB, username="bob", **group)
            question = await ask(fake, "/start")  # also what Telegram's Start button sends
            seen["start asked"] = pending(store)
            seen["start"] = await press(fake, question, "Yes, allow entries")
            seen["model"] = (await ask(fake, "/model")).text
            question = await ask(fake, "/rollback")
            seen["champion asked"] = champion()
            seen["rollback"] = await press(fake, question, "Yes, roll back")
            question = await ask(fake, "/rollback")
            seen["rollback again"] = await press(fake, question, "Yes, roll back")

    asyncio.run(conversation())
    question = seen["question"]
    assert "KILL SWITCH" in question.text and set(question.buttons()) == {"Yes, kill", "Cancel"}
    assert seen["after question"] == [] and seen["after cancel"] == []
    # Each answered question is edited to its outcome (its buttons gone): when, by whom, what was done.
    assert re.fullmatch(f"/kill: cancelled {STAMP}alice: nothing done.", seen["cancel"])
    assert re.match(f"killed {STAMP}alice\nqueued kill: kill switch: every position is closed", seen["yes"])
    assert seen["again"] == "That question has expired or was answered already; send the command again."
    assert seen["carol"] == "Only the person who sent /rearm can answer it."  # a notice to Carol; the buttons stay
    assert re.match(f"re-armed {STAMP}bob\nqueued rearm", seen["bob"])
    assert seen["start asked"] == [("kill", [], "telegram:alice"), ("rearm", [], "telegram:bob")]
    assert re.match(f"entries allowed {STAMP}alice\nqueued start: entries allowed again", seen["start"])
    assert pending(store) == [("kill", [], "telegram:alice"), ("rearm", [], "telegram:bob"), ("start", [], "telegram:alice")]
    model = seen["model"]
    assert "trading now: version 2" in model
    assert "@champion: version 2 (test_pr_auc 0.41, backtest_sharpe 1.25)" in model
    assert "@challenger: version 3" in model
    assert "last promotion decision (2024-06-03 10:00 UTC): rejected: challenger sharpe 0.80" in model
    assert seen["champion asked"] == "2"
    assert re.match(f"rolled back {STAMP}alice\nrolled back tg-model@champion: version 2 -> 1", seen["rollback"])
    assert "\nnothing rolled back: model 'tg-model' has no former champion" in seen["rollback again"]
    assert champion() == "1" and locks == ["2", "1"]  # each rollback ran under the lock
    assert len(fake.answered) == 8  # every authorised press was answered (the button's spinner stops)


def test_a_confirmation_expires(fake: FakeBotAPI, store: StateStore) -> None:
    async def conversation() -> str:
        async with session(fake, store, tg_config(fake, confirm_timeout_s=0.2)):
            question = await ask(fake, "/kill")
            await asyncio.sleep(0.3)
            return await press(fake, question, "Yes, kill")

    assert asyncio.run(conversation()) == "/kill: expired, nothing done; send /kill again."
    assert pending(store) == []


def test_updates_queued_while_the_bot_was_away_never_fire(fake: FakeBotAPI, store: StateStore) -> None:
    fake.message(ALICE, "/kill")
    fake.press(ALICE, "yes:0123456789abcdef")
    fake.message(ALICE, "/stop")

    async def conversation() -> None:
        async with session(fake, store, tg_config(fake)):
            await ask(fake, "/help")

    asyncio.run(conversation())
    assert fake.texts() == [commands.help_text()] and pending(store) == []


# ------------------------------------------------------------------------------------------------ replay


LEVELS = LevelsConfig.model_validate({"window": 6, "eps_frac": 0.01, "min_samples": 3, "lookback_days": 30, "refit_every": 6})
FEATURES = ("log_range", "level_distance")
SPEC = ModelSpec(
    symbols=("BTCUSDT", "ETHUSDT"), features=FEATURES, seq_len=4, timeframe="4h", horizon=1,
    normalization={POOLED: FeatureStats((0.0, 0.0), (1.0, 1.0))}, levels=LEVELS.model_dump(mode="json"),
    labels=LabelsConfig(kind="level_label", threshold_frac=0.005, horizon=1).model_dump(mode="json"), hparams={},
    rules={"threshold": 0.7, "exit_threshold": 0.3, "max_hold_bars": 6},
    feature_config=FeaturesConfig(set="tg", sets={"tg": FEATURES}).model_dump(mode="json"),
)


class FakeModel:
    """Deterministic probabilities from the newest bar's features (no training): entries, exits, stops."""

    version = "1"
    spec = SPEC

    def predict(self, features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
        return np.modf(np.abs(features[:, -1, 0]) * 1e4)[0]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[CandleFolder, dict]:
    """240 real 4h bars (with their 1h and 1d candles) and the reference replay of 12 of them, told to a recorder."""
    folder = tmp_path_factory.mktemp("candles")
    for symbol in SPEC.symbols:
        h4 = pd.read_parquet(SAMPLE / f"{symbol}_4h.parquet").iloc[:240]
        h4.to_parquet(folder / f"{symbol}_4h.parquet")
        for tf in ("1d", "1h"):
            frame = pd.read_parquet(SAMPLE / f"{symbol}_{tf}.parquet")
            frame[frame["timestamp"] < h4["timestamp"].iloc[-1] + pd.Timedelta(hours=4)].to_parquet(folder / f"{symbol}_{tf}.parquet")
    candles = CandleFolder.open(folder)
    recorder = RecordingNotifier()
    store = StateStore(f"sqlite:///{tmp_path_factory.mktemp('reference') / 'state.db'}")
    replay = _replay(candles, store, recorder)
    replay.trader.replay(replay.bars)
    return candles, {"trades": store.frame(TRADES), "equity": store.frame(EQUITY), "messages": recorder.messages}


def _replay(candles: CandleFolder, store: StateStore, notifier):
    models = ModelProvider("models:/fake/1", lambda uri: "1", lambda uri: FakeModel())
    replay = open_replay(candles, models, store, BacktestConfig(), RiskConfig(), notifier=notifier)
    return type(replay)(replay.trader, replay.feed, replay.bars[-40:-28])


def _same_trading(store: StateStore, reference: dict) -> None:
    pd.testing.assert_frame_equal(store.frame(TRADES), reference["trades"])
    pd.testing.assert_frame_equal(store.frame(EQUITY), reference["equity"])


def test_a_replay_tells_every_authorised_chat_the_expected_messages_in_order(fake: FakeBotAPI, history, tmp_path: Path) -> None:
    candles, reference = history
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    expected = [shown(kind, text) for kind, text in pairs(reference["messages"])]
    assert len(expected) >= 10 and {"order", "exit"} <= {kind for kind, _ in pairs(reference["messages"])}

    async def run() -> dict[str, int]:
        async with session(fake, store, tg_config(fake, per_chat_interval_s=0.01)) as notifier:
            replay = _replay(candles, store, notifier)
            await asyncio.to_thread(replay.trader.replay, replay.bars)  # as the service does: the step in a thread
            await until(lambda: len(fake.sent) >= 2 * len(expected))
        return notifier.stats()

    stats = asyncio.run(run())
    assert fake.texts(ALICE) == expected and fake.texts(DESK) == expected
    assert stats["sent"] == stats["queued"] == 2 * len(expected) and stats["failed"] == stats["dropped"] == 0
    _same_trading(store, reference)


def test_a_telegram_outage_during_a_replay_changes_no_trade(fake: FakeBotAPI, history, tmp_path: Path) -> None:
    candles, reference = history
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")

    class Timed:
        """The companion's notifier, timed: notify must return at once even with Telegram down."""

        def __init__(self, inner) -> None:
            self.inner, self.slowest = inner, 0.0

        def notify(self, kind: str, text: str) -> None:
            started = time.perf_counter()
            self.inner.notify(kind, text)
            self.slowest = max(self.slowest, time.perf_counter() - started)

    async def run() -> tuple[dict[str, int], float]:
        config = tg_config(fake, chat_ids=(ALICE,), send_attempts=2, request_timeout_s=1.0, retry_backoff_s=0.02)
        async with session(fake, store, config) as notifier:
            fake.hang_s = 2.0  # Telegram hangs: every request times out, polling included
            timed = Timed(notifier)
            replay = _replay(candles, store, timed)
            await asyncio.to_thread(replay.trader.replay, replay.bars)
            await until(lambda: notifier.stats()["retried"] > 2)  # more timeouts than send_attempts: none given up
            fake.hang_s = 0.0
            notifier.notify("risk", "back")
            await until(lambda: "\u26a0\ufe0f [risk] back" in fake.texts(ALICE), timeout=30)
        return notifier.stats(), timed.slowest

    stats, slowest = asyncio.run(run())
    _same_trading(store, reference)
    assert slowest < 0.75  # a send would take request_timeout_s (1 s) at least: notify waited for none
    assert stats["failed"] == 0 and stats["sent"] == stats["queued"]  # a timeout never uses up a message
    texts = fake.texts(ALICE)  # a request that timed out may still have arrived (as with the real Telegram)
    expected = [shown(kind, text) for kind, text in pairs(reference["messages"])] + ["\u26a0\ufe0f [risk] back"]
    assert list(dict.fromkeys(texts)) == expected  # every message, in order


def test_telegram_unreachable_at_start_delays_nothing_and_counts_what_was_not_sent(store: StateStore) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = TelegramConfig(enabled=True, chat_ids=(ALICE,), base_url=f"http://127.0.0.1:{port}", request_timeout_s=1.0,
                            retry_backoff_s=0.05, flush_timeout_s=5.0, summary_hour=None)

    async def run() -> tuple[float, float, dict[str, int]]:
        started = time.perf_counter()
        async with telegram_companion(config, store, TrackingConfig(), contextlib.nullcontext, ENV) as notifier:
            entered = time.perf_counter() - started
            for k in range(3):
                notifier.notify("order", f"entry {k}")
            await asyncio.sleep(0.3)
            leaving = time.perf_counter()
        return entered, time.perf_counter() - leaving, notifier.stats()

    entered, left, stats = asyncio.run(run())
    assert entered < 2.0 and left < 5.0  # entering waits for no connection; leaving flushes nothing
    assert stats["unsent"] == 3 and stats["sent"] == 0


def outbox_rows(store: StateStore) -> list[tuple[str, str, str]]:
    return [(r["kind"], r["text"], r["status"]) for r in store.frame(OUTBOX).sort_values("id").to_dict("records")]


def test_messages_queued_while_telegram_is_away_arrive_in_order_once_it_answers(fake: FakeBotAPI, store: StateStore) -> None:
    """Connection refused, then a proxy's HTML 502, then JSON 502s: many more tries than send_attempts, none
    given up; once Telegram answers, every message arrives once, in order, and is marked sent once."""

    async def run() -> dict[str, int]:
        async with session(fake, store, tg_config(fake, chat_ids=(ALICE,), send_attempts=2, retry_backoff_s=0.02)) as notifier:
            fake.go_away()  # connection refused
            for k in range(3):
                notifier.notify("order", f"entry {k}")
            await until(lambda: notifier.stats()["retried"] >= 3)
            fake.down_html = True
            fake.come_back()
            notifier.notify("exit", "take profit 0")
            retried = notifier.stats()["retried"]
            await until(lambda: notifier.stats()["retried"] >= retried + 3)
            fake.down_html, fake.down = False, True
            await until(lambda: notifier.stats()["retried"] >= retried + 6)
            assert fake.texts() == [] and notifier.stats()["failed"] == 0
            fake.down = False
            await until(lambda: len(fake.sent) >= 4, timeout=20)
            await asyncio.sleep(0.2)  # nothing more arrives
        return notifier.stats()

    stats = asyncio.run(run())
    expected = ["[order] entry 0", "[order] entry 1", "[order] entry 2", "[exit] take profit 0"]
    assert fake.texts() == expected
    assert (stats["sent"], stats["failed"], stats["unsent"]) == (4, 0, 0) and stats["retried"] >= 9
    assert outbox_rows(store) == [(t.split("] ")[0][1:], message_text(*t[1:].split("] ")), "sent") for t in expected]


def test_queued_messages_survive_a_restart(fake: FakeBotAPI, store: StateStore, tmp_path: Path) -> None:
    """Messages still queued when the service stops (Telegram away) are kept in the state database and sent by
    the next run, in order, once; a reply an earlier run left is not (its question is gone)."""
    config = tg_config(fake, chat_ids=(ALICE,), retry_backoff_s=0.02)

    async def first_run() -> tuple[dict[str, int], float]:
        async with session(fake, store, config) as notifier:
            fake.down = True
            for k in range(3):
                notifier.notify("exit", f"stop loss {k}")
            await until(lambda: notifier.stats()["retried"] >= 2)
            leaving = time.monotonic()
        return notifier.stats(), time.monotonic() - leaving

    stats, left = asyncio.run(first_run())
    assert stats["unsent"] == 3 and stats["sent"] == 0 and fake.texts() == []
    assert left < 2.0  # Telegram away: the stop does not wait flush_timeout_s for it
    StoredQueue(store).add([Outgoing(ALICE, "an answer to an old /status", kind="reply")])
    fake.down = False

    async def second_run() -> dict[str, int]:
        restarted = StateStore(store.url)  # a new process on the same database
        async with session(fake, restarted, config) as notifier:
            await until(lambda: len(fake.sent) >= 3)
            notifier.notify("order", "entry after restart")
            await until(lambda: len(fake.sent) >= 4)
            await asyncio.sleep(0.2)
        return notifier.stats()

    stats = asyncio.run(second_run())
    assert fake.texts() == ["[exit] stop loss 0", "[exit] stop loss 1", "[exit] stop loss 2", "[order] entry after restart"]
    assert stats["sent"] == 4 and stats["expired"] == 1
    assert [status for _, _, status in outbox_rows(store)] == ["sent", "sent", "sent", "expired", "sent"]


def test_a_late_message_says_when_it_was_queued() -> None:
    async def run() -> list[str]:
        sent: list[str] = []

        async def record(item) -> None:
            sent.append(item.text)

        queued_at = dtm.datetime(2024, 6, 1, 12, 4, tzinfo=dtm.UTC)
        outbox = Outbox(record, tg_config(None), Counters(), queue=MemoryQueue(now=lambda: queued_at),
                        now=lambda: queued_at + dtm.timedelta(hours=3))  # it waited three hours
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        outbox.put(ALICE, "[exit] stop loss BTCUSDT", kind="exit")
        outbox.put(ALICE, "x" * MAX_MESSAGE, kind="summary")  # no room for the note: sent as it is
        await until(lambda: len(sent) == 2)
        await outbox.close(1.0, worker)
        return sent

    sent = asyncio.run(run())
    assert sent[0] == "[exit] stop loss BTCUSDT\n(queued 2024-06-01 12:04 UTC, sent late)"
    assert sent[1] == "x" * MAX_MESSAGE


# ------------------------------------------------------------------------------------------------ the service's life


def _service_config(fake: FakeBotAPI, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        trader=TraderConfig(state_url=f"sqlite:///{tmp_path / 'state.db'}"), tracking=TrackingConfig(),
        telegram=tg_config(fake, chat_ids=(ALICE,)), data=SimpleNamespace(root=tmp_path), risk=RiskConfig(),
        backtest=BacktestConfig(),
        catalogue=SimpleNamespace(lock=lambda *names: contextlib.nullcontext()))


def _fake_trader(store: StateStore) -> SimpleNamespace:
    models = SimpleNamespace(uri="models:/pricelevel@champion", current=SimpleNamespace(version="7"), symbols=("BTCUSDT",))
    rules = StrategyRules(threshold=0.5)
    return SimpleNamespace(models=models, execution=SimpleNamespace(name="paper"), timeframe="4h", store=store,
                           rules=rules, spec=SimpleNamespace(strategy_rules=lambda: rules))


def _run_service(fake: FakeBotAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve) -> list[str]:
    """``trade_with_telegram`` with the trader replaced (no model, no candles): its lifecycle and its messages."""
    import pricelevel.telegram.trader_service as service

    monkeypatch.setattr(service, "open_service", lambda config, env, notifier, exchange, store: _fake_trader(store))
    monkeypatch.setattr(service, "serve", serve)
    seen = len(fake.sent)
    asyncio.run(service.trade_with_telegram(_service_config(fake, tmp_path), ENV, lambda text: None))
    return fake.texts()[seen:]


def test_the_service_announces_its_start_and_its_stop_and_why(fake: FakeBotAPI, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def until_sigterm(trader, stop, *args, **kwargs) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # as systemd or docker stop would
        await stop.wait()
        return 3

    async def failing(trader, stop, *args, **kwargs) -> int:
        raise RuntimeError("the exchange exploded")

    texts = _run_service(fake, tmp_path, monkeypatch, until_sigterm)
    assert texts == ["[service] started: trading models:/pricelevel@champion (version 7) on paper (paper), BTCUSDT at 4h",
                     "[service] stopped by SIGTERM after 3 bars"]
    with pytest.raises(RuntimeError, match="exploded"):
        _run_service(fake, tmp_path, monkeypatch, failing)
    assert fake.texts()[-1] == "[service] STOPPED by error: RuntimeError: the exchange exploded after 0 bars"
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    with store.transaction() as tx:
        marker = store.read(tx, SERVICE)
    assert not marker.running and marker.reason == "error: RuntimeError: the exchange exploded"
    assert not any("unclean" in text for text in fake.texts())  # each stop was clean


def test_a_restart_after_an_unclean_stop_is_announced(fake: FakeBotAPI, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    crashed = subprocess.run([sys.executable, "-c", (  # a service that starts, beats, and is killed with SIGKILL
        "import os, signal, pandas as pd\n"
        "from pricelevel.trading.lifecycle import RunMarker\n"
        "from pricelevel.trading.state import StateStore\n"
        f"marker = RunMarker(StateStore({url!r}), now=lambda: pd.Timestamp('2024-06-01 12:34:56', tz='UTC'))\n"
        "marker.start(); marker.beat()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    async def until_sigint(trader, stop, *args, **kwargs) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        await stop.wait()
        return 0

    texts = _run_service(fake, tmp_path, monkeypatch, until_sigint)
    assert texts[0].startswith("[service] restarted after an unclean stop at 2024-06-01 12:34:56 UTC (its last heartbeat")
    assert texts[1].startswith("[service] started: ") and texts[2] == "[service] stopped by Ctrl-C (SIGINT) after 0 bars"
    texts = _run_service(fake, tmp_path, monkeypatch, until_sigint)  # that stop was clean: no such line again
    assert texts[0].startswith("[service] started: ")


# ------------------------------------------------------------------------------------------------ secrets


def test_the_token_is_in_no_log_line_and_no_message(fake: FakeBotAPI, store: StateStore,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    wrong = "987654321:AAWrongTokenRejectedByTheServer_xyz"
    factory = logging.getLogRecordFactory()

    async def run() -> dict[str, int]:
        async with session(fake, store, tg_config(fake)) as notifier:
            notifier.notify("pipeline", f"calling https://api.telegram.org/bot{TOKEN}/getMe failed (token={TOKEN})")
            await ask(fake, "/status")
            fake.down = True  # polling errors are logged too
            await asyncio.sleep(0.3)
            fake.down = False
        async with telegram_companion(tg_config(fake), store, TrackingConfig(), contextlib.nullcontext,
                                      {"TELEGRAM_BOT_TOKEN": wrong}) as rejected:
            await until(lambda: any("rejected" in r.getMessage() for r in caplog.records))
            rejected.notify("order", "entry X")
            await asyncio.sleep(0.1)
        return rejected.stats()

    caplog.set_level(logging.DEBUG)
    stats = asyncio.run(run())
    assert logging.getLogRecordFactory() is factory  # the masking is undone on exit
    logged = caplog.text + "".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert TOKEN not in logged and wrong not in logged and "AAFakeToken" not in logged
    assert "/bot***/getMe" in logged  # httpx's request lines were there, masked
    assert "the Bot API rejected TELEGRAM_BOT_TOKEN" in logged and stats["failed"] == 2  # one per chat
    sent = "\n".join(fake.texts())
    assert TOKEN not in sent and "bot***/getMe failed (token=***" in sent


def test_disabled_or_without_a_token(store: StateStore) -> None:
    async def enter(config: TelegramConfig, env: dict):
        async with telegram_companion(config, store, TrackingConfig(), contextlib.nullcontext, env) as notifier:
            return notifier

    assert isinstance(asyncio.run(enter(TelegramConfig(), ENV)), NoNotifier)
    with pytest.raises(MissingSecretError, match="TELEGRAM_BOT_TOKEN is not set"):
        asyncio.run(enter(tg_config(None), {}))


# ------------------------------------------------------------------------------------------------ kinds


def test_notification_kinds_can_be_switched_off(fake: FakeBotAPI, store: StateStore) -> None:
    async def run() -> dict[str, int]:
        async with session(fake, store, tg_config(fake, chat_ids=(ALICE,), notify=("order", "exit"))) as notifier:
            for kind, text in [("risk", "HALTED: drawdown"), ("order", "entry BTCUSDT"), ("summary", "day"),
                               ("exit", "take profit BTCUSDT")]:
                notifier.notify(kind, text)
            await until(lambda: len(fake.sent) >= 2)
            await ask(fake, "/help")  # commands still answer
        return notifier.stats()

    stats = asyncio.run(run())
    assert fake.texts()[:2] == ["[order] entry BTCUSDT", "[exit] take profit BTCUSDT"] and len(fake.texts()) == 3
    assert stats["filtered"] == 2
    assert TelegramConfig().notify == EVENT_KINDS
    with pytest.raises(ValueError, match="unknown notification kind nope"):
        TelegramConfig(notify=("order", "nope"))


# ------------------------------------------------------------------------------------------------ the outbox


def test_split_message_keeps_every_part_within_telegrams_limit() -> None:
    assert split_message("short") == ["short"]
    parts = split_message("a" * 10_000)
    assert [len(p) for p in parts] == [4096, 4096, 1808] and "".join(parts) == "a" * 10_000
    lines = "\n".join(f"line {k:05d}" for k in range(1000))  # 10 chars + newline each
    parts = split_message(lines)
    assert all(len(p) <= MAX_MESSAGE for p in parts) and "\n".join(parts) == lines
    assert all(p.startswith("line ") and len(p.split("\n")[-1]) == 10 for p in parts)  # cut at newlines only
    emoji = "\U0001F4C8" * 3000  # two UTF-16 units each
    assert [len(p) for p in split_message(emoji)] == [2048, 952]


def test_a_long_message_arrives_in_parts_and_a_429_is_waited_out(fake: FakeBotAPI, store: StateStore) -> None:
    async def run() -> dict[str, int]:
        async with session(fake, store, tg_config(fake, chat_ids=(ALICE,))) as notifier:
            fake.fail_next("sendMessage", 429, retry_after=1)
            started = time.monotonic()
            notifier.notify("summary", "x" * 9000)
            await until(lambda: len(fake.sent) == 3)
            assert fake.sent[0].at - started >= 1.0  # retry_after honoured
        return notifier.stats()

    stats = asyncio.run(run())
    assert [len(s.html) for s in fake.sent] == [4096, 4096, 9000 + len("<b>[summary]</b> ") - 2 * 4096]
    assert stats["rate_limited"] == 1 and stats["sent"] == 3


def _outbox(send, **limits) -> Outbox:
    config = tg_config(None, **({"send_attempts": 3, "retry_backoff_s": 0.01} | limits))
    return Outbox(send, config, Counters())


def test_outbox_limits_retries_and_counts() -> None:
    async def run() -> dict[str, object]:
        out: dict[str, object] = {}
        times: dict[int, list[float]] = {}

        async def record(item) -> None:
            times.setdefault(item.chat_id, []).append(time.monotonic())

        outbox = _outbox(record, per_chat_interval_s=0.05, max_per_second=8)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        for k in range(12):
            outbox.put(ALICE if k % 2 else DESK, f"m{k}")
        await outbox.close(5.0, worker)
        out["times"], out["rate"] = times, outbox.counters.snapshot()

        calls = []

        async def flaky(item) -> None:
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise RetryAfter(0.2)
            if len(calls) == 2:
                raise NetworkError("connection reset")

        outbox = _outbox(flaky)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        outbox.put(ALICE, "hello")
        await outbox.close(5.0, worker)
        out["calls"], out["flaky"] = calls, outbox.counters.snapshot()

        async def down(item) -> None:
            raise NetworkError("Bad Gateway")

        outbox = _outbox(down)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        outbox.put(ALICE, "waits")
        await asyncio.sleep(0.3)
        await outbox.close(0.1, worker)
        out["down"] = outbox.counters.snapshot()

        async def broken(item) -> None:
            raise RuntimeError("a bug")

        outbox = _outbox(broken)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        outbox.put(ALICE, "unlucky")
        await outbox.close(5.0, worker)
        out["broken"] = outbox.counters.snapshot()

        async def refused(item) -> None:
            raise BadRequest("Chat not found")

        outbox = _outbox(refused)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        outbox.put(ALICE, "nobody")
        await outbox.close(5.0, worker)
        out["refused"] = outbox.counters.snapshot()

        outbox = _outbox(record, queue_size=3)  # never connected: the queue fills, the rest is dropped
        for k in range(5):
            outbox.put(ALICE, f"q{k}")
        await outbox.close(1.0, asyncio.create_task(outbox.run()))
        out["full"] = outbox.counters.snapshot()
        return out

    out = asyncio.run(run())
    for chat_times in out["times"].values():
        assert len(chat_times) == 6 and min(np.diff(chat_times)) >= 0.045
    every = sorted(t for chat_times in out["times"].values() for t in chat_times)
    assert every[8] - every[0] >= 0.95  # at most 8 in any second
    assert out["rate"]["sent"] == 12
    calls = out["calls"]
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.19  # 429: waited retry_after; network error: tried again
    assert (out["flaky"]["sent"], out["flaky"]["rate_limited"], out["flaky"]["retried"]) == (1, 1, 2)
    down = out["down"]  # Telegram unreachable: tried again and again (more than send_attempts), never given up
    assert (down["failed"], down["sent"], down["unsent"]) == (0, 0, 1) and down["retried"] > 3
    assert (out["broken"]["failed"], out["broken"]["retried"]) == (1, 2)  # an unexpected failure uses up a try
    assert (out["refused"]["failed"], out["refused"]["retried"]) == (1, 0)
    assert (out["full"]["queued"], out["full"]["dropped"], out["full"]["unsent"]) == (3, 2, 3)


def test_the_notifier_is_safe_from_many_threads() -> None:
    async def run() -> dict[str, int]:
        sent = []

        async def record(item) -> None:
            sent.append(item.text)

        config = tg_config(None, max_per_second=10_000)
        counters = Counters()
        outbox = Outbox(record, config, counters)
        outbox.ready.set()
        worker = asyncio.create_task(outbox.run())
        notifier = TelegramNotifier(asyncio.get_running_loop(), outbox, config, counters)
        threads = [threading.Thread(target=lambda n=n: [notifier.notify("order", f"{n}-{k}") for k in range(50)])
                   for n in range(4)]
        await asyncio.gather(*(asyncio.to_thread(lambda t=t: (t.start(), t.join())) for t in threads))
        await until(lambda: counters.snapshot()["sent"] == 400)
        await outbox.close(1.0, worker)
        return counters.snapshot() | {"distinct": len(set(sent))}

    stats = asyncio.run(run())
    assert stats["sent"] == stats["queued"] == 400 and stats["distinct"] == 200 and stats["dropped"] == 0


# ------------------------------------------------------------------------------------------------ lifecycle


def test_send_lifecycle_from_a_flow(fake: FakeBotAPI) -> None:
    config = tg_config(fake, lifecycle_timeout_s=1.0)
    outcome = {"promote": True, "reason": "challenger pr_auc 0.4400 beats champion 0.4100 by more than 0.0000",
               "details": {"metric": "pr_auc", "challenger": 0.44, "champion": 0.41, "backtest_metric": "sharpe",
                           "challenger_backtest": 1.3, "champion_backtest": 1.1}, "challenger": "3", "champion": "2"}
    text = commands.promotion_text("pricelevel", outcome)
    assert text.splitlines() == ["PROMOTED pricelevel version 3 to @champion (was 2)", outcome["reason"],
                                 "pr_auc: 0.4400 vs 0.4100 · sharpe: 1.3000 vs 1.1000"]
    assert send_lifecycle(config, "promotion", text, ENV) is True
    assert fake.texts(ALICE) == fake.texts(DESK) == [f"[promotion] {text}"]
    assert send_lifecycle(config.model_copy(update={"enabled": False}), "promotion", text, ENV) is False
    assert send_lifecycle(config.model_copy(update={"notify": ("order",)}), "promotion", text, ENV) is False
    assert send_lifecycle(config, "promotion", text, {}) is False
    fake.down = True
    started = time.monotonic()
    assert send_lifecycle(config, "pipeline", "FAILED: flow train", ENV) is False
    assert time.monotonic() - started < 4.0 and len(fake.sent) == 2
    rolled = commands.promotion_text("pricelevel", {"rolled_back": True, "from": "3", "to": "2"})
    assert rolled == "ROLLED BACK pricelevel@champion: version 3 -> 2"


@pytest.mark.flow
def test_a_failed_run_is_told_by_the_flow_hook(fake: FakeBotAPI, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.notify import notify_failure

    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    overrides = ["telegram.enabled=true", f"telegram.chat_ids=[{ALICE}]", f"telegram.base_url={fake.url}"]
    run = SimpleNamespace(name="brave-fox", parameters={"config_file": None, "overrides": overrides})
    state = SimpleNamespace(message=f"Flow run encountered an exception: ValueError: boom {TOKEN}\ntraceback...")
    notify_failure(SimpleNamespace(name="train"), run, state)
    assert fake.texts() == ["\u274c [pipeline] FAILED: flow train (run brave-fox): Flow run encountered an exception: "
                            "ValueError: boom ***"]
    notify_failure(SimpleNamespace(name="train"), SimpleNamespace(name="x", parameters={"overrides": ["nope"]}), state)
    subflow = SimpleNamespace(name="inner", parameters=run.parameters, parent_task_run_id="some-task-run")
    notify_failure(SimpleNamespace(name="ingest"), subflow, state)  # the parent train run tells it once
    assert len(fake.texts()) == 1


# ------------------------------------------------------------------------------------------------ summary


def test_daily_summary_and_its_clock(store: StateStore) -> None:
    text = commands.summary_text(store)
    assert text.splitlines()[0] == "daily summary to 2024-06-04 00:00 UTC"
    assert "equity 10,110.00 (+0.90% in 24 h) · realised P&L -25.00 over 1 trade" in text
    assert "positions: 1 open (BTCUSDT)" in text
    now = pd.Timestamp("2024-06-01 19:30", tz="UTC")
    assert seconds_until(20, now) == 1800 and seconds_until(19, now) == 23.5 * 3600
    assert seconds_until(0, pd.Timestamp("2024-06-01", tz="UTC")) == 86400

    async def one_summary() -> list[tuple[str, str]]:  # the bot's own timer, its clock 50 ms before 20:00 UTC
        recorder = RecordingNotifier()
        clock = lambda: pd.Timestamp("2024-06-01 20:00", tz="UTC") - pd.Timedelta(milliseconds=50)  # noqa: E731
        task = asyncio.create_task(_daily_summaries(20, store, recorder, now=clock))
        await until(lambda: bool(recorder.messages), timeout=5)
        task.cancel()
        return recorder.messages

    assert asyncio.run(one_summary()) == [("summary", text)]
