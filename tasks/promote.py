"""Prefect tasks of the promotion flow: score challenger and champion on the same window, decide, record; judge
the champion again on that window (and retire it after ``promotion.retire_after`` failures in a row)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.backtest.trading import rules_of
from pricelevel.config import Config
from pricelevel.inference.contest import Contender, Contest, score_contest
from pricelevel.registry.gate import Recorded, record_decision, rejudge_champion
from pricelevel.registry.promotion import ChampionVerdict
from pricelevel.registry.tracking import LoadedModel, load_model, mlflow_client
from pricelevel.registry.versions import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    rollback_champion,
    version_for_alias,
)


@task(name="load-contenders", cache_policy=NO_CACHE)
def load_contenders(config: Config) -> tuple[LoadedModel | None, LoadedModel | None]:
    """``(challenger, champion)`` from the registry aliases; either may be missing."""
    client = mlflow_client(config.tracking)
    name = config.tracking.registered_model
    versions = [version_for_alias(client, name, alias) for alias in (ALIAS_CHALLENGER, ALIAS_CHAMPION)]
    loaded = [load_model(f"models:/{name}/{v.version}", client) if v else None for v in versions]
    return loaded[0], loaded[1]


@task(name="score", cache_policy=NO_CACHE)
def score(config: Config, challenger: LoadedModel, champion: LoadedModel | None) -> Contest:
    """Both models on the newest window of the validated data: same rows, the challenger's target, own rules."""
    contest = score_contest(
        Contender(challenger.predict, challenger.spec, challenger.version),
        Contender(champion.predict, champion.spec, champion.version) if champion else None,
        config.catalogue.validated(), config.promotion.window_days, config.tuning.metric, config.backtest,
        rules_of(config.backtest),
    )
    get_run_logger().info("%s", contest.describe(config.tuning.metric))
    return contest


@task(name="decide", cache_policy=NO_CACHE)
def decide_and_record(config: Config, contest: Contest, decided_at: str) -> Recorded:
    """Apply the rule in ``promotion:``; tag both versions; move ``champion`` only if the challenger won; judge
    the champion again on the same window."""
    recorded = record_decision(
        mlflow_client(config.tracking), config.tracking.registered_model, contest, config.promotion, config.tuning.metric,
        config.tuning.direction, config.selection.metric, decided_at,
    )
    decision = recorded.decision
    get_run_logger().info("%s: %s", "PROMOTED" if decision.promote else "not promoted", decision.reason)
    log_verdict(recorded.champion)
    create_markdown_artifact(key="promotion-decision", markdown=recorded.markdown, description="Challenger vs champion")
    return recorded


@task(name="rejudge-champion", cache_policy=NO_CACHE)
def rejudge(config: Config, contest: Contest, judged_at: str) -> ChampionVerdict:
    """No new challenger (it already is the champion): the champion alone, judged by the hurdle on the window."""
    verdict = rejudge_champion(mlflow_client(config.tracking), config.tracking.registered_model, contest.challenger,
                               contest, config.promotion, config.selection.metric, judged_at)
    log_verdict(verdict)
    create_markdown_artifact(key="promotion-decision", description="The champion judged again",
                             markdown=f"# Champion v{verdict.version} judged again\n\n{verdict.reason}\n\n"
                                      f"{contest.describe(config.tuning.metric)}\n")
    return verdict


def log_verdict(verdict: ChampionVerdict | None) -> None:
    """The champion's judgement in the flow log: a failure as a warning."""
    if verdict is not None:
        logger = get_run_logger()
        (logger.info if verdict.passed else logger.warning)("%s", verdict.reason)


@task(name="rollback", cache_policy=NO_CACHE)
def rollback(config: Config) -> dict[str, Any]:
    """Put ``champion`` back on the version that held it before the last promotion."""
    name = config.tracking.registered_model
    from_version, to_version = rollback_champion(mlflow_client(config.tracking), name)
    get_run_logger().info("rolled back %s@%s: version %s -> %s", name, ALIAS_CHAMPION, from_version, to_version)
    create_markdown_artifact(key="promotion-decision", description="Rollback",
                             markdown=f"# Rolled back `{name}@{ALIAS_CHAMPION}`\n\nversion {from_version} -> {to_version}\n")
    return {"rolled_back": True, "from": from_version, "to": to_version}


def decision_dict(recorded: Recorded) -> dict[str, Any]:
    """The flow's outcome: the decision's fields, and the champion's verdict (its sentence also ends ``reason``,
    so the CLI and the Telegram message say it)."""
    out = asdict(recorded.decision)
    if recorded.champion is not None:
        out["champion_verdict"] = asdict(recorded.champion)
        out["reason"] = f"{out['reason']}\n{recorded.champion.reason}"
    return out
