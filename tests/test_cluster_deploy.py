"""The scaled-out deployment, checked statically (no Docker engine here): its services, pinned versions, no
password in any file, every ``PRICELEVEL_*`` variable a real configuration key with the value meant, and the
several-hosts overlay (``compose.multihost.yaml``): the Compose model after ``${...}`` interpolation and the merge
of ``-f compose.yaml -f compose.multihost.yaml`` takes every address from the environment, mounts the store
wherever data is read or written, and makes the store an NFSv4 volume that passes locks through."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from pricelevel.config import explain_config, load_project_config
from pricelevel.core.cluster import ClusterPlan, write_env_file
from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
MULTIHOST_FILE = ROOT / "deploy" / "compose.multihost.yaml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES = COMPOSE["services"]
#: What a user exports (one host), and what deploy/.env gives on several hosts: every server elsewhere.
ONE_HOST_ENV = {"PGPASSWORD": "pw-from-env"}
HOSTS = {"PRICELEVEL_POSTGRES_HOST": "10.0.0.5", "PRICELEVEL_PREFECT_HOST": "10.0.0.6",
         "PRICELEVEL_MLFLOW_HOST": "mlflow.lan", "PRICELEVEL_DASK_HOST": "10.0.0.8"}
MULTIHOST_ENV = {**ONE_HOST_ENV, **HOSTS, "NFS_SERVER": "10.0.0.9", "NFS_EXPORT": "/export/pricelevel"}
#: The services that run pricelevel code on data (tasks, flows, the trader), and the compose service names.
DATA_SERVICES = {"dask-worker", "dask-worker-gpu", "prefect-worker", "trader"}
SERVICE_NAMES = {"postgres", "prefect-server", "mlflow", "dask-scheduler"}


class Unset(KeyError):
    """A required ``${VAR:?message}`` whose variable is unset (``docker compose`` refuses to start)."""


_VARIABLE = re.compile(r"\$(?:(\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^{}]*))?\}|(?P<plain>[A-Za-z_]\w*)|(?P<bad>.))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation of one string: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``/``-``,
    ``${VAR:?error}``/``?``, ``${VAR:+replacement}``/``+`` (``:`` also treats an empty value as unset)."""

    def one(match: re.Match) -> str:
        if match[1]:
            return "$"
        if match["bad"] is not None:
            raise ValueError(f"{text!r}: invalid interpolation at {match[0]!r}")
        name = match["braced"] or match["plain"]
        value, op, arg = env.get(name), match["op"] or "", match["arg"] or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else value
        if op.endswith("?"):
            if unset:
                raise Unset(f"{name}: {arg}")
            return value
        if op.endswith("+"):
            return "" if unset else arg
        return value or ""

    return _VARIABLE.sub(one, text)


def _interpolated(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return node


#: Service attributes an overriding file replaces instead of appending to (Compose's merge rules).
_REPLACED = {"command", "entrypoint"}
#: Sequences whose entries are unique by a key: a later entry with the same key replaces the earlier one.
_UNIQUE_BY = {"volumes": lambda entry: entry.split(":")[1], "ports": lambda entry: entry}


def _merge(base: Any, over: Any, key: str | None = None) -> Any:
    """Compose's merge of a later file into an earlier one: mappings by key, sequences appended (volumes and ports
    unique by container path / by the entry), ``command``/``entrypoint`` replaced, scalars replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for name, value in over.items():
            merged[name] = _merge(base[name], value, name) if name in base and base[name] is not None else value
        return merged
    if isinstance(base, list) and isinstance(over, list) and key not in _REPLACED:
        if key in _UNIQUE_BY:
            unique = _UNIQUE_BY[key]
            kept = [entry for entry in base if unique(entry) not in {unique(e) for e in over}]
            return kept + over
        return base + over
    return over


def compose_model(env: Mapping[str, str], *files: Path) -> dict:
    """What ``docker compose -f f1 -f f2 ... config`` would resolve: each file's YAML (anchors included)
    interpolated with ``env``, then merged in order; ``x-`` extension fields dropped."""
    model: dict = {}
    for path in files:
        model = _merge(model, _interpolated(yaml.safe_load(path.read_text()), env))
    return {key: value for key, value in model.items() if not key.startswith("x-")}


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _url_hosts(node: Any) -> set[str]:
    """The host of every URL (``scheme://[user@]host[:port]...``) in a service's command and environment."""
    return {m[1] for s in _strings(node) for m in re.finditer(r"[a-z+]+://(?:[\w.-]+@)?([\w.-]+)", s)}
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
    # the scheduler imports the task modules at start-up (unpickling the first graph without it stalled it 37 s)
    scheduler = SERVICES["dask-scheduler"]["command"]
    assert scheduler[scheduler.index("--preload") + 1] == "tasks.runtime"
    # the pools, the one-run queue and the Crashed-run automation come from the same code as `cluster up`
    worker = " ".join(SERVICES["prefect-worker"]["command"])
    assert worker.index("pricelevel cluster prefect-setup &&") < worker.index("prefect worker start")
    assert SERVICES["prefect-worker"]["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


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


@pytest.mark.parametrize("path", [COMPOSE_FILE, MULTIHOST_FILE, ROOT / "deploy" / "Dockerfile"], ids=lambda p: p.name)
def test_passwords_come_only_from_the_environment(path: Path) -> None:
    text = path.read_text()
    for value in re.findall(r"(?:PGPASSWORD|POSTGRES_PASSWORD): (.+)", text):
        assert value.startswith("${PGPASSWORD:?"), value
    for url in re.findall(r"postgresql\+\w+://[^\s\"',]+", text):
        assert re.match(r"postgresql\+\w+://[^:/@\s]+@", url), url  # a user, never user:password
    for name, value in re.findall(r"(?m)^\s*([\w-]*(?:PASSWORD|SECRET|TOKEN|API_KEY)\w*)\s*[:=][ \t]*(.*)$", text):
        assert value == "" or value.startswith("${"), name  # passed through from the host, or required from it


def test_the_password_reaches_only_the_password_variables_after_interpolation() -> None:
    """The resolved model of either form holds the password in PGPASSWORD / POSTGRES_PASSWORD only (not in a URL or
    a command), and without PGPASSWORD in the environment Compose refuses to start."""
    for model in (compose_model(ONE_HOST_ENV, COMPOSE_FILE),
                  compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE)):
        for name, service in model["services"].items():
            environment = service.get("environment") or {}
            holders = {key for key, value in environment.items() if value == ONE_HOST_ENV["PGPASSWORD"]}
            assert holders <= {"PGPASSWORD", "POSTGRES_PASSWORD"}, (name, holders)
            rest = {key: value for key, value in service.items() if key != "environment"}
            assert not [s for s in _strings(rest) if ONE_HOST_ENV["PGPASSWORD"] in s], name
    with pytest.raises(Unset, match="PGPASSWORD"):
        compose_model({}, COMPOSE_FILE)


def test_one_host_addresses_default_to_the_service_names() -> None:
    """Without the PRICELEVEL_*_HOST variables the file is the one-host deployment it was: service names."""
    services = compose_model(ONE_HOST_ENV, COMPOSE_FILE)["services"]
    env = services["dask-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["PRICELEVEL_FLOW__DASK_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert env["PRICELEVEL_TUNING__STORAGE"] == "postgresql+psycopg2://pricelevel@postgres:5432/optuna"
    assert env["PRICELEVEL_TRACKING__TRACKING_URI"] == "http://mlflow:5000"
    assert "tcp://dask-scheduler:8786" in services["dask-worker"]["command"]
    for name, service in services.items():
        assert _url_hosts([service.get("command"), service.get("environment")]) <= SERVICE_NAMES | {"127.0.0.1"}, name


def test_on_several_hosts_every_address_comes_from_the_environment() -> None:
    """With the overlay and deploy/.env's addresses, no URL in any service names a compose service (those names
    resolve only on one host's network); each points where its variable says; MLflow accepts its given name."""
    services = compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE)["services"]
    for name, service in services.items():
        hosts = _url_hosts([service.get("command"), service.get("environment")])
        assert hosts <= set(HOSTS.values()) | {"127.0.0.1"}, (name, hosts)  # 127.0.0.1: a container's own health check
    env = services["dask-worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://10.0.0.6:4200/api"
    assert env["PRICELEVEL_FLOW__DASK_ADDRESS"] == "tcp://10.0.0.8:8786"
    assert env["PRICELEVEL_TUNING__STORAGE"] == "postgresql+psycopg2://pricelevel@10.0.0.5:5432/optuna"
    assert env["PRICELEVEL_TRACKING__TRACKING_URI"] == "http://mlflow.lan:5000"
    for worker in ("dask-worker", "dask-worker-gpu"):
        assert services[worker]["command"][2] == "tcp://10.0.0.8:8786"
        assert services[worker]["network_mode"] == "host"  # reachable at the host's address by scheduler and peers
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://pricelevel@10.0.0.5:5432/")
    mlflow = services["mlflow"]["command"]
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://pricelevel@10.0.0.5:5432/")
    assert "mlflow.lan:5000" in mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert "5432:5432" in services["postgres"]["ports"]  # trial workers elsewhere reach the optuna database
    for port in ("4200:4200", "5000:5000", "8786:8786"):
        assert any(port in service.get("ports", []) for service in services.values()), port


def test_the_address_variables_are_not_configuration_keys() -> None:
    """Every ``${NAME}`` in the deploy files is a secret, a build argument, an NFS setting, or an address variable
    without ``__`` (the config loader reads only ``PRICELEVEL_<SECTION>__<KEY>``: these never reach it)."""
    names = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text() + MULTIHOST_FILE.read_text()))
    assert names == {"PGPASSWORD", "TORCH_CUDA_INDEX_URL", "NFS_SERVER", "NFS_EXPORT", *HOSTS}, names
    assert not [name for name in HOSTS if "__" in name]


@pytest.mark.parametrize("hosts", ["one", "several"])
def test_every_service_that_reads_or_writes_data_mounts_the_store(hosts: str) -> None:
    """The store is mounted by exactly the services whose command or environment names a path in it: every
    service that runs tasks, flows or the trader (data.root), and MLflow (its artefacts); never by the others."""
    model = (compose_model(ONE_HOST_ENV, COMPOSE_FILE) if hosts == "one"
             else compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE))
    services = model["services"]
    mounting = {name for name, s in services.items() if "store:/data" in s.get("volumes", [])}
    naming = {name for name, s in services.items()
              if [v for v in _strings([s.get("command"), s.get("environment")]) if v.startswith("/data/")]}
    assert mounting == naming == DATA_SERVICES | {"mlflow"}, (mounting, naming)
    for name in DATA_SERVICES:
        assert services[name]["environment"]["PRICELEVEL_DATA__ROOT"].startswith("/data/"), name
    assert set(model["volumes"]) >= {"store", "pgdata"}


def test_on_several_hosts_the_store_is_nfs_v4_and_passes_locks_through() -> None:
    """NFSv4 (locks in the protocol: ``flock`` holds across hosts), no option that keeps locks local, lookups not
    cached negatively (a stop file from another host is seen at once), server and export from the environment."""
    volumes = compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE)["volumes"]
    store = volumes["store"]
    assert store["driver"] == "local" and store["driver_opts"]["type"] == "nfs"
    options = dict(o.partition("=")[::2] for o in store["driver_opts"]["o"].split(","))
    assert options["addr"] == "10.0.0.9" and options["nfsvers"].startswith("4")
    assert "rw" in options and options.get("lookupcache") == "positive"
    assert not {"nolock", "local_lock", "ro", "soft"} & set(options), options
    assert store["driver_opts"]["device"] == ":/export/pricelevel"
    assert compose_model(ONE_HOST_ENV, COMPOSE_FILE)["volumes"]["store"] is None  # one host: a local named volume
    for missing in ("NFS_SERVER", "NFS_EXPORT"):
        with pytest.raises(Unset, match=missing):
            compose_model({k: v for k, v in MULTIHOST_ENV.items() if k != missing}, COMPOSE_FILE, MULTIHOST_FILE)


def test_on_several_hosts_the_numba_cache_stays_on_each_host() -> None:
    """Compiled kernels are for one host's CPU: the overlay gives every service that computes a volume of its own
    host (owned by the image's user, so a new volume is writable) instead of the shared store."""
    model = compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE)
    assert "numba-cache" in model["volumes"] and "/data/numba-cache" in DOCKERFILE  # one host: on the store
    for name in DATA_SERVICES:
        service = model["services"][name]
        assert service["environment"]["NUMBA_CACHE_DIR"].startswith("/cache/"), name
        assert {"store:/data", "numba-cache:/cache"} <= set(service["volumes"]), name  # merged, not replaced
    assert re.search(r"^RUN .*mkdir -p /data /cache && chown pricelevel /data /cache", DOCKERFILE, re.M)


def test_the_compose_merge_rules_used_here() -> None:
    """The merge this file relies on, as Compose defines it: environment by name, volumes by container path,
    ports appended, command replaced."""
    base = {"services": {"a": {"environment": {"A": "1", "B": "2"}, "volumes": ["x:/data", "y:/c"],
                               "ports": ["1:1"], "command": ["run", "1"]}}, "volumes": {"x": None}}
    over = {"services": {"a": {"environment": {"B": "3"}, "volumes": ["z:/c"], "ports": ["2:2"],
                               "command": ["run"]}}, "volumes": {"x": {"driver": "local"}}}
    merged = _merge(base, over)
    assert merged["services"]["a"] == {"environment": {"A": "1", "B": "3"}, "volumes": ["x:/data", "z:/c"],
                                       "ports": ["1:1", "2:2"], "command": ["run"]}
    assert merged["volumes"] == {"x": {"driver": "local"}}
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$${SET}-${EMPTY:-d}-${EMPTY-d}-${NONE-d}-${SET:+r}-${NONE:+r}-$SET", env) == "$v-d--d-r--v"
    with pytest.raises(Unset, match="EMPTY: why"):
        interpolate("${EMPTY:?why}", env)
    assert interpolate("${EMPTY?why}", env) == ""


def _config_vars(env: dict) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith("PRICELEVEL_") and k != "PRICELEVEL_HOME"}


@pytest.mark.parametrize("hosts", ["one", "several"])
@pytest.mark.parametrize("service", sorted(DATA_SERVICES))
def test_every_pricelevel_variable_loads_through_the_config_loader(service: str, hosts: str, project: Path) -> None:
    model = (compose_model(ONE_HOST_ENV, COMPOSE_FILE) if hosts == "one"
             else compose_model(MULTIHOST_ENV, COMPOSE_FILE, MULTIHOST_FILE))
    variables = _config_vars(model["services"][service]["environment"])
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



def test_only_the_password_is_required_and_the_gpu_image_refuses_a_missing_cuda_index() -> None:
    """Compose interpolates every service before it applies profiles, so a ``${VAR:?}`` in the ``gpu`` profile would
    stop a plain ``up`` too: the one-host file requires PGPASSWORD alone, and the GPU image's build refuses an empty
    CUDA index itself (the guard of the Dockerfile, run here with sh)."""
    assert set(re.findall(r"\$\{(\w+):?\?", COMPOSE_FILE.read_text())) == {"PGPASSWORD"}
    gpu = compose_model(ONE_HOST_ENV, COMPOSE_FILE)["services"]["dask-worker-gpu"]["build"]["args"]
    assert gpu == {"TORCH_INDEX_URL": "", "TORCH_VARIANT": "cuda"}
    guard = re.search(r'if \[ "\$TORCH_VARIANT" = cuda \].*?fi;', DOCKERFILE, re.S)[0].replace("\\\n", " ")
    def build(variant: str, index: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", guard], env={"TORCH_VARIANT": variant, "TORCH_INDEX_URL": index,
                                                       "TORCH_VERSION": "2.13.0"}, capture_output=True, text=True)

    refused = build("cuda", "")
    assert refused.returncode == 1 and "TORCH_CUDA_INDEX_URL" in refused.stderr
    assert build("cuda", "https://example.invalid/cu").returncode == 0 and build("default", "").returncode == 0
