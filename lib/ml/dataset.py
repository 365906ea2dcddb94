"""Chronological splits, train-only normalisation and sliding windows over per-symbol feature arrays.

Windows are never materialised: a :class:`WindowDataset` keeps one normalised array per symbol and an
index of window end rows, and ``__getitem__`` returns a view. Memory is O(bars), whatever ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pricelevel.core.cache import SymbolStep, code_fingerprint, step_key
from pricelevel.features.tables import FEATURE_PREFIX, TableSpec, read_table
from pricelevel.levels.history import read_history
from pricelevel.levels.walkforward import LevelHistory
from pricelevel.ml.config import DatasetConfig
from pricelevel.ml.spec import POOLED, FeatureStats

#: A standard deviation below this is "constant": dividing by it would blow the feature up.
STD_FLOOR = 1e-8


@dataclass(frozen=True)
class SymbolFrame:
    """One symbol's raw (not normalised) features and targets, one row per bar, oldest first.

    A row with a non-finite feature (an indicator's warm-up) is kept in place but no window includes it.

    ``target[t]`` is what the window ending at ``t`` predicts (see :mod:`pricelevel.labels`); NaN where
    there is none (the last ``horizon`` bars).
    """

    symbol: str
    timestamps: pd.DatetimeIndex
    features: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.timestamps)
        if self.features.ndim != 2 or len(self.features) != n or self.target.shape != (n,):
            raise ValueError(
                f"{self.symbol}: {n} timestamps but features {self.features.shape} and target {self.target.shape}"
            )
        if not self.timestamps.is_monotonic_increasing or not self.timestamps.is_unique:
            raise ValueError(f"{self.symbol}: timestamps must be strictly increasing")


@dataclass(frozen=True)
class SplitBounds:
    """Inclusive bounds of the three chronological segments; embargo gaps lie between them. ``test_end`` is
    ``None`` for the newest fold (its test runs to the end of the data)."""

    train_end: pd.Timestamp
    val_start: pd.Timestamp
    val_end: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp | None = None


def walk_forward_bounds(
    frames: Sequence[SymbolFrame], val_frac: float, test_frac: float, embargo: int, folds: int = 1
) -> list[SplitBounds]:
    """Expanding-window folds on the union of all symbols' timestamps, oldest first:
    train (from the start) | embargo | validation | embargo | test, where the folds' test segments are the last
    ``folds`` slices of ``test_frac`` each, one after the other, and the newest fold's test ends with the data.

    One timeline for every symbol, so no symbol's validation bars are another symbol's training bars in
    time. ``embargo`` (at least ``seq_len + horizon``) keeps windows and their labels from straddling a cut.
    ``folds=1`` is the single chronological split.
    """
    if embargo < 0:
        raise ValueError(f"embargo must be >= 0, got {embargo}")
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    times = _timeline(frames)
    n = len(times)
    n_test, n_val = round(test_frac * n), round(val_frac * n)
    out = []
    for fold in range(folds):
        test_end = n - 1 - (folds - 1 - fold) * n_test
        test_start = test_end - n_test + 1
        val_end = test_start - 1 - embargo
        val_start = val_end - n_val + 1
        train_end = val_start - 1 - embargo
        if n_test < 1 or n_val < 1 or train_end < 0:
            raise ValueError(
                f"{n} timestamps are too few for {folds} fold(s) of val_frac={val_frac}, test_frac={test_frac} and "
                f"embargo={embargo}: fold {fold} has train {max(train_end + 1, 0)}, validation {n_val}, test {n_test} bars"
            )
        out.append(SplitBounds(
            train_end=times[train_end], val_start=times[val_start], val_end=times[val_end], test_start=times[test_start],
            test_end=times[test_end] if fold < folds - 1 else None,
        ))
    return out


def split_bounds(frames: Sequence[SymbolFrame], val_frac: float, test_frac: float, embargo: int) -> SplitBounds:
    """The single chronological split: the newest fold of :func:`walk_forward_bounds`."""
    return walk_forward_bounds(frames, val_frac, test_frac, embargo)[-1]


def _timeline(frames: Sequence[SymbolFrame]) -> pd.DatetimeIndex:
    if not frames:
        raise ValueError("no frames")
    first, *rest = (frame.timestamps for frame in frames)
    return first.append(rest).unique().sort_values() if rest else first


def fit_normalization(frames: Sequence[SymbolFrame], train_end: pd.Timestamp) -> dict[str, FeatureStats]:
    """Mean/std per symbol over its rows up to ``train_end`` only, plus :data:`POOLED` over all of them.

    A symbol without training rows gets no entry (it is normalised with the pooled statistics).
    """
    per_symbol: dict[str, FeatureStats] = {}
    training_rows = []
    for frame in frames:
        rows = frame.features[frame.timestamps <= train_end]
        if len(rows):
            per_symbol[frame.symbol] = _stats(rows)
            training_rows.append(rows)
    if not training_rows:
        raise ValueError(f"no rows at or before train_end {train_end}")
    return {**per_symbol, POOLED: _stats(np.concatenate(training_rows))}


def _stats(rows: np.ndarray) -> FeatureStats:
    values = rows.astype(np.float64)
    mean = np.nan_to_num(np.nanmean(values, axis=0), nan=0.0)
    std = np.nan_to_num(np.nanstd(values, axis=0), nan=1.0)
    std = np.where(std < STD_FLOOR, 1.0, std)
    return FeatureStats(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


class WindowDataset(Dataset):
    """Windows ``array[end - seq_len + 1 : end + 1]`` over per-symbol normalised arrays.

    Item ``i`` is ``(features [seq_len, F] float32, symbol_id int64, target float32)``; the features tensor
    shares memory with the stored array (collation copies it into the batch).
    """

    def __init__(
        self,
        symbols: Sequence[str],
        symbol_ids: Sequence[int],
        arrays: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        timestamps: Sequence[pd.DatetimeIndex],
        index: np.ndarray,
        seq_len: int,
        n_features: int,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.symbols = tuple(symbols)
        self.symbol_ids = tuple(int(i) for i in symbol_ids)
        self.arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        self.window_targets = [np.asarray(t, dtype=np.float32) for t in targets]
        self.timestamps = list(timestamps)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self.seq_len = int(seq_len)
        self.n_features = int(n_features)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frame, end = self.index[i]
        window = self.arrays[frame][end - self.seq_len + 1 : end + 1]
        return (
            torch.from_numpy(window),
            torch.tensor(self.symbol_ids[frame], dtype=torch.int64),
            torch.tensor(self.window_targets[frame][end], dtype=torch.float32),
        )

    def targets(self) -> np.ndarray:
        """Every window's target, in dataset order (float32, NaN where unlabelled)."""
        return self._gather(self.window_targets, np.float32)

    def ends(self) -> pd.DataFrame:
        """``symbol`` and ``timestamp`` of each window's last bar, in dataset order: maps predictions to bars."""
        pieces = []
        for f, symbol in enumerate(self.symbols):
            rows = np.flatnonzero(self.index[:, 0] == f)
            stamps = self.timestamps[f][self.index[rows, 1]]
            pieces.append(pd.DataFrame({"symbol": symbol, "timestamp": stamps}, index=rows))
        if not pieces:
            return pd.DataFrame({"symbol": pd.Series(dtype=str), "timestamp": pd.Series(dtype="datetime64[ns, UTC]")})
        return pd.concat(pieces).sort_index().reset_index(drop=True)

    @property
    def nbytes(self) -> int:
        """Bytes held in numpy arrays: grows with bars, not with ``seq_len``."""
        return sum(a.nbytes for a in self.arrays) + sum(t.nbytes for t in self.window_targets) + self.index.nbytes

    def _gather(self, per_frame: Sequence[np.ndarray], dtype: type) -> np.ndarray:
        out = np.empty(len(self.index), dtype=dtype)
        for f, values in enumerate(per_frame):
            mask = self.index[:, 0] == f
            out[mask] = values[self.index[mask, 1]]
        return out


def build_windows(
    frames: Sequence[SymbolFrame],
    normalization: dict[str, FeatureStats],
    symbol_ids: dict[str, int],
    seq_len: int,
    start: pd.Timestamp | None,
    end: pd.Timestamp | None,
    require_target: bool = True,
) -> WindowDataset:
    """Windows lying wholly within ``[start, end]`` (``None``: unbounded), with ``seq_len`` rows of history.

    Only the rows of the segment are kept (normalised), so a window can never reach across the boundary,
    and only windows whose every feature value is finite are indexed.
    Symbols missing from ``normalization`` use :data:`POOLED`; symbols missing from ``symbol_ids`` get -1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    symbols, ids, arrays, targets, stamps, index = [], [], [], [], [], []
    n_features = 0
    for frame in frames:
        n_features = frame.features.shape[1]
        lo = 0 if start is None else int(frame.timestamps.searchsorted(start, side="left"))
        hi = len(frame.timestamps) if end is None else int(frame.timestamps.searchsorted(end, side="right"))
        if hi - lo < seq_len:
            continue
        target = frame.target[lo:hi].astype(np.float32)
        ends = np.arange(seq_len - 1, hi - lo, dtype=np.int64)
        ends = ends[_complete(frame.features[lo:hi], ends, seq_len)]
        if require_target:
            ends = ends[np.isfinite(target[ends])]
        if not len(ends):
            continue
        stats = normalization[frame.symbol] if frame.symbol in normalization else normalization[POOLED]
        position = len(arrays)
        symbols.append(frame.symbol)
        ids.append(symbol_ids.get(frame.symbol, -1))
        arrays.append(stats.apply(frame.features[lo:hi]))
        targets.append(target)
        stamps.append(frame.timestamps[lo:hi])
        index.append(np.column_stack([np.full(len(ends), position, dtype=np.int64), ends]))
    index_array = np.concatenate(index) if index else np.empty((0, 2), dtype=np.int64)
    return WindowDataset(symbols, ids, arrays, targets, stamps, index_array, seq_len, n_features)


def _complete(features: np.ndarray, ends: np.ndarray, seq_len: int) -> np.ndarray:
    """Which windows hold only finite values: warm-up rows (NaN) and undefined values are never fed."""
    undefined = np.concatenate([[0], np.cumsum(~np.isfinite(features).all(axis=1))])
    return undefined[ends + 1] - undefined[ends + 1 - seq_len] == 0


@dataclass(frozen=True)
class TrainingData:
    """The three segments of one split, with the statistics and symbol order the model is trained with."""

    train: WindowDataset
    val: WindowDataset
    test: WindowDataset
    normalization: dict[str, FeatureStats]
    bounds: SplitBounds
    symbols: tuple[str, ...]


def build_training_data(
    frames: Sequence[SymbolFrame],
    seq_len: int,
    val_frac: float,
    test_frac: float,
    embargo: int,
    symbols: Sequence[str] | None = None,
    bounds: SplitBounds | None = None,
) -> TrainingData:
    """Split (``bounds``: one walk-forward fold; default the single split), normalise on train only, and window
    every segment.

    ``embargo`` is given by the caller (longest tuned ``seq_len`` + horizon), so every trial shares one
    split whatever its own ``seq_len``. With ``symbols``, only those frames are used and ids follow that
    order; otherwise ids follow the sorted frame symbols.
    """
    names = [frame.symbol for frame in frames]
    if len(set(names)) != len(names):
        raise ValueError(f"one frame per symbol, got {names}")
    if symbols is None:
        symbols = tuple(sorted(names))
    else:
        symbols = tuple(symbols)
        missing = sorted(set(symbols) - set(names))
        if missing:
            raise ValueError(f"no frame for symbol(s) {missing}")
        frames = [frame for frame in frames if frame.symbol in symbols]
    bounds = bounds or split_bounds(frames, val_frac, test_frac, embargo)
    normalization = fit_normalization(frames, bounds.train_end)
    symbol_ids = {symbol: i for i, symbol in enumerate(symbols)}

    def windows(start: pd.Timestamp | None, end: pd.Timestamp | None) -> WindowDataset:
        return build_windows(frames, normalization, symbol_ids, seq_len, start, end)

    return TrainingData(
        train=windows(None, bounds.train_end),
        val=windows(bounds.val_start, bounds.val_end),
        test=windows(bounds.test_start, bounds.test_end),
        normalization=normalization,
        bounds=bounds,
        symbols=symbols,
    )


def positive_weight(dataset: WindowDataset) -> float:
    """``negatives / positives`` of the labelled windows: BCE's ``pos_weight`` balancing the classes.

    1.0 when either class is absent (no balance to restore, and 0 would silence the positive term).
    """
    targets = dataset.targets()
    targets = targets[np.isfinite(targets)]
    positives = int((targets >= 0.5).sum())
    negatives = len(targets) - positives
    return negatives / positives if positives and negatives else 1.0


# ------------------------------------------------------------------------------ tables -> training data


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
    """The model's view of a feature table (:func:`symbol_frame`) with its candles, levels and labels."""
    candles = table[["timestamp", "open", "high", "low", "close", "volume"]]
    return SymbolTable(symbol, candles, history, table["near_level"].to_numpy(np.int8), symbol_frame(symbol, table, columns))


def symbol_frame(symbol: str, table: pd.DataFrame, columns: Sequence[str]) -> SymbolFrame:
    """What the model reads of a feature table: ``columns`` (in order) as float32, and the target."""
    missing = [c for c in columns if FEATURE_PREFIX + c not in table.columns]
    if missing:
        raise KeyError(f"{symbol}: the feature table has no column(s) {missing}")
    timestamps = pd.DatetimeIndex(table["timestamp"])
    features = np.ascontiguousarray(table[[FEATURE_PREFIX + c for c in columns]].to_numpy(dtype=np.float32))
    return SymbolFrame(symbol, timestamps, features, table["target"].to_numpy(dtype=np.float32))



def embargo_bars(dataset: DatasetConfig, seq_lens: Sequence[int], horizon: int) -> int:
    """Gap between segments: the longest window any trial may use plus the label horizon."""
    return max([dataset.seq_len, *seq_lens]) + horizon


def training_data(
    tables: Mapping[str, SymbolTable], dataset: DatasetConfig, seq_len: int, embargo: int,
    bounds: SplitBounds | None = None,
) -> TrainingData:
    frames = [tables[s].frame for s in sorted(tables)]
    return build_training_data(
        frames, seq_len, dataset.val_frac, dataset.test_frac, embargo, symbols=sorted(tables), bounds=bounds
    )


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


def load_tables(tables: Sequence[SymbolStep], levels: Sequence[SymbolStep], columns: Sequence[str]) -> dict[str, SymbolTable]:
    """The model's view of every symbol's feature table (and its level history), read from the derived store."""
    history = {out.symbol: out for out in levels}
    return {
        out.symbol: symbol_table(
            out.symbol, read_table(out.folder, out.symbol), read_history(history[out.symbol].folder, out.symbol), columns
        )
        for out in tables
    }


@dataclass(frozen=True)
class DatasetPlan:
    """What the training chain trains on, by reference: the feature tables and level histories (paths and
    keys, so a task on any worker can load them), how they were made and the split's embargo. ``key`` names
    it; the tuning, model and run keys are derived from it."""

    spec: TableSpec
    dataset: DatasetConfig
    tables: tuple[SymbolStep, ...]
    levels: tuple[SymbolStep, ...]
    embargo: int
    #: The walk-forward folds, oldest first; the last is the newest (its model is the one registered).
    folds: tuple[SplitBounds, ...]
    key: str
    #: One fingerprint of every candle file the tables were made from.
    data_fingerprint: str
    summary: dict[str, object]

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(t.symbol for t in self.tables)

    def load(self) -> dict[str, SymbolTable]:
        return load_tables(self.tables, self.levels, self.spec.columns)

    def training_data(
        self, seq_len: int, tables: Mapping[str, SymbolTable] | None = None, fold: int = -1
    ) -> TrainingData:
        """Fold ``fold`` (default the newest) with windows of ``seq_len`` (every ``seq_len`` shares the same
        splits: the embargo is fixed)."""
        return training_data(tables or self.load(), self.dataset, seq_len, self.embargo, self.folds[fold])


def dataset_step(
    tables: Sequence[SymbolStep], levels: Sequence[SymbolStep], spec: TableSpec, dataset: DatasetConfig,
    searched_seq_lens: Sequence[int], folds: int = 1,
) -> DatasetPlan:
    """Split every symbol's windows chronologically into ``folds`` walk-forward folds with an embargo (the
    longest searched ``seq_len`` plus the label horizon, so every trial shares the same splits)."""
    tables, levels = tuple(sorted(tables, key=lambda t: t.symbol)), tuple(sorted(levels, key=lambda t: t.symbol))
    loaded = load_tables(tables, levels, spec.columns)
    embargo = embargo_bars(dataset, searched_seq_lens, spec.labels.horizon)
    frames = [loaded[s].frame for s in sorted(loaded)]
    bounds = tuple(walk_forward_bounds(frames, dataset.val_frac, dataset.test_frac, embargo, folds))
    per_fold = [dataset_summary(training_data(loaded, dataset, dataset.seq_len, embargo, b)) for b in bounds]
    key = step_key(
        "dataset", tables=[t.key for t in tables], dataset=dataset.model_dump(mode="json"), embargo=embargo,
        folds=folds, code=code_fingerprint(build_training_data),
    )
    summary = per_fold[-1] | {
        "embargo": embargo, "dataset_key": key, "feature_set": spec.features.set, "features": list(spec.columns),
        "label": spec.labels.kind, "folds": per_fold,
    }
    fingerprint = step_key("data", files=sorted(t.data_fingerprint for t in tables))
    return DatasetPlan(spec, dataset, tables, levels, embargo, bounds, key, fingerprint, summary)
