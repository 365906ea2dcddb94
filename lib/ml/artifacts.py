"""A trained model as files: weights, the :class:`ModelSpec` that rebuilds its inputs, the fit's history, its
test-segment predictions and an input example, in one derived-store folder named by the model's key."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pricelevel.core.files import write_json
from pricelevel.ml.dataset import DatasetPlan, SymbolTable, TrainingData, labels_at
from pricelevel.ml.model import MultiSymbolLSTM, predict_proba
from pricelevel.ml.spec import ModelSpec

WEIGHTS, SPEC, RESULT, PREDICTIONS, EXAMPLE = "weights.pt", "spec.json", "result.json", "test_predictions.parquet", "input_example.npz"


def build_spec(plan: DatasetPlan, data: TrainingData, hparams: Mapping[str, Any], threshold: float) -> ModelSpec:
    """Everything needed to turn candles into this model's inputs, as trained on ``data``."""
    return ModelSpec(
        symbols=data.symbols, features=plan.spec.columns, seq_len=data.train.seq_len,
        timeframe=str(plan.spec.timeframe), horizon=plan.spec.labels.horizon,
        normalization=dict(data.normalization), levels=plan.spec.levels.model_dump(mode="json"),
        labels=plan.spec.labels.model_dump(mode="json"), hparams=dict(hparams), threshold=threshold,
        feature_config=plan.spec.features.model_dump(mode="json"),
        extra={
            "train_end": str(data.bounds.train_end), "val_start": str(data.bounds.val_start),
            "test_start": str(data.bounds.test_start),
            "train_positive_rate": float(np.mean(data.train.targets())),
        },
    )


def test_predictions(module: MultiSymbolLSTM, data: TrainingData, tables: Mapping[str, SymbolTable]) -> pd.DataFrame:
    """One row per test window: ``symbol, timestamp`` of its last bar, ``probability``, ``target``, ``near_level``."""
    rows = data.test.ends()
    rows["probability"] = predict_proba(module, data.test)
    rows["target"] = data.test.targets().astype(np.float64)
    rows["near_level"] = labels_at(tables, rows, "near_level")
    return rows


def input_example(data: TrainingData) -> dict[str, np.ndarray]:
    """One window as the pyfunc takes it (documentation stored with the model, not data)."""
    features, symbol_id, _ = data.test[0] if len(data.test) else data.train[0]
    return {"features": features.numpy()[None, ...].astype(np.float32), "symbol_id": np.array([int(symbol_id)], np.int64)}


def save_trained(
    folder: Path, module: MultiSymbolLSTM, spec: ModelSpec, result: Mapping[str, Any],
    predictions: pd.DataFrame, example: Mapping[str, np.ndarray],
) -> None:
    torch.save(module.state_dict(), folder / WEIGHTS)
    (folder / SPEC).write_text(spec.to_json())
    write_json(folder / RESULT, result)
    predictions.to_parquet(folder / PREDICTIONS, index=False)
    np.savez(folder / EXAMPLE, **example)


@dataclass(frozen=True)
class TrainedModel:
    """A model folder of the derived store, read lazily: tasks pass this (paths), not the module."""

    key: str
    folder: Path
    built: bool

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_json((self.folder / SPEC).read_text())

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.folder / RESULT).read_text())

    def module(self) -> MultiSymbolLSTM:
        module = MultiSymbolLSTM(**self.spec.hparams)
        module.load_state_dict(torch.load(self.folder / WEIGHTS, map_location="cpu", weights_only=True))
        return module.eval()

    def predictions(self) -> pd.DataFrame:
        return pd.read_parquet(self.folder / PREDICTIONS)

    def input_example(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / EXAMPLE) as saved:
            return {name: saved[name] for name in saved.files}

    def describe(self, metric: str) -> str:
        r = self.result
        return (
            f"model {self.key}: {'trained' if self.built else 'reused'}; best {metric} {r['best_score']:.4f} at epoch "
            f"{r['best_epoch']} of {r['epochs_run']}; {r['train_samples_per_second']:.0f} train samples/s on {r['device']}"
        )
