"""The trader: one step per closed bar, the same step for a long-running service and for a replay.

``Trader.on_bar_close(t)`` takes the candles closed by ``t`` (from a :mod:`~pricelevel.trading.feeds` feed),
scores them with the model through the one inference path (:mod:`pricelevel.inference.scoring`), turns the
probabilities into signals with the model's own rules (bounded by the risk limits), asks the risk manager
about every entry, and hands the bar to the execution (the paper engine, or an exchange). Everything a bar
decided is committed in one transaction of the state database; a bar already committed is never processed
again, so a restart continues where the last run stopped.

Features are kept up to date bar by bar (:class:`~pricelevel.features.incremental.TableBuilder`, one per
symbol): equal to the full rebuild the backtest makes, to the bit, at the cost of the new rows. Every report
carries the time each part of the bar took (``BarReport.timings``, seconds), which ``bench/trade.py`` reads.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.core.timeframes import Timeframe
from pricelevel.features.incremental import TableBuilder
from pricelevel.inference.scoring import predict_at
from pricelevel.ml.dataset import symbol_frame
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading import documents
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.control import COMMANDS
from pricelevel.trading.events import NoNotifier, Notice, Notifier
from pricelevel.trading.exchange import client_id
from pricelevel.trading.feeds import CandleFeed, bar_ohlc
from pricelevel.trading.live import StopRequested
from pricelevel.trading.models import ModelProvider, Switch
from pricelevel.trading.paper import BarOutcome, ClosedTrade
from pricelevel.trading.risk import RiskManager, RiskState, effective_rules
from pricelevel.trading.state import EQUITY, TRADES, StateStore

LAST_BAR, RISK, EXECUTION, MODEL = "last_bar", "risk", "execution", "model"
#: Symbols a force-exit applied between bars still has to close (paper fills only at a bar).
FORCED = "forced_exits"


class Execution(Protocol):
    """Where orders go: the paper engine (:class:`~pricelevel.trading.paper.PaperBroker`) or an exchange account
    (:class:`~pricelevel.trading.live.ExchangeBroker`)."""

    name: str
    #: True when the execution writes its own order rows (an exchange broker commits each intent before sending).
    records_orders: bool
    #: What went wrong at the last bar (exchange errors, orders of unknown fate): the circuit breaker counts them.
    errors: list[str]

    def on_bar(self, bar_time: pd.Timestamp, ohlc: Mapping[str, tuple[float, float, float, float]],
               entries: Mapping[str, bool], exits: Mapping[str, bool], model_version: str = "") -> BarOutcome: ...
    def reconcile(self, last_bar: str | None, current: pd.Timestamp | None = None) -> list[str]: ...
    def flatten(self, symbols: Sequence[str], at: pd.Timestamp, model_version: str, reason: str) -> list[ClosedTrade]: ...
    def with_rules(self, rules: StrategyRules) -> Execution: ...
    def equity(self) -> float: ...
    @property
    def cash(self) -> float: ...
    def positions(self) -> dict[str, dict[str, float]]: ...
    def held(self) -> int: ...
    def cancel_pending(self) -> None: ...
    def to_state(self) -> dict[str, Any]: ...


#: What a bar's signal for a symbol was: none, no candle (stale), an entry, an exit.
Signal = Literal["none", "stale", "entry", "exit"]
APPROVED = "approved"


@dataclass(frozen=True)
class Decision:
    """What the trader decided for one symbol at one bar: one row of the state database's ``decisions``."""

    bar_time: pd.Timestamp
    symbol: str
    model_version: str
    #: The model's probability (``None``: no prediction, e.g. no candle or no full window).
    probability: float | None
    signal: Signal
    #: ``approved``, why an entry was refused, or what happened instead ("no signal", "forced: ...").
    verdict: str

    @property
    def refused_because(self) -> str | None:
        """Why an entry signal was refused (``None``: it was not refused, or there was none)."""
        return self.verdict if self.signal == "entry" and self.verdict != APPROVED else None

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BarReport:
    bar_time: pd.Timestamp
    model_version: str | None
    probabilities: dict[str, float]
    decisions: list[Decision]
    outcome: BarOutcome | None
    #: What the bar told a person, in order.
    notices: list[Notice] = field(default_factory=list)
    skipped: bool = False
    #: Symbols whose candle had not arrived (with ``wait_for_candles``): nothing was done.
    waiting: tuple[str, ...] = ()
    #: Seconds spent on each part of the bar: candles (the feed), model (commands and the alias), features, prediction, decision (signals and risk), execution
    #: (orders, or the paper engine), persistence (the state transaction), total.
    timings: dict[str, float] = field(default_factory=dict)

#: Rows of the feature table kept beyond the model's window (a margin, so a window never reads a cut row).
TABLE_MARGIN = 8


class Trader:
    """See the module docstring. ``make_execution(rules, saved_state)`` builds the execution for the current
    model's effective rules (from its persisted state after a restart)."""

    def __init__(
        self,
        store: StateStore,
        models: ModelProvider,
        feed: CandleFeed,
        make_execution: Callable[[StrategyRules, dict[str, Any] | None], Execution],
        risk: RiskConfig,
        costs: BacktestConfig,
        notifier: Notifier | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.store, self.models, self.feed, self.risk_config, self.costs = store, models, feed, risk, costs
        #: Set by the service to stop: a step ends at its next safe point (nothing half-committed).
        self.stopping = stopping or threading.Event()
        self.notifier = notifier or NoNotifier()
        self.make_execution = make_execution
        with store.transaction() as tx:
            # Declared, versioned documents (an older one is upgraded as it is read, a newer one refused).
            self.last_bar = store.read(tx, documents.LAST_BAR)
            risk_document = store.read(tx, documents.RISK)
            self.risk = RiskManager(risk, risk_document.to_state() if risk_document else RiskState())
            execution_document = store.read(tx, documents.EXECUTION)
            saved = execution_document.model_dump() if execution_document else None
        self.execution = make_execution(self.rules, saved)
        self._last_refusal: dict[str, str] = {}
        self._told_down = False
        self._stale_told: dict[str, str] = {}
        #: The exchange's kline stream feeding ``feed`` and its private order/execution stream feeding the
        #: execution (the service starts and stops them), or ``None``.
        self.stream: Any = None
        self.private_stream: Any = None
        self.needs_reconcile = True
        self._builders: dict[str, TableBuilder] = {}  # per symbol, for the current model's table spec
        self._timings: dict[str, float] = {}

    @property
    def spec(self):
        return self.models.current.spec

    @property
    def rules(self) -> StrategyRules:
        """The rules executed now: the current model's, bounded by the risk limits."""
        return effective_rules(self.spec.strategy_rules(), self.risk_config)

    @property
    def timeframe(self) -> Timeframe:
        return Timeframe(self.spec.timeframe)

    def reconcile(self, current: pd.Timestamp | None = None) -> list[str]:
        """Settle orders of unknown fate and compare the exchange account with our positions (start-up, after any
        exchange error, when the exchange answers again); a mismatch nobody can explain halts entries and is
        reported. ``current``: the bar about to be stepped, whose own intents that step resumes."""
        problems = self.execution.reconcile(self.last_bar, current)
        self.needs_reconcile = bool(getattr(self.execution, "unavailable", False))
        if problems:
            self.risk.halt("reconciliation: " + "; ".join(problems))
            for problem in problems:
                self.notifier.notify("reconcile", f"RECONCILIATION MISMATCH: {problem}; entries halted until `pricelevel trader rearm`")
        for note in getattr(self.execution, "notes", ()):
            self.notifier.notify("reconcile", note)
        self._exchange_health()
        with self.store.transaction() as tx:
            self.store.put(tx, RISK, self.risk.state.to_dict())
            self.store.put(tx, EXECUTION, self.execution.to_state())
        return problems

    def _exchange_health(self) -> None:
        """Say once that the exchange went away (with the error), and once that it answers again."""
        execution = self.execution
        if not execution.records_orders:
            return
        if execution.unavailable and not self._told_down:
            self._told_down = True
            self.notifier.notify("risk", f"EXCHANGE UNAVAILABLE since {execution.down_since}: {execution.last_error}; "
                                         "positions are kept, exits are retried first when it answers")
        elif not execution.unavailable:
            since = execution.exchange_answered()
            if since is not None or self._told_down:
                self._told_down = False
                self.notifier.notify("risk", f"exchange answers again (unavailable since {since}); reconciled")

    def _stale_notes(self, bar_time: pd.Timestamp, stale: Sequence[str]) -> list[Notice]:
        """Why a symbol has no candle for this bar (the feed's reason: bad data naming its file and rows, or the
        exchange unavailable), said once per episode per symbol; and once when its candles are good again. An
        outage of the candle source is one message for all symbols, not one each."""
        problems = {p.symbol: p for p in getattr(self.feed, "problems", ())}
        notes: list[Notice] = []
        away = []
        for symbol in stale:
            problem = problems.get(symbol)
            kind = problem.kind if problem else "missing"
            if self._stale_told.get(symbol) == kind:
                continue
            self._stale_told[symbol] = kind
            if kind == "unavailable":
                away.append(symbol)
            elif kind == "stream":
                notes.append(Notice("stale", f"{symbol}: the kline stream is down or late ({problem.reason}); candles over REST"))
            elif problem is not None:
                notes.append(Notice("stale", f"{symbol}: bad market data: {problem.reason}; no decision on it until it is good"))
            else:
                notes.append(Notice("stale", f"{symbol}: no {self.timeframe} candle at {bar_time}: no decision on it"))
        if away:
            reason = problems[away[0]].reason
            notes.append(Notice("stale", f"candles unavailable for {', '.join(away)}: {reason}; waiting for the exchange"))
        for symbol in sorted(set(self._stale_told) - set(stale)):
            del self._stale_told[symbol]
            notes.append(Notice("stale", f"{symbol}: candles good again from {bar_time}"))
        return notes

    def needs_recovery(self) -> bool:
        """Between bars: the exchange was away or an exit is still under way (an exchange execution only)."""
        execution = self.execution
        return bool(execution.records_orders and (self.needs_reconcile or execution.pending_exits()))

    def recover(self, at: pd.Timestamp | None = None) -> list[str]:
        """Between bars, while :meth:`needs_recovery`: reconcile, then retry the exits still under way. The
        service calls this with a capped backoff while the exchange is away."""
        at = pd.Timestamp(at) if at is not None else pd.Timestamp.now(tz="UTC").floor("s")
        self.reconcile()
        if self.execution.unavailable:
            return []
        closed = self.execution.resume_exits(at, str(self.models.current.version))
        self.needs_reconcile = self.execution.unavailable
        with self.store.transaction() as tx:
            self.store.put(tx, EXECUTION, self.execution.to_state())
        texts = [f"closed {t.symbol} ({t.exit_reason.replace('_', ' ')}): {t.size:.6g} at {t.exit_price:.6g}, "
                 f"P&L {t.pnl:+,.2f}" for t in closed]
        for text in texts:
            self.notifier.notify("exit", text)
        self._exchange_health()
        return texts

    def watching_exits(self) -> bool:
        """Exits rest on the exchange (an exchange execution only): the service looks at them between bars."""
        return bool(getattr(self.execution, "watching", lambda: False)())

    def watch_exits(self, at: pd.Timestamp | None = None) -> list[str]:
        """Between bars: apply what the resting exits did (a take-profit or stop filled while nobody looked), cancel
        the other exit, sell what a partial fill or a refused stop left. Tells a person each trade closed."""
        at = pd.Timestamp(at) if at is not None else pd.Timestamp.now(tz="UTC").floor("s")
        closed = self.execution.watch_exits(at, str(self.models.current.version))
        self.needs_reconcile = self.needs_reconcile or self.execution.unavailable
        with self.store.transaction() as tx:
            self.store.put(tx, EXECUTION, self.execution.to_state())
        for note in self.execution.notes:
            self.notifier.notify("risk", note)
        texts = [f"closed {t.symbol} ({t.exit_reason.replace('_', ' ')}): {t.size:.6g} at {t.exit_price:.6g}, "
                 f"P&L {t.pnl:+,.2f}" for t in closed]
        for text in texts:
            self.notifier.notify("exit", text)
        return texts

    def on_bar_close(self, bar_time: pd.Timestamp, wait_for_candles: bool = False) -> BarReport:
        """Decide and execute the bar opening at ``bar_time`` (its candle closed at ``bar_time + timeframe``).

        ``wait_for_candles``: if a traded symbol's candle is missing, change nothing and return a report with
        ``waiting`` set (the service asks again until the candle is stale)."""
        bar_time = pd.Timestamp(bar_time)
        started = time.perf_counter()
        self._timings = {}
        if self.last_bar is not None and bar_time <= pd.Timestamp(self.last_bar):
            return BarReport(bar_time, self.models.current.version, {}, [], None, skipped=True)
        frames = self.feed.closed_by(bar_time + self.timeframe.delta)
        self._timings["candles"] = time.perf_counter() - started
        ohlc = bar_ohlc(frames, self.timeframe, bar_time)
        stale = sorted(set(self.models.symbols) - set(ohlc))
        if stale and wait_for_candles:
            return BarReport(bar_time, self.models.current.version, {}, [], None, skipped=True, waiting=tuple(stale))
        if self.needs_reconcile:
            self.reconcile(bar_time)
        if self.stopping.is_set():
            raise StopRequested("stopping before the bar's orders")
        clock = time.perf_counter()
        notes: list[Notice] = self._day_summary(bar_time)
        commands, forced, applied = self.apply_commands()
        notes += applied
        switch = self.models.refresh()
        if switch is not None:
            notes.append(Notice("model", self._switch(switch)))
        self._timings["model"] = time.perf_counter() - clock  # commands, and where @champion points now
        notes += self._stale_notes(bar_time, stale)
        probabilities = self.score(frames, bar_time)
        clock = time.perf_counter()
        entries, exits = self.rules.signals(np.array([probabilities.get(s, math.nan) for s in self.models.symbols]))
        positions = self.execution.positions()
        approved: dict[str, bool] = {}
        decisions: list[Decision] = []
        version = str(self.models.current.version)
        for k, symbol in enumerate(self.models.symbols):
            signal: Signal = "none"
            verdict = "no signal"
            if symbol in stale:
                signal, verdict = "stale", "no candle for this bar: no decision"
            elif entries[k] and symbol not in positions:
                refusal = self.models.entry_refusal() or self.risk.entry_refusal(
                    bar_time, self.execution.equity(), self.execution.held() + len(approved))
                signal, verdict = "entry", refusal or APPROVED
                if refusal is None:
                    approved[symbol] = True
                elif self._last_refusal.get(symbol) != refusal:  # tell once, not at every bar of a halt
                    notes.append(Notice("risk", f"{symbol} entry refused: {refusal}"))
                self._last_refusal[symbol] = refusal or ""
            elif exits[k] and symbol in positions:
                signal, verdict = "exit", APPROVED
            decisions.append(Decision(bar_time, symbol, version, probabilities.get(symbol), signal, verdict))
        if self.risk.state.kill_switch:  # flatten and stay flat until re-armed
            forced |= set(positions)
            self.execution.cancel_pending()
        exit_signals = {s: bool(exits[k]) or s in forced for k, s in enumerate(self.models.symbols)}
        decisions = [replace(d, signal="exit", verdict="forced: kill switch or force-exit")
                     if d.symbol in forced and d.symbol in positions else d for d in decisions]
        self._timings["decision"] = time.perf_counter() - clock
        clock = time.perf_counter()
        outcome = self.execution.on_bar(bar_time, ohlc, approved, exit_signals, model_version=str(self.models.current.version))
        self._timings["execution"] = time.perf_counter() - clock
        errors = list(self.execution.errors)
        unavailable = bool(getattr(self.execution, "unavailable", False))
        if not unavailable:  # an outage is said once (_exchange_health), not at every bar
            notes += [Notice("order", f"order problem: {e}") for e in errors]
        notes += [Notice("reconcile", text) for text in getattr(self.execution, "notes", ())]
        self.needs_reconcile = bool(errors)
        # The breaker counts exchange trouble only: one symbol's missing or bad candle is skipped for that bar
        # alone and must not stop entries on the others.
        feed_away = not ohlc and any(p.kind == "unavailable" for p in getattr(self.feed, "problems", ()))
        notes += [Notice("risk", text) for text in self.risk.after_bar(
            bar_time, self.timeframe.delta, outcome.equity, [t.pnl for t in outcome.closed],
            problem=bool(errors) or feed_away)]
        clock = time.perf_counter()
        self._commit(bar_time, decisions, outcome, commands)
        self._timings["persistence"] = time.perf_counter() - clock
        for fill in outcome.fills:
            kind = "order" if fill.intent in ("entry", "exit") else "exit"
            notes.append(Notice(kind, f"{fill.intent.replace('_', ' ')} {fill.symbol}: {fill.size:.6g} at {fill.price:.6g} "
                                      f"(fee {fill.fee:.4g}, {self.execution.name})"))
        told = getattr(self.execution, "told", frozenset())
        for k, trade in enumerate(outcome.closed):
            if k not in told:
                notes.append(Notice("exit", f"closed {trade.symbol} ({trade.exit_reason.replace('_', ' ')}): P&L {trade.pnl:+,.2f}"))
        for notice in notes:
            self.notifier.notify(notice.kind, notice.text)
        self._exchange_health()
        self._timings["total"] = time.perf_counter() - started
        return BarReport(bar_time, self.models.current.version, probabilities, decisions, outcome, notes,
                         timings=dict(self._timings))

    def act_between_bars(self) -> list[str]:
        """Commands queued since the last bar, applied now instead of at the next close (the service calls this
        every few seconds), each once and in order: the latches (kill, stop, start, rearm) at once, and on an
        exchange the kill switch's and force-exit's market sells at once. The paper engine fills only at a
        bar, so there the sells happen at the next close: the kill switch is latched in the risk state, and
        the symbols to force out are kept (``FORCED``) until the bar that closes them."""
        commands, forced, notes = self.apply_commands()
        if not commands:
            return []
        now_exchange = self.execution.records_orders
        closed = []
        if forced and now_exchange:
            at = pd.Timestamp(commands[-1]["at"])
            closed = self.execution.flatten(sorted(forced), at, str(self.models.current.version), "forced")
            if self.risk.state.kill_switch:
                self.execution.cancel_pending()
        version = str(self.models.current.version)
        with self.store.transaction() as tx:
            if not self.execution.records_orders:  # an exchange broker writes its trades as their fills apply
                self.store.add_trades(tx, [{**vars(t), "model_version": version} for t in closed])
            queued = self.store.get(tx, COMMANDS, [])
            self.store.put(tx, COMMANDS, [c for c in queued if c not in commands])
            if forced and not now_exchange:
                self.store.put(tx, FORCED, sorted(set(self.store.get(tx, FORCED, [])) | forced))
            self.store.put(tx, RISK, self.risk.state.to_dict())
            self.store.put(tx, EXECUTION, self.execution.to_state())
        texts = [notice.text for notice in notes] + [f"closed {t.symbol} (forced): P&L {t.pnl:+,.2f}" for t in closed]
        for notice in notes:
            self.notifier.notify(notice.kind, notice.text)
        for trade in closed:
            self.notifier.notify("exit", f"closed {trade.symbol} (forced): P&L {trade.pnl:+,.2f}")
        return texts

    def apply_commands(self) -> tuple[list[dict[str, Any]], set[str], list[Notice]]:
        """Apply the queued commands (:mod:`pricelevel.trading.control`): the commands applied (removed from the
        queue when the bar commits, so a crash before that applies them again), the symbols to close at this
        bar (with those force-exits applied between bars still hold, on paper), and what to tell a person."""
        notes: list[Notice] = []
        with self.store.transaction() as tx:
            commands = self.store.get(tx, COMMANDS, [])
            forced: set[str] = set(self.store.get(tx, FORCED, []))
        for command in commands:
            kind, by = command["kind"], command.get("by", "?")
            if kind == "kill":
                self.risk.kill(f"kill switch engaged by {by} at {command['at']}")
                forced |= set(self.execution.positions())
            elif kind == "rearm":
                self.risk.rearm()
            elif kind in ("stop", "start"):
                self.risk.state.stopped = kind == "stop"
            elif kind == "forceexit":
                forced |= set(command["symbols"] or self.execution.positions())
            notes.append(Notice("command", f"{kind} ({', '.join(command['symbols']) or 'all'}) by {by}: {self.risk.describe()}"))
        return commands, forced, notes

    def score(self, frames: Mapping[str, Mapping[Timeframe, pd.DataFrame | None]], bar_time: pd.Timestamp) -> dict[str, float]:
        """The model's probability for ``bar_time`` of every symbol that has that bar and a full window."""
        clock = time.perf_counter()
        spec, table_spec = self.spec, self.spec.table_spec()
        if any(builder.spec != table_spec for builder in self._builders.values()):
            self._builders = {}  # another model (a switch) reads other features: start over
        inputs = []
        for symbol, by_tf in frames.items():
            bars = by_tf.get(table_spec.timeframe)
            if bars is None or len(bars) < spec.seq_len or bars["timestamp"].iloc[-1] != bar_time:
                continue
            builder = self._builders.get(symbol)
            if builder is None:
                builder = self._builders[symbol] = TableBuilder(table_spec, spec.seq_len + TABLE_MARGIN)
            inputs.append(symbol_frame(symbol, builder.update(by_tf), spec.features))
        self._timings["features"] = time.perf_counter() - clock
        clock = time.perf_counter()
        probabilities = predict_at(self.models.current.predict, spec, inputs, bar_time) if inputs else {}
        self._timings["prediction"] = time.perf_counter() - clock
        return probabilities

    def _switch(self, switch: Switch) -> str:
        with self.store.transaction() as tx:
            self.store.add_switch(tx, bar_time=pd.Timestamp.now(tz="UTC"), from_version=switch.from_version,
                                  to_version=switch.to_version, accepted=int(switch.accepted), reason=switch.reason)
        if switch.accepted:
            self.execution = self.execution.with_rules(self.rules)
            return f"model switch: version {switch.from_version} -> {switch.to_version} ({switch.reason})"
        return f"model switch refused: version {switch.to_version}: {switch.reason}"

    def _commit(self, bar_time: pd.Timestamp, decisions: list[Decision], outcome: BarOutcome,
                commands: list[dict[str, Any]]) -> None:
        version = str(self.models.current.version)
        with self.store.transaction() as tx:
            self.store.add_decisions(tx, [decision.row() for decision in decisions])
            if not self.execution.records_orders:  # an exchange broker writes its own rows
                for fill in outcome.fills:
                    self.store.add_order(
                        tx, client_id=client_id(version, fill.symbol, bar_time, fill.intent), symbol=fill.symbol,
                        side="Buy" if fill.intent == "entry" else "Sell", intent=fill.intent, bar_time=bar_time,
                        model_version=version, status="FILLED", base_qty=fill.size, filled_qty=fill.size,
                        avg_price=fill.price, fee=fill.fee, message=self.execution.name)
                for symbol, intent in outcome.queued.items():
                    self.store.add_order(
                        tx, client_id=client_id(version, symbol, bar_time, f"queued-{intent}"), symbol=symbol,
                        side="Buy" if intent == "entry" else "Sell", intent=intent, bar_time=bar_time,
                        model_version=version, status="SENT", message=f"{self.execution.name}: fills at the next open")
            if not self.execution.records_orders:  # an exchange broker writes its trades as their fills apply
                self.store.add_trades(tx, [{**vars(t), "model_version": version} for t in outcome.closed])
            self.store.add_equity(tx, bar_time, outcome.equity, self.execution.cash)
            if commands:  # remove what this bar applied; commands queued meanwhile stay for the next bar
                queued = self.store.get(tx, COMMANDS, [])
                self.store.put(tx, COMMANDS, [c for c in queued if c not in commands])
            self.store.write(tx, documents.RISK, self.risk.state.to_dict())
            self.store.write(tx, documents.EXECUTION, self.execution.to_state())
            self.store.write(tx, documents.MODEL, {"uri": self.models.uri, "version": version})
            self.store.write(tx, documents.LAST_BAR, str(bar_time))
            self.store.put(tx, FORCED, [])
        self.last_bar = str(bar_time)

    def _day_summary(self, bar_time: pd.Timestamp) -> list[Notice]:
        """At the first bar of a UTC day, the previous day in one message: equity, P&L, trades, open positions."""
        if self.last_bar is None or pd.Timestamp(self.last_bar).normalize() == bar_time.normalize():
            return []
        day = pd.Timestamp(self.last_bar).normalize()
        equity, trades = self.store.frame(EQUITY), self.store.frame(TRADES)
        if not len(equity):
            return []
        stamps = pd.to_datetime(equity["bar_time"], utc=True)
        today = equity[stamps.dt.normalize() == day]
        before = equity[stamps < day]
        start = float(before["equity"].iloc[-1]) if len(before) else float(today["equity"].iloc[0])
        end = float(today["equity"].iloc[-1]) if len(today) else start
        if start <= 0:  # no account value known yet (a first start while the exchange was away)
            return []
        closed = trades[pd.to_datetime(trades["exit_time"], utc=True).dt.normalize() == day] if len(trades) else trades
        held = ", ".join(sorted(self.execution.positions())) or "none"
        return [Notice("summary", f"{day:%Y-%m-%d}: equity {end:,.2f} ({end - start:+,.2f}, {end / start - 1:+.2%}), "
                            f"{len(closed)} trades closed, open positions: {held}")]

    def replay(self, bar_times: Sequence[pd.Timestamp], on_bar: Callable[[BarReport], None] | None = None) -> int:
        """``on_bar_close`` over historical bars, in order (bars already processed are skipped)."""
        done = 0
        for bar_time in bar_times:
            report = self.on_bar_close(bar_time)
            done += not report.skipped
            if on_bar is not None:
                on_bar(report)
        return done
