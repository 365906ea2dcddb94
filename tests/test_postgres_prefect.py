"""A Prefect server on PostgreSQL: the ingest flow completes against it, and two workers on one work pool
run each of 4 queued runs exactly once."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pricelevel.core.services import ServiceGroup, prefect_server, prefect_worker
from tests.conftest import ROOT, SAMPLE
from tests.postgres import Postgres, free_port, postgres_fixture  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent
RUNS = Path(__file__).parent / "fakes" / "prefect_runs.py"


def _flow_runs(api: str, flow_name: str) -> list[dict]:
    response = requests.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": [flow_name]}}}, timeout=30)
    response.raise_for_status()
    return response.json()


def test_flows_and_workers_against_a_prefect_server_on_postgresql(postgres: Postgres, tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PYTHONPATH": str(ROOT)}
    server = prefect_server(BIN, "127.0.0.1", port, postgres.url(postgres.database("prefect"), driver="asyncpg"))
    with ServiceGroup([server], env=env, cwd=tmp_path, grace_s=10) as group:
        group.wait_healthy(timeout_s=180)
        # the UI's browser code calls this server's API, not port 4200's (seen: "Can't connect" on another port)
        ui_settings = requests.get(f"http://127.0.0.1:{port}/ui-settings", timeout=30).json()
        assert ui_settings["api_url"] == api, ui_settings

        project = tmp_path / "project"
        (project / "data").mkdir(parents=True)
        shutil.copytree(ROOT / "conf", project / "conf")
        (project / "data" / "sample").symlink_to(SAMPLE, target_is_directory=True)
        ingest = subprocess.run(
            [str(BIN / "pricelevel"), "ingest", "--symbols", "BTCUSDT,ETHUSDT", "--timeframes", "1d",
             "--start", "2024-01-01", "--end", "2024-03-01"],
            cwd=project, env={**env, "PRICELEVEL_HOME": str(project)}, capture_output=True, text=True, timeout=300)
        assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
        runs = _flow_runs(api, "ingest")
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        assert (project / "data" / "validated" / "sample" / "ETHUSDT_1d.parquet").exists()

        pool, out = "test-pool", tmp_path / "ran"
        out.mkdir()
        created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stdout + created.stderr
        queued = subprocess.run([sys.executable, str(RUNS), pool, str(out), "4"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert queued.returncode == 0, queued.stdout[-3000:] + queued.stderr[-3000:]
        ids = [line.split()[1] for line in queued.stdout.splitlines() if line.startswith("RUN ")]
        assert len(set(ids)) == 4

        workers = [prefect_worker(BIN, pool, "127.0.0.1", free_port()) for _ in range(2)]
        with ServiceGroup(workers, env=env, cwd=tmp_path, grace_s=10) as running:
            running.wait_healthy(timeout_s=120)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                states = {r["id"]: r["state_type"] for r in _flow_runs(api, "record-run")}
                if len(states) == 4 and all(s in ("COMPLETED", "FAILED", "CRASHED") for s in states.values()):
                    break
                assert running.exit_code() is None, "a worker exited"
                time.sleep(1)
        assert states == {i: "COMPLETED" for i in ids}, states
        per_run = collections.Counter(name.split(".")[0] for name in os.listdir(out))
        assert per_run == {i: 1 for i in ids}  # each run executed exactly once
