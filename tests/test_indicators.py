"""pricelevel.indicators against its references (TA-Lib, ``ta``, pandas) on the bundled real candles.

Agreement is checked with ``rtol=1e-9, atol=1e-9 * scale``, ``scale`` being the largest magnitude of the
reference output. The absolute part is needed because several outputs cross zero (MACD, CCI, Force Index,
Ease of Movement, log returns) and the two sides sum in a different order (running sums vs per-window sums,
a compensated vs a plain running sum): their difference scales with the magnitudes summed, not with the value
at that row. Observed differences are below 1e-13 of the scale, so both tolerances are far from binding.
"""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest
import talib
from ta.volume import EaseOfMovementIndicator, ForceIndexIndicator
from talib import abstract

from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.ta import indicators
from tests.conftest import SAMPLE

DATASETS = [("BTCUSDT", "1h"), ("DOGEUSDT", "1h"), ("ETHUSDT", "1d")]

# The columns each indicator takes, in order.
INPUTS = {
    "sma": ("close",),
    "ema": ("close",),
    "rsi": ("close",),
    "macd": ("close",),
    "bollinger": ("close",),
    "cci": ("high", "low", "close"),
    "atr": ("high", "low", "close"),
    "rate_of_change": ("close",),
    "ease_of_movement": ("high", "low", "volume"),
    "force_index": ("close", "volume"),
    "log_return": ("close",),
    "rolling_volatility": ("close",),
}

CASES = [
    ("sma", {"window": 20}),
    ("sma", {"window": 200}),
    ("ema", {"window": 12}),
    ("ema", {"window": 100}),
    ("rsi", {}),
    ("rsi", {"window": 2}),
    ("macd", {}),
    ("macd", {"fast": 8, "slow": 21, "signal": 5}),
    ("bollinger", {}),
    ("bollinger", {"window": 5, "n_std": 1.5}),
    ("bollinger", {"window": 200, "n_std": 3}),
    ("cci", {}),
    ("cci", {"window": 2}),
    ("atr", {}),
    ("atr", {"window": 1}),
    ("rate_of_change", {}),
    ("rate_of_change", {"window": 1}),
    ("ease_of_movement", {}),
    ("ease_of_movement", {"window": 1}),
    ("force_index", {}),
    ("force_index", {"window": 1}),
    ("log_return", {}),
    ("log_return", {"window": 24}),
    ("rolling_volatility", {}),
    ("rolling_volatility", {"window": 2}),
    ("rolling_volatility", {"window": 500}),
]
CASE_IDS = [name + "".join(f"-{key}={value}" for key, value in params.items()) for name, params in CASES]
assert set(INPUTS) == {name for name, _ in CASES} == set(indicators._WARMUPS)


@pytest.fixture(scope="module")
def candles() -> dict[tuple[str, str], pd.DataFrame]:
    folder = CandleFolder.open(SAMPLE)
    return {(symbol, tf): folder.read(symbol, Timeframe(tf)) for symbol, tf in DATASETS}


def compute(name: str, frame: pd.DataFrame, params: dict) -> dict[str, np.ndarray]:
    result = getattr(indicators, name)(*(frame[column].to_numpy() for column in INPUTS[name]), **params)
    return result._asdict() if isinstance(result, tuple) else {"value": result}


def reference(name: str, frame: pd.DataFrame, params: dict) -> dict[str, np.ndarray]:
    high, low, close, volume = (frame[column].to_numpy() for column in ("high", "low", "close", "volume"))
    series = {column: frame[column] for column in ("high", "low", "close", "volume")}
    settings = defaults(name) | params
    window = settings.get("window")
    match name:
        case "sma":
            return {"value": talib.SMA(close, window)}
        case "ema":
            return {"value": talib.EMA(close, window)}
        case "rsi":
            return {"value": talib.RSI(close, window)}
        case "macd":
            fast, slow, signal = settings["fast"], settings["slow"], settings["signal"]
            _, signal_line, histogram = talib.MACD(close, fast, slow, signal)
            # TA-Lib shows the MACD line only from the signal line's first row; with signal=1 it shows it all.
            macd_line = talib.MACD(close, fast, slow, 1)[0]
            return {"macd": macd_line, "signal": signal_line, "histogram": histogram}
        case "bollinger":
            n_std = settings["n_std"]
            upper, middle, lower = talib.BBANDS(close, window, n_std, n_std, 0)
            return {"middle": middle, "upper": upper, "lower": lower}
        case "cci":
            return {"value": talib.CCI(high, low, close, window)}
        case "atr":
            return {"value": talib.ATR(high, low, close, window)}
        case "rate_of_change":
            return {"value": talib.ROC(close, window)}
        case "ease_of_movement":
            emv = EaseOfMovementIndicator(
                series["high"], series["low"], series["volume"], window, fillna=False
            )
            return {"value": emv.sma_ease_of_movement().to_numpy()}
        case "force_index":
            fi = ForceIndexIndicator(series["close"], series["volume"], window, fillna=False)
            return {"value": fi.force_index().to_numpy()}
        case "log_return":
            return {"value": np.log(series["close"]).diff(window).to_numpy()}
        case "rolling_volatility":
            return {"value": np.log(series["close"]).diff().rolling(window).std().to_numpy()}
    raise AssertionError(name)


def defaults(name: str) -> dict:
    parameters = inspect.signature(getattr(indicators, name)).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def warmup(name: str, params: dict, output: str) -> int:
    """Leading NaN rows of one output: lookback(), except the MACD line, which starts before its signal."""
    if name == "macd" and output == "macd":
        return (defaults("macd") | params)["slow"] - 1
    return indicators.lookback(name, **params)


def windows_holding(bad_rows: np.ndarray, window: int) -> np.ndarray:
    """Rows whose trailing ``window`` rows include a bad row."""
    counts = np.convolve(bad_rows.astype(int), np.ones(window, dtype=int))[: bad_rows.size]
    return counts > 0


@pytest.mark.parametrize(("symbol", "tf"), DATASETS, ids=[f"{s}-{tf}" for s, tf in DATASETS])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_matches_reference_after_exactly_lookback_nan_rows(candles, symbol, tf, name, params) -> None:
    frame = candles[(symbol, tf)]
    ours, theirs = compute(name, frame, params), reference(name, frame, params)
    assert ours.keys() == theirs.keys()
    rows = np.arange(len(frame))
    for output, values in ours.items():
        assert values.dtype == np.float64 and values.shape == (len(frame),)
        expected_nan = rows < warmup(name, params, output)
        if name == "ease_of_movement":
            # Zero-volume flat candles (two in each 1h file) make EMV 0/0: NaN in every window holding one.
            window = params.get("window", 14)
            expected_nan |= windows_holding(np.r_[False, frame["volume"].to_numpy()[1:] == 0], window)
        np.testing.assert_array_equal(np.isnan(values), expected_nan, err_msg=output)
        np.testing.assert_array_equal(np.isnan(theirs[output]), expected_nan, err_msg=f"reference {output}")
        defined = ~expected_nan
        scale = np.max(np.abs(theirs[output][defined]))
        np.testing.assert_allclose(
            values[defined], theirs[output][defined], rtol=1e-9, atol=1e-9 * scale, err_msg=output
        )


def test_zero_volume_candles_are_in_the_hourly_data(candles) -> None:
    """The EMV NaN check above is only meaningful if the data has them."""
    assert (candles[("DOGEUSDT", "1h")]["volume"] == 0).sum() == 2


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_no_look_ahead_prefix_gives_the_same_first_values(candles, name, params) -> None:
    frame = candles[("BTCUSDT", "1h")].iloc[:1500]
    full = compute(name, frame, params)
    lead = indicators.lookback(name, **params)
    for rows in sorted({0, 1, lead, lead + 1, lead + 2, 777, len(frame) - 1}):
        prefix = compute(name, frame.iloc[:rows], params)
        for output in full:
            np.testing.assert_array_equal(prefix[output], full[output][:rows], err_msg=f"{output}[:{rows}]")


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_too_short_input_is_all_nan_of_its_length(candles, name, params) -> None:
    frame = candles[("ETHUSDT", "1d")]
    for output in compute(name, frame.iloc[:3], params):
        lead = warmup(name, params, output)
        for rows in sorted({0, 1, lead}):
            values = compute(name, frame.iloc[:rows], params)[output]
            assert values.shape == (rows,) and np.isnan(values).all()
        values = compute(name, frame.iloc[: lead + 1], params)[output]
        assert np.isnan(values[:lead]).all() and not np.isnan(values[lead])


BAD_PARAMS = [
    (name, {"window": bad}) for name in INPUTS if name != "macd" for bad in (0, -1, 2.5, "14", True, None)
] + [
    ("cci", {"window": 1}),
    ("rolling_volatility", {"window": 1}),
    ("macd", {"fast": 0}),
    ("macd", {"slow": 1, "fast": 1}),
    ("macd", {"signal": 0}),
    ("macd", {"fast": 26, "slow": 12}),
    ("macd", {"fast": 26, "slow": 26}),
]


@pytest.mark.parametrize(("name", "params"), BAD_PARAMS, ids=[f"{n}-{p}" for n, p in BAD_PARAMS])
def test_bad_window_raises_value_error(candles, name, params) -> None:
    frame = candles[("ETHUSDT", "1d")]
    with pytest.raises(ValueError, match="must be"):
        compute(name, frame, params)
    with pytest.raises(ValueError, match="must be"):
        indicators.lookback(name, **params)


@pytest.mark.parametrize(
    ("name", "talib_name", "params", "talib_params"),
    [("sma", "SMA", {"window": w}, {"timeperiod": w}) for w in (1, 2, 30)]
    + [("ema", "EMA", {"window": w}, {"timeperiod": w}) for w in (1, 2, 30)]
    + [("rsi", "RSI", {"window": w}, {"timeperiod": w}) for w in (2, 14)]
    + [("cci", "CCI", {"window": w}, {"timeperiod": w}) for w in (2, 20)]
    + [("atr", "ATR", {"window": w}, {"timeperiod": w}) for w in (1, 14)]
    + [("rate_of_change", "ROC", {"window": w}, {"timeperiod": w}) for w in (1, 10)]
    + [("bollinger", "BBANDS", {"window": w}, {"timeperiod": w}) for w in (2, 20)]
    + [
        (
            "macd",
            "MACD",
            {"fast": f, "slow": s, "signal": g},
            {"fastperiod": f, "slowperiod": s, "signalperiod": g},
        )
        for f, s, g in ((12, 26, 9), (2, 3, 1), (5, 35, 5))
    ],
)
def test_lookback_equals_talib(name, talib_name, params, talib_params) -> None:
    function = abstract.Function(talib_name)
    function.set_parameters(talib_params)
    assert indicators.lookback(name, **params) == function.lookback


def test_lookback_defaults_and_errors() -> None:
    assert {name: indicators.lookback(name) for name in INPUTS if name not in ("sma", "ema")} == {
        "rsi": 14,
        "macd": 33,
        "bollinger": 19,
        "cci": 19,
        "atr": 14,
        "rate_of_change": 10,
        "ease_of_movement": 14,
        "force_index": 13,
        "log_return": 1,
        "rolling_volatility": 24,
    }
    with pytest.raises(TypeError, match="window"):
        indicators.lookback("sma")  # no default window
    with pytest.raises(TypeError, match="windw"):
        indicators.lookback("rsi", windw=3)
    with pytest.raises(ValueError, match="unknown indicator"):
        indicators.lookback("stochastic")


def test_leading_nan_input_is_skipped_like_talib(candles) -> None:
    """Feeding one indicator's output (with its warm-up) into another works, and matches TA-Lib doing it."""
    frame = candles[("ETHUSDT", "1d")]
    high, low, close = (np.r_[np.full(7, np.nan), frame[c].to_numpy()] for c in ("high", "low", "close"))
    low[7:10] = np.nan  # inputs start at different rows: the indicator starts where all have started
    pairs = [
        (indicators.sma(close, 10), talib.SMA(close, 10)),
        (indicators.ema(close, 10), talib.EMA(close, 10)),
        (indicators.rsi(close), talib.RSI(close)),
        (indicators.rate_of_change(close), talib.ROC(close)),
        (indicators.macd(close).signal, talib.MACD(close)[1]),
        (indicators.bollinger(close).upper, talib.BBANDS(close, 20, 2, 2)[0]),
        (indicators.cci(high, low, close), talib.CCI(high, low, close, 20)),
        (indicators.atr(high, low, close), talib.ATR(high, low, close)),
        (indicators.ema(indicators.rsi(close), 9), talib.EMA(talib.RSI(close), 9)),
        (indicators.sma(indicators.macd(close).histogram, 5), talib.SMA(talib.MACD(close)[2], 5)),
    ]
    for ours, theirs in pairs:
        assert np.isnan(ours[:10]).all() and not np.isnan(ours[-1])
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * np.nanmax(np.abs(theirs)))


def test_non_finite_values_show_where_ieee_arithmetic_puts_them() -> None:
    x = np.arange(1.0, 41.0)
    x[20] = np.nan
    rows = np.arange(x.size)
    # A window statistic is NaN only while the NaN is inside its window, then recovers exactly.
    mean = indicators.sma(x, 5)
    np.testing.assert_array_equal(np.isnan(mean), (rows < 4) | ((rows >= 20) & (rows < 25)))
    np.testing.assert_allclose(mean[25:], x[25:] - 2.0, rtol=0, atol=1e-12)
    assert np.isnan(indicators.bollinger(x, 5).upper[20:25]).all()
    assert not np.isnan(indicators.bollinger(x, 5).upper[25:]).any()
    # A recursion carries it on.
    np.testing.assert_array_equal(np.isnan(indicators.ema(x, 5)), (rows < 4) | (rows >= 20))
    # +inf stays +inf in the windows holding it (pandas would say NaN), and leaves the later ones alone.
    y = np.arange(1.0, 41.0)
    y[20] = np.inf
    np.testing.assert_array_equal(indicators.sma(y, 5)[20:25], np.inf)
    np.testing.assert_allclose(indicators.sma(y, 5)[25:], y[25:] - 2.0, rtol=0, atol=1e-12)
    # Zero volume: EMV is inf on a bar that moved and NaN (0/0) on a flat one.
    high = np.array([10.0, 11.0, 12.0, 12.0, 13.0])
    low = np.array([9.0, 10.0, 11.0, 12.0, 12.0])
    volume = np.array([5.0, 0.0, 5.0, 0.0, 5.0])
    emv = indicators.ease_of_movement(high, low, volume, window=1)
    assert np.isnan(emv[0]) and emv[1] == np.inf and np.isfinite(emv[2]) and np.isnan(emv[3])


def test_deviation_stays_exact_in_a_calm_window_after_a_volatile_one() -> None:
    """The running deviation does not keep the rounding of a spike that has left its window (without the
    restarts it is 5e-4 off here). Tighter tolerances than elsewhere: this test is about precision."""
    rng = np.random.default_rng(7)
    prices = 1.0 + 1e-4 * rng.standard_normal(3000)
    prices[1000:1003] += 1e3 * rng.standard_normal(3)
    returns = np.diff(np.log(prices))
    for window in (20, 300):
        exact = np.lib.stride_tricks.sliding_window_view(prices, window).std(axis=1)
        band = indicators.bollinger(prices, window, n_std=1.0)
        # upper - middle loses ~ulp(1.0) / 1e-4 = 2e-12 to its own subtraction
        np.testing.assert_allclose((band.upper - band.middle)[window - 1 :], exact, rtol=1e-11, atol=0)
        sample = np.lib.stride_tricks.sliding_window_view(returns, window).std(axis=1, ddof=1)
        np.testing.assert_allclose(indicators.rolling_volatility(prices, window)[window:], sample, rtol=1e-12)


def test_talib_edge_semantics_are_kept() -> None:
    flat = np.full(40, 16541.77)
    np.testing.assert_array_equal(indicators.rsi(flat)[14:], 0.0)
    np.testing.assert_array_equal(talib.RSI(flat)[14:], 0.0)
    # A flat window, and one flat but for rounding in its mean, give CCI 0 rather than noise / noise.
    for price in (16541.77, 0.1, 63696.53177045811):
        level = np.full(30, price)
        np.testing.assert_array_equal(indicators.cci(level, level, level, 7)[6:], 0.0)
        np.testing.assert_array_equal(talib.CCI(level, level, level, 7)[6:], 0.0)
    np.testing.assert_array_equal(indicators.bollinger(flat).upper[19:], flat[19:])
    prices = np.array([0.0, 1.0, 2.0, 0.0, 3.0])
    np.testing.assert_array_equal(indicators.rate_of_change(prices, 1), talib.ROC(prices, 1))


def test_inputs_are_converted_checked_and_left_alone(candles) -> None:
    frame = candles[("ETHUSDT", "1d")]
    close = frame["close"]
    before = close.to_numpy().copy()
    from_series = indicators.bollinger(close)
    assert all(isinstance(band, np.ndarray) and band.dtype == np.float64 for band in from_series)
    np.testing.assert_array_equal(from_series.middle, indicators.sma(close.to_numpy(), 20))
    np.testing.assert_array_equal(indicators.sma(close.tolist(), 20), from_series.middle)
    np.testing.assert_array_equal(indicators.sma(np.arange(30), 3), indicators.sma(np.arange(30.0), 3))
    np.testing.assert_array_equal(close.to_numpy(), before)
    with pytest.raises(ValueError, match="same length"):
        indicators.atr(frame["high"], frame["low"][:-1], frame["close"])
    with pytest.raises(ValueError, match="one-dimensional"):
        indicators.sma(frame[["open", "close"]], 3)
