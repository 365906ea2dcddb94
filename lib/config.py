"""The whole run's configuration: every stage's section composed into one frozen :class:`Config`.

Each section class lives in its stage package; this module only composes them and loads the layers,
in increasing precedence:

1. ``conf/base.yaml`` (every key, with comments; the one place defaults are written);
2. ``--config FILE.yaml`` (any subset of keys);
3. environment variables ``PRICELEVEL_<SECTION>__<KEY>`` (e.g. ``PRICELEVEL_DATA__ROOT``);
4. ``--set section.key=value`` on the command line.

Values given as text (env, ``--set``) are parsed as YAML scalars/lists, so ``--set data.symbols=[BTCUSDT]``
and ``PRICELEVEL_BYBIT__TESTNET=true`` work. Every value remembers the layer it came from
(:func:`explain_config`, ``pricelevel config show``). Secrets are *not* configuration: they live only in the
environment (see :mod:`pricelevel.core.secrets`) and a config file that names one is rejected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError, model_validator

from pricelevel.backtest.config import BacktestConfig, with_protections
from pricelevel.core.config import SECRET_KEYS, ConfigError, FlowConfig, Frozen
from pricelevel.core.runtime import project_root
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import BybitConfig, DataConfig, ValidationConfig
from pricelevel.features.config import FeaturesConfig, LabelsConfig, LookaheadConfig
from pricelevel.levels.config import LevelsConfig
from pricelevel.ml.config import (
    DatasetConfig,
    EvaluationConfig,
    GbmConfig,
    ModelConfig,
    TrainingConfig,
    TuningConfig,
)
from pricelevel.registry.config import PromotionConfig, TrackingConfig
from pricelevel.strategy.config import SelectionConfig
from pricelevel.telegram.config import TelegramConfig
from pricelevel.trading.config import RiskConfig, TraderConfig

if TYPE_CHECKING:
    from pricelevel.backtest.selection import StrategyContext
    from pricelevel.features.tables import TableSpec

ENV_PREFIX = "PRICELEVEL_"
BASE_CONFIG = Path("conf") / "base.yaml"
#: Layer names of :func:`explain_config` for the two fixed layers.
BASE_LAYER, DEFAULT_LAYER = "base", "default"


class _DataSections(Frozen):
    data: DataConfig
    bybit: BybitConfig = BybitConfig()
    validation: ValidationConfig = ValidationConfig()


class _ResearchSections(Frozen):
    levels: LevelsConfig = LevelsConfig()
    labels: LabelsConfig = LabelsConfig()
    features: FeaturesConfig = FeaturesConfig()
    lookahead: LookaheadConfig = LookaheadConfig()


class _TrainingSections(Frozen):
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    tuning: TuningConfig = TuningConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    selection: SelectionConfig = SelectionConfig()
    training: TrainingConfig = TrainingConfig()
    gbm: GbmConfig = GbmConfig()


class _RunSections(Frozen):
    flow: FlowConfig = FlowConfig()
    backtest: BacktestConfig = BacktestConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()


class _TradingSections(Frozen):
    trader: TraderConfig = TraderConfig()
    risk: RiskConfig = RiskConfig()
    telegram: TelegramConfig = TelegramConfig()


class Config(_DataSections, _ResearchSections, _TrainingSections, _RunSections, _TradingSections):
    """The whole run, one section per step (grouped by stage above). Each step receives only its own section."""

    @model_validator(mode="after")
    def _backtests_simulate_the_risk_limits(self) -> Config:
        """Every backtest (``backtest --model``, the folds, the rule search, the gate) applies the account
        protections the trader applies, with the limits of ``risk:`` (docs/concepts/trader.md "Risk": one judge)."""
        object.__setattr__(self, "backtest", with_protections(self.backtest, self.risk))
        return self

    @property
    def catalogue(self) -> DataCatalogue:
        """Every path under ``data.root``, for the configured source."""
        return DataCatalogue(self.data.root, self.data.source)

    @property
    def table_spec(self) -> TableSpec:
        """How the training tables are built: the dataset's timeframe with the levels, labels, features settings."""
        from pricelevel.features.tables import (
            TableSpec,  # the indicators are compiled code: load them when used
        )

        return TableSpec(self.dataset.timeframe, self.levels, self.labels, self.features)

    @property
    def strategy(self) -> StrategyContext:
        """What choosing and trading a model's rules needs: costs, the search, the defaults, the label."""
        from pricelevel.backtest.selection import (
            StrategyContext,  # the engine is compiled code: load it when used
        )
        from pricelevel.backtest.trading import rules_of

        return StrategyContext(self.backtest, self.selection, rules_of(self.backtest), self.labels.move_frac, self.labels.horizon)

    @property
    def training_symbols(self) -> tuple[str, ...]:
        return self.dataset.symbols or self.data.symbols

    @property
    def model_inputs(self) -> ModelConfig:
        """``model`` as the feature set needs it: no symbol embedding when the set leaves out ``symbol``."""
        if "symbol" in self.features.selected:
            return self.model
        return self.model.model_copy(update={"embedding_dim": 0})

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


@dataclass(frozen=True)
class Layers:
    """The merged, not yet validated tree and, per dotted key, the layer that set it."""

    tree: dict[str, Any]
    origin: dict[str, str]


def read_layers(
    base: Path,
    config_file: Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Layers:
    """Merge the layers of the module docstring; ``origin`` names each key's layer (``base``, the file's path,
    the ``PRICELEVEL_*`` variable, ``--set key``)."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge(merged, _read_yaml(base), origin, BASE_LAYER)
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
    return Layers(merged, origin)


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
    layers = read_layers(base, config_file, overrides, env)
    try:
        return Config.model_validate(layers.tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, layers.origin)) from None


def load_project_config(
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """The project's configuration (``conf/base.yaml`` + overlays), with data paths resolved to the root."""
    env = os.environ if env is None else env
    root = project_root(env)
    return load_config(root / BASE_CONFIG, Path(config_file) if config_file else None, overrides, env).with_root(root)


@dataclass(frozen=True)
class Setting:
    """One effective value and the layer it came from (``default`` when no layer set it)."""

    key: str
    value: Any
    layer: str


def explain_config(
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> list[Setting]:
    """Every key of the effective project configuration with the layer that set it, in key order."""
    env = os.environ if env is None else env
    root = project_root(env)
    layers = read_layers(root / BASE_CONFIG, Path(config_file) if config_file else None, overrides, env)
    config = load_project_config(config_file, overrides, env)

    def layer(key: str) -> str:
        while key:
            if key in layers.origin:
                return layers.origin[key]
            key = key.rpartition(".")[0]
        return DEFAULT_LAYER

    return [Setting(key, value, layer(key)) for key, value in sorted(config.flat().items())]


def explicit_settings(
    prefix: str, config_file: Path | str | None = None, overrides: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The keys under ``prefix`` (e.g. ``backtest.``) that a layer above ``conf/base.yaml`` set: what the user
    asked for explicitly, as opposed to the defaults (``{"threshold": 0.7}`` for ``--set backtest.threshold=0.7``)."""
    return {
        s.key.removeprefix(prefix): s.value for s in explain_config(config_file, overrides, env)
        if s.key.startswith(prefix) and s.layer not in (BASE_LAYER, DEFAULT_LAYER)
    }


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
