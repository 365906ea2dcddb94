"""Controlling a trader from outside its process (the CLI, Telegram): commands are queued in the state database
and the trader applies them at its next step, so a running service never has its state overwritten, and a
stopped one applies them when it starts. Reading the status needs no running trader either."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import pandas as pd

from pricelevel.backtest.config import ProtectionsConfig
from pricelevel.trading import reports
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.state import EQUITY, TRADES, StateStore

COMMANDS = "commands"
#: What can be asked: no new entries / resume, close positions now, the kill switch and re-arming it.
KINDS = ("stop", "start", "forceexit", "kill", "rearm")


def request(store: StateStore, kind: str, symbols: Iterable[str] = (), by: str = "cli") -> dict[str, Any]:
    """Queue a command (``kill``: flatten everything, cancel open orders, refuse entries until ``rearm``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown command {kind!r}; one of {', '.join(KINDS)}")
    command = {"kind": kind, "symbols": sorted(symbols), "by": by, "at": pd.Timestamp.now(tz="UTC").isoformat()}
    with store.transaction() as tx:
        store.put(tx, COMMANDS, [*store.get(tx, COMMANDS, []), command])
    return command


def take_commands(store: StateStore) -> list[dict[str, Any]]:
    """The queued commands, oldest first, removed from the queue (the trader applies them)."""
    with store.transaction() as tx:
        commands = store.get(tx, COMMANDS, [])
        if commands:
            store.put(tx, COMMANDS, [])
    return commands


def status(store: StateStore) -> dict[str, Any]:
    """Mode, model, last bar, equity, positions, open orders, risk state and totals, from the database alone."""
    with store.transaction() as tx:
        docs = {key: store.get(tx, key) for key in ("last_bar", "risk", "model", "execution", "mode", COMMANDS)}
        open_orders = store.orders(tx, ("NEW", "SENT", "ACKED", "UNKNOWN", "PARTIAL"))
    equity, trades = store.frame(EQUITY), store.frame(TRADES)
    execution = docs["execution"] or {}
    positions = execution.get("positions") or _paper_positions(execution)
    with store.transaction() as tx:
        resolved = [o for o in store.orders(tx) if "answer lost" in (o["message"] or "")
                    or "found by client id" in (o["message"] or "")]
    return {
        "mode": docs["mode"] or "paper", "model": docs["model"], "last_bar": docs["last_bar"],
        "equity": float(equity["equity"].iloc[-1]) if len(equity) else None,
        "cash": float(equity["cash"].iloc[-1]) if len(equity) else None,
        "positions": positions, "open_orders": [{k: str(v) for k, v in o.items()} for o in open_orders],
        "risk": docs["risk"] or {}, "pending_commands": docs[COMMANDS] or [],
        "trades": int(len(trades)), "realised_pnl": float(trades["pnl"].sum()) if len(trades) else 0.0,
        "exchange_error": execution.get("last_error") if execution.get("down_since") else None,
        "exchange_down_since": execution.get("down_since"),
        "reconciled_at": execution.get("reconciled_at"), "differences": execution.get("differences") or [],
        "lost_answers": [{"client_id": o["client_id"], "symbol": o["symbol"], "side": o["side"], "status": o["status"],
                          "resolution": o["message"]} for o in resolved[-20:]],
    }


def _paper_positions(execution: dict[str, Any]) -> dict[str, dict[str, float]]:
    engine = execution.get("engine")
    if not engine:
        return {}
    return {symbol: {"size": engine["position"][k], "entry_price": engine["entry_price"][k], "last_close": engine["last_close"][k]}
            for k, symbol in enumerate(execution["symbols"]) if engine["position"][k] > 0}


def pending_commands(store: StateStore) -> bool:
    """Whether a command waits for the trader (cheap: the service asks every few seconds)."""
    with store.transaction() as tx:
        return bool(store.get(tx, COMMANDS, []))


def balance(store: StateStore) -> dict[str, Any]:
    """Equity, cash, what is in positions, and the account's return since its first bar (from the database)."""
    equity, trades = store.frame(EQUITY), store.frame(TRADES)
    with store.transaction() as tx:
        risk = store.get(tx, "risk") or {}
    if not len(equity):
        return {"equity": None, "cash": None, "in_positions": None, "start_equity": None, "peak_equity": None,
                "total_return": None, "realised_pnl": 0.0, "fees": 0.0, "since": None, "last_bar": None}
    first, last = equity.iloc[0], equity.iloc[-1]
    return {
        "equity": float(last["equity"]), "cash": float(last["cash"]), "in_positions": float(last["equity"] - last["cash"]),
        "start_equity": float(first["equity"]), "peak_equity": risk.get("peak_equity"),
        "total_return": float(last["equity"] / first["equity"] - 1.0) if first["equity"] else None,
        "realised_pnl": float(trades["pnl"].sum()) if len(trades) else 0.0,
        "fees": float((trades["entry_fees"] + trades["exit_fees"]).sum()) if len(trades) else 0.0,
        "since": str(pd.Timestamp(first["bar_time"])), "last_bar": str(pd.Timestamp(last["bar_time"])),
    }


def profit(store: StateStore, days: float | None = None) -> dict[str, Any]:
    """Closed trades and the equity change over the last ``days`` before the newest bar (``None``: all time).

    The window ends at the trader's newest bar, not the wall clock, so a replay over history answers too.
    """
    equity, trades = store.frame(EQUITY), store.frame(TRADES)
    if not len(equity):
        return {"days": days, "since": None, "until": None, "trades": 0, "wins": 0, "losses": 0, "realised_pnl": 0.0,
                "fees": 0.0, "best": None, "worst": None, "equity_start": None, "equity_end": None, "return": None}
    stamps = pd.to_datetime(equity["bar_time"], utc=True)
    until = stamps.max()
    since = stamps.min() if days is None else until - pd.Timedelta(days=days)
    before = equity[stamps <= since]
    start = float(before["equity"].iloc[-1]) if len(before) else float(equity["equity"].iloc[0])
    end = float(equity["equity"].iloc[-1])
    if len(trades):
        trades = trades[pd.to_datetime(trades["exit_time"], utc=True) > since] if days is not None else trades
    pnl = trades["pnl"] if len(trades) else pd.Series(dtype=float)
    return {
        "days": days, "since": str(since), "until": str(until), "trades": int(len(pnl)), "wins": int((pnl > 0).sum()),
        "losses": int((pnl < 0).sum()), "realised_pnl": float(pnl.sum()),
        "fees": float((trades["entry_fees"] + trades["exit_fees"]).sum()) if len(pnl) else 0.0,
        "best": float(pnl.max()) if len(pnl) else None, "worst": float(pnl.min()) if len(pnl) else None,
        "equity_start": start, "equity_end": end, "return": end / start - 1.0 if start else None,
    }


def recent_trades(store: StateStore, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` most recently closed trades, newest first."""
    trades = store.frame(TRADES)
    if not len(trades):
        return []
    trades = trades.assign(exit_time=pd.to_datetime(trades["exit_time"], utc=True)).sort_values(["exit_time", "id"])
    rows = trades.tail(max(n, 0)).iloc[::-1]
    return [{key: (str(value) if isinstance(value, pd.Timestamp) else value) for key, value in row.items()}
            for row in rows.to_dict("records")]


# ------------------------------------------------------------------------------------------------ reports


def open_symbols(store: StateStore) -> list[str]:
    """The symbols with an open position, sorted (what ``forceexit`` may close)."""
    return sorted(status(store)["positions"])


def period_profit(store: StateStore, unit: reports.Unit, n: int) -> reports.PeriodProfit:
    """``trader daily|weekly|monthly`` and ``/daily|/weekly|/monthly``."""
    return reports.period_profit(store.frame(TRADES), store.frame(EQUITY), unit, n)


def performance(store: StateStore) -> reports.Performance:
    return reports.performance(store.frame(TRADES))


def trade_stats(store: StateStore) -> reports.Stats:
    return reports.stats(store.frame(TRADES))


def count(store: StateStore, risk: ProtectionsConfig | None = None) -> reports.Count:
    return reports.Count(tuple(open_symbols(store)), risk.max_positions if risk is not None else None)


def locks(store: StateStore, risk: RiskConfig | None = None) -> reports.Locks:
    s = status(store)
    return reports.locks(s["risk"] or {}, s["last_bar"], s["equity"], len(s["positions"]),
                         max_positions=risk.max_positions if risk is not None else None,
                         daily_loss_limit=risk.daily_loss_limit if risk is not None else None,
                         breaker_reset_bars=risk.breaker_reset_bars if risk is not None else None)


def health(store: StateStore, now: pd.Timestamp | None = None) -> reports.Health:
    """The trader's liveness from its database: the newest bar, the service's heartbeat, the exchange."""
    s = status(store)
    with store.transaction() as tx:
        marker = store.get(tx, "service") or {}
        execution = store.get(tx, "execution") or {}
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    age = now - pd.Timestamp(s["last_bar"]) if s["last_bar"] else None
    return reports.Health(
        mode=s["mode"], last_bar=s["last_bar"], bar_age=age, running=marker.get("running") if marker else None,
        heartbeat=marker.get("heartbeat"), stopped_reason=marker.get("reason"),
        exchange_down_since=s["exchange_down_since"], exchange_error=s["exchange_error"],
        last_exchange_contact=execution.get("last_contact"), reconciled_at=s["reconciled_at"],
        pending_commands=len(s["pending_commands"]))


def versions(store: StateStore, extra: Iterable[tuple[str, str]] = ()) -> reports.Versions:
    """pricelevel's and Python's versions and the model the trader runs (``extra``: the caller's own)."""
    try:
        package = metadata.version("pricelevel")
    except metadata.PackageNotFoundError:
        package = "unknown (not installed)"
    model = status(store)["model"] or {}
    return reports.Versions((("pricelevel", package), ("python", platform.python_version()), *extra,
                             ("model", f"{model.get('uri', '-')} version {model.get('version', '-')}")))
