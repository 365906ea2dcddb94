"""The trader's state in a database (SQLAlchemy: SQLite by default, PostgreSQL by URL), so a restart picks up
where the last run stopped and nothing is decided or sent twice.

Tables: ``orders`` (one row per order, keyed by its client id, through NEW -> SENT -> ACKED | UNKNOWN ->
FILLED / PARTIAL / REJECTED / CANCELLED), ``decisions`` (one row per symbol and bar: model version, probability,
signal, risk verdict), ``trades`` (closed round trips), ``equity`` (one snapshot per bar), ``switches`` (model
hot-swaps), ``kv`` (the risk state, the execution's books, the last bar processed: small JSON documents, each
declared and versioned in :mod:`~pricelevel.trading.documents`), ``executions`` (every fill the exchange reported,
once by its exec id) and ``outbox`` (Telegram messages waiting to be sent, kept across outages and restarts). A bar
is processed in one transaction: its decisions, its new order intents and the state after it are committed
together, *before* any order is sent.

The schema is versioned (:mod:`~pricelevel.trading.migrations`): a database written by an older pricelevel is
migrated when a store opens it, once, whichever of several processes opens it first.

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
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from pricelevel.trading.documents import DOCUMENTS, Document
from pricelevel.trading.migrations import migrate

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
    #: How an order whose answer was lost was settled (found by its client id, never sent, ...); NULL: it was not.
    Column("resolution", Text),
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
    #: The declared document's schema version (documents.py); NULL: written before versions, or not declared.
    Column("version", Integer),
)
EXECUTIONS = Table(
    "executions", METADATA,
    Column("exec_id", String(64), primary_key=True),
    Column("client_id", String(36), nullable=False),
    Column("symbol", String(24), nullable=False),
    Column("side", String(4), nullable=False),
    Column("qty", Float, nullable=False),
    Column("price", Float, nullable=False),
    Column("fee", Float, nullable=False),
    Column("fee_coin", String(16), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    #: 1 once the fill is in the books (positions, trades); 0 while recorded only.
    Column("applied", Integer, nullable=False, default=0),
)
Index("executions_by_order", EXECUTIONS.c.client_id)
OUTBOX = Table(
    "outbox", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chat_id", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("text", Text, nullable=False),
    #: The inline keyboard, as Telegram's JSON (NULL: none).
    Column("markup", Text),
    #: "queued" until "sent", "failed" (refused by Telegram) or "expired" (a reply, or a chat no longer authorised).
    Column("status", String(8), nullable=False),
    #: Tries Telegram refused; a network error or a 429 never counts.
    Column("attempts", Integer, nullable=False, default=0),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("settled", DateTime(timezone=True)),
    Column("error", Text, nullable=False, default=""),
)
Index("outbox_waiting", OUTBOX.c.status, OUTBOX.c.id)


def as_utc(value: Any) -> pd.Timestamp:
    """A time read back from the database as UTC (SQLite returns naive datetimes, PostgreSQL aware ones)."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _sqlite_for_several_processes(connection: Any, _record: Any) -> None:
    """The service, ``pricelevel trader kill`` and Telegram write the same file: WAL lets readers run beside a
    writer, and a writer waits up to 10 s for the lock instead of failing at once."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")  # first: switching to WAL may itself wait for another process
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def default_state_url(data_root: Path, mode: str = "paper") -> str:
    return f"sqlite:///{Path(data_root) / 'trader' / mode / 'state.db'}"


class StateStore:
    """The trader's database; every write goes through :meth:`transaction`. Opening it migrates its schema to
    this code's (:func:`~pricelevel.trading.migrations.migrate`)."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine: Engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_for_several_processes)
        self.migrated = migrate(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------ kv documents

    @staticmethod
    def read(tx: Connection, document: Document[Any], default: Any = None) -> Any:
        """The declared ``document`` as its model (upgraded from the version it was stored as), or ``default``.
        Raises :class:`~pricelevel.trading.documents.DocumentError` (one line) for a document it cannot read."""
        row = tx.execute(select(KV.c.value, KV.c.version).where(KV.c.key == document.key)).first()
        return default if row is None else document.load(json.loads(row[0]), row[1])

    @staticmethod
    def write(tx: Connection, document: Document[Any], value: Any) -> None:
        """Store ``value`` (the model, or the same data as plain JSON) as ``document``'s current version; a value
        that does not match the declared model raises instead of being stored."""
        StateStore._store(tx, document.key, document.dump(value), document.version)

    @staticmethod
    def get(tx: Connection, key: str, default: Any = None) -> Any:
        """A kv document as plain JSON; a declared one is upgraded from an older version first (and refused if newer)."""
        row = tx.execute(select(KV.c.value, KV.c.version).where(KV.c.key == key)).first()
        if row is None:
            return default
        value, document = json.loads(row[0]), DOCUMENTS.get(key)
        if document is None or row[1] == document.version:
            return value
        return document.dump(document.load(value, row[1]))

    @staticmethod
    def put(tx: Connection, key: str, value: Any) -> None:
        """Store a kv document as plain JSON; a declared one is stamped with its current version (unchecked: prefer
        :meth:`write`, which validates)."""
        document = DOCUMENTS.get(key)
        StateStore._store(tx, key, value, document.version if document else None)

    @staticmethod
    def _store(tx: Connection, key: str, value: Any, version: int | None) -> None:
        text = json.dumps(value, default=str, allow_nan=True)
        if tx.execute(update(KV).where(KV.c.key == key).values(value=text, version=version)).rowcount == 0:
            tx.execute(insert(KV).values(key=key, value=text, version=version))

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

    # ------------------------------------------------------------------------------------------ executions

    @staticmethod
    def add_execution(tx: Connection, **row: Any) -> bool:
        """Record one fill the exchange reported (``exec_id``, ``client_id``, ``symbol``, ``side``, ``qty``,
        ``price``, ``fee``, ``fee_coin``, ``time``); False when this exec id is recorded already."""
        if tx.execute(select(EXECUTIONS.c.exec_id).where(EXECUTIONS.c.exec_id == row["exec_id"])).first():
            return False
        tx.execute(insert(EXECUTIONS).values(**{"applied": 0, **row}))
        return True

    @staticmethod
    def executions(tx: Connection, client_id: str | None = None, applied: bool | None = None) -> list[dict[str, Any]]:
        """Recorded fills, oldest first; of one order, and/or only those (not yet) in the books."""
        query = select(EXECUTIONS).order_by(EXECUTIONS.c.time, EXECUTIONS.c.exec_id)
        if client_id is not None:
            query = query.where(EXECUTIONS.c.client_id == client_id)
        if applied is not None:
            query = query.where(EXECUTIONS.c.applied == int(applied))
        return [dict(r._mapping) for r in tx.execute(query)]

    @staticmethod
    def mark_applied(tx: Connection, exec_ids: list[str]) -> int:
        """Mark fills as in the books; returns how many were not already (so each is applied exactly once)."""
        if not exec_ids:
            return 0
        return tx.execute(update(EXECUTIONS).where(EXECUTIONS.c.exec_id.in_(exec_ids), EXECUTIONS.c.applied == 0)
                          .values(applied=1)).rowcount

    # ------------------------------------------------------------------------------------------ the outbox

    @staticmethod
    def queue_messages(tx: Connection, rows: list[Mapping[str, Any]]) -> list[int]:
        """Queue messages (``chat_id``, ``kind``, ``text``, ``markup``); returns their ids, in order."""
        now = pd.Timestamp.now(tz="UTC")
        return [tx.execute(insert(OUTBOX).values(status="queued", attempts=0, created=now, error="", **row)).inserted_primary_key[0]
                for row in rows]

    @staticmethod
    def waiting_messages(tx: Connection, limit: int, after: int = 0) -> list[dict[str, Any]]:
        """The oldest queued messages (id above ``after``), in the order they were queued."""
        query = (select(OUTBOX).where(OUTBOX.c.status == "queued", OUTBOX.c.id > after)
                 .order_by(OUTBOX.c.id).limit(limit))
        return [dict(r._mapping) for r in tx.execute(query)]

    @staticmethod
    def count_waiting(tx: Connection) -> int:
        return int(tx.execute(select(func.count()).select_from(OUTBOX).where(OUTBOX.c.status == "queued")).scalar_one())

    @staticmethod
    def settle_message(tx: Connection, message_id: int, status: str, attempts: int = 0, error: str = "") -> bool:
        """Mark a queued message sent, failed or expired; False when it was settled already (never twice)."""
        return tx.execute(update(OUTBOX).where(OUTBOX.c.id == message_id, OUTBOX.c.status == "queued").values(
            status=status, attempts=attempts, error=error, settled=pd.Timestamp.now(tz="UTC"))).rowcount == 1

    @staticmethod
    def count_refusal(tx: Connection, message_id: int, error: str) -> None:
        tx.execute(update(OUTBOX).where(OUTBOX.c.id == message_id).values(attempts=OUTBOX.c.attempts + 1, error=error))

    def frame(self, table: Table) -> pd.DataFrame:
        """A whole table (for status, reports and tests)."""
        with self.engine.connect() as connection:
            return pd.DataFrame([dict(r._mapping) for r in connection.execute(select(table))])
