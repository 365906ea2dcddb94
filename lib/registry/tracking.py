"""The MLflow edge: clients, run parameters and lineage tags, and the model as an MLflow pyfunc.

MLflow is used only through explicit clients (``MlflowClient(tracking_uri=..., registry_uri=...)``): nothing
here sets MLflow's process-wide tracking/registry URIs or its environment variables, so two configurations
(two tests, a trainer and a trader) can live in one process. A model is saved locally with
``mlflow.pyfunc.save_model`` and uploaded as a LoggedModel through the client; loading resolves the model's
artifact location through the client and downloads it (works for local stores and for a tracking server).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pricelevel.core.config import SECRET_KEYS
from pricelevel.core.files import files_fingerprint
from pricelevel.core.secrets import MASK, redact
from pricelevel.ml.spec import ModelSpec
from pricelevel.registry.config import TrackingConfig

#: MLflow rejects longer parameter values (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``).
PARAM_VALUE_LIMIT = 6000
#: Key fragments that mark a parameter as secret even when its last part is not in ``SECRET_KEYS``.
_SECRET_KEY_PATTERN = re.compile(r"secret|token|passw|api_?key|credential|private_?key", re.IGNORECASE)
#: Distributions whose versions go on every run (``pricelevel.version.<name>``).
LINEAGE_PACKAGES = (
    "pricelevel", "torch", "lightning", "optuna", "mlflow", "numpy", "pandas", "scikit-learn", "prefect",
)
#: What the logged pyfunc needs at load time, pinned to what is installed here.
MODEL_REQUIREMENTS = ("torch", "lightning", "mlflow", "numpy", "pandas", "scikit-learn", "cloudpickle")
#: Rows of the caller's input example stored with the model (the example is documentation, not data).
INPUT_EXAMPLE_ROWS = 2
#: Rows per forward pass in :meth:`PriceLevelPyfunc.predict`, bounding memory on large inputs.
PREDICT_BATCH_ROWS = 4096


class ModelNotFoundError(LookupError):
    """A model URI names a registered model, version, alias or run that does not exist."""


# ------------------------------------------------------------------------------------------- clients


def mlflow_client(tracking: TrackingConfig) -> MlflowClient:
    """A client bound to ``tracking.tracking_uri`` for both tracking and registry, never to globals."""
    _make_local_parents(tracking.tracking_uri)
    return MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (artifacts under ``artifact_location``) or restoring it if deleted."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = experiment_artifact_location(client.tracking_uri, artifact_location)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _make_local_parents(uri: str) -> None:
    """SQLite does not create the database's folder, and a fresh project has none."""
    if uri.startswith("sqlite:///"):
        path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith("file:"):
        Path(unquote(urlparse(uri).path)).mkdir(parents=True, exist_ok=True)


def experiment_artifact_location(tracking_uri: str, location: str | None) -> str | None:
    """Where a new experiment keeps its artifacts, as every client of the tracking store can reach them.

    A local store: a plain path becomes an absolute ``file://`` URI. A tracking server (``http(s)://``): a local
    path or ``file:`` URI would be one machine's folder, which other clients cannot read, so the server chooses
    (``None``: ``mlflow-artifacts:/...``, served from its ``--artifacts-destination``); a remote URI (``s3://``,
    ``mlflow-artifacts:``) is kept either way.
    """
    remote = location is not None and "://" in location and not location.startswith("file:")
    if tracking_uri.startswith(("http://", "https://")):
        return location if remote or (location or "").startswith("mlflow-artifacts:") else None
    if location is None or remote or location.startswith(("file:", "mlflow-artifacts:")):
        return location
    return Path(location).expanduser().resolve().as_uri()


# --------------------------------------------------------------------------------- params and lineage


def run_params(flat: Mapping[str, object]) -> dict[str, str]:
    """Flattened config as MLflow params: text values, secrets masked, over-long values truncated.

    ``Config.flat()`` holds no secrets by construction; this is the second line of defence for any
    mapping (a secret-looking key, or credentials inside a URL value such as an Optuna storage URL).
    """
    params: dict[str, str] = {}
    for key, value in flat.items():
        if _looks_secret(key):
            params[key] = MASK
            continue
        text = redact(_param_text(value))
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        params[key] = text
    return params


def _looks_secret(key: str) -> bool:
    last = key.rsplit(".", 1)[-1].lower()
    return last in SECRET_KEYS or bool(_SECRET_KEY_PATTERN.search(last))


def _param_text(value: object) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def lineage_tags(data_files: Iterable[Path], seed: int, project_root: Path) -> dict[str, str]:
    """Tags that let a run be reproduced: which data, which code, which seed, which library versions."""
    files = list(data_files)
    commit, dirty = _git_state(Path(project_root))
    tags = {
        "pricelevel.data_fingerprint": files_fingerprint(files),
        "pricelevel.data_files": str(len(files)),
        "pricelevel.git_commit": commit,
        "pricelevel.git_dirty": dirty,
        "pricelevel.seed": str(seed),
        "pricelevel.version.python": platform.python_version(),
    }
    tags.update({f"pricelevel.version.{name}": _version(name) for name in LINEAGE_PACKAGES})
    return tags


def _git_state(project_root: Path) -> tuple[str, str]:
    """(commit sha, "true"/"false" for uncommitted changes); ("unknown", "unknown") outside a git repo."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=project_root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if dirty else "false"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def pip_requirements() -> list[str]:
    """Pinned requirements for the logged model; given explicitly, MLflow skips inferring them (~10 s)."""
    return [f"{name}=={_version(name)}" for name in MODEL_REQUIREMENTS if _version(name) != "missing"]


# ----------------------------------------------------------------------------------- model packaging


class PriceLevelPyfunc(mlflow.pyfunc.PythonModel):
    """``MultiSymbolLSTM`` as an MLflow pyfunc: ``{"features": [B,T,F], "symbol_id": [B]}`` -> ``[B]`` p.

    Why not ``mlflow.pytorch``: MLflow 3 saves PyTorch models as a ``torch.export`` (pt2) program by
    default, which fixes the input shape at the example's sequence length, but scoring uses any
    ``T >= seq_len``. Here the artifacts are a plain ``state_dict`` (``weights``) and the
    :class:`ModelSpec` JSON (``spec``), and the module is rebuilt from ``spec.hparams`` on load, so the
    spec travels with the weights and nothing about the input length is frozen.

    The model is logged "from code" (:data:`MODEL_CODE`), not pickled, so loading it needs
    ``pricelevel`` importable (it is not on PyPI, hence not in :func:`pip_requirements`).
    """

    #: MLflow 3 wraps ``predict`` according to its type hints and warns when there are none; the explicit
    #: tensor signature given to ``log_model`` is the contract here, so that machinery is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Rebuild the module on CPU from the spec and load the weights, in eval mode."""
        import torch

        from pricelevel.ml.model import MultiSymbolLSTM

        self.spec = ModelSpec.from_json(Path(context.artifacts["spec"]).read_text())
        module = MultiSymbolLSTM(**self.spec.hparams)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        self.module = module.to("cpu").eval()

    # Unannotated on purpose: MLflow 3 infers a signature from predict's type hints, and this one is explicit.
    def predict(self, context, model_input, params=None):
        """Float64 probabilities ``[B]``; raises ValueError for T < seq_len, a wrong F or bad symbol ids."""
        import torch

        if not isinstance(model_input, Mapping):
            raise ValueError(
                f"model input must be a dict with 'features' and 'symbol_id', got {type(model_input).__name__}"
            )
        features, symbol_id = check_model_input(self.spec, model_input.get("features"), model_input.get("symbol_id"))
        if len(features) == 0:
            return np.empty(0, dtype=np.float64)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(features), PREDICT_BATCH_ROWS):
                logits = self.module(
                    torch.from_numpy(features[start : start + PREDICT_BATCH_ROWS]),
                    torch.from_numpy(symbol_id[start : start + PREDICT_BATCH_ROWS]),
                )
                outputs.append(torch.sigmoid(logits.float()))
        return torch.cat(outputs).numpy().astype(np.float64)


#: "Models from code" (MLflow 3's recommended form): the saved model names the class instead of pickling it.
MODEL_CODE = """\
import mlflow.models

from pricelevel.registry.tracking import PriceLevelPyfunc

mlflow.models.set_model(PriceLevelPyfunc())
"""


def check_model_input(spec: ModelSpec, features: object, symbol_id: object) -> tuple[np.ndarray, np.ndarray]:
    """``(features float32 [B,T,F], symbol_id int64 [B])`` or a ValueError saying what is wrong."""
    if features is None or symbol_id is None:
        raise ValueError("model input needs both 'features' [B, T, F] and 'symbol_id' [B]")
    features = np.ascontiguousarray(features, dtype=np.float32)
    symbol_id = np.ascontiguousarray(symbol_id, dtype=np.int64)
    n_features = int(spec.hparams.get("n_features", len(spec.features)))
    n_symbols = int(spec.hparams.get("n_symbols", len(spec.symbols)))
    if features.ndim != 3:
        raise ValueError(f"features must be [batch, time, feature], got shape {features.shape}")
    batch, steps, width = features.shape
    if width != n_features:
        raise ValueError(
            f"features have {width} columns, the model expects {n_features} ({', '.join(spec.features)})"
        )
    if steps < spec.seq_len:
        raise ValueError(f"sequence length {steps} is shorter than the model's seq_len {spec.seq_len}")
    if symbol_id.shape != (batch,):
        raise ValueError(f"symbol_id must have shape ({batch},) to match features, got {symbol_id.shape}")
    if batch and (symbol_id.min() < -1 or symbol_id.max() >= n_symbols):
        raise ValueError(f"symbol_id must be in [-1, {n_symbols - 1}] (-1 = unknown symbol)")
    return features, symbol_id


def model_signature(spec: ModelSpec) -> ModelSignature:
    """Tensor signature with a free batch and time axis (-1), so any ``T`` passes MLflow's enforcement."""
    n_features = int(spec.hparams.get("n_features", len(spec.features)))
    inputs = Schema(
        [
            TensorSpec(np.dtype(np.float32), (-1, -1, n_features), "features"),
            TensorSpec(np.dtype(np.int64), (-1,), "symbol_id"),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_pricelevel_model(
    client: MlflowClient,
    run_id: str,
    module: Any,
    spec: ModelSpec,
    input_example: Mapping[str, np.ndarray],
    name: str = "model",
) -> LoggedModel:
    """Save weights + spec as a :class:`PriceLevelPyfunc` and log it as a LoggedModel of ``run_id`` (READY)."""
    import torch

    example = {
        "features": np.asarray(input_example["features"], dtype=np.float32)[:INPUT_EXAMPLE_ROWS],
        "symbol_id": np.asarray(input_example["symbol_id"], dtype=np.int64)[:INPUT_EXAMPLE_ROWS],
    }
    experiment_id = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="pricelevel-model-") as folder:
        weights = Path(folder) / "weights.pt"
        spec_file = Path(folder) / "spec.json"
        code_file = Path(folder) / "pricelevel_model.py"
        torch.save({key: value.detach().cpu() for key, value in module.state_dict().items()}, weights)
        spec_file.write_text(spec.to_json())
        code_file.write_text(MODEL_CODE)
        saved = Path(folder) / "model"
        mlflow.pyfunc.save_model(
            path=saved,
            python_model=str(code_file),
            artifacts={"weights": str(weights), "spec": str(spec_file)},
            signature=model_signature(spec),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
        logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="pricelevel")
        try:
            client.log_model_artifacts(logged.model_id, str(saved))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return client.finalize_logged_model(logged.model_id, "READY")


# -------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A loaded pyfunc with its spec and where it came from (``version`` only for registry URIs)."""

    pyfunc_model: Any
    spec: ModelSpec
    uri: str
    version: str | None

    def predict(self, features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
        """Probabilities ``[B]``; inputs are cast and checked first so errors are ValueErrors."""
        features, symbol_id = check_model_input(self.spec, features, symbol_id)
        return np.asarray(self.pyfunc_model.predict({"features": features, "symbol_id": symbol_id}))


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<name>.+?)/?$")


def load_model(uri: str, client: MlflowClient) -> LoadedModel:
    """Load ``runs:/<run>/<name>``, ``models:/<name>/<n>``, ``models:/<name>@<alias>`` or ``models:/<id>``
    through ``client`` (its tracking and registry URIs, never MLflow's globals).

    An alias is loaded through the version it resolves to now, so weights and ``version`` agree even if the
    alias moves meanwhile. A missing model, version, alias or run raises :class:`ModelNotFoundError`.
    """
    version = _registry_version(client, uri)
    try:
        location = _artifact_location(client, uri, version)
        with tempfile.TemporaryDirectory(prefix="pricelevel-load-") as folder:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=folder, tracking_uri=client.tracking_uri,
                registry_uri=getattr(client, "_registry_uri", None) or client.tracking_uri,
            )
            pyfunc_model = mlflow.pyfunc.load_model(local)  # weights and spec are read into memory here
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise ModelNotFoundError(f"cannot load {uri}: {exc.message.splitlines()[0]}") from None
        raise
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load {uri}: {exc}") from None
    python_model = pyfunc_model.unwrap_python_model()
    if not isinstance(python_model, PriceLevelPyfunc):
        raise ModelNotFoundError(f"{uri} is not a pricelevel model (it wraps {type(python_model).__name__})")
    return LoadedModel(pyfunc_model=pyfunc_model, spec=python_model.spec, uri=uri, version=version)


def _artifact_location(client: MlflowClient, uri: str, version: str | None) -> str:
    """Where the model's files are: a version's source, a logged model's or a run's output model's location."""
    if (match := _REGISTRY_URI.match(uri)) and version is not None:
        return client.get_model_version_download_uri(match["name"], version)
    if match := _LOGGED_MODEL_URI.match(uri):
        return client.get_logged_model(match["model_id"]).artifact_location
    if match := _RUN_URI.match(uri):
        return run_model(client, match["run_id"], match["name"]).artifact_location
    raise ModelNotFoundError(f"cannot load {uri}: expected runs:/<run>/<name>, models:/<name>/<version>, "
                             "models:/<name>@<alias> or models:/<model id>")


def run_model(client: MlflowClient, run_id: str, name: str = "model") -> LoggedModel:
    """The newest model named ``name`` logged by run ``run_id`` (MLflow 3 keeps it in a LoggedModel)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"no run {run_id!r}") from None
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        logged = client.get_logged_model(output.model_id)
        if logged.name == name.strip("/"):
            return logged
    raise ModelNotFoundError(f"run {run_id} has no logged model named {name!r}")


def _registry_version(client: MlflowClient, uri: str) -> str | None:
    """The version number a ``models:/name/...`` URI points at; None for run and logged-model URIs."""
    match = _REGISTRY_URI.match(uri)
    if match is None or (match["version"] is None and match["alias"] is None):
        return None
    name = match["name"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(model.name for model in client.search_registered_models())
        raise ModelNotFoundError(
            f"no registered model {name!r} (registered: {', '.join(names) or 'none'}); "
            "run `pricelevel train` first"
        ) from None
    if match["alias"] is not None:
        alias = match["alias"]
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(f"{key}->v{value}" for key, value in sorted(aliases.items())) or "none"
            raise ModelNotFoundError(
                f"no version of model {name!r} has alias {alias!r} (aliases: {known}); "
                "run `pricelevel train` then `pricelevel promote`"
            )
        return str(aliases[alias])
    version = match["version"]
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no versions; run `pricelevel train` first")
        return str(max(int(mv.version) for mv in versions))
    try:
        client.get_model_version(name, version)
    except MlflowException:
        existing = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
        raise ModelNotFoundError(
            f"model {name!r} has no version {version} (versions: {', '.join(map(str, existing)) or 'none'})"
        ) from None
    return version
