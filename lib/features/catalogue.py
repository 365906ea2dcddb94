"""Names of the model's input columns and of the groups a feature set lists (docs/concepts/walk-forward.md "Features"), read off the
feature registry (:mod:`pricelevel.features.registry`), which holds each feature as one entry.

Kept apart from :mod:`pricelevel.features.compute` (which computes them) so that configuration can validate a
feature set on load without importing the numerical code (the registry loads it only when a feature is computed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pricelevel.core.timeframes import Timeframe
from pricelevel.features.registry import CONTEXT, REGISTRY, SYMBOL, FeatureRegistry

if TYPE_CHECKING:
    from pricelevel.features.config import FeaturesConfig

__all__ = ["CONTEXT_VALUES", "GROUPS", "SYMBOL", "context_columns", "feature_columns", "needed_timeframes",
           "unknown_feature_names"]

#: The default registry's groups (group -> its columns) and a context timeframe's column names.
GROUPS: dict[str, tuple[str, ...]] = REGISTRY.groups
CONTEXT_VALUES = REGISTRY.context_values


def context_columns(
    timeframe: Timeframe, context_timeframes: Iterable[Timeframe], registry: FeatureRegistry = REGISTRY
) -> tuple[str, ...]:
    """The ``context`` group's columns for bars of ``timeframe``: only strictly longer timeframes join."""
    longer = [Timeframe(tf) for tf in context_timeframes if Timeframe(tf).delta > Timeframe(timeframe).delta]
    return tuple(f"ctx_{tf}_{name}" for tf in longer for name in registry.context_values)


def unknown_feature_names(entries: Iterable[str], registry: FeatureRegistry = REGISTRY) -> list[str]:
    """Entries of a feature set that are neither a group, a column, ``symbol`` nor a context column."""
    groups = registry.groups
    known = {*groups, CONTEXT, SYMBOL, *(c for cols in groups.values() for c in cols)}
    known |= set(context_columns(Timeframe.M1, list(Timeframe), registry))
    return [entry for entry in entries if entry not in known]


def feature_columns(
    config: FeaturesConfig, timeframe: Timeframe, registry: FeatureRegistry = REGISTRY
) -> tuple[str, ...]:
    """The selected set's columns, in order, for bars of ``timeframe`` (groups expanded, ``symbol`` dropped)."""
    groups = registry.groups
    columns: list[str] = []
    for entry in config.selected:
        if entry == CONTEXT:
            columns.extend(context_columns(timeframe, config.context_timeframes, registry))
        elif entry in groups:
            columns.extend(groups[entry])
        elif entry != SYMBOL:
            columns.append(entry)
    if not columns:
        raise ValueError(f"feature set {config.set!r} has no column at {timeframe} (context needs a longer timeframe)")
    return tuple(dict.fromkeys(columns))


def needed_timeframes(columns: Iterable[str]) -> tuple[Timeframe, ...]:
    """The longer timeframes whose candles ``columns`` read."""
    found = {Timeframe(c.split("_")[1]) for c in columns if c.startswith("ctx_")}
    return tuple(sorted(found, key=lambda tf: tf.delta))
