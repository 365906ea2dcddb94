"""Fitting a :class:`~pricelevel.ml.model.MultiSymbolLSTM`: the one training loop the tuner and the final fit
share, with one set of per-epoch metrics and one early-stopping and checkpoint rule on the tuned metric.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

from pricelevel.ml.config import ModelConfig
from pricelevel.ml.dataset import positive_weight
from pricelevel.ml.model import EPOCH_METRICS, MultiSymbolLSTM, build_module

if TYPE_CHECKING:
    from pricelevel.ml.config import TuningConfig
    from pricelevel.ml.dataset import TrainingData, WindowDataset


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``auto`` means bf16-mixed on CUDA (fast, no loss scaling needed) and 32-true elsewhere."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_cuda and torch.cuda.is_available() else "32-true"


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


@contextlib.contextmanager
def _quiet_banners() -> Iterator[None]:
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    previous = banner.level
    banner.setLevel(logging.WARNING)
    try:
        yield
    finally:
        banner.setLevel(previous)


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
    """Train with early stopping on ``monitor`` and return the best epoch's weights (Lightning's per-fit banners,
    "GPU available: ...", are kept out of the logs; its warnings still show).

    Seeds with ``config.seed`` first (shuffling, dropout), so two fits of equally initialised modules
    (see :func:`build_module`) give identical weights on CPU. ``epoch_callback`` may raise (e.g. to prune a
    trial); the exception propagates out of this function.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"cannot fit on empty data: {len(train)} training and {len(val)} validation windows")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
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
    with warnings.catch_warnings(), _quiet_banners():
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


def with_params(model: ModelConfig, params: dict[str, Any]) -> ModelConfig:
    """``model`` with the searched keys replaced (``seq_len`` belongs to the dataset, not the model)."""
    return model.model_copy(update={k: v for k, v in params.items() if k in ModelConfig.model_fields})


def train(
    data: TrainingData,
    model: ModelConfig,
    tuning: TuningConfig,
    max_epochs: int,
    checkpoint_dir: Path,
    extra_callbacks: tuple = (),
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Build and fit one model, early-stopped and checkpointed on the tuned metric."""
    module = build_module(
        data.train.n_features, len(data.symbols), model,
        pos_weight=model.pos_weight or positive_weight(data.train), monitor=tuning.metric,
    )
    return fit_model(
        data.train, data.val, module, model,
        monitor=tuning.metric, direction=tuning.direction, max_epochs=max_epochs,
        checkpoint_dir=checkpoint_dir, extra_callbacks=extra_callbacks, epoch_callback=epoch_callback,
    )
