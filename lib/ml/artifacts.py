"""A trained model as files: for each walk-forward fold, its weights, the :class:`ModelSpec` that rebuilds its
inputs (and holds the decision rules chosen on the fold's validation segment), the fit's history, its
validation and test predictions, the rule search, the level rule's chosen parameters, and an input example;
all in one derived-store folder named by the model's key. The newest fold's model is the one registered.
"""

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
from pricelevel.ml.dataset import DatasetPlan, SymbolTable, TrainingData, WindowDataset, labels_at
from pricelevel.ml.model import MultiSymbolLSTM, predict_proba
from pricelevel.ml.spec import ModelSpec

WEIGHTS, SPEC, RESULT, EXAMPLE, SELECTION = "weights.pt", "spec.json", "result.json", "input_example.npz", "selection.json"
SEGMENTS = ("val", "test")


def build_spec(
    plan: DatasetPlan, data: TrainingData, hparams: Mapping[str, Any], rules: Mapping[str, Any], extra: Mapping[str, Any]
) -> ModelSpec:
    """Everything needed to turn candles into this model's inputs and its probabilities into trades."""
    bounds = data.bounds
    return ModelSpec(
        symbols=data.symbols, features=plan.spec.columns, seq_len=data.train.seq_len,
        timeframe=str(plan.spec.timeframe), horizon=plan.spec.labels.horizon,
        normalization=dict(data.normalization), levels=plan.spec.levels.model_dump(mode="json"),
        labels=plan.spec.labels.model_dump(mode="json"), hparams=dict(hparams), rules=dict(rules),
        feature_config=plan.spec.features.model_dump(mode="json"),
        extra={
            "train_end": str(bounds.train_end), "val_start": str(bounds.val_start), "val_end": str(bounds.val_end),
            "test_start": str(bounds.test_start), "test_end": None if bounds.test_end is None else str(bounds.test_end),
            "train_positive_rate": float(np.mean(data.train.targets())), **extra,
        },
    )


def predictions(module: MultiSymbolLSTM, windows: WindowDataset, tables: Mapping[str, SymbolTable]) -> pd.DataFrame:
    """One row per window: ``symbol, timestamp`` of its last bar, ``probability``, ``target``, ``near_level``."""
    rows = windows.ends()
    rows["probability"] = predict_proba(module, windows)
    rows["target"] = windows.targets().astype(np.float64)
    rows["near_level"] = labels_at(tables, rows, "near_level")
    return rows


def input_example(data: TrainingData) -> dict[str, np.ndarray]:
    """One window as the pyfunc takes it (documentation stored with the model, not data)."""
    features, symbol_id, _ = data.test[0] if len(data.test) else data.train[0]
    return {"features": features.numpy()[None, ...].astype(np.float32), "symbol_id": np.array([int(symbol_id)], np.int64)}


@dataclass(frozen=True)
class FoldModel:
    """One fold's model folder, read lazily."""

    folder: Path

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_json((self.folder / SPEC).read_text())

    @property
    def result(self) -> dict[str, Any]:
        return json.loads((self.folder / RESULT).read_text())

    @property
    def selection(self) -> dict[str, Any]:
        """The rule search on validation: the model's and the level rule's (every candidate, the chosen)."""
        return json.loads((self.folder / SELECTION).read_text())

    def module(self) -> MultiSymbolLSTM:
        module = MultiSymbolLSTM(**self.spec.hparams)
        module.load_state_dict(torch.load(self.folder / WEIGHTS, map_location="cpu", weights_only=True))
        return module.eval()

    def predictions(self, segment: str) -> pd.DataFrame:
        return pd.read_parquet(self.folder / f"{segment}_predictions.parquet")

    def input_example(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / EXAMPLE) as saved:
            return {name: saved[name] for name in saved.files}

    def save(
        self, module: MultiSymbolLSTM, spec: ModelSpec, result: Mapping[str, Any], scored: Mapping[str, pd.DataFrame],
        selection: Mapping[str, Any], example: Mapping[str, np.ndarray],
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), self.folder / WEIGHTS)
        (self.folder / SPEC).write_text(spec.to_json())
        write_json(self.folder / RESULT, result)
        write_json(self.folder / SELECTION, selection)
        for segment, frame in scored.items():
            frame.to_parquet(self.folder / f"{segment}_predictions.parquet", index=False)
        np.savez(self.folder / EXAMPLE, **example)


@dataclass(frozen=True)
class TrainedModel:
    """A model folder of the derived store: one :class:`FoldModel` per walk-forward fold; tasks pass this
    (paths), not modules. The newest fold's model is the one that is registered and traded."""

    key: str
    folder: Path
    built: bool
    folds: int

    def fold(self, index: int) -> FoldModel:
        return FoldModel(self.folder / f"fold-{range(self.folds)[index]}")

    @property
    def newest(self) -> FoldModel:
        return self.fold(-1)

    @property
    def spec(self) -> ModelSpec:
        return self.newest.spec

    def describe(self, metric: str) -> str:
        results = [self.fold(k).result for k in range(self.folds)]
        best = ", ".join(f"{r['best_score']:.4f}@{r['best_epoch']}" for r in results)
        r = results[-1]
        return (f"model {self.key}: {'trained' if self.built else 'reused'}; {self.folds} fold(s), best {metric} "
                f"(at epoch) {best}; {r['train_samples_per_second']:.0f} train samples/s on {r['device']}")
