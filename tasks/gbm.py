"""Prefect task of the training flow: the LightGBM baseline on every walk-forward fold, put beside the LSTM in
the walk-forward report (and its ``gbm_*`` metrics in the run)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.dataset import DatasetPlan
from pricelevel.ml.gbm import GbmConfig, gbm_baseline_step
from pricelevel.registry.experiment import StartedRun


@task(name="gbm-baseline", cache_policy=NO_CACHE)
def gbm_baseline(config: Config, plan: DatasetPlan, trained: TrainedModel, started: StartedRun,
                 report: dict[str, Any]) -> dict[str, Any]:
    """The walk-forward report with LightGBM beside the LSTM (same rows, folds, rule search and costs)."""
    settings = getattr(config, "gbm", None) or GbmConfig()  # the `gbm:` section once the run config has one
    merged = gbm_baseline_step(plan, trained, report, settings, config.strategy, config.catalogue.derived, started.log)
    create_markdown_artifact(key="walk-forward", markdown=merged["markdown"],
                             description="Walk-forward: model vs baselines and LightGBM")
    get_run_logger().info("%s", merged["markdown"].split("## LightGBM baseline", 1)[-1].strip())
    return merged
