"""MLflow edge (params, lineage, the pyfunc model round trip) and the registry (aliases, champion history).

Offline: every test uses an SQLite tracking store under a temporary folder. One tiny model is logged once
per module; registry tests register it under their own model names so they do not share aliases.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pricelevel.core.files import files_fingerprint as data_fingerprint
from pricelevel.core.secrets import MASK
from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.spec import POOLED, FeatureStats, ModelSpec
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import (
    PARAM_VALUE_LIMIT,
    LoadedModel,
    ModelNotFoundError,
    ensure_experiment,
    lineage_tags,
    load_model,
    log_pricelevel_model,
    mlflow_client,
    pip_requirements,
    run_params,
)
from pricelevel.registry.versions import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    CHAMPION_HISTORY_TAG,
    NothingToRollBackError,
    champion_history,
    find_version_by_tag,
    list_versions,
    move_champion,
    register_version,
    rollback_champion,
    set_alias,
    version_for_alias,
)

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 6
N_FEATURES = 3
NAME = "pricelevel"


# ------------------------------------------------------------------------------------- pure helpers


def test_run_params_masks_secrets_and_truncates() -> None:
    params = run_params(
        {
            "data.root": Path("/tmp/data"),
            "data.symbols": ["BTCUSDT", "ETHUSDT"],
            "model.dropout": 0.2,
            "data.end": None,
            "bybit.api_key": "abcd1234",
            "telegram.bot_token": "123:xyz",
            "vendor.client_secret_value": "s3cr3t",
            "tuning.storage": "postgresql://user:hunter2@db:5432/optuna",
            "notes.long": "x" * (PARAM_VALUE_LIMIT + 100),
        }
    )
    assert params["data.root"] == "/tmp/data"
    assert params["data.symbols"] == '["BTCUSDT","ETHUSDT"]'
    assert params["model.dropout"] == "0.2" and params["data.end"] == "None"
    assert params["bybit.api_key"] == MASK and params["telegram.bot_token"] == MASK
    assert params["vendor.client_secret_value"] == MASK
    assert "hunter2" not in params["tuning.storage"] and params["tuning.storage"].endswith("@db:5432/optuna")
    assert len(params["notes.long"]) == PARAM_VALUE_LIMIT and params["notes.long"].endswith("...")
    assert all(isinstance(v, str) for v in params.values())


def test_data_fingerprint_is_order_independent_and_byte_sensitive(tmp_path: Path) -> None:
    a, b = tmp_path / "BTCUSDT_1h.parquet", tmp_path / "ETHUSDT_1h.parquet"
    a.write_bytes(b"alpha" * 1000)
    b.write_bytes(b"beta" * 1000)
    first = data_fingerprint([a, b])
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert data_fingerprint([b, a]) == first == data_fingerprint(iter([a, b]))
    b.write_bytes(b"beta" * 999 + b"betA")
    assert data_fingerprint([a, b]) != first
    assert data_fingerprint([a]) != data_fingerprint([a, b])


def test_lineage_tags(tmp_path: Path) -> None:
    data = tmp_path / "BTCUSDT_1h.parquet"
    data.write_bytes(b"candles")
    tags = lineage_tags([data], seed=7, project_root=ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", tags["pricelevel.git_commit"])
    assert tags["pricelevel.git_dirty"] in {"true", "false"}
    assert tags["pricelevel.data_fingerprint"] == data_fingerprint([data])
    assert tags["pricelevel.data_files"] == "1" and tags["pricelevel.seed"] == "7"
    for package in ("python", "pricelevel", "torch", "lightning", "optuna", "mlflow", "numpy", "pandas",
                    "scikit-learn", "prefect"):
        assert tags[f"pricelevel.version.{package}"], package
    assert tags["pricelevel.version.mlflow"] == mlflow.__version__
    outside = lineage_tags([], seed=1, project_root=tmp_path)
    assert outside["pricelevel.git_commit"] == "unknown" and outside["pricelevel.data_files"] == "0"


def test_pip_requirements_are_pinned() -> None:
    requirements = pip_requirements()
    names = [r.split("==")[0] for r in requirements]
    assert names == ["torch", "lightning", "mlflow", "numpy", "pandas", "scikit-learn", "cloudpickle"]
    assert all(re.fullmatch(r"[\w-]+==\S+", r) for r in requirements)


# ---------------------------------------------------------------------------------- logged model


@dataclass(frozen=True)
class Logged:
    client: mlflow.MlflowClient
    tracking: TrackingConfig
    module: MultiSymbolLSTM
    spec: ModelSpec
    run_id: str
    model_uri: str
    seconds: float


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """One tiny real model, logged in a run with metrics, registered as pricelevel v1 (@challenger)."""
    import time

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mlflow")
    tracking = TrackingConfig(
        tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db", artifact_location=str(root / "mlruns" / "artifacts")
    )
    torch.manual_seed(0)
    module = MultiSymbolLSTM(n_features=N_FEATURES, n_symbols=2, hidden_size=4, num_layers=1).eval()
    spec = ModelSpec(
        symbols=("BTCUSDT", "ETHUSDT"),
        features=("log_return", "log_range", "level_distance"),
        seq_len=SEQ_LEN,
        timeframe="1h",
        horizon=1,
        normalization={
            "BTCUSDT": FeatureStats((0.1, 0.2, 0.3), (1.0, 2.0, 3.0)),
            POOLED: FeatureStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        },
        levels={"window": 12, "eps_frac": 0.005},
        labels={"kind": "level_label", "threshold_frac": 0.001, "horizon": 1},
        hparams=dict(module.hparams),
        rules={"threshold": 0.4, "tp_stop": 0.03, "max_hold_bars": 6},
        extra={"test_start": "2024-06-01T00:00:00+00:00"},
    )
    example = {"features": _features(3, SEQ_LEN, seed=1), "symbol_id": np.array([0, 1, -1], dtype=np.int64)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        client = mlflow_client(tracking)
        experiment_id = ensure_experiment(client, "pricelevel", tracking.artifact_location)
        run = client.create_run(experiment_id)
        for key, value in {"val_pr_auc": 0.41, "test_pr_auc": 0.38, "backtest_sharpe": 1.2, "train_loss": 0.6}.items():
            client.log_metric(run.info.run_id, key, value)
        started = time.perf_counter()
        logged = log_pricelevel_model(client, run.info.run_id, module, spec, example)
        seconds = time.perf_counter() - started
        client.set_terminated(run.info.run_id)
        version = register_version(client, NAME, logged, run.info.run_id, {"pricelevel.train_key": "k1"})
        set_alias(client, NAME, ALIAS_CHALLENGER, version.version)
        yield Logged(client, tracking, module, spec, run.info.run_id, f"models:/{logged.model_id}", seconds)


def _features(batch: int, steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, steps, N_FEATURES)).astype(np.float32)


def _reference(module: MultiSymbolLSTM, features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(module(torch.from_numpy(features), torch.from_numpy(symbol_id))).numpy()


def test_log_model_lands_under_the_artifact_location(logged: Logged) -> None:
    # (how long it takes is a benchmark figure: bench/train.py reports log_model_s)
    experiment = logged.client.get_experiment_by_name("pricelevel")
    assert experiment.artifact_location.startswith("file://")
    assert experiment.artifact_location.endswith("mlruns/artifacts")


@pytest.mark.parametrize("uri", ["runs:/{run_id}/model", f"models:/{NAME}/1", f"models:/{NAME}@{ALIAS_CHALLENGER}"])
def test_load_predicts_like_the_module_for_any_length(logged: Logged, uri: str) -> None:
    loaded = load_model(uri.format(run_id=logged.run_id), logged.client)
    assert isinstance(loaded, LoadedModel)
    assert loaded.spec == logged.spec
    assert loaded.version == (None if uri.startswith("runs:") else "1")
    symbol_id = np.array([0, 1, -1, 1], dtype=np.int64)
    for steps in (SEQ_LEN, 2 * SEQ_LEN):
        features = _features(4, steps, seed=steps)
        expected = _reference(logged.module, features, symbol_id)
        # Through the raw pyfunc (MLflow's schema enforcement included) and through LoadedModel.
        raw = loaded.pyfunc_model.predict({"features": features, "symbol_id": symbol_id})
        assert raw.dtype == np.float64 and raw.shape == (4,)
        np.testing.assert_allclose(raw, expected, atol=1e-6)
        np.testing.assert_allclose(loaded.predict(features.astype(np.float64), symbol_id), expected, atol=1e-6)


def test_signature_leaves_batch_and_time_free(logged: Logged) -> None:
    loaded = load_model(f"models:/{NAME}/1", logged.client)
    inputs = {spec.name: spec for spec in loaded.pyfunc_model.metadata.get_input_schema().inputs}
    assert inputs["features"].shape == (-1, -1, N_FEATURES) and inputs["features"].type == np.dtype(np.float32)
    assert inputs["symbol_id"].shape == (-1,) and inputs["symbol_id"].type == np.dtype(np.int64)
    assert loaded.pyfunc_model.metadata.get_output_schema().inputs[0].type == np.dtype(np.float64)


def test_bad_inputs_raise_value_errors(logged: Logged) -> None:
    loaded = load_model(f"models:/{NAME}/1", logged.client)
    symbol_id = np.array([0, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="shorter than the model's seq_len 6"):
        loaded.predict(_features(2, SEQ_LEN - 1, seed=0), symbol_id)
    with pytest.raises(ValueError, match="shorter than the model's seq_len 6"):
        loaded.pyfunc_model.predict({"features": _features(2, SEQ_LEN - 1, seed=0), "symbol_id": symbol_id})
    with pytest.raises(ValueError, match="expects 3"):
        loaded.predict(np.zeros((2, SEQ_LEN, N_FEATURES + 1), np.float32), symbol_id)
    with pytest.raises(ValueError, match=r"symbol_id must be in \[-1, 1\]"):
        loaded.predict(_features(2, SEQ_LEN, seed=0), np.array([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        loaded.predict(_features(2, SEQ_LEN, seed=0), np.array([0]))
    assert loaded.predict(np.zeros((0, SEQ_LEN, N_FEATURES), np.float32), np.zeros(0, np.int64)).shape == (0,)


def test_missing_models_raise_model_not_found(logged: Logged) -> None:
    with pytest.raises(ModelNotFoundError, match="no version of model 'pricelevel' has alias 'champion'") as caught:
        load_model(f"models:/{NAME}@{ALIAS_CHAMPION}", logged.client)
    assert "challenger->v1" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ModelNotFoundError, match="no registered model 'nope'"):
        load_model("models:/nope@champion", logged.client)
    with pytest.raises(ModelNotFoundError, match="has no version 99"):
        load_model(f"models:/{NAME}/99", logged.client)
    with pytest.raises(ModelNotFoundError):
        load_model(f"runs:/{logged.run_id}/not-a-model", logged.client)


def test_logging_and_loading_never_touch_mlflow_globals(logged: Logged, tmp_path: Path) -> None:
    """Two stores in one process: each client sees its own models; MLflow's global URIs and env stay unset."""
    def state() -> tuple:
        env = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
        return mlflow.is_tracking_uri_set(), *map(os.environ.get, env)

    before = state()
    other = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/a/b/mlflow.db", artifact_location=str(tmp_path / "artifacts"))
    client = mlflow_client(other)
    assert (tmp_path / "a" / "b").is_dir()  # SQLite does not create the database's folder
    run = client.create_run(ensure_experiment(client, "other", other.artifact_location))
    example = {"features": _features(1, SEQ_LEN, 0), "symbol_id": np.zeros(1, np.int64)}
    version = register_version(client, NAME, log_pricelevel_model(client, run.info.run_id, logged.module, logged.spec, example),
                               run.info.run_id, {})
    assert str(version.version) == "1" and state() == before
    assert load_model(f"models:/{NAME}/1", client).version == "1"
    assert load_model(f"models:/{NAME}@{ALIAS_CHALLENGER}", logged.client).version == "1"  # the first store's alias
    with pytest.raises(ModelNotFoundError):
        load_model(f"models:/{NAME}@{ALIAS_CHALLENGER}", client)
    assert state() == before


# ------------------------------------------------------------------------------------------ registry


def test_register_twice_gives_versions_and_tags(logged: Logged) -> None:
    name = "registry-versions"
    first = register_version(logged.client, name, logged.model_uri, logged.run_id, {"pricelevel.train_key": "a"})
    second = register_version(logged.client, name, logged.model_uri, logged.run_id, {"pricelevel.train_key": "b"})
    assert (str(first.version), str(second.version)) == ("1", "2")  # MLflow 3: int
    assert first.status == second.status == "READY"
    assert str(find_version_by_tag(logged.client, name, "pricelevel.train_key", "b").version) == "2"
    assert find_version_by_tag(logged.client, name, "pricelevel.train_key", "zzz") is None
    assert find_version_by_tag(logged.client, "no-such-model", "pricelevel.train_key", "a") is None
    # A runs:/ URI resolves to the same logged model.
    third = register_version(logged.client, name, f"runs:/{logged.run_id}/model", logged.run_id, {})
    assert str(third.version) == "3" and third.source == first.source
    assert first.source == logged.client.get_logged_model(logged.model_uri.removeprefix("models:/")).artifact_location


def test_aliases(logged: Logged) -> None:
    name = "registry-aliases"
    for _ in range(2):
        register_version(logged.client, name, logged.model_uri, logged.run_id, {})
    assert version_for_alias(logged.client, name, ALIAS_CHAMPION) is None
    assert version_for_alias(logged.client, "no-such-model", ALIAS_CHAMPION) is None
    set_alias(logged.client, name, ALIAS_CHALLENGER, 2)
    set_alias(logged.client, name, ALIAS_CHAMPION, "1")
    assert str(version_for_alias(logged.client, name, ALIAS_CHALLENGER).version) == "2"
    assert load_model(f"models:/{name}@{ALIAS_CHAMPION}", logged.client).version == "1"


def test_list_versions(logged: Logged) -> None:
    name = "registry-list"
    for _ in range(2):
        register_version(logged.client, name, logged.model_uri, logged.run_id, {})
    set_alias(logged.client, name, ALIAS_CHAMPION, "1")
    logged.client.set_model_version_tag(name, "1", "promotion.decision", "promoted")
    rows = list_versions(logged.client, name)
    assert [row["version"] for row in rows] == ["2", "1"]
    assert rows[1]["aliases"] == [ALIAS_CHAMPION] and rows[0]["aliases"] == []
    assert rows[0]["metrics"] == {"backtest_sharpe": 1.2, "test_pr_auc": 0.38, "val_pr_auc": 0.41}
    assert rows[1]["tags"] == {"promotion.decision": "promoted"} and rows[0]["tags"] == {}
    assert rows[0]["run_id"] == logged.run_id and rows[0]["status"] == "READY"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rows[0]["created"])
    assert "val_pr_auc" not in list_versions(logged.client, name, metric="val_loss")[0]["metrics"]
    assert list_versions(logged.client, "no-such-model") == []


def test_move_champion_and_roll_back(logged: Logged) -> None:
    name = "registry-champion"
    for _ in range(3):
        register_version(logged.client, name, logged.model_uri, logged.run_id, {})
    with pytest.raises(NothingToRollBackError, match="no former champion"):
        rollback_champion(logged.client, name)
    assert move_champion(logged.client, name, "1") is None
    assert champion_history(logged.client, name) == []
    assert move_champion(logged.client, name, "2") == "1"
    assert move_champion(logged.client, name, "2") == "2"  # same version again: history unchanged
    assert move_champion(logged.client, name, 3) == "2"
    assert champion_history(logged.client, name) == ["1", "2"]
    assert logged.client.get_registered_model(name).tags[CHAMPION_HISTORY_TAG] == '["1", "2"]'

    assert rollback_champion(logged.client, name) == ("3", "2")
    assert str(version_for_alias(logged.client, name, ALIAS_CHAMPION).version) == "2"
    assert rollback_champion(logged.client, name) == ("2", "1")
    assert str(version_for_alias(logged.client, name, ALIAS_CHAMPION).version) == "1"
    with pytest.raises(NothingToRollBackError, match="champion: version 1; history empty"):
        rollback_champion(logged.client, name)


def test_rollback_skips_deleted_versions(logged: Logged) -> None:
    name = "registry-deleted"
    for _ in range(3):
        register_version(logged.client, name, logged.model_uri, logged.run_id, {})
    for version in ("1", "2", "3"):
        move_champion(logged.client, name, version)
    logged.client.delete_model_version(name, "2")
    assert rollback_champion(logged.client, name) == ("3", "1")


def test_rollback_of_unknown_model_raises(logged: Logged) -> None:
    with pytest.raises(NothingToRollBackError):
        rollback_champion(logged.client, "no-such-model")


def test_ensure_experiment(logged: Logged, tmp_path: Path) -> None:
    client = logged.client
    first = ensure_experiment(client, "exp", str(tmp_path / "artifacts"))
    assert client.get_experiment(first).artifact_location == (tmp_path / "artifacts").as_uri()
    assert ensure_experiment(client, "exp", str(tmp_path / "elsewhere")) == first
    client.delete_experiment(first)
    assert ensure_experiment(client, "exp", str(tmp_path / "artifacts")) == first
    assert client.get_experiment(first).lifecycle_stage == "active"


def test_a_crash_between_the_alias_move_and_the_history_write_loses_nothing(logged: Logged, monkeypatch) -> None:
    """The predecessor is written on the new champion before the alias moves: if the history tag is never
    written (the process died, the database stayed down), the history still names it and rollback works."""
    from mlflow.exceptions import MlflowException

    import pricelevel.registry.versions as versions

    name = "registry-crash"
    for _ in range(3):
        register_version(logged.client, name, logged.model_uri, logged.run_id, {})
    move_champion(logged.client, name, "1")
    move_champion(logged.client, name, "2")

    def down(*args, **kwargs):
        raise MlflowException("database is locked")

    monkeypatch.setattr(versions.time, "sleep", lambda s: None)  # the retries, without waiting
    monkeypatch.setattr(logged.client, "set_registered_model_tag", down)
    with pytest.raises(MlflowException):
        move_champion(logged.client, name, "3")
    monkeypatch.undo()
    assert str(version_for_alias(logged.client, name, ALIAS_CHAMPION).version) == "3"
    assert logged.client.get_registered_model(name).tags[CHAMPION_HISTORY_TAG] == '["1"]'  # the write that failed
    assert champion_history(logged.client, name) == ["1", "2"]  # completed from version 3's own tag
    assert rollback_champion(logged.client, name) == ("3", "2")
    assert rollback_champion(logged.client, name) == ("2", "1")
