"""Prefect tasks of the promotion flow: score challenger and champion on the same newest window, decide, record."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.inference.scoring import WindowScore, newest_window, score_window, tables_for_spec
from pricelevel.registry.promotion import Decision, Scores, decide, decision_tags
from pricelevel.registry.tracking import LoadedModel, load_model, mlflow_client
from pricelevel.registry.versions import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    move_champion,
    rollback_champion,
    version_for_alias,
)


@task(name="load-contenders", cache_policy=NO_CACHE)
def load_contenders(config: Config) -> tuple[LoadedModel | None, LoadedModel | None]:
    """``(challenger, champion)`` from the registry aliases; either may be missing."""
    client = mlflow_client(config.tracking)
    name = config.tracking.registered_model
    loaded = []
    for alias in (ALIAS_CHALLENGER, ALIAS_CHAMPION):
        version = version_for_alias(client, name, alias)
        loaded.append(load_model(f"models:/{name}/{version.version}", client) if version else None)
    return loaded[0], loaded[1]


@task(name="score", task_run_name="score {role}", cache_policy=NO_CACHE)
def score(config: Config, model: LoadedModel, role: str, start: pd.Timestamp | None) -> WindowScore:
    """Recompute levels and features from the validated data with the model's own settings, then score it."""
    folder = config.catalogue.validated()
    tables = tables_for_spec(folder, model.spec, [s for s in model.spec.symbols if folder.has(s, model.spec.timeframe)])
    if start is None:
        start = newest_window(tables, config.promotion.window_days, pd.Timestamp(model.spec.extra["test_start"]))
    result = score_window(model.predict, model.spec, tables, start, config.tuning.metric,
                          config.promotion.backtest_metric, config.backtest)
    get_run_logger().info(
        "%s (version %s) on %s .. %s (%d bars): %s %.4f, backtest %s %.4f, baselines %s", role, model.version,
        result.start, result.end, result.rows, config.tuning.metric, result.metric,
        config.promotion.backtest_metric, result.backtest, result.baselines,
    )
    return result


@task(name="decide", cache_policy=NO_CACHE)
def decide_and_record(
    config: Config, challenger: LoadedModel, champion: LoadedModel | None,
    challenger_score: WindowScore, champion_score: WindowScore | None, decided_at: str,
) -> Decision:
    """Apply the rule in ``promotion:``; tag both versions; move ``champion`` only if the challenger won."""
    decision = decide(
        Scores(challenger_score.metric, challenger_score.backtest, challenger_score.baselines),
        Scores(champion_score.metric, champion_score.backtest, champion_score.baselines) if champion_score else None,
        config.promotion, config.tuning.metric, config.tuning.direction,
    )
    client = mlflow_client(config.tracking)
    name = config.tracking.registered_model
    tags = decision_tags(decision, challenger.version, champion.version if champion else None, decided_at)
    tags["promotion.window"] = f"{challenger_score.start} .. {challenger_score.end}"
    for version in {challenger.version, *( [champion.version] if champion else [])}:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        move_champion(client, name, challenger.version)
    get_run_logger().info("%s: %s", "PROMOTED" if decision.promote else "not promoted", decision.reason)
    create_markdown_artifact(
        key="promotion-decision",
        markdown=_markdown(config, decision, challenger, champion, challenger_score, champion_score),
        description="Challenger vs champion",
    )
    return decision


def _markdown(config, decision, challenger, champion, challenger_score, champion_score) -> str:
    rows = [("challenger", challenger, challenger_score), ("champion", champion, champion_score)]
    lines = [
        f"# {'Promoted' if decision.promote else 'Not promoted'}: `{config.tracking.registered_model}` "
        f"version {challenger.version}", "", decision.reason, "",
        f"| role | version | {config.tuning.metric} | {config.promotion.backtest_metric} | window |", "|---|---|---|---|---|",
    ]
    for role, model, result in rows:
        if model is not None and result is not None:
            lines.append(f"| {role} | {model.version} | {result.metric:.4f} | {result.backtest:.4f} | "
                         f"{result.start:%Y-%m-%d} .. {result.end:%Y-%m-%d} |")
    lines += ["", f"Baselines on the window ({config.tuning.metric}): "
              + json.dumps({k: round(v, 4) for k, v in challenger_score.baselines.items()})]
    return "\n".join(lines)


@task(name="rollback", cache_policy=NO_CACHE)
def rollback(config: Config) -> dict[str, Any]:
    """Put ``champion`` back on the version that held it before the last promotion."""
    client = mlflow_client(config.tracking)
    name = config.tracking.registered_model
    from_version, to_version = rollback_champion(client, name)
    get_run_logger().info("rolled back %s@%s: version %s -> %s", name, ALIAS_CHAMPION, from_version, to_version)
    create_markdown_artifact(
        key="promotion-decision",
        markdown=f"# Rolled back `{name}@{ALIAS_CHAMPION}`\n\nversion {from_version} -> {to_version}\n",
        description="Rollback",
    )
    return {"rolled_back": True, "from": from_version, "to": to_version}


def decision_dict(decision: Decision) -> dict[str, Any]:
    return asdict(decision)
