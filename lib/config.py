"""Typed, frozen configuration: one pydantic model per pipeline step, validated on load.

Layers, in increasing precedence:

1. ``conf/base.yaml`` (every key, with comments);
2. ``--config FILE.yaml`` (any subset of keys);
3. environment variables ``PRICELEVEL_<SECTION>__<KEY>`` (e.g. ``PRICELEVEL_DATA__ROOT``);
4. ``--set section.key=value`` on the command line.

Values given as text (env, ``--set``) are parsed as YAML scalars/lists, so ``--set data.symbols=[BTCUSDT]``
and ``PRICELEVEL_BYBIT__TESTNET=true`` work. Secrets are *not* configuration: they live only in the
environment (see :mod:`pricelevel.secrets`) and a config file that names one is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pricelevel.feature_catalogue import unknown_feature_names
from pricelevel.timeframes import Timeframe

ENV_PREFIX = "PRICELEVEL_"
#: Keys that must never be put in a config file or ``--set``: they come from the environment only.
SECRET_KEYS = frozenset({"api_key", "api_secret", "token", "bot_token", "password", "secret"})


class ConfigError(ValueError):
    """A configuration value is missing or invalid; ``str()`` is one line naming the key and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Symbol = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}USDT?$|^[A-Z0-9]{2,20}USDC$")]


class DataConfig(_Frozen):
    """Where candles come from and where they are kept."""

    root: Path = Path("data")
    source: Literal["sample", "bybit"] = "sample"
    sample_dir: Path = Path("data/sample")
    symbols: tuple[Symbol, ...] = Field(min_length=1)
    timeframes: tuple[Timeframe, ...] = Field(min_length=1)
    start: UtcDatetime
    #: Exclusive end of the range (candle open time < end); ``null`` means "up to now".
    end: UtcDatetime | None = None

    @field_validator("symbols", "timeframes")
    @classmethod
    def _unique(cls, value: tuple) -> tuple:
        if len(set(value)) != len(value):
            raise ValueError("duplicates are not allowed")
        return value

    @model_validator(mode="after")
    def _range(self) -> DataConfig:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end:%Y-%m-%d %H:%M}) must be after start ({self.start:%Y-%m-%d %H:%M})")
        return self


class BybitConfig(_Frozen):
    """Bybit v5 market data through pybit. Keys/secrets come from the environment, never from here."""

    category: Literal["spot", "linear"] = "spot"
    #: Base URL override (a mirror, a local fake server). ``null``: pybit's URL for mainnet/testnet/demo.
    endpoint: str | None = None
    testnet: bool = False
    demo: bool = False
    timeout_s: float = Field(10.0, gt=0)
    #: Attempts per request on rate limits (retCode 10006, HTTP 403/429), 5xx and timeouts.
    max_attempts: int = Field(6, ge=1, le=50)
    backoff_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    page_limit: int = Field(1000, ge=1, le=1000)

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_environment(self) -> BybitConfig:
        if self.testnet and self.demo:
            raise ValueError("testnet and demo are exclusive: pick one")
        return self


class GapPolicy(_Frozen):
    """How missing candles are judged. Exchange outages leave real gaps; a broken fetch leaves big ones."""

    #: Longest single run of missing candles that still passes (with a warning).
    max_gap_bars: int = Field(24, ge=0)
    #: Largest share of missing candles over the dataset's span that still passes.
    max_missing_fraction: float = Field(0.01, ge=0, le=1)


class ValidationConfig(_Frozen):
    gaps: GapPolicy = GapPolicy()
    #: How many offending rows a failure message and report show.
    example_rows: int = Field(5, ge=1, le=100)


class FlowConfig(_Frozen):
    """Orchestration knobs (not what is computed, only how it is scheduled)."""

    max_workers: int = Field(4, ge=1, le=64)
    task_retries: int = Field(2, ge=0)
    task_retry_delay_s: float = Field(10.0, ge=0)


class BacktestConfig(_Frozen):
    """How signals become trades and money (rules: :mod:`pricelevel.backtest.engine`)."""

    init_cash: float = Field(10_000.0, gt=0, allow_inf_nan=False)
    #: Fraction of traded value paid on every fill (Bybit spot taker: 0.1 %).
    fees: float = Field(0.001, ge=0, lt=0.1)
    #: Fraction the price moves against us on signal fills (stop exits fill at the stop price).
    slippage: float = Field(0.0005, ge=0, lt=0.1)
    #: Stop-loss / take-profit as fractions of the entry price; ``null`` switches one off.
    sl_stop: float | None = Field(0.02, gt=0, lt=1)
    tp_stop: float | None = Field(0.04, gt=0)
    #: ``close``: at the signal bar's close (vectorbt's rule); ``next_open``: at the next bar's open.
    fill: Literal["close", "next_open"] = "next_open"
    #: ``all_in``: all cash; ``fraction``: ``fraction`` of equity; ``risk``: lose ``risk`` of equity at the
    #: stop-loss, capped by ``fraction``.
    sizing: Literal["all_in", "fraction", "risk"] = "fraction"
    fraction: float = Field(0.1, gt=0, le=1)
    risk: float = Field(0.02, gt=0, le=1)
    #: Entries worth less than this (quote currency) are rejected as dust.
    min_order_value: float = Field(5.0, ge=0)
    #: Concurrent positions across all symbols (they share one cash balance).
    max_positions: int = Field(5, ge=1)
    #: Probability signals: ``p >= threshold`` is an entry; ``p < exit_threshold`` an exit (``null``: none).
    threshold: float = Field(0.5, ge=0, le=1)
    exit_threshold: float | None = Field(None, ge=0, le=1)
    #: Annualisation; ``null`` infers it from the candles' spacing.
    timeframe: Timeframe | None = None
    #: Candles drawn per chart; longer series are merged into coarser candles for display only.
    report_max_bars: int = Field(4000, ge=100)

    @model_validator(mode="after")
    def _risk_needs_stop(self) -> BacktestConfig:
        if self.sizing == "risk" and self.sl_stop is None:
            raise ValueError("sizing=risk needs sl_stop: the risk is measured to the stop-loss")
        return self


class TouchFilter(_Frozen):
    """A level must have been touched on 1d: a candle's range reaches it within ``atr_buffer`` x ATR."""

    enabled: bool = True
    min_touches: int = Field(4, ge=1)
    atr_period: int = Field(7, ge=1)
    atr_buffer: float = Field(0.2, ge=0)


class AgeFilter(_Frozen):
    """A level whose newest extremum is older than this has gone stale."""

    enabled: bool = True
    max_age_days: float = Field(90.0, gt=0)


class VolumeFilter(_Frozen):
    """Mean 4h volume of the candles touching a level, against the mean 4h volume of the lookback."""

    enabled: bool = True
    factor: float = Field(1.3, gt=0)


class ApproachFilter(_Frozen):
    """How fast the 1h price closed in on a level over the last ``bars`` candles, in ATR per bar."""

    enabled: bool = True
    bars: int = Field(6, ge=1)
    atr_period: int = Field(14, ge=1)
    #: Levels approached faster than this (ATR(atr_period) per bar) are dropped: a fast move breaks levels.
    max_speed: float = Field(1.0, gt=0)


class LevelFilters(_Frozen):
    touches: TouchFilter = TouchFilter()
    age: AgeFilter = AgeFilter()
    volume: VolumeFilter = VolumeFilter()
    approach: ApproachFilter = ApproachFilter()


class LevelsConfig(_Frozen):
    """Support/resistance levels: extrema of closes, clustered with DBSCAN, refitted walk-forward."""

    #: Bar i is an extremum when its close is the max/min of ``close[i-window : i+window+1]``.
    window: int = Field(12, ge=1)
    #: DBSCAN eps as a fraction of the median clustered price.
    eps_frac: float = Field(0.005, gt=0, lt=1)
    min_samples: int = Field(4, ge=1)
    #: Extrema older than this (at refit time) are not clustered.
    lookback_days: float = Field(365.0, gt=0)
    #: Re-cluster every this many bars of the levels' timeframe; levels are constant in between.
    refit_every: int = Field(24, ge=1)
    filters: LevelFilters = LevelFilters()


class LabelsConfig(_Frozen):
    """What the model learns to predict (README "Labels"): the target of bar t is known at the close of t + horizon."""

    #: ``forward_move``: 1 when the highest high of bars t+1..t+horizon reaches ``open[t+1] x (1 + move_frac)``
    #: (entry at the next open, as the backtest fills); ``level_label``: 1 when bar t+horizon closes within
    #: ``threshold_frac`` of a level in force.
    kind: Literal["level_label", "forward_move"] = "forward_move"
    #: ``level_label``'s distance, and the "near a level now" baseline of every label.
    threshold_frac: float = Field(0.001, gt=0, lt=1)
    #: ``forward_move``'s x: the rise from the next open that counts as a move.
    move_frac: float = Field(0.03, gt=0, lt=1)
    #: Bars ahead the target looks (H); rows whose horizon runs past the data have no target.
    horizon: int = Field(24, ge=1)


class FeaturesConfig(_Frozen):
    """The model's inputs: a named set of feature groups and columns (README "Features").

    A set lists group names (``returns``, ``indicators``, ``levels``, ``level_strength``, ``context``,
    ``symbol``), which expand to their columns, and/or single column names. ``symbol`` is the learned symbol
    embedding: a set without it trains a model that cannot tell symbols apart.
    """

    #: The set the model reads: a key of ``sets``.
    set: str = "rich"
    sets: dict[str, tuple[str, ...]] = {
        "base": ("log_return", "log_range", "volume_change", "level_distance", "symbol"),
        "rich": ("returns", "indicators", "levels", "level_strength", "context", "symbol"),
    }
    #: Longer timeframes whose candles are joined to each bar once they have closed (``context`` group);
    #: those not longer than the dataset timeframe are skipped.
    context_timeframes: tuple[Timeframe, ...] = (Timeframe("4h"), Timeframe("1d"))

    @model_validator(mode="after")
    def _known_names(self) -> FeaturesConfig:
        if self.set not in self.sets:
            raise ValueError(f"set {self.set!r} is not one of sets: {', '.join(sorted(self.sets))}")
        for name, entries in self.sets.items():
            if not entries or len(set(entries)) != len(entries):
                raise ValueError(f"sets.{name}: at least one entry, no duplicates")
            unknown = unknown_feature_names(entries)
            if unknown:
                raise ValueError(f"sets.{name}: unknown feature or group {unknown} (README \"Features\" lists them)")
            if entries == ("symbol",):
                raise ValueError(f"sets.{name}: the symbol embedding alone is not an input; add a group or column")
        return self

    @property
    def selected(self) -> tuple[str, ...]:
        return self.sets[self.set]


class LookaheadConfig(_Frozen):
    """The look-ahead check run by the training flow (and ``pricelevel check lookahead``)."""

    enabled: bool = True
    #: Cut points t: features and labels are recomputed on the data cut at t and compared with the full run.
    cuts: int = Field(3, ge=1)


class DatasetConfig(_Frozen):
    """Windows of per-symbol normalised features; chronological train/validation/test segments."""

    timeframe: Timeframe = Timeframe("1h")
    #: Symbols trained on; ``null`` = ``data.symbols``.
    symbols: tuple[Symbol, ...] | None = None
    seq_len: int = Field(80, ge=2)
    val_frac: float = Field(0.15, gt=0, lt=0.5)
    test_frac: float = Field(0.15, gt=0, lt=0.5)


class ModelConfig(_Frozen):
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


class SearchSpace(_Frozen):
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


class TuningConfig(_Frozen):
    """Optuna study. ``metric`` is the one name read by the study, early stopping and the promotion gate."""

    metric: TunedMetric = "val_pr_auc"
    n_trials: int = Field(20, ge=1)
    #: Seconds for the whole study; ``null`` = no limit.
    timeout_s: float | None = Field(3600.0, gt=0)
    #: Any SQLAlchemy URL; ``null`` = SQLite in the project (``<data.root>/optuna/optuna.db``).
    storage: str | None = None
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


class TrackingConfig(_Frozen):
    """MLflow. Relative paths in the URIs are relative to the project folder."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    #: Where new experiments keep their artifacts (a path or URI).
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "pricelevel"
    registered_model: str = "pricelevel"


class PromotionConfig(_Frozen):
    """When the challenger replaces the champion (rule in README "Promotion")."""

    #: The newest out-of-sample window both models are scored on: the last ``window_days`` of data.
    window_days: float = Field(90.0, gt=0)
    #: Tuned metric: challenger must beat the champion by more than this.
    min_improvement: float = Field(0.0, ge=0)
    #: Backtest metric on the same window; the challenger may be worse by at most ``backtest_tolerance``.
    backtest_metric: Literal["sharpe", "total_return", "calmar", "sortino"] = "sharpe"
    backtest_tolerance: float = Field(0.0, ge=0)


class Config(_Frozen):
    """The whole run. Each step receives only its own section."""

    data: DataConfig
    bybit: BybitConfig = BybitConfig()
    validation: ValidationConfig = ValidationConfig()
    flow: FlowConfig = FlowConfig()
    backtest: BacktestConfig = BacktestConfig()
    levels: LevelsConfig = LevelsConfig()
    labels: LabelsConfig = LabelsConfig()
    features: FeaturesConfig = FeaturesConfig()
    lookahead: LookaheadConfig = LookaheadConfig()
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    tuning: TuningConfig = TuningConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()

    @property
    def training_symbols(self) -> tuple[str, ...]:
        return self.dataset.symbols or self.data.symbols

    @property
    def model_inputs(self) -> ModelConfig:
        """``model`` as the feature set needs it: no symbol embedding when the set leaves ``symbol`` out."""
        if "symbol" in self.features.selected:
            return self.model
        return self.model.model_copy(update={"embedding_dim": 0})

    @property
    def optuna_storage(self) -> str:
        return self.tuning.storage or f"sqlite:///{self.data.root / 'optuna' / 'optuna.db'}"

    def with_root(self, project_root: Path) -> Config:
        """Resolve relative data paths against the project root (not the caller's working directory)."""

        def resolve(p: Path) -> Path:
            return p if p.is_absolute() else project_root / p

        data = self.data.model_copy(update={"root": resolve(self.data.root), "sample_dir": resolve(self.data.sample_dir)})
        tracking = self.tracking.model_copy(
            update={
                "tracking_uri": _resolve_uri(self.tracking.tracking_uri, project_root),
                "artifact_location": _resolve_uri(self.tracking.artifact_location, project_root),
            }
        )
        return self.model_copy(update={"data": data, "tracking": tracking})

    def flat(self) -> dict[str, Any]:
        """``{"data.root": ..., ...}`` for logging as parameters (contains no secrets by construction)."""
        return dict(_flatten(self.model_dump(mode="json")))


def _resolve_uri(uri: str, project_root: Path) -> str:
    """``sqlite:///rel.db`` and bare relative paths are made absolute under the project folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{project_root / uri.removeprefix('sqlite:///')}"
    if "://" not in uri and not Path(uri).is_absolute():
        return str(project_root / uri)
    return uri


# --------------------------------------------------------------------------------------------- loading


def data_overrides(**values: object) -> list[str]:
    """``--set``-style overrides of the ``data`` section from command/flow arguments (``None`` = not given)."""
    def text(value: object) -> str:
        return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list | tuple) else str(value)

    return [f"data.{name}={text(value)}" for name, value in values.items() if value is not None]


def load_config(
    base: Path,
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the :class:`Config` from the layers described in the module docstring.

    ``env`` is passed in (the CLI hands ``os.environ``) so that loading stays a pure function.
    Raises :class:`ConfigError` with one line naming the key, the layer it came from, and why.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge(merged, _read_yaml(base), origin, str(base))
    if config_file is not None:
        _merge(merged, _read_yaml(Path(config_file)), origin, str(config_file))
    for name, value in sorted((env or {}).items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = name[len(ENV_PREFIX):].lower().split("__")
            _merge(merged, _nest(path, _parse_scalar(value)), origin, name)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _merge(merged, _nest(key.strip().split("."), _parse_scalar(value)), origin, f"--set {key.strip()}")
    _reject_secrets(merged, origin)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, origin)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return loaded


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _merge(into: dict[str, Any], new: Mapping[str, Any], origin: dict[str, str], layer: str, prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, layer, dotted + ".")
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
            origin[dotted] = layer
            if isinstance(value, Mapping):
                for sub, _ in _flatten(value, dotted + "."):
                    origin[sub] = layer


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _reject_secrets(tree: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    for dotted, _ in _flatten(tree):
        if dotted.rsplit(".", 1)[-1].lower() in SECRET_KEYS:
            raise ConfigError(
                f"config error: {dotted} [from {origin.get(dotted, '?')}]: secrets are read only from the environment "
                "(BYBIT_API_KEY, BYBIT_API_SECRET, TELEGRAM_BOT_TOKEN), never from config"
            )


def _one_line(exc: ValidationError, origin: Mapping[str, str]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    key = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
    where = origin.get(key) or origin.get(key.rsplit(".", 1)[0]) or "defaults"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    got = "" if err["type"] in {"missing", "value_error"} else f" (got {err.get('input')!r})"
    if isinstance(err.get("input"), dict):
        got = ""
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config error: {loc or '<root>'}: {msg}{got} [from {where}]{more}"
