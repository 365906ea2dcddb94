"""The live trader, offline: a small real model in a temporary MLflow registry, real candles, the paper engine
and a fake Bybit v5 exchange on 127.0.0.1.

- parity: `pricelevel trade --replay` makes exactly the trades of `pricelevel backtest --model` with the same rules;
- restart: kill -9 at random points and at every step of an order's life; the result equals an uninterrupted
  run and the exchange never saw a client id twice;
- orders: a lost answer is found by client id and not sent again; partial fills, refusals, insufficient balance;
- risk: every rule by hand-computed cases, the latched drawdown halt, the kill switch;
- hot-swap: the champion moves during a replay; an incompatible one is refused;
- safety: mainnet needs both acts; no secret in logs, rows or files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pricelevel.backtest.config import BacktestConfig
from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.data.folder import CandleFolder
from pricelevel.registry.tracking import mlflow_client
from pricelevel.registry.versions import ALIAS_CHAMPION, set_alias
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading import risk as rules
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.config import RiskConfig, TraderConfig
from pricelevel.trading.control import request, status
from pricelevel.trading.events import RecordingNotifier
from pricelevel.trading.live import ExchangeBroker, Position, exit_reason
from pricelevel.trading.service import (
    LIVE_VARIABLE,
    TradingRefused,
    check_mode,
    open_replay,
    registry_models,
    replay_result,
    serve,
)
from pricelevel.trading.state import DECISIONS, EQUITY, ORDERS, TRADES, StateStore
from pricelevel.trading.trader import Trader
from tests.fakes.bybit_server import SLOW_MACHINE_TIMEOUT_S
from tests.fakes.bybit_trading import ORDER_CREATE, FakeBybitExchange, TradeFault
from tests.fakes.trading_model import SYMBOLS, TinyModel, build_model, log_version, register_tiny_model
from tests.workers import trader_replay

ROOT = Path(__file__).resolve().parents[1]
#: Risk limits that never refuse an entry, so a replay must equal the backtest of the effective rules.
PERMISSIVE = RiskConfig(cooldown_losses=1000, daily_loss_limit=0.99, max_drawdown=0.99, max_positions=10)
#: Bars of the restart test's replay (each restart reloads the model: keep it short).
RESTART_BARS = 20
#: The restart test's trader processes are forked from a fork server that imported the trader once.
_FORKS = multiprocessing.get_context("forkserver")
PERMISSIVE_SETS = ["risk.cooldown_losses=1000", "risk.daily_loss_limit=0.99", "risk.max_drawdown=0.99",
                   "risk.max_positions=10"]
#: Limits that make the cool-down, the daily loss limit and max_positions refuse entries on the fixture.
TIGHT_SETS = ["risk.cooldown_losses=2", "risk.cooldown_bars=6", "risk.daily_loss_limit=0.003", "risk.max_drawdown=0.99",
              "risk.max_positions=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return register_tiny_model(tmp_path_factory.mktemp("trading"))


def _tracking_sets(model: TinyModel) -> list[str]:
    return [f"tracking.tracking_uri={model.tracking.tracking_uri}",
            f"tracking.artifact_location={model.tracking.artifact_location}"]


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


# ------------------------------------------------------------------------------------------------ parity


def test_replay_makes_exactly_the_backtests_trades(tiny: TinyModel, cli, tmp_path: Path) -> None:
    _replay_and_backtest(tiny, cli, tmp_path, PERMISSIVE_SETS)


def test_replay_makes_exactly_the_backtests_trades_with_the_protections_firing(tiny: TinyModel, cli, tmp_path: Path) -> None:
    """The cool-down, the daily loss limit and max_positions refuse entries in both: one implementation."""
    replay, backtest = _replay_and_backtest(tiny, cli, tmp_path, TIGHT_SETS)
    refused = backtest["refused_entries"]
    assert refused["cooldown"] > 0 and refused["daily_loss"] > 0 and refused["max_positions_open"] > 0, refused


def _replay_and_backtest(tiny: TinyModel, cli, tmp_path: Path, risk_sets: list[str]) -> tuple[dict, dict]:
    """``trade --replay`` and the ``backtest --model`` it prints, with ``risk_sets``: the same trades, or fail."""
    sets = _sets([*_tracking_sets(tiny), *risk_sets, "risk.max_stop_loss=0.02"])
    start = str(tiny.replay_start)
    code, out, err = cli("trade", "--replay", str(tiny.folder), "--start", start, "--json", str(tmp_path / "replay.json"), *sets)
    assert code == 0, err
    assert "rules executed" in out and "stop-loss 2.00%" in out  # the model's 3 % stop bounded by risk.max_stop_loss
    command = out[out.index("the same trades, by the backtest:"):].split("pricelevel ", 1)[1].split()
    overrides = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert "backtest.sl_stop=0.02" in overrides and "backtest.sizing=risk" in overrides
    code, _, err = cli("backtest", "--model", tiny.champion, "--data", str(tiny.folder), "--start", start,
                       "--json", str(tmp_path / "backtest.json"), *sets, *_sets(overrides))
    assert code == 0, err
    replay, backtest = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("replay", "backtest"))
    assert len(backtest["trades"]) >= 3, "the fixture model must trade for this test to mean anything"
    assert [(t["symbol"], t["entry_time"], t["exit_time"], t["exit_reason"]) for t in replay["trades"]] == \
           [(t["symbol"], t["entry_time"], t["exit_time"], t["exit_reason"]) for t in backtest["trades"]]
    for mine, theirs in zip(replay["trades"], backtest["trades"], strict=True):
        for key in ("entry_price", "exit_price", "size", "pnl"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-9), key
    for key in ("final_value", "total_return", "n_trades", "fees_paid"):
        assert replay["metrics"]["portfolio"][key] == pytest.approx(backtest["metrics"]["portfolio"][key], rel=1e-9), key
    return replay, backtest


#: Protections tight enough to fire on the fixture (fill at the close): the drawdown halt, the daily loss limit
#: and the cool-down. The trader's defaults fire the cool-down on it too.
TIGHT_CLOSE = RiskConfig(max_drawdown=0.01, daily_loss_limit=0.002, cooldown_losses=1, cooldown_bars=2)
#: The refusal kinds of the trader's risk manager, by the backtest's names.
KINDS = {"halted": "drawdown_halt", "today's": "daily_loss", "cooling": "cooldown"}


@pytest.mark.parametrize(("fill", "risk", "fired"), [("next_open", RiskConfig(), {"cooldown"}),
                                                     ("close", TIGHT_CLOSE, {"drawdown_halt", "daily_loss", "cooldown"})],
                         ids=["defaults", "tight-close"])
def test_replay_equals_the_backtest_with_the_default_protections_and_the_drawdown_halt(
        tiny: TinyModel, tmp_path: Path, fill: str, risk: RiskConfig, fired: set[str]) -> None:
    """The trader's default limits (and a halt) change what is traded, identically in the replay and in the
    backtest of the same rules, refusal for refusal."""
    from pricelevel.backtest.config import with_protections
    from pricelevel.inference.scoring import backtest_model

    costs, folder = BacktestConfig(fill=fill), CandleFolder.open(tiny.folder)
    models = registry_models(tiny.tracking, tiny.champion)
    replay = open_replay(folder, models, StateStore(f"sqlite:///{tmp_path}/s.db"), costs, risk, tiny.replay_start)
    replay.trader.replay(replay.bars)
    replayed = replay_result(replay, costs)
    model, executed = models.current, replay.trader.rules
    backtest = backtest_model(model.predict, model.spec, folder, with_protections(costs, risk), executed, tiny.replay_start).result
    unprotected = backtest_model(model.predict, model.spec, folder, costs.model_copy(update={"protections": None}),
                                 executed, tiny.replay_start).result
    columns = ["symbol", "entry_time", "exit_time", "exit_reason", "entry_price", "exit_price", "size", "pnl"]
    pd.testing.assert_frame_equal(replayed.trades[columns], backtest.trades[columns], check_dtype=False, rtol=1e-12)
    np.testing.assert_allclose(replayed.equity.to_numpy(), backtest.equity.to_numpy(), rtol=1e-12)
    assert {name for name, n in backtest.refused.items() if n} >= fired
    refusals = replay.trader.risk.state.refusals
    assert {KINDS[kind]: n for kind, n in refusals.items() if kind in KINDS} == \
           {name: n for name, n in backtest.refused.items() if n and name in KINDS.values()}
    assert len(backtest.trades) < len(unprotected.trades)  # the protections changed what was traded


def test_a_config_edit_does_not_change_what_the_trader_executes(tiny: TinyModel, tmp_path: Path) -> None:
    models = registry_models(tiny.tracking, tiny.champion)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    edited = BacktestConfig(threshold=0.99, sl_stop=0.5)  # a config edit after training
    replay = open_replay(CandleFolder.open(tiny.folder), models, store, edited, PERMISSIVE, tiny.replay_start)
    assert replay.trader.rules == rules.effective_rules(tiny.spec.strategy_rules(), PERMISSIVE)


# ------------------------------------------------------------------------------------------------ risk


def test_effective_rules_bound_the_stop_and_size_by_risk_then_cap() -> None:
    model = StrategyRules(threshold=0.6, sl_stop=0.05, tp_stop=None)
    seed = RiskConfig(max_stop_loss=0.02, take_profit=0.04)  # the seed numbers
    seeded = rules.effective_rules(model, seed)
    assert (seeded.sl_stop, seeded.tp_stop, seeded.sizing, seeded.risk, seeded.fraction) == (0.02, 0.04, "risk", 0.02, 0.1)
    assert rules.effective_rules(StrategyRules(threshold=0.6, sl_stop=0.01), seed).sl_stop == 0.01  # tighter kept
    default = rules.effective_rules(model, RiskConfig())  # the default keeps the model's own exits
    assert (default.sl_stop, default.tp_stop) == (0.05, None)
    # 2 % risked at a 2 % stop asks for the whole equity: the 10 % cap binds first (README "Risk").
    assert rules.position_value(10_000, 0.02, 0.02, 0.1) == 1_000
    assert rules.position_value(10_000, 0.5, 0.02, 0.1) == pytest.approx(400)  # a wide stop: the risk rule binds
    assert rules.position_value(10_000, None, 0.02, 0.1) == 1_000


def test_each_refusal_rule_by_hand() -> None:
    assert rules.drawdown_breached(7_999, 10_000, 0.2) is not None
    assert rules.drawdown_breached(8_001, 10_000, 0.2) is None
    assert rules.daily_loss_breached(9_500, 10_000, 0.05) is not None
    assert rules.daily_loss_breached(9_501, 10_000, 0.05) is None
    t = pd.Timestamp("2024-01-01 10:00", tz="UTC")
    assert rules.cooling_down(str(t + pd.Timedelta(hours=1)), t) is not None
    assert rules.cooling_down(str(t), t) is None
    assert rules.too_many_positions(5, 5) is not None and rules.too_many_positions(4, 5) is None


def test_drawdown_halt_latches_and_survives_a_restart(tmp_path: Path) -> None:
    manager = rules.RiskManager(RiskConfig(max_drawdown=0.2))
    bar, hour = pd.Timestamp("2024-01-01", tz="UTC"), pd.Timedelta(hours=1)
    manager.after_bar(bar, hour, 10_000, [], problem=False)
    events = manager.after_bar(bar + hour, hour, 7_900, [], problem=False)
    assert any("HALTED" in e for e in events)
    manager.after_bar(bar + 2 * hour, hour, 10_500, [], problem=False)  # equity recovers: still halted
    restarted = rules.RiskManager(RiskConfig(max_drawdown=0.2), rules.RiskState.from_dict(manager.state.to_dict()))
    assert restarted.entry_refusal(bar + 3 * hour, 10_500, 0).startswith("halted: drawdown 21.0%")
    restarted.rearm()
    assert restarted.entry_refusal(bar + 3 * hour, 10_500, 0) is None


def test_cooldown_after_consecutive_losses_and_the_circuit_breaker() -> None:
    manager = rules.RiskManager(RiskConfig(cooldown_losses=2, cooldown_bars=3, breaker_errors=2, breaker_reset_bars=2))
    bar, hour = pd.Timestamp("2024-01-01", tz="UTC"), pd.Timedelta(hours=1)
    manager.after_bar(bar, hour, 10_000, [-1.0, -2.0], problem=False)
    assert manager.entry_refusal(bar + 2 * hour, 10_000, 0).startswith("cooling down")
    assert manager.entry_refusal(bar + 3 * hour, 10_000, 0) is None
    manager.after_bar(bar + 3 * hour, hour, 10_000, [], problem=True)
    manager.after_bar(bar + 4 * hour, hour, 10_000, [], problem=True)
    assert "circuit breaker" in manager.entry_refusal(bar + 5 * hour, 10_000, 0)
    manager.after_bar(bar + 5 * hour, hour, 10_000, [], problem=False)
    manager.after_bar(bar + 6 * hour, hour, 10_000, [], problem=False)
    assert manager.entry_refusal(bar + 7 * hour, 10_000, 0) is None
    assert manager.state.refusals == {"cooling": 1, "circuit": 1}


def test_exit_reasons_follow_the_engines_order() -> None:
    position = Position(1.0, 100.0, "t", 0.1, 100.0, stop_loss=98.0, take_profit=103.0, bars_held=6)
    bar = {"open_": 100.0, "close": 100.0}
    assert exit_reason(position, **bar, high=104, low=97, signal=True, max_hold_bars=6) == "stop_loss"
    assert exit_reason(position, **bar, high=104, low=99, signal=True, max_hold_bars=6) == "take_profit"
    assert exit_reason(position, **bar, high=102, low=99, signal=True, max_hold_bars=6) == "time_stop"
    assert exit_reason(position, **bar, high=102, low=99, signal=True, max_hold_bars=7) == "exit"
    assert exit_reason(position, **bar, high=102, low=99, signal=False, max_hold_bars=None) is None
    # a gap through the stop at the open is a stop-loss even when the bar's low is not below it
    assert exit_reason(position, open_=97.0, high=97.5, low=97.0, close=97.0, signal=False, max_hold_bars=None) == "stop_loss"


def _holding_trader(tiny: TinyModel, tmp_path: Path):
    """A paper trader replayed until it holds a position: (trader, store, notes, bars, index of the next bar)."""
    models = registry_models(tiny.tracking, tiny.champion)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    notes = RecordingNotifier()
    replay = open_replay(CandleFolder.open(tiny.folder), models, store, BacktestConfig(), PERMISSIVE, tiny.replay_start,
                         notifier=notes)
    trader, bars = replay.trader, replay.bars
    k = 0
    while not trader.execution.positions():  # trade until something is held
        trader.on_bar_close(bars[k])
        k += 1
    return trader, store, notes, bars, k


def test_the_kill_switch_flattens_and_blocks_until_rearmed(tiny: TinyModel, tmp_path: Path) -> None:
    trader, store, notes, bars, k = _holding_trader(tiny, tmp_path)
    request(store, "kill", by="test")
    trader.on_bar_close(bars[k])  # the kill is applied: exits queued for the next open (paper fills at a bar)
    trader.replay(bars[k + 1 : k + 12])
    assert not trader.execution.positions()
    decisions = store.frame(DECISIONS)
    later = decisions[pd.to_datetime(decisions["bar_time"], utc=True) > bars[k]]
    refused = later[later["signal"] == "entry"]
    assert len(refused) and refused["verdict"].str.startswith("kill switch").all()
    assert status(store)["risk"]["kill_switch"] is True
    assert any(kind == "command" and text.startswith("kill") for kind, text in notes.messages)
    request(store, "rearm", by="test")
    trader.on_bar_close(bars[k + 12])
    assert status(store)["risk"]["kill_switch"] is False


def test_commands_between_bars_on_paper_apply_once_and_in_order(tiny: TinyModel, tmp_path: Path) -> None:
    """The service looks for commands every few seconds: each applies once (one message), a rearm after a kill
    wins, and a force-exit applied between bars still closes its position at the next bar."""
    trader, store, notes, bars, k = _holding_trader(tiny, tmp_path)
    request(store, "kill", by="test")
    request(store, "rearm", by="test")
    for _ in range(3):
        trader.act_between_bars()
    assert [text.split(" ")[0] for kind, text in notes.messages if kind == "command"] == ["kill", "rearm"]
    assert status(store)["risk"]["kill_switch"] is False and not status(store)["pending_commands"]
    (held,) = list(trader.execution.positions())[:1]
    request(store, "forceexit", symbols=(held,), by="test")
    trader.act_between_bars()
    trader.act_between_bars()
    assert sum(kind == "command" for kind, _ in notes.messages) == 3
    trader.on_bar_close(bars[k])  # the exit is decided here and fills at the next open
    trader.on_bar_close(bars[k + 1])
    assert held not in trader.execution.positions()
    assert any(t.startswith(f"closed {held}") for kind, t in notes.messages if kind == "exit")


# ------------------------------------------------------------------------------------------------ hot-swap


def test_the_champion_moves_during_a_replay_and_the_next_bar_uses_it(tiny: TinyModel, tmp_path: Path) -> None:
    models = registry_models(tiny.tracking, tiny.champion)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    notes = RecordingNotifier()
    replay = open_replay(CandleFolder.open(tiny.folder), models, store, BacktestConfig(), PERMISSIVE, tiny.replay_start,
                         notifier=notes)
    replay.trader.replay(replay.bars[:5])
    module, spec, _ = build_model(seed=1, folder=CandleFolder.open(tiny.folder))
    new = log_version(tiny.tracking, module, spec, alias=None)
    client = mlflow_client(tiny.tracking)
    set_alias(client, "pricelevel", ALIAS_CHAMPION, new)
    try:
        report = replay.trader.on_bar_close(replay.bars[5])
        assert report.model_version == new
        assert {d.model_version for d in report.decisions} == {new}
        assert ("model", f"model switch: version {tiny.version} -> {new} (@champion moved: version {tiny.version} -> {new})") in notes.messages
        wrong = dataclasses.replace(spec, timeframe="1h")
        refused = log_version(tiny.tracking, module, wrong, alias=ALIAS_CHAMPION)
        report = replay.trader.on_bar_close(replay.bars[6])
        assert report.model_version == new  # the old one keeps trading
        assert any("refused" in text and refused in text and "timeframe" in text for _, text in notes.messages)
    finally:
        set_alias(client, "pricelevel", ALIAS_CHAMPION, tiny.version)


# ------------------------------------------------------------------------------------------------ safety


def test_mainnet_needs_both_acts_and_exchanges_trade_the_champion_only(tiny: TinyModel) -> None:
    with pytest.raises(TradingRefused, match="PRICELEVEL_TRADER__LIVE=yes"):
        check_mode(TraderConfig(mode="mainnet"), tiny.tracking, {})
    with pytest.raises(TradingRefused, match="PRICELEVEL_TRADER__LIVE=yes"):
        check_mode(TraderConfig(mode="mainnet", live=True), tiny.tracking, {LIVE_VARIABLE: "true"})
    check_mode(TraderConfig(mode="mainnet"), tiny.tracking, {LIVE_VARIABLE: "yes"})
    with pytest.raises(TradingRefused, match="champion only"):
        check_mode(TraderConfig(mode="testnet", model="models:/pricelevel/1"), tiny.tracking, {})
    check_mode(TraderConfig(mode="paper", model="models:/pricelevel/1"), tiny.tracking, {})
    assert TraderConfig().mode == "paper"


def test_trade_refuses_mainnet_on_the_command_line_in_one_line(cli, tiny: TinyModel) -> None:
    code, out, err = cli("trade", "--mode", "mainnet", *_sets(_tracking_sets(tiny)))
    assert code != 0
    assert "PRICELEVEL_TRADER__LIVE=yes" in out + err and "Traceback" not in out + err


# ------------------------------------------------------------------------------------------------ exchange


@pytest.fixture
def fake(httpserver) -> FakeBybitExchange:
    fake = FakeBybitExchange(balances={"USDT": 10_000.0})
    for symbol in SYMBOLS:
        if symbol != "BTCUSDT":
            fake.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001", min_order_qty="0.0001")
    fake.install(httpserver)
    yield fake
    httpserver.check_handler_errors()


def _env(fake: FakeBybitExchange) -> dict[str, str]:
    return {"BYBIT_API_KEY": fake.api_key, "BYBIT_API_SECRET": fake.api_secret}


def _exchange(fake: FakeBybitExchange, endpoint: str, timeout_s: float = SLOW_MACHINE_TIMEOUT_S) -> BybitBroker:
    config = BybitConfig(timeout_s=timeout_s, max_attempts=3, backoff_s=0.0, backoff_max_s=0.0)
    return BybitBroker(config, "testnet", Secrets.from_env(_env(fake)), endpoint=endpoint, sleep=lambda s: None)


def _broker(fake, httpserver, store, timeout_s: float = SLOW_MACHINE_TIMEOUT_S, **options) -> ExchangeBroker:
    rules_ = StrategyRules(threshold=0.5, sl_stop=0.02, tp_stop=0.04, sizing="risk", risk=0.02, fraction=0.1)
    exchange = _exchange(fake, httpserver.url_for("").rstrip("/"), timeout_s)
    options.setdefault("resting_exits", False)  # market orders only here (tests/test_resting_exits.py has them on)
    return ExchangeBroker(exchange, store, SYMBOLS, rules_, sleep=lambda s: None, **options)


BAR = pd.Timestamp("2024-06-01 12:00", tz="UTC")
OHLC = {"BTCUSDT": (60_000.0, 60_500.0, 59_800.0, 60_000.0)}


def test_an_entry_is_committed_before_it_is_sent_and_sized_by_the_rules(fake, httpserver, tmp_path) -> None:
    fake.set_price("BTCUSDT", 60_000)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    seen = []

    def checkpoint(stage: str) -> None:
        with store.transaction() as tx:
            seen.append((stage, [o["status"] for o in store.orders(tx)], len(fake.created)))

    broker = _broker(fake, httpserver, store, checkpoint=checkpoint)
    outcome = broker.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
    assert seen[0] == ("committed", ["NEW"], 0) and seen[1] == ("sent", ["SENT"], 0) and seen[2][2] == 1
    (created,) = fake.created
    assert created["marketUnit"] == "quoteCoin" and float(created["qty"]) == pytest.approx(1_000)  # the 10 % cap
    (fill,) = outcome.fills
    assert fill.intent == "entry" and fill.price == pytest.approx(60_000)
    lots = np.floor(1_000 / 60_000 / 1e-6) * 1e-6  # down to BTCUSDT's base precision, less the fee in BTC
    assert broker.positions()["BTCUSDT"]["size"] == pytest.approx(lots * (1 - 0.001), rel=1e-9)
    with store.transaction() as tx:
        (row,) = store.orders(tx)
    assert row["status"] == "FILLED" and row["client_id"] == created["orderLinkId"]


def test_a_lost_answer_is_found_by_client_id_and_never_sent_again(fake, httpserver, tmp_path) -> None:
    fake.set_price("BTCUSDT", 60_000)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store, timeout_s=1.0)
    fake.fail_next(TradeFault.lost(stall_s=1.5))  # created and filled, then the answer times out
    outcome = broker.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
    assert len(fake.sent(ORDER_CREATE)) == 1 and len(fake.created) == 1
    assert outcome.fills and "BTCUSDT" in broker.positions()
    # The same bar again (a restart before the bar committed): the fill is in the books already (applied with the
    # answer), the order is not placed again.
    with store.transaction() as tx:
        saved = store.get(tx, "execution")
    restarted = ExchangeBroker.from_state(saved, broker.exchange, store, SYMBOLS, broker.rules, sleep=lambda s: None,
                                          resting_exits=False)
    again = restarted.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
    assert len(fake.sent(ORDER_CREATE)) == 1 and again.fills == []
    assert restarted.positions()["BTCUSDT"]["size"] == pytest.approx(outcome.fills[0].size)


def test_refusals_partial_fills_and_insufficient_balance(fake, httpserver, tmp_path) -> None:
    fake.set_price("BTCUSDT", 60_000)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    fake.fail_next(TradeFault.insufficient_balance())
    outcome = broker.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
    assert not outcome.fills and not broker.positions() and "refused" in broker.errors[0]
    with store.transaction() as tx:
        assert [o["status"] for o in store.orders(tx)] == ["REJECTED"]
    fake.fill_fraction = 0.5
    outcome = broker.on_bar(BAR + pd.Timedelta(hours=1), OHLC, {"BTCUSDT": True}, {}, model_version="7")
    size = broker.positions()["BTCUSDT"]["size"]
    assert size == pytest.approx(500 / 60_000 * (1 - 0.001), rel=1e-3)  # half filled, the rest cancelled
    with store.transaction() as tx:
        assert store.orders(tx)[-1]["status"] == "CANCELLED" and store.orders(tx)[-1]["filled_qty"] > 0


def test_reconciliation_halts_on_a_holding_it_cannot_explain(fake, httpserver, tmp_path, tiny: TinyModel) -> None:
    fake.set_price("BTCUSDT", 60_000)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    broker.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
    assert broker.reconcile(str(BAR)) == []
    fake.set_balance("BTC", 0.001)  # someone sold by hand
    (problem,) = broker.reconcile(str(BAR))
    assert "BTCUSDT" in problem and "less than our position" in problem


def test_secrets_never_reach_logs_rows_or_files(fake, httpserver, tmp_path, caplog) -> None:
    fake.set_price("BTCUSDT", 60_000)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    broker = _broker(fake, httpserver, store)
    with caplog.at_level("DEBUG"):
        fake.fail_next(TradeFault.insufficient_balance())
        broker.on_bar(BAR, OHLC, {"BTCUSDT": True}, {}, model_version="7")
        broker.on_bar(BAR + pd.Timedelta(hours=1), OHLC, {"BTCUSDT": True}, {}, model_version="7")
    store.close()
    secrets = (fake.api_key, fake.api_secret)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert not any(s.encode() in written for s in secrets)
    assert not any(s in caplog.text for s in secrets)
    assert fake.api_secret not in repr(broker.exchange)


# ------------------------------------------------------------------------------------------------ restart


def _replay_process(tiny: TinyModel, endpoint: str, state: str, env: dict, crash: str | None = None,
                    kill_after_s: float | None = None) -> int:
    """One trader process replaying RESTART_BARS bars (tests/workers/trader_replay.py), forked from a fork server
    that imported the trader once; -9 when it was killed (by ``--crash`` or after ``kill_after_s``)."""
    args = ["--folder", str(tiny.folder), "--start", str(tiny.replay_start), "--endpoint", endpoint, "--state-url",
            state, "--tracking-uri", tiny.tracking.tracking_uri, "--artifacts", tiny.tracking.artifact_location,
            "--bars", str(RESTART_BARS)]
    if crash:
        args += ["--crash", crash]
    env = {**env, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        stderr = Path(folder) / "stderr.txt"
        process = _FORKS.Process(target=trader_replay.forked, args=(args, env, str(stderr)))
        process.start()
        process.join(kill_after_s)
        if process.exitcode is None:
            process.kill()
            process.join()
            return -9
        assert process.exitcode in (0, -9), stderr.read_text()[-3000:] if stderr.exists() else process.exitcode
        return process.exitcode


def _outcome(state: str, fake: FakeBybitExchange) -> dict:
    store = StateStore(state)
    trades = store.frame(TRADES).drop(columns=["id"])
    orders = store.frame(ORDERS)[["client_id", "symbol", "side", "intent", "status", "filled_qty", "avg_price"]]
    store.close()
    balances = {coin: round(fake.balance(coin), 8) for coin in ("USDT", "BTC", "ETH", "SOL")}
    return {"trades": trades.sort_values(["entry_time", "symbol"]).reset_index(drop=True),
            "orders": orders.sort_values("client_id").reset_index(drop=True), "balances": balances}


@pytest.mark.slow
def test_kill_9_at_random_points_changes_nothing_and_never_duplicates_an_order(tiny: TinyModel, httpserver, tmp_path) -> None:
    def fresh() -> FakeBybitExchange:
        httpserver.clear()
        fake = FakeBybitExchange(balances={"USDT": 10_000.0})
        for symbol in SYMBOLS[1:]:
            fake.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001", min_order_qty="0.0001")
        fake.install(httpserver)
        return fake

    endpoint = httpserver.url_for("").rstrip("/")
    calm = fresh()
    _FORKS.set_forkserver_preload(list(trader_replay.PRELOAD))
    warm = _FORKS.Process(target=trader_replay.ready)  # the trader imported before the calm run is timed
    warm.start()
    warm.join()
    started = time.monotonic()
    assert _replay_process(tiny, endpoint, f"sqlite:///{tmp_path}/calm.db", _env(calm)) == 0
    calm_s = time.monotonic() - started
    expected = _outcome(f"sqlite:///{tmp_path}/calm.db", calm)
    assert len(expected["trades"]) >= 2, "the fixture model must trade for this test to mean anything"

    stormy = fresh()
    state = f"sqlite:///{tmp_path}/stormy.db"
    rng = random.Random(7)
    # Every step of an order's life once, then kills at random moments; then run to the end.
    crashes = [("committed:1", None), ("sent:2", None), ("answered:1", None), ("sent:1", None)]
    crashes += [(None, rng.uniform(0.2, 0.9) * calm_s)]  # somewhere in a run, wherever that is
    killed = sum(_replay_process(tiny, endpoint, state, _env(stormy), crash, after) == -9 for crash, after in crashes)
    assert _replay_process(tiny, endpoint, state, _env(stormy)) == 0
    assert killed >= 4
    got = _outcome(state, stormy)
    link_ids = [o["orderLinkId"] for o in stormy.created]
    assert len(link_ids) == len(set(link_ids)), "an order was sent twice"
    pd.testing.assert_frame_equal(got["trades"], expected["trades"], check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(got["orders"], expected["orders"], check_exact=False, rtol=1e-9)
    assert got["balances"] == expected["balances"]


# ------------------------------------------------------------------------------------------------ service


def test_the_service_steps_each_closed_bar_once_and_stops_cleanly(tiny: TinyModel, tmp_path: Path) -> None:
    models = registry_models(tiny.tracking, tiny.champion)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    replay = open_replay(CandleFolder.open(tiny.folder), models, store, BacktestConfig(), PERMISSIVE, tiny.replay_start)
    bars = replay.bars[:4]
    clock = iter(np.repeat([b + pd.Timedelta(hours=4, seconds=s) for b in bars for s in (1, 10)], 2))
    stop = asyncio.Event()

    def now() -> pd.Timestamp:
        try:
            return next(clock)
        except StopIteration:
            stop.set()
            return bars[-1] + pd.Timedelta(hours=4, seconds=11)

    traded = asyncio.run(serve(replay.trader, stop, delay_s=5, stale_after_s=60, now=now, poll_s=0.05))
    assert traded == 4
    assert list(pd.to_datetime(store.frame(EQUITY)["bar_time"], utc=True)) == list(bars)


def test_trader_commands_queue_and_status_reads_the_database(cli, tiny: TinyModel, tmp_path: Path) -> None:
    sets = _sets([*_tracking_sets(tiny), f"trader.state_url=sqlite:///{tmp_path}/s.db"])
    code, out, _ = cli("trader", "kill", *sets)
    assert code == 0 and "kill queued" in out
    code, out, _ = cli("trader", "status", "--json", *sets)
    assert code == 0 and json.loads(out)["pending_commands"][0]["kind"] == "kill"
    code, out, _ = cli("trader", "status", *sets)
    assert "queued for the trader: kill" in out


def test_a_replay_result_is_a_backtest_result(tiny: TinyModel, tmp_path: Path) -> None:
    models = registry_models(tiny.tracking, tiny.champion)
    replay = open_replay(CandleFolder.open(tiny.folder), models, StateStore(f"sqlite:///{tmp_path}/s.db"),
                         BacktestConfig(), PERMISSIVE, tiny.replay_start, end=tiny.replay_start + pd.Timedelta(days=3))
    replay.trader.replay(replay.bars)
    result = replay_result(replay, BacktestConfig())
    assert len(result.equity) == len(replay.bars) and result.equity.notna().all()
    assert isinstance(replay.trader, Trader)


def test_features_are_built_once_then_kept_up_to_date_and_equal_a_full_build(tiny: TinyModel, tmp_path: Path) -> None:
    """The trader builds each symbol's table in full once, then appends the new bars (the parity test above
    compares the resulting trades with the backtest's full build); its probability equals a full rebuild's."""
    models = registry_models(tiny.tracking, tiny.champion)
    replay = open_replay(CandleFolder.open(tiny.folder), models, StateStore(f"sqlite:///{tmp_path}/s.db"),
                         BacktestConfig(), PERMISSIVE, tiny.replay_start, end=tiny.replay_start + pd.Timedelta(days=2))
    reports: list = []
    replay.trader.replay(replay.bars, reports.append)
    builders = replay.trader._builders
    assert sorted(builders) == sorted(models.symbols) and all(b.rebuilds == 1 for b in builders.values())
    assert all({"candles", "model", "features", "prediction", "decision", "execution", "persistence", "total"} <= set(r.timings)
               for r in reports)
    last = reports[-1]
    frames = replay.trader.feed.closed_by(last.bar_time + replay.trader.timeframe.delta)
    replay.trader._builders = {}  # a fresh builder is a full build
    assert replay.trader.score(frames, last.bar_time) == last.probabilities
    assert all(b.rebuilds == 1 for b in replay.trader._builders.values())


def test_what_the_risk_limits_change_in_a_models_rules_is_named() -> None:
    model = StrategyRules(threshold=0.6, sl_stop=None, tp_stop=0.03, max_hold_bars=6, sizing="fraction", fraction=0.1)
    executed = rules.effective_rules(model, RiskConfig(max_stop_loss=0.02))
    assert rules.rule_changes(model, executed) == ["sl_stop None -> 0.02", "sizing fraction -> risk"]
    assert rules.rule_changes(model, rules.effective_rules(model, RiskConfig())) == []


def test_the_bar_that_closed_is_scored_as_the_backtest_scores_it(tiny: TinyModel) -> None:
    """``predict_at`` (the trader's one model call a bar) gives the probabilities ``predict_tables`` (the
    backtest's path) gives for the same windows."""
    from pricelevel.inference.scoring import predict_at, predict_tables, tables_for_spec

    models = registry_models(tiny.tracking, tiny.champion)
    model = models.current
    tables = tables_for_spec(CandleFolder.open(tiny.folder), model.spec)
    at = tables[SYMBOLS[0]].frame.timestamps[-3]
    scored = predict_tables(model.predict, model.spec, tables, since=at)
    want = {row.symbol: row.probability for row in scored[scored["timestamp"] == at].itertuples()}
    got = predict_at(model.predict, model.spec, [t.frame for t in tables.values()], at)
    assert sorted(got) == sorted(want) == sorted(SYMBOLS)
    assert got == pytest.approx(want, rel=1e-6)


def test_an_outage_over_several_bars_is_said_once_and_the_trader_keeps_stepping(fake, httpserver, tiny: TinyModel, tmp_path) -> None:
    from pricelevel.core.timeframes import Timeframe
    from pricelevel.trading.feeds import ReplayFeed
    from pricelevel.trading.service import exchange_execution

    models = registry_models(tiny.tracking, tiny.champion)
    spec = models.current.spec
    feed = ReplayFeed(CandleFolder.open(tiny.folder), models.symbols, spec.table_spec().input_timeframes)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    exchange = _exchange(fake, httpserver.url_for("").rstrip("/"))
    make = exchange_execution(exchange, store, models.symbols, sleep=lambda s: None, bar=Timeframe(spec.timeframe).delta)
    notes = RecordingNotifier()
    trader = Trader(store, models, feed, make, PERMISSIVE, BacktestConfig(), notes)
    bars = feed.bar_times(Timeframe(spec.timeframe), tiny.replay_start)[:5]
    fake.set_outage(503)
    for bar in bars[:3]:  # a 12-hour outage: three bars stepped, none raises
        report = trader.on_bar_close(bar)
        assert not report.skipped
    down = [text for kind, text in notes.messages if "EXCHANGE UNAVAILABLE" in text]
    assert len(down) == 1 and "HTTP 503" in down[0], notes.messages
    assert trader.risk.state.breaker_tripped, "the breaker counts the bars the exchange was away"
    fake.set_outage(None)
    trader.recover()
    trader.on_bar_close(bars[3])
    back = [text for kind, text in notes.messages if "answers again" in text]
    assert len(back) == 1 and not trader.needs_recovery()
    assert len(store.frame(EQUITY)) == 4


def test_a_bad_candle_for_one_symbol_is_named_refetched_and_the_others_keep_trading(tiny: TinyModel, httpserver, tmp_path) -> None:
    """The live feed (REST ingest + validation) under the trader: a ``high < low`` candle of one symbol is named
    with its file and rows, only that symbol is skipped, the breaker does not count it, and the corrected candle
    is fetched again at the next bar."""
    from pricelevel.core.timeframes import Timeframe
    from pricelevel.data.catalogue import DataCatalogue
    from pricelevel.data.config import ValidationConfig
    from pricelevel.data.sources.bybit import BybitSource
    from pricelevel.trading.feeds import StoreFeed
    from pricelevel.trading.service import paper_execution
    from tests.fakes.bybit_server import KLINE_PATH, FakeBybit

    models = registry_models(tiny.tracking, tiny.champion)
    spec = models.current.spec
    timeframe, inputs = Timeframe(spec.timeframe), spec.table_spec().input_timeframes
    folder = CandleFolder.open(tiny.folder)
    stamps = pd.DatetimeIndex(folder.read(models.symbols[0], timeframe)["timestamp"])
    bars = stamps[stamps >= tiny.replay_start][:3]
    now = {"t": bars[0] + timeframe.delta}
    market = FakeBybit(now=lambda: now["t"])
    for symbol in models.symbols:
        for tf in inputs:
            market.add(symbol, tf, folder.read(symbol, tf))
    httpserver.expect_request(KLINE_PATH).respond_with_handler(market.handle)
    config = BybitConfig(endpoint=httpserver.url_for("").rstrip("/"), timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=2, backoff_s=0.0,
                         backoff_max_s=0.0)
    source = BybitSource(config, now=lambda: now["t"], sleep=lambda s: None)
    start = folder.read(models.symbols[0], inputs[-1])["timestamp"].iloc[0]
    feed = StoreFeed(source, DataCatalogue(tmp_path / "data", "bybit"), ValidationConfig(), models.symbols, inputs, start=start)
    store = StateStore(f"sqlite:///{tmp_path}/s.db")
    notes = RecordingNotifier()
    risk = PERMISSIVE.model_copy(update={"breaker_errors": 1})  # one counted bar would trip it
    trader = Trader(store, models, feed, paper_execution(models.symbols, BacktestConfig()), risk, BacktestConfig(), notes)

    bad = models.symbols[1]
    market.serve_bad_candle(bad, timeframe, bars[0])
    report = trader.on_bar_close(bars[0])
    verdicts = {d.symbol: d.signal for d in report.decisions}
    assert verdicts[bad] == "stale" and all(verdicts[s] != "stale" for s in models.symbols if s != bad)
    (named,) = [text for kind, text in notes.messages if kind == "stale"]
    assert bad in named and "high >= low" in named and f"{bad}_{timeframe}.parquet" in named and "row" in named
    assert not trader.risk.state.breaker_tripped, "one symbol's bad candle does not trip the account's breaker"

    market.correct_candle(bad, timeframe, bars[0])  # the exchange corrects it; the next bar fetches it again
    now["t"] = bars[1] + timeframe.delta
    report = trader.on_bar_close(bars[1])
    assert all(d.signal != "stale" for d in report.decisions)
    assert any("candles good again" in text for _, text in notes.messages)
    frames = feed.closed_by(bars[1] + timeframe.delta)
    served = folder.read(bad, timeframe)
    got = frames[bad][timeframe]
    assert float(got.loc[got["timestamp"] == bars[0], "high"].iloc[0]) == float(served.loc[served["timestamp"] == bars[0], "high"].iloc[0])
