"""Performance metrics of a backtest, for the portfolio and for each symbol's share of it.

Definitions (``r`` are per-bar simple returns of an equity curve that starts at ``init_cash``; ``N`` bars;
``B`` bars per year of the timeframe, counted over 365 days since crypto trades around the clock):

- ``total_return = final / init_cash - 1``; ``cagr = (final / init_cash) ** (B / N) - 1``;
- ``sharpe = mean(r) / std(r, ddof=1) * sqrt(B)`` (risk-free rate 0);
- ``sortino = mean(r) / sqrt(sum(min(r, 0)^2) / (N - 1)) * sqrt(B)`` (downside deviation, ddof=1);
- ``max_drawdown`` = lowest ``equity / running peak - 1`` (init_cash counts as the first peak);
  ``max_drawdown_duration`` = longest time from a peak until equity is back at it (or the end);
- ``calmar = cagr / |max_drawdown|``;
- over closed trades: ``win_rate`` (pnl > 0), ``profit_factor = gross profit / gross loss``,
  ``expectancy`` = mean pnl per trade, ``avg_holding_time``; ``n_trades`` counts closed trades,
  ``open_trades`` those still open at the end; ``fees_paid`` counts every fill, open trades' entries too;
- ``exposure`` = share of bars that close with a position open (any symbol, for the portfolio);
- ``buy_and_hold_return``: first to last close of the symbol; for the portfolio, the mean over symbols
  (equal weights bought at the start, never rebalanced).

Per symbol, the equity curve is ``init_cash`` plus that symbol's realised and unrealised P&L, so the
symbols' curves add up to the portfolio's. A ratio without a defined value (no variance, no losing trade)
is NaN, written as ``null`` in JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricelevel.backtest.run import BacktestResult

#: Metrics that are fractions (shown as percentages in reports).
PERCENT_METRICS = frozenset(
    {"total_return", "cagr", "max_drawdown", "win_rate", "exposure", "buy_and_hold_return"}
)
#: Display order and labels of the metrics; metrics not listed follow in their own order.
METRIC_LABELS = {
    "final_value": "Final value",
    "total_return": "Total return",
    "cagr": "CAGR",
    "buy_and_hold_return": "Buy & hold",
    "sharpe": "Sharpe",
    "sortino": "Sortino",
    "calmar": "Calmar",
    "max_drawdown": "Max drawdown",
    "max_drawdown_duration": "Max DD duration",
    "n_trades": "Trades",
    "open_trades": "Open",
    "win_rate": "Win rate",
    "profit_factor": "Profit factor",
    "expectancy": "Expectancy",
    "avg_holding_time": "Avg holding",
    "exposure": "Exposure",
    "fees_paid": "Fees paid",
}
RATIO_METRICS = frozenset({"sharpe", "sortino", "calmar", "profit_factor"})
MONEY_METRICS = frozenset({"final_value", "expectancy", "fees_paid"})


@dataclass(frozen=True)
class BacktestMetrics:
    portfolio: dict[str, object]
    symbols: dict[str, dict[str, object]]
    #: Each symbol's equity curve (:func:`symbol_equity`), kept for the reports that draw it.
    equity_by_symbol: pd.DataFrame

    def table(self) -> pd.DataFrame:
        """Rows ``portfolio`` then each symbol; one column per metric."""
        rows = {"portfolio": self.portfolio, **self.symbols}
        return pd.DataFrame.from_dict(rows, orient="index")

    def to_json_dict(self) -> dict[str, object]:
        """Plain JSON types: NaN/inf as ``None``, durations as ISO-ish text and hours."""
        return {"portfolio": _jsonable(self.portfolio), "symbols": {s: _jsonable(m) for s, m in self.symbols.items()}}


def _jsonable(metrics: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in metrics.items():
        if isinstance(value, pd.Timedelta):
            out[key] = None if pd.isna(value) else str(value)
            out[f"{key}_hours"] = None if pd.isna(value) else value / pd.Timedelta(hours=1)
        elif isinstance(value, float | np.floating):
            out[key] = float(value) if math.isfinite(value) else None
        elif isinstance(value, np.integer):
            out[key] = int(value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------- curves


def _while_held(result: BacktestResult, per_trade: np.ndarray) -> np.ndarray:
    """``(bars, symbols)`` sums of ``per_trade`` over the bars each trade's position is held at the close."""
    market, trades = result.market, result.trades
    n_bars = market.n_bars
    col = pd.Index(market.symbols).get_indexer(trades["symbol"])
    stop = np.where(trades["exit_reason"] == "open", n_bars, trades["exit_bar"].to_numpy())
    delta = np.zeros((n_bars + 1, len(market.symbols)))
    np.add.at(delta, (trades["entry_bar"].to_numpy(), col), per_trade)
    np.add.at(delta, (stop, col), -per_trade)
    total = np.cumsum(delta[:-1], axis=0)
    # rounding in the running sum must not leave a phantom position after the last trade
    total[np.abs(total) <= 1e-12 * np.maximum(1.0, np.abs(total))] = 0.0
    return total


def held_size(result: BacktestResult) -> np.ndarray:
    """Units held at each bar's close, ``(bars, symbols)``, rebuilt from the trades."""
    return _while_held(result, result.trades["size"].to_numpy())


def symbol_equity(result: BacktestResult, held: np.ndarray | None = None) -> pd.DataFrame:
    """Per-symbol equity: ``init_cash`` + that symbol's realised and unrealised P&L at each bar's close.

    ``held`` is :func:`held_size` when the caller has it already.
    """
    market, trades = result.market, result.trades
    held = held_size(result) if held is None else held
    held_cost = _while_held(result, (trades["size"] * trades["entry_price"] + trades["entry_fees"]).to_numpy())
    last_close = pd.DataFrame(market.close).ffill().to_numpy()
    unrealised = np.where(held != 0, held * np.nan_to_num(last_close) - held_cost, 0.0)
    closed = (trades["exit_reason"] != "open").to_numpy()
    realised = np.zeros(market.close.shape)
    col = pd.Index(market.symbols).get_indexer(trades["symbol"])
    np.add.at(realised, (trades["exit_bar"].to_numpy()[closed], col[closed]), trades["pnl"].to_numpy()[closed])
    value = result.config.init_cash + np.cumsum(realised, axis=0) + unrealised
    return pd.DataFrame(value, index=market.timestamps, columns=list(market.symbols))


def drawdown_series(equity: pd.Series, start_value: float | None = None) -> pd.Series:
    """``equity / running peak - 1`` (<= 0). ``start_value`` (the initial cash) counts as the first peak."""
    values = equity.to_numpy(dtype=np.float64)
    peak = np.maximum.accumulate(values if start_value is None else np.maximum(values, start_value))
    return pd.Series(values / peak - 1.0, index=equity.index, name="drawdown")


# -------------------------------------------------------------------------------------------- metrics


def curve_metrics(equity: np.ndarray, init_cash: float, bars_per_year: float, bar: pd.Timedelta) -> dict[str, object]:
    """Return/risk metrics of one equity curve (module docstring has the definitions)."""
    values = np.concatenate([[init_cash], np.asarray(equity, dtype=np.float64)])
    n = len(values) - 1
    final = values[-1]
    returns = np.diff(values) / values[:-1]
    total_return = final / init_cash - 1.0
    cagr = (final / init_cash) ** (bars_per_year / n) - 1.0 if n > 0 and final > 0 else (-1.0 if n > 0 else math.nan)
    sharpe = sortino = math.nan
    if n >= 2:
        mean = returns.mean()
        std = returns.std(ddof=1)
        if std > 0:
            sharpe = mean / std * math.sqrt(bars_per_year)
        downside = math.sqrt(np.sum(np.minimum(returns, 0.0) ** 2) / (n - 1))
        if downside > 0:
            sortino = mean / downside * math.sqrt(bars_per_year)
    peak = np.maximum.accumulate(values)
    dd = values / peak - 1.0
    max_dd = float(dd.min())
    calmar = cagr / abs(max_dd) if max_dd < 0 else math.nan
    return {
        "final_value": float(final),
        "total_return": float(total_return),
        "cagr": float(cagr),
        "sharpe": float(sharpe),
        "sortino": float(sortino),
        "calmar": float(calmar),
        "max_drawdown": max_dd,
        "max_drawdown_duration": bar * _longest_underwater(values, peak),
    }


def _longest_underwater(values: np.ndarray, peak: np.ndarray) -> int:
    """Bars of the longest stretch below a previous peak (ending at recovery or at the last bar)."""
    under = values < peak
    if not under.any():
        return 0
    # lengths of runs of True
    padded = np.concatenate([[False], under, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return int((edges[1::2] - edges[::2]).max())


def trade_metrics(trades: pd.DataFrame) -> dict[str, object]:
    closed = trades[trades["exit_reason"] != "open"]
    pnl = closed["pnl"].to_numpy()
    gross_profit = pnl[pnl > 0].sum()
    gross_loss = -pnl[pnl < 0].sum()
    holding = (closed["exit_time"] - closed["entry_time"]).mean() if len(closed) else pd.NaT
    return {
        "n_trades": len(closed),
        "open_trades": int(len(trades) - len(closed)),
        "win_rate": float((pnl > 0).mean()) if len(pnl) else math.nan,
        "profit_factor": float(gross_profit / gross_loss) if gross_loss > 0 else math.nan,
        "expectancy": float(pnl.mean()) if len(pnl) else math.nan,
        "avg_holding_time": holding,
        "fees_paid": float(trades["entry_fees"].sum() + trades["exit_fees"].sum()),
    }


def buy_and_hold_return(close: np.ndarray) -> float:
    finite = close[np.isfinite(close)]
    return float(finite[-1] / finite[0] - 1.0) if len(finite) >= 2 else math.nan


def compute_metrics(result: BacktestResult) -> BacktestMetrics:
    """Portfolio metrics from the engine's equity; per-symbol ones from each symbol's P&L share."""
    market = result.market
    bars_per_year = (result.config.timeframe or market.timeframe).bars_per_year
    bar = market.timeframe.delta
    init = result.config.init_cash
    held = held_size(result)
    per_symbol_equity = symbol_equity(result, held)
    bh = [buy_and_hold_return(market.close[:, k]) for k in range(len(market.symbols))]

    portfolio = curve_metrics(result.equity.to_numpy(), init, bars_per_year, bar)
    portfolio.update(trade_metrics(result.trades))
    portfolio["exposure"] = float((held > 0).any(axis=1).mean()) if market.n_bars else math.nan
    portfolio["buy_and_hold_return"] = float(np.nanmean(bh)) if not np.isnan(bh).all() else math.nan

    symbols: dict[str, dict[str, object]] = {}
    for k, symbol in enumerate(market.symbols):
        metrics = curve_metrics(per_symbol_equity[symbol].to_numpy(), init, bars_per_year, bar)
        metrics.update(trade_metrics(result.trades[result.trades["symbol"] == symbol]))
        metrics["exposure"] = float((held[:, k] > 0).mean()) if market.n_bars else math.nan
        metrics["buy_and_hold_return"] = bh[k]
        symbols[symbol] = metrics
    return BacktestMetrics(portfolio=portfolio, symbols=symbols, equity_by_symbol=per_symbol_equity)


# -------------------------------------------------------------------------------------------- formatting


def format_metric(name: str, value: object) -> str:
    """One metric as text: percentages for fractions, 2 decimals for ratios and money, durations as d/h/m."""
    if value is None or value is pd.NaT:
        return "–"
    if isinstance(value, pd.Timedelta):
        return format_duration(value)
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if name in PERCENT_METRICS:
            return f"{value:.2%}"
        if name in RATIO_METRICS or name in MONEY_METRICS:
            return f"{value:,.2f}"
        if name in ("n_trades", "open_trades") and value.is_integer():
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def format_duration(value: pd.Timedelta) -> str:
    """``12d 4h``, ``3h 15m``: durations people can compare at a glance (NaT as a dash)."""
    if pd.isna(value):
        return "–"
    minutes = int(round(value.total_seconds() / 60))
    sign, minutes = ("-", -minutes) if minutes < 0 else ("", minutes)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (mins, "m")) if n]
    return sign + (" ".join(parts[:2]) if parts else "0m")
