"""What each bot command answers, as plain functions of the library calls the CLI makes too
(:mod:`pricelevel.trading.control` for the trader, :mod:`pricelevel.registry.versions` for the registry), so
every answer is testable without Telegram and nothing is implemented twice."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient

from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import mlflow_client
from pricelevel.registry.versions import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    NothingToRollBackError,
    list_versions,
    rollback_champion,
)
from pricelevel.trading import control
from pricelevel.trading.reports import money, pct, signed, when  # noqa: F401  (the answers' formats)
from pricelevel.trading.state import StateStore

#: ``/command``: what it does, for ``/help`` and Telegram's "/" menu (the order of the README's table).
COMMANDS = {
    "status": "mode, model version, equity, risk state",
    "positions": "open positions",
    "balance": "equity, cash, in positions, return since the first bar",
    "profit": "[days] closed trades and P&L (all time, or the last N days)",
    "daily": "[n] P&L per UTC day, the last n days (7)",
    "weekly": "[n] P&L per week from Monday, the last n weeks (8)",
    "monthly": "[n] P&L per month, the last n months (6)",
    "performance": "P&L per symbol",
    "stats": "trades per exit reason, win/loss, how long winners and losers were held",
    "trades": "[n] the last n closed trades (10)",
    "count": "positions open and allowed",
    "locks": "halts, stops and cool-downs in force, and when they end",
    "health": "last bar processed, service heartbeat, last exchange contact",
    "stop": "no new entries (exits go on)",
    "start": "entries again after /stop (asks first: Telegram's Start button sends /start too)",
    "forceexit": "[SYMBOL|all] close a position at market (no symbol: pick one from the open positions)",
    "kill": "the kill switch: close everything, refuse entries (asks first)",
    "rearm": "clear the kill switch and halts (asks first)",
    "model": "champion and challenger with their metrics, the last promotion decision",
    "rollback": "put @champion back on the previous champion (asks first)",
    "logs": "[n] the last n log lines (10), secrets masked",
    "version": "pricelevel, Python and python-telegram-bot versions, the model traded",
    "show_config": "the effective trading configuration, secrets masked",
    "tg_info": "this chat's id and your user id (for telegram.chat_ids / user_ids)",
    "help": "this list",
}
#: Default and largest ``n`` of ``/daily``, ``/weekly``, ``/monthly``.
PERIODS = {"daily": ("day", 7, 366), "weekly": ("week", 8, 104), "monthly": ("month", 6, 60)}
#: Registry metrics shown by ``/model``, when the version's run has them.
MODEL_METRICS = ("test_pr_auc", "backtest_total_return", "backtest_sharpe", "backtest_n_trades")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,20}(USDT|USDC|USD)$")


class UsageError(ValueError):
    """A command's arguments are wrong; ``str()`` is the answer to send."""


def count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def help_text() -> str:
    return "\n".join(["Commands:", *(f"/{name} {what}" for name, what in COMMANDS.items())])


# ------------------------------------------------------------------------------------------------ the trader


def status_text(store: StateStore, telegram: Mapping[str, int] | None = None) -> str:
    """``/status``: what ``pricelevel trader status`` shows, in a few lines."""
    s = control.status(store)
    model = s["model"] or {}
    risk = s["risk"] or {}
    lines = [
        f"mode: {s['mode']} · model: {model.get('uri', '-')} version {model.get('version', '-')}",
        f"last bar: {when(s['last_bar'])}",
        f"equity: {money(s['equity'])} (cash {money(s['cash'])}) · realised P&L {signed(s['realised_pnl'])} "
        f"over {count(s['trades'], 'trade')}",
        f"positions: {len(s['positions'])} open{_names(s['positions'])} · open orders: {len(s['open_orders'])}",
        f"risk: {risk_text(risk)}",
        f"pending commands: {', '.join(c['kind'] for c in s['pending_commands']) or 'none'}",
    ]
    if s["mode"] != "paper":
        if s["exchange_down_since"]:
            lines.append(f"EXCHANGE UNAVAILABLE since {when(s['exchange_down_since'])}: {s['exchange_error']}")
        if s["reconciled_at"]:
            found = "; ".join(s["differences"]) or "books equal the account"
            lines.append(f"last reconciliation {when(s['reconciled_at'])}: {found}")
        if s["lost_answers"]:
            last = s["lost_answers"][-1]
            lines.append(f"lost answers: {len(s['lost_answers'])}, the last {last['symbol']} {last['side']} "
                         f"{last['status']} ({last['resolution']})")
    if telegram is not None:
        lost = telegram.get("dropped", 0) + telegram.get("failed", 0) + telegram.get("unsent", 0)
        lines.append(f"telegram: {telegram.get('sent', 0)} sent, {lost} not sent")
    return "\n".join(lines)


def _names(positions: Mapping[str, Any]) -> str:
    return f" ({', '.join(sorted(positions))})" if positions else ""


def risk_text(risk: Mapping[str, Any]) -> str:
    """The risk state in words (the same words as the trader's ``RiskManager.describe``)."""
    parts = [f"halted: {risk['halted']}" if risk.get("halted") else "armed",
             "kill switch ON" if risk.get("kill_switch") else "", "stopped (no new entries)" if risk.get("stopped") else "",
             "breaker TRIPPED" if risk.get("breaker_tripped") else "",
             f"cool-down until {risk['cooldown_until']}" if risk.get("cooldown_until") else ""]
    return ", ".join(p for p in parts if p)


def positions_text(store: StateStore) -> str:
    positions = control.status(store)["positions"]
    if not positions:
        return "no open positions"
    lines = [f"{len(positions)} open:"]
    for symbol, held in sorted(positions.items()):
        size, entry, last = held.get("size"), held.get("entry_price"), held.get("last_close")
        change = last / entry - 1.0 if entry and last else None
        pnl = size * (last - entry) if size is not None and entry and last else None
        lines.append(f"{symbol}: {size:.6g} at {entry:.6g}, now {last:.6g} ({pct(change)}, {signed(pnl)})"
                     if pnl is not None else f"{symbol}: {held}")
    return "\n".join(lines)


def balance_text(store: StateStore) -> str:
    b = control.balance(store)
    if b["equity"] is None:
        return "no equity recorded yet: the trader has not traded a bar"
    return "\n".join([
        f"equity: {money(b['equity'])} · cash: {money(b['cash'])} · in positions: {money(b['in_positions'])}",
        f"since {when(b['since'])}: {pct(b['total_return'])} (from {money(b['start_equity'])}; peak {money(b['peak_equity'])})",
        f"realised P&L {signed(b['realised_pnl'])}, fees {money(b['fees'])}",
    ])


def profit_text(store: StateStore, days: float | None) -> str:
    p = control.profit(store, days)
    if p["until"] is None:
        return "no equity recorded yet: the trader has not traded a bar"
    window = "all time" if days is None else f"last {days:g} day{'s' if days != 1 else ''}"
    lines = [f"{window} ({when(p['since'])} .. {when(p['until'])}):",
             f"{count(p['trades'], 'closed trade')} ({p['wins']} won, {p['losses']} lost): P&L {signed(p['realised_pnl'])}, "
             f"fees {money(p['fees'])}",
             f"equity {money(p['equity_start'])} -> {money(p['equity_end'])} ({pct(p['return'])})"]
    if p["trades"]:
        lines.append(f"best {signed(p['best'])}, worst {signed(p['worst'])}")
    return "\n".join(lines)


def trades_text(store: StateStore, n: int) -> str:
    rows = control.recent_trades(store, n)
    if not rows:
        return "no closed trades yet"
    lines = [f"last {count(len(rows), 'closed trade')}, newest first:"]
    for t in rows:
        change = t["exit_price"] / t["entry_price"] - 1.0 if t["entry_price"] else None
        lines.append(f"{when(t['exit_time'])} {t['symbol']} {t['exit_reason']}: {t['entry_price']:.6g} -> "
                     f"{t['exit_price']:.6g} ({pct(change)}), P&L {signed(t['pnl'])}")
    return "\n".join(lines)


#: What each queued command does, said when it is queued.
EFFECTS = {
    "stop": "no new entries; exits, stops and take-profits go on",
    "start": "entries allowed again",
    "forceexit": "closes the positions",
    "kill": "kill switch: every position is closed, open orders cancelled, entries refused until /rearm",
    "rearm": "kill switch, halts and breaker cleared",
}


def queue_command(store: StateStore, kind: str, symbols: Sequence[str] = (), by: str = "telegram") -> str:
    """``/stop``, ``/start``, ``/forceexit``, ``/kill``, ``/rearm``: queued exactly as ``pricelevel trader <kind>``."""
    command = control.request(store, kind, symbols, by)
    target = f" {', '.join(command['symbols'])}" if command["symbols"] else (" all" if kind == "forceexit" else "")
    return f"queued {kind}{target}: {EFFECTS[kind]}. The trader applies it within seconds (or when it starts)."


def parse_forceexit(args: Sequence[str], open_positions: Collection[str]) -> tuple[str, ...]:
    """``SYMBOL`` or ``all`` -> the symbols to close (``()``: all), checked against the open positions: a symbol
    without a position (a typo, one already closed) is refused, so nothing is queued that would close nothing."""
    if len(args) != 1:
        raise UsageError("usage: /forceexit SYMBOL|all (e.g. /forceexit BTCUSDT), or /forceexit to pick one")
    arg = args[0].strip().upper()
    if not open_positions:
        raise UsageError("no open positions: nothing to close")
    if arg == "ALL":
        return ()
    if not _SYMBOL.match(arg):
        raise UsageError(f"{args[0]!r} is not a symbol; usage: /forceexit SYMBOL|all")
    if arg not in open_positions:
        raise UsageError(f"no open position in {arg}: nothing queued (open: {', '.join(sorted(open_positions))})")
    return (arg,)


def forceexit_text(store: StateStore, args: Sequence[str], by: str) -> str:
    """``/forceexit SYMBOL|all``: checked against the open positions now, then queued as ``trader forceexit``."""
    return queue_command(store, "forceexit", parse_forceexit(args, control.open_symbols(store)), by)


def parse_number(args: Sequence[str], default: float | None, name: str, integer: bool = False,
                 limit: float = 10_000) -> float | None:
    """The optional single positive number of ``/profit [days]`` and ``/trades [n]``."""
    if not args:
        return default
    try:
        value = int(args[0]) if integer else float(args[0])
    except ValueError:
        raise UsageError(f"{name} must be a number, got {args[0]!r}") from None
    if not 0 < value <= limit or not math.isfinite(value):
        raise UsageError(f"{name} must be between 0 and {limit:g}, got {args[0]}")
    return value


def summary_text(store: StateStore) -> str:
    """The daily summary: equity, the last day's P&L and trades, open positions."""
    s, p = control.status(store), control.profit(store, 1)
    if p["until"] is None:
        return "daily summary: no bar traded yet"
    return "\n".join([
        f"daily summary to {when(p['until'])}",
        f"equity {money(s['equity'])} ({pct(p['return'])} in 24 h) · realised P&L {signed(p['realised_pnl'])} "
        f"over {count(p['trades'], 'trade')}",
        f"positions: {len(s['positions'])} open{_names(s['positions'])} · risk: {risk_text(s['risk'] or {})}",
    ])


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Registry:
    """The model registry as ``/model`` and ``/rollback`` use it: the tracking config and the store's registry
    lock (the one ``pricelevel promote --rollback`` holds, so a rollback never interleaves with a promotion)."""

    tracking: TrackingConfig
    lock: Callable[[], AbstractContextManager[Any]]
    #: The MLflow client of ``tracking`` (made per call: the registry may be a remote server that restarted).
    client: Callable[[TrackingConfig], MlflowClient] = mlflow_client

    def model_text(self, running: Mapping[str, Any] | None = None) -> str:
        """``/model``: champion and challenger with their metrics and the last promotion decision."""
        name = self.tracking.registered_model
        versions = list_versions(self.client(self.tracking), name)
        return model_text(name, versions, running)

    def rollback_text(self) -> str:
        """``/rollback``: :func:`~pricelevel.registry.versions.rollback_champion` under the registry lock."""
        name = self.tracking.registered_model
        try:
            with self.lock():
                old, new = rollback_champion(self.client(self.tracking), name)
        except NothingToRollBackError as exc:
            return f"nothing rolled back: {exc}"
        return (f"rolled back {name}@{ALIAS_CHAMPION}: version {old} -> {new}. "
                "The trader switches to it at its next bar.")


def model_text(name: str, versions: Sequence[Mapping[str, Any]], running: Mapping[str, Any] | None = None) -> str:
    by_alias = {alias: v for v in versions for alias in v.get("aliases", [])}
    lines = [f"registered model {name}"]
    if running:
        lines.append(f"trading now: version {running.get('version', '-')} ({running.get('uri', '-')})")
    for alias in (ALIAS_CHAMPION, ALIAS_CHALLENGER):
        version = by_alias.get(alias)
        if version is None:
            lines.append(f"@{alias}: none")
            continue
        metrics = version.get("metrics", {})
        shown = [k for k in MODEL_METRICS if k in metrics] or sorted(metrics)[:4]
        numbers = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown)
        lines.append(f"@{alias}: version {version['version']} ({numbers or 'no metrics'})")
    decided = [v for v in versions if v.get("tags", {}).get("promotion.decided_at")]
    if decided:
        last = max(decided, key=lambda v: v["tags"]["promotion.decided_at"])["tags"]
        lines.append(f"last promotion decision ({when(last['promotion.decided_at'])}): {last.get('promotion.decision')}: "
                     f"{last.get('promotion.reason', '')}")
    else:
        lines.append("no promotion decision yet")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ lifecycle


def promotion_text(name: str, outcome: Mapping[str, Any]) -> str:
    """The ``promote`` flow's outcome (a decision or a rollback) as one message, with its numbers."""
    if "rolled_back" in outcome:
        return f"ROLLED BACK {name}@{ALIAS_CHAMPION}: version {outcome.get('from')} -> {outcome.get('to')}"
    details = outcome.get("details") or {}
    challenger, champion = outcome.get("challenger"), outcome.get("champion")
    head = (f"PROMOTED {name} version {challenger} to @{ALIAS_CHAMPION} (was {champion or 'none'})"
            if outcome.get("promote") else f"NOT PROMOTED: {name} version {challenger} stays @{ALIAS_CHALLENGER} "
            f"(@{ALIAS_CHAMPION}: {champion or 'none'})")
    lines = [head, str(outcome.get("reason", ""))]
    if details:
        lines.append(f"{details.get('metric')}: {_num(details.get('challenger'))} vs {_num(details.get('champion'))} · "
                     f"{details.get('backtest_metric')}: {_num(details.get('challenger_backtest'))} vs "
                     f"{_num(details.get('champion_backtest'))}")
    return "\n".join(lines)


def failure_text(flow: str, run: str, message: str | None) -> str:
    first = (message or "").strip().splitlines()
    return f"FAILED: flow {flow} (run {run}): {first[0] if first else 'no message'}"


def _num(value: Any) -> str:
    return "-" if not isinstance(value, int | float) or not math.isfinite(value) else f"{value:.4f}"
