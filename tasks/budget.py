"""Prefect task of the training budget: size the run to this machine before the study (one library call and a
log block)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.ml.budget import budget_step, describe_device, sized_sections
from pricelevel.ml.dataset import DatasetPlan


@task(name="budget", cache_policy=NO_CACHE)
def size_to_budget(config: Config, plan: DatasetPlan) -> Config:
    """``config`` with ``tuning.n_trials``/``max_epochs``, ``evaluation.folds`` and ``model.max_epochs`` sized to
    ``training.budget_hours`` (unchanged without a budget); says where it trains and how it chose."""
    decision, measured = budget_step(plan, config.model_inputs, config.tuning, config.evaluation, config.training,
                                     config.catalogue.derived)
    reused = "" if measured or decision.budget_s is None else "\n  (sized before for these inputs: not measured again)"
    get_run_logger().info("%s\n%s%s", describe_device(config.model), decision.describe(), reused)
    model, tuning, evaluation = sized_sections(decision, config.model, config.tuning, config.evaluation)
    return config.model_copy(update={"model": model, "tuning": tuning, "evaluation": evaluation})
