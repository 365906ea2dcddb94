"""Prefect tasks of the training flow: each is one library call (a ``*_step`` of its stage) and a log line. Heavy
steps derive their output folder from their inputs (:mod:`pricelevel.core.cache`), so a re-run with the same data,
config and code reads what the previous run wrote; Prefect's own result cache is not used."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.core.cache import SymbolStep
from pricelevel.core.runtime import project_root
from pricelevel.features.lookahead import lookahead_step
from pricelevel.features.tables import features_step
from pricelevel.inference.scoring import backtest_step
from pricelevel.levels.history import levels_step
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.dataset import DatasetPlan, dataset_step
from pricelevel.ml.evaluation import evaluate_step, scores_table
from pricelevel.ml.tuning import StudySummary
from pricelevel.ml.walkforward import train_step
from pricelevel.registry.experiment import (
    Registered,
    StartedRun,
    end_run_step,
    register_step,
    start_run_step,
    training_keys,
)
from tasks.runtime import current_flow_run_id, flow_run_ended


@task(name="levels", task_run_name="levels {symbol}", cache_policy=NO_CACHE)
def find_levels(config: Config, symbol: str) -> SymbolStep:
    """Walk-forward support/resistance levels of one symbol (refitted as the bars arrive)."""
    data = config.catalogue
    out = levels_step(data.validated(), data.derived, symbol, config.dataset.timeframe, config.levels)
    get_run_logger().info("%s", out.describe())
    return out


@task(name="features", task_run_name="features {levels.symbol}", cache_policy=NO_CACHE)
def feature_bars(config: Config, levels: SymbolStep) -> SymbolStep:
    """The feature and label table of one symbol (``pricelevel features`` writes the same table)."""
    data = config.catalogue
    out = features_step(data.validated(), data.derived, levels, config.table_spec)
    get_run_logger().info("%s", out.describe())
    return out


@task(name="lookahead", cache_policy=NO_CACHE)
def lookahead(config: Config, tables: list[SymbolStep]) -> dict[str, Any]:
    """Recompute features and labels on data cut at ``lookahead.cuts`` points; fail the run on any difference."""
    data = config.catalogue
    summary = lookahead_step(data.validated(), data.derived, tables, config.table_spec, config.lookahead.cuts)
    get_run_logger().info("%s", "\n".join(summary["lines"]) if summary["built"] else f"passed before: {summary['folder']}")
    return summary


@task(name="dataset", cache_policy=NO_CACHE)
def build_dataset(config: Config, tables: list[SymbolStep], levels: list[SymbolStep]) -> DatasetPlan:
    """Windows of every symbol, split chronologically with an embargo."""
    plan = dataset_step(tables, levels, config.table_spec, config.dataset, config.tuning.space.seq_len, config.evaluation.folds)
    get_run_logger().info("dataset: %s", {k: v for k, v in plan.summary.items() if k != "features"})
    return plan


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(config: Config, plan: DatasetPlan, lookahead_report: dict[str, Any] | None) -> StartedRun:
    """The MLflow run for these inputs: the finished one if it exists, else a new one with params and lineage."""
    keys = training_keys(plan, config.model_inputs, config.tuning, config.strategy)
    files = config.catalogue.validated().existing_for(plan.symbols)
    started = start_run_step(config.tracking, plan, keys, config.flat(), files, config.model.seed, project_root(),
                             lookahead_report, current_flow_run_id(), flow_run_ended)
    logger = get_run_logger()
    for run_id, reason in started.ended_orphans.items():
        logger.warning("MLflow run %s was still RUNNING but %s: ended as FAILED", run_id, reason)
    logger.info("MLflow run %s (%s)", started.run.run_id, "new" if started.created else "reused: trained before")
    return started


@task(name="train", cache_policy=NO_CACHE)
def fit_final(config: Config, plan: DatasetPlan, study: StudySummary, started: StartedRun) -> TrainedModel:
    """Train the final model with the study's best parameters (reused when these inputs were trained before)."""
    trained = train_step(plan, config.model_inputs, config.tuning, study.best_params, started.keys.model, config.strategy,
                         config.catalogue.derived, started.log)
    get_run_logger().info("%s", trained.describe(config.tuning.metric))
    return trained


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(config: Config, plan: DatasetPlan, trained: TrainedModel, started: StartedRun) -> dict[str, Any]:
    """The walk-forward report: every fold's test, the model beside the classifier and strategy baselines."""
    report = evaluate_step(plan, trained, config.tuning.metric, config.strategy, started.log)
    create_markdown_artifact(key="walk-forward", markdown=report["markdown"], description="Walk-forward: model vs baselines")
    create_table_artifact(key="test-scores", table=scores_table(report["scores"]), description="Newest fold's test segment")
    get_run_logger().info("%s", report["markdown"])
    return report


@task(name="backtest", cache_policy=NO_CACHE)
def backtest(config: Config, plan: DatasetPlan, trained: TrainedModel, started: StartedRun) -> dict[str, Any]:
    """Trade the model's test-segment probabilities with the backtest engine; metrics and Plotly report."""
    traded = backtest_step(plan, trained, config.backtest, config.catalogue.derived, started.log)
    get_run_logger().info("backtest on the test segment: %s; report %s", traded["metrics"], traded["report"])
    return traded


@task(name="register", cache_policy=NO_CACHE)
def register(config: Config, started: StartedRun, trained: TrainedModel, plan: DatasetPlan, scores: dict[str, Any]) -> Registered:
    """Log the model, register it and alias ``challenger`` (nothing new when these inputs were registered)."""
    done = register_step(started, trained, plan, config.tracking.registered_model, config.tuning.metric, scores)
    metric = f"best_{config.tuning.metric}"
    get_run_logger().info("%s version %s is @challenger (%s)", done.name, done.version, "new" if done.created else "existed")
    create_markdown_artifact(key="train-result", description="Training result",
                             markdown=done.markdown(metric, scores[metric], started.run.run_id))
    return done


@task(name="end-run", cache_policy=NO_CACHE)
def end_run(started: StartedRun, status: str) -> None:
    """End the MLflow run as ``status`` (a failed flow leaves no run RUNNING)."""
    end_run_step(started, status)
