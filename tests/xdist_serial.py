"""The cluster and PostgreSQL test modules on one pytest-xdist worker, one after another (``make test``:
``-n 2 --dist loadgroup``), while the other worker runs the in-process tests. Never two clusters at once on CI's
two cores, and a module's cluster is started once."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Modules that start clusters of processes (PostgreSQL, servers, Dask workers).
SERIAL_MODULES = ("test_cluster_", "test_postgres_")
SERIAL_GROUP = "clusters"


def serial_scope(nodeid: str) -> str:
    """The scheduling unit of a test: every test of the serial modules in one, any other test on its own."""
    return SERIAL_GROUP if Path(nodeid.split("::", 1)[0]).name.startswith(SERIAL_MODULES) else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` by module name. xdist's own loadgroup reads an ``xdist_group`` marker by rewriting each
    item's private ``_nodeid``, which pytest 9.2 no longer reads: the group silently fell apart, two clusters ran
    at once and a module's cluster was started on both workers (tests/test_xdist_serial.py)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SerialModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return serial_scope(nodeid)

    return SerialModules(config, log)
