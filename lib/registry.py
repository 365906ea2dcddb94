"""The model registry edge: versions, aliases, idempotent registration and the champion's history.

Aliases replace MLflow's removed stages: ``challenger`` is the newest trained version, ``champion`` the one
serving. Every move of ``champion`` pushes the previous holder onto a registered-model tag, so a bad
promotion can be undone with :func:`rollback_champion` without remembering version numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pricelevel.tracking import client_uris

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
#: Registered-model tag: JSON list of former champion versions, oldest first.
CHAMPION_HISTORY_TAG = "pricelevel.champion_history"
#: Oldest entries beyond this are dropped; a rollback further back than this is not a rollback.
CHAMPION_HISTORY_LIMIT = 100
#: Version tags shown by :func:`list_versions`.
PROMOTION_TAG_PREFIX = "promotion."
_READY = "READY"
_FAILED = "FAILED_REGISTRATION"


class NothingToRollBackError(LookupError):
    """There is no former champion to put back."""


class RegistrationError(RuntimeError):
    """A model version did not become READY."""


def register_version(
    client: MlflowClient,
    name: str,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, str],
    timeout_s: float = 300.0,
) -> ModelVersion:
    """Register ``model_uri`` (``ModelInfo.model_uri``, ``models:/<model_id>``) as a new READY version.

    Creates the registered model on first use. ``runs:/<run>/<name>`` URIs are resolved to the logged
    model first: in MLflow 3 a run's model lives in a LoggedModel, not in the run's artifacts.
    """
    _ensure_registered_model(client, name)
    source, model_id = _model_source(client, model_uri)
    with client_uris(client):  # the SQL registry resolves models:/<id> through the global client
        version = client.create_model_version(
            name=name,
            source=source,
            run_id=run_id,
            tags={key: str(value) for key, value in tags.items()},
            model_id=model_id,
            await_creation_for=int(timeout_s),
        )
    return _await_ready(client, name, version.version, timeout_s)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine; anything else re-raises


def _model_source(client: MlflowClient, model_uri: str) -> tuple[str, str | None]:
    """``(source, model_id)`` for ``create_model_version``."""
    if model_uri.startswith("models:/m-"):
        return model_uri, model_uri.removeprefix("models:/").strip("/")
    if model_uri.startswith("runs:/"):
        run_id, _, artifact_path = model_uri.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        for output in sorted(outputs, key=lambda o: o.step, reverse=True):
            logged = client.get_logged_model(output.model_id)
            if logged.name == artifact_path.strip("/"):
                return f"models:/{logged.model_id}", logged.model_id
        raise LookupError(f"run {run_id} has no logged model named {artifact_path!r}")
    return model_uri, None


def _await_ready(client: MlflowClient, name: str, version: str, timeout_s: float) -> ModelVersion:
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        if current.status == _READY:
            return current
        if current.status == _FAILED:
            raise RegistrationError(f"model {name!r} version {version} failed to register: {current.status_message}")
        if time.monotonic() > deadline:
            raise RegistrationError(f"model {name!r} version {version} not READY after {timeout_s:.0f} s")
        time.sleep(0.5)


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    client.set_registered_model_alias(name, alias, str(version))


def _aliases(client: MlflowClient, name: str) -> dict[str, str] | None:
    """``alias -> version`` of a registered model; None when the model does not exist."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return None
    return {alias: str(version) for alias, version in (registered.aliases or {}).items()}


def version_for_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``; None when the alias or the model does not exist.

    Looked up through the model's alias map: MLflow's SQL store reports a missing alias as
    INVALID_PARAMETER_VALUE, which cannot be told apart from a real error by code.
    """
    version = (_aliases(client, name) or {}).get(alias)
    return client.get_model_version(name, version) if version is not None else None


def find_version_by_tag(client: MlflowClient, name: str, key: str, value: str) -> ModelVersion | None:
    """The newest version of ``name`` tagged ``key=value`` (None if there is none): makes registration idempotent."""
    filter_string = f"name = {_quote(name)} AND tags.`{key}` = {_quote(value)}"
    versions = client.search_model_versions(filter_string)
    return max(versions, key=lambda mv: int(mv.version)) if versions else None


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def list_versions(client: MlflowClient, name: str, metric: str | None = None) -> list[dict[str, Any]]:
    """Every version, newest first, with aliases, run metrics and promotion tags (for ``pricelevel models``).

    Metrics are the version's run's ``test_*`` and ``backtest_*`` ones plus ``metric`` (the tuned one), or
    every ``val_*`` metric when ``metric`` is None.
    """
    aliases = _aliases(client, name)
    if aliases is None:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = {_quote(name)}"), key=lambda v: int(v.version), reverse=True):
        rows.append(
            {
                "version": str(mv.version),
                "aliases": by_version.get(str(mv.version), []),
                "run_id": mv.run_id,
                "created": _iso(mv.creation_timestamp),
                "status": mv.status,
                "metrics": _key_metrics(client, mv.run_id, metric),
                "tags": {k: v for k, v in sorted((mv.tags or {}).items()) if k.startswith(PROMOTION_TAG_PREFIX)},
            }
        )
    return rows


def _iso(timestamp_ms: int | None) -> str | None:
    if timestamp_ms is None:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="seconds")


def _key_metrics(client: MlflowClient, run_id: str | None, metric: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    try:
        metrics = client.get_run(run_id).data.metrics
    except MlflowException:  # the run was deleted: the version outlives it
        return {}

    def wanted(key: str) -> bool:
        tuned = key == metric if metric else key.startswith("val_")
        return tuned or key.startswith(("test_", "backtest_"))

    return {key: value for key, value in sorted(metrics.items()) if wanted(key)}


# ------------------------------------------------------------------------------------ champion history


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """Former champions, oldest first (empty when never promoted or the model does not exist)."""
    try:
        tags = client.get_registered_model(name).tags or {}
    except MlflowException:
        return []
    raw = tags.get(CHAMPION_HISTORY_TAG)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except ValueError:
        return []
    return [str(version) for version in history] if isinstance(history, list) else []


def _write_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, json.dumps(history[-CHAMPION_HISTORY_LIMIT:]))


def move_champion(client: MlflowClient, name: str, version: str | int) -> str | None:
    """Give ``champion`` to ``version``, remembering the previous holder; returns that previous version.

    The history is written before the alias moves: a crash in between leaves an extra entry (harmless
    for rollback) rather than a champion that can no longer be rolled back.
    """
    version = str(version)
    current = version_for_alias(client, name, ALIAS_CHAMPION)
    previous = str(current.version) if current is not None else None
    if previous is not None and previous != version:
        _write_history(client, name, [*champion_history(client, name), previous])
    set_alias(client, name, ALIAS_CHAMPION, version)
    return previous


def rollback_champion(client: MlflowClient, name: str) -> tuple[str | None, str]:
    """Put ``champion`` back on the most recent former champion: ``(from_version, to_version)``.

    Former champions that were deleted since, or that hold ``champion`` now, are skipped.
    """
    current = version_for_alias(client, name, ALIAS_CHAMPION)
    current_version = str(current.version) if current is not None else None
    history = champion_history(client, name)
    while history:
        candidate = history.pop()
        if candidate == current_version or not _version_exists(client, name, candidate):
            continue
        _write_history(client, name, history)
        set_alias(client, name, ALIAS_CHAMPION, candidate)
        return current_version, candidate
    raise NothingToRollBackError(
        f"model {name!r} has no former champion to roll back to "
        f"(champion: {'version ' + current_version if current_version else 'none'}; history empty)"
    )


def _version_exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True
