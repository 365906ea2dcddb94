"""Optuna search over the model's hyper-parameters: TPE sampler, median pruner, persisted study.

A trial's value is the strategy it makes (:func:`walk_forward_objective`): every walk-forward fold trained,
its rules chosen on its validation segment, and the folds' ``selection.metric`` (Sharpe after costs) combined
by ``selection.aggregate``; within a fit, early stopping and checkpoints watch ``tuning.metric`` (e.g.
``val_pr_auc``), the classification metric the promotion gate compares between models. A study is stored under a name that includes the inputs' key, so re-running with
the same inputs resumes it (and does nothing once ``n_trials`` have finished), while new data starts a new one.

Several workers (``tuning.workers``, processes on any machine) may share one study on a server database: the
study stops at ``n_trials`` finished trials in total, not per worker. A worker stops once the finished and
running trials reach ``n_trials`` (``MaxTrialsCallback``), a trial that finds that many ahead of it is dropped
before it computes anything (two workers asked at once), and a worker whose trial died with its process
waits for the heartbeat to fail it: Optuna then re-queues it (``RetryHeartbeatStaleTrialCallback``) for whoever is left.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pricelevel.backtest.selection import StrategyContext
from pricelevel.core.cache import code_fingerprint, step_key
from pricelevel.core.runlog import RunLog, TrialObserver
from pricelevel.ml.config import SEARCHABLE_MODEL_KEYS, ModelConfig, SearchSpace, TuningConfig
from pricelevel.ml.dataset import DatasetPlan, SymbolTable, TrainingData
from pricelevel.ml.fit import train, with_params
from pricelevel.ml.walkforward import fit_fold, folds_value

#: How the study is run, not what it computes: left out of its key, so 4 workers on PostgreSQL resume the study
#: one worker began (within one storage).
ORCHESTRATION_KEYS = frozenset({"storage", "workers", "heartbeat_s", "grace_s", "trial_retries"})
#: The keys a trial's parameters hold: the model's searchable keys and the window length. A model key fixed in
#: ``model:`` (:meth:`ModelConfig.fixed_params`) keeps its value and is not searched; the rest come from the space.
SEARCHED = (*SEARCHABLE_MODEL_KEYS, "seq_len")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: User attribute of a trial dropped because ``n_trials`` were already finished or running when it began.
SURPLUS = "pricelevel.surplus"


class SurplusTrial(Exception):
    """This trial would exceed ``n_trials``: ended as FAIL before anything is computed, and not counted."""


def suggest(trial: optuna.Trial, space: SearchSpace, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A trial's parameters: every key of :data:`SEARCHED`, the ``fixed`` ones as given (Optuna never sees
    them, so they are not in ``trial.params``), the others suggested from ``space``."""
    fixed = fixed or {}
    unknown = set(fixed) - set(SEARCHED)
    if unknown:
        raise ValueError(f"fixed parameters {sorted(unknown)} are not searched keys {SEARCHED}")
    suggesters: dict[str, Callable[[], Any]] = {
        "hidden_size": lambda: trial.suggest_categorical("hidden_size", list(space.hidden_size)),
        "num_layers": lambda: trial.suggest_int("num_layers", *space.num_layers),
        "dropout": lambda: trial.suggest_float("dropout", *space.dropout),
        "learning_rate": lambda: trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "batch_size": lambda: trial.suggest_categorical("batch_size", list(space.batch_size)),
        "seq_len": lambda: trial.suggest_categorical("seq_len", list(space.seq_len)),
    }
    return {key: fixed[key] if key in fixed else suggesters[key]() for key in SEARCHED}


def open_study(
    storage: str, study_name: str, tuning: TuningConfig, direction: Literal["minimize", "maximize"] | None = None,
    worker: int = 0,
) -> optuna.Study:
    """Create or resume the study (TPE seeded, median pruner); ``direction`` defaults to the tuned metric's.
    Trial worker ``worker`` seeds its sampler ``seed + worker``: with one seed, workers sampling at the same time
    draw the same parameters, and the second trial is wasted."""
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        storage=study_storage(storage, tuning),
        study_name=study_name,
        direction=direction or tuning.direction,
        sampler=optuna.samplers.TPESampler(seed=tuning.seed + worker),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=tuning.pruner_startup_trials, n_warmup_steps=tuning.pruner_warmup_epochs
        ),
        load_if_exists=True,
    )


def study_storage(storage: str, tuning: TuningConfig) -> str | RDBStorage:
    """A SQLite file as its URL; a server database with heartbeats, so a dead worker's trial is failed and
    re-queued (its parameters kept), and connections checked before use (servers drop idle ones)."""
    if storage.startswith("sqlite"):
        return storage
    return RDBStorage(
        storage, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=max(1, round(tuning.heartbeat_s)),
        grace_period=max(2, round(tuning.grace_s)),
        failed_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=tuning.trial_retries),
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
    #: Model keys fixed by the configuration (``model:``), not searched; they are in ``best_params`` too.
    fixed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def describe(self) -> str:
        fixed = (f"; fixed by model: {', '.join(f'{k}={v}' for k, v in self.fixed.items())} (not searched)"
                 if self.fixed else "")
        return (f"study {self.study_name}: {self.trials_run_now} trials now, {self.trials_complete} complete, "
                f"{self.trials_pruned} pruned; best {self.metric} = {self.best_value:.4f} with {self.best_params}{fixed}")


def check_fixed(model: ModelConfig, params: Mapping[str, Any]) -> None:
    """Refuse a trial whose parameters would overwrite a key ``model`` fixes (a study run without
    ``fixed=model.fixed_params()``): a configured value is used or refused, never silently replaced."""
    clash = {k: (v, params[k]) for k, v in model.fixed_params().items() if k in params and params[k] != v}
    if clash:
        key, (given, searched) = next(iter(clash.items()))
        raise ValueError(f"model.{key}={given} is fixed by the configuration but the trial searched {key}={searched}: "
                         "run the study with fixed=model.fixed_params()")


#: What one trial computes: ``objective(params, trial_dir, pruning_callbacks, on_epoch) -> value``. The pruning
#: callbacks belong in the trial's first fit; ``on_epoch(epoch, metrics)`` reports its per-epoch metrics.
Objective = Callable[[dict[str, Any], Path, tuple, Callable[[int, dict[str, float]], None] | None], float]


def fit_objective(data_for: Callable[[int], TrainingData], model: ModelConfig, tuning: TuningConfig) -> Objective:
    """One fit per trial, valued by its best ``tuning.metric`` (``data_for(seq_len)``: the dataset for a window
    length; all of them share one split)."""

    def objective(params, trial_dir, callbacks, on_epoch) -> float:
        check_fixed(model, params)
        result = train(data_for(params["seq_len"]), with_params(model, params), tuning, tuning.max_epochs, trial_dir,
                       extra_callbacks=callbacks, epoch_callback=on_epoch)
        return result.best_score

    return objective


def run_study(
    study: optuna.Study, objective: Objective, tuning: TuningConfig, work_dir: Path, observer: TrialObserver | None = None,
    run_workers: Callable[[], None] | None = None, fixed: Mapping[str, Any] | None = None,
) -> StudySummary:
    """Run the trials the study still lacks (``n_trials`` in total), then summarise it. ``run_workers`` runs
    ``tuning.workers`` calls of :func:`run_trials` elsewhere and returns when they are done; ``None``: this
    process is the only worker. ``fixed``: parameters not searched (:func:`suggest`)."""
    done = _count(study, FINISHED)
    if run_workers is not None and done < tuning.n_trials:
        run_workers()
    else:
        run_trials(study, objective, tuning, work_dir, observer, fixed=fixed)
    return summarize(study, tuning, _count(study, FINISHED) - done, key=study.user_attrs.get("pricelevel.key", ""),
                     fixed=fixed)


def run_trials(
    study: optuna.Study, objective: Objective, tuning: TuningConfig, work_dir: Path, observer: TrialObserver | None = None,
    poll_s: float = 1.0, fixed: Mapping[str, Any] | None = None,
) -> int:
    """One worker: run trials until ``n_trials`` have finished in the whole study (or ``timeout_s``); returns
    how many this worker finished. Each trial gets the pruning callback on ``tuning.metric`` when the tuned
    metric and the study point the same way; its parameters are ``fixed`` plus the searched rest.

    With heartbeats (a server database) the running trials of other workers count towards ``n_trials``: this
    worker waits while they run, and picks up the re-queued copy of one whose worker died. Without (SQLite,
    one worker), a trial left RUNNING can only be a dead one and is not counted."""
    beats = is_heartbeat_enabled(study._storage)  # Optuna offers no public accessor of a study's storage
    counted = (*FINISHED, TrialState.RUNNING) if beats else FINISHED
    prunable = study.direction.name.lower() == tuning.direction
    deadline = math.inf if tuning.timeout_s is None else time.monotonic() + tuning.timeout_s
    mine: list[int] = []

    def trial_value(trial: optuna.Trial) -> float:
        if beats and _ahead_of(study, trial) >= tuning.n_trials:
            trial.set_user_attr(SURPLUS, True)
            raise SurplusTrial(f"trial {trial.number}: {tuning.n_trials} trials finished or running already")
        params = suggest(trial, tuning.space, fixed)
        if observer:
            observer.trial_started(trial.number, params)
        state, value = "fail", None
        trial_dir = work_dir / f"trial-{trial.number}"
        callbacks = (PyTorchLightningPruningCallback(trial, monitor=tuning.metric),) if prunable else ()
        on_epoch = (lambda epoch, m: observer.epoch_ended(trial.number, epoch, m)) if observer else None
        try:
            value = objective(params, trial_dir, callbacks, on_epoch)
            state = "complete"
            mine.append(trial.number)
            return value
        except optuna.TrialPruned:
            state = "pruned"
            mine.append(trial.number)
            raise
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
            if observer:
                observer.trial_ended(trial.number, state, value)

    while time.monotonic() < deadline:
        if beats:
            fail_stale_trials(study)  # a dead worker's trial: FAIL, and a WAITING copy with its parameters
        if _count(study, FINISHED) >= tuning.n_trials:
            break
        if _count(study, counted) >= tuning.n_trials and not _count(study, (TrialState.WAITING,)):
            time.sleep(poll_s)  # the last trials run elsewhere; if their worker dies, they come back as WAITING
            continue
        timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        study.optimize(trial_value, timeout=timeout, catch=(SurplusTrial,), gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(tuning.n_trials, states=counted)])
    return len(mine)


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _ahead_of(study: optuna.Study, trial: optuna.Trial) -> int:
    """Trials finished, plus those running that were asked for before this one."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return _count(study, FINISHED) + sum(1 for t in running if t.number < trial.number)


def summarize(
    study: optuna.Study, tuning: TuningConfig, run_now: int, key: str = "", fixed: Mapping[str, Any] | None = None,
) -> StudySummary:
    """The study's outcome; ``best_params`` holds the ``fixed`` parameters too (what the final model uses)."""
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
        best_params={**(fixed or {}), **best.params},
        best_trial=best.number,
        trials_complete=len(complete),
        trials_pruned=sum(1 for t in trials if t.state == TrialState.PRUNED),
        trials_run_now=run_now,
        trials=[
            {"number": t.number, "state": t.state.name, "value": t.value, **t.params,
             "epochs": len(t.intermediate_values)}
            for t in trials if not t.user_attrs.get(SURPLUS)
        ],
        fixed=dict(fixed or {}),
    )


def tune_key(plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext) -> str:
    """Names the study: the dataset, the model and tuning settings, the strategy search it ranks by, the code."""
    return step_key(
        "tune", dataset=plan.key, model=model.model_dump(mode="json"),
        tuning=tuning.model_dump(mode="json", exclude=set(ORCHESTRATION_KEYS)),
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
        check_fixed(model, params)
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
    work_dir: Path, run: RunLog | None, run_workers: Callable[[], None] | None = None,
) -> StudySummary:
    """Run the study's missing trials (resumed when these inputs were tuned before; a no-op once complete)
    and log the summary and best parameters to ``run`` (``None``: log nothing, the run exists already).
    ``run_workers``: runs ``tuning.workers`` :func:`trial_worker_step` calls elsewhere (see :func:`run_study`)."""
    study, study_name = _study(plan, model, tuning, strategy, storage)
    objective = walk_forward_objective(plan, plan.load(), model, tuning, strategy)
    summary = run_study(study, objective, tuning, work_dir / study.user_attrs["pricelevel.key"],
                        run.trials(study_name) if run else None, run_workers, fixed=model.fixed_params())
    summary = replace(summary, metric=objective_name(strategy, len(plan.folds)), direction="maximize")
    if run is not None:
        run.log_json(summary.to_dict(), "study_summary.json")
        run.log_params({f"best.{k}": v for k, v in summary.best_params.items()})
        run.log_metrics({"best_trial_value": summary.best_value})
    return summary


def trial_worker_step(
    plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext, storage: str,
    work_dir: Path, run: RunLog | None, worker: int = 0,
) -> int:
    """One of ``tuning.workers`` trial workers of the study ``tune_step`` names: trials until ``n_trials`` have
    finished in total (each a nested run of ``run``); returns how many this worker finished."""
    study, study_name = _study(plan, model, tuning, strategy, storage, worker)
    objective = walk_forward_objective(plan, plan.load(), model, tuning, strategy)
    return run_trials(study, objective, tuning, work_dir / study.user_attrs["pricelevel.key"],
                      run.trials(study_name) if run else None, fixed=model.fixed_params())


def _study(
    plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext, storage: str,
    worker: int = 0,
) -> tuple[optuna.Study, str]:
    key = tune_key(plan, model, tuning, strategy)
    study_name = f"{tuning.study_name}-{key}"
    study = open_study(storage, study_name, tuning, direction="maximize", worker=worker)
    if study.user_attrs.get("pricelevel.key") != key:
        study.set_user_attr("pricelevel.key", key)
    return study, study_name


def objective_name(strategy: StrategyContext, folds: int) -> str:
    selection = strategy.selection
    return f"val_{selection.metric}_{selection.aggregate}_of_{folds}_folds"
