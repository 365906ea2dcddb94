"""A temporary PostgreSQL cluster for the tests marked ``postgres``: the system's binaries, no Docker.

Import the fixture into a test module (``from tests.postgres import postgres_fixture  # noqa: F401``). Without
PostgreSQL installed those tests skip, unless ``PRICELEVEL_TEST_POSTGRES=required`` (``.ci/run`` sets it after
installing PostgreSQL): then they fail, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pricelevel.core.postgres import LocalPostgres, pg_bindir

#: Durability off: a test database is thrown away, and fsync on a shared 2-core machine is the slow part.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "200"}


@dataclass
class Postgres:
    server: LocalPostgres
    password: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def database(self, prefix: str) -> str:
        """A new, empty database; returns its name."""
        name = f"{prefix}_{next(self._names)}"
        self.server.create_database(name, self.password)
        return name

    def url(self, database: str, driver: str = "psycopg2") -> str:
        return self.server.url(database, driver)

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs besides the URL: where its password is."""
        return {"PGPASSFILE": str(self.server.pgpass)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[Postgres]:
    """One server for the session, in a folder the ``postgres`` user can reach (as root it runs as that user)."""
    if pg_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("PRICELEVEL_TEST_POSTGRES") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix="pricelevel-pg-"))
    folder.chmod(0o755)
    server = LocalPostgres(folder / "pg", free_port())
    password = secrets.token_urlsafe(18)
    previous = os.environ.get("PGPASSFILE")
    try:
        server.init(password)
        server.start(settings=TEST_SETTINGS)
        os.environ["PGPASSFILE"] = str(server.write_pgpass(password))
        yield Postgres(server, password)
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        if previous is None:
            os.environ.pop("PGPASSFILE", None)
        else:
            os.environ["PGPASSFILE"] = previous
        shutil.rmtree(folder, ignore_errors=True)
