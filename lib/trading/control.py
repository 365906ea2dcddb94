"""Controlling a trader from outside its process (the CLI, Telegram): commands are queued in the state database
and the trader applies them at its next step, so a running service never has its state overwritten, and a
stopped one applies them when it starts. Reading the status needs no running trader either."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

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
    return {
        "mode": docs["mode"] or "paper", "model": docs["model"], "last_bar": docs["last_bar"],
        "equity": float(equity["equity"].iloc[-1]) if len(equity) else None,
        "cash": float(equity["cash"].iloc[-1]) if len(equity) else None,
        "positions": positions, "open_orders": [{k: str(v) for k, v in o.items()} for o in open_orders],
        "risk": docs["risk"] or {}, "pending_commands": docs[COMMANDS] or [],
        "trades": int(len(trades)), "realised_pnl": float(trades["pnl"].sum()) if len(trades) else 0.0,
    }


def _paper_positions(execution: dict[str, Any]) -> dict[str, dict[str, float]]:
    engine = execution.get("engine")
    if not engine:
        return {}
    return {symbol: {"size": engine["position"][k], "entry_price": engine["entry_price"][k], "last_close": engine["last_close"][k]}
            for k, symbol in enumerate(execution["symbols"]) if engine["position"][k] > 0}
