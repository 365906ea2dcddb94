"""Properties that must hold for any input (hypothesis), and the vectorbt semantics contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import Market, market_from_candles
from pricelevel.backtest.metrics import symbol_equity
from pricelevel.backtest.run import run_backtest
from pricelevel.core.timeframes import Timeframe
from tests.conftest import real_candles

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def synthetic_market(seed: int, n_bars: int, n_symbols: int, missing: float = 0.0) -> Market:
    """A random walk with consistent OHLC (low <= open, close <= high); ``missing`` blanks random bars."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, (n_bars, n_symbols)), axis=0))
    open_ = np.vstack([close[:1], close[:-1]]) * np.exp(rng.normal(0, 0.01, (n_bars, n_symbols)))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.01, (n_bars, n_symbols))))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.01, (n_bars, n_symbols))))
    if missing:
        holes = rng.random((n_bars, n_symbols)) < missing
        for a in (open_, high, low, close):
            a[holes] = np.nan
    timestamps = pd.date_range("2024-01-01", periods=n_bars, freq="1h", tz="UTC")
    symbols = tuple(f"S{k}USDT" for k in range(n_symbols))
    return Market(timestamps, symbols, open_, high, low, close, Timeframe.H1)


configs = st.builds(
    BacktestConfig,
    fees=st.sampled_from([0.0, 0.001, 0.01]),
    slippage=st.sampled_from([0.0, 0.0005, 0.01]),
    sl_stop=st.sampled_from([None, 0.01, 0.05]),
    tp_stop=st.sampled_from([None, 0.02, 0.1]),
    fill=st.sampled_from(["close", "next_open"]),
    sizing=st.sampled_from(["all_in", "fraction"]),
    fraction=st.sampled_from([0.1, 0.5, 1.0]),
    min_order_value=st.sampled_from([0.0, 5.0]),
    max_positions=st.integers(1, 4),
)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(2, 300), fill=st.sampled_from(["close", "next_open"]))
def test_without_costs_an_always_in_signal_equals_buy_and_hold(seed, n_bars, fill):
    market = synthetic_market(seed, n_bars, 1)
    entries = np.ones((n_bars, 1), dtype=bool)
    exits = np.zeros((n_bars, 1), dtype=bool)
    config = BacktestConfig(fees=0, slippage=0, sl_stop=None, tp_stop=None, fill=fill, sizing="all_in",
                            min_order_value=0)
    equity = run_backtest(market, entries, exits, config).equity.to_numpy()
    close = market.close[:, 0]
    if fill == "close":
        expected = config.init_cash * close / close[0]
    else:  # bought at bar 1's open; flat (all cash) during bar 0
        expected = np.concatenate([[config.init_cash], config.init_cash * close[1:] / market.open[1, 0]])
    np.testing.assert_allclose(equity, expected, rtol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(1, 300), n_symbols=st.integers(1, 4),
       density=st.floats(0.01, 0.5), config=configs)
def test_long_only_equity_never_goes_negative_and_symbols_add_up(seed, n_bars, n_symbols, density, config):
    market = synthetic_market(seed, n_bars, n_symbols, missing=0.05)
    rng = np.random.default_rng(seed + 1)
    entries = rng.random(market.close.shape) < density
    exits = rng.random(market.close.shape) < density
    result = run_backtest(market, entries, exits, config)
    equity = result.equity.to_numpy()
    assert (equity >= 0).all()
    assert (result.trades["size"] > 0).all()
    assert len(result.trades.query("exit_reason == 'open'")) <= config.max_positions
    parts = symbol_equity(result).to_numpy() - config.init_cash
    np.testing.assert_allclose(parts.sum(axis=1) + config.init_cash, equity, rtol=1e-9, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(1, 200), chunk=st.integers(1, 60), config=configs)
def test_results_do_not_depend_on_chunking(seed, n_bars, chunk, config):
    market = synthetic_market(seed, n_bars, 3, missing=0.05)
    rng = np.random.default_rng(seed + 7)
    entries = rng.random(market.close.shape) < 0.2
    exits = rng.random(market.close.shape) < 0.2
    whole = run_backtest(market, entries, exits, config)
    chunked = run_backtest(market, entries, exits, config, chunk_bars=chunk)
    assert np.array_equal(whole.equity.to_numpy(), chunked.equity.to_numpy())
    pd.testing.assert_frame_equal(whole.trades, chunked.trades)
    assert whole.rejected == chunked.rejected


# ----------------------------------------------------------------------------------- vectorbt contract

vbt = pytest.importorskip("vectorbt")

TRADE_PAIRS = [("entry_idx", "entry_bar"), ("exit_idx", "exit_bar"), ("entry_price", "entry_price"),
               ("exit_price", "exit_price"), ("size", "size"), ("entry_fees", "entry_fees"),
               ("exit_fees", "exit_fees"), ("pnl", "pnl"), ("return", "return")]


def contract_config(fees: float, slippage: float, sl_stop, tp_stop, init_cash: float = 10_000.0) -> BacktestConfig:
    """Fill at the close, all-in: the setting in which our engine must equal vectorbt."""
    return BacktestConfig(init_cash=init_cash, fees=fees, slippage=slippage, sl_stop=sl_stop, tp_stop=tp_stop,
                          fill="close", sizing="all_in", min_order_value=0, max_positions=1)


def assert_matches_vectorbt(market: Market, entries: np.ndarray, exits: np.ndarray, config: BacktestConfig) -> int:
    """Compare one symbol trade for trade and bar for bar; returns the number of trades compared."""
    nan = float("nan")
    pf = vbt.Portfolio.from_signals(
        market.close[:, 0], entries[:, 0], exits[:, 0], open=market.open[:, 0], high=market.high[:, 0],
        low=market.low[:, 0], fees=config.fees, slippage=config.slippage,
        sl_stop=nan if config.sl_stop is None else config.sl_stop,
        tp_stop=nan if config.tp_stop is None else config.tp_stop, init_cash=config.init_cash,
    )
    ours = run_backtest(market, entries, exits, config)
    theirs = pf.trades.records
    assert len(ours.trades) == len(theirs)
    for their_name, our_name in TRADE_PAIRS:
        np.testing.assert_allclose(ours.trades[our_name].to_numpy(), theirs[their_name], rtol=1e-9, atol=0,
                                   err_msg=our_name)
    assert ((ours.trades["exit_reason"] == "open").to_numpy() == (theirs["status"] == 0)).all()
    np.testing.assert_allclose(ours.equity.to_numpy(), pf.value(), rtol=1e-9)
    assert ours.equity.iloc[-1] == pytest.approx(pf.final_value(), rel=1e-9)
    return len(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT", "DOGEUSDT", "SOLUSDT"])
def test_equals_vectorbt_on_random_signals_over_real_candles(symbol):
    market = market_from_candles(real_candles(symbol, "1h"), symbol=symbol)
    rng = np.random.default_rng(sum(map(ord, symbol)))
    entries = rng.random(market.close.shape) < 0.01
    exits = rng.random(market.close.shape) < 0.01
    compared = assert_matches_vectorbt(market, entries, exits, contract_config(0.001, 0.0005, 0.02, 0.04))
    assert compared > 100  # enough trades for every rule to have been exercised many times


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(2, 400), density=st.floats(0.01, 0.5),
       fees=st.sampled_from([0.0, 0.001, 0.02]), slippage=st.sampled_from([0.0, 0.001, 0.02]),
       sl_stop=st.sampled_from([None, 0.005, 0.03, 0.2]), tp_stop=st.sampled_from([None, 0.005, 0.03, 0.5]))
def test_equals_vectorbt_on_random_markets(seed, n_bars, density, fees, slippage, sl_stop, tp_stop):
    market = synthetic_market(seed, n_bars, 1)
    rng = np.random.default_rng(seed + 11)
    entries = rng.random(market.close.shape) < density
    exits = rng.random(market.close.shape) < density
    assert_matches_vectorbt(market, entries, exits, contract_config(fees, slippage, sl_stop, tp_stop))
