"""Training-spine speed on the bundled data; prints JSON.

- walk-forward levels (seed config, 1d/4h/1h context) on BTCUSDT 1h: seconds;
- training throughput of MultiSymbolLSTM (train windows per second, data loading included) for the seed
  model and the demo-sized one with as many inputs as the configured feature set, on whatever ``accelerator: auto`` picks (CUDA with bf16 when present).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train.py [--batches 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pricelevel.config import load_project_config
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.features.catalogue import feature_columns
from pricelevel.levels.history import read_context
from pricelevel.levels.walkforward import walk_forward_levels
from pricelevel.ml.config import ModelConfig
from pricelevel.ml.dataset import SymbolFrame, build_training_data
from pricelevel.ml.fit import fit_model
from pricelevel.ml.model import build_module

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def levels_seconds() -> dict[str, float]:
    config = load_project_config().levels
    folder = CandleFolder.open(SAMPLE)
    candles = folder.read("BTCUSDT", Timeframe.H1)
    context = read_context(folder, "BTCUSDT", config)
    started = time.perf_counter()
    history = walk_forward_levels(candles, Timeframe.H1, config, context)
    return {"bars": len(candles), "refits": len(history.refits), "seconds": round(time.perf_counter() - started, 3)}


def throughput(model: ModelConfig, seq_len: int, batches: int, n_features: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    n = 40_000
    frames = [
        SymbolFrame(
            symbol=s, timestamps=pd.date_range("2021-01-01", periods=n, freq="1h", tz="UTC"),
            features=rng.standard_normal((n, n_features)).astype(np.float32),
            target=(rng.random(n) < 0.05).astype(np.float32),
        )
        for s in ("AAAUSDT", "BBBUSDT")
    ]
    data = build_training_data(frames, seq_len, 0.1, 0.1, seq_len + 1)
    module = build_module(n_features, 2, model, pos_weight=19.0, monitor="val_pr_auc")
    config = model.model_copy(update={"limit_train_batches": batches, "limit_val_batches": 2})
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_model(data.train, data.val, module, config, monitor="val_pr_auc", direction="maximize",
                           max_epochs=1, checkpoint_dir=Path(tmp))
    return {"features": n_features, "hidden_size": model.hidden_size, "num_layers": model.num_layers, "seq_len": seq_len,
            "batch_size": model.batch_size, "device": result.device,
            "train_samples_per_second": round(result.train_samples_per_second, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    # The searchable keys are null in ModelConfig (chosen by the tuner): the seed-sized architecture, written out.
    seed = ModelConfig(hidden_size=128, num_layers=3, dropout=0.2, learning_rate=1e-3, batch_size=256)
    demo = seed.model_copy(update={"hidden_size": 32, "num_layers": 1})
    config = load_project_config()
    n_features = len(feature_columns(config.features, config.dataset.timeframe))  # the configured set at 1h
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "levels_btcusdt_1h": levels_seconds(),
        "train_seed_model": throughput(seed, 80, args.batches, n_features),
        "train_demo_model": throughput(demo, 32, args.batches * 4, n_features),
    }, indent=2))


if __name__ == "__main__":
    main()
