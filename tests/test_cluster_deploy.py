"""The multi-machine deployment, checked statically (no Docker engine here): its services, pinned versions,
no password in any file, and every ``PRICELEVEL_*`` variable a real configuration key with the value meant."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from pricelevel.config import explain_config, load_project_config
from pricelevel.core.cluster import ClusterPlan, write_env_file
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_compose_file_has_every_service_of_a_scaled_out_deployment() -> None:
    assert set(SERVICES) == {"postgres", "prefect-server", "mlflow", "dask-scheduler", "dask-worker",
                             "dask-worker-gpu", "prefect-worker", "trader"}
    assert SERVICES["dask-worker-gpu"]["profiles"] == ["gpu"]
    gpu = SERVICES["dask-worker-gpu"]["command"]
    assert gpu[gpu.index("--resources") + 1] == "GPU=1"
    assert SERVICES["dask-worker-gpu"]["environment"]["PRICELEVEL_MODEL__ACCELERATOR"] == "cuda"
    for name in ("dask-worker", "dask-worker-gpu"):
        command = SERVICES[name]["command"]
        assert command[command.index("--nthreads") + 1] == "1" and "tasks.runtime" in command
    for name in ("mlflow", "dask-worker", "dask-worker-gpu", "prefect-worker", "trader"):
        assert "store:/data" in SERVICES[name]["volumes"], name  # one shared volume for the data
    mlflow = SERVICES["mlflow"]["command"]
    assert "--artifacts-destination" in mlflow and mlflow[mlflow.index("--backend-store-uri") + 1].startswith(
        "postgresql+psycopg2://")
    prefect = SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect.startswith("postgresql+asyncpg://")
    assert "--limit 1" in " ".join(SERVICES["prefect-worker"]["command"])


def test_one_pinned_project_image_and_pinned_third_party_images() -> None:
    version = PYPROJECT["project"]["version"]
    project = {name: s for name, s in SERVICES.items() if name != "postgres"}
    assert {s["image"].split("-cuda")[0] for s in project.values()} == {f"pricelevel:{version}"}
    assert {s["build"]["dockerfile"] for s in project.values()} == {"deploy/Dockerfile"}
    assert re.fullmatch(r"postgres:15\.\d+-\w+", SERVICES["postgres"]["image"])
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", DOCKERFILE, re.M)
    torch = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch.removeprefix('torch==')}" in DOCKERFILE
    assert 'pip install ".[cluster]"' in DOCKERFILE


def test_the_cluster_extra_is_pinned_to_what_is_installed_and_dev_includes_it() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    pins = dict(d.split("==") for d in extras["cluster"])
    assert set(pins) == {"prefect-dask", "dask", "distributed", "psycopg2-binary"}
    assert {name: importlib.metadata.version(name) for name in pins} == pins
    assert "pricelevel[cluster]" in extras["dev"]


def test_passwords_come_only_from_the_environment() -> None:
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    for value in re.findall(r"(?:PGPASSWORD|POSTGRES_PASSWORD): (.+)", text):
        assert value.startswith("${PGPASSWORD:?"), value
    for url in re.findall(r"postgresql\+\w+://[^\s\"',]+", text):
        assert re.match(r"postgresql\+\w+://[\w-]+@", url), url  # a user, never user:password


def _config_vars(env: dict) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith("PRICELEVEL_") and k != "PRICELEVEL_HOME"}


@pytest.mark.parametrize("service", ["dask-worker", "dask-worker-gpu", "prefect-worker", "trader"])
def test_every_pricelevel_variable_loads_through_the_config_loader(service: str, project: Path) -> None:
    variables = _config_vars(SERVICES[service]["environment"])
    assert variables, service
    config = load_project_config(None, (), env=variables)
    layers = {s.key: s.layer for s in explain_config(None, (), env=variables)}
    flat = config.flat()
    for name, value in variables.items():
        key = name.removeprefix("PRICELEVEL_").lower().replace("__", ".")
        assert key in flat, f"{name} is not a configuration key"
        loaded = flat[key]
        assert str(loaded) == value or loaded == yaml.safe_load(value), (name, loaded, value)
        assert layers[key] == name
    assert config.flow.task_runner == "dask" and config.tuning.workers == 2


def test_the_local_clusters_env_file_loads_too_and_holds_no_password(tmp_path: Path, project: Path) -> None:
    plan = ClusterPlan(tmp_path / ".cluster")
    plan.folder.mkdir()
    text = write_env_file(plan).read_text()
    env = dict(re.findall(r"^export (\w+)=(.*)$", text, re.M))
    config = load_project_config(None, (), env=_config_vars(env))
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000"
    assert config.tuning.storage == "postgresql+psycopg2://pricelevel@127.0.0.1:5433/optuna"
    assert config.flow.dask_address == "tcp://127.0.0.1:8786" and config.tuning.workers == 2
    assert env["PGPASSFILE"].endswith("pgpass") and "PGPASSWORD" not in env

