"""Test defaults: offline, quiet, one torch thread, temporary Prefect home; the real config, shrunk."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.xdist_serial import pytest_xdist_make_scheduler  # noqa: F401 (a hook: the cluster modules on one worker)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

# Before Prefect/MLflow/GE are imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.update(
    {
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # Keep Prefect's home (profiles, local storage) out of the checkout.
        "PREFECT_HOME": tempfile.mkdtemp(prefix="pricelevel-prefect-home-"),
    }
)


_HAD_PREFECT = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_HAD_PREFECT] = "prefect" in sys.modules
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A test (or its fixtures) that brings Prefect in must carry the ``flow`` marker, so that
    ``-m "not flow"`` really runs without Prefect (checked on every test that is first to import it)."""
    yield
    if not item.stash[_HAD_PREFECT] and "prefect" in sys.modules and item.get_closest_marker("flow") is None:
        pytest.fail(f"{item.nodeid} imported Prefect but is not marked `flow`", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the temporary Prefect home made above."""
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


#: The one PRICELEVEL_ variable meant for the tests themselves (.ci/run: the postgres tests fail instead of skipping).
KEPT_VARIABLES = {"PRICELEVEL_TEST_POSTGRES"}
for name in [n for n in os.environ if n.startswith("PRICELEVEL_") and n not in KEPT_VARIABLES]:
    del os.environ[name]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


def project_folder(root: Path) -> Path:
    """A throwaway project folder: the real conf/ and a link to the bundled sample, data written inside it."""
    (root / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "conf", root / "conf")
    (root / "data" / "sample").symlink_to(SAMPLE, target_is_directory=True)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """:func:`project_folder` in ``tmp_path``, as ``PRICELEVEL_HOME``."""
    root = project_folder(tmp_path / "project")
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))
    return root


def real_candles(symbol: str = "BTCUSDT", timeframe: str = "1h", rows: int | None = None) -> pd.DataFrame:
    frame = pd.read_parquet(SAMPLE / f"{symbol}_{timeframe}.parquet")
    return frame.iloc[:rows].reset_index(drop=True) if rows else frame


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test; a fresh server takes 11-15 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def corrupt_sample(tmp_path: Path) -> Path:
    """A sample folder whose BTCUSDT 1d file has one candle with high < low (2024-06-10)."""
    folder = tmp_path / "corrupt_sample"
    folder.mkdir()
    for path in SAMPLE.glob("*.parquet"):
        (folder / path.name).symlink_to(path)
    frame = pd.read_parquet(SAMPLE / "BTCUSDT_1d.parquet")
    row = frame.index[frame.timestamp == pd.Timestamp("2024-06-10", tz="UTC")][0]
    frame.loc[row, "high"] = frame.loc[row, "low"] * 0.9
    (folder / "BTCUSDT_1d.parquet").unlink()
    frame.to_parquet(folder / "BTCUSDT_1d.parquet")
    return folder


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``pricelevel ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from flows.cli import main

    factory = logging.getLogRecordFactory()

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        finally:
            logging.setLogRecordFactory(factory)
        out, err = capsys.readouterr()
        return code, out, err

    return run
