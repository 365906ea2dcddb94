"""A symbol's feature table: its candles of every timeframe it reads -> walk-forward levels -> one timestamped
frame of ``feature_<name>`` columns, ``near_level`` and ``target``. Training, scoring, the look-ahead check and
``pricelevel features`` all build it through :class:`TableSpec`, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.internals import create_dataframe_from_blocks

from pricelevel.core.cache import DerivedStore, SymbolStep, code_fingerprint, step_key
from pricelevel.core.files import files_fingerprint
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.features.catalogue import feature_columns, needed_timeframes
from pricelevel.features.compute import compute_features
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.features.labels import level_label, targets
from pricelevel.features.registry import REGISTRY, FeatureRegistry
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.history import history_from_frames, level_timeframes, read_history
from pricelevel.levels.walkforward import LevelHistory

#: Columns of a feature table besides the ``feature_<name>`` ones.
TABLE_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume", "near_level", "target")
FEATURE_PREFIX = "feature_"
STEP = "features"


def feature_table(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    history: LevelHistory,
    frames: Mapping[Timeframe, pd.DataFrame | None],
    labels: LabelsConfig,
    features: FeaturesConfig,
    registry: FeatureRegistry = REGISTRY,
) -> pd.DataFrame:
    """The timestamped table training reads: candles, ``feature_<name>`` columns, ``near_level``, ``target``.

    ``near_level`` is 1 when the close is within ``labels.threshold_frac`` of a level in force now (the
    baseline); ``target`` is what the model predicts, NaN where its horizon runs past the data. ``registry``:
    the features the names refer to (the default one but in tests).
    """
    timestamps = pd.DatetimeIndex(candles["timestamp"])
    close = candles["close"].to_numpy(dtype=np.float64)
    near = level_label(timestamps, close, history, labels.threshold_frac)
    columns = feature_columns(features, timeframe, registry)
    # The default registry is compute_features' own: not passed, so the call keeps the signature that the
    # look-ahead test's leaking stand-in (tests/test_lookahead.py) replaces.
    extra = {} if registry is REGISTRY else {"registry": registry}
    values = compute_features(candles, timeframe, columns, history, frames, **extra)
    target = targets(candles, near, labels)
    stamps = candles["timestamp"].array
    prices = [candles[c].to_numpy() for c in TABLE_COLUMNS[1:6]]
    block = values.to_numpy()
    if isinstance(stamps, pd.arrays.DatetimeArray) and all(p.dtype == np.float64 for p in [*prices, block]):
        return table_frame(stamps, prices, near, target, block, table_columns(columns), pd.RangeIndex(len(candles)))
    out = candles[list(TABLE_COLUMNS[:6])].reset_index(drop=True)
    out["near_level"] = near
    out["target"] = target
    for name in columns:
        out[FEATURE_PREFIX + name] = values[name].to_numpy()
    return out


def table_columns(columns: Sequence[str]) -> pd.Index:
    """A feature table's column names: :data:`TABLE_COLUMNS` then ``feature_<name>`` for ``columns``."""
    return pd.Index([*TABLE_COLUMNS, *(FEATURE_PREFIX + c for c in columns)])


def table_frame(
    timestamps: pd.api.extensions.ExtensionArray, prices: Sequence[np.ndarray], near: np.ndarray, target: np.ndarray,
    features: np.ndarray, columns: pd.Index, index: pd.Index,
) -> pd.DataFrame:
    """A feature table from its parts (``prices``: open, high, low, close, volume as float64; ``features``:
    rows x columns), laid out as blocks in one go: inserting ~45 columns one by one costs more than computing
    them."""
    n_prices, n_features = len(prices), features.shape[1]
    first_feature = len(TABLE_COLUMNS)
    blocks = [
        (timestamps, np.array([0])),
        (np.concatenate([np.stack(prices), features.T]),
         np.r_[1 : 1 + n_prices, first_feature : first_feature + n_features]),
        (np.asarray(near).reshape(1, -1), np.array([TABLE_COLUMNS.index("near_level")])),
        (np.asarray(target).reshape(1, -1), np.array([TABLE_COLUMNS.index("target")])),
    ]
    return create_dataframe_from_blocks(blocks, index=index, columns=columns)


@dataclass(frozen=True)
class TableSpec:
    """How a feature table is made: the bars' timeframe and the levels, labels and features settings (and the
    feature registry the names refer to: internal, the default one but in tests)."""

    timeframe: Timeframe
    levels: LevelsConfig
    labels: LabelsConfig
    features: FeaturesConfig
    registry: FeatureRegistry = REGISTRY

    @property
    def columns(self) -> tuple[str, ...]:
        """The feature columns, in the model's input order."""
        return feature_columns(self.features, self.timeframe, self.registry)

    @property
    def input_timeframes(self) -> tuple[Timeframe, ...]:
        """Every timeframe a table reads: the bars', the level filters' and the context features'."""
        wanted = {*level_timeframes(self.timeframe, self.levels), *needed_timeframes(self.columns)}
        return tuple(sorted(wanted, key=lambda tf: tf.delta))

    def read_frames(self, folder: CandleFolder, symbol: str) -> dict[Timeframe, pd.DataFrame | None]:
        return folder.read_many(symbol, self.input_timeframes)

    def build(self, frames: Mapping[Timeframe, pd.DataFrame | None]) -> tuple[LevelHistory, pd.DataFrame]:
        """Walk-forward levels and the feature table of one symbol, from these candles alone."""
        history = history_from_frames(frames, self.timeframe, self.levels)
        table = feature_table(frames[self.timeframe], self.timeframe, history, frames, self.labels, self.features,
                              self.registry)
        return history, table

    def table(self, frames: Mapping[Timeframe, pd.DataFrame | None]) -> pd.DataFrame:
        return self.build(frames)[1]

    def build_for(self, folder: CandleFolder, symbol: str) -> tuple[LevelHistory, pd.DataFrame]:
        """:meth:`build` from the candles of ``symbol`` in ``folder`` (which must have the bars' timeframe)."""
        folder.require([symbol], [self.timeframe])
        return self.build(self.read_frames(folder, symbol))


def write_table(folder: Path, symbol: str, table: pd.DataFrame) -> Path:
    path = folder / f"{symbol}.parquet"
    table.to_parquet(path, index=False)
    return path


def read_table(folder: Path, symbol: str) -> pd.DataFrame:
    return pd.read_parquet(folder / f"{symbol}.parquet")


def features_step(folder: CandleFolder, derived: DerivedStore, levels: SymbolStep, spec: TableSpec) -> SymbolStep:
    """The feature and label table of one symbol over its level history (``pricelevel features`` writes the same)."""
    symbol = levels.symbol
    fingerprint = files_fingerprint(folder.existing(symbol, spec.input_timeframes))
    key = step_key(
        STEP, levels=levels.key, data=fingerprint, labels=spec.labels.model_dump(mode="json"),
        features=spec.features.model_dump(mode="json"), code=code_fingerprint(feature_table),
    )

    def write(out: Path) -> None:
        frames = spec.read_frames(folder, symbol)
        history = read_history(levels.folder, symbol)
        table = feature_table(frames[spec.timeframe], spec.timeframe, history, frames, spec.labels, spec.features,
                              spec.registry)
        write_table(out, symbol, table)

    out, built = derived.build(STEP, key, write)
    target = read_table(out, symbol)["target"].to_numpy(dtype=np.float64)
    summary = (
        f"{len(target)} bars x {len(spec.columns)} features (set {spec.features.set!r}); {spec.labels.kind} target "
        f"positive on {100 * float(np.nanmean(target)):.2f}% of {int(np.isfinite(target).sum())} labelled bars"
    )
    return SymbolStep(STEP, symbol, key, out, fingerprint, built, summary)
