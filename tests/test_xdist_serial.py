"""``make test``'s two workers: the cluster and PostgreSQL modules all on one, each module's cluster started once
(tests/xdist_serial.py). pytest 9.2 broke xdist's own ``xdist_group`` marker: it split them silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.xdist_serial import SERIAL_GROUP, serial_scope

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_MODULE = '''
import os, time
import pytest

@pytest.fixture(scope="module")
def cluster():
    with open("setups.log", "a") as log:
        log.write(f"{__name__} {os.environ['PYTEST_XDIST_WORKER']}\\n")
    yield

def test_1(cluster): time.sleep(0.2)
def test_2(cluster): time.sleep(0.2)
def test_3(): time.sleep(0.2)
def test_4(cluster): time.sleep(0.2)
'''


def test_the_serial_modules_form_one_scheduling_unit() -> None:
    assert serial_scope("tests/test_cluster_up.py::test_x") == serial_scope("tests/test_postgres_mlflow.py::t[a]")
    assert serial_scope("tests/test_cluster_up.py::test_x") == SERIAL_GROUP
    assert serial_scope("tests/test_trading.py::test_x") == "tests/test_trading.py::test_x"


def test_two_workers_run_every_serial_module_on_one_and_start_a_module_fixture_once(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.xdist_serial import pytest_xdist_make_scheduler  # noqa: F401\n")
    (tmp_path / "test_cluster_up.py").write_text(CLUSTER_MODULE)
    (tmp_path / "test_postgres_db.py").write_text(CLUSTER_MODULE)
    (tmp_path / "test_other.py").write_text("import time\n" + "".join(
        f"def test_{k}(): time.sleep(0.1)\n" for k in range(6)))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "-v"],
        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    setups = (tmp_path / "setups.log").read_text().split()
    assert sorted(setups[0::2]) == ["test_cluster_up", "test_postgres_db"]  # once each
    assert len(set(setups[1::2])) == 1  # on one worker
    workers = {line.split()[0] for line in done.stdout.splitlines() if "PASSED test_cluster_up" in line
               or "PASSED test_postgres_db" in line}
    assert len(workers) == 1, done.stdout
