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

from pricelevel.config import DatasetConfig, LabelsConfig, LevelsConfig
from pricelevel.datafolder import CandleFolder
from pricelevel.dataset import SymbolFrame, TrainingData, build_training_data
from pricelevel.features import compute_features
from pricelevel.labels import level_label
from pricelevel.levels import LevelHistory, MultiTimeframe, nearest_level_distance
from pricelevel.timeframes import Timeframe

#: The timeframe each multi-timeframe filter reads.
FILTER_TIMEFRAMES = {"touches": Timeframe.D1, "volume": Timeframe.H4, "approach": Timeframe.H1}


def context_timeframes(levels: LevelsConfig) -> tuple[Timeframe, ...]:
    """The extra timeframes the enabled filters need."""
    filters = levels.filters
    return tuple(tf for name, tf in FILTER_TIMEFRAMES.items() if getattr(filters, name).enabled)


def read_context(folder: CandleFolder, symbol: str, levels: LevelsConfig) -> MultiTimeframe:
    """The 1d/4h/1h candles of ``symbol`` that the enabled filters read (missing ones stay ``None``)."""
    frames = {tf: folder.read_optional(symbol, tf) for tf in context_timeframes(levels)}
    return MultiTimeframe(d1=frames.get(Timeframe.D1), h4=frames.get(Timeframe.H4), h1=frames.get(Timeframe.H1))


# --------------------------------------------------------------------------------------- levels + labels


@dataclass(frozen=True)
class SymbolTable:
    """One symbol's bars with everything derived from them: levels in force, label, features, target."""

    symbol: str
    candles: pd.DataFrame
    history: LevelHistory
    distance: np.ndarray
    label: np.ndarray
    frame: SymbolFrame


def targets_from_labels(label: np.ndarray, horizon: int) -> np.ndarray:
    """``target[t] = label[t + horizon]``; the last ``horizon`` rows have no target (NaN)."""
    target = np.full(len(label), np.nan, dtype=np.float32)
    if horizon < len(label):
        target[:-horizon] = label[horizon:]
    return target


def symbol_table(
    symbol: str,
    candles: pd.DataFrame,
    history: LevelHistory,
    labels: LabelsConfig,
    features: Sequence[str],
) -> SymbolTable:
    """Label and features of every bar, from the walk-forward levels in force at that bar."""
    timestamps = pd.DatetimeIndex(candles["timestamp"])
    close = candles["close"].to_numpy(dtype=np.float64)
    distance = nearest_level_distance(timestamps, close, history)
    label = level_label(timestamps, close, history, labels.threshold_frac)
    values = compute_features(candles, features, level_distance=distance)
    frame = SymbolFrame(symbol=symbol, timestamps=timestamps, features=values, target=targets_from_labels(label, labels.horizon))
    return SymbolTable(symbol, candles, history, distance, label, frame)


def write_levels(folder: Path, symbol: str, history: LevelHistory) -> None:
    history.levels.to_parquet(folder / f"{symbol}_levels.parquet", index=False)
    pd.DataFrame({"asof": history.refits}).to_parquet(folder / f"{symbol}_refits.parquet", index=False)


def read_levels(folder: Path, symbol: str) -> LevelHistory:
    levels = pd.read_parquet(folder / f"{symbol}_levels.parquet")
    refits = pd.DatetimeIndex(pd.read_parquet(folder / f"{symbol}_refits.parquet")["asof"])
    return LevelHistory(refits=refits, levels=levels)


def write_table(folder: Path, table: SymbolTable, feature_names: Sequence[str]) -> None:
    """One Parquet file per symbol: the candles with their label, target and features (what training reads)."""
    out = table.candles[["timestamp", "open", "high", "low", "close", "volume"]].copy()
    out["level_distance_raw"] = table.distance
    out["label"] = table.label
    out["target"] = table.frame.target
    for i, name in enumerate(feature_names):
        out[f"feature_{name}"] = table.frame.features[:, i]
    out.to_parquet(folder / f"{table.symbol}.parquet", index=False)


def read_table(folder: Path, symbol: str, history: LevelHistory, feature_names: Sequence[str]) -> SymbolTable:
    data = pd.read_parquet(folder / f"{symbol}.parquet")
    timestamps = pd.DatetimeIndex(data["timestamp"])
    features = np.ascontiguousarray(data[[f"feature_{n}" for n in feature_names]].to_numpy(dtype=np.float32))
    frame = SymbolFrame(symbol, timestamps, features, data["target"].to_numpy(dtype=np.float32))
    candles = data[["timestamp", "open", "high", "low", "close", "volume"]]
    return SymbolTable(
        symbol, candles, history, data["level_distance_raw"].to_numpy(), data["label"].to_numpy(np.int8), frame
    )


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


def labels_at(tables: Mapping[str, SymbolTable], ends: pd.DataFrame, column: str = "label") -> np.ndarray:
    """The label (or ``target``) of each ``(symbol, timestamp)`` row of ``ends`` (a dataset's window ends),
    in the rows' order whatever the frame's index."""
    out = np.empty(len(ends), dtype=np.float64)
    symbols = ends["symbol"].to_numpy()
    timestamps = pd.DatetimeIndex(ends["timestamp"])
    for symbol in pd.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        table = tables[symbol]
        values = table.label if column == "label" else table.frame.target
        position = table.frame.timestamps.get_indexer(timestamps[rows])
        if (position < 0).any():
            raise KeyError(f"{symbol}: window ends not in its table")
        out[rows] = values[position]
    return out


def write_json(path: Path, payload: Mapping[str, object]) -> Path:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path
