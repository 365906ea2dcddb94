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


#: The model keys Optuna can search (``tuning.space``). Each is ``null`` by default: the search chooses it. A
#: value given for one (in a config file, ``PRICELEVEL_MODEL__*`` or ``--set model.hidden_size=64``) fixes it:
#: the tuner takes it out of the search and every trial and the final model use that value. Never ignored.
SEARCHABLE_MODEL_KEYS = ("hidden_size", "num_layers", "dropout", "learning_rate", "batch_size")


class ModelConfig(Frozen):
    """MultiSymbolLSTM and its training loop. A searchable key (:data:`SEARCHABLE_MODEL_KEYS`) left ``null``
    is chosen by the tuner; one given a value is fixed at it and not searched."""

    #: Size of the learned symbol embedding (0 when the feature set leaves out ``symbol``).
    embedding_dim: int = Field(8, ge=0)
    #: LSTM hidden units. Searchable: ``null`` = chosen by the tuner from ``tuning.space``; a value fixes it.
    hidden_size: int | None = Field(None, ge=1)
    #: Stacked LSTM layers. Searchable: ``null`` = chosen by the tuner; a value fixes it.
    num_layers: int | None = Field(None, ge=1)
    #: Dropout between LSTM layers. Searchable: ``null`` = chosen by the tuner; a value fixes it.
    dropout: float | None = Field(None, ge=0, lt=1)
    #: AdamW learning rate. Searchable: ``null`` = chosen by the tuner (log scale); a value fixes it.
    learning_rate: float | None = Field(None, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    #: Windows per batch. Searchable: ``null`` = chosen by the tuner; a value fixes it.
    batch_size: int | None = Field(None, ge=1)
    max_epochs: int = Field(30, ge=1)
    #: Early stopping: epochs without improvement of the tuned metric.
    patience: int = Field(4, ge=1)
    #: BCE positive-class weight; ``null`` = negatives / positives of the training segment.
    pos_weight: float | None = Field(None, gt=0)
    #: Seed of the final model (weights, batches); two CPU fits with one seed are identical.
    seed: int = 42
    #: Trainings of every final fold model, seeds ``seed``, ``seed + 1``, ...: the registered model is ``seed``'s;
    #: the others measure the spread of the chosen rules' pooled validation metric (:mod:`pricelevel.ml.seeds`,
    #: MLflow ``seeds.*``). Each extra seed costs one more final training of every fold. 1 = no spread.
    seeds: int = Field(3, ge=1, le=20)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    #: ``auto``: bf16-mixed on CUDA, 32-true elsewhere.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    #: Caps per epoch (an int is batches, a float a fraction); ``null`` = all.
    limit_train_batches: int | float | None = None
    #: Cap on validation batches per epoch, as ``limit_train_batches``.
    limit_val_batches: int | float | None = None
    #: torch CPU threads; ``null`` leaves torch's default.
    num_threads: int | None = Field(None, ge=1)

    def fixed_params(self) -> dict[str, int | float]:
        """The searchable keys this config gives a value: the tuner keeps them and searches only the rest."""
        return {key: getattr(self, key) for key in SEARCHABLE_MODEL_KEYS if getattr(self, key) is not None}

    def unset_params(self) -> tuple[str, ...]:
        """The searchable keys left to the search (``null``): a model cannot be built until they are chosen."""
        return tuple(key for key in SEARCHABLE_MODEL_KEYS if getattr(self, key) is None)


TunedMetric = Literal["val_pr_auc", "val_roc_auc", "val_f1", "val_loss"]


class SearchSpace(Frozen):
    """Optuna's space: choices are lists, ranges are ``[low, high]``. A model key fixed in ``model:`` is not
    searched, whatever its entry here (the tuner says so in its log)."""

    #: Choices of ``model.hidden_size``.
    hidden_size: tuple[int, ...] = (64, 128, 256)
    #: ``[low, high]`` of ``model.num_layers``.
    num_layers: tuple[int, int] = (1, 3)
    #: ``[low, high]`` of ``model.dropout``.
    dropout: tuple[float, float] = (0.0, 0.5)
    #: ``[low, high]`` of ``model.learning_rate``, searched on a log scale.
    learning_rate: tuple[float, float] = (1e-4, 1e-2)
    #: Choices of ``model.batch_size``.
    batch_size: tuple[int, ...] = (128, 256, 512)
    #: Choices of the window length in bars (``dataset.seq_len`` is the value without a search).
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
    #: Optuna trials in the study (a ceiling when ``training.budget_hours`` is set).
    n_trials: int = Field(20, ge=1)
    #: Seconds for the whole study; ``null`` = no limit (only ``n_trials`` counts: the same trials on any machine,
    #: as the demo runs).
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
    #: MedianPruner: trials completed before pruning starts.
    pruner_startup_trials: int = Field(2, ge=0)
    #: MedianPruner: epochs of a trial before it may be pruned.
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


class TrainingConfig(Frozen):
    """The training run's compute budget (:mod:`pricelevel.ml.budget`): the run times a few training batches on
    this machine and shrinks ``tuning.n_trials``, ``tuning.max_epochs``, ``evaluation.folds`` and
    ``model.max_epochs`` (configured values are the ceilings) until the estimate fits. ``budget_hours: null``
    keeps the configured sizes and measures nothing (the demo: the same trials on any machine)."""

    #: Hours for the study and the final fits together; ``null`` = no budget, the configured sizes as they are.
    budget_hours: float | None = Field(3.0, gt=0)
    #: The least the budget shrinks to (each at most its configured value); a run whose least is estimated
    #: over the budget still runs, and says so.
    min_trials: int = Field(2, ge=1)
    min_epochs: int = Field(2, ge=1)
    #: The fewest walk-forward folds the budget shrinks to (the newest are kept).
    min_folds: int = Field(1, ge=1)
    #: Training batches timed by the calibration (the first included).
    calibration_batches: int = Field(20, ge=2)


class GbmConfig(Frozen):
    """The LightGBM baseline (docs/concepts/walk-forward.md "Walk-forward evaluation"). Small on purpose: it must cost seconds."""

    #: Bars back from a window's last bar whose features form the row (0 = the last bar); a lag outside the
    #: window (``>= seq_len``) is dropped.
    lags: tuple[int, ...] = (0, 1, 2, 4, 8)
    #: Boosting rounds at most; early stopping on the validation PR-AUC (the LSTM's ``tuning.metric``) keeps fewer.
    n_estimators: int = Field(300, ge=1)
    #: Rounds without a better validation PR-AUC before boosting stops.
    early_stopping_rounds: int = Field(30, ge=1)
    #: LightGBM's shrinkage per round.
    learning_rate: float = Field(0.05, gt=0)
    #: Leaves per tree.
    num_leaves: int = Field(15, ge=2)
    #: Rows a leaf needs at least.
    min_child_samples: int = Field(50, ge=1)
    #: Row and column subsampling per tree (seeded).
    subsample: float = Field(0.8, gt=0, le=1)
    #: Column subsampling per tree (seeded).
    colsample: float = Field(0.8, gt=0, le=1)
    #: LightGBM's seed (subsampling).
    seed: int = 42
    #: One thread: deterministic and light beside the LSTM; the demo's fits take about a second each.
    num_threads: int = Field(1, ge=1)
