"""The model registry edge: versions, aliases, idempotent registration and the champion's history.

Aliases replace MLflow's removed stages: ``challenger`` is the newest trained version, ``champion`` the one
serving. Every move of ``champion`` pushes the previous holder onto a registered-model tag, so a bad
promotion can be undone with :func:`rollback_champion` without remembering version numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pricelevel.registry.tracking import run_model

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
#: Registered-model tag: JSON list of former champion versions, oldest first.
CHAMPION_HISTORY_TAG = "pricelevel.champion_history"
#: Version tag of a champion: the version it replaced (written before the alias moves).
REPLACED_TAG = "pricelevel.replaced"
#: Oldest entries beyond this are dropped; a rollback further back than this is not a rollback.
CHAMPION_HISTORY_LIMIT = 100
#: Version tags shown by :func:`list_versions`.
PROMOTION_TAG_PREFIX = "promotion."
#: Version tags of a champion judged again at a promotion run: its consecutive hurdle failures (the count that
#: retires it), the verdict (``passed`` / ``failed`` / ``retired``), the sentence and when.
CHAMPION_FAILURES_TAG = "promotion.champion.failures"
CHAMPION_VERDICT_TAG = "promotion.champion.verdict"
CHAMPION_REASON_TAG = "promotion.champion.reason"
CHAMPION_JUDGED_AT_TAG = "promotion.champion.judged_at"
_READY = "READY"
_FAILED = "FAILED_REGISTRATION"


class NothingToRollBackError(LookupError):
    """There is no former champion to put back."""


class RegistrationError(RuntimeError):
    """A model version did not become READY."""


def register_version(
    client: MlflowClient,
    name: str,
    model: LoggedModel | str,
    run_id: str,
    tags: Mapping[str, str],
    timeout_s: float = 300.0,
) -> ModelVersion:
    """Register a logged model (or ``models:/<model_id>`` / ``runs:/<run>/<name>``) as a new READY version.

    Creates the registered model on first use. The version's source is the model's artifact location
    itself, so the registry never has to resolve a ``models:/`` URI through MLflow's global client.
    """
    logged = _logged_model(client, model)
    _ensure_registered_model(client, name)
    version = client.create_model_version(
        name=name,
        source=logged.artifact_location,
        run_id=run_id,
        tags={key: str(value) for key, value in tags.items()},
        model_id=logged.model_id,
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


def _logged_model(client: MlflowClient, model: LoggedModel | str) -> LoggedModel:
    if isinstance(model, LoggedModel):
        return model
    if model.startswith("models:/m-"):
        return client.get_logged_model(model.removeprefix("models:/").strip("/"))
    if model.startswith("runs:/"):
        run_id, _, name = model.removeprefix("runs:/").partition("/")
        return run_model(client, run_id, name or "model")
    raise ValueError(f"not a logged model or its URI: {model!r}")


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
    version = alias_version(client, name, alias)
    return client.get_model_version(name, version) if version is not None else None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version number holding ``alias`` (None: no such alias or model), in one registry query: what a
    trader asks at every bar."""
    return (_aliases(client, name) or {}).get(alias)


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
    """Former champions, oldest first (empty when never promoted or the model does not exist).

    If the alias moved but the history was not written (a crash in between), the champion's own
    ``pricelevel.replaced`` tag, written before the move, still names its predecessor: it is added here.
    """
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return []
    history = _parse_history((registered.tags or {}).get(CHAMPION_HISTORY_TAG))
    current = (registered.aliases or {}).get(ALIAS_CHAMPION)
    if current is not None:
        replaced = (client.get_model_version(name, str(current)).tags or {}).get(REPLACED_TAG)
        if replaced and replaced != str(current) and (not history or history[-1] != replaced):
            history.append(replaced)
    return history


def _parse_history(raw: str | None) -> list[str]:
    try:
        history = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [str(version) for version in history] if isinstance(history, list) else []


def _write_history(client: MlflowClient, name: str, history: list[str]) -> None:
    value = json.dumps(history[-CHAMPION_HISTORY_LIMIT:])
    retrying(lambda: client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, value))


def retrying(call: Callable[[], object], attempts: int = 4, delay_s: float = 0.5) -> None:
    """A registry write retried on MLflow errors (a busy database, a restarting server)."""
    for attempt in range(1, attempts + 1):
        try:
            call()
            return
        except MlflowException:
            if attempt == attempts:
                raise
            time.sleep(delay_s * 2 ** (attempt - 1))


def move_champion(client: MlflowClient, name: str, version: str | int) -> str | None:
    """Give ``champion`` to ``version``, remembering the previous holder; returns that previous version.

    One consistent step: the new champion is tagged with its predecessor first, then the alias moves, then
    the history is written (retried). A crash after the move leaves the history one entry short, and
    :func:`champion_history` completes it from that tag. Callers serialise promotions (a lock).
    """
    version = str(version)
    current = version_for_alias(client, name, ALIAS_CHAMPION)
    previous = str(current.version) if current is not None else None
    if previous is None or previous == version:
        set_alias(client, name, ALIAS_CHAMPION, version)
        return previous
    history = champion_history(client, name)
    retrying(lambda: client.set_model_version_tag(name, version, REPLACED_TAG, previous))
    set_alias(client, name, ALIAS_CHAMPION, version)
    _write_history(client, name, [*history, previous])
    return previous


def rollback_champion(client: MlflowClient, name: str) -> tuple[str | None, str]:
    """Put ``champion`` back on the most recent former champion: ``(from_version, to_version)``.

    Former champions that were deleted since, or that hold ``champion`` now, are skipped. The alias moves
    first and the shortened history follows; a crash in between leaves an extra entry naming the champion
    itself, which the next rollback skips.
    """
    current = version_for_alias(client, name, ALIAS_CHAMPION)
    current_version = str(current.version) if current is not None else None
    history = champion_history(client, name)
    while history:
        candidate = history.pop()
        if candidate == current_version or not _version_exists(client, name, candidate):
            continue
        set_alias(client, name, ALIAS_CHAMPION, candidate)
        _write_history(client, name, history)
        return current_version, candidate
    raise NothingToRollBackError(
        f"model {name!r} has no former champion to roll back to "
        f"(champion: {'version ' + current_version if current_version else 'none'}; history empty)"
    )


def champion_failures(client: MlflowClient, name: str, version: str) -> int:
    """The version's consecutive hurdle failures as champion (0: never failed, or passed since)."""
    raw = (client.get_model_version(name, version).tags or {}).get(CHAMPION_FAILURES_TAG, "0")
    try:
        return max(int(raw), 0)
    except ValueError:
        return 0


def record_champion_verdict(
    client: MlflowClient, name: str, version: str, verdict: str, failures: int, reason: str, judged_at: str
) -> None:
    """The champion's judgement as its version's tags (retried): what retires it at the next run, and what
    ``pricelevel models`` shows."""
    tags = {CHAMPION_FAILURES_TAG: str(failures), CHAMPION_VERDICT_TAG: verdict, CHAMPION_REASON_TAG: reason,
            CHAMPION_JUDGED_AT_TAG: judged_at}
    for key, value in tags.items():
        retrying(lambda k=key, x=value: client.set_model_version_tag(name, version, k, x))


def retire_champion(client: MlflowClient, name: str, version: str) -> bool:
    """Take ``champion`` off ``version`` (it failed the hurdle too often): no version holds it until a model earns
    it. The version goes onto the champion history first, so ``promote --rollback`` can put it back. False when
    ``champion`` had already moved elsewhere (nothing is done)."""
    if alias_version(client, name, ALIAS_CHAMPION) != str(version):
        return False
    history = champion_history(client, name)
    if not history or history[-1] != str(version):
        _write_history(client, name, [*history, str(version)])
    retrying(lambda: client.delete_registered_model_alias(name, ALIAS_CHAMPION))
    return True


def champion_status(versions: list[dict[str, Any]]) -> str | None:
    """One line on the champion's latest judgement from :func:`list_versions` rows (``None``: never judged): the
    champion's own, or the retired version's when no version holds ``champion``."""
    judged = [v for v in versions if v.get("tags", {}).get(CHAMPION_VERDICT_TAG)]
    holder = next((v for v in versions if ALIAS_CHAMPION in v.get("aliases", [])), None)
    row = holder if holder is not None and holder in judged else None
    if row is None and holder is None:
        retired = [v for v in judged if v["tags"][CHAMPION_VERDICT_TAG] == "retired"]
        row = max(retired, key=lambda v: v["tags"].get(CHAMPION_JUDGED_AT_TAG, "")) if retired else None
    if row is None:
        return None
    tags = row["tags"]
    return f"{tags.get(CHAMPION_REASON_TAG, '')} (judged {tags.get(CHAMPION_JUDGED_AT_TAG, '?')})"


def _version_exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
    except MlflowException:
        return False
    return True
