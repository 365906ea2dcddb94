"""`pricelevel backtest` as a user runs it: bundled candles, random signals, JSON and HTML out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import real_candles

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def random_signals(candles: pd.DataFrame, seed: int, density: float = 0.02) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(candles)
    frame = pd.DataFrame({"timestamp": candles["timestamp"], "entry": rng.random(n) < density,
                          "exit": rng.random(n) < density})
    if "symbol" in candles.columns:
        frame["symbol"] = candles["symbol"].to_numpy()
    return frame


@pytest.fixture
def portfolio_files(tmp_path: Path) -> tuple[Path, Path]:
    candles = pd.concat([real_candles(s, "1h").assign(symbol=s) for s in SYMBOLS], ignore_index=True)
    candles_path, signals_path = tmp_path / "candles.parquet", tmp_path / "signals.parquet"
    candles.to_parquet(candles_path)
    random_signals(candles, seed=5).to_parquet(signals_path)
    return candles_path, signals_path


def test_backtest_writes_metrics_and_every_trade(cli, project: Path, portfolio_files, tmp_path: Path) -> None:
    candles, signals = portfolio_files
    out = tmp_path / "out.json"
    code, stdout, err = cli("backtest", "--candles", str(candles), "--signals", str(signals), "--json", str(out),
                            "--set", "backtest.max_positions=2", "--set", "backtest.fill=close")
    assert code == 0, err
    assert "Sharpe" in stdout and "BTCUSDT" in stdout
    doc = json.loads(out.read_text())
    assert doc["period"]["symbols"] == list(SYMBOLS) and doc["period"]["timeframe"] == "1h"
    assert doc["config"]["max_positions"] == 2 and doc["config"]["fill"] == "close"
    trades = pd.DataFrame(doc["trades"])
    assert list(trades.columns) == ["symbol", "entry_time", "exit_time", "entry_price", "exit_price", "size", "pnl",
                                    "return", "exit_reason", "fees"]
    assert set(trades["exit_reason"]) <= {"signal", "stop_loss", "take_profit", "open"}
    assert {"signal", "stop_loss", "take_profit"} <= set(trades["exit_reason"])
    # the money adds up: every trade's P&L (open ones at the last close) is the change in equity
    portfolio = doc["metrics"]["portfolio"]
    assert trades["pnl"].sum() == pytest.approx(portfolio["final_value"] - doc["config"]["init_cash"], rel=1e-9)
    assert portfolio["n_trades"] == int((trades["exit_reason"] != "open").sum())
    assert sum(doc["metrics"]["symbols"][s]["n_trades"] for s in SYMBOLS) == portfolio["n_trades"]
    # never more than max_positions open at once
    opened = pd.to_datetime(trades["entry_time"])
    closed = pd.to_datetime(trades["exit_time"])
    events = pd.concat([pd.Series(1, index=opened), pd.Series(-1, index=closed)]).sort_index(kind="stable")
    assert events.groupby(level=0).sum().cumsum().max() <= 2


def test_backtest_takes_probabilities_and_a_threshold(cli, project: Path, tmp_path: Path) -> None:
    candles = real_candles("BTCUSDT", "1h", rows=3000)
    candles_path = tmp_path / "BTCUSDT_1h.parquet"  # no symbol column: the file name says it
    candles.to_parquet(candles_path)
    rng = np.random.default_rng(0)
    signals = tmp_path / "p.parquet"
    pd.DataFrame({"timestamp": candles["timestamp"], "probability": rng.random(len(candles))}).to_parquet(signals)
    counts = {}
    for threshold in ("0.99", "0.9"):
        out = tmp_path / f"{threshold}.json"
        code, _, err = cli("backtest", "--candles", str(candles_path), "--signals", str(signals), "--json", str(out),
                           "--set", f"backtest.threshold={threshold}", "--set", "backtest.sl_stop=0.005")
        assert code == 0, err
        doc = json.loads(out.read_text())
        assert doc["period"]["symbols"] == ["BTCUSDT"]
        counts[threshold] = len(doc["trades"])
    assert 0 < counts["0.99"] < counts["0.9"]


def test_backtest_report_opens_offline(cli, project: Path, portfolio_files, tmp_path: Path) -> None:
    pytest.importorskip("pricelevel.backtest.report")
    candles, signals = portfolio_files
    report = tmp_path / "report" / "backtest.html"
    code, stdout, err = cli("backtest", "--candles", str(candles), "--signals", str(signals), "--report", str(report))
    assert code == 0, err
    pages = sorted(p.name for p in report.parent.iterdir())
    assert pages == sorted(["backtest.html", "plotly.min.js", *(f"backtest-{s}.html" for s in SYMBOLS)])
    for page in report.parent.glob("*.html"):
        assert "cdn.plot.ly" not in page.read_text()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, s: (c.drop(columns="high"), s), "missing column(s) high"),
        (lambda c, s: (c, s.drop(columns=["entry", "exit"])), "'entry' and 'exit'"),
        (lambda c, s: (c, s.assign(timestamp=s["timestamp"] + pd.Timedelta(minutes=1))), "match no candle"),
        (lambda c, s: (pd.concat([c, c.iloc[:1]]), s), "share a (symbol, timestamp)"),
    ],
    ids=["candles-column", "signals-columns", "off-grid-signal", "duplicate-candle"],
)
def test_bad_inputs_fail_with_one_line(cli, project: Path, tmp_path: Path, mutate, message) -> None:
    candles = real_candles("BTCUSDT", "1h", rows=500)
    candles, signals = mutate(candles, random_signals(candles, seed=1))
    candles.to_parquet(tmp_path / "BTCUSDT_1h.parquet")
    signals.to_parquet(tmp_path / "s.parquet")
    code, _, err = cli("backtest", "--candles", str(tmp_path / "BTCUSDT_1h.parquet"), "--signals",
                       str(tmp_path / "s.parquet"))
    assert code == 1
    assert message in err and "Traceback" not in err


def test_bad_backtest_settings_are_usage_errors(cli, project: Path, portfolio_files) -> None:
    candles, signals = portfolio_files
    code, _, err = cli("backtest", "--candles", str(candles), "--signals", str(signals),
                       "--set", "backtest.sizing=risk", "--set", "backtest.sl_stop=null")
    assert code == 2
    assert "sizing=risk needs sl_stop" in err
