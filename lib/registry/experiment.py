"""The MLflow side of one training run: a parent run found by its key, nested runs for Optuna trials, and
the training chain's tracking steps (start the run, register the model, end the run).

Everything goes through an explicit ``MlflowClient`` and run ids (no fluent, process-global active run),
so tasks running in threads cannot log into each other's runs. A :class:`TrainingRun` pickles as its
addresses (URIs and ids) and opens its own client where it is used, so a task on another worker can log.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pricelevel.backtest.selection import StrategyContext
from pricelevel.core.cache import code_fingerprint, step_key
from pricelevel.inference.scoring import backtest_step
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.config import ModelConfig, TuningConfig
from pricelevel.ml.dataset import DatasetPlan
from pricelevel.ml.evaluation import evaluate_step
from pricelevel.ml.tuning import tune_key
from pricelevel.ml.walkforward import model_key
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.orphans import PARENT_TAG, FlowRunEnded, Owner, end_orphaned_runs, owner_tags
from pricelevel.registry.tracking import (
    ensure_experiment,
    lineage_tags,
    log_pricelevel_model,
    mlflow_client,
    run_params,
)
from pricelevel.registry.versions import ALIAS_CHALLENGER, find_version_by_tag, register_version, set_alias

#: Tag holding the key of the inputs a run was made from (data, config, code): finding it makes re-runs no-ops.
RUN_KEY_TAG = "pricelevel.run_key"


@dataclass
class TrainingRun:
    """An MLflow run addressed by id; batch logging; numbers that are not finite are skipped."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    _client: MlflowClient | None = field(default=None, repr=False, compare=False)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # a client holds connections: each process opens its own

    @classmethod
    def find_or_create(
        cls, client: MlflowClient, experiment_id: str, key: str, run_name: str, tags: Mapping[str, str]
    ) -> tuple[TrainingRun, bool]:
        """The finished run made from ``key`` if there is one (``created`` False), else a new one."""
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return cls(client.tracking_uri, experiment_id, found[0].info.run_id, client), False
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key})
        return cls(client.tracking_uri, experiment_id, run.info.run_id, client), True

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for first in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[first:first + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        for first in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[first:first + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, payload: Mapping[str, Any], name: str, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
            self.log_artifact(path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def trials(self, study_name: str) -> TrialRuns:
        return TrialRuns(self, study_name)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TrialRuns:
    """Optuna trial observer: each trial is a nested MLflow run under the training run."""

    def __init__(self, parent: TrainingRun, study_name: str) -> None:
        self.parent = parent
        self.study_name = study_name
        self.runs: dict[int, TrainingRun] = {}

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        client = self.parent.client
        run = client.create_run(
            self.parent.experiment_id, run_name=f"trial-{number}",
            tags={PARENT_TAG: self.parent.run_id, "optuna.study": self.study_name, "optuna.trial": str(number)},
        )
        trial = TrainingRun(client.tracking_uri, self.parent.experiment_id, run.info.run_id, client)
        trial.log_params(params)
        self.runs[number] = trial

    def epoch_ended(self, number: int, epoch: int, metrics: dict[str, float]) -> None:
        self.runs[number].log_metrics(metrics, step=epoch)

    def trial_ended(self, number: int, state: str, value: float | None) -> None:
        trial = self.runs.pop(number)
        trial.set_tags({"optuna.state": state})
        if value is not None:
            trial.log_metrics({"objective": value})
        trial.finish("FAILED" if state == "fail" else "KILLED" if state == "pruned" else "FINISHED")


# ------------------------------------------------------------------------------- the training chain's steps


@dataclass(frozen=True)
class RunKeys:
    """The keys of everything a training run computes, derived from its inputs before anything runs."""

    tune: str
    model: str
    run: str


def training_keys(plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, strategy: StrategyContext) -> RunKeys:
    """Tuning -> model -> run: the run adds the code of the steps after training (evaluation, backtest, register)."""
    tune = tune_key(plan, model, tuning, strategy)
    model_ = model_key(tune, strategy)
    run = step_key(
        "run", model=model_, backtest=strategy.costs.model_dump(mode="json"),
        code=code_fingerprint(evaluate_step, backtest_step, register_step),
    )
    return RunKeys(tune, model_, run)


@dataclass(frozen=True)
class StartedRun:
    run: TrainingRun
    #: False when these inputs were trained before: the finished run is reused and nothing is logged again.
    created: bool
    keys: RunKeys
    #: Runs left RUNNING by a process that died, ended as FAILED on the way: {run id: why}.
    ended_orphans: Mapping[str, str] = field(default_factory=dict)

    @property
    def log(self) -> TrainingRun | None:
        """The run to log to, or ``None`` when it is a reused, finished one."""
        return self.run if self.created else None


def start_run_step(
    tracking: TrackingConfig,
    plan: DatasetPlan,
    keys: RunKeys,
    params: Mapping[str, object],
    data_files: list[Path],
    seed: int,
    project_root: Path,
    lookahead_report: Mapping[str, Any] | None = None,
    flow_run_id: str | None = None,
    flow_run_ended: FlowRunEnded = lambda flow_run: None,
) -> StartedRun:
    """The MLflow run for these inputs: the finished one if it exists, else a new one with the flattened
    config as params, lineage tags, the dataset summary and the look-ahead check's report. Training runs a dead
    process left RUNNING are ended first (:mod:`pricelevel.registry.orphans`; ``flow_run_ended`` asks the
    orchestrator about ``flow_run_id``-tagged runs from other hosts)."""
    client = mlflow_client(tracking)
    experiment_id = ensure_experiment(client, tracking.experiment, tracking.artifact_location)
    orphans = end_orphaned_runs(client, experiment_id, RUN_KEY_TAG, f"ended by the training run of {Owner.current().tag()}",
                                flow_run_ended)
    features = plan.spec.features.set
    tags = lineage_tags(data_files, seed, project_root) | owner_tags(flow_run_id) | {
        "pricelevel.feature_set": features, "pricelevel.label": plan.spec.labels.kind,
    }
    run, created = TrainingRun.find_or_create(client, experiment_id, keys.run, f"train-{features}-{keys.run[:8]}", tags)
    if created:
        run.log_params(run_params(params))
        run.log_json(plan.summary | {"tune_key": keys.tune, "model_key": keys.model}, "dataset_summary.json")
        if lookahead_report is not None:
            run.log_json(lookahead_report, "lookahead_report.json")
    return StartedRun(run, created, keys, orphans)


def end_run_step(started: StartedRun, status: str) -> None:
    """End a run this flow created (``FAILED`` when the flow failed); a reused, finished run is left alone."""
    if started.created:
        started.run.finish(status)


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    #: False when a version made from the same inputs existed already.
    created: bool
    model_uri: str | None = None

    def markdown(self, metric: str, value: float, run_id: str) -> str:
        """The training run's result as the flow's Prefect artifact shows it."""
        return f"# `{self.name}` version {self.version} (@challenger)\n\n- {metric}: {value:.4f}\n- MLflow run `{run_id}`\n"


def register_step(
    started: StartedRun, trained: TrainedModel, plan: DatasetPlan, registered_model: str, tuned_metric: str,
    scores: Mapping[str, float],
) -> Registered:
    """Log the model (signature, input example, explicit pip requirements), register it as ``@challenger``,
    and finish the run; a version is never registered twice for the same inputs."""
    run = started.run
    client = run.client
    existing = find_version_by_tag(client, registered_model, RUN_KEY_TAG, started.keys.run)
    if existing is not None:
        return Registered(registered_model, str(existing.version), False)
    newest = trained.newest  # the model trained on the most data; the others were for the walk-forward report
    logged = log_pricelevel_model(client, run.run_id, newest.module(), newest.spec, newest.input_example())
    tags = {
        RUN_KEY_TAG: started.keys.run, "pricelevel.data_fingerprint": plan.data_fingerprint,
        "pricelevel.metric": tuned_metric, f"pricelevel.best_{tuned_metric}": f"{scores[f'best_{tuned_metric}']:.6f}",
    }
    version = register_version(client, registered_model, logged, run.run_id, tags)
    set_alias(client, registered_model, ALIAS_CHALLENGER, version.version)
    run.finish()
    return Registered(registered_model, str(version.version), True, f"models:/{logged.model_id}")
