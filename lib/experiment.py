"""The MLflow side of one training run: a parent run found by its key, nested runs for Optuna trials.

Everything goes through an explicit ``MlflowClient`` and run ids (no fluent, process-global active run),
so tasks running in threads cannot log into each other's runs.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

#: Tag holding the key of the inputs a run was made from (data, config, code): finding it makes re-runs no-ops.
RUN_KEY_TAG = "pricelevel.run_key"
PARENT_TAG = "mlflow.parentRunId"


class TrainingRun:
    """An MLflow run addressed by id; batch logging; numbers that are not finite are skipped."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id

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
            return cls(client, experiment_id, found[0].info.run_id), False
        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key})
        return cls(client, experiment_id, run.info.run_id), True

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
        trial = TrainingRun(client, self.parent.experiment_id, run.info.run_id)
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
