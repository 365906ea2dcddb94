"""Configuration of the ML stage: the windowed dataset, the LSTM and its training loop, the Optuna study."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pricelevel.core.config import Frozen, Symbol
from pricelevel.core.timeframes import Timeframe


class DatasetConfig(Frozen):
    """Windows of per-symbol normalised features; chronological train/validation/test segments."""

    timeframe: Timeframe = Timeframe("1h")
    #: Symbols trained on; ``null`` = ``data.symbols``.
    symbols: tuple[Symbol, ...] | None = None
    seq_len: int = Field(80, ge=2)
    val_frac: float = Field(0.15, gt=0, lt=0.5)
    test_frac: float = Field(0.15, gt=0, lt=0.5)


class EvaluationConfig(Frozen):
    """Walk-forward evaluation: expanding-window folds, each trained on its past, its rules chosen on its own
    validation segment and traded on its own test segment (the newest fold's model is the one registered)."""

    folds: int = Field(3, ge=1, le=20)


class ModelConfig(Frozen):
    """MultiSymbolLSTM and its training loop (the tuner overrides the searched keys)."""

    #: Size of the learned symbol embedding (0 when the feature set leaves out ``symbol``).
    embedding_dim: int = Field(8, ge=0)
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(3, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(30, ge=1)
    #: Early stopping: epochs without improvement of the tuned metric.
    patience: int = Field(4, ge=1)
    #: BCE positive-class weight; ``null`` = negatives / positives of the training segment.
    pos_weight: float | None = Field(None, gt=0)
    seed: int = 42
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    #: ``auto``: bf16-mixed on CUDA, 32-true elsewhere.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    #: Caps per epoch (an int is batches, a float a fraction); ``null`` = all.
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    #: torch CPU threads; ``null`` leaves torch's default.
    num_threads: int | None = Field(None, ge=1)


TunedMetric = Literal["val_pr_auc", "val_roc_auc", "val_f1", "val_loss"]


class SearchSpace(Frozen):
    """Optuna's space: choices are lists, ranges are ``[low, high]``."""

    hidden_size: tuple[int, ...] = (64, 128, 256)
    num_layers: tuple[int, int] = (1, 3)
    dropout: tuple[float, float] = (0.0, 0.5)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    batch_size: tuple[int, ...] = (128, 256, 512)
    seq_len: tuple[int, ...] = (40, 80, 120)

    @model_validator(mode="after")
    def _ranges(self) -> SearchSpace:
        for name in ("num_layers", "dropout", "learning_rate"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} > high {high}")
        if min(self.seq_len) < 2:
            raise ValueError("seq_len choices must be >= 2")
        return self


class TuningConfig(Frozen):
    """Optuna study. ``metric`` is the one name read by the study, early stopping and the promotion gate."""

    metric: TunedMetric = "val_pr_auc"
    n_trials: int = Field(20, ge=1)
    #: Seconds for the whole study; ``null`` = no limit.
    timeout_s: float | None = Field(3600.0, gt=0)
    #: Any SQLAlchemy URL; ``null`` = SQLite in the project (``<data.root>/optuna/optuna.db``).
    storage: str | None = None
    #: Trial workers sharing the study (tasks of the flow's runner; on Dask, one per worker process). The study
    #: stops at ``n_trials`` finished in total. More than one needs a server database in ``storage``.
    workers: int = Field(1, ge=1, le=64)
    #: With a server database: a worker beats every ``heartbeat_s``; a trial silent for ``grace_s`` (its worker
    #: died) is failed and re-queued with the same parameters, at most ``trial_retries`` times.
    heartbeat_s: float = Field(30.0, gt=0)
    grace_s: float = Field(120.0, gt=0)
    trial_retries: int = Field(1, ge=0)
    study_name: str = "pricelevel"
    #: Epochs per trial (the final model trains for ``model.max_epochs``).
    max_epochs: int = Field(10, ge=1)
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_epochs: int = Field(1, ge=0)
    seed: int = 42
    space: SearchSpace = SearchSpace()

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "minimize" if self.metric == "val_loss" else "maximize"

    @property
    def server_storage(self) -> bool:
        """Whether ``storage`` is a database server (heartbeats, several workers), not a SQLite file."""
        return self.storage is not None and not self.storage.startswith("sqlite")

    @model_validator(mode="after")
    def _workers_need_a_server(self) -> TuningConfig:
        if self.workers > 1 and not self.server_storage:
            raise ValueError(
                f"workers={self.workers} needs a PostgreSQL URL in tuning.storage: SQLite allows one writer at a "
                "time and has no heartbeats, so parallel workers would fail with 'database is locked'"
            )
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(f"grace_s ({self.grace_s:g}) must exceed heartbeat_s ({self.heartbeat_s:g})")
        return self
