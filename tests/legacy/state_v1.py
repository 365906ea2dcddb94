# The state database code of pricelevel before schema versions (git 06be3d7, lib/trading/state.py), frozen
# verbatim: tests/test_state_schema.py writes a database with it and checks that today's StateStore migrates it.
# ruff: noqa
"""The trader's state in a database (SQLAlchemy: SQLite by default, PostgreSQL by URL), so a restart picks up
where the last run stopped and nothing is decided or sent twice.

Tables: ``orders`` (one row per order, keyed by its client id, through NEW -> SENT -> ACKED | UNKNOWN ->
FILLED / PARTIAL / REJECTED / CANCELLED), ``decisions`` (one row per symbol and bar: model version, probability,
signal, risk verdict), ``trades`` (closed round trips), ``equity`` (one snapshot per bar), ``switches`` (model
hot-swaps), and ``kv`` (the risk state, the paper broker's engine state, the last bar processed: small JSON
documents). A bar is processed in one transaction: its decisions, its new order intents and the state after it
are committed together, *before* any order is sent.

No secret is ever written here: rows hold symbols, prices, quantities, ids and reasons only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

METADATA = MetaData()

ORDERS = Table(
    "orders", METADATA,
    Column("client_id", String(36), primary_key=True),
    Column("symbol", String(24), nullable=False),
    Column("side", String(4), nullable=False),
    Column("intent", String(16), nullable=False),
    Column("bar_time", DateTime(timezone=True), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("status", String(12), nullable=False),
    Column("exchange_id", String(64)),
    Column("quote_amount", Float),
    Column("base_qty", Float),
    Column("filled_qty", Float, nullable=False, default=0.0),
    Column("avg_price", Float, nullable=False, default=0.0),
    Column("fee", Float, nullable=False, default=0.0),
    Column("message", Text, nullable=False, default=""),
    Column("updated", DateTime(timezone=True), nullable=False),
)
DECISIONS = Table(
    "decisions", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bar_time", DateTime(timezone=True), nullable=False),
    Column("symbol", String(24), nullable=False),
    Column("model_version", String(32), nullable=False),
    Column("probability", Float),
    Column("signal", String(16), nullable=False),
    Column("verdict", Text, nullable=False),
    UniqueConstraint("bar_time", "symbol", name="one_decision_per_symbol_and_bar"),
)
TRADES = Table(
    "trades", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(24), nullable=False),
    Column("entry_time", DateTime(timezone=True), nullable=False),
    Column("exit_time", DateTime(timezone=True), nullable=False),
    Column("entry_price", Float, nullable=False),
    Column("exit_price", Float, nullable=False),
    Column("size", Float, nullable=False),
    Column("pnl", Float, nullable=False),
    Column("entry_fees", Float, nullable=False),
    Column("exit_fees", Float, nullable=False),
    Column("exit_reason", String(16), nullable=False),
    Column("model_version", String(32), nullable=False),
)
EQUITY = Table(
    "equity", METADATA,
    Column("bar_time", DateTime(timezone=True), primary_key=True),
    Column("equity", Float, nullable=False),
    Column("cash", Float, nullable=False),
)
SWITCHES = Table(
    "switches", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("bar_time", DateTime(timezone=True), nullable=False),
    Column("from_version", String(32)),
    Column("to_version", String(32), nullable=False),
    Column("accepted", Integer, nullable=False),
    Column("reason", Text, nullable=False),
)
KV = Table(
    "kv", METADATA,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def as_utc(value: Any) -> pd.Timestamp:
    """A time read back from the database as UTC (SQLite returns naive datetimes, PostgreSQL aware ones)."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _sqlite_for_several_processes(connection: Any, _record: Any) -> None:
    """The service, ``pricelevel trader kill`` and Telegram write the same file: WAL lets readers run beside a
    writer, and a writer waits up to 10 s for the lock instead of failing at once."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def default_state_url(data_root: Path, mode: str = "paper") -> str:
    return f"sqlite:///{Path(data_root) / 'trader' / mode / 'state.db'}"


class StateStore:
    """The trader's database; every write goes through :meth:`transaction`."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_for_several_processes)
        METADATA.create_all(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------ kv documents

    @staticmethod
    def get(tx: Connection, key: str, default: Any = None) -> Any:
        row = tx.execute(select(KV.c.value).where(KV.c.key == key)).first()
        return json.loads(row[0]) if row else default

    @staticmethod
    def put(tx: Connection, key: str, value: Any) -> None:
        text = json.dumps(value, default=str, allow_nan=True)
        if tx.execute(update(KV).where(KV.c.key == key).values(value=text)).rowcount == 0:
            tx.execute(insert(KV).values(key=key, value=text))

    # ------------------------------------------------------------------------------------------ rows

    @staticmethod
    def add_order(tx: Connection, **row: Any) -> bool:
        """Insert an order intent (status NEW); False when this client id exists already (a decision is never
        sent twice, whatever retried it)."""
        if tx.execute(select(ORDERS.c.client_id).where(ORDERS.c.client_id == row["client_id"])).first():
            return False
        tx.execute(insert(ORDERS).values(**row, updated=pd.Timestamp.now(tz="UTC")))
        return True

    @staticmethod
    def update_order(tx: Connection, client_id: str, **values: Any) -> None:
        tx.execute(update(ORDERS).where(ORDERS.c.client_id == client_id).values(**values, updated=pd.Timestamp.now(tz="UTC")))

    @staticmethod
    def order(tx: Connection, client_id: str) -> dict[str, Any] | None:
        row = tx.execute(select(ORDERS).where(ORDERS.c.client_id == client_id)).first()
        return dict(row._mapping) if row else None

    @staticmethod
    def orders(tx: Connection, statuses: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        query = select(ORDERS).order_by(ORDERS.c.bar_time, ORDERS.c.client_id)
        if statuses:
            query = query.where(ORDERS.c.status.in_(statuses))
        return [dict(r._mapping) for r in tx.execute(query)]

    @staticmethod
    def add_decisions(tx: Connection, rows: list[Mapping[str, Any]]) -> None:
        if rows:
            tx.execute(insert(DECISIONS), [dict(r) for r in rows])

    @staticmethod
    def add_trades(tx: Connection, rows: list[Mapping[str, Any]]) -> None:
        if rows:
            tx.execute(insert(TRADES), [dict(r) for r in rows])

    @staticmethod
    def add_equity(tx: Connection, bar_time: pd.Timestamp, equity: float, cash: float) -> None:
        tx.execute(insert(EQUITY).values(bar_time=bar_time, equity=equity, cash=cash))

    @staticmethod
    def add_switch(tx: Connection, **row: Any) -> None:
        tx.execute(insert(SWITCHES).values(**row))

    def frame(self, table: Table) -> pd.DataFrame:
        """A whole table (for status, reports and tests)."""
        with self.engine.connect() as connection:
            return pd.DataFrame([dict(r._mapping) for r in connection.execute(select(table))])
