"""The state database can evolve: a database written by the previous pricelevel (tests/legacy/state_v1.py, the
code before schema versions, verbatim) is migrated when a store opens it and reads back as it was written; the
migrations build exactly the tables state.py declares; several processes opening one database at once migrate it
once; the kv documents are declared and versioned, upgraded from older versions, refused (one line) from newer
ones, and their models mirror the dataclasses they persist."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text, update

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.engine import EngineState
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading import control, documents, migrations
from pricelevel.trading.documents import (
    COMMAND_KINDS,
    COMMANDS,
    EXECUTION,
    RISK,
    ClosedTradeDocument,
    Document,
    DocumentError,
    EngineDocument,
    ExchangeExecution,
    PaperExecution,
    PositionDocument,
    RiskDocument,
)
from pricelevel.trading.live import Position
from pricelevel.trading.paper import ClosedTrade, PaperBroker
from pricelevel.trading.risk import RiskState
from pricelevel.trading.state import KV, METADATA, ORDERS, TRADES, StateStore
from tests.legacy import state_v1
from tests.postgres import Postgres, postgres_fixture  # noqa: F401

T0 = pd.Timestamp("2024-06-01 08:00", tz="UTC")
#: The risk state as the previous trader kept it (latched halt, a cool-down, refusals counted).
OLD_RISK = RiskState(peak_equity=10_250.0, halted="drawdown 12.0% reached the 10% limit", day="2024-06-01",
                     day_start_equity=10_100.0, consecutive_losses=2, cooldown_until="2024-06-02 08:00:00+00:00",
                     refusals={"cooling": 3, "halted": 1})
#: ``ExchangeBroker.to_state()`` of the previous code: positions without ``exiting``, no account memory.
OLD_EXCHANGE_EXECUTION = {
    "symbols": ["BTCUSDT", "ETHUSDT"], "exchange": "bybit-testnet",
    "positions": {"BTCUSDT": {"size": 0.0166, "entry_price": 60_000.0, "entry_time": "2024-06-01 04:00:00+00:00",
                              "entry_fees": 1.0, "cost": 1_000.0, "stop_loss": 58_800.0, "take_profit": 62_400.0,
                              "bars_held": 2, "last_close": math.nan, "entry_client_id": "pl-abc"}},
}
#: ``PaperBroker.to_state()`` of the previous code: the engine without the protections' state.
OLD_PAPER_EXECUTION = {
    "symbols": ["BTCUSDT", "ETHUSDT"], "bar_times": ["2024-06-01 00:00:00+00:00", "2024-06-01 04:00:00+00:00"],
    "engine": {"cash": [9_000.0], "position": [0.0166, 0.0], "entry_price": [60_000.0, math.nan],
               "entry_fees": [1.0, 0.0], "entry_bar": [1, -1], "sl_price": [58_800.0, math.nan],
               "tp_price": [math.nan, math.nan], "last_close": [60_100.0, 3_000.0], "pending": [0, 0],
               "stopped_bar": [-1, -1], "due_bar": [7, -1], "pending_sl": [math.nan, math.nan],
               "pending_tp": [math.nan, math.nan], "rejected": [0, 0, 0], "bars_done": 2},
}
OLD_COMMANDS = [{"kind": "forceexit", "symbols": ["BTCUSDT"], "by": "telegram:alice", "at": "2024-06-01T09:00:00+00:00"}]


def _previous_database(url: str, execution: dict) -> None:
    """A state database as the previous pricelevel wrote it: its tables, a bar's rows and every kv document."""
    old = state_v1.StateStore(url)
    with old.transaction() as tx:
        old.add_order(tx, client_id="pl-abc", symbol="BTCUSDT", side="Buy", intent="entry", bar_time=T0,
                      model_version="7", status="FILLED", exchange_id="x1", quote_amount=1_000.0, base_qty=None,
                      filled_qty=0.0166, avg_price=60_000.0, fee=1.0, message="")
        old.add_decisions(tx, [{"bar_time": T0, "symbol": "BTCUSDT", "model_version": "7", "probability": 0.8,
                                "signal": "entry", "verdict": "approved"}])
        old.add_trades(tx, [{"symbol": "ETHUSDT", "entry_time": T0 - pd.Timedelta(hours=8), "exit_time": T0,
                             "entry_price": 3_000.0, "exit_price": 2_940.0, "size": 0.3, "pnl": -18.6, "entry_fees": 0.3,
                             "exit_fees": 0.3, "exit_reason": "stop_loss", "model_version": "7"}])
        old.add_equity(tx, T0, 10_000.0, 9_000.0)
        old.add_switch(tx, bar_time=T0, from_version="6", to_version="7", accepted=1, reason="champion moved")
        old.put(tx, "risk", OLD_RISK.to_dict())
        old.put(tx, "execution", execution)
        old.put(tx, "commands", OLD_COMMANDS)
        old.put(tx, "forced_exits", ["ETHUSDT"])
        old.put(tx, "last_bar", str(T0))
        old.put(tx, "model", {"uri": "models:/pricelevel@champion", "version": "7"})
        old.put(tx, "mode", "testnet")
    old.close()


def _schema_differences(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, METADATA)
    engine.dispose()
    return [d for d in differences if not (d[0] == "remove_table" and d[1].name == migrations.VERSION_TABLE)]


def _check_previous_database_migrated(url: str) -> None:
    _previous_database(url, OLD_EXCHANGE_EXECUTION)
    store = StateStore(url)
    assert store.migrated == [1, 2]
    assert _schema_differences(url) == []  # exactly the tables state.py declares
    with store.transaction() as tx:
        assert migrations.current_version(tx) == migrations.HEAD
        risk = store.read(tx, RISK)
        execution = store.read(tx, EXECUTION)
        commands = store.read(tx, COMMANDS)
        (order,) = store.orders(tx)
        raw_risk, raw_execution = store.get(tx, "risk"), store.get(tx, "execution")
        plain = {key: store.get(tx, key) for key in ("forced_exits", "last_bar", "model", "mode")}
    # Read back as written, upgraded where the document changed since.
    assert risk.to_state() == OLD_RISK and RiskState(**raw_risk) == OLD_RISK
    assert isinstance(execution, ExchangeExecution) and execution.exchange == "bybit-testnet"
    btc = execution.positions["BTCUSDT"]
    assert (btc.size, btc.cost, btc.bars_held, btc.entry_client_id, btc.exiting) == (0.0166, 1_000.0, 2, "pl-abc", "")
    assert math.isnan(btc.last_close) and execution.unreported == [] and execution.down_since is None
    assert Position.from_dict(raw_execution["positions"]["BTCUSDT"]).exiting == ""  # as the broker reads it
    assert [c.model_dump() for c in commands] == OLD_COMMANDS
    assert plain == {"forced_exits": ["ETHUSDT"], "last_bar": str(T0), "model": {"uri": "models:/pricelevel@champion",
                                                                                  "version": "7"}, "mode": "testnet"}
    assert order["status"] == "FILLED" and order["filled_qty"] == 0.0166 and order["resolution"] is None
    assert as_rows(store, TRADES)[0]["pnl"] == -18.6 and control.status(store)["risk"]["halted"] == OLD_RISK.halted
    # The new tables work; a document written now carries its version.
    with store.transaction() as tx:
        assert store.add_execution(tx, exec_id="e1", client_id="pl-abc", symbol="BTCUSDT", side="Buy", qty=0.0166,
                                   price=60_000.0, fee=0.0000166, fee_coin="BTC", time=T0)
        assert not store.add_execution(tx, exec_id="e1", client_id="pl-abc", symbol="BTCUSDT", side="Buy", qty=0.0166,
                                       price=60_000.0, fee=0.0000166, fee_coin="BTC", time=T0)  # recorded once
        assert store.mark_applied(tx, ["e1"]) == 1 and store.mark_applied(tx, ["e1"]) == 0
        store.queue_messages(tx, [{"chat_id": -1001234567890123, "kind": "order", "text": "hi", "markup": None}])
        store.write(tx, RISK, risk)
        store.update_order(tx, "pl-abc", resolution="found by its client id")
        versions = dict(tx.execute(KV.select().with_only_columns(KV.c.key, KV.c.version)).all())
    assert versions["risk"] == RISK.version and versions["execution"] is None  # untouched until written
    assert StateStore(url).migrated == []  # the next start: nothing to do
    store.close()


def as_rows(store: StateStore, table) -> list[dict]:
    return store.frame(table).to_dict("records")


def test_a_state_database_of_the_previous_schema_is_migrated_at_start_and_read_back(tmp_path: Path) -> None:
    _check_previous_database_migrated(f"sqlite:///{tmp_path / 'state.db'}")


@pytest.mark.postgres
def test_a_postgresql_state_database_of_the_previous_schema_is_migrated(postgres: Postgres) -> None:
    _check_previous_database_migrated(postgres.url(postgres.database("state")))
    fresh = postgres.url(postgres.database("fresh"))
    assert StateStore(fresh).migrated == [1, 2] and _schema_differences(fresh) == []


def test_the_paper_engines_state_of_the_previous_schema_is_upgraded_and_resumed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _previous_database(url, OLD_PAPER_EXECUTION)
    store = StateStore(url)
    with store.transaction() as tx:
        execution = store.read(tx, EXECUTION)
        raw = store.get(tx, "execution")
    assert isinstance(execution, PaperExecution) and execution.engine.bars_done == 2
    broker = PaperBroker.from_state(raw, BacktestConfig(), StrategyRules(threshold=0.5))
    assert broker.positions()["BTCUSDT"]["size"] == 0.0166 and broker.cash == 9_000.0
    fresh = EngineState.initial(2, 10_000.0)
    assert broker.state.guard_f.tolist() == pytest.approx(fresh.guard_f.tolist(), nan_ok=True)
    assert broker.state.guard_i.tolist() == fresh.guard_i.tolist() and broker.state.refused.tolist() == [0, 0, 0, 0]
    with store.transaction() as tx:  # and what the broker writes now is its declared model
        store.write(tx, EXECUTION, broker.to_state())
        again = store.read(tx, EXECUTION)
    assert again.engine.position == [0.0166, 0.0]


def test_a_new_database_gets_exactly_the_declared_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert StateStore(url).migrated == [m.version for m in migrations.MIGRATIONS]
    assert _schema_differences(url) == []
    assert migrations.HEAD == max(m.version for m in migrations.MIGRATIONS) == migrations.MIGRATIONS[-1].version


def test_several_processes_opening_one_database_migrate_it_once(tmp_path: Path) -> None:
    """Four processes (the service, ``pricelevel trader kill``, ...) open a previous-schema database at once."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _previous_database(url, OLD_EXCHANGE_EXECUTION)
    go = tmp_path / "go"
    script = (
        "import pathlib, sys, time\n"
        "from pricelevel.trading.state import StateStore\n"
        f"pathlib.Path(sys.argv[1]).touch()\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        f"print(StateStore({url!r}).migrated)\n"
    )
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"ready{k}")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for k in range(4)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(4)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["[1, 2]", "[]", "[]", "[]"]
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text(f"SELECT count(*) FROM {migrations.VERSION_TABLE}")).scalar() == 1
        assert "resolution" in {c["name"] for c in inspect(connection).get_columns("orders")}
    engine.dispose()


def test_a_database_or_a_document_newer_than_this_code_is_refused_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(url)
    with store.transaction() as tx:
        store.write(tx, RISK, RiskDocument())
        tx.execute(update(KV).where(KV.c.key == "risk").values(version=RISK.version + 1))
    with pytest.raises(DocumentError) as refused, store.transaction() as tx:
        store.read(tx, RISK)
    assert "\n" not in str(refused.value) and "written by a newer pricelevel" in str(refused.value)
    with pytest.raises(DocumentError, match="newer pricelevel"), store.transaction() as tx:
        store.get(tx, "risk")  # the plain reader too: never a guess at a newer shape
    with store.transaction() as tx:
        tx.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version = {migrations.HEAD + 1}"))
    with pytest.raises(migrations.SchemaError, match="schema is version .* written by a newer pricelevel"):
        StateStore(url)


def test_a_document_is_upgraded_through_every_version_and_written_only_if_it_validates(tmp_path: Path) -> None:
    from pydantic import BaseModel

    class Alarm(BaseModel):
        hour: int
        days: list[str]

    seen = []

    def v1(raw):  # version 0 stored the time as "HH:MM"
        seen.append(1)
        return {"hour": int(raw["time"].split(":")[0]), "day": raw["day"]}

    def v2(raw):  # version 1 had one day
        seen.append(2)
        return {"hour": raw["hour"], "days": [raw["day"]]}

    alarm = Document[Alarm]("alarm", Alarm, 2, {0: v1, 1: v2})
    assert alarm.load({"time": "07:30", "day": "mon"}, None) == Alarm(hour=7, days=["mon"]) and seen == [1, 2]
    assert alarm.load({"hour": 8, "day": "tue"}, 1) == Alarm(hour=8, days=["tue"]) and seen == [1, 2, 2]
    assert alarm.load({"hour": 9, "days": []}, 2) == Alarm(hour=9, days=[])
    with pytest.raises(ValueError, match="no upgrade from version"):
        Document[Alarm]("alarm", Alarm, 2, {0: v1})
    with pytest.raises(DocumentError, match="upgrade from version 0 to 1 failed"):
        alarm.load({"day": "mon"}, 0)
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    with pytest.raises(DocumentError, match=r"'risk' does not match its declared model.*halted"), store.transaction() as tx:
        store.write(tx, RISK, {**OLD_RISK.to_dict(), "halted": ["not", "a", "reason"]})
    with store.transaction() as tx:
        assert store.read(tx, RISK) is None  # nothing was stored


def test_the_document_models_mirror_what_they_persist() -> None:
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    assert set(RiskDocument.model_fields) == names(RiskState)
    assert RiskDocument.from_state(OLD_RISK).to_state() == OLD_RISK
    assert set(EngineDocument.model_fields) == names(EngineState)
    assert set(PositionDocument.model_fields) == names(Position)
    assert set(ClosedTradeDocument.model_fields) == names(ClosedTrade) | {"told"}  # the broker's mark on it
    assert COMMAND_KINDS == control.KINDS
    assert set(documents.DOCUMENTS) == {"risk", "execution", "commands", "forced_exits", "last_bar", "model", "mode",
                                        "service"}
    for document in documents.DOCUMENTS.values():
        assert all(v in document.upgrades for v in range(document.version))
    position = Position(size=1.0, entry_price=2.0, entry_time=str(T0), entry_fees=0.1, cost=2.1, stop_loss=1.5,
                        take_profit=3.0)
    assert Position.from_dict(PositionDocument.model_validate(asdict(position)).model_dump()) == position
    assert {column.name for column in ORDERS.columns} >= {"client_id", "status", "resolution"}
