"""Features: the catalogue and feature sets, explicit warm-up, the close-time join of longer timeframes,
support/resistance around the close, and prefix invariance on real candles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pricelevel.config import Config, load_config
from pricelevel.core.config import ConfigError
from pricelevel.core.timeframes import Timeframe
from pricelevel.features.catalogue import GROUPS, context_columns, feature_columns, needed_timeframes
from pricelevel.features.compute import MAX_AGE_DAYS, MAX_LEVEL_ATR, compute_features
from pricelevel.features.config import FeaturesConfig
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import LevelHistory, bracketing_levels, walk_forward_levels
from pricelevel.ta import indicators
from tests.conftest import ROOT, real_candles

RICH = FeaturesConfig()
LEVELS = LevelsConfig.model_validate(
    {"window": 6, "eps_frac": 0.01, "min_samples": 3, "lookback_days": 120, "refit_every": 24,
     "filters": {"touches": {"enabled": False}, "volume": {"enabled": False}, "approach": {"enabled": False}}}
)


# ------------------------------------------------------------------------------------------ catalogue


def test_groups_expand_in_order_and_symbol_is_not_a_column() -> None:
    columns = feature_columns(RICH, Timeframe.H1)
    expected = [*GROUPS["returns"], *GROUPS["indicators"], *GROUPS["levels"], *GROUPS["level_strength"]]
    assert list(columns[: len(expected)]) == expected
    assert columns[len(expected):] == context_columns(Timeframe.H1, (Timeframe.H4, Timeframe.D1))
    assert "symbol" not in columns and len(set(columns)) == len(columns)
    assert feature_columns(FeaturesConfig(set="base"), Timeframe.H1) == (
        "log_return", "log_range", "volume_change", "level_distance"
    )


def test_context_joins_only_longer_timeframes() -> None:
    assert needed_timeframes(feature_columns(RICH, Timeframe.H1)) == (Timeframe.H4, Timeframe.D1)
    assert needed_timeframes(feature_columns(RICH, Timeframe.H4)) == (Timeframe.D1,)
    assert context_columns(Timeframe.D1, (Timeframe.H4, Timeframe.D1)) == ()
    only_context = FeaturesConfig(set="c", sets={"c": ("context",)})
    with pytest.raises(ValueError, match="no column at 1d"):
        feature_columns(only_context, Timeframe.D1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("features.set=nope", "set 'nope' is not one of sets"),
        ("features.sets.mine=[rsi_14,not_a_feature]", "unknown feature or group \\['not_a_feature'\\]"),
        ("features.sets.mine=[symbol]", "symbol embedding alone"),
        ("features.sets.mine=[rsi_14,rsi_14]", "no duplicates"),
    ],
)
def test_bad_feature_sets_fail_on_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "conf" / "base.yaml", overrides=[override])


def test_a_set_without_symbol_trains_without_the_embedding() -> None:
    config = load_config(ROOT / "conf" / "base.yaml", overrides=["features.sets.plain=[returns,levels]",
                                                                  "features.set=plain"])
    assert isinstance(config, Config) and config.model_inputs.embedding_dim == 0
    assert load_config(ROOT / "conf" / "base.yaml").model_inputs.embedding_dim == 8


# ------------------------------------------------------------------------------------------ values


@pytest.fixture(scope="module")
def btc() -> dict:
    h1 = real_candles("BTCUSDT", "1h", 3000)
    end = h1["timestamp"].iloc[-1] + pd.Timedelta(hours=1)
    frames = {Timeframe.H1: h1}
    for tf in (Timeframe.H4, Timeframe.D1):
        frame = real_candles("BTCUSDT", str(tf))
        frames[tf] = frame[frame["timestamp"] + tf.delta <= end].reset_index(drop=True)
    history = walk_forward_levels(h1, Timeframe.H1, LEVELS)
    columns = feature_columns(RICH, Timeframe.H1)
    values = compute_features(h1, Timeframe.H1, columns, history, frames)
    return {"frames": frames, "history": history, "columns": columns, "values": values}


def test_warm_up_is_leading_nan_and_then_every_value_is_defined(btc) -> None:
    values: pd.DataFrame = btc["values"]
    h1 = btc["frames"][Timeframe.H1]
    assert list(values.columns) == list(btc["columns"]) and len(values) == len(h1)
    leading = {c: int(values[c].notna().to_numpy().argmax()) for c in values.columns}
    assert leading["log_return"] == 1 and leading["log_range"] == 0 and leading["level_distance"] == 0
    assert leading["ema_gap_50"] == indicators.lookback("ema", window=50)
    assert leading["macd_hist"] == indicators.lookback("macd")
    assert leading["rsi_14"] == indicators.lookback("rsi", window=14)
    assert leading["atr_14"] == leading["support_distance_atr"] == indicators.lookback("atr", window=14)
    # 1d context: defined from the first bar closing after the daily candle that has the value closed
    bar_close = h1["timestamp"] + pd.Timedelta(hours=1)
    daily_close = btc["frames"][Timeframe.D1]["timestamp"] + pd.Timedelta(days=1)
    first_rsi = daily_close.iloc[indicators.lookback("rsi", window=14)]
    assert leading["ctx_1d_rsi_14"] == int((bar_close >= first_rsi).to_numpy().argmax()) > 0
    assert leading["ctx_1d_close_gap"] == int((bar_close >= daily_close.iloc[0]).to_numpy().argmax())
    # after the longest warm-up only the zero-volume bars' Ease of Movement is undefined
    ready = values.iloc[max(leading.values()):]
    undefined = ready.columns[ready.isna().any()].tolist()
    assert set(undefined) <= {"eom_14"}
    assert np.isfinite(ready.drop(columns="eom_14").to_numpy()).all()


def test_values_are_the_indicators_scaled(btc) -> None:
    values, h1 = btc["values"], btc["frames"][Timeframe.H1]
    close = h1["close"].to_numpy()
    np.testing.assert_allclose(values["rsi_14"], indicators.rsi(close, 14) / 100, rtol=0, atol=0, equal_nan=True)
    np.testing.assert_allclose(values["sma_gap_20"], close / indicators.sma(close, 20) - 1, equal_nan=True)
    expected = np.full(len(close), np.nan)
    expected[24:] = np.log(close[24:] / close[:-24])
    np.testing.assert_allclose(values["log_return_24"], expected, rtol=1e-12, equal_nan=True)
    bands = indicators.bollinger(close, 20, 2.0)
    np.testing.assert_allclose(values["bollinger_pct_b"], (close - bands.lower) / (bands.upper - bands.lower),
                               equal_nan=True)
    assert values["rsi_14"].dropna().between(0, 1).all() and values["bollinger_width"].dropna().ge(0).all()


def test_context_uses_the_last_candle_closed_by_the_bars_close(btc) -> None:
    values, h1, d1 = btc["values"], btc["frames"][Timeframe.H1], btc["frames"][Timeframe.D1]
    daily_close = dict(zip(d1["timestamp"] + pd.Timedelta(days=1), d1["close"], strict=True))
    stamps = h1["timestamp"]
    for row in range(1000, 1100):
        bar_close = stamps.iloc[row] + pd.Timedelta(hours=1)
        last_daily = bar_close.floor("1D")  # the newest daily candle closed at or before the bar's close
        expected = np.log(h1["close"].iloc[row] / daily_close[last_daily])
        assert values["ctx_1d_close_gap"].iloc[row] == pytest.approx(expected, rel=1e-12), row
    # the bar opening at 23:00 closes with the day: it sees that day's candle; the 22:00 bar sees the day before
    at_23 = np.flatnonzero((stamps.dt.hour == 23).to_numpy())[50]
    assert values["ctx_1d_close_gap"].iloc[at_23] == pytest.approx(0.0, abs=1e-15)
    assert values["ctx_1d_close_gap"].iloc[at_23 - 1] != pytest.approx(0.0, abs=1e-6)


def test_support_is_at_or_below_the_close_and_resistance_above() -> None:
    stamps = pd.date_range("2024-01-01", periods=6, freq="1h", tz="UTC")
    history = LevelHistory(
        refits=pd.DatetimeIndex([stamps[1], stamps[4]]),
        levels=pd.DataFrame({
            "asof": [stamps[1]] * 3 + [stamps[4]],
            "price": [90.0, 100.0, 110.0, 95.0],
            "touches": [1.0, 5.0, np.nan, 2.0],
            "n_extrema": [3, 7, 4, 5],
            "last_seen": pd.DatetimeIndex([stamps[0] - pd.Timedelta(days=d) for d in (1, 2, 500, 3)]),
        }),
    )
    close = np.array([100.0, 105.0, 100.0, 80.0, 120.0, np.nan])
    below, above = bracketing_levels(stamps, close, history)
    np.testing.assert_array_equal(below, [-1, 1, 1, -1, 3, -1])  # no set before the first refit; NaN close: none
    np.testing.assert_array_equal(above, [-1, 2, 2, 0, -1, -1])

    candles = pd.DataFrame({"timestamp": stamps, "open": close, "high": close + 1, "low": close - 1, "close": close,
                            "volume": 1.0})
    values = compute_features(candles, Timeframe.H1, GROUPS["level_strength"], history)
    assert values["support_touches"].iloc[1] == pytest.approx(np.log1p(5.0))
    assert values["resistance_touches"].iloc[1] == 0.0  # touches unknown (filter off) count as none
    assert values["resistance_extrema"].iloc[1] == pytest.approx(np.log1p(4))
    assert values["resistance_age_days"].iloc[1] == MAX_AGE_DAYS  # 500 days, capped
    assert values["support_age_days"].iloc[2] == pytest.approx(2 + 2 / 24)
    assert values["support_extrema"].iloc[3] == 0.0 and values["support_age_days"].iloc[3] == MAX_AGE_DAYS


def test_bracketing_levels_match_a_loop_on_real_levels(btc) -> None:
    history: LevelHistory = btc["history"]
    h1 = btc["frames"][Timeframe.H1]
    stamps, close = pd.DatetimeIndex(h1["timestamp"]), h1["close"].to_numpy()
    below, above = bracketing_levels(stamps, close, history)
    levels = history.levels
    for row in range(0, len(h1), 37):
        in_force = history.refits[history.refits <= stamps[row]]
        current = levels[levels["asof"] == in_force[-1]] if len(in_force) else levels.iloc[:0]
        support = current[current["price"] <= close[row]]
        resistance = current[current["price"] > close[row]]
        assert below[row] == (support["price"].idxmax() if len(support) else -1), row
        assert above[row] == (resistance["price"].idxmin() if len(resistance) else -1), row


def test_distance_in_atr_units_is_capped(btc) -> None:
    values, h1 = btc["values"], btc["frames"][Timeframe.H1]
    for side in ("support", "resistance"):
        column = values[f"{side}_distance_atr"].dropna()
        assert column.between(0, MAX_LEVEL_ATR).all() and (column < MAX_LEVEL_ATR).mean() > 0.3
    below, _ = bracketing_levels(h1["timestamp"], h1["close"].to_numpy(), btc["history"])
    atr = indicators.atr(h1["high"], h1["low"], h1["close"], 14)
    row = int(np.flatnonzero((below >= 0) & np.isfinite(atr))[100])
    price = btc["history"].levels["price"].iloc[below[row]]
    expected = min((h1["close"].iloc[row] - price) / atr[row], MAX_LEVEL_ATR)
    assert values["support_distance_atr"].iloc[row] == pytest.approx(expected, rel=1e-12)


def test_a_prefix_of_the_data_gives_the_same_rows(btc) -> None:
    """No look-ahead at the function level (``pricelevel check lookahead`` does it on the whole table)."""
    n = 2000
    h1 = btc["frames"][Timeframe.H1].iloc[:n]
    end = h1["timestamp"].iloc[-1] + pd.Timedelta(hours=1)
    frames = {tf: f[f["timestamp"] + tf.delta <= end] for tf, f in btc["frames"].items()}
    history = walk_forward_levels(h1, Timeframe.H1, LEVELS)
    prefix = compute_features(h1, Timeframe.H1, btc["columns"], history, frames)
    pd.testing.assert_frame_equal(prefix, btc["values"].iloc[:n], check_exact=True)


def test_missing_inputs_are_named() -> None:
    h4 = real_candles("BTCUSDT", "4h", 100)
    with pytest.raises(ValueError, match="need 1d candles"):
        compute_features(h4, Timeframe.H4, ["ctx_1d_rsi_14"], None, {})
    with pytest.raises(ValueError, match="level history"):
        compute_features(h4, Timeframe.H4, ["level_distance"])
    with pytest.raises(ValueError, match="not feature columns"):
        compute_features(h4, Timeframe.H4, ["returns"])


# ------------------------------------------------------------------------------------------ command line


def test_features_command_writes_the_table_training_reads(cli, project, tmp_path) -> None:
    from pricelevel.data.folder import CandleFolder
    from pricelevel.features.config import LabelsConfig
    from pricelevel.features.tables import TABLE_COLUMNS, TableSpec
    from tests.conftest import SAMPLE

    out = tmp_path / "sol.parquet"
    code, stdout, err = cli("features", "--data", str(SAMPLE), "--symbol", "SOLUSDT", "--timeframe", "4h",
                            "--out", str(out))
    assert code == 0, err
    assert "SOLUSDT 4h: 7662 rows, 33 features (set 'rich'" in stdout
    table = pd.read_parquet(out)
    columns = feature_columns(RICH, Timeframe.H4)
    assert list(table.columns) == [*TABLE_COLUMNS, *(f"feature_{c}" for c in columns)]
    config = load_config(ROOT / "conf" / "base.yaml")
    spec = TableSpec(Timeframe.H4, config.levels, config.labels, config.features)
    _, expected = spec.build(spec.read_frames(CandleFolder.open(SAMPLE), "SOLUSDT"))
    pd.testing.assert_frame_equal(table, expected, check_exact=True)
    assert config.labels == LabelsConfig() and table["target"].iloc[-24:].isna().all()


def test_features_command_names_what_a_folder_lacks(cli, project, tmp_path) -> None:
    from tests.conftest import SAMPLE

    folder = tmp_path / "only4h"
    folder.mkdir()
    (folder / "BTCUSDT_4h.parquet").symlink_to(SAMPLE / "BTCUSDT_4h.parquet")
    code, _, err = cli("features", "--data", str(folder), "--symbol", "BTCUSDT", "--timeframe", "4h",
                       "--out", str(tmp_path / "x.parquet"), "--set", "features.set=base")
    assert code == 1 and "needs 1d candles" in err
    code, _, err = cli("features", "--data", str(folder), "--symbol", "ETHUSDT", "--timeframe", "4h",
                       "--out", str(tmp_path / "x.parquet"))
    assert code == 1 and "ETHUSDT_4h.parquet" in err
    assert not (tmp_path / "x.parquet").exists()


def test_a_spec_without_feature_settings_recomputes_its_listed_columns() -> None:
    from pricelevel.ml.spec import ModelSpec

    spec = ModelSpec(symbols=("BTCUSDT",), features=("log_return", "level_distance"), seq_len=4, timeframe="4h",
                     horizon=1, normalization={}, levels={}, labels={}, hparams={})
    assert feature_columns(spec.features_config(), Timeframe.H4) == spec.features
    rich = ModelSpec(**{**spec.__dict__, "feature_config": RICH.model_dump(mode="json")})
    assert rich.features_config() == RICH
    assert ModelSpec.from_json(rich.to_json()) == rich
