"""The seed spread: the registered recipe's pooled validation metric for each of ``model.seeds`` trainings,
each seed a real, reproducible retraining; its summary and MLflow metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.selection import RuleRecipe, StrategyContext, ValidationFold, score_recipe
from pricelevel.backtest.trading import probability_matrix
from pricelevel.ml.config import ModelConfig, TuningConfig
from pricelevel.ml.dataset import SymbolFrame, build_training_data
from pricelevel.ml.fit import train
from pricelevel.ml.model import predict_proba
from pricelevel.ml.seeds import log_spread, save_spread, seed_spread, spread_metrics, spread_summary
from pricelevel.strategy.config import SelectionConfig
from pricelevel.strategy.rules import StrategyRules

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(
    hidden_size=4, num_layers=1, dropout=0.0, learning_rate=5e-3, embedding_dim=2, batch_size=32, max_epochs=1,
    patience=1, accelerator="cpu", precision="32-true", num_threads=1, limit_train_batches=4, limit_val_batches=2, seeds=3,
)
TUNING = TuningConfig(max_epochs=1, timeout_s=None)
RECIPE = RuleRecipe(entry_quantile=0.2, tp_stop="move", max_hold_bars="horizon")
STRATEGY = StrategyContext(BacktestConfig(), SelectionConfig(min_trades=1), StrategyRules(threshold=0.5), 0.03, 6)


def _setup():
    n, frames, candles = 300, [], []
    stamps = pd.date_range("2024-01-01", periods=n, freq="4h", tz="UTC")
    for seed, symbol in enumerate(("AAAUSDT", "BBBUSDT")):
        rng = np.random.default_rng(seed)
        features = rng.normal(size=(n, 2)).astype(np.float32)
        frames.append(SymbolFrame(symbol, stamps, features, (features[:, 0] > 0.5).astype(np.float32)))
        close = 100 * np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))
        open_ = np.r_[close[0], close[:-1]]
        candles.append(pd.DataFrame({"timestamp": stamps, "symbol": symbol, "open": open_, "close": close, "volume": 1.0,
                                     "high": np.maximum(open_, close) * 1.01, "low": np.minimum(open_, close) * 0.99}))
    data = build_training_data(frames, 6, 0.3, 0.1, embargo=7)
    frame = pd.concat(candles, ignore_index=True)
    market = market_from_candles(frame[(frame["timestamp"] >= data.bounds.val_start) & (frame["timestamp"] <= data.bounds.val_end)])
    return data, market


def _probability(data, market, seed: int, tmp: Path) -> np.ndarray:
    fit = train(data, MODEL.model_copy(update={"seed": seed}), TUNING, 1, tmp / f"check-{seed}")
    rows = data.val.ends()
    rows["probability"] = predict_proba(fit.module, data.val)
    return probability_matrix(market, rows)


def test_every_extra_seed_is_a_reproducible_retraining_scored_with_the_chosen_recipe(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data, market = _setup()
    main = ValidationFold(0, market, _probability(data, market, MODEL.seed, tmp_path), 0.03, 6)
    main_score = score_recipe(RECIPE, [main], STRATEGY.costs, STRATEGY.base).score.sharpe
    spread = seed_spread([(data, main)], RECIPE, main_score, MODEL, TUNING, 1, tmp_path / "seeds", STRATEGY)
    assert spread["seeds"] == [42, 43, 44] and spread["count"] == 3 and spread["values"][0] == main_score
    again = ValidationFold(0, market, _probability(data, market, 43, tmp_path), 0.03, 6)
    assert spread["values"][1] == pytest.approx(score_recipe(RECIPE, [again], STRATEGY.costs, STRATEGY.base).score.sharpe)
    assert len(set(spread["values"])) > 1  # the seeds trained different models
    assert spread["std"] == pytest.approx(np.std(spread["values"], ddof=1))
    assert spread["min"] <= spread["mean"] <= spread["max"]


class _Run:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.json: dict[str, object] = {}

    def log_metrics(self, metrics, step: int = 0) -> None:
        self.metrics |= dict(metrics)

    def log_json(self, payload, name: str, artifact_path: str | None = None) -> None:
        self.json[name] = payload


def test_the_spread_goes_to_mlflow_and_one_seed_has_no_std(tmp_path: Path) -> None:
    spread = spread_summary("sharpe", RECIPE, [42, 43, 44], [1.0, -0.5, 0.4], [None, 30, 31])
    assert spread["mean"] == pytest.approx(0.3) and spread["min"] == -0.5 and spread["max"] == 1.0
    save_spread(tmp_path, spread)
    run = _Run()
    assert log_spread(tmp_path, run) == spread
    assert run.metrics == pytest.approx({"seeds.count": 3.0, "seeds.validation_sharpe.mean": 0.3,
                                         "seeds.validation_sharpe.std": float(np.std([1.0, -0.5, 0.4], ddof=1)),
                                         "seeds.validation_sharpe.min": -0.5, "seeds.validation_sharpe.max": 1.0})
    assert "seeds.validation_sharpe.std" not in spread_metrics(spread_summary("sharpe", RECIPE, [42], [1.0], [None]))
    assert log_spread(tmp_path / "absent", run) is None


def test_seeds_default_is_three_for_the_nightly_and_one_for_the_demo() -> None:
    assert ModelConfig().seeds == 3  # the model's default is base.yaml's (tests/test_config.py)
    assert yaml.safe_load((ROOT / "conf" / "base.yaml").read_text())["model"]["seeds"] == 3
    assert yaml.safe_load((ROOT / "conf" / "quick.yaml").read_text())["model"]["seeds"] == 1
    with pytest.raises(ValueError):
        ModelConfig(seeds=0)
