"""The one inference path: a hand-built MultiSymbolLSTM and ModelSpec score real 4h candles window by window,
exactly as the module applied to the normalised window; unknown symbols, backtests of probabilities, the
newest scoring window and the levels drawn on reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.trading import rules_of
from pricelevel.data.folder import CandleFolder, CandleFolderError
from pricelevel.features.config import FeaturesConfig, LabelsConfig
from pricelevel.inference.scoring import (
    backtest_probabilities,
    levels_at_end,
    newest_window,
    predict_tables,
    tables_for_spec,
)
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import LevelHistory
from pricelevel.ml.dataset import SymbolTable, fit_normalization
from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.spec import POOLED, ModelSpec
from tests.conftest import SAMPLE

ROWS = 1200
SEQ_LEN = 8
TRAINED = ("BTCUSDT", "ETHUSDT")
LEVELS = LevelsConfig.model_validate(
    {"window": 6, "eps_frac": 0.01, "min_samples": 3, "lookback_days": 120, "refit_every": 6,
     "filters": {"volume": {"factor": 0.8}}}
)
LABELS = LabelsConfig(kind="level_label", threshold_frac=0.005, horizon=1)
#: Columns without warm-up rows, so every bar from SEQ_LEN on has a full window.
FEATURES = ("log_range", "level_distance")
FEATURE_CONFIG = FeaturesConfig(set="scoring", sets={"scoring": (*FEATURES, "symbol")})


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _write_folder(folder: Path, symbols: tuple[str, ...]) -> Path:
    """The first ROWS 4h candles of each symbol and the 1d/1h candles of the same period."""
    folder.mkdir(parents=True, exist_ok=True)
    for symbol in symbols:
        h4 = pd.read_parquet(SAMPLE / f"{symbol}_4h.parquet").iloc[:ROWS]
        end = h4["timestamp"].iloc[-1] + pd.Timedelta(hours=4)
        h4.to_parquet(folder / f"{symbol}_4h.parquet")
        for tf in ("1d", "1h"):
            frame = pd.read_parquet(SAMPLE / f"{symbol}_{tf}.parquet")
            frame[frame["timestamp"] < end].to_parquet(folder / f"{symbol}_{tf}.parquet")
    return folder


def _spec(normalization, module: MultiSymbolLSTM) -> ModelSpec:
    return ModelSpec(
        symbols=TRAINED, features=FEATURES, seq_len=SEQ_LEN, timeframe="4h", horizon=1,
        normalization=normalization, levels=LEVELS.model_dump(mode="json"), labels=LABELS.model_dump(mode="json"),
        hparams=dict(module.hparams), feature_config=FEATURE_CONFIG.model_dump(mode="json"),
    )


@pytest.fixture(scope="module")
def scored_setup(tmp_path_factory: pytest.TempPathFactory):
    folder = CandleFolder.open(_write_folder(tmp_path_factory.mktemp("scoring") / "data", (*TRAINED, "SOLUSDT")))
    torch.manual_seed(0)
    module = MultiSymbolLSTM(n_features=len(FEATURES), n_symbols=2, embedding_dim=3, hidden_size=4, num_layers=1)
    module.eval()
    # Stats need tables, tables need only the spec's levels/labels: a spec without stats first.
    draft = _spec({POOLED: None}, module)
    tables = tables_for_spec(folder, draft)
    frames = [tables[s].frame for s in TRAINED]
    normalization = fit_normalization(frames, tables["BTCUSDT"].frame.timestamps[700])
    spec = _spec(normalization, module)
    return folder, module, spec, tables


class Recorder:
    """``predict``: sigmoid of the module's logits; remembers the symbol ids it was given."""

    def __init__(self, module: MultiSymbolLSTM) -> None:
        self.module = module
        self.symbol_ids: list[np.ndarray] = []
        self.batches = 0

    def __call__(self, features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
        assert features.dtype == np.float32 and features.ndim == 3 and features.shape[1] == SEQ_LEN
        assert symbol_id.dtype == np.int64 and symbol_id.shape == (len(features),)
        self.symbol_ids.append(symbol_id.copy())
        self.batches += 1
        with torch.no_grad():
            return torch.sigmoid(self.module(torch.from_numpy(features), torch.from_numpy(symbol_id))).numpy()


def _by_hand(module: MultiSymbolLSTM, spec: ModelSpec, table: SymbolTable, position: int, symbol_id: int,
             stats_key: str | None = None) -> float:
    stats = spec.normalization[stats_key] if stats_key else spec.stats_for(table.symbol)
    raw = table.frame.features[position - SEQ_LEN + 1 : position + 1].astype(np.float64)
    window = ((raw - np.asarray(stats.mean)) / np.asarray(stats.std)).astype(np.float32)
    with torch.no_grad():
        logit = module(torch.from_numpy(window[None]), torch.tensor([symbol_id]))
    return float(torch.sigmoid(logit)[0])


def test_tables_for_spec_reads_every_symbol_of_the_model_timeframe(scored_setup) -> None:
    folder, _, spec, tables = scored_setup
    assert sorted(tables) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    for symbol, table in tables.items():
        assert len(table.near_level) == ROWS and table.frame.features.shape == (ROWS, len(FEATURES))
        assert 0 < table.near_level.mean() < 0.5, symbol  # real levels were found and labelled
    assert list(tables_for_spec(folder, spec, symbols=["ETHUSDT"])) == ["ETHUSDT"]
    with pytest.raises(CandleFolderError, match="no 15m candle files"):
        tables_for_spec(folder, dataclasses.replace(spec, timeframe="15m"))


def test_predict_tables_scores_every_full_window_exactly_as_the_module(scored_setup) -> None:
    _, module, spec, all_tables = scored_setup
    tables = {s: all_tables[s] for s in TRAINED}
    predict = Recorder(module)
    rows = predict_tables(predict, spec, tables)

    assert set(rows.columns) == {"symbol", "timestamp", "probability", "near_level", "target"}
    assert len(rows) == sum(len(t.frame.timestamps) - SEQ_LEN + 1 for t in tables.values()) == 2 * (ROWS - SEQ_LEN + 1)
    ordered = rows.sort_values(["timestamp", "symbol"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, ordered)
    assert not rows.duplicated(["timestamp", "symbol"]).any()
    assert rows["probability"].between(0, 1).all() and rows["probability"].nunique() > 100

    ids = {0, 1}
    assert {int(i) for batch in predict.symbol_ids for i in np.unique(batch)} == ids
    for symbol, table in tables.items():
        mine = rows[rows["symbol"] == symbol]
        assert pd.DatetimeIndex(mine["timestamp"]).equals(table.frame.timestamps[SEQ_LEN - 1 :])
        np.testing.assert_array_equal(mine["near_level"].to_numpy(), table.near_level[SEQ_LEN - 1 :])
        np.testing.assert_array_equal(mine["target"].to_numpy(), table.frame.target[SEQ_LEN - 1 :])
        # a few windows by hand: first, last, and some in between
        probability = mine["probability"].to_numpy()
        for k in (0, 1, 137, 600, len(mine) - 1):
            position = SEQ_LEN - 1 + k
            expected = _by_hand(module, spec, table, position, TRAINED.index(symbol))
            assert probability[k] == pytest.approx(expected, abs=1e-6), (symbol, k)

    # batching does not change anything
    small = predict_tables(Recorder(module), spec, tables, batch_size=97)
    np.testing.assert_allclose(small["probability"], rows["probability"], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(small.drop(columns="probability"), rows.drop(columns="probability"))


def test_an_unknown_symbol_gets_id_minus_one_and_pooled_statistics(scored_setup) -> None:
    _, module, spec, tables = scored_setup
    predict = Recorder(module)
    rows = predict_tables(predict, spec, {"SOLUSDT": tables["SOLUSDT"]})
    assert len(rows) == ROWS - SEQ_LEN + 1
    assert np.concatenate(predict.symbol_ids).tolist() == [-1] * len(rows)
    table = tables["SOLUSDT"]
    for k in (0, 300, len(rows) - 1):
        position = SEQ_LEN - 1 + k
        expected = _by_hand(module, spec, table, position, -1, stats_key=POOLED)
        assert rows["probability"].iloc[k] == pytest.approx(expected, abs=1e-6)
        # and it is not what BTC's id or BTC's statistics would have given
        assert abs(_by_hand(module, spec, table, position, 0, stats_key=POOLED) - expected) > 1e-6
        assert abs(_by_hand(module, spec, table, position, -1, stats_key="BTCUSDT") - expected) > 1e-6


def test_a_table_shorter_than_a_window_scores_nothing(scored_setup) -> None:
    _, module, spec, tables = scored_setup
    short = tables["BTCUSDT"]
    n = SEQ_LEN - 1
    frame = dataclasses.replace(short.frame, timestamps=short.frame.timestamps[:n], features=short.frame.features[:n],
                                target=short.frame.target[:n])
    tiny = dataclasses.replace(short, frame=frame, near_level=short.near_level[:n])
    rows = predict_tables(Recorder(module), spec, {"BTCUSDT": tiny, "ETHUSDT": tables["ETHUSDT"]})
    assert set(rows["symbol"]) == {"ETHUSDT"} and len(rows) == ROWS - SEQ_LEN + 1


# --------------------------------------------------------------------------------------- backtest


def _scored_constant(tables: dict[str, SymbolTable], value: float) -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"timestamp": t.frame.timestamps, "symbol": s, "probability": value}) for s, t in tables.items()],
        ignore_index=True,
    )


def test_backtest_of_zero_probabilities_makes_no_trade(scored_setup) -> None:
    _, _, _, all_tables = scored_setup
    tables = {s: all_tables[s] for s in TRAINED}
    config = BacktestConfig()
    traded = backtest_probabilities(tables, _scored_constant(tables, 0.0), config, rules_of(config))
    assert traded.result.trades.empty
    portfolio = traded.metrics.to_json_dict()["portfolio"]
    assert portfolio["final_value"] == config.init_cash and portfolio["n_trades"] == 0
    assert (traded.result.equity == config.init_cash).all()
    assert traded.result.market.n_bars == ROWS and tuple(traded.result.market.symbols) == TRAINED
    assert traded.levels == levels_at_end(tables)


def test_backtest_with_threshold_zero_trades_from_start_on(scored_setup) -> None:
    _, module, spec, all_tables = scored_setup
    tables = {s: all_tables[s] for s in TRAINED}
    scored = predict_tables(Recorder(module), spec, tables)
    start = tables["BTCUSDT"].frame.timestamps[900]
    config = BacktestConfig(threshold=0.0)
    traded = backtest_probabilities(tables, scored, config, rules_of(config), start=start)
    trades = traded.result.trades
    assert len(trades) > 0
    assert traded.result.market.timestamps[0] == start and traded.result.market.n_bars == ROWS - 900
    assert pd.DatetimeIndex(trades["entry_time"]).min() >= start
    assert set(trades["symbol"]) == set(TRAINED)
    portfolio = traded.metrics.to_json_dict()["portfolio"]
    assert portfolio["n_trades"] + portfolio["open_trades"] == len(trades)
    assert portfolio["final_value"] != BacktestConfig().init_cash


# --------------------------------------------------------------------------------------- windows and levels


def test_newest_window_respects_not_before(scored_setup) -> None:
    _, _, _, tables = scored_setup
    end = max(t.candles["timestamp"].iloc[-1] for t in tables.values())
    assert end == tables["BTCUSDT"].frame.timestamps[-1]
    assert newest_window(tables, 10, None) == end - pd.Timedelta(days=10)
    later = end - pd.Timedelta(days=3)
    assert newest_window(tables, 10, later) == later
    earlier = end - pd.Timedelta(days=30)
    assert newest_window(tables, 10, earlier) == end - pd.Timedelta(days=10)
    assert newest_window(tables, 0.5, None) == end - pd.Timedelta(hours=12)


def test_levels_at_end_are_those_of_the_last_refit(scored_setup) -> None:
    _, _, _, tables = scored_setup
    table = tables["BTCUSDT"]
    levels = table.history.levels
    last = table.history.refits[-1]
    assert levels_at_end({"BTCUSDT": table})["BTCUSDT"] == sorted(levels.loc[levels["asof"] == last, "price"].tolist())

    t0, t1, t2 = pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"], utc=True)
    rows = pd.DataFrame({"asof": [t0, t0, t1, t1, t1], "price": [3.0, 1.0, 5.0, 2.0, 4.0]})

    def with_history(refits) -> SymbolTable:
        return dataclasses.replace(table, history=LevelHistory(refits=pd.DatetimeIndex(refits), levels=rows))

    assert levels_at_end({"X": with_history([t0, t1])}) == {"X": [2.0, 4.0, 5.0]}
    assert levels_at_end({"X": with_history([t0, t1, t2])}) == {"X": []}  # the last refit found nothing
    empty = LevelHistory(refits=pd.DatetimeIndex([], tz="UTC"), levels=rows.iloc[:0])
    assert levels_at_end({"X": dataclasses.replace(table, history=empty)}) == {}
