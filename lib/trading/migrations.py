"""The state database's table schema, versioned: every change is a numbered migration (Alembic operations, so one
text runs on SQLite and PostgreSQL), applied at :class:`~pricelevel.trading.state.StateStore` start, in order, in one
transaction, and recorded in the ``schema_version`` table.

Several processes open the same database (the service, ``pricelevel trader kill``, Telegram's companion): the
migration step takes the database's own write lock first (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock),
re-reads the version under it and migrates only if still needed, so the second process waits and finds nothing to
do. A database without ``schema_version`` was written before migrations existed (version 1's tables, made by
``create_all``) or is new: migration 1 creates whichever of its tables are missing.

To change the schema: change the table in ``state.py``, append a migration here that makes the same change, and
bump nothing else (:data:`HEAD` is the last migration's number). ``tests/test_state_schema.py`` checks that the
migrations build exactly the tables ``state.py`` declares, from an empty database and from the previous schema.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine

VERSION_TABLE = "schema_version"
#: ``pg_advisory_xact_lock`` key of the migration step (any constant; "pl-state" in ASCII).
POSTGRES_LOCK_KEY = 0x706C2D7374617465


class SchemaError(RuntimeError):
    """The database's schema is newer than this code (one line: which version, what to do)."""


@dataclass(frozen=True)
class Migration:
    version: int
    why: str
    apply: Callable[[Operations, Connection], None]


def _v1_tables() -> list[Table]:
    """The tables as the first trader wrote them (``create_all`` of pricelevel before migrations), frozen here."""
    metadata = MetaData()
    return [
        Table("orders", metadata,
              Column("client_id", String(36), primary_key=True), Column("symbol", String(24), nullable=False),
              Column("side", String(4), nullable=False), Column("intent", String(16), nullable=False),
              Column("bar_time", DateTime(timezone=True), nullable=False),
              Column("model_version", String(32), nullable=False), Column("status", String(12), nullable=False),
              Column("exchange_id", String(64)), Column("quote_amount", Float), Column("base_qty", Float),
              Column("filled_qty", Float, nullable=False), Column("avg_price", Float, nullable=False),
              Column("fee", Float, nullable=False), Column("message", Text, nullable=False),
              Column("updated", DateTime(timezone=True), nullable=False)),
        Table("decisions", metadata,
              Column("id", Integer, primary_key=True, autoincrement=True),
              Column("bar_time", DateTime(timezone=True), nullable=False), Column("symbol", String(24), nullable=False),
              Column("model_version", String(32), nullable=False), Column("probability", Float),
              Column("signal", String(16), nullable=False), Column("verdict", Text, nullable=False),
              UniqueConstraint("bar_time", "symbol", name="one_decision_per_symbol_and_bar")),
        Table("trades", metadata,
              Column("id", Integer, primary_key=True, autoincrement=True), Column("symbol", String(24), nullable=False),
              Column("entry_time", DateTime(timezone=True), nullable=False),
              Column("exit_time", DateTime(timezone=True), nullable=False),
              Column("entry_price", Float, nullable=False), Column("exit_price", Float, nullable=False),
              Column("size", Float, nullable=False), Column("pnl", Float, nullable=False),
              Column("entry_fees", Float, nullable=False), Column("exit_fees", Float, nullable=False),
              Column("exit_reason", String(16), nullable=False), Column("model_version", String(32), nullable=False)),
        Table("equity", metadata,
              Column("bar_time", DateTime(timezone=True), primary_key=True), Column("equity", Float, nullable=False),
              Column("cash", Float, nullable=False)),
        Table("switches", metadata,
              Column("id", Integer, primary_key=True, autoincrement=True),
              Column("bar_time", DateTime(timezone=True), nullable=False), Column("from_version", String(32)),
              Column("to_version", String(32), nullable=False), Column("accepted", Integer, nullable=False),
              Column("reason", Text, nullable=False)),
        Table("kv", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False)),
    ]


def _create_v1_tables(op: Operations, connection: Connection) -> None:
    present = set(inspect(connection).get_table_names())
    for table in _v1_tables():
        if table.name not in present:
            table.create(connection)


def _versions_outbox_executions(op: Operations, connection: Connection) -> None:
    op.add_column("kv", Column("version", Integer))
    op.add_column("orders", Column("resolution", Text))
    op.create_table(
        "outbox",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("chat_id", BigInteger, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("text", Text, nullable=False),
        Column("markup", Text),
        Column("status", String(8), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("created", DateTime(timezone=True), nullable=False),
        Column("settled", DateTime(timezone=True)),
        Column("error", Text, nullable=False),
    )
    op.create_index("outbox_waiting", "outbox", ["status", "id"])
    op.create_table(
        "executions",
        Column("exec_id", String(64), primary_key=True),
        Column("client_id", String(36), nullable=False),
        Column("symbol", String(24), nullable=False),
        Column("side", String(4), nullable=False),
        Column("qty", Float, nullable=False),
        Column("price", Float, nullable=False),
        Column("fee", Float, nullable=False),
        Column("fee_coin", String(16), nullable=False),
        Column("time", DateTime(timezone=True), nullable=False),
        Column("applied", Integer, nullable=False),
    )
    op.create_index("executions_by_order", "executions", ["client_id"])


#: Every migration, in order; the database's version is the number of the last one applied.
MIGRATIONS: Sequence[Migration] = (
    Migration(1, "the first trader's tables: orders, decisions, trades, equity, switches, kv", _create_v1_tables),
    Migration(2, "kv documents carry their version; orders their resolution; the Telegram outbox; exchange executions",
              _versions_outbox_executions),
)
HEAD = MIGRATIONS[-1].version


def _version_table() -> Table:
    return Table(VERSION_TABLE, MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("version", Integer, nullable=False), Column("migrated", DateTime(timezone=True), nullable=False))


def current_version(connection: Connection) -> int | None:
    """The database's schema version (``None``: no version table yet: a new database or one from before migrations)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    row = connection.execute(select(_version_table().c.version)).first()
    return int(row[0]) if row else None


def migrate(engine: Engine) -> list[int]:
    """Bring the database to :data:`HEAD`; returns the migrations applied (empty when it was current already).

    Cheap when current (one read); otherwise under the database's write lock, so concurrent starts migrate once."""
    with engine.connect() as connection:
        version = current_version(connection)
    if version is not None and version >= HEAD:
        _refuse_newer(version)
        return []
    with engine.connect() as connection:
        _lock(connection)
        version = current_version(connection) or 0  # again, under the lock: another process may have migrated
        _refuse_newer(version)
        pending = [m for m in MIGRATIONS if m.version > version]
        operations = Operations(MigrationContext.configure(connection))
        for migration in pending:
            migration.apply(operations, connection)
        if pending:
            _record(connection, HEAD)
        connection.commit()
    return [m.version for m in pending]


def _refuse_newer(version: int) -> None:
    if version > HEAD:
        raise SchemaError(f"the state database's schema is version {version}, written by a newer pricelevel (this one "
                          f"knows up to {HEAD}): upgrade pricelevel, or point trader.state_url at another database")


def _lock(connection: Connection) -> None:
    """The database's write lock for the rest of this transaction (waits while another process holds it)."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_LOCK_KEY})


def _record(connection: Connection, version: int) -> None:
    table = _version_table()
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    if not inspect(connection).has_table(VERSION_TABLE):
        table.create(connection)
    if connection.execute(table.update().values(version=version, migrated=now)).rowcount == 0:
        connection.execute(table.insert().values(id=1, version=version, migrated=now))
