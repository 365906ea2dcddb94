"""The rolling backtest as files: ``rolling.json`` (settings, every step's decision and champion, each
segment, the scores and the equity curves) and ``rolling.html`` (a Plotly page in the backtest report's style,
with ``plotly.min.js`` beside it so it opens offline). Both champion policies (kept until beaten; retired after
``promotion.retire_after`` failures) are shown side by side: their curves, their decisions, their segments."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pricelevel.backtest.metrics import drawdown_series
from pricelevel.backtest.report import PLOTLY_JS
from pricelevel.core.files import atomic_write, write_json
from pricelevel.research.rolling import Policy, RollingResult, StepOutcome

COLORS = {"rolling": "#1f77b4", "rolling_retire": "#17becf", "buy_and_hold": "#7f7f7f", "level_rule": "#9467bd", "volatility": "#ff7f0e",
          "cash": "#2ca02c"}
DECISION_COLORS = {"promoted": "#2ca02c", "rejected": "#d62728"}
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: .85rem; margin: .4rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def finite(value: Any) -> Any:
    """JSON has no NaN: undefined numbers are ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def rolling_payload(result: RollingResult, metric: str, trading_metric: str) -> dict[str, Any]:
    """``segments``, ``trades`` and each step's top-level decision are the ``kept`` policy's; ``policies`` holds
    both, each with its segments, score and trades (each step's ``policies`` its decisions)."""
    curves = result.curves
    return finite({
        "settings": result.settings,
        "steps": [s.to_dict(metric, trading_metric) for s in result.steps],
        "segments": [s.to_dict() for s in result.segments],
        "policies": {p.name: {"curve": p.curve, "retire_after": p.retire_after, "description": p.describe(),
                              "score": result.scores[p.curve].to_dict(), "trades": len(result.loops[p.name].trades),
                              "segments": [s.to_dict() for s in result.policy_segments[p.name]]}
                     for p in result.policies},
        "scores": {name: score.to_dict() for name, score in result.scores.items()},
        "curves": {"timestamp": [str(t) for t in curves.index],
                   **{name: curves[name].astype(float).tolist() for name in curves.columns}},
        "trades": len(result.loop.trades),
    })


def policy_label(policy: Policy) -> str:
    """``kept until beaten`` / ``retired after 2 failures``: a policy's name in tables and legends."""
    return "kept until beaten" if policy.retire_after == 0 else f"retired after {policy.retire_after} failures"


def curve_label(result: RollingResult, name: str) -> str:
    policy = next((p for p in result.policies if p.curve == name), None)
    return f"loop: {policy_label(policy)}" if policy else name.replace("_", " ")


def step_cell(step: StepOutcome, policy: str) -> tuple[str, str, str]:
    """``(decision, champion after, champion's verdict)`` of one step under one policy."""
    outcome = step.policies[policy]
    decision = "promoted" if outcome.decision.promote else "rejected"
    if outcome.retired:
        decision += f"; {outcome.retired} retired"
    verdict = outcome.verdict
    judged = "-" if verdict is None else "passed" if verdict.passed else f"failed ({verdict.failures} in a row)"
    return decision, outcome.champion_after or "none", judged


def write_rolling(result: RollingResult, folder: Path, metric: str, trading_metric: str) -> tuple[Path, Path]:
    """``(rolling.json, rolling.html)`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = rolling_payload(result, metric, trading_metric)
    json_path = write_json(folder / "rolling.json", payload)
    plotly_js = get_plotlyjs()
    atomic_write(folder / PLOTLY_JS, lambda tmp: tmp.write_text(plotly_js, encoding="utf-8"))
    page = rolling_page(result, payload)
    html_path = folder / "rolling.html"
    atomic_write(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return json_path, html_path


def rolling_figure(result: RollingResult) -> go.Figure:
    curves = result.curves
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.05, row_heights=[0.72, 0.28],
                        subplot_titles=("equity (after fees and slippage)", "drawdown of the loop (each policy)"))
    x = curves.index.tz_convert("UTC").tz_localize(None) if curves.index.tz is not None else curves.index
    loops = {p.curve for p in result.policies}
    for name in curves.columns:
        fig.add_trace(go.Scatter(x=x, y=curves[name], mode="lines", name=curve_label(result, name),
                                 line={"color": COLORS.get(name), "width": 2 if name in loops else 1.2},
                                 hovertemplate="%{x}<br>%{y:,.2f}<extra>" + name + "</extra>"), row=1, col=1)
    for policy in result.policies:
        curve = curves[policy.curve]
        drawdown = drawdown_series(curve, start_value=float(curve.iloc[0]))
        fig.add_trace(go.Scatter(x=x, y=drawdown, mode="lines", name=f"drawdown, {policy_label(policy)}",
                                 showlegend=False, line={"color": COLORS.get(policy.curve), "width": 1}), row=2, col=1)
    for step in result.steps:
        decision = "promoted" if step.decision.promote else "rejected"
        at = step.at.tz_convert("UTC").tz_localize(None) if step.at.tz is not None else step.at
        fig.add_vline(x=at, line={"color": DECISION_COLORS[decision], "width": 1, "dash": "dot"})
        if any(p.retired for p in step.policies.values()):  # a champion retired: black dashes
            fig.add_vline(x=at, line={"color": "#000000", "width": 1, "dash": "dash"})
    fig.update_yaxes(title_text="value", tickformat=",.0f", row=1, col=1)
    fig.update_yaxes(title_text="drawdown", tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="time (UTC); dotted: a step (green promoted, red rejected); dashed black: a champion "
                                "retired", row=2, col=1)
    fig.update_layout(height=640, margin={"l": 60, "r": 20, "t": 40, "b": 40}, hovermode="x unified")
    return fig


def rolling_page(result: RollingResult, payload: dict[str, Any]) -> str:
    def esc(value: object) -> str:
        return html.escape(str(value), quote=True)

    def num(value: Any, pct: bool = False) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:+.2%}" if pct else f"{value:.2f}"

    scores = "".join(
        f"<tr><td>{esc(curve_label(result, name))}</td><td class=num>{num(s['total_return'], True)}</td>"
        f"<td class=num>{num(s['sharpe'])}</td><td class=num>{num(s['max_drawdown'], True)}</td></tr>"
        for name, s in payload["scores"].items())
    policies = result.policies
    heads = "".join(f"<th>{esc(policy_label(p))}: decision</th><th>champion</th><th>champion judged</th>"
                    f"<th>segment return</th><th>trades</th>" for p in policies)
    rows = []
    for i, step in enumerate(result.steps):
        cells = ""
        for p in policies:
            decision, champion, judged = step_cell(step, p.name)
            seg = payload["policies"][p.name]["segments"][i]
            cells += (f"<td>{esc(decision)}</td><td>{esc(champion)}</td><td>{esc(judged)}</td>"
                      f"<td class=num>{num(seg['return'], True)}</td><td class=num>{seg['trades']}</td>")
        said = [o.decision.reason for o in step.policies.values()]
        said += [o.verdict.reason for o in step.policies.values() if o.verdict is not None]
        reasons = "<br>".join(esc(r) for r in dict.fromkeys(said))
        rows.append(f"<tr><td>{step.index}</td><td>{esc(str(step.at)[:10])}</td>{cells}<td>{reasons}</td></tr>")
    steps = "".join(rows)
    settings = payload["settings"]
    figure = rolling_figure(result).to_html(full_html=False, include_plotlyjs="directory", include_mathjax=False,
                                            div_id="chart-rolling", config={"displaylogo": False, "responsive": True})
    body = (
        f"<h1>The whole loop, backtested</h1>\n<p class=\"meta\">{esc(settings['start'])} to {esc(settings['end'])}, "
        f"a step every {esc(settings['every'])} ({settings['steps']} steps), {esc(settings['timeframe'])} bars of "
        f"{esc(', '.join(settings['symbols']))}; at each step: retrain on the candles closed by then, the promotion "
        f"gate (hurdle: {esc(', '.join(settings['hurdle']))}), then the champion trades until the next step, under "
        f"two policies on the same retrains: {esc('; '.join(p.describe() for p in policies))}.</p>\n"
        f"<h2>Over the whole span</h2>\n<table><tr><th>strategy</th><th>total return</th><th>Sharpe</th>"
        f"<th>max drawdown</th></tr>{scores}</table>\n{figure}\n"
        f"<h2>Steps</h2>\n<table><tr><th>step</th><th>at</th>{heads}<th>reasons</th></tr>{steps}</table>\n"
    )
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Rolling backtest</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def rolling_markdown(result: RollingResult) -> str:
    """The span's scores and every step's decision, as Markdown (the flow's artifact, the command's output)."""
    def num(value: float, pct: bool = False) -> str:
        return "-" if not math.isfinite(value) else (f"{value:+.2%}" if pct else f"{value:.2f}")

    settings = result.settings
    lines = [f"# The whole loop, backtested: {settings['start'][:10]} .. {settings['end'][:10]}, every {settings['every']}",
             "", "| strategy | total return | Sharpe | max drawdown |", "|---|---|---|---|"]
    lines += [f"| {curve_label(result, name)} | {num(s.total_return, True)} | {num(s.sharpe)} | {num(s.max_drawdown, True)} |"
              for name, s in result.scores.items()]
    for policy in result.policies:
        lines += ["", f"**{policy.describe().capitalize()}** (`{policy.curve}`):", "",
                  "| step | at | decision | champion | champion judged | segment return | trades | reason |",
                  "|---|---|---|---|---|---|---|---|"]
        for step, segment in zip(result.steps, result.policy_segments[policy.name], strict=True):
            decision, champion, judged = step_cell(step, policy.name)
            outcome = step.policies[policy.name]
            reason = outcome.decision.reason + (f"; {outcome.verdict.reason}" if outcome.verdict else "")
            ret = segment.equity_end / segment.equity_start - 1.0
            lines.append(f"| {step.index} | {step.at:%Y-%m-%d} | {decision} | {champion} | {judged} | {num(ret, True)} | "
                         f"{segment.trades} | {reason} |")
    return "\n".join(lines) + "\n"
