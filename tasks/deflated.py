"""Prefect task of the training flow: the chosen strategy's deflated Sharpe ratio after every configuration the
run tried, logged to the run (the promotion gate reads it: ``promotion.min_deflated_sharpe``)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.dataset import DatasetPlan
from pricelevel.ml.deflation import describe, run_deflated_sharpe
from pricelevel.ml.tuning import StudySummary
from pricelevel.registry.experiment import StartedRun


@task(name="deflated-sharpe", cache_policy=NO_CACHE)
def deflated_sharpe(config: Config, plan: DatasetPlan, trained: TrainedModel, study: StudySummary,
                    started: StartedRun) -> dict[str, float]:
    """Trials x rule candidates tried; the registered model's validation Sharpe deflated by that many tries."""
    _, metrics = run_deflated_sharpe(plan, trained, study.trials_complete, config.strategy)
    if started.log is not None:  # a reused run logged it when it was made
        started.log.log_metrics(metrics)
    get_run_logger().info("%s", describe(metrics))
    return metrics
