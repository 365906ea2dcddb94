"""A small real model for the trading tests: an (untrained, seeded) MultiSymbolLSTM with a full ModelSpec on
real 4h candles, logged and registered in a temporary MLflow store exactly as training does, so the trader
loads it through the registry like a champion. Its entry threshold is a quantile of its own probabilities on
the replayed bars, so it trades a few times; its exits are a stop-loss, a take-profit and a time stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pricelevel.data.folder import CandleFolder
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.inference.scoring import predict_tables, tables_for_spec
from pricelevel.levels.config import LevelsConfig
from pricelevel.ml.dataset import fit_normalization
from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.spec import POOLED, ModelSpec
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import ensure_experiment, log_pricelevel_model, mlflow_client
from pricelevel.registry.versions import ALIAS_CHAMPION, register_version, set_alias
from tests.conftest import SAMPLE

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
ROWS = 700  # 4h candles per symbol (~4 months): enough history for the levels, quick to rebuild every bar
REPLAY_BARS = 60
SEQ_LEN = 8
LEVELS = LevelsConfig.model_validate(
    {"window": 6, "eps_frac": 0.01, "min_samples": 3, "lookback_days": 60, "refit_every": 6,
     "filters": {"volume": {"factor": 0.8}}}
)
LABELS = LabelsConfig(kind="forward_move", move_frac=0.03, horizon=6)
FEATURES = ("log_range", "level_distance")
FEATURE_CONFIG = FeaturesConfig(set="trading", sets={"trading": (*FEATURES, "symbol")})


def write_folder(folder: Path, symbols: tuple[str, ...] = SYMBOLS, rows: int = ROWS) -> Path:
    """The first ``rows`` 4h candles of each symbol and the 1d/1h candles of the same period."""
    folder.mkdir(parents=True, exist_ok=True)
    for symbol in symbols:
        h4 = pd.read_parquet(SAMPLE / f"{symbol}_4h.parquet").iloc[:rows]
        end = h4["timestamp"].iloc[-1] + pd.Timedelta(hours=4)
        h4.to_parquet(folder / f"{symbol}_4h.parquet")
        for tf in ("1d", "1h"):
            frame = pd.read_parquet(SAMPLE / f"{symbol}_{tf}.parquet")
            frame[frame["timestamp"] < end].to_parquet(folder / f"{symbol}_{tf}.parquet")
    return folder


@dataclass(frozen=True)
class TinyModel:
    tracking: TrackingConfig
    folder: Path
    spec: ModelSpec
    version: str
    replay_start: pd.Timestamp
    name: str = "pricelevel"

    @property
    def champion(self) -> str:
        return f"models:/{self.name}@champion"


def _spec(module: MultiSymbolLSTM, normalization, rules: dict) -> ModelSpec:
    return ModelSpec(
        symbols=SYMBOLS, features=FEATURES, seq_len=SEQ_LEN, timeframe="4h", horizon=LABELS.horizon,
        normalization=normalization, levels=LEVELS.model_dump(mode="json"), labels=LABELS.model_dump(mode="json"),
        hparams=dict(module.hparams), feature_config=FEATURE_CONFIG.model_dump(mode="json"), rules=rules,
    )


def build_model(seed: int = 0, quantile: float = 0.8, rules: dict | None = None, folder: CandleFolder | None = None,
                ) -> tuple[MultiSymbolLSTM, ModelSpec, pd.Timestamp]:
    """The module, its spec (rules included) and the first replayed bar."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    module = MultiSymbolLSTM(n_features=len(FEATURES), n_symbols=len(SYMBOLS), embedding_dim=3, hidden_size=4,
                             num_layers=1).eval()
    draft = _spec(module, {POOLED: None}, {"threshold": 0.5})
    tables = tables_for_spec(folder, draft)
    cut = tables[SYMBOLS[0]].frame.timestamps[ROWS // 2]
    normalization = fit_normalization([tables[s].frame for s in SYMBOLS], cut)
    scored_spec = _spec(module, normalization, {"threshold": 0.5})

    def predict(features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(module(torch.from_numpy(features), torch.from_numpy(symbol_id))).numpy()

    start = tables[SYMBOLS[0]].frame.timestamps[-REPLAY_BARS]
    scored = predict_tables(predict, scored_spec, tables, since=start)
    threshold = float(np.quantile(scored["probability"], quantile))
    chosen = {"threshold": threshold, "sl_stop": 0.03, "tp_stop": 0.03, "max_hold_bars": 6, "sizing": "fraction",
              "fraction": 0.1, **(rules or {})}
    return module, _spec(module, normalization, chosen), start


def register_tiny_model(root: Path, alias: str = ALIAS_CHAMPION, **build) -> TinyModel:
    """Log and register the model in an SQLite MLflow store under ``root``; ``alias`` points at it."""
    folder = write_folder(root / "candles")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db",
                              artifact_location=str(root / "mlruns" / "artifacts"))
    module, spec, start = build_model(folder=CandleFolder.open(folder), **build)
    version = log_version(tracking, module, spec, alias)
    return TinyModel(tracking, folder, spec, version, start)


def log_version(tracking: TrackingConfig, module: MultiSymbolLSTM, spec: ModelSpec, alias: str | None,
                name: str = "pricelevel") -> str:
    client = mlflow_client(tracking)
    experiment_id = ensure_experiment(client, "pricelevel", tracking.artifact_location)
    run = client.create_run(experiment_id)
    example = {"features": np.zeros((2, SEQ_LEN, len(FEATURES)), dtype=np.float32),
               "symbol_id": np.array([0, 1], dtype=np.int64)}
    logged = log_pricelevel_model(client, run.info.run_id, module, spec, example)
    client.set_terminated(run.info.run_id)
    version = register_version(client, name, logged, run.info.run_id, {})
    if alias:
        set_alias(client, name, alias, version.version)
    return str(version.version)
