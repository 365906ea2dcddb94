"""The training steps as library calls: targets, labels of window ends, embargo, the per-symbol table on real
candles, its Parquet round trip, and the derived-output store keyed by step inputs and code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pricelevel.features.compute as features_module
import pricelevel.features.labels as labels_module
from pricelevel.core.cache import COMPLETE, DerivedStore, code_fingerprint, step_key
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.features.catalogue import feature_columns
from pricelevel.features.compute import MAX_LEVEL_DISTANCE
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.features.labels import forward_move, level_label, shifted
from pricelevel.features.tables import feature_table, read_table, write_table
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.history import filter_timeframes as context_timeframes
from pricelevel.levels.history import read_context
from pricelevel.levels.history import read_history as read_levels
from pricelevel.levels.history import write_history as write_levels
from pricelevel.levels.walkforward import (
    LevelHistory,
    MultiTimeframe,
    nearest_level_distance,
    walk_forward_levels,
)
from pricelevel.ml.config import DatasetConfig
from pricelevel.ml.dataset import SymbolFrame, SymbolTable, embargo_bars, labels_at, symbol_table
from tests.conftest import SAMPLE, real_candles

#: Levels that exist on the first 1500 BTCUSDT 4h bars (2021, a trending market) with every filter on.
LEVELS = LevelsConfig.model_validate(
    {"window": 6, "eps_frac": 0.01, "min_samples": 3, "lookback_days": 120, "refit_every": 6,
     "filters": {"volume": {"factor": 0.8}}}
)
LABELS = LabelsConfig(kind="level_label", threshold_frac=0.005, horizon=1)
ROWS = 1500


# --------------------------------------------------------------------------------------- targets / labels


def test_targets_shift_labels_by_the_horizon_with_a_nan_tail() -> None:
    label = np.array([0, 1, 1, 0, 1], dtype=np.int8)
    one = shifted(label, 1)
    assert one.dtype == np.float32
    np.testing.assert_array_equal(one, [1, 1, 0, 1, np.nan])
    np.testing.assert_array_equal(shifted(label, 2), [1, 0, 1, np.nan, np.nan])
    np.testing.assert_array_equal(shifted(label, 4), [1, np.nan, np.nan, np.nan, np.nan])


@pytest.mark.parametrize("horizon", [5, 6, 100])
def test_targets_are_all_nan_when_the_horizon_reaches_past_the_end(horizon: int) -> None:
    target = shifted(np.ones(5, dtype=np.int8), horizon)
    assert target.shape == (5,) and np.isnan(target).all()


def _table(symbol: str, start: str, label: list[int], target: list[float]) -> SymbolTable:
    n = len(label)
    stamps = pd.date_range(start, periods=n, freq="4h", tz="UTC")
    frame = SymbolFrame(symbol, stamps, np.zeros((n, 1), np.float32), np.asarray(target, np.float32))
    history = LevelHistory(refits=pd.DatetimeIndex([], tz="UTC"), levels=pd.DataFrame())
    candles = pd.DataFrame({"timestamp": stamps})
    return SymbolTable(symbol, candles, history, np.asarray(label, np.int8), frame)


@pytest.fixture
def two_tables() -> dict[str, SymbolTable]:
    return {
        "AAAUSDT": _table("AAAUSDT", "2024-01-01", [0, 1, 0, 1, 1], [10, 11, 12, 13, np.nan]),
        "BBBUSDT": _table("BBBUSDT", "2024-01-01 08:00", [1, 0, 0], [20, 21, 22]),
    }


def test_labels_at_maps_each_symbol_timestamp_row_to_its_bar(two_tables) -> None:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    h = pd.Timedelta(hours=4)
    # Interleaved symbols, out of time order, a repeated row: each output follows its own input row.
    ends = pd.DataFrame({
        "symbol": ["BBBUSDT", "AAAUSDT", "AAAUSDT", "BBBUSDT", "AAAUSDT", "AAAUSDT"],
        "timestamp": [t + 2 * h, t + 3 * h, t, t + 4 * h, t + 4 * h, t + 3 * h],
    })
    # AAA is at t + k*h -> row k; BBB starts at t + 2h -> row k - 2.
    np.testing.assert_array_equal(labels_at(two_tables, ends), [1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(labels_at(two_tables, ends, "target"), [20, 13, 10, 22, np.nan, 13])
    assert labels_at(two_tables, ends).dtype == np.float64


def test_labels_at_raises_on_a_timestamp_not_in_the_table(two_tables) -> None:
    ends = pd.DataFrame({"symbol": ["AAAUSDT", "BBBUSDT"],
                         "timestamp": pd.to_datetime(["2024-01-01 04:00", "2024-01-01 04:00"], utc=True)})
    with pytest.raises(KeyError, match="BBBUSDT"):
        labels_at(two_tables, ends)
    with pytest.raises(KeyError):  # a symbol without a table
        labels_at(two_tables, ends.assign(symbol="CCCUSDT"))


def test_labels_at_follows_row_order_whatever_the_index(two_tables) -> None:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    ends = pd.DataFrame({"symbol": ["AAAUSDT"] * 3, "timestamp": [t, t + pd.Timedelta(hours=4), t + pd.Timedelta(hours=8)]})
    np.testing.assert_array_equal(labels_at(two_tables, ends, "target"), [10, 11, 12])
    reversed_rows = ends.iloc[::-1]  # index 2, 1, 0: rows are (t+8h, t+4h, t); actual result [10, 11, 12]
    np.testing.assert_array_equal(labels_at(two_tables, reversed_rows, "target"), [12, 11, 10])


# --------------------------------------------------------------------------------------- embargo / context


def test_embargo_is_the_longest_window_plus_the_horizon() -> None:
    assert embargo_bars(DatasetConfig(seq_len=80), (40, 80, 120), 1) == 121
    assert embargo_bars(DatasetConfig(seq_len=200), [40], 3) == 203
    assert embargo_bars(DatasetConfig(seq_len=16), [12, 16], 2) == 18


def test_embargo_without_searched_lengths_uses_the_dataset_length() -> None:
    assert embargo_bars(DatasetConfig(seq_len=80), (), 1) == 81


@pytest.mark.parametrize(
    "disabled, expected",
    [
        ((), (Timeframe.D1, Timeframe.H4, Timeframe.H1)),
        (("touches",), (Timeframe.H4, Timeframe.H1)),
        (("volume",), (Timeframe.D1, Timeframe.H1)),
        (("approach", "age"), (Timeframe.D1, Timeframe.H4)),
        (("touches", "volume"), (Timeframe.H1,)),
        (("touches", "volume", "approach"), ()),
    ],
)
def test_context_timeframes_follow_the_enabled_filters(disabled: tuple[str, ...], expected: tuple) -> None:
    levels = LevelsConfig.model_validate({"filters": {name: {"enabled": False} for name in disabled}})
    assert context_timeframes(levels) == expected


def test_read_context_reads_what_the_filters_need_and_leaves_missing_files_none(tmp_path: Path) -> None:
    for tf in ("1d", "1h"):
        (tmp_path / f"BTCUSDT_{tf}.parquet").symlink_to(SAMPLE / f"BTCUSDT_{tf}.parquet")
    folder = CandleFolder.open(tmp_path)
    context = read_context(folder, "BTCUSDT", LevelsConfig())
    assert context.h4 is None  # no 4h file
    assert len(context.d1) == 1277 and len(context.h1) == 30362
    off = LevelsConfig.model_validate({"filters": {"touches": {"enabled": False}}})
    assert read_context(folder, "BTCUSDT", off).d1 is None


# --------------------------------------------------------------------------------------- symbol table


def _context(candles: pd.DataFrame, symbol: str = "BTCUSDT") -> MultiTimeframe:
    """The 1d/1h sample candles of the same period (closed by the last 4h bar's close)."""
    end = candles["timestamp"].iloc[-1] + pd.Timedelta(hours=4)

    def cut(tf: str) -> pd.DataFrame:
        frame = pd.read_parquet(SAMPLE / f"{symbol}_{tf}.parquet")
        return frame[frame["timestamp"] < end].reset_index(drop=True)

    return MultiTimeframe(d1=cut("1d"), h1=cut("1h"))


BASE = FeaturesConfig(set="base")
BASE_COLUMNS = feature_columns(BASE, Timeframe.H4)


@pytest.fixture(scope="module")
def btc_table() -> SymbolTable:
    candles = real_candles("BTCUSDT", "4h", ROWS)
    history = walk_forward_levels(candles, Timeframe.H4, LEVELS, _context(candles))
    table = feature_table(candles, Timeframe.H4, history, {}, LABELS, BASE)
    return symbol_table("BTCUSDT", table, history, BASE_COLUMNS)


def test_symbol_table_on_real_candles(btc_table: SymbolTable) -> None:
    table = btc_table
    candles = table.candles
    stamps = pd.DatetimeIndex(candles["timestamp"])
    close = candles["close"].to_numpy()
    assert len(table.near_level) == ROWS and table.near_level.dtype == np.int8
    assert len(table.history.levels) > 0
    np.testing.assert_array_equal(table.near_level, level_label(stamps, close, table.history, LABELS.threshold_frac))
    assert 0.02 < table.near_level.mean() < 0.3  # both classes, positives the minority
    # level_label: target[t] = near_level[t + 1]; the last bar has none
    target = table.frame.target
    np.testing.assert_array_equal(target[:-1], table.near_level[1:].astype(np.float32))
    assert np.isnan(target[-1]) and np.isfinite(target[:-1]).all()
    # base features: only the first row is warm-up (no earlier bar to difference against)
    features = table.frame.features
    assert features.shape == (ROWS, len(BASE_COLUMNS)) and features.dtype == np.float32
    assert np.isfinite(features[1:]).all() and np.isnan(features[0, BASE_COLUMNS.index("log_return")])
    distance = nearest_level_distance(stamps, close, table.history)
    assert np.isnan(distance).any() and np.isfinite(distance).any()
    column = features[:, BASE_COLUMNS.index("level_distance")]
    expected = np.clip(np.nan_to_num(distance, nan=MAX_LEVEL_DISTANCE), 0, MAX_LEVEL_DISTANCE)
    np.testing.assert_allclose(column, expected.astype(np.float32), rtol=0, atol=0)
    # near_level is 1 exactly where the close is within threshold of the nearest level in force
    near = np.nan_to_num(distance, nan=np.inf) <= LABELS.threshold_frac * (1 + 1e-12)
    assert (table.near_level == near).mean() > 0.999
    assert table.frame.timestamps.equals(stamps) and table.symbol == "BTCUSDT"


def test_forward_move_table_targets_the_next_bars_highs() -> None:
    candles = real_candles("BTCUSDT", "4h", 300)
    labels = LabelsConfig(kind="forward_move", move_frac=0.02, horizon=6)
    history = walk_forward_levels(candles, Timeframe.H4, LEVELS, _context(candles))
    table = feature_table(candles, Timeframe.H4, history, {}, labels, BASE)
    expected = forward_move(candles["open"], candles["high"], 6, 0.02)
    np.testing.assert_array_equal(table["target"].to_numpy(np.float32), expected)
    assert table["target"].iloc[-6:].isna().all() and table["target"].iloc[:-6].notna().all()
    assert 0.05 < table["target"].mean() < 0.95


def test_symbol_table_of_a_prefix_matches_the_full_table(btc_table: SymbolTable) -> None:
    """Walk-forward at the table level: bars after t change nothing at or before t (but the last target)."""
    n = 1000
    candles = real_candles("BTCUSDT", "4h", n)
    history = walk_forward_levels(candles, Timeframe.H4, LEVELS, _context(candles))
    prefix = symbol_table("BTCUSDT", feature_table(candles, Timeframe.H4, history, {}, LABELS, BASE), history, BASE_COLUMNS)
    np.testing.assert_array_equal(prefix.near_level, btc_table.near_level[:n])
    np.testing.assert_array_equal(prefix.frame.features, btc_table.frame.features[:n])
    np.testing.assert_array_equal(prefix.frame.target[:-1], btc_table.frame.target[: n - 1])
    assert np.isnan(prefix.frame.target[-1]) and np.isfinite(btc_table.frame.target[n - 1])


def test_table_and_levels_round_trip_exactly(btc_table: SymbolTable, tmp_path: Path) -> None:
    write_levels(tmp_path, "BTCUSDT", btc_table.history)
    history = read_levels(tmp_path, "BTCUSDT")
    assert history.refits.equals(btc_table.history.refits)
    pd.testing.assert_frame_equal(history.levels, btc_table.history.levels, check_exact=True)

    candles = real_candles("BTCUSDT", "4h", ROWS)
    table = feature_table(candles, Timeframe.H4, history, {}, LABELS, BASE)
    write_table(tmp_path, "BTCUSDT", table)
    pd.testing.assert_frame_equal(read_table(tmp_path, "BTCUSDT"), table, check_exact=True)
    back = symbol_table("BTCUSDT", read_table(tmp_path, "BTCUSDT"), history, BASE_COLUMNS)
    pd.testing.assert_frame_equal(back.candles.reset_index(drop=True), btc_table.candles[back.candles.columns],
                                  check_exact=True)
    np.testing.assert_array_equal(back.near_level, btc_table.near_level)
    np.testing.assert_array_equal(back.frame.features, btc_table.frame.features)
    assert back.frame.features.dtype == np.float32 and back.frame.features.flags.c_contiguous
    np.testing.assert_array_equal(back.frame.target, btc_table.frame.target)
    assert back.frame.timestamps.equals(btc_table.frame.timestamps)
    assert back.history is history


def test_symbol_table_names_missing_feature_columns(btc_table: SymbolTable) -> None:
    candles = real_candles("BTCUSDT", "4h", 50)
    table = feature_table(candles, Timeframe.H4, btc_table.history, {}, LABELS, BASE)
    with pytest.raises(KeyError, match="rsi_14"):
        symbol_table("BTCUSDT", table, btc_table.history, ("log_return", "rsi_14"))


def test_levels_round_trip_with_refits_that_found_nothing(tmp_path: Path) -> None:
    candles = real_candles("BTCUSDT", "4h", 40)
    history = walk_forward_levels(candles, Timeframe.H4, LEVELS, _context(candles))
    assert len(history.refits) > 0 and history.levels.empty
    write_levels(tmp_path, "BTCUSDT", history)
    back = read_levels(tmp_path, "BTCUSDT")
    assert back.refits.equals(history.refits) and back.levels.empty
    assert list(back.levels.columns) == list(history.levels.columns)


# --------------------------------------------------------------------------------------- derived store


def test_build_writes_once_and_reuses_the_complete_folder(tmp_path: Path) -> None:
    store = DerivedStore(tmp_path)
    calls: list[Path] = []

    def write(folder: Path) -> None:
        calls.append(folder)
        (folder / "out.txt").write_text("hello")

    folder, built = store.build("levels", "abc", write)
    assert built and folder == tmp_path / "derived" / "levels" / "abc"
    assert (folder / "out.txt").read_text() == "hello" and (folder / COMPLETE).exists()
    assert store.is_complete("levels", "abc")
    assert len(calls) == 1 and calls[0] != folder  # written in a temporary sibling, renamed into place
    again, built = store.build("levels", "abc", write)
    assert again == folder and not built and len(calls) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == ["abc"]


def test_a_failing_write_leaves_neither_the_folder_nor_its_tmp(tmp_path: Path) -> None:
    store = DerivedStore(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.build("labels", "k1", broken)
    parent = tmp_path / "derived" / "labels"
    assert not (parent / "k1").exists() and not (parent / ".k1.tmp").exists()
    assert list(parent.iterdir()) == [] and not store.is_complete("labels", "k1")
    # the next run builds it
    folder, built = store.build("labels", "k1", lambda f: (f / "ok.txt").write_text("ok"))
    assert built and (folder / "ok.txt").exists() and not (folder / "half.txt").exists()


def test_an_interrupted_folder_without_the_marker_is_rebuilt(tmp_path: Path) -> None:
    store = DerivedStore(tmp_path)
    stale = store.folder("models", "k2")
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_text("x")
    folder, built = store.build("models", "k2", lambda f: (f / "full.bin").write_text("y"))
    assert built and sorted(p.name for p in folder.iterdir()) == [COMPLETE, "full.bin"]


# --------------------------------------------------------------------------------------- keys


def test_step_key_changes_with_every_input_and_ignores_kwarg_order() -> None:
    base = step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [1, 2]}, code="c")
    assert len(base) == 16 and int(base, 16) >= 0
    assert base == step_key("levels", code="c", config={"b": [1, 2], "a": 1}, data="d1", symbol="BTCUSDT")
    variants = [
        step_key("labels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [1, 2]}, code="c"),
        step_key("levels", symbol="ETHUSDT", data="d1", config={"a": 1, "b": [1, 2]}, code="c"),
        step_key("levels", symbol="BTCUSDT", data="d2", config={"a": 1, "b": [1, 2]}, code="c"),
        step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 2, "b": [1, 2]}, code="c"),
        step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [2, 1]}, code="c"),
        step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [1, 2]}, code="c2"),
        step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [1, 2]}),
        step_key("levels", symbol="BTCUSDT", data="d1", config={"a": 1, "b": [1, 2]}, code="c", extra=0),
    ]
    assert len({base, *variants}) == len(variants) + 1


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_fingerprint_follows_the_source(tmp_path: Path) -> None:
    assert code_fingerprint(labels_module) == code_fingerprint(labels_module)
    assert code_fingerprint(labels_module) != code_fingerprint(features_module)
    assert code_fingerprint(labels_module, features_module) == code_fingerprint(features_module, labels_module)
    assert code_fingerprint(labels_module, features_module) != code_fingerprint(labels_module)

    # Same module name, different source: only the code differs.
    sources = {"v1": "def f():\n    return 1\n", "v2": "def f():\n    return 2\n", "v3": "def f():\n    return 1\n"}
    fingerprints = {}
    for version, source in sources.items():
        (tmp_path / version).mkdir()
        (tmp_path / version / "stepmod.py").write_text(source)
        module = _load_module(tmp_path / version / "stepmod.py", "pricelevel_test_stepmod")
        fingerprints[version] = code_fingerprint(module)
    sys.modules.pop("pricelevel_test_stepmod", None)
    assert fingerprints["v1"] != fingerprints["v2"]
    assert fingerprints["v1"] == fingerprints["v3"]


def test_a_step_key_follows_every_module_the_step_imports(tmp_path: Path) -> None:
    """The code part of a key is the transitive import closure, derived, never listed by hand: an edit deep in
    it (the indicators under the levels) changes the key; an edit outside it (the registry) does not."""
    import shutil

    from pricelevel.core.cache import module_closure

    package = tmp_path / "pricelevel"
    shutil.copytree(Path(features_module.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    closure = module_closure(["pricelevel.levels.history"], package)
    assert {"pricelevel.levels.walkforward", "pricelevel.levels.clustering", "pricelevel.ta.indicators",
            "pricelevel.data.folder", "pricelevel.core.files"} <= set(closure)
    assert "pricelevel.registry.promotion" not in closure and "pricelevel.ml.model" not in closure
    before = code_fingerprint("pricelevel.levels.history", package_dir=package)
    (package / "registry" / "promotion.py").write_text("# an edit outside the closure\n", "utf-8")
    assert code_fingerprint("pricelevel.levels.history", package_dir=package) == before
    indicators = package / "ta" / "indicators.py"
    indicators.write_text(indicators.read_text() + "\nENGINE_FIX = 1  # an engine fix (a comment alone keeps the key)\n")
    assert code_fingerprint("pricelevel.levels.history", package_dir=package) != before
    # The run key's closure reaches the backtest engine: an engine fix makes a new run, not a reused one.
    assert "pricelevel.backtest.engine" in module_closure(["pricelevel.registry.experiment"], package)
