"""The trader's reports, each a typed answer computed once from its data (closed trades, the equity curve, the
risk state): P&L per day, week or month, per symbol, exit-reason statistics, open vs allowed positions, the
locks in force, health, versions and the effective configuration. Each answer lays itself out once as a
:class:`Report` (a title, a table or facts, notes; numbers already formatted), which Telegram renders as HTML and
``pricelevel trader ...`` as a console table, so both say the same thing. The store-reading wrappers are in
:mod:`pricelevel.trading.control`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel

Unit = Literal["day", "week", "month"]
#: Config keys whose value is never shown (secrets come from the environment only, this is a second guard).
SECRET_KEY = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)
MASK = "***"


# ------------------------------------------------------------------------------------------------ formatting


def money(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:,.2f}"


def signed(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+,.2f}"


def pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.2%}"


def when(value: object | None) -> str:
    return "-" if value is None or value == "" else f"{pd.Timestamp(value):%Y-%m-%d %H:%M} UTC"


def duration(value: pd.Timedelta | None) -> str:
    """``1d 04:00``, ``3:30`` (hours:minutes), ``-``."""
    if value is None or pd.isna(value):
        return "-"
    minutes = int(value.total_seconds() // 60)
    days, minutes = divmod(minutes, 24 * 60)
    return f"{days}d {minutes // 60:02d}:{minutes % 60:02d}" if days else f"{minutes // 60}:{minutes % 60:02d}"


@dataclass(frozen=True)
class Report:
    """An answer laid out once: a title, a table (``columns`` and ``rows`` of formatted cells; ``rows`` without
    ``columns`` are preformatted lines), ``facts`` (label, value) and ``notes``."""

    title: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    facts: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def text(self) -> str:
        """Plain text (logs, tests): the title, an aligned table, ``label: value`` lines, the notes."""
        return "\n".join([self.title, *aligned(self.columns, self.rows), *(f"{k}: {v}" for k, v in self.facts),
                          *self.notes])


def aligned(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The table as lines of a monospace block: text columns left, numbers right."""
    table = [tuple(columns), *rows] if columns else [tuple(r) for r in rows]
    if not table:
        return []
    if not columns:
        return [" ".join(r) for r in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    numeric = [all(_numeric(r[i]) for r in rows) and bool(rows) for i in range(len(columns))]
    return [" ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric, strict=True)).rstrip()
            for r in table]


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+%?|-", cell))


# ------------------------------------------------------------------------------------------------ P&L per period


@dataclass(frozen=True)
class PeriodRow:
    start: pd.Timestamp
    trades: int
    wins: int
    losses: int
    #: Realised P&L of the trades closed in the period.
    pnl: float
    #: Equity at the end of the previous period (or the first recorded one) and at the period's last bar.
    equity_start: float | None
    equity_end: float | None

    @property
    def change(self) -> float | None:
        if self.equity_start and self.equity_end is not None:
            return self.equity_end / self.equity_start - 1.0
        return None


@dataclass(frozen=True)
class PeriodProfit:
    """``/daily``, ``/weekly``, ``/monthly``: the last ``n`` UTC days, weeks (from Monday) or months, newest first,
    ending at the trader's newest bar (not the wall clock, so a replay answers too)."""

    unit: Unit
    rows: tuple[PeriodRow, ...]
    until: pd.Timestamp | None

    def report(self) -> Report:
        title = {"day": "daily", "week": "weekly", "month": "monthly"}[self.unit] + " P&L"
        if self.until is None:
            return Report(title, notes=("no equity recorded yet: the trader has not traded a bar",))
        label = {"day": "%Y-%m-%d", "week": "%Y-%m-%d", "month": "%Y-%m"}[self.unit]
        rows = tuple((f"{r.start:{label}}", str(r.trades), signed(r.pnl), pct(r.change), money(r.equity_end))
                     for r in self.rows)
        head = {"day": "day", "week": "week of", "month": "month"}[self.unit]
        total = sum(r.pnl for r in self.rows)
        return Report(f"{title} to {when(self.until)}", (head, "trades", "P&L", "equity %", "equity"), rows,
                      notes=(f"{len(self.rows)} {self.unit}s: {sum(r.trades for r in self.rows)} trades, "
                             f"P&L {signed(total)}",))


def period_start(stamp: pd.Timestamp, unit: Unit) -> pd.Timestamp:
    day = stamp.tz_convert("UTC").normalize()
    if unit == "day":
        return day
    if unit == "week":
        return day - pd.Timedelta(days=day.weekday())
    return day.replace(day=1)


def _step(start: pd.Timestamp, unit: Unit, k: int) -> pd.Timestamp:
    if unit == "day":
        return start + pd.Timedelta(days=k)
    if unit == "week":
        return start + pd.Timedelta(weeks=k)
    return start + pd.DateOffset(months=k)


def period_profit(trades: pd.DataFrame, equity: pd.DataFrame, unit: Unit, n: int) -> PeriodProfit:
    """P&L of the trades closed and the equity change in each of the last ``n`` periods (see :class:`PeriodProfit`)."""
    if not len(equity):
        return PeriodProfit(unit, (), None)
    stamps = pd.to_datetime(equity["bar_time"], utc=True)
    values = equity["equity"].astype(float)
    until = stamps.max()
    exits = pd.to_datetime(trades["exit_time"], utc=True) if len(trades) else pd.Series(dtype="datetime64[ns, UTC]")
    pnl = trades["pnl"].astype(float) if len(trades) else pd.Series(dtype=float)
    newest = period_start(until, unit)
    rows = []
    for k in range(n):
        start = _step(newest, unit, -k)
        end = _step(start, unit, 1)
        inside = (exits >= start) & (exits < end)
        closed = pnl[inside.to_numpy()] if len(pnl) else pnl
        before, upto = values[stamps < start], values[stamps < end]
        equity_start = float(before.iloc[-1]) if len(before) else (float(values.iloc[0]) if len(upto) else None)
        rows.append(PeriodRow(start, int(len(closed)), int((closed > 0).sum()), int((closed < 0).sum()),
                              float(closed.sum()), equity_start, float(upto.iloc[-1]) if len(upto) else None))
    return PeriodProfit(unit, tuple(rows), until)


# ------------------------------------------------------------------------------------------------ per symbol


@dataclass(frozen=True)
class SymbolRow:
    symbol: str
    trades: int
    wins: int
    pnl: float
    fees: float
    #: Mean of the trades' price change (exit / entry - 1).
    mean_return: float | None


@dataclass(frozen=True)
class Performance:
    """``/performance``: realised P&L per symbol, best first."""

    rows: tuple[SymbolRow, ...]

    def report(self) -> Report:
        if not self.rows:
            return Report("performance per symbol", notes=("no closed trades yet",))
        rows = tuple((r.symbol, str(r.trades), f"{r.wins}/{r.trades}", signed(r.pnl), pct(r.mean_return))
                     for r in self.rows)
        return Report("performance per symbol", ("symbol", "trades", "won", "P&L", "mean"), rows,
                      notes=(f"total P&L {signed(sum(r.pnl for r in self.rows))}, fees {money(sum(r.fees for r in self.rows))}",))


def performance(trades: pd.DataFrame) -> Performance:
    if not len(trades):
        return Performance(())
    change = trades["exit_price"] / trades["entry_price"].where(trades["entry_price"] != 0) - 1.0
    frame = trades.assign(change=change, fee=trades["entry_fees"] + trades["exit_fees"], won=trades["pnl"] > 0)
    rows = [SymbolRow(str(symbol), int(len(g)), int(g["won"].sum()), float(g["pnl"].sum()), float(g["fee"].sum()),
                      float(g["change"].mean()) if g["change"].notna().any() else None)
            for symbol, g in frame.groupby("symbol", sort=True)]
    return Performance(tuple(sorted(rows, key=lambda r: (-r.pnl, r.symbol))))


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class ReasonRow:
    reason: str
    trades: int
    wins: int
    losses: int
    pnl: float


@dataclass(frozen=True)
class Stats:
    """``/stats``: trades per exit reason, wins and losses, and how long winners and losers were held."""

    reasons: tuple[ReasonRow, ...]
    wins: int
    losses: int
    draws: int
    mean_win: float | None
    mean_loss: float | None
    held_winners: pd.Timedelta | None
    held_losers: pd.Timedelta | None

    def report(self) -> Report:
        total = self.wins + self.losses + self.draws
        if not total:
            return Report("trade statistics", notes=("no closed trades yet",))
        rows = tuple((r.reason, str(r.trades), str(r.wins), str(r.losses), signed(r.pnl)) for r in self.reasons)
        facts = (("won / lost / even", f"{self.wins} / {self.losses} / {self.draws} ({self.wins / total:.0%} won)"),
                 ("mean win / loss", f"{signed(self.mean_win)} / {signed(self.mean_loss)}"),
                 ("held: winners / losers", f"{duration(self.held_winners)} / {duration(self.held_losers)}"))
        return Report("trade statistics", ("exit", "trades", "won", "lost", "P&L"), rows, facts)


def stats(trades: pd.DataFrame) -> Stats:
    if not len(trades):
        return Stats((), 0, 0, 0, None, None, None, None)
    pnl = trades["pnl"].astype(float)
    held = pd.to_datetime(trades["exit_time"], utc=True) - pd.to_datetime(trades["entry_time"], utc=True)
    reasons = [ReasonRow(str(reason), int(len(g)), int((g["pnl"] > 0).sum()), int((g["pnl"] < 0).sum()),
                         float(g["pnl"].sum())) for reason, g in trades.groupby("exit_reason", sort=True)]
    won, lost = pnl > 0, pnl < 0
    return Stats(tuple(sorted(reasons, key=lambda r: (-r.trades, r.reason))), int(won.sum()), int(lost.sum()),
                 int((pnl == 0).sum()), float(pnl[won].mean()) if won.any() else None,
                 float(pnl[lost].mean()) if lost.any() else None, held[won].mean() if won.any() else None,
                 held[lost].mean() if lost.any() else None)


# ------------------------------------------------------------------------------------------------ positions, locks


@dataclass(frozen=True)
class Count:
    """``/count``: positions open and how many the risk limits allow."""

    open: tuple[str, ...]
    allowed: int | None

    def report(self) -> Report:
        allowed = "-" if self.allowed is None else str(self.allowed)
        return Report("positions", facts=(("open / allowed", f"{len(self.open)} / {allowed}"),
                                          ("open", ", ".join(self.open) or "none")))


@dataclass(frozen=True)
class Lock:
    what: str
    reason: str
    #: When it ends: a time (UTC), or what ends it (``/rearm``, ``/start``, ``6 good bars``).
    until: str


@dataclass(frozen=True)
class Locks:
    """``/locks``: every halt, stop and cool-down that refuses entries now, with what ends it."""

    locks: tuple[Lock, ...]

    def report(self) -> Report:
        if not self.locks:
            return Report("locks", notes=("none: entries are allowed",))
        return Report("locks", ("lock", "until", "why"), tuple((k.what, k.until, k.reason) for k in self.locks))


def locks(risk: Mapping[str, Any], last_bar: object | None, equity: float | None, held: int,
          max_positions: int | None = None, daily_loss_limit: float | None = None,
          breaker_reset_bars: int | None = None) -> Locks:
    """The locks in force at the trader's newest bar (``last_bar``), from its risk state and limits."""
    found = []
    if risk.get("kill_switch"):
        found.append(Lock("kill switch", str(risk.get("halted") or "engaged"), "/rearm"))
    elif risk.get("halted"):
        found.append(Lock("halt", str(risk["halted"]), "/rearm"))
    if risk.get("stopped"):
        found.append(Lock("stop", "/stop: no new entries", "/start"))
    cooldown = risk.get("cooldown_until")
    if cooldown and (last_bar is None or pd.Timestamp(cooldown) > pd.Timestamp(last_bar)):
        found.append(Lock("cool-down", "losing trades in a row", when(cooldown)))
    if risk.get("breaker_tripped"):
        left = "" if breaker_reset_bars is None else f"{max(breaker_reset_bars - int(risk.get('breaker_good') or 0), 1)} "
        found.append(Lock("circuit breaker", f"{risk.get('breaker_errors', 0)} exchange errors or stale bars",
                          f"{left}good bars in a row"))
    start = risk.get("day_start_equity")
    if daily_loss_limit is not None and start and equity is not None and equity <= start * (1 - daily_loss_limit):
        day = pd.Timestamp(risk.get("day") or last_bar or pd.Timestamp.now(tz="UTC"))
        ends = (day.tz_localize("UTC") if day.tzinfo is None else day).normalize() + pd.Timedelta(days=1)
        found.append(Lock("daily loss", f"{pct(equity / start - 1)} today (limit {daily_loss_limit:.0%})", when(ends)))
    if max_positions is not None and held >= max_positions:
        found.append(Lock("max positions", f"{held} of {max_positions} open", "a position closes"))
    return Locks(tuple(found))


# ------------------------------------------------------------------------------------------------ health, versions


@dataclass(frozen=True)
class Health:
    """``/health``: is the trader alive (last bar, heartbeat) and does the exchange answer."""

    mode: str
    last_bar: str | None
    bar_age: pd.Timedelta | None
    running: bool | None
    heartbeat: str | None
    stopped_reason: str | None
    exchange_down_since: str | None
    exchange_error: str | None
    last_exchange_contact: str | None
    reconciled_at: str | None
    pending_commands: int
    extra: tuple[tuple[str, str], ...] = ()

    def report(self) -> Report:
        if self.running is None:
            service = "never started"
        elif self.running:
            service = f"running, heartbeat {when(self.heartbeat)}"
        else:
            service = f"stopped {when(self.heartbeat)} ({self.stopped_reason or '-'})"
        facts = [("service", service), ("last bar", f"{when(self.last_bar)} ({duration(self.bar_age)} ago)"
                                        if self.last_bar else "none yet")]
        if self.mode != "paper":
            facts.append(("exchange", f"UNAVAILABLE since {when(self.exchange_down_since)}: {self.exchange_error}"
                          if self.exchange_down_since else "answers"))
            facts.append(("last exchange contact", when(self.last_exchange_contact or self.reconciled_at)))
        facts.append(("commands waiting", str(self.pending_commands)))
        return Report(f"health ({self.mode})", facts=(*facts, *self.extra))


@dataclass(frozen=True)
class Versions:
    """``/version``."""

    items: tuple[tuple[str, str], ...]

    def report(self) -> Report:
        return Report("versions", facts=self.items)


@dataclass(frozen=True)
class ConfigView:
    """``/show_config``: the effective configuration of the named sections, flattened, secrets masked."""

    items: tuple[tuple[str, str], ...]

    def report(self) -> Report:
        return Report("effective configuration", facts=self.items)


def config_view(sections: Mapping[str, BaseModel], mask: Callable[[str], str] = lambda text: text) -> ConfigView:
    items: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif SECRET_KEY.search(prefix) and value not in (None, "", [], {}):
            items.append((prefix, MASK))
        else:
            shown = "null" if value is None else (", ".join(map(str, value)) or "[]" if isinstance(value, list | tuple)
                                                  else str(value))
            items.append((prefix, mask(shown)))

    for name, section in sections.items():
        walk(name, section.model_dump(mode="json"))
    return ConfigView(tuple(items))
