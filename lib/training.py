"""The training pipeline's steps as library calls; the Prefect tasks in ``tasks/train.py`` only wrap them.

    candles --levels--> LevelHistory --labels/features--> SymbolTable --dataset--> TrainingData
            --tune--> best params --fit--> model --evaluate / backtest--> scores, report

Every step that is expensive writes to a folder named by its :func:`pricelevel.steps.step_key`, so a re-run
with the same data, config and code reads instead of recomputing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pricelevel.config import DatasetConfig, FeaturesConfig, LabelsConfig, LevelsConfig
from pricelevel.datafolder import CandleFolder
from pricelevel.dataset import SymbolFrame, TrainingData, build_training_data
from pricelevel.feature_catalogue import feature_columns, needed_timeframes
from pricelevel.features import compute_features
from pricelevel.labels import level_label, targets
from pricelevel.levels import FILTER_TIMEFRAMES, LevelHistory, MultiTimeframe, walk_forward_levels
from pricelevel.timeframes import Timeframe

#: Columns of a feature table besides the ``feature_<name>`` ones.
TABLE_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume", "near_level", "target")
FEATURE_PREFIX = "feature_"


def context_timeframes(levels: LevelsConfig) -> tuple[Timeframe, ...]:
    """The extra timeframes the enabled filters need."""
    filters = levels.filters
    return tuple(tf for name, (tf, _) in FILTER_TIMEFRAMES.items() if getattr(filters, name).enabled)


def input_timeframes(timeframe: Timeframe, levels: LevelsConfig, features: FeaturesConfig) -> tuple[Timeframe, ...]:
    """Every timeframe a symbol's feature table reads: the bars', the filters' and the context features'."""
    wanted = {Timeframe(timeframe), *context_timeframes(levels)}
    wanted |= set(needed_timeframes(feature_columns(features, timeframe)))
    return tuple(sorted(wanted, key=lambda tf: tf.delta))


def read_frames(folder: CandleFolder, symbol: str, timeframes: Sequence[Timeframe]) -> dict[Timeframe, pd.DataFrame | None]:
    """Candles of ``symbol`` per timeframe (``None`` where the folder has none)."""
    return {Timeframe(tf): folder.read_optional(symbol, tf) for tf in timeframes}


def level_context(frames: Mapping[Timeframe, pd.DataFrame | None]) -> MultiTimeframe:
    return MultiTimeframe(d1=frames.get(Timeframe.D1), h4=frames.get(Timeframe.H4), h1=frames.get(Timeframe.H1))


def read_context(folder: CandleFolder, symbol: str, levels: LevelsConfig) -> MultiTimeframe:
    """The 1d/4h/1h candles of ``symbol`` that the enabled filters read (missing ones stay ``None``)."""
    return level_context(read_frames(folder, symbol, context_timeframes(levels)))


# --------------------------------------------------------------------------------------- levels + labels


def feature_table(
    candles: pd.DataFrame,
    timeframe: Timeframe,
    history: LevelHistory,
    frames: Mapping[Timeframe, pd.DataFrame | None],
    labels: LabelsConfig,
    features: FeaturesConfig,
) -> pd.DataFrame:
    """The timestamped table training reads: candles, ``feature_<name>`` columns, ``near_level``, ``target``.

    ``near_level`` is 1 when the close is within ``labels.threshold_frac`` of a level in force now (the
    baseline); ``target`` is what the model predicts, NaN where its horizon runs past the data.
    """
    timestamps = pd.DatetimeIndex(candles["timestamp"])
    close = candles["close"].to_numpy(dtype=np.float64)
    near = level_label(timestamps, close, history, labels.threshold_frac)
    columns = feature_columns(features, timeframe)
    values = compute_features(candles, timeframe, columns, history, frames)
    out = candles[["timestamp", "open", "high", "low", "close", "volume"]].reset_index(drop=True)
    out["near_level"] = near
    out["target"] = targets(candles, near, labels)
    for name in columns:
        out[FEATURE_PREFIX + name] = values[name].to_numpy()
    return out


def build_table(
    frames: Mapping[Timeframe, pd.DataFrame | None],
    timeframe: Timeframe,
    levels: LevelsConfig,
    labels: LabelsConfig,
    features: FeaturesConfig,
) -> tuple[LevelHistory, pd.DataFrame]:
    """Walk-forward levels and the feature table of one symbol, from its candles alone (every timeframe)."""
    candles = frames.get(Timeframe(timeframe))
    if candles is None:
        raise ValueError(f"no {timeframe} candles")
    history = walk_forward_levels(candles, timeframe, levels, level_context(frames))
    return history, feature_table(candles, timeframe, history, frames, labels, features)


@dataclass(frozen=True)
class SymbolTable:
    """One symbol's bars with everything derived from them: levels in force, the baseline flag, features,
    target."""

    symbol: str
    candles: pd.DataFrame
    history: LevelHistory
    near_level: np.ndarray
    frame: SymbolFrame


def symbol_table(symbol: str, table: pd.DataFrame, history: LevelHistory, columns: Sequence[str]) -> SymbolTable:
    """The model's view of a feature table: ``columns`` (in order) as float32 and the target."""
    missing = [c for c in columns if FEATURE_PREFIX + c not in table.columns]
    if missing:
        raise KeyError(f"{symbol}: the feature table has no column(s) {missing}")
    timestamps = pd.DatetimeIndex(table["timestamp"])
    features = np.ascontiguousarray(table[[FEATURE_PREFIX + c for c in columns]].to_numpy(dtype=np.float32))
    frame = SymbolFrame(symbol, timestamps, features, table["target"].to_numpy(dtype=np.float32))
    candles = table[["timestamp", "open", "high", "low", "close", "volume"]]
    return SymbolTable(symbol, candles, history, table["near_level"].to_numpy(np.int8), frame)


def write_levels(folder: Path, symbol: str, history: LevelHistory) -> None:
    history.levels.to_parquet(folder / f"{symbol}_levels.parquet", index=False)
    pd.DataFrame({"asof": history.refits}).to_parquet(folder / f"{symbol}_refits.parquet", index=False)


def read_levels(folder: Path, symbol: str) -> LevelHistory:
    levels = pd.read_parquet(folder / f"{symbol}_levels.parquet")
    refits = pd.DatetimeIndex(pd.read_parquet(folder / f"{symbol}_refits.parquet")["asof"])
    return LevelHistory(refits=refits, levels=levels)


def write_table(folder: Path, symbol: str, table: pd.DataFrame) -> Path:
    path = folder / f"{symbol}.parquet"
    table.to_parquet(path, index=False)
    return path


def read_table(folder: Path, symbol: str) -> pd.DataFrame:
    return pd.read_parquet(folder / f"{symbol}.parquet")


# --------------------------------------------------------------------------------------------- dataset


def embargo_bars(dataset: DatasetConfig, seq_lens: Sequence[int], horizon: int) -> int:
    """Gap between segments: the longest window any trial may use plus the label horizon."""
    return max([dataset.seq_len, *seq_lens]) + horizon


def training_data(
    tables: Mapping[str, SymbolTable], dataset: DatasetConfig, seq_len: int, embargo: int
) -> TrainingData:
    frames = [tables[s].frame for s in sorted(tables)]
    return build_training_data(frames, seq_len, dataset.val_frac, dataset.test_frac, embargo, symbols=sorted(tables))


def dataset_summary(data: TrainingData) -> dict[str, object]:
    """Sizes, boundaries and base rates of each segment (logged as an artifact, shown in the UI)."""
    summary: dict[str, object] = {"symbols": list(data.symbols), "seq_len": data.train.seq_len}
    for name, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        targets = part.targets()
        summary[f"{name}_windows"] = len(part)
        summary[f"{name}_positive_rate"] = float(np.mean(targets)) if len(targets) else float("nan")
    summary.update({k: str(v) for k, v in vars(data.bounds).items()})
    return summary


def labels_at(tables: Mapping[str, SymbolTable], ends: pd.DataFrame, column: str = "near_level") -> np.ndarray:
    """The ``near_level`` flag (or ``target``) of each ``(symbol, timestamp)`` row of ``ends`` (a dataset's window ends),
    in the rows' order whatever the frame's index."""
    out = np.empty(len(ends), dtype=np.float64)
    symbols = ends["symbol"].to_numpy()
    timestamps = pd.DatetimeIndex(ends["timestamp"])
    for symbol in pd.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        table = tables[symbol]
        values = table.near_level if column == "near_level" else table.frame.target
        position = table.frame.timestamps.get_indexer(timestamps[rows])
        if (position < 0).any():
            raise KeyError(f"{symbol}: window ends not in its table")
        out[rows] = values[position]
    return out


def write_json(path: Path, payload: Mapping[str, object]) -> Path:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path
