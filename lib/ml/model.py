"""MultiSymbolLSTM: one LSTM for every symbol, told apart by a learned symbol embedding.

Training goes through :func:`pricelevel.ml.fit.fit_model`. The constructor arguments are exactly
``dict(module.hparams)``: :class:`pricelevel.ml.spec.ModelSpec` stores them and ``MultiSymbolLSTM(**hparams)``
rebuilds the architecture before loading the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pricelevel.ml.metrics import classification_scores

if TYPE_CHECKING:
    from pricelevel.ml.config import ModelConfig

#: Metrics logged once per epoch, in this order; any of the ``val_*`` ones can be the tuned metric.
EPOCH_METRICS = ("train_loss", "val_loss", "val_pr_auc", "val_roc_auc", "val_f1")
#: Probability at or above which a window counts as positive for ``val_f1``.
F1_THRESHOLD = 0.5
#: The scores of :func:`pricelevel.ml.metrics.classification_scores` logged as ``val_<name>`` every epoch.
VALIDATION_SCORES = ("loss", "pr_auc", "roc_auc", "f1")


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
        scores = classification_scores(target.cpu().numpy(), torch.sigmoid(logits).cpu().numpy(), F1_THRESHOLD)
        self.log_dict({f"val_{name}": scores[name] for name in VALIDATION_SCORES}, on_epoch=True, prog_bar=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


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
