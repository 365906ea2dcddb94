"""The feature registry: every per-bar feature is one :class:`Feature` entry, and both table builders iterate it
(:func:`pricelevel.features.compute.compute_features` over the whole history, :class:`~pricelevel.features.
incremental.TableBuilder` bar by bar), as does the catalogue of names a feature set may list. Adding a feature is
adding one entry to :data:`REGISTRY` (docs/concepts/walk-forward.md "Features", "How to add a feature").

An entry names its column and group, the :class:`Indicator` series it reads, a normaliser that turns them into the
scale-free column row by row, and its warm-up (leading NaN rows on finite candles). An indicator knows how to
compute its series over the whole history (``batch``) and how to continue it over appended bars from a state
(``start``, ``resume``), to the bit: ``tests/test_feature_registry.py`` checks every entry for both, and that a
feature added only here appears identically in both builders' tables. Features that share an indicator (equal
indicators are one) read one computation of it. ``context=True`` entries are also computed on the candles of
every longer ``context`` timeframe (``ctx_<tf>_<name>``).

The ``levels`` and ``level_strength`` columns are not entries: they are computed together from the walk-forward
level set in force (:func:`pricelevel.features.compute.level_columns`, shared by both builders); their names are
listed here (:data:`LEVEL_GROUPS`) with the ATR they are measured in (:data:`LEVEL_ATR`).

This module does not import the compiled indicators until a feature is computed, so that loading a config (which
validates feature names against the registry) stays light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

#: A ``features.sets`` entry that is not a column: the model's symbol embedding.
SYMBOL = "symbol"
#: The group of the longer-timeframe columns (expanded per timeframe, :data:`FeatureRegistry.context_values`).
CONTEXT = "context"
#: The context column that reads the bar's own close too: log of the bar's close over the context candle's.
CLOSE_GAP = "close_gap"


@cache  # an import statement costs ~1 us: paid once, not at every indicator of every bar
def _ta() -> ModuleType:
    """:mod:`pricelevel.ta.indicators` (compiled with numba), imported when a feature is computed."""
    from pricelevel.ta import indicators

    return indicators


class Bars(NamedTuple):
    """One timeframe's candles as float64 arrays, row-aligned."""

    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray

    def rows(self, begin: int) -> Bars:
        """Rows ``begin..`` (views)."""
        return Bars(self.high[begin:], self.low[begin:], self.close[begin:], self.volume[begin:])


# ----------------------------------------------------------------------------------------------- indicators


class Indicator(ABC):
    """A causal series over one timeframe's bars (an array, or a named tuple of arrays), computed over the whole
    history or continued over appended bars; both give the same values to the bit. Subclasses are frozen
    dataclasses, so equal parameters make equal indicators, computed once per table."""

    @abstractmethod
    def batch(self, bars: Bars) -> Any:
        """The series over every row of ``bars`` (NaN where not yet defined)."""

    @abstractmethod
    def start(self, bars: Bars) -> Any:
        """The state after the last row of ``bars`` (what :meth:`resume` continues from)."""

    @abstractmethod
    def resume(self, bars: Bars, begin: int, state: Any) -> tuple[Any, Any]:
        """The series of rows ``begin..`` of ``bars`` (whose rows before ``begin`` gave ``state``) and the state
        after the last row. ``begin`` is past the warm-up of every feature that reads it, prices are finite."""


class _Windowed(Indicator):
    """A series whose row ``t`` reads rows ``t - tail .. t`` only: no state, resumed by recomputing on a tail."""

    tail: int

    def start(self, bars: Bars) -> None:
        return None

    def resume(self, bars: Bars, begin: int, state: None) -> tuple[Any, None]:
        return self.batch(bars.rows(begin - self.tail))[self.tail :], None


class _WindowedOnClose(_Windowed):
    """A windowed series of the close alone (slices one array per bar, not four)."""

    def batch(self, bars: Bars) -> np.ndarray:
        return self.of_close(bars.close)

    def resume(self, bars: Bars, begin: int, state: None) -> tuple[np.ndarray, None]:
        return self.of_close(bars.close[begin - self.tail :])[self.tail :], None

    @abstractmethod
    def of_close(self, close: np.ndarray) -> np.ndarray:
        """The series of these closes."""


class _LastValue(Indicator):
    """A recursion whose state is its last value (EMA, Wilder's ATR, force index)."""

    def start(self, bars: Bars) -> float:
        return float(self.batch(bars)[-1])

    def resume(self, bars: Bars, begin: int, state: float) -> tuple[np.ndarray, float]:
        values = self.continue_from(bars, begin, state)
        return values, float(values[-1])

    @abstractmethod
    def continue_from(self, bars: Bars, begin: int, last: float) -> np.ndarray:
        """Rows ``begin..`` from ``last``, the value at row ``begin - 1``."""


@dataclass(frozen=True)
class LogReturn(_WindowedOnClose):
    window: int

    @property
    def tail(self) -> int:
        return self.window

    def of_close(self, close: np.ndarray) -> np.ndarray:
        return _ta().log_return(close, self.window)


@dataclass(frozen=True)
class LogVolumeChange(_Windowed):
    """``log1p(volume[t]) - log1p(volume[t - 1])``; NaN on the first row."""

    tail = 1

    def batch(self, bars: Bars) -> np.ndarray:
        logs = np.log1p(bars.volume)
        out = np.full_like(logs, np.nan)
        out[1:] = np.diff(logs)
        return out

    def resume(self, bars: Bars, begin: int, state: None) -> tuple[np.ndarray, None]:
        return np.diff(np.log1p(bars.volume[begin - 1 :])), None


@dataclass(frozen=True)
class Cci(_Windowed):
    window: int

    @property
    def tail(self) -> int:
        return self.window - 1

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().cci(bars.high, bars.low, bars.close, self.window)


@dataclass(frozen=True)
class RateOfChange(_WindowedOnClose):
    window: int

    @property
    def tail(self) -> int:
        return self.window

    def of_close(self, close: np.ndarray) -> np.ndarray:
        return _ta().rate_of_change(close, self.window)


@dataclass(frozen=True)
class Volatility(Indicator):
    """Sample deviation of the 1-bar log returns (its exact restarts make it resume from an aligned row)."""

    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().rolling_volatility(bars.close, self.window)

    def start(self, bars: Bars) -> None:
        return None

    def resume(self, bars: Bars, begin: int, state: None) -> tuple[np.ndarray, None]:
        return _ta().rolling_volatility_resume(bars.close, self.window, begin), None


@dataclass(frozen=True)
class Sma(Indicator):
    """Simple moving average of ``source`` (``close`` or ``volume``)."""

    source: str
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().sma(getattr(bars, self.source), self.window)

    def start(self, bars: Bars) -> tuple:
        return _ta().sma_state(getattr(bars, self.source), self.window)

    def resume(self, bars: Bars, begin: int, state: tuple) -> tuple[np.ndarray, tuple]:
        return _ta().sma_resume(getattr(bars, self.source), self.window, begin, state)


@dataclass(frozen=True)
class Ema(_LastValue):
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().ema(bars.close, self.window)

    def continue_from(self, bars: Bars, begin: int, last: float) -> np.ndarray:
        return _ta().ema_resume(bars.close, self.window, begin, last)


@dataclass(frozen=True)
class Atr(_LastValue):
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().atr(bars.high, bars.low, bars.close, self.window)

    def continue_from(self, bars: Bars, begin: int, last: float) -> np.ndarray:
        return _ta().atr_resume(bars.high, bars.low, bars.close, self.window, begin, last)


@dataclass(frozen=True)
class ForceIndex(_LastValue):
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().force_index(bars.close, bars.volume, self.window)

    def continue_from(self, bars: Bars, begin: int, last: float) -> np.ndarray:
        return _ta().force_index_resume(bars.close, bars.volume, self.window, begin, last)


@dataclass(frozen=True)
class EaseOfMovement(Indicator):
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().ease_of_movement(bars.high, bars.low, bars.volume, self.window)

    def start(self, bars: Bars) -> tuple:
        return _ta().ease_of_movement_state(bars.high, bars.low, bars.volume, self.window)

    def resume(self, bars: Bars, begin: int, state: tuple) -> tuple[np.ndarray, tuple]:
        return _ta().ease_of_movement_resume(bars.high, bars.low, bars.volume, self.window, begin, state)


@dataclass(frozen=True)
class Rsi(Indicator):
    window: int

    def batch(self, bars: Bars) -> np.ndarray:
        return _ta().rsi(bars.close, self.window)

    def start(self, bars: Bars) -> tuple[float, float]:
        return _ta().rsi_state(bars.close, self.window)

    def resume(self, bars: Bars, begin: int, state: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
        return _ta().rsi_resume(bars.close, self.window, begin, state)


@dataclass(frozen=True)
class Macd(Indicator):
    """MACD line, signal line and histogram (``indicators.MACD``)."""

    fast: int
    slow: int
    signal: int

    def batch(self, bars: Bars) -> Any:
        return _ta().macd(bars.close, self.fast, self.slow, self.signal)

    def start(self, bars: Bars) -> tuple[float, float, float]:
        return _ta().macd_state(bars.close, self.fast, self.slow, self.signal)

    def resume(self, bars: Bars, begin: int, state: tuple) -> tuple[Any, tuple]:
        return _ta().macd_resume(bars.close, self.fast, self.slow, self.signal, begin, state)


@dataclass(frozen=True)
class BollingerBands(Indicator):
    """Upper, middle and lower band (``indicators.Bollinger``); the state is the middle band's."""

    window: int
    n_std: float

    def batch(self, bars: Bars) -> Any:
        return _ta().bollinger(bars.close, self.window, self.n_std)

    def start(self, bars: Bars) -> tuple:
        return _ta().sma_state(bars.close, self.window)

    def resume(self, bars: Bars, begin: int, state: tuple) -> tuple[Any, tuple]:
        return _ta().bollinger_resume(bars.close, self.window, self.n_std, begin, state)


# ----------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Feature:
    """One model input column: ``normalise(bars, *values of inputs)`` row by row (each row from that row's values
    alone, so the incremental builder applies it to the new rows only); NaN on the first ``warmup`` rows of
    finite candles; ``context``: also a ``ctx_<tf>_<name>`` column of each longer context timeframe."""

    name: str
    group: str
    inputs: tuple[Indicator, ...]
    normalise: Callable[..., np.ndarray]
    warmup: int
    context: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            problems.append(f"name {self.name!r} is not an identifier")
        if not (isinstance(self.group, str) and self.group.isidentifier()) or self.group in (CONTEXT, SYMBOL):
            problems.append(f"group {self.group!r} is not a group name")
        if not isinstance(self.inputs, tuple) or not all(isinstance(i, Indicator) for i in self.inputs):
            problems.append("inputs must be a tuple of Indicator")
        if not callable(self.normalise):
            problems.append("normalise must be callable")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            problems.append(f"warmup must be an int >= 0, got {self.warmup!r}")
        if problems:
            raise ValueError(f"feature {self.name!r}: {'; '.join(problems)}")


@dataclass(frozen=True, eq=False)
class FeaturePlan:
    """What computing some entries takes, worked out once: the distinct indicators they read (and ``extra`` ones,
    e.g. the levels' ATR), and where each entry's inputs are among them. Both builders compute ``indicators`` in
    this order (whole, or resumed) and hand the values to :meth:`values`."""

    features: tuple[Feature, ...]
    indicators: tuple[Indicator, ...]
    positions: tuple[tuple[int, ...], ...]  # per feature: its inputs' rows of `indicators`

    @classmethod
    def of(cls, features: Iterable[Feature], extra: Iterable[Indicator] = ()) -> FeaturePlan:
        features = tuple(features)
        indicators = tuple(dict.fromkeys([*(i for f in features for i in f.inputs), *extra]))
        where = {indicator: k for k, indicator in enumerate(indicators)}
        return cls(features, indicators, tuple(tuple(where[i] for i in f.inputs) for f in features))

    def batch(self, bars: Bars) -> list[Any]:
        """Every indicator over the whole of ``bars``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return [indicator.batch(bars) for indicator in self.indicators]

    def start(self, bars: Bars) -> tuple:
        """Every indicator's state after the last row of ``bars``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return tuple(indicator.start(bars) for indicator in self.indicators)

    def resume(self, bars: Bars, begin: int, states: tuple) -> tuple[list[Any], tuple]:
        """Every indicator over rows ``begin..`` of ``bars``, continued from ``states``, and the new states."""
        series, new_states = [], []
        with np.errstate(divide="ignore", invalid="ignore"):
            for indicator, state in zip(self.indicators, states, strict=True):
                values, state = indicator.resume(bars, begin, state)
                series.append(values)
                new_states.append(state)
        return series, tuple(new_states)

    def values(self, bars: Bars, series: Sequence[Any]) -> dict[str, np.ndarray]:
        """Each feature's column for the rows of ``bars``, from the indicators' values on those rows."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                f.name: f.normalise(bars, *[series[k] for k in at])
                for f, at in zip(self.features, self.positions, strict=True)
            }


#: The ``levels`` and ``level_strength`` columns (computed together from the level set, not registry entries).
LEVEL_GROUPS: Mapping[str, tuple[str, ...]] = {
    "levels": ("level_distance", "support_distance_atr", "resistance_distance_atr"),
    "level_strength": (
        "support_touches", "support_extrema", "support_age_days",
        "resistance_touches", "resistance_extrema", "resistance_age_days",
    ),
}
#: The ATR the level distances are measured in.
LEVEL_ATR = Atr(14)


@dataclass(frozen=True)
class FeatureRegistry:
    """The per-bar features, in the order groups expand to columns."""

    features: tuple[Feature, ...]
    #: Context entries whose ``ctx_<tf>_*`` columns come first, in this order (the order trained models read);
    #: the other ``context=True`` entries follow in registry order.
    context_order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        stray = sorted(set(self.context_order) - {f.name for f in self.features if f.context})
        if stray:
            raise ValueError(f"context_order names entries without context=True: {stray}")
        level_names = {c for columns in LEVEL_GROUPS.values() for c in columns}
        clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & level_names))
        if clashes:
            raise ValueError(f"feature names must be unique: {clashes}")
        taken = sorted({f.group for f in self.features} & {*LEVEL_GROUPS, *names})
        if taken:
            raise ValueError(f"feature groups clash with the level groups or a column name: {taken}")

    def __reduce__(self) -> str | tuple:
        # The default registry pickles by reference (its normalisers are lambdas); another one as its entries.
        return "REGISTRY" if self is REGISTRY else (FeatureRegistry, (self.features, self.context_order))

    def with_features(self, *features: Feature) -> FeatureRegistry:
        return FeatureRegistry((*self.features, *features), self.context_order)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Group -> its columns: the entries' groups in order of first appearance, then the level groups."""
        groups: dict[str, list[str]] = {}
        for f in self.features:
            groups.setdefault(f.group, []).append(f.name)
        return {**{g: tuple(names) for g, names in groups.items()}, **LEVEL_GROUPS}

    @property
    def context_values(self) -> tuple[str, ...]:
        """The names of a context timeframe's columns (``ctx_<tf>_<name>``)."""
        return (*(f.name for f in self.context_features), CLOSE_GAP)

    @property
    def context_features(self) -> tuple[Feature, ...]:
        """The ``context=True`` entries in the order of their columns."""
        rank = {name: k for k, name in enumerate(self.context_order)}
        ranked = [f for f in self.features if f.context]
        return tuple(sorted(ranked, key=lambda f: rank.get(f.name, len(rank))))  # stable: the rest in registry order

    def select(self, columns: Iterable[str]) -> tuple[Feature, ...]:
        """The entries among ``columns``, in registry order."""
        wanted = set(columns)
        return tuple(f for f in self.features if f.name in wanted)


_BANDS = BollingerBands(20, 2.0)
_MACD = Macd(12, 26, 9)

#: Every per-bar feature (docs/concepts/walk-forward.md "Features"); the order is the order of the columns a group expands to.
REGISTRY = FeatureRegistry((
    # returns
    Feature("log_return", "returns", (LogReturn(1),), lambda bars, r: r, warmup=1, context=True),
    Feature("log_return_6", "returns", (LogReturn(6),), lambda bars, r: r, warmup=6),
    Feature("log_return_24", "returns", (LogReturn(24),), lambda bars, r: r, warmup=24),
    Feature("log_range", "returns", (), lambda bars: np.log(bars.high / bars.low), warmup=0),
    Feature("volume_change", "returns", (LogVolumeChange(),), lambda bars, change: change, warmup=1),
    Feature("volatility_24", "returns", (Volatility(24),), lambda bars, vol: vol, warmup=24),
    # indicators
    Feature("cci_20", "indicators", (Cci(20),), lambda bars, cci: cci / 100.0, warmup=19),
    Feature("eom_14", "indicators", (EaseOfMovement(14), Sma("volume", 14)),  # x mean volume / close^2: scale-free
            lambda bars, eom, volume: eom / 1e8 * volume / bars.close**2, warmup=14),
    Feature("sma_gap_20", "indicators", (_BANDS,), lambda bars, b: bars.close / b.middle - 1.0, warmup=19,
            context=True),  # Bollinger's middle band is the SMA(20): one rolling sum for both
    Feature("ema_gap_50", "indicators", (Ema(50),), lambda bars, ema: bars.close / ema - 1.0, warmup=49),
    Feature("bollinger_pct_b", "indicators", (_BANDS,),
            lambda bars, b: (bars.close - b.lower) / (b.upper - b.lower), warmup=19),
    Feature("bollinger_width", "indicators", (_BANDS,), lambda bars, b: (b.upper - b.lower) / b.middle, warmup=19),
    Feature("force_index_13", "indicators", (ForceIndex(13), Sma("volume", 13)),
            lambda bars, force, volume: force / (bars.close * volume), warmup=13),
    Feature("roc_10", "indicators", (RateOfChange(10),), lambda bars, roc: roc / 100.0, warmup=10),
    Feature("rsi_14", "indicators", (Rsi(14),), lambda bars, rsi: rsi / 100.0, warmup=14, context=True),
    Feature("macd", "indicators", (_MACD,), lambda bars, m: m.macd / bars.close, warmup=25),
    Feature("macd_signal", "indicators", (_MACD,), lambda bars, m: m.signal / bars.close, warmup=33),
    Feature("macd_hist", "indicators", (_MACD,), lambda bars, m: m.histogram / bars.close, warmup=33),
    Feature("atr_14", "indicators", (LEVEL_ATR,), lambda bars, atr: atr / bars.close, warmup=14, context=True),
), context_order=("log_return", "rsi_14", "atr_14", "sma_gap_20"))
