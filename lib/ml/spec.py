"""Everything needed to turn candles into the inputs a trained model expects, stored beside its weights.

A registered model carries its :class:`ModelSpec`, so scoring a new data folder (backtest, promotion, live
trading) recomputes levels and features exactly as training did, from that data alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pricelevel.core.timeframes import Timeframe
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.features.tables import TableSpec
from pricelevel.levels.config import LevelsConfig
from pricelevel.strategy.rules import StrategyRules

#: Normalisation key used for symbols the model was not trained on (statistics pooled over all symbols).
POOLED = "*"


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and standard deviation, fitted on the training segment only."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, features: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((features - mean) / std).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ModelSpec:
    """How inputs are built for one trained model; JSON round-trips exactly."""

    symbols: tuple[str, ...]
    #: Feature columns, in the order of the model's input (``FeaturesConfig`` groups expanded).
    features: tuple[str, ...]
    seq_len: int
    timeframe: str
    horizon: int
    #: ``symbol -> stats`` plus :data:`POOLED` for unseen symbols.
    normalization: dict[str, FeatureStats]
    #: ``LevelsConfig`` and ``LabelsConfig`` as dumped by pydantic (``mode="json"``).
    levels: dict[str, Any]
    labels: dict[str, Any]
    #: ``MultiSymbolLSTM`` constructor arguments.
    hparams: dict[str, Any]
    #: The decision rules chosen on validation (:class:`~pricelevel.strategy.rules.StrategyRules`, dumped):
    #: every backtest of this model, the promotion flow and the trader trade with these.
    rules: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``FeaturesConfig`` as dumped by pydantic: how the ``features`` columns are computed (the set's name,
    #: its context timeframes). Empty for a model from before feature sets: ``features`` alone then.
    feature_config: dict[str, Any] = field(default_factory=dict)

    def features_config(self) -> FeaturesConfig:
        """The feature settings to recompute this model's inputs with."""
        if self.feature_config:
            return FeaturesConfig.model_validate(self.feature_config)
        return FeaturesConfig(set="model", sets={"model": self.features})

    def table_spec(self) -> TableSpec:
        """How to build this model's feature tables from any candles, exactly as in training."""
        return TableSpec(
            Timeframe(self.timeframe), LevelsConfig.model_validate(self.levels),
            LabelsConfig.model_validate(self.labels), self.features_config(),
        )

    def strategy_rules(self) -> StrategyRules:
        """The model's own decision rules (``ValueError`` for a model saved before rules were chosen)."""
        if not self.rules:
            raise ValueError("this model was registered before decision rules were stored with models; retrain it")
        return StrategyRules.model_validate(self.rules)

    def symbol_id(self, symbol: str) -> int:
        """Index into the embedding; ``-1`` for a symbol the model never saw (it gets the mean embedding)."""
        return self.symbols.index(symbol) if symbol in self.symbols else -1

    def stats_for(self, symbol: str) -> FeatureStats:
        return self.normalization.get(symbol, self.normalization[POOLED])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        raw["symbols"] = tuple(raw["symbols"])
        raw["features"] = tuple(raw["features"])
        raw.pop("threshold", None)  # models from before rules were chosen on validation carried only this
        raw["normalization"] = {
            k: FeatureStats(tuple(v["mean"]), tuple(v["std"])) for k, v in raw["normalization"].items()
        }
        return cls(**raw)
