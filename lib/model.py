"""MultiSymbolLSTM: one LSTM for every symbol, told apart by a learned symbol embedding.

Training goes through :func:`fit_model` only, so the tuner and the final fit share one loop, one set of
metrics (logged once per validation epoch) and one checkpoint rule. The constructor arguments are exactly
``dict(module.hparams)``: :class:`pricelevel.spec.ModelSpec` stores them and ``MultiSymbolLSTM(**hparams)``
rebuilds the architecture before loading the weights.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from pricelevel.config import ModelConfig
    from pricelevel.dataset import WindowDataset

#: Metrics logged once per epoch, in this order; any of the ``val_*`` ones can be the tuned metric.
EPOCH_METRICS = ("train_loss", "val_loss", "val_pr_auc", "val_roc_auc", "val_f1")
#: Probability at or above which a window counts as positive for ``val_f1``.
F1_THRESHOLD = 0.5


class MultiSymbolLSTM(L.LightningModule):
    """Logit that the window's target is 1, from ``[B, T, F]`` features and a ``[B]`` symbol id."""

    def __init__(
        self,
        n_features: int,
        n_symbols: int,
        embedding_dim: int = 8,
        hidden_size: int = 128,
        num_layers: int = 3,
        dropout: float = 0.2,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-2,
        pos_weight: float = 1.0,
        monitor: str = "val_pr_auc",
    ) -> None:
        super().__init__()
        if n_features < 1 or n_symbols < 1 or embedding_dim < 0:
            raise ValueError(
                f"need at least one feature and one symbol and embedding_dim >= 0, got {n_features=} {n_symbols=} "
                f"{embedding_dim=}"
            )
        # Plain Python types, so hparams (stored in ModelSpec) are JSON-safe even when given numpy scalars.
        n_features, n_symbols, embedding_dim = int(n_features), int(n_symbols), int(embedding_dim)
        hidden_size, num_layers = int(hidden_size), int(num_layers)
        dropout, learning_rate, weight_decay = float(dropout), float(learning_rate), float(weight_decay)
        pos_weight, monitor = float(pos_weight), str(monitor)
        self.save_hyperparameters()
        # embedding_dim 0: a feature set without ``symbol``; the model cannot tell symbols apart.
        self.embedding = nn.Embedding(n_symbols, embedding_dim) if embedding_dim > 0 else None
        self.lstm = nn.LSTM(
            input_size=n_features + embedding_dim,
            hidden_size=hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size, 1)
        # Not persistent: it is rebuilt from hparams, so state_dicts hold weights only.
        self.register_buffer("pos_weight_tensor", torch.tensor(pos_weight), persistent=False)
        self._val_logits: list[Tensor] = []
        self._val_targets: list[Tensor] = []

    def forward(self, features: Tensor, symbol_id: Tensor) -> Tensor:
        """``[B]`` logits. ``symbol_id == -1`` (a symbol never trained on) gets the mean embedding; without an
        embedding (``embedding_dim`` 0) the symbol id is ignored."""
        if self.embedding is None:
            output, _ = self.lstm(features)
            return self.head(output[:, -1, :]).squeeze(-1)
        known = symbol_id >= 0
        embedded = self.embedding(symbol_id.clamp(min=0))
        mean = self.embedding.weight.mean(dim=0).expand_as(embedded)
        embedded = torch.where(known.unsqueeze(-1), embedded, mean)
        steps = features.shape[1]
        embedded = embedded.unsqueeze(1).expand(-1, steps, -1).to(features.dtype)
        output, _ = self.lstm(torch.cat([features, embedded], dim=-1))
        return self.head(output[:, -1, :]).squeeze(-1)

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), pos_weight=self.pos_weight_tensor.float()
        )

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        features, symbol_id, target = batch
        loss = self._loss(self(features, symbol_id), target)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=False, batch_size=len(target))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_logits, self._val_targets = [], []

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        features, symbol_id, target = batch
        self._val_logits.append(self(features, symbol_id).detach().float())
        self._val_targets.append(target.detach().float())

    def on_validation_epoch_end(self) -> None:
        """Metrics over the whole validation epoch: PR/ROC AUC are not averages of per-batch values."""
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        target = torch.cat(self._val_targets)
        self._val_logits, self._val_targets = [], []
        metrics = {"val_loss": float(self._loss(logits, target))}
        metrics.update(
            classification_metrics(torch.sigmoid(logits).cpu().numpy(), target.cpu().numpy())
        )
        self.log_dict(metrics, on_epoch=True, prog_bar=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


def classification_metrics(probability: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """PR AUC, ROC AUC and F1 at 0.5; one-class targets give 0.0 / 0.5 / sklearn's F1 instead of raising.

    PR AUC without positives is undefined (sklearn warns and says 0); ROC AUC with one class is undefined
    and 0.5 (chance) keeps "higher is better" meaningful for early stopping.
    """
    probability = np.asarray(probability, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64) >= 0.5
    predicted = probability >= F1_THRESHOLD
    f1 = float(f1_score(target, predicted, zero_division=0.0)) if len(target) else 0.0
    positives = int(target.sum())
    if positives == 0:
        return {"val_pr_auc": 0.0, "val_roc_auc": 0.5, "val_f1": f1}
    pr_auc = float(average_precision_score(target, probability))
    roc_auc = float(roc_auc_score(target, probability)) if positives < len(target) else 0.5
    return {"val_pr_auc": pr_auc, "val_roc_auc": roc_auc, "val_f1": f1}


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` means bf16-mixed on CUDA (fast, no loss scaling needed) and 32-true elsewhere."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_cuda and torch.cuda.is_available() else "32-true"


def build_module(
    n_features: int,
    n_symbols: int,
    config: ModelConfig,
    *,
    pos_weight: float,
    monitor: str,
) -> MultiSymbolLSTM:
    """A freshly initialised module, seeded with ``config.seed`` so the same config gives the same weights."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    return MultiSymbolLSTM(
        n_features=n_features,
        n_symbols=n_symbols,
        embedding_dim=config.embedding_dim,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        pos_weight=pos_weight,
        monitor=monitor,
    )


@dataclass(frozen=True)
class TrainResult:
    """What a fit produced; ``module`` holds the best checkpoint's weights, in eval mode."""

    module: MultiSymbolLSTM
    best_score: float
    best_epoch: int
    epochs_run: int
    #: One entry per validation epoch: ``{"epoch": n, "train_loss": ..., "val_pr_auc": ..., ...}``.
    history: list[dict[str, float]]
    checkpoint_path: Path
    #: Training windows per second of wall time spent in the training part of each epoch.
    train_samples_per_second: float
    device: str


class _EpochRecorder(Callback):
    """Collects each epoch's metrics (and hands them to ``epoch_callback``) and times the training steps."""

    def __init__(self, epoch_callback: Callable[[int, dict[str, float]], None] | None) -> None:
        self.epoch_callback = epoch_callback
        self.history: list[dict[str, float]] = []
        self.train_samples = 0
        self.train_seconds = 0.0
        self._started: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.train_samples += len(batch[2])

    def _stop_clock(self, pl_module: L.LightningModule) -> None:
        if self._started is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.train_seconds += time.perf_counter() - self._started
        self._started = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_clock(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Train epoch metrics are reduced by now and the validation ones were logged during this epoch.
        self._stop_clock(pl_module)
        logged = trainer.callback_metrics
        metrics = {name: float(logged[name]) for name in EPOCH_METRICS if name in logged}
        if not any(name.startswith("val_") for name in metrics):
            return
        epoch = trainer.current_epoch
        self.history.append({"epoch": epoch, **metrics})
        if self.epoch_callback is not None:
            self.epoch_callback(epoch, dict(metrics))


def _on_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def fit_model(
    train: WindowDataset,
    val: WindowDataset,
    module: MultiSymbolLSTM,
    config: ModelConfig,
    *,
    monitor: str,
    direction: Literal["minimize", "maximize"],
    max_epochs: int,
    checkpoint_dir: Path,
    extra_callbacks: Sequence[Callback] = (),
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Fit ``module`` (see :func:`_fit_model`), keeping Lightning's per-fit banners ("GPU available: ...") out
    of the logs; its warnings still show."""
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    previous = banner.level
    banner.setLevel(logging.WARNING)
    try:
        return _fit_model(
            train, val, module, config, monitor=monitor, direction=direction, max_epochs=max_epochs,
            checkpoint_dir=checkpoint_dir, extra_callbacks=extra_callbacks, epoch_callback=epoch_callback,
        )
    finally:
        banner.setLevel(previous)


def _fit_model(
    train: WindowDataset,
    val: WindowDataset,
    module: MultiSymbolLSTM,
    config: ModelConfig,
    *,
    monitor: str,
    direction: Literal["minimize", "maximize"],
    max_epochs: int,
    checkpoint_dir: Path,
    extra_callbacks: Sequence[Callback] = (),
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train with early stopping on ``monitor`` and return the best epoch's weights.

    Seeds with ``config.seed`` first (shuffling, dropout), so two fits of equally initialised modules
    (see :func:`build_module`) give identical weights on CPU. ``epoch_callback`` may raise (e.g. to prune a
    trial); the exception propagates out of this function.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"cannot fit on empty data: {len(train)} training and {len(val)} validation windows")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    cuda = _on_cuda(config.accelerator)
    mode = "min" if direction == "minimize" else "max"
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1, save_weights_only=True
    )
    recorder = _EpochRecorder(epoch_callback)
    limits = {
        name: value
        for name, value in (
            ("limit_train_batches", config.limit_train_batches),
            ("limit_val_batches", config.limit_val_batches),
        )
        if value is not None
    }
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=1,
        precision=resolve_precision(config.precision, config.accelerator),
        max_epochs=max_epochs,
        callbacks=[
            recorder,
            EarlyStopping(monitor=monitor, mode=mode, patience=config.patience),
            checkpoint,
            *extra_callbacks,
        ],
        **limits,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Explicit both ways: a CPU fit must not leave deterministic algorithms on for a later CUDA fit.
        deterministic=not cuda,
        default_root_dir=checkpoint_dir,
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train, batch_size=config.batch_size, shuffle=True, generator=generator, num_workers=0, pin_memory=cuda
    )
    val_loader = DataLoader(val, batch_size=config.batch_size, shuffle=False, num_workers=0, pin_memory=cuda)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    device = trainer.strategy.root_device.type

    if not checkpoint.best_model_path:
        raise RuntimeError(f"no checkpoint was written: metric {monitor!r} was never logged")
    best_path = Path(checkpoint.best_model_path)
    saved = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(saved["state_dict"])
    module.eval()
    best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else math.nan
    return TrainResult(
        module=module,
        best_score=best_score,
        best_epoch=int(saved["epoch"]),
        epochs_run=len(recorder.history),
        history=recorder.history,
        checkpoint_path=best_path,
        train_samples_per_second=recorder.train_samples / recorder.train_seconds if recorder.train_seconds else 0.0,
        device=device,
    )


def predict_proba(module: MultiSymbolLSTM, dataset: Dataset, batch_size: int = 1024) -> np.ndarray:
    """Float64 probabilities in dataset order, on whatever device the module is on."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = module.training
    module.eval()
    outputs: list[Tensor] = []
    try:
        with torch.inference_mode():
            for features, symbol_id, _ in loader:
                logits = module(features.to(module.device), symbol_id.to(module.device))
                outputs.append(torch.sigmoid(logits.float()).cpu())
    finally:
        module.train(was_training)
    if not outputs:
        return np.empty(0, dtype=np.float64)
    return torch.cat(outputs).numpy().astype(np.float64)
