"""MultiSymbolLSTM: shapes, unknown symbols, gradients, a tiny seeded fit on CPU, and rebuilding from hparams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pricelevel.ml.config import ModelConfig
from pricelevel.ml.dataset import SymbolFrame, TrainingData, build_training_data
from pricelevel.ml.fit import TrainResult, fit_model, resolve_precision
from pricelevel.ml.metrics import classification_scores
from pricelevel.ml.model import (
    EPOCH_METRICS,
    MultiSymbolLSTM,
    build_module,
    predict_proba,
)

SEQ_LEN = 8
N_FEATURES = 3


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def separable_frames(n: int = 600) -> list[SymbolFrame]:
    """Target = the window's last bar has a positive first feature: learnable in a few batches."""
    frames = []
    for seed, symbol in enumerate(("AAAUSDT", "BBBUSDT")):
        rng = np.random.default_rng(seed)
        features = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        target = (features[:, 0] > 0.3).astype(np.float32)
        timestamps = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC")
        frames.append(SymbolFrame(symbol, timestamps, features, target))
    return frames


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return build_training_data(separable_frames(), SEQ_LEN, val_frac=0.2, test_frac=0.1, embargo=SEQ_LEN + 1)


def tiny_config(**overrides: object) -> ModelConfig:
    values = {
        "hidden_size": 8,
        "num_layers": 2,
        "embedding_dim": 2,
        "dropout": 0.2,
        "learning_rate": 1e-2,
        "batch_size": 32,
        "patience": 2,
        "accelerator": "cpu",
        "limit_train_batches": 15,
        "seed": 7,
        **overrides,
    }
    return ModelConfig(**values)


def fit_tiny(data: TrainingData, checkpoint_dir: Path, epoch_callback=None) -> TrainResult:
    config = tiny_config()
    module = build_module(N_FEATURES, len(data.symbols), config, pos_weight=1.5, monitor="val_pr_auc")
    return fit_model(
        data.train,
        data.val,
        module,
        config,
        monitor="val_pr_auc",
        direction="maximize",
        max_epochs=3,
        checkpoint_dir=checkpoint_dir,
        epoch_callback=epoch_callback,
    )


@pytest.fixture(scope="module")
def fitted(data: TrainingData, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, list]:
    calls: list[tuple[int, dict[str, float]]] = []
    result = fit_tiny(data, tmp_path_factory.mktemp("ckpt"), lambda epoch, metrics: calls.append((epoch, metrics)))
    return result, calls


def test_forward_shapes_for_any_length_and_unknown_symbols() -> None:
    model = MultiSymbolLSTM(n_features=N_FEATURES, n_symbols=2, hidden_size=8, num_layers=2).eval()
    symbol_id = torch.tensor([0, 1, -1, 0])
    for steps in (1, SEQ_LEN, 2 * SEQ_LEN):
        logits = model(torch.randn(4, steps, N_FEATURES), symbol_id)
        assert logits.shape == (4,) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    # An unknown symbol is the mean embedding, not a copy of symbol 0's.
    features = torch.randn(1, SEQ_LEN, N_FEATURES).repeat(3, 1, 1)
    known0, known1, unknown = model(features, torch.tensor([0, 1, -1]))
    with torch.no_grad():
        model.embedding.weight.copy_(model.embedding.weight.mean(0, keepdim=True).expand(2, -1))
    assert torch.allclose(model(features[:1], torch.tensor([0])), unknown.unsqueeze(0), atol=1e-6)
    assert not torch.isclose(known0, known1)


def test_backward_gives_finite_gradients_everywhere() -> None:
    model = MultiSymbolLSTM(n_features=N_FEATURES, n_symbols=3, hidden_size=8, num_layers=3, pos_weight=2.0)
    batch = (torch.randn(5, SEQ_LEN, N_FEATURES), torch.tensor([0, 1, 2, -1, 1]), torch.tensor([1.0, 0, 0, 1, 0]))
    loss = model._loss(model(batch[0], batch[1]), batch[2])
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_tiny_fit_logs_metrics_and_keeps_the_best_checkpoint(data: TrainingData, fitted) -> None:
    result, calls = fitted
    assert result.device == "cpu"
    assert result.epochs_run == len(result.history) == len(calls) >= 1
    assert [epoch for epoch, _ in calls] == list(range(len(calls)))
    for (epoch, metrics), row in zip(calls, result.history, strict=True):
        assert set(metrics) == set(EPOCH_METRICS)
        assert row == {"epoch": epoch, **metrics}
        assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    scores = [row["val_pr_auc"] for row in result.history]
    assert result.best_score == pytest.approx(max(scores))
    assert result.best_epoch == scores.index(max(scores))
    assert result.checkpoint_path.is_file()
    assert result.train_samples_per_second > 0
    # The module holds the best checkpoint's weights and has learnt the separable target.
    saved = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in result.module.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not result.module.training
    probability = predict_proba(result.module, data.val)
    assert probability.dtype == np.float64 and probability.shape == (len(data.val),)
    assert classification_scores(data.val.targets(), probability)["pr_auc"] == pytest.approx(
        result.best_score, abs=1e-5
    )
    assert result.best_score > 0.6  # prevalence is about 0.38


def test_seeded_fits_are_identical(data: TrainingData, fitted, tmp_path: Path) -> None:
    first, _ = fitted
    second = fit_tiny(data, tmp_path)
    assert second.history == first.history
    np.testing.assert_array_equal(predict_proba(second.module, data.test), predict_proba(first.module, data.test))


def test_rebuild_from_hparams_round_trips(data: TrainingData, fitted) -> None:
    module = fitted[0].module
    hparams = dict(module.hparams)
    assert hparams == {
        "n_features": N_FEATURES,
        "n_symbols": 2,
        "embedding_dim": 2,
        "hidden_size": 8,
        "num_layers": 2,
        "dropout": 0.2,
        "learning_rate": 1e-2,
        "weight_decay": 1e-2,
        "pos_weight": 1.5,
        "monitor": "val_pr_auc",
    }
    rebuilt = MultiSymbolLSTM(**hparams)
    rebuilt.load_state_dict(module.state_dict())
    np.testing.assert_array_equal(predict_proba(rebuilt, data.test), predict_proba(module, data.test))


def _reference_probability(module: MultiSymbolLSTM, windows: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
    """The model's forward pass written out from the LSTM equations in numpy (no torch module is called):
    symbol embedding joined to every step, stacked LSTM cells, a linear head on the last step, sigmoid."""
    weights = {name: value.detach().numpy().astype(np.float64) for name, value in module.state_dict().items()}
    table = weights["embedding.weight"]
    embedded = np.where((symbol_id >= 0)[:, None], table[np.clip(symbol_id, 0, None)], table.mean(axis=0))
    inputs = np.concatenate([windows, np.repeat(embedded[:, None, :], windows.shape[1], axis=1)], axis=-1)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x))

    for layer in range(module.hparams.num_layers):
        w_ih, w_hh = weights[f"lstm.weight_ih_l{layer}"], weights[f"lstm.weight_hh_l{layer}"]
        bias = weights[f"lstm.bias_ih_l{layer}"] + weights[f"lstm.bias_hh_l{layer}"]
        h = np.zeros((len(inputs), w_hh.shape[1]))
        c = np.zeros_like(h)
        outputs = []
        for step in range(inputs.shape[1]):
            gates = inputs[:, step] @ w_ih.T + h @ w_hh.T + bias
            i, f, g, o = np.split(gates, 4, axis=1)  # PyTorch's gate order: input, forget, cell, output
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            outputs.append(h)
        inputs = np.stack(outputs, axis=1)
    return sigmoid(inputs[:, -1] @ weights["head.weight"].T[:, 0] + weights["head.bias"][0])


def test_predict_proba_matches_the_lstm_equations_in_dataset_order(data: TrainingData, fitted) -> None:
    module = fitted[0].module
    probability = predict_proba(module, data.test, batch_size=7)
    windows = np.stack([data.test[i][0].numpy() for i in range(len(data.test))]).astype(np.float64)
    symbol_id = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    np.testing.assert_allclose(probability, _reference_probability(module, windows, symbol_id), rtol=1e-5, atol=1e-6)
    unknown = _reference_probability(module, windows[:3], np.full(3, -1))  # an unseen symbol: the mean embedding
    with torch.no_grad():
        actual = torch.sigmoid(module(torch.from_numpy(windows[:3]).float(), torch.full((3,), -1))).numpy()
    np.testing.assert_allclose(actual, unknown, rtol=1e-5, atol=1e-6)


def test_one_class_targets_do_not_crash() -> None:
    p = np.array([0.1, 0.7, 0.4])
    none = classification_scores(np.zeros(3), p)
    assert (none["pr_auc"], none["roc_auc"], none["f1"]) == (0.0, 0.5, 0.0)
    all_positive = classification_scores(np.ones(3), p)
    assert all_positive["roc_auc"] == 0.5 and all_positive["f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-empty"):
        classification_scores(np.empty(0), np.empty(0))


def test_resolve_precision() -> None:
    assert resolve_precision("16-mixed") == "16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    expected = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    assert resolve_precision("auto") == expected


def test_without_the_symbol_embedding_every_symbol_gets_the_same_output() -> None:
    """A feature set without ``symbol``: embedding_dim 0, the model reads the features alone."""
    model = MultiSymbolLSTM(n_features=N_FEATURES, n_symbols=3, embedding_dim=0, hidden_size=8, num_layers=1).eval()
    assert model.embedding is None and model.lstm.input_size == N_FEATURES
    features = torch.randn(1, SEQ_LEN, N_FEATURES).repeat(4, 1, 1)
    with torch.no_grad():
        logits = model(features, torch.tensor([0, 1, 2, -1]))
    assert torch.allclose(logits, logits[0].expand(4))
    assert not any("embedding" in name for name in model.state_dict())
