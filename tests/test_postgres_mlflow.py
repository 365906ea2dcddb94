"""MLflow server on PostgreSQL with served artefacts: clients in other folders (other machines, as far as they
know) register, resolve ``@champion`` and get the same predictions; the promote flow moves the alias."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pricelevel.core.services import ServiceGroup, mlflow_server
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import experiment_artifact_location, load_model, mlflow_client
from tests.conftest import ROOT
from tests.postgres import Postgres, free_port, postgres_fixture  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.flow, pytest.mark.slow]

CLIENT = Path(__file__).parent / "fakes" / "mlflow_client.py"


def _client(command: str, uri: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    done = subprocess.run([sys.executable, str(CLIENT), command, uri, str(out)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_local_paths_are_not_sent_to_a_tracking_server() -> None:
    assert experiment_artifact_location("http://mlflow:5000", "/srv/proj/mlruns/artifacts") is None
    assert experiment_artifact_location("http://mlflow:5000", "file:///srv/a") is None
    assert experiment_artifact_location("https://m", "s3://bucket/artifacts") == "s3://bucket/artifacts"
    assert experiment_artifact_location("sqlite:////p/mlflow.db", "/p/artifacts") == "file:///p/artifacts"


def test_clients_on_other_machines_share_the_registry_through_the_server(
    postgres: Postgres, tmp_path: Path, prefect_harness
) -> None:
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    server = mlflow_server(Path(sys.executable).parent, postgres.url(postgres.database("mlflow")), str(artifacts),
                           "127.0.0.1", port)
    uri = f"http://127.0.0.1:{port}"
    with ServiceGroup([server], env=dict(os.environ), cwd=tmp_path, grace_s=5) as group:
        group.wait_healthy(timeout_s=180)
        a = _client("register", uri, tmp_path / "machine-a")
        assert a["artifact_location"].startswith("mlflow-artifacts:"), a["artifact_location"]
        assert a["source"].startswith("mlflow-artifacts:") and a["version"] == "2"
        assert not (tmp_path / "machine-a" / "mlruns").exists()  # nothing went to A's own folder
        assert any(artifacts.rglob("weights.pt"))                 # the server holds the files

        b = _client("resolve", uri, tmp_path / "machine-b")
        assert b["version"] == a["version"] and b["predictions"] == a["predictions"]

        project = tmp_path / "machine-c"
        (project / "data").mkdir(parents=True)
        shutil.copytree(ROOT / "conf", project / "conf")
        env = {**os.environ, "PRICELEVEL_HOME": str(project), "PRICELEVEL_TRACKING__TRACKING_URI": uri,
               "PREFECT_API_URL": PREFECT_API_URL.value()}
        done = subprocess.run([str(Path(sys.executable).with_name("pricelevel")), "promote", "--rollback"], cwd=project,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = mlflow_client(TrackingConfig(tracking_uri=uri))
        assert client.get_registered_model("pricelevel").aliases["champion"] == "1"
        # v1's weights come back through the server too (in this process: machine B's resolve proved the rest)
        assert load_model("models:/pricelevel@champion", client).version == "1"
