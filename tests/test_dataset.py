"""Splits, train-only normalisation and windows that are views and never cross a segment boundary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pricelevel.ml.dataset import (
    SymbolFrame,
    build_training_data,
    build_windows,
    fit_normalization,
    positive_weight,
    split_bounds,
)
from pricelevel.ml.spec import POOLED

START = pd.Timestamp("2024-01-01", tz="UTC")


def frame(symbol: str, n: int, offset: int = 0, seed: int = 0, n_features: int = 3) -> SymbolFrame:
    rng = np.random.default_rng(seed)
    timestamps = pd.date_range(START + pd.Timedelta(hours=offset), periods=n, freq="1h")
    features = rng.normal(size=(n, n_features)).astype(np.float32) * (seed + 1) + seed
    target = (rng.uniform(size=n) < 0.3).astype(np.float32)
    target[-1] = np.nan
    return SymbolFrame(symbol, timestamps, features, target)


def hours(a: pd.Timestamp, b: pd.Timestamp) -> int:
    return int((b - a) / pd.Timedelta(hours=1))


def test_split_bounds_on_a_known_timeline() -> None:
    # Union of two symbols: 0..99 and 50..199 hours -> 200 distinct times.
    frames = [frame("AAAUSDT", 100), frame("BBBUSDT", 150, offset=50)]
    bounds = split_bounds(frames, val_frac=0.15, test_frac=0.1, embargo=5)
    assert hours(START, bounds.test_start) == 180  # last 20 times
    assert hours(START, bounds.val_end) == 174  # 5 embargo times between
    assert hours(bounds.val_start, bounds.val_end) + 1 == 30
    assert hours(START, bounds.train_end) == 139  # 5 more embargo times
    assert bounds.train_end < bounds.val_start <= bounds.val_end < bounds.test_start


def test_split_bounds_rejects_empty_segments() -> None:
    with pytest.raises(ValueError, match="too few"):
        split_bounds([frame("AAAUSDT", 20)], val_frac=0.3, test_frac=0.3, embargo=5)
    with pytest.raises(ValueError, match="too few"):
        split_bounds([frame("AAAUSDT", 20)], val_frac=0.01, test_frac=0.3, embargo=0)


def test_normalization_uses_training_rows_only() -> None:
    frames = [frame("AAAUSDT", 300, seed=1), frame("BBBUSDT", 300, seed=2)]
    bounds = split_bounds(frames, 0.2, 0.2, embargo=10)
    stats = fit_normalization(frames, bounds.train_end)
    assert set(stats) == {"AAAUSDT", "BBBUSDT", POOLED}

    changed = frames[0].features.copy()
    after_train = np.asarray(frames[0].timestamps > bounds.train_end)
    changed[after_train] = 1e6
    altered = [SymbolFrame("AAAUSDT", frames[0].timestamps, changed, frames[0].target), frames[1]]
    assert fit_normalization(altered, bounds.train_end) == stats

    train_rows = frames[0].features[~after_train].astype(np.float64)
    np.testing.assert_allclose(stats["AAAUSDT"].mean, train_rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["AAAUSDT"].std, train_rows.std(axis=0), rtol=1e-6)
    both = np.concatenate([f.features[np.asarray(f.timestamps <= bounds.train_end)] for f in frames])
    np.testing.assert_allclose(stats[POOLED].mean, both.astype(np.float64).mean(axis=0), rtol=1e-6)


def test_constant_feature_gets_unit_std() -> None:
    f = frame("AAAUSDT", 50)
    f.features[:, 1] = 3.0
    stats = fit_normalization([f], f.timestamps[-1])
    assert stats["AAAUSDT"].std[1] == 1.0


def test_windows_have_the_right_shape_and_never_cross_a_boundary() -> None:
    seq_len = 12
    frames = [frame("AAAUSDT", 400, seed=1), frame("BBBUSDT", 350, offset=30, seed=2)]
    data = build_training_data(frames, seq_len=seq_len, val_frac=0.2, test_frac=0.2, embargo=seq_len + 1)
    assert data.symbols == ("AAAUSDT", "BBBUSDT")
    segments = [
        (data.train, None, data.bounds.train_end),
        (data.val, data.bounds.val_start, data.bounds.val_end),
        (data.test, data.bounds.test_start, None),
    ]
    by_symbol = {f.symbol: f for f in frames}
    for dataset, start, end in segments:
        assert len(dataset) > 0 and dataset.seq_len == seq_len
        features, symbol_id, target = dataset[0]
        assert features.shape == (seq_len, 3) and features.dtype == torch.float32
        assert symbol_id.dtype == torch.int64 and target.dtype == torch.float32
        assert np.isfinite(dataset.targets()).all()
        ends = dataset.ends()
        assert len(ends) == len(dataset)
        for symbol, timestamp in ends.itertuples(index=False):
            stamps = by_symbol[symbol].timestamps
            row = stamps.get_loc(timestamp)
            assert row >= seq_len - 1
            assert start is None or stamps[row - seq_len + 1] >= start
            assert end is None or timestamp <= end
    # Window content is the normalised raw rows ending at the window's end bar.
    i = len(data.val) // 2
    symbol, timestamp = data.val.ends().iloc[i]
    raw = by_symbol[symbol]
    row = raw.timestamps.get_loc(timestamp)
    expected = data.normalization[symbol].apply(raw.features[row - seq_len + 1 : row + 1])
    np.testing.assert_allclose(data.val[i][0].numpy(), expected, rtol=1e-6)
    assert data.val[i][2].item() == raw.target[row]
    np.testing.assert_array_equal(data.val.targets()[i], raw.target[row])


def test_windows_are_views_and_memory_does_not_grow_with_seq_len() -> None:
    frames = [frame("AAAUSDT", 2000, seed=1), frame("BBBUSDT", 2000, seed=2)]
    stats = fit_normalization(frames, frames[0].timestamps[-1])
    ids = {"AAAUSDT": 0, "BBBUSDT": 1}
    short = build_windows(frames, stats, ids, seq_len=4, start=None, end=None)
    long = build_windows(frames, stats, ids, seq_len=400, start=None, end=None)
    assert long.nbytes <= short.nbytes
    bars = 2 * 2000
    assert long.nbytes < 64 * bars  # tens of bytes per bar, nowhere near bars x seq_len x features x 4
    features, _, _ = long[123]
    frame_index, _ = long.index[123]
    assert np.shares_memory(features.numpy(), long.arrays[frame_index])


def test_unknown_symbol_gets_minus_one_and_pooled_stats() -> None:
    frames = [frame("AAAUSDT", 300, seed=1), frame("BBBUSDT", 300, seed=2)]
    stats = fit_normalization(frames, frames[0].timestamps[199])
    newcomer = frame("CCCUSDT", 60, seed=3)
    dataset = build_windows(
        [newcomer], stats, {"AAAUSDT": 0, "BBBUSDT": 1}, seq_len=10, start=None, end=None, require_target=False
    )
    assert len(dataset) == 51  # the unlabelled last bar is kept when no target is required
    assert np.isnan(dataset.targets()[-1])
    _, symbol_id, _ = dataset[0]
    assert symbol_id.item() == -1
    np.testing.assert_allclose(dataset[0][0].numpy(), stats[POOLED].apply(newcomer.features[:10]), rtol=1e-6)


def test_symbols_argument_selects_frames_and_fixes_ids() -> None:
    frames = [frame("AAAUSDT", 300, seed=1), frame("BBBUSDT", 300, seed=2)]
    data = build_training_data(frames, 5, 0.2, 0.2, embargo=6, symbols=["BBBUSDT"])
    assert data.symbols == ("BBBUSDT",)
    assert {data.train[i][1].item() for i in range(len(data.train))} == {0}
    assert set(data.normalization) == {"BBBUSDT", POOLED}
    with pytest.raises(ValueError, match="no frame"):
        build_training_data(frames, 5, 0.2, 0.2, embargo=6, symbols=["CCCUSDT"])


def test_positive_weight() -> None:
    f = frame("AAAUSDT", 101)
    f.target[:] = 0.0
    f.target[:25] = 1.0
    f.target[-1] = np.nan
    dataset = build_windows([f], fit_normalization([f], f.timestamps[-1]), {"AAAUSDT": 0}, 1, None, None)
    assert positive_weight(dataset) == pytest.approx(75 / 25)
    f.target[:25] = 0.0
    no_positives = build_windows([f], fit_normalization([f], f.timestamps[-1]), {"AAAUSDT": 0}, 1, None, None)
    assert positive_weight(no_positives) == 1.0
