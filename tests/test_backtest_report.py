"""The HTML report: offline pages, one per symbol, small thanks to display-only merging of candles."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import align_signals, market_from_candles
from pricelevel.backtest.metrics import compute_metrics, format_duration, format_metric
from pricelevel.backtest.report import REASON_COLORS, coarsen_candles, coarsen_line, write_report
from pricelevel.backtest.run import run_backtest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
SYMBOLS = ("BTCUSDT", "ETHUSDT")
LEVELS = {"BTCUSDT": [30000.0, 45123.5, 69000.0], "SOLUSDT": [123.0]}  # SOL is not in the backtest


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    """Two symbols of real 1h candles (30k bars each), random signals, the report in a new folder."""
    candles = pd.concat(
        [pd.read_parquet(SAMPLE / f"{s}_1h.parquet").assign(symbol=s) for s in SYMBOLS], ignore_index=True
    )
    market = market_from_candles(candles)
    rng = np.random.default_rng(7)
    signals = candles[["timestamp", "symbol"]].assign(
        entry=rng.random(len(candles)) < 0.01, exit=rng.random(len(candles)) < 0.01
    )
    entries, exits = align_signals(market, signals)
    config = BacktestConfig(fill="close", sizing="fraction", fraction=0.2, max_positions=2, report_max_bars=4000)
    result = run_backtest(market, entries, exits, config)
    metrics = compute_metrics(result)
    path = tmp_path_factory.mktemp("report") / "out" / "report.html"  # "out" does not exist yet
    files = write_report(result, metrics, path, levels=LEVELS)
    return result, metrics, path, files


def figure_json(page: str, div_id: str) -> tuple[list[dict], dict]:
    """The (data, layout) passed to ``Plotly.newPlot`` for ``div_id`` in a page."""
    decoder = json.JSONDecoder()
    start = page.index(f'Plotly.newPlot(                        "{div_id}",') + len("Plotly.newPlot(")
    _, pos = decoder.raw_decode(page, page.index('"', start))
    data, pos = decoder.raw_decode(page, page.index("[", pos))
    layout, _ = decoder.raw_decode(page, page.index("{", pos))
    return data, layout


def values(array) -> np.ndarray:
    """A trace array as numpy, whether plotly wrote it as a list or as base64 (``bdata``)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
    return np.asarray(array)


def test_writes_summary_symbol_pages_and_one_plotly_bundle(real):
    result, _, path, files = real
    folder = path.parent
    assert files == [path, folder / "report-BTCUSDT.html", folder / "report-ETHUSDT.html", folder / "plotly.min.js"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in files)  # no temp files left
    assert len(list(folder.glob("*.js"))) == 1
    assert (folder / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()


def test_pages_open_offline_and_stay_small(real):
    _, _, path, files = real
    js_size = (path.parent / "plotly.min.js").stat().st_size
    for page_path in files[:-1]:
        page = page_path.read_text(encoding="utf-8")
        assert re.findall(r'<script[^>]*\bsrc="([^"]*)"', page) == ["plotly.min.js"]
        assert "cdn.plot.ly" not in page and "https://" not in page and "http://" not in page
        assert page_path.stat().st_size < 1_500_000 < js_size  # the bundle is referenced, not embedded


def test_summary_links_every_symbol_and_shows_rules_and_refusals(real):
    result, _, path, _ = real
    page = path.read_text(encoding="utf-8")
    for symbol in SYMBOLS:
        assert f'<a href="report-{symbol}.html">{symbol}</a>' in page
    for label in ("fees", "slippage", "stop-loss", "take-profit", "fill", "sizing", "max positions"):
        assert f"<th>{label}</th>" in page
    assert "<td>0.1%</td>" in page  # fees, as a percentage
    for label in result.rejected:
        assert f"<th>{label.replace('_', ' ')}</th>" in page
    data, _ = figure_json(page, "chart-portfolio")
    assert [t["name"] for t in data] == ["equity", "drawdown", *SYMBOLS]
    assert len(values(data[0]["y"])) <= result.config.report_max_bars
    drawdown = values(data[1]["y"])
    assert drawdown.max() <= 0
    assert drawdown.min() == pytest.approx(compute_metrics(result).portfolio["max_drawdown"])


def test_symbol_page_draws_merged_candles_exact_trades_and_levels(real):
    result, metrics, path, _ = real
    market, trades = result.market, result.trades
    page = (path.parent / "report-BTCUSDT.html").read_text(encoding="utf-8")
    assert '<a href="report.html">&larr; summary</a>' in page
    data, layout = figure_json(page, "chart-BTCUSDT")

    candles = next(t for t in data if t["type"] == "candlestick")
    k = market.symbols.index("BTCUSDT")
    assert market.n_bars > result.config.report_max_bars >= len(values(candles["open"]))
    assert values(candles["high"]).max() == np.nanmax(market.high[:, k])
    assert values(candles["low"]).min() == np.nanmin(market.low[:, k])
    assert values(candles["open"])[0] == market.open[0, k] and values(candles["close"])[-1] == market.close[-1, k]
    assert layout["xaxis"]["rangeslider"]["visible"] is False

    mine = trades[trades["symbol"] == "BTCUSDT"]
    markers = [t for t in data if t.get("mode") == "markers"]
    entries = [t for t in markers if t["marker"]["symbol"] == "triangle-up"]
    assert sorted(t["name"] for t in entries) == sorted(set(mine["exit_reason"]))
    assert [t["name"] for t in markers if t.get("showlegend") is not False] == [t["name"] for t in entries]
    drawn_times = pd.to_datetime(np.concatenate([t["x"] for t in entries]), utc=True)
    assert sorted(drawn_times) == sorted(mine["entry_time"])  # every trade, at its exact time
    drawn_prices = np.sort(np.concatenate([values(t["y"]) for t in entries]))
    np.testing.assert_array_equal(drawn_prices, np.sort(mine["entry_price"].to_numpy()))
    assert "pnl" in entries[0]["hovertemplate"] and "return" in entries[0]["hovertemplate"]

    assert sorted(s["y0"] for s in layout["shapes"]) == LEVELS["BTCUSDT"]
    assert "45123.5" not in (path.parent / "report-ETHUSDT.html").read_text(encoding="utf-8")
    assert format_metric("total_return", metrics.symbols["BTCUSDT"]["total_return"]) in layout["title"]["text"]

    equity, drawdown = (next(t for t in data if t.get("name") == n) for n in ("equity", "drawdown"))
    assert len(values(equity["y"])) == len(values(candles["open"]))
    assert values(drawdown["y"]).min() == pytest.approx(metrics.symbols["BTCUSDT"]["max_drawdown"])


def test_rewriting_an_unchanged_report_leaves_files_untouched(real):
    result, metrics, path, files = real
    before = {p: p.stat().st_mtime_ns for p in files}
    assert write_report(result, metrics, path, levels=LEVELS) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_coarsen_candles_hand_made():
    times = pd.date_range("2024-01-01", periods=8, freq="h", tz="UTC")
    frame = pd.DataFrame(
        {
            "open": [10, 11, 12, np.nan, 13, 14, 15, 16],
            "high": [12, 19, 13, np.nan, 14, 15, 16, 17],
            "low": [9, 10, 11, np.nan, 5, 13, 14, 15],
            "close": [11, 12, 13, np.nan, 14, 15, 16, 16.5],
        },
        index=times,
    )
    merged = coarsen_candles(frame, max_bars=3)  # 7 candles after the NaN row: groups of 3, 3, 1
    expected = pd.DataFrame(
        {"open": [10.0, 13, 16], "high": [19.0, 16, 17], "low": [9.0, 5, 15], "close": [13.0, 16, 16.5]},
        index=times[[0, 4, 7]],
    )
    pd.testing.assert_frame_equal(merged, expected)
    pd.testing.assert_frame_equal(coarsen_candles(frame, max_bars=7), frame.dropna())  # short enough: as is


def test_coarsen_candles_keeps_extremes_of_real_data():
    frame = pd.read_parquet(SAMPLE / "BTCUSDT_1h.parquet").set_index("timestamp")
    merged = coarsen_candles(frame, max_bars=1000)
    assert len(merged) <= 1000
    assert merged["high"].max() == frame["high"].max() and merged["low"].min() == frame["low"].min()
    assert merged["open"].iloc[0] == frame["open"].iloc[0] and merged["close"].iloc[-1] == frame["close"].iloc[-1]
    assert merged.index[0] == frame.index[0] and merged.index.isin(frame.index).all()


def test_coarsen_line_keeps_the_worst_drawdown_and_the_last_equity():
    index = pd.date_range("2024-01-01", periods=5, freq="D", tz="UTC")
    drawdown = pd.Series([0.0, -0.3, -0.1, 0.0, -0.05], index=index)
    pd.testing.assert_series_equal(coarsen_line(drawdown, 2, "min"), pd.Series([-0.3, -0.05], index=index[[0, 3]]))
    equity = pd.Series([100.0, 90, 95, 101, 99], index=index)
    pd.testing.assert_series_equal(coarsen_line(equity, 2, "last"), pd.Series([95.0, 99], index=index[[0, 3]]))
    with pytest.raises(ValueError, match="how"):
        coarsen_line(equity, 2, "mean")


def test_format_metric_is_readable():
    assert format_metric("total_return", 0.12345) == "12.35%"
    assert format_metric("max_drawdown", -0.2) == "-20.00%"
    assert format_metric("sharpe", 1.23456) == "1.23"
    assert format_metric("final_value", 12345.678) == "12,345.68"
    assert format_metric("n_trades", 1234) == "1,234"
    assert format_metric("profit_factor", float("nan")) == "–"
    assert format_metric("avg_holding_time", pd.Timedelta(hours=27, minutes=30)) == "1d 3h"
    assert format_duration(pd.Timedelta(minutes=75)) == "1h 15m"
    assert format_duration(pd.NaT) == "–"


def test_symbol_without_candles_on_some_bars_and_no_trades(tmp_path: Path):
    btc = pd.read_parquet(SAMPLE / "BTCUSDT_1h.parquet").iloc[:500].assign(symbol="BTCUSDT")
    eth = pd.read_parquet(SAMPLE / "ETHUSDT_1h.parquet").iloc[200:500].assign(symbol="ETHUSDT")  # NaN before
    market = market_from_candles(pd.concat([btc, eth], ignore_index=True))
    no_signal = np.zeros(market.close.shape, dtype=bool)
    result = run_backtest(market, no_signal, no_signal, BacktestConfig(fill="close", report_max_bars=100))
    files = write_report(result, compute_metrics(result), tmp_path / "bt.html")
    assert [p.name for p in files] == ["bt.html", "bt-BTCUSDT.html", "bt-ETHUSDT.html", "plotly.min.js"]
    assert "No trades." in files[0].read_text(encoding="utf-8")
    data, layout = figure_json(files[2].read_text(encoding="utf-8"), "chart-ETHUSDT")
    assert not [t for t in data if t.get("mode") == "markers"] and "shapes" not in layout
    candles = next(t for t in data if t["type"] == "candlestick")
    assert len(values(candles["open"])) == 100  # 300 candles of ETH (not 500 bars) in groups of 3
    assert pd.Timestamp(candles["x"][0], tz="UTC") == eth["timestamp"].iloc[0]
    assert values(candles["high"]).max() == eth["high"].max()


def test_time_stop_exits_get_their_own_marker_and_rule(tmp_path: Path):
    candles = pd.read_parquet(SAMPLE / "BTCUSDT_1h.parquet").iloc[:600].assign(symbol="BTCUSDT")
    market = market_from_candles(candles)
    rng = np.random.default_rng(3)
    entries = rng.random(market.close.shape) < 0.05
    no_exit = np.zeros(market.close.shape, dtype=bool)
    config = BacktestConfig(fill="close", sl_stop=0.02, tp_stop=0.02, max_hold_bars=3)
    result = run_backtest(market, entries, no_exit, config)
    assert {"time_stop", "stop_loss", "take_profit"} <= set(result.trades["exit_reason"])
    files = write_report(result, compute_metrics(result), tmp_path / "bt.html")
    summary = files[0].read_text(encoding="utf-8")
    assert "<th>time stop</th><td>3 bars</td>" in summary
    assert "<th>time_stop</th>" in summary  # a column of the trades-by-reason table
    data, _ = figure_json(files[1].read_text(encoding="utf-8"), "chart-BTCUSDT")
    markers = [t for t in data if t.get("mode") == "markers" and t["name"] == "time_stop"]
    assert len(markers) == 2  # entries and exits
    assert {t["marker"]["color"] for t in markers} == {REASON_COLORS["time_stop"]}
    assert len(set(REASON_COLORS.values())) == len(REASON_COLORS)  # every reason is told apart
    exits = next(t for t in markers if t["marker"]["symbol"] == "triangle-down")
    assert len(exits["x"]) == int((result.trades["exit_reason"] == "time_stop").sum())
