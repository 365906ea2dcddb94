"""Optuna search over the model's hyper-parameters: TPE sampler, median pruner, persisted study.

The objective is ``tuning.metric`` (e.g. ``val_pr_auc``), the same name early stopping monitors and the
promotion gate compares. A study is stored under a name that includes the inputs' key, so re-running with
the same inputs resumes it (and does nothing once ``n_trials`` have finished), while new data starts a new one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pricelevel.core.cache import code_fingerprint, step_key
from pricelevel.core.runlog import RunLog, TrialObserver
from pricelevel.ml.config import ModelConfig, SearchSpace, TuningConfig
from pricelevel.ml.dataset import DatasetPlan, TrainingData
from pricelevel.ml.fit import train, with_params

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


def open_study(storage: str, study_name: str, tuning: TuningConfig) -> optuna.Study:
    """Create or resume the study (TPE seeded, median pruner)."""
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction=tuning.direction,
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


def run_study(
    study: optuna.Study,
    data_for: Callable[[int], TrainingData],
    model: ModelConfig,
    tuning: TuningConfig,
    work_dir: Path,
    observer: TrialObserver | None = None,
) -> StudySummary:
    """Run the trials the study still lacks (``n_trials`` minus those finished), then summarise it.

    ``data_for(seq_len)`` returns the dataset for a window length; all of them share one split.
    """
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED)
    remaining = max(0, tuning.n_trials - done)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, tuning.space)
        if observer:
            observer.trial_started(trial.number, params)
        state, value = "fail", None
        checkpoint_dir = work_dir / f"trial-{trial.number}"
        try:
            result = train(
                data_for(params["seq_len"]), with_params(model, params), tuning, tuning.max_epochs, checkpoint_dir,
                extra_callbacks=(PyTorchLightningPruningCallback(trial, monitor=tuning.metric),),
                epoch_callback=(lambda epoch, m: observer.epoch_ended(trial.number, epoch, m)) if observer else None,
            )
            state, value = "complete", result.best_score
            return result.best_score
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            if observer:
                observer.trial_ended(trial.number, state, value)

    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=tuning.timeout_s, gc_after_trial=True)
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


def tune_key(plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig) -> str:
    """Names the study: the dataset, the model and tuning settings, the tuning code."""
    return step_key(
        "tune", dataset=plan.key, model=model.model_dump(mode="json"), tuning=tuning.model_dump(mode="json"),
        code=code_fingerprint(run_study),
    )


def tune_step(
    plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, storage: str, work_dir: Path, run: RunLog | None
) -> StudySummary:
    """Run the study's missing trials (resumed when these inputs were tuned before; a no-op once complete)
    and log the summary and best parameters to ``run`` (``None``: log nothing, the run exists already)."""
    key = tune_key(plan, model, tuning)
    tables = plan.load()
    by_seq_len: dict[int, TrainingData] = {}

    def data_for(seq_len: int) -> TrainingData:
        if seq_len not in by_seq_len:
            by_seq_len[seq_len] = plan.training_data(seq_len, tables)
        return by_seq_len[seq_len]

    study_name = f"{tuning.study_name}-{key}"
    study = open_study(storage, study_name, tuning)
    study.set_user_attr("pricelevel.key", key)
    summary = run_study(study, data_for, model, tuning, work_dir / key, run.trials(study_name) if run else None)
    if run is not None:
        run.log_json(summary.to_dict(), "study_summary.json")
        run.log_params({f"best.{k}": v for k, v in summary.best_params.items()})
        run.log_metrics({f"best_trial_{tuning.metric}": summary.best_value})
    return summary
