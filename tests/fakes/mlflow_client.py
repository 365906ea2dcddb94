"""A client process of a shared MLflow server, run from its own folder (another machine, as far as it knows).

    python tests/fakes/mlflow_client.py register URI OUT_JSON   # two tiny models; v1 then v2 become @champion
    python tests/fakes/mlflow_client.py resolve URI OUT_JSON    # load @champion, predict the fixed input

Both write ``{"version": ..., "predictions": [...], "source": ...}``. The tracking config keeps its default
local ``artifact_location`` (``mlruns/artifacts``): with a server it must not be used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.spec import POOLED, FeatureStats, ModelSpec
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import ensure_experiment, load_model, log_pricelevel_model, mlflow_client
from pricelevel.registry.versions import move_champion, register_version

NAME = "pricelevel"
SEQ_LEN, N_FEATURES = 6, 3


def _input() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"features": rng.normal(size=(4, SEQ_LEN + 2, N_FEATURES)).astype(np.float32),
            "symbol_id": np.array([0, 1, -1, 0], dtype=np.int64)}


def _model(seed: int) -> tuple[MultiSymbolLSTM, ModelSpec]:
    torch.manual_seed(seed)
    module = MultiSymbolLSTM(n_features=N_FEATURES, n_symbols=2, hidden_size=4, num_layers=1).eval()
    spec = ModelSpec(
        symbols=("BTCUSDT", "ETHUSDT"), features=("log_return", "log_range", "level_distance"), seq_len=SEQ_LEN,
        timeframe="1h", horizon=1,
        normalization={"BTCUSDT": FeatureStats((0.0,) * 3, (1.0,) * 3), POOLED: FeatureStats((0.0,) * 3, (1.0,) * 3)},
        levels={"window": 12}, labels={"kind": "level_label", "threshold_frac": 0.001, "horizon": 1},
        hparams=dict(module.hparams), rules={"threshold": 0.5}, extra={},
    )
    return module, spec


def main(command: str, uri: str, out: str) -> None:
    torch.set_num_threads(1)
    tracking = TrackingConfig(tracking_uri=uri)  # artifact_location: the default local path
    client = mlflow_client(tracking)
    result: dict = {}
    if command == "register":
        experiment = ensure_experiment(client, "pricelevel", tracking.artifact_location)
        result["artifact_location"] = client.get_experiment(experiment).artifact_location
        for seed in (1, 2):
            module, spec = _model(seed)
            run = client.create_run(experiment)
            logged = log_pricelevel_model(client, run.info.run_id, module, spec, _input())
            client.set_terminated(run.info.run_id)
            version = register_version(client, NAME, logged, run.info.run_id, {"seed": str(seed)})
            move_champion(client, NAME, version.version)
    loaded = load_model(f"models:/{NAME}@champion", client)
    inputs = _input()
    result |= {"version": loaded.version, "predictions": loaded.predict(inputs["features"], inputs["symbol_id"]).tolist(),
               "source": client.get_model_version(NAME, loaded.version).source}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
