"""Names of the model's input columns and of the groups a feature set lists (README "Features").

Kept apart from :mod:`pricelevel.features` (which computes them) so that configuration can validate a
feature set on load without importing the numerical code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pricelevel.core.timeframes import Timeframe

if TYPE_CHECKING:
    from pricelevel.features.config import FeaturesConfig

SYMBOL = "symbol"
GROUPS: dict[str, tuple[str, ...]] = {
    "returns": ("log_return", "log_return_6", "log_return_24", "log_range", "volume_change", "volatility_24"),
    "indicators": (
        "cci_20", "eom_14", "sma_gap_20", "ema_gap_50", "bollinger_pct_b", "bollinger_width", "force_index_13",
        "roc_10", "rsi_14", "macd", "macd_signal", "macd_hist", "atr_14",
    ),
    "levels": ("level_distance", "support_distance_atr", "resistance_distance_atr"),
    "level_strength": (
        "support_touches", "support_extrema", "support_age_days",
        "resistance_touches", "resistance_extrema", "resistance_age_days",
    ),
}
CONTEXT_VALUES = ("log_return", "rsi_14", "atr_14", "sma_gap_20", "close_gap")


def context_columns(timeframe: Timeframe, context_timeframes: Iterable[Timeframe]) -> tuple[str, ...]:
    """The ``context`` group's columns for bars of ``timeframe``: only strictly longer timeframes join."""
    longer = [Timeframe(tf) for tf in context_timeframes if Timeframe(tf).delta > Timeframe(timeframe).delta]
    return tuple(f"ctx_{tf}_{name}" for tf in longer for name in CONTEXT_VALUES)


def unknown_feature_names(entries: Iterable[str]) -> list[str]:
    """Entries of a feature set that are neither a group, a column, ``symbol`` nor a context column."""
    known = {*GROUPS, "context", SYMBOL, *(c for cols in GROUPS.values() for c in cols)}
    known |= set(context_columns(Timeframe.M1, list(Timeframe)))
    return [entry for entry in entries if entry not in known]


def feature_columns(config: FeaturesConfig, timeframe: Timeframe) -> tuple[str, ...]:
    """The selected set's columns, in order, for bars of ``timeframe`` (groups expanded, ``symbol`` dropped)."""
    columns: list[str] = []
    for entry in config.selected:
        if entry == "context":
            columns.extend(context_columns(timeframe, config.context_timeframes))
        elif entry in GROUPS:
            columns.extend(GROUPS[entry])
        elif entry != SYMBOL:
            columns.append(entry)
    if not columns:
        raise ValueError(f"feature set {config.set!r} has no column at {timeframe} (context needs a longer timeframe)")
    return tuple(dict.fromkeys(columns))


def needed_timeframes(columns: Iterable[str]) -> tuple[Timeframe, ...]:
    """The longer timeframes whose candles ``columns`` read."""
    found = {Timeframe(c.split("_")[1]) for c in columns if c.startswith("ctx_")}
    return tuple(sorted(found, key=lambda tf: tf.delta))
