"""``make cluster-up`` / ``make cluster-down`` themselves (``pricelevel cluster up|down``, what the Makefile runs):
a port in use is refused in one line naming it, before anything starts; a real cluster comes up with a Prefect
worker polling each pool (so every deployment of prefect.yaml is Ready); a second ``up`` is refused in one line;
``down`` leaves no process of the cluster behind."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pricelevel.core.cluster import POOL, TRADER_POOL, ClusterError, ClusterPlan, require_free_ports
from pricelevel.core.postgres import pg_bindir
from tests.conftest import ROOT

PRICELEVEL = str(Path(sys.executable).parent / "pricelevel")


def _plan(root: Path, offset: int, workers: int = 1) -> ClusterPlan:
    return ClusterPlan(root / ".cluster", dask_workers=workers, postgres_port=5433 + offset, prefect_port=4200 + offset,
                       mlflow_port=5000 + offset, dask_port=8786 + offset, dashboard_port=8787 + offset)


def _free_offset(root: Path) -> int:
    for _ in range(200):
        offset = random.randrange(15000, 50000)
        with contextlib.suppress(ClusterError):
            require_free_ports(_plan(root, offset))
            return offset
    raise AssertionError("no free port range")


def _cluster(root: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRICELEVEL_", "PGPASS"))}
    env |= {"PRICELEVEL_HOME": str(root), "PYTHONPATH": str(ROOT)}
    return subprocess.run([PRICELEVEL, "cluster", *args], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout_s)


def _processes_of(root: Path) -> list[str]:
    """Processes started for the project at ``root``: its path in their command line or ``PRICELEVEL_HOME``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X") and (str(root) in cmdline or f"PRICELEVEL_HOME={root}".encode() in environ):
                found.append(cmdline[:200])
    return found


@pytest.fixture
def short_project() -> Iterator[Path]:
    """A project in a short path: PostgreSQL's socket (``.cluster/postgres/socket/.s.PGSQL.PORT``) must fit in 107
    bytes, which pytest's temporary folders do not; readable by the ``postgres`` user (as root it runs as that)."""
    root = Path(tempfile.mkdtemp(prefix="plc-"))
    root.chmod(0o755)
    (root / "data").mkdir()
    shutil.copytree(ROOT / "conf", root / "conf")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_port_in_use_is_refused_in_one_line_naming_it(project: Path) -> None:
    offset = _free_offset(project)
    plan = _plan(project, offset, workers=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", plan.mlflow_port))
        taken.listen()
        with pytest.raises(ClusterError, match=rf"^port {plan.mlflow_port} \(MLflow server\) is in use"):
            require_free_ports(plan)
        done = _cluster(project, "up", "--workers", "2", "--port-offset", str(offset), timeout_s=120)
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(error) == 1, done.stderr
    assert f"port {plan.mlflow_port} (MLflow server) is in use" in error[0]
    assert not plan.pid_file.exists() and not _processes_of(project)  # nothing was started


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.flow
def test_cluster_up_serves_every_pool_refuses_a_second_up_and_down_leaves_nothing(short_project: Path) -> None:
    if pg_bindir() is None:
        message = "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("PRICELEVEL_TEST_POSTGRES") == "required":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    project = short_project
    offset = _free_offset(project)
    plan = _plan(project, offset)
    try:
        up = _cluster(project, "up", "--workers", "1", "--port-offset", str(offset))
        assert up.returncode == 0, up.stdout + up.stderr + plan.log_file.read_text()[-5000:]
        assert plan.env_file.exists() and f"Prefect worker {TRADER_POOL}" in up.stdout

        again = _cluster(project, "up", "--workers", "1", "--port-offset", str(offset), timeout_s=120)
        error = [line for line in again.stderr.splitlines() if line.startswith("error:")]
        assert again.returncode == 1 and len(error) == 1 and "a cluster is running already" in error[0], again.stderr

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{plan.prefect_port}/api"}), \
                get_client(sync_client=True) as client:
            statuses = {name: client.read_work_pool(name).status.value for name in (POOL, TRADER_POOL)}
        assert statuses == {POOL: "READY", TRADER_POOL: "READY"}, statuses  # a worker polls each: deployments Ready
        assert _processes_of(project)
    finally:
        down = _cluster(project, "down", timeout_s=200)
    assert down.returncode == 0 and "cluster stopped" in down.stdout, down.stdout + down.stderr
    assert not _processes_of(project), _processes_of(project)
    assert not plan.env_file.exists() and not plan.pid_file.exists()
