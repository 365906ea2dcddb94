"""Optuna search over the model's hyper-parameters: TPE sampler, median pruner, persisted study.

The objective is ``tuning.metric`` (e.g. ``val_pr_auc``), the same name early stopping monitors and the
promotion gate compares. A study is stored under a name that includes the inputs' key, so re-running with
the same inputs resumes it (and does nothing once ``n_trials`` have finished), while new data starts a new one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pricelevel.backtest.selection import StrategyContext
from pricelevel.core.cache import code_fingerprint, step_key
from pricelevel.core.runlog import RunLog, TrialObserver
from pricelevel.ml.config import ModelConfig, SearchSpace, TuningConfig
from pricelevel.ml.dataset import DatasetPlan, SymbolTable, TrainingData
from pricelevel.ml.fit import train, with_params
from pricelevel.ml.walkforward import fit_fold, folds_value

#: The model keys the search sets; everything else comes from ``model:``.
SEARCHED = ("hidden_size", "num_layers", "dropout", "learning_rate", "batch_size", "seq_len")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    return {
        "hidden_size": trial.suggest_categorical("hidden_size", list(space.hidden_size)),
        "num_layers": trial.suggest_int("num_layers", *space.num_layers),
        "dropout": trial.suggest_float("dropout", *space.dropout),
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
        "seq_len": trial.suggest_categorical("seq_len", list(space.seq_len)),
    }


def open_study(
    storage: str, study_name: str, tuning: TuningConfig, direction: Literal["minimize", "maximize"] | None = None
) -> optuna.Study:
    """Create or resume the study (TPE seeded, median pruner); ``direction`` defaults to the tuned metric's."""
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction=direction or tuning.direction,
        sampler=optuna.samplers.TPESampler(seed=tuning.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=tuning.pruner_startup_trials, n_warmup_steps=tuning.pruner_warmup_epochs
        ),
        load_if_exists=True,
    )


@dataclass(frozen=True)
class StudySummary:
    key: str
    study_name: str
    metric: str
    direction: str
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    trials_complete: int
    trials_pruned: int
    trials_run_now: int
    trials: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


#: What one trial computes: ``objective(params, trial_dir, pruning_callbacks, on_epoch) -> value``. The pruning
#: callbacks belong in the trial's first fit; ``on_epoch(epoch, metrics)`` reports its per-epoch metrics.
Objective = Callable[[dict[str, Any], Path, tuple, Callable[[int, dict[str, float]], None] | None], float]


def fit_objective(data_for: Callable[[int], TrainingData], model: ModelConfig, tuning: TuningConfig) -> Objective:
    """One fit per trial, valued by its best ``tuning.metric`` (``data_for(seq_len)``: the dataset for a window
    length; all of them share one split)."""

    def objective(params, trial_dir, callbacks, on_epoch) -> float:
        result = train(data_for(params["seq_len"]), with_params(model, params), tuning, tuning.max_epochs, trial_dir,
                       extra_callbacks=callbacks, epoch_callback=on_epoch)
        return result.best_score

    return objective


def run_study(
    study: optuna.Study, objective: Objective, tuning: TuningConfig, work_dir: Path, observer: TrialObserver | None = None
) -> StudySummary:
    """Run the trials the study still lacks (``n_trials`` minus those finished), then summarise it. Each trial
    gets the pruning callback on ``tuning.metric`` when the tuned metric and the study point the same way."""
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    remaining = max(0, tuning.n_trials - done)
    prunable = study.direction.name.lower() == tuning.direction

    def trial_value(trial: optuna.Trial) -> float:
        params = suggest(trial, tuning.space)
        if observer:
            observer.trial_started(trial.number, params)
        state, value = "fail", None
        trial_dir = work_dir / f"trial-{trial.number}"
        callbacks = (PyTorchLightningPruningCallback(trial, monitor=tuning.metric),) if prunable else ()
        on_epoch = (lambda epoch, m: observer.epoch_ended(trial.number, epoch, m)) if observer else None
        try:
            value = objective(params, trial_dir, callbacks, on_epoch)
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
            if observer:
                observer.trial_ended(trial.number, state, value)

    if remaining:
        study.optimize(trial_value, n_trials=remaining, timeout=tuning.timeout_s, gc_after_trial=True)
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    return summarize(study, tuning, finished - done, key=study.user_attrs.get("pricelevel.key", ""))


def summarize(study: optuna.Study, tuning: TuningConfig, run_now: int, key: str = "") -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no trial completed ({len(trials)} tried); see the trial logs")
    best = study.best_trial
    return StudySummary(
        key=key,
        study_name=study.study_name,
        metric=tuning.metric,
        direction=tuning.direction,
        best_value=float(best.value),
        best_params=dict(best.params),
        best_trial=best.number,
        trials_complete=len(complete),
        trials_pruned=sum(1 for t in trials if t.state == TrialState.PRUNED),
        trials_run_now=run_now,
        trials=[
            {"number": t.number, "state": t.state.name, "value": t.value, **t.params,
             "epochs": len(t.intermediate_values)}
            for t in trials
        ],
    )


def tune_key(plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext) -> str:
    """Names the study: the dataset, the model and tuning settings, the strategy search it ranks by, the code."""
    return step_key(
        "tune", dataset=plan.key, model=model.model_dump(mode="json"), tuning=tuning.model_dump(mode="json"),
        costs=strategy.costs.model_dump(mode="json"), selection=strategy.selection.model_dump(mode="json"),
        base=strategy.base.model_dump(mode="json"), code=code_fingerprint(run_study, walk_forward_objective),
    )


def walk_forward_objective(
    plan: DatasetPlan, tables: Mapping[str, SymbolTable], model: ModelConfig, tuning: TuningConfig,
    strategy: StrategyContext,
) -> Objective:
    """A trial's value: train every walk-forward fold, choose its rules on its validation segment, and combine
    the folds' validation strategy metrics (``selection.aggregate``): what the promotion gate judges, not a
    proxy. Test segments are never looked at. Pruning watches the first fold's epochs."""

    def objective(params, trial_dir, callbacks, on_epoch) -> float:
        fits = [
            fit_fold(
                plan, tables, k, int(params["seq_len"]), with_params(model, params), tuning, tuning.max_epochs,
                trial_dir / f"fold-{k}", strategy, extra_callbacks=callbacks if k == 0 else (),
                epoch_callback=(lambda epoch, m, k=k: on_epoch(k * tuning.max_epochs + epoch, m)) if on_epoch else None,
            )
            for k in range(len(plan.folds))
        ]
        return folds_value(fits, strategy.selection.aggregate)

    return objective


def tune_step(
    plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext, storage: str,
    work_dir: Path, run: RunLog | None,
) -> StudySummary:
    """Run the study's missing trials (resumed when these inputs were tuned before; a no-op once complete)
    and log the summary and best parameters to ``run`` (``None``: log nothing, the run exists already)."""
    key = tune_key(plan, model, tuning, strategy)
    study_name = f"{tuning.study_name}-{key}"
    study = open_study(storage, study_name, tuning, direction="maximize")
    study.set_user_attr("pricelevel.key", key)
    objective = walk_forward_objective(plan, plan.load(), model, tuning, strategy)
    summary = run_study(study, objective, tuning, work_dir / key, run.trials(study_name) if run else None)
    summary = replace(summary, metric=objective_name(strategy, len(plan.folds)), direction="maximize")
    if run is not None:
        run.log_json(summary.to_dict(), "study_summary.json")
        run.log_params({f"best.{k}": v for k, v in summary.best_params.items()})
        run.log_metrics({"best_trial_value": summary.best_value})
    return summary


def objective_name(strategy: StrategyContext, folds: int) -> str:
    selection = strategy.selection
    return f"val_{selection.metric}_{selection.aggregate}_of_{folds}_folds"
