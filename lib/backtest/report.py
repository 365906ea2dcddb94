"""HTML report of a backtest: a summary page and one page per symbol, readable offline.

Files (all in the folder of the summary page ``<stem>.html``):

- ``<stem>.html``: portfolio equity and drawdown, the metrics table of the portfolio and every symbol (with
  links to their pages), the orders the engine refused, and the rules the run used;
- ``<stem>-<SYMBOL>.html``: candles with the price levels and every trade's entry and exit, the symbol's
  equity curve and its drawdown, and its metrics;
- ``plotly.min.js``: written once and referenced by every page, so pages stay small and need no network.

Charts with more than ``config.report_max_bars`` bars are merged into coarser candles for display only
(:func:`coarsen_candles`); equity keeps the last value of each group and drawdown the lowest, so the worst
drawdown stays visible. Trade markers are always drawn at their exact time and price. Pages are
deterministic (fixed element ids), so re-writing an unchanged report leaves the files untouched.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pricelevel.backtest.metrics import (
    METRIC_LABELS,
    BacktestMetrics,
    drawdown_series,
    format_metric,
)
from pricelevel.backtest.run import BacktestResult
from pricelevel.core.candles import PRICE_COLUMNS
from pricelevel.core.files import atomic_write

PLOTLY_JS = "plotly.min.js"

#: Trade marker colours by exit reason (entries share their trade's colour).
REASON_COLORS = {"signal": "#1f77b4", "stop_loss": "#d62728", "take_profit": "#2ca02c", "time_stop": "#ff7f0e",
                 "open": "#7f7f7f"}
LEVEL_COLOR = "#9467bd"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
p.meta { color: #555; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; margin: .4rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.neg { color: #c0392b; } tr.portfolio td { font-weight: 600; }
"""


# ------------------------------------------------------------------------------------------ downsampling


def group_starts(n: int, max_bars: int) -> np.ndarray:
    """First positions of groups of ``k = ceil(n / max_bars)`` consecutive bars (the last may be shorter)."""
    if max_bars < 1:
        raise ValueError(f"max_bars must be >= 1, got {max_bars}")
    k = max(1, math.ceil(n / max_bars))
    return np.arange(0, n, k)


def coarsen_candles(frame: pd.DataFrame, max_bars: int) -> pd.DataFrame:
    """At most ``max_bars`` candles for display: first open, max high, min low, last close per group.

    ``frame`` is indexed by time with columns open/high/low/close; rows with a NaN price (bars where the
    symbol has no candle) are dropped first. Each merged candle sits at its group's first timestamp, so the
    overall first open, last close, highest high and lowest low are kept exactly.
    """
    frame = frame.loc[:, list(PRICE_COLUMNS)].dropna()
    starts = group_starts(len(frame), max_bars)
    if len(frame) == len(starts):
        return frame.copy()
    ends = np.append(starts[1:], len(frame)) - 1
    values = {c: frame[c].to_numpy(dtype=np.float64) for c in PRICE_COLUMNS}
    return pd.DataFrame(
        {
            "open": values["open"][starts],
            "high": np.maximum.reduceat(values["high"], starts),
            "low": np.minimum.reduceat(values["low"], starts),
            "close": values["close"][ends],
        },
        index=frame.index[starts],
    )


def coarsen_line(series: pd.Series, max_bars: int, how: str = "last") -> pd.Series:
    """At most ``max_bars`` points, grouped as :func:`coarsen_candles` does; ``how``: last, min or max per group.

    Use ``min`` for drawdowns (the deepest point stays visible) and ``last`` for equity.
    """
    starts = group_starts(len(series), max_bars)
    if len(series) == len(starts):
        return series.copy()
    values = series.to_numpy(dtype=np.float64)
    if how == "last":
        merged = values[np.append(starts[1:], len(values)) - 1]
    elif how == "min":
        merged = np.fmin.reduceat(values, starts)
    elif how == "max":
        merged = np.fmax.reduceat(values, starts)
    else:
        raise ValueError(f"how must be 'last', 'min' or 'max', got {how!r}")
    return pd.Series(merged, index=series.index[starts], name=series.name)


def _is_negative(value: object) -> bool:
    return isinstance(value, float | np.floating | int | np.integer) and not isinstance(value, bool) and value < 0


def _metric_columns(names: Sequence[str]) -> list[str]:
    return [n for n in METRIC_LABELS if n in names] + [n for n in names if n not in METRIC_LABELS]


def _label(name: str) -> str:
    return METRIC_LABELS.get(name, name.replace("_", " ").capitalize())


def _naive_utc(times: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    """UTC times without the offset: shorter in the page's JSON, and the axes say UTC."""
    index = pd.DatetimeIndex(times)
    if index.tz is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    return index.to_numpy()


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------- figures


def _symbol_figure(
    result: BacktestResult,
    symbol: str,
    equity: pd.Series,
    levels: Sequence[float],
    title: str,
) -> tuple[go.Figure, int, int]:
    """Candles + levels + trades, equity and drawdown of one symbol; also (bars, bars drawn)."""
    market = result.market
    k = market.symbols.index(symbol)
    max_bars = result.config.report_max_bars
    candles = pd.DataFrame(
        {c: getattr(market, c)[:, k] for c in PRICE_COLUMNS}, index=market.timestamps
    ).dropna()
    merged = coarsen_candles(candles, max_bars)
    equity = equity.loc[candles.index]
    drawdown = drawdown_series(equity, start_value=result.config.init_cash)

    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.03, row_heights=[0.6, 0.22, 0.18],
        subplot_titles=("price", "equity (this symbol's P&L on the initial cash)", "drawdown"),
    )
    fig.add_trace(
        go.Candlestick(
            x=_naive_utc(merged.index), open=merged["open"].to_numpy(), high=merged["high"].to_numpy(),
            low=merged["low"].to_numpy(), close=merged["close"].to_numpy(), name=symbol, showlegend=False,
        ),
        row=1, col=1,
    )
    for level in levels:
        fig.add_hline(
            y=level, row=1, col=1, line={"color": LEVEL_COLOR, "width": 1, "dash": "dot"},
            label={"text": f"{level:g}", "textposition": "end", "font": {"size": 10, "color": LEVEL_COLOR}},
        )
    _add_trade_markers(fig, result.trades[result.trades["symbol"] == symbol])

    eq = coarsen_line(equity, max_bars, "last")
    fig.add_trace(
        go.Scatter(
            x=_naive_utc(eq.index), y=eq.to_numpy(), mode="lines", name="equity", line={"color": "#1f77b4", "width": 1.5},
            hovertemplate="%{x}<br>equity %{y:,.2f}<extra></extra>",
        ),
        row=2, col=1,
    )
    dd = coarsen_line(drawdown, max_bars, "min")
    fig.add_trace(
        go.Scatter(
            x=_naive_utc(dd.index), y=dd.to_numpy(), mode="lines", fill="tozeroy", name="drawdown",
            line={"color": "#d62728", "width": 1}, hovertemplate="%{x}<br>drawdown %{y:.2%}<extra></extra>",
        ),
        row=3, col=1,
    )
    fig.update_yaxes(title_text="price", row=1, col=1)
    fig.update_yaxes(title_text="value", tickformat=",.0f", row=2, col=1)
    fig.update_yaxes(title_text="drawdown", tickformat=".0%", row=3, col=1)
    fig.update_xaxes(rangeslider_visible=False)
    fig.update_xaxes(title_text="time (UTC)", row=3, col=1)
    fig.update_layout(
        title={"text": title, "x": 0.01}, height=950, hovermode="closest", template="plotly_white",
        legend={"orientation": "h", "y": 1.04, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        margin={"l": 60, "r": 30, "t": 90, "b": 40},
    )
    return fig, len(candles), len(merged)


def _add_trade_markers(fig: go.Figure, trades: pd.DataFrame) -> None:
    """Entry (triangle-up) and exit markers at exact time/price, one legend entry per exit reason."""
    for reason in [r for r in REASON_COLORS if r in set(trades["exit_reason"])] + sorted(
        set(trades["exit_reason"]) - set(REASON_COLORS)
    ):
        group = trades[trades["exit_reason"] == reason]
        color = REASON_COLORS.get(reason, "#8c564b")
        custom = np.column_stack(
            [group["size"].to_numpy(dtype=np.float64), group["pnl"].to_numpy(dtype=np.float64),
             group["return"].to_numpy(dtype=np.float64)]
        )
        tail = "size %{customdata[0]:.6g}<br>pnl %{customdata[1]:,.2f}<br>return %{customdata[2]:.2%}"
        fig.add_trace(
            go.Scatter(
                x=_naive_utc(group["entry_time"]), y=group["entry_price"].to_numpy(dtype=np.float64),
                mode="markers", name=reason, legendgroup=reason, customdata=custom,
                marker={"symbol": "triangle-up", "size": 9, "color": color, "line": {"width": 0.5, "color": "#333"}},
                hovertemplate="entry %{x}<br>price %{y:.6g}<br>" + tail + f"<extra>{reason}</extra>",
            ),
            row=1, col=1,
        )
        still_open = reason == "open"
        fig.add_trace(
            go.Scatter(
                x=_naive_utc(group["exit_time"]), y=group["exit_price"].to_numpy(dtype=np.float64),
                mode="markers", name=reason, legendgroup=reason, showlegend=False, customdata=custom,
                marker={"symbol": "x" if still_open else "triangle-down", "size": 9, "color": color,
                        "line": {"width": 0.5, "color": "#333"}},
                hovertemplate=("marked %{x}" if still_open else "exit %{x}") + "<br>price %{y:.6g}<br>" + tail
                + f"<extra>{reason}</extra>",
            ),
            row=1, col=1,
        )


def _summary_figure(result: BacktestResult, per_symbol: pd.DataFrame) -> go.Figure:
    """Portfolio equity, its drawdown, and each symbol's P&L over time."""
    max_bars = result.config.report_max_bars
    init = result.config.init_cash
    equity = result.equity
    drawdown = drawdown_series(equity, start_value=init)
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04, row_heights=[0.45, 0.25, 0.3],
        subplot_titles=("portfolio equity", "portfolio drawdown", "P&L by symbol"),
    )
    eq = coarsen_line(equity, max_bars, "last")
    fig.add_trace(
        go.Scatter(x=_naive_utc(eq.index), y=eq.to_numpy(), mode="lines", name="equity",
                   line={"color": "#1f77b4", "width": 1.5}, hovertemplate="%{x}<br>equity %{y:,.2f}<extra></extra>"),
        row=1, col=1,
    )
    dd = coarsen_line(drawdown, max_bars, "min")
    fig.add_trace(
        go.Scatter(x=_naive_utc(dd.index), y=dd.to_numpy(), mode="lines", fill="tozeroy", name="drawdown",
                   line={"color": "#d62728", "width": 1}, hovertemplate="%{x}<br>drawdown %{y:.2%}<extra></extra>"),
        row=2, col=1,
    )
    for symbol in per_symbol.columns:
        pnl = coarsen_line(per_symbol[symbol] - init, max_bars, "last")
        fig.add_trace(
            go.Scatter(x=_naive_utc(pnl.index), y=pnl.to_numpy(), mode="lines", name=str(symbol), line={"width": 1},
                       hovertemplate="%{x}<br>" + _esc(symbol) + " P&L %{y:,.2f}<extra></extra>"),
            row=3, col=1,
        )
    fig.update_yaxes(title_text="value", tickformat=",.0f", row=1, col=1)
    fig.update_yaxes(title_text="drawdown", tickformat=".0%", row=2, col=1)
    fig.update_yaxes(title_text="P&L", tickformat=",.0f", row=3, col=1)
    fig.update_xaxes(title_text="time (UTC)", row=3, col=1)
    fig.update_layout(height=850, template="plotly_white", hovermode="x unified",
                      margin={"l": 60, "r": 30, "t": 50, "b": 40})
    return fig


# ----------------------------------------------------------------------------------------------- tables


def _metrics_table(table: pd.DataFrame, links: Mapping[str, str]) -> str:
    """Rows of ``metrics.table()`` as HTML; row names with a page become links to it."""
    columns = _metric_columns(list(table.columns))
    head = "".join(f"<th>{_esc(_label(c))}</th>" for c in columns)
    rows = []
    for name, row in table.iterrows():
        name = str(name)
        cell = f'<a href="{_esc(quote(links[name]))}">{_esc(name)}</a>' if name in links else _esc(name)
        tds = "".join(
            f'<td class="num{" neg" if _is_negative(row[c]) and c != "max_drawdown" else ""}">'
            f"{_esc(format_metric(c, row[c]))}</td>"
            for c in columns
        )
        rows.append(f'<tr class="{"portfolio" if name == "portfolio" else "symbol"}"><td>{cell}</td>{tds}</tr>')
    return (f'<div class="scroll"><table><thead><tr><th></th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _key_value_table(pairs: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f"<table><tbody>{body}</tbody></table>"


def _pct(value: float | None) -> str:
    if value is None:
        return "off"
    text = f"{value * 100:.4f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _config_pairs(result: BacktestResult) -> list[tuple[str, str]]:
    cfg = result.config
    sizing = cfg.sizing
    if cfg.sizing == "fraction":
        sizing += f" ({_pct(cfg.fraction)} of equity)"
    elif cfg.sizing == "risk":
        sizing += f" ({_pct(cfg.risk)} of equity at the stop, at most {_pct(cfg.fraction)})"
    return [
        ("initial cash", f"{cfg.init_cash:,.2f}"),
        ("fees", _pct(cfg.fees)),
        ("slippage", _pct(cfg.slippage)),
        ("stop-loss", _pct(cfg.sl_stop)),
        ("take-profit", _pct(cfg.tp_stop)),
        ("time stop", "off" if cfg.max_hold_bars is None else f"{cfg.max_hold_bars:,} bars"),
        ("fill", cfg.fill),
        ("sizing", sizing),
        ("max positions", str(cfg.max_positions)),
        ("min order value", f"{cfg.min_order_value:,.2f}"),
    ]


def _trades_by_reason(result: BacktestResult) -> str:
    trades = result.trades
    reasons = [r for r in REASON_COLORS if r in set(trades["exit_reason"])] + sorted(
        set(trades["exit_reason"]) - set(REASON_COLORS)
    )
    if not reasons:
        return "<p>No trades.</p>"
    counts = pd.crosstab(trades["symbol"], trades["exit_reason"]).reindex(
        index=list(result.market.symbols), columns=reasons, fill_value=0
    )
    head = "".join(f"<th>{_esc(r)}</th>" for r in reasons)
    rows = "".join(
        f"<tr><td>{_esc(s)}</td>" + "".join(f'<td class="num">{int(n):,}</td>' for n in row) + "</tr>"
        for s, row in counts.iterrows()
    )
    return f"<table><thead><tr><th>symbol</th>{head}</tr></thead><tbody>{rows}</tbody></table>"


# ------------------------------------------------------------------------------------------------ pages


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_esc(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _figure_html(fig: go.Figure, div_id: str) -> str:
    """The figure's div plus a ``<script src="plotly.min.js">`` (the local bundle, never a CDN)."""
    return fig.to_html(
        full_html=False, include_plotlyjs="directory", include_mathjax=False, div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _period_text(result: BacktestResult, n_bars: int | None = None, drawn: int | None = None) -> str:
    market = result.market
    if market.n_bars == 0:
        return "no bars"
    text = (f"{market.timestamps[0]:%Y-%m-%d %H:%M} to {market.timestamps[-1]:%Y-%m-%d %H:%M} UTC, "
            f"{market.timeframe} candles")
    if n_bars is not None:
        text += f", {n_bars:,} bars"
        if drawn is not None and drawn < n_bars:
            text += f" (drawn as {drawn:,} merged candles; trades at their exact time and price)"
    return text


def _safe_name(symbol: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", symbol)


def _symbol_levels(levels: Mapping[str, Sequence[float]] | None, symbol: str) -> list[float]:
    if not levels or symbol not in levels:
        return []
    values = np.asarray(levels[symbol], dtype=np.float64).ravel()
    return sorted({float(v) for v in values[np.isfinite(values)]})


def write_report(
    result: BacktestResult,
    metrics: BacktestMetrics,
    path: Path,
    levels: Mapping[str, Sequence[float]] | None = None,
) -> list[Path]:
    """Write the summary page ``path``, one page per symbol next to it, and ``plotly.min.js`` once.

    ``levels`` maps a symbol to prices drawn as horizontal lines on its candles (symbols not in the
    backtest are ignored). Every file is written atomically; returns the files, summary page first.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    market = result.market
    names = {s: f"{path.stem}-{_safe_name(s)}.html" for s in market.symbols}
    if len(set(names.values())) != len(names):
        raise ValueError(f"symbols {', '.join(market.symbols)} map to clashing page names")

    # The bundle first: a page must never reference a file that is not there yet.
    bundle = folder / PLOTLY_JS
    plotly_js = get_plotlyjs()
    atomic_write(bundle, lambda tmp: tmp.write_text(plotly_js, encoding="utf-8"))

    per_symbol = metrics.equity_by_symbol
    table = metrics.table()
    written = []
    for symbol in market.symbols:
        written.append(folder / names[symbol])
        m = metrics.symbols.get(symbol, {})
        title = (
            f"{symbol}: return {format_metric('total_return', m.get('total_return'))}, "
            f"max drawdown {format_metric('max_drawdown', m.get('max_drawdown'))}, "
            f"Sharpe {format_metric('sharpe', m.get('sharpe'))}, "
            f"{format_metric('n_trades', m.get('n_trades'))} trades"
        )
        symbol_levels = _symbol_levels(levels, symbol)
        fig, n_bars, drawn = _symbol_figure(result, symbol, per_symbol[symbol], symbol_levels, title)
        rows = table.loc[[symbol]] if symbol in table.index else table.iloc[0:0]
        level_text = (f"<p class=\"meta\">Levels: {_esc(', '.join(f'{v:g}' for v in symbol_levels))}</p>"
                      if symbol_levels else "")
        body = (
            f'<p><a href="{_esc(quote(path.name))}">&larr; summary</a></p>\n'
            f"<h1>{_esc(symbol)}</h1>\n<p class=\"meta\">{_esc(_period_text(result, n_bars, drawn))}</p>\n"
            f"{_metrics_table(rows, {})}\n{level_text}\n"
            f"{_figure_html(fig, f'chart-{_safe_name(symbol)}')}"
        )
        page = _page(f"Backtest {symbol}", body)
        atomic_write(folder / names[symbol], lambda tmp, page=page: tmp.write_text(page, encoding="utf-8"))

    total_rejected = sum(result.rejected.values())
    rejected = _key_value_table(
        [(label.replace("_", " "), f"{n:,}") for label, n in result.rejected.items()] + [("total", f"{total_rejected:,}")]
    )
    body = (
        f"<h1>Backtest: {_esc(', '.join(market.symbols))}</h1>\n"
        f"<p class=\"meta\">{_esc(_period_text(result, market.n_bars))}</p>\n"
        f"<h2>Metrics</h2>\n{_metrics_table(table, names)}\n"
        f"{_figure_html(_summary_figure(result, per_symbol), 'chart-portfolio')}\n"
        f"<h2>Trades by exit reason</h2>\n{_trades_by_reason(result)}\n"
        f"<h2>Refused entries</h2>\n{rejected}\n"
        f"<h2>Rules</h2>\n{_key_value_table(_config_pairs(result))}\n"
    )
    summary = _page("Backtest report", body)
    atomic_write(path, lambda tmp: tmp.write_text(summary, encoding="utf-8"))
    return [path, *written, bundle]
