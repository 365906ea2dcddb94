"""Prefect tasks of the tuning step: the Optuna study, and its trial workers when ``tuning.workers`` > 1 (each
one library call and a log line)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.ml.dataset import DatasetPlan
from pricelevel.ml.tuning import StudySummary, trial_worker_step, tune_step
from pricelevel.registry.experiment import StartedRun
from tasks.runtime import fan_out, training_resources


@task(name="tune", cache_policy=NO_CACHE)
def tune(config: Config, plan: DatasetPlan, started: StartedRun) -> StudySummary:
    """Optuna study over the search space; resumes a study of the same inputs, a no-op once it is complete.
    With ``tuning.workers`` > 1 the trials run in that many ``tune-trials`` tasks on the flow's runner."""
    places = config.catalogue.tuning_places(config.tuning.storage)

    def run_workers() -> None:
        with fan_out(config.flow) as runner, training_resources(config.flow, config.model):
            workers = [runner.submit(tune_trials, {"config": config, "plan": plan, "started": started, "worker": k})
                       for k in range(config.tuning.workers)]
        get_run_logger().info("trial workers finished %s trials", [w.result() for w in workers])

    study = tune_step(plan, config.model_inputs, config.tuning, config.strategy, *places, started.log,
                      run_workers if config.tuning.workers > 1 else None)
    get_run_logger().info("%s", study.describe())
    return study


@task(name="tune-trials", task_run_name="tune-trials {worker}", cache_policy=NO_CACHE)
def tune_trials(config: Config, plan: DatasetPlan, started: StartedRun, worker: int) -> int:
    """One trial worker of the shared study (``tuning.workers`` of them): trials until ``n_trials`` in total."""
    places = config.catalogue.tuning_places(config.tuning.storage)
    done = trial_worker_step(plan, config.model_inputs, config.tuning, config.strategy, *places, started.log)
    get_run_logger().info("trial worker %d finished %d trials", worker, done)
    return done
