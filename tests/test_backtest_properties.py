"""Properties that must hold for any input (hypothesis), and the vectorbt semantics contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pricelevel.backtest.config import BacktestConfig, ProtectionsConfig
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
    max_hold_bars=st.sampled_from([None, None, 1, 3, 12]),
    # off, the trader's defaults, and limits tight enough to fire on a few hundred random bars
    protections=st.sampled_from([None, ProtectionsConfig(), ProtectionsConfig(
        max_positions=2, max_drawdown=0.1, daily_loss_limit=0.02, cooldown_losses=2, cooldown_bars=5)]),
)


def entry_stop_arrays(seed: int, shape: tuple[int, int], nan_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Random per-entry stop-loss / take-profit fractions, NaN (the scalar) on a share of the bars."""
    rng = np.random.default_rng(seed)
    sl = rng.uniform(0.002, 0.1, shape)
    tp = rng.uniform(0.002, 0.2, shape)
    sl[rng.random(shape) < nan_share] = np.nan
    tp[rng.random(shape) < nan_share] = np.nan
    return sl, tp


def with_risk(config: BacktestConfig, risk: bool) -> BacktestConfig:
    """Risk sizing where the config allows it (it needs the scalar stop-loss as the fallback)."""
    if risk and config.sl_stop is not None:
        return BacktestConfig.model_validate({**config.model_dump(), "sizing": "risk"})
    return config


def assert_same_result(a, b) -> None:
    assert np.array_equal(a.equity.to_numpy(), b.equity.to_numpy())
    pd.testing.assert_frame_equal(a.trades, b.trades)
    assert a.rejected == b.rejected and a.refused == b.refused


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(2, 300), fill=st.sampled_from(["close", "next_open"]))
def test_without_costs_an_always_in_signal_equals_buy_and_hold(seed, n_bars, fill):
    market = synthetic_market(seed, n_bars, 1)
    entries = np.ones((n_bars, 1), dtype=bool)
    exits = np.zeros((n_bars, 1), dtype=bool)
    config = BacktestConfig(fees=0, slippage=0, sl_stop=None, tp_stop=None, fill=fill, sizing="all_in",
                            min_order_value=0, protections=None)
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
    assert whole.refused == chunked.refused


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(2, 200), hold=st.integers(1, 15),
       missing=st.sampled_from([0.0, 0.1]), config=configs)
def test_no_trade_outlives_its_time_stop(seed, n_bars, hold, missing, config):
    config = BacktestConfig.model_validate({**config.model_dump(), "max_hold_bars": hold})
    market = synthetic_market(seed, n_bars, 2, missing=missing)
    rng = np.random.default_rng(seed + 3)
    entries = rng.random(market.close.shape) < 0.2
    exits = rng.random(market.close.shape) < 0.1
    trades = run_backtest(market, entries, exits, config).trades
    next_open = config.fill == "next_open"
    limit = hold - int(next_open)  # bars from the entry fill to the due bar
    close = market.close
    for row in trades.itertuples():
        k = market.symbols.index(row.symbol)
        due = row.entry_bar + limit
        no_bar_until = lambda stop, k=k, due=due: bool(np.isnan(close[due:stop, k]).all())  # noqa: E731
        if row.exit_reason == "open":  # never came due on a bar of its symbol
            assert no_bar_until(n_bars)
            continue
        # out by the due bar, or at the symbol's first bar after it
        assert row.exit_bar <= due or no_bar_until(row.exit_bar)
        if row.exit_reason == "time_stop":
            assert row.exit_bar >= due
            assert row.exit_price == close[row.exit_bar, k] * (1 - config.slippage)
        elif row.exit_reason == "signal":  # only a signal queued before the due bar fills at its open
            assert row.exit_bar < due or (next_open and no_bar_until(row.exit_bar))
    if missing == 0:
        assert ((trades["exit_bar"] - trades["entry_bar"]) <= limit).all()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(1, 200), chunk=st.integers(1, 60),
       hold=st.sampled_from([None, 1, 2, 5, 20]), risk=st.booleans(), nan_share=st.sampled_from([0.0, 0.5, 1.0]),
       config=configs)
def test_results_do_not_depend_on_chunking_with_time_and_entry_stops(seed, n_bars, chunk, hold, risk, nan_share,
                                                                     config):
    config = with_risk(BacktestConfig.model_validate({**config.model_dump(), "max_hold_bars": hold}), risk)
    market = synthetic_market(seed, n_bars, 3, missing=0.05)
    rng = np.random.default_rng(seed + 7)
    entries = rng.random(market.close.shape) < 0.2
    exits = rng.random(market.close.shape) < 0.2
    sl, tp = entry_stop_arrays(seed + 8, market.close.shape, nan_share)
    whole = run_backtest(market, entries, exits, config, entry_sl=sl, entry_tp=tp)
    chunked = run_backtest(market, entries, exits, config, chunk_bars=chunk, entry_sl=sl, entry_tp=tp)
    assert_same_result(whole, chunked)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(1, 200), extra=st.integers(0, 10**30), config=configs)
def test_a_time_stop_no_shorter_than_the_data_changes_nothing(seed, n_bars, extra, config):
    market = synthetic_market(seed, n_bars, 2, missing=0.05)
    rng = np.random.default_rng(seed + 5)
    entries = rng.random(market.close.shape) < 0.2
    exits = rng.random(market.close.shape) < 0.1
    off = BacktestConfig.model_validate({**config.model_dump(), "max_hold_bars": None})
    long = BacktestConfig.model_validate({**config.model_dump(), "max_hold_bars": n_bars + extra})
    assert_same_result(run_backtest(market, entries, exits, off), run_backtest(market, entries, exits, long))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(1, 200), as_scalar=st.booleans(), risk=st.booleans(),
       config=configs)
def test_entry_stops_of_nan_or_the_scalar_change_nothing(seed, n_bars, as_scalar, risk, config):
    config = with_risk(config, risk)
    market = synthetic_market(seed, n_bars, 2, missing=0.05)
    rng = np.random.default_rng(seed + 9)
    entries = rng.random(market.close.shape) < 0.2
    exits = rng.random(market.close.shape) < 0.1
    nan = float("nan")
    fill_sl = config.sl_stop if as_scalar and config.sl_stop is not None else nan
    fill_tp = config.tp_stop if as_scalar and config.tp_stop is not None else nan
    sl, tp = np.full(market.close.shape, fill_sl), np.full(market.close.shape, fill_tp)
    assert_same_result(run_backtest(market, entries, exits, config),
                       run_backtest(market, entries, exits, config, entry_sl=sl, entry_tp=tp))


# ----------------------------------------------------------------------------------- vectorbt contract

vbt = pytest.importorskip("vectorbt")

TRADE_PAIRS = [("entry_idx", "entry_bar"), ("exit_idx", "exit_bar"), ("entry_price", "entry_price"),
               ("exit_price", "exit_price"), ("size", "size"), ("entry_fees", "entry_fees"),
               ("exit_fees", "exit_fees"), ("pnl", "pnl"), ("return", "return")]


def contract_config(fees: float, slippage: float, sl_stop, tp_stop, init_cash: float = 10_000.0) -> BacktestConfig:
    """Fill at the close, all-in: the setting in which our engine must equal vectorbt."""
    return BacktestConfig(init_cash=init_cash, fees=fees, slippage=slippage, sl_stop=sl_stop, tp_stop=tp_stop,
                          fill="close", sizing="all_in", min_order_value=0, max_positions=1, protections=None)


def assert_matches_vectorbt(market: Market, entries: np.ndarray, exits: np.ndarray, config: BacktestConfig,
                            entry_sl: np.ndarray | None = None, entry_tp: np.ndarray | None = None) -> int:
    """Compare one symbol trade for trade and bar for bar; returns the number of trades compared.

    ``entry_sl``/``entry_tp`` (with the scalar stops off, so NaN means "no stop" in both engines) go to
    vectorbt as per-bar stop arrays, which it reads at the entry bar: the same as our per-entry stops.
    """
    nan = float("nan")
    pf = vbt.Portfolio.from_signals(
        market.close[:, 0], entries[:, 0], exits[:, 0], open=market.open[:, 0], high=market.high[:, 0],
        low=market.low[:, 0], fees=config.fees, slippage=config.slippage,
        sl_stop=entry_sl[:, 0] if entry_sl is not None else nan if config.sl_stop is None else config.sl_stop,
        tp_stop=entry_tp[:, 0] if entry_tp is not None else nan if config.tp_stop is None else config.tp_stop,
        init_cash=config.init_cash,
    )
    ours = run_backtest(market, entries, exits, config, entry_sl=entry_sl, entry_tp=entry_tp)
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


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_bars=st.integers(2, 400), density=st.floats(0.01, 0.5),
       fees=st.sampled_from([0.0, 0.001]), slippage=st.sampled_from([0.0, 0.001]),
       nan_share=st.sampled_from([0.0, 0.3, 1.0]))
def test_entry_stops_equal_vectorbt_per_bar_stops(seed, n_bars, density, fees, slippage, nan_share):
    market = synthetic_market(seed, n_bars, 1)
    rng = np.random.default_rng(seed + 13)
    entries = rng.random(market.close.shape) < density
    exits = rng.random(market.close.shape) < density
    sl, tp = entry_stop_arrays(seed + 14, market.close.shape, nan_share)
    assert_matches_vectorbt(market, entries, exits, contract_config(fees, slippage, None, None), sl, tp)
