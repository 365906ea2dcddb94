"""Trading on an exchange account (:class:`~pricelevel.trading.exchange.ExchangeClient`): the trader's execution
for ``testnet``, ``demo`` and ``mainnet``, with the same decision rules as the paper broker and the backtest.

**The books are what filled.** A position is the sum of the fills of its orders, nothing else: a partial entry
opens what filled; a partial exit keeps the unsold remainder as the position (its cost basis and fees pro rata)
and books P&L on what sold only, and the remainder keeps exiting (at once, then at every step) until it is flat
or dust. Each order row holds the exchange's cumulative fill (quantity, average price, fees); whenever a new
report for one of our client ids arrives, in any bar, at any time, the difference to the row is applied to the
position *in the same transaction* that updates the row, so every fill is applied exactly once whatever crashes
around it, and a closed trade is written in that transaction too (the risk counters see it once, at the next
step, through ``unreported``).

**Every order goes through the state database first** (:class:`~pricelevel.trading.state.StateStore`):

    NEW (committed, nothing sent) -> SENT (about to be sent) -> ACKED | UNKNOWN -> FILLED / PARTIAL / REJECTED / CANCELLED

Its client id is derived from (model version, symbol, bar time, intent), so processing a bar again after a
crash finds the same rows: a NEW row is sent (it never was), a SENT or UNKNOWN row is looked up at the
exchange by its client id and adopted, never sent blindly a second time. A SENT row the exchange confirms it
never saw (the process died before the request left) is sent under the same client id, which the exchange
refuses to take twice; an UNKNOWN row (sent, the answer lost) is only ever looked up. An intent of a bar that
is not being redone (the trader restarted after later closes) is never sent late: reconciliation settles it.

**The exchange may be away.** Every call on the bar path is guarded: an outage makes the step "exchange
unavailable" (``errors``/``unavailable``) instead of an exception; an exit that could not be sent stays
``exiting`` and is retried first, at the next step or as soon as the exchange answers (:meth:`resume_exits`).
Only :class:`~pricelevel.trading.exchange.CredentialsRefused` (a revoked key) escapes: the service stops on it.

**Exits rest on the exchange.** When a position opens, its take-profit goes to the exchange as a limit sell at
the rule's price (it fills inside the bar at that price, as the backtest fills it) and its stop-loss as a sell at
market from the rule's price, both as conditional orders (which hold no coins until triggered, so both can wait
on the same coins), so the position is protected between closes and while the trader or the exchange link is down. A fill of either is applied like any other (pushed, polled, or found at
reconciliation after a restart); the other one is then cancelled, and a remainder is sold at market. The time
stop, the model's exit, ``/forceexit`` and the kill switch cancel both before selling at market. At a close the
bar is still checked (a stop touched inside the bar whose resting order did not fill is sold at market then):
the resting orders are the first line, the close the backstop (docs/concepts/trader.md "Live trading").
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import pandas as pd

from pricelevel.backtest.plan import ExitReason, bar_exit, plan_position, stop_prices
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading import documents
from pricelevel.trading.exchange import (
    ExchangeClient,
    ExchangeUnavailable,
    Instrument,
    MarketOrder,
    OrderRefused,
    OrderReport,
    OrderStatus,
    RestingOrder,
    Side,
    client_id,
)
from pricelevel.trading.paper import BarOutcome, ClosedTrade, Fill
from pricelevel.trading.state import StateStore, as_utc

logger = logging.getLogger(__name__)

#: Order rows whose fate is still open.
OPEN_STATUSES = ("NEW", "SENT", "ACKED", "UNKNOWN", "PARTIAL")
#: Of those, the ones the exchange may have: their fills may still explain a difference with the wallet.
MAYBE_AT_THE_EXCHANGE = OPEN_STATUSES[1:]
#: Our client ids (:func:`~pricelevel.trading.exchange.client_id`); other orders on the account are not ours.
OUR_PREFIX = "pl-"
#: Attempts at one exit within one step: a partly filled market sell is followed at once by one for the rest.
EXIT_ATTEMPTS = 3
#: How an order of unknown fate came to be (for the row's message once it is resolved).
RESOLVED = {"UNKNOWN": "answer lost", "SENT": "sent as the process stopped", "ACKED": "taken, not yet filled",
            "PARTIAL": "partly filled"}
#: The kv document the broker keeps its books in (the trader writes the same document at every bar).
EXECUTION = "execution"
#: The intents of exits that rest on the exchange (the order rows' ``intent``, the trade's exit reason).
RESTING = ("stop_loss", "take_profit")


class StopRequested(RuntimeError):
    """The service is stopping: the step ends at this safe point (before the next order is committed)."""


@dataclass
class Position:
    """One spot holding: what its fills bought (size net of the fee Bybit takes in the coin received), what it
    cost, its stops, and, while it is being sold, why (``exiting``)."""

    size: float
    entry_price: float
    entry_time: str
    entry_fees: float  # in quote coin
    cost: float  # quote coin spent on what is still held
    stop_loss: float
    take_profit: float
    bars_held: int = 0
    last_close: float = math.nan
    entry_client_id: str = ""
    #: The exit under way ("" none): "stop_loss", "take_profit", "time_stop", "exit", "forced"; a remainder left by
    #: a partial fill or an outage keeps exiting with this reason until flat or dust.
    exiting: str = ""
    #: Base coin bought (before fees), for the average entry price of several partial fills.
    bought: float = 0.0
    #: The exits resting at the exchange (intent -> client id), and how many times they were placed (each
    #: placement has its own client ids).
    resting: dict[str, str] = field(default_factory=dict)
    placed: int = 0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Position:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class FillDelta:
    """What an order report adds to what its row already held: the fill to apply to the books."""

    qty: float
    value: float  # quote coin, qty * price summed over the new fills
    fee: float  # quote coin

    @property
    def price(self) -> float:
        return self.value / self.qty if self.qty else 0.0


def fill_delta(row: Mapping[str, Any], report: OrderReport) -> FillDelta | None:
    """The part of ``report``'s cumulative fill that ``row`` (the last recorded report) does not have yet."""
    old_qty, old_price, old_fee = float(row["filled_qty"] or 0.0), float(row["avg_price"] or 0.0), float(row["fee"] or 0.0)
    qty = report.filled_qty - old_qty
    if qty <= 1e-12:
        return None
    value = report.filled_qty * report.avg_price - old_qty * old_price
    return FillDelta(qty, max(value, 0.0), max(report.fee - old_fee, 0.0))


def bought(position: Position | None, fill: FillDelta, entry_time: str, cid: str, rules: StrategyRules,
           ref_price: float = math.nan) -> Position:
    """The position after a buy fill (a new one, or more of an open one at the average price). Its stops come from
    the one position plan (:func:`~pricelevel.backtest.plan.stop_prices`), measured from ``ref_price``, the entry
    bar's close, as the backtest measures them (the average fill price when it is not known: an adopted position)."""
    net = fill.qty - (fill.fee / fill.price if fill.price else 0.0)  # Bybit takes a buy's fee in base coin
    if position is None:
        position = Position(0.0, 0.0, entry_time, 0.0, 0.0, 0.0, math.inf, entry_client_id=cid)
    gross = position.bought + fill.qty
    cost = position.cost + fill.value
    price = cost / gross if gross else fill.price
    ref = ref_price if math.isfinite(ref_price) and ref_price > 0 else price
    sl, tp = stop_prices(ref, math.nan if not rules.sl_stop else rules.sl_stop,
                         math.nan if not rules.tp_stop else rules.tp_stop)
    sl = 0.0 if math.isnan(sl) else float(sl)  # a Position keeps 0 / inf for "off"
    tp = math.inf if math.isnan(tp) else float(tp)
    return replace(position, size=position.size + net, entry_price=price, entry_fees=position.entry_fees + fill.fee,
                   cost=cost, stop_loss=sl, take_profit=tp, bought=gross)


def sold(position: Position, fill: FillDelta, symbol: str, exit_time: pd.Timestamp, reason: str,
         dust: float) -> tuple[Position | None, ClosedTrade]:
    """The remainder after a sell fill (``None`` when what is left is ``dust`` or less) and the trade of what
    sold: its cost basis and entry fees pro rata, P&L on the sold part only (the dust's cost on the last part)."""
    part = min(fill.qty / position.size, 1.0) if position.size > 0 else 1.0
    left = position.size - fill.qty
    if left <= dust:
        part = 1.0
    cost, entry_fees = position.cost * part, position.entry_fees * part
    pnl = fill.value - fill.fee - cost
    trade = ClosedTrade(symbol, pd.Timestamp(position.entry_time), pd.Timestamp(exit_time), position.entry_price,
                        fill.price, fill.qty, pnl, entry_fees, fill.fee, reason or "exit")
    if part >= 1.0:
        return None, trade
    keep = 1.0 - part
    return replace(position, size=left, cost=position.cost * keep, entry_fees=position.entry_fees * keep,
                   bought=position.bought * keep), trade


def dust_qty(instrument: Instrument, price: float) -> float:
    """The largest holding that cannot be sold: below the minimum order value (or quantity) at ``price``."""
    by_value = instrument.min_order_amount / price if price and math.isfinite(price) and price > 0 else 0.0
    return max(by_value, instrument.min_order_qty, instrument.base_precision)


class ExchangeBroker:
    """The trader's execution on ``exchange``; ``checkpoint(stage)`` is called at every step of an order's life
    ("committed", "sent", "answered") so tests can crash the process exactly there; ``stopping`` is set by the
    service to end a step at its next safe point."""

    records_orders = True

    def __init__(
        self,
        exchange: ExchangeClient,
        store: StateStore,
        symbols: Sequence[str],
        rules: StrategyRules,
        quote_coin: str = "USDT",
        positions: Mapping[str, Position] | None = None,
        *,
        bar: pd.Timedelta | None = None,
        poll_s: float = 0.2,
        polls: int = 10,
        sleep: Callable[[float], None] = time.sleep,
        checkpoint: Callable[[str], None] = lambda stage: None,
        stopping: threading.Event | None = None,
        book: Mapping[str, Any] | None = None,
        fills: Any = None,
        resting_exits: bool = True,
        clock: Callable[[], pd.Timestamp] = lambda: pd.Timestamp.now(tz="UTC"),
    ) -> None:
        self.exchange, self.store, self.symbols, self.rules = exchange, store, tuple(symbols), rules
        self.quote_coin, self.bar = quote_coin, bar
        self.open: dict[str, Position] = dict(positions or {})
        self.poll_s, self.polls, self.sleep, self.checkpoint = poll_s, polls, sleep, checkpoint
        self.stopping = stopping or threading.Event()
        self.name = f"{exchange.name}"
        book = dict(book or {})
        #: The last quote balance read (an outage values the account with it).
        self.last_cash: float | None = book.get("last_cash")
        #: Closed trades applied since the trader last took them (persisted: a crash does not lose one).
        self.unreported: list[dict[str, Any]] = list(book.get("unreported") or [])
        #: The last exchange error and since when (``None``: the exchange answers).
        self.down_since: str | None = book.get("down_since")
        self.last_error: str | None = book.get("last_error")
        #: Coins on the account that this trader never bought, as last reported (told once per change).
        self.foreign: dict[str, float] = dict(book.get("foreign") or {})
        #: What the last reconciliation found between books and wallet, and when (for ``/status``).
        self.differences: list[str] = list(book.get("differences") or [])
        self.reconciled_at: str | None = book.get("reconciled_at")
        self._cash: float | None = None
        #: What went wrong at the last step (an exchange error or an order of unknown fate): the breaker counts it.
        self.errors: list[str] = []
        #: What the last step found worth telling a person that is no error (coins adopted, coins not ours).
        self.notes: list[str] = []
        #: The exchange could not be reached at the last step (no further call is made in that step).
        self.unavailable = False
        #: client id -> (entry bar, its close) of the entries of this step, for the position a fill opens.
        self._entry_context: dict[str, tuple[str, float]] = {}
        #: Indices in the last :meth:`take_closed` of trades already told to a person between bars.
        self.told: frozenset[int] = frozenset()
        #: Fills pushed by the exchange's private stream (:class:`~pricelevel.trading.streams.PushedFills`), each
        #: applied once by its exec id; ``None``: orders are settled by polling REST.
        self.fills = fills
        #: Put each position's take-profit and stop-loss on the exchange (``trader.resting_exits``).
        self.resting_exits, self.clock = resting_exits, clock
        #: The bar being stepped: a resting exit's fill seen during its step happened inside it.
        self._stepping: pd.Timestamp | None = None
        if fills is not None:
            fills.recover(self._record)  # pushed and stored just before a crash, never applied

    # ------------------------------------------------------------------------------------ the Execution API

    def with_rules(self, rules: StrategyRules) -> ExchangeBroker:
        """New rules for new positions (a champion hot-swap); open positions keep the stops they were opened with."""
        return ExchangeBroker(self.exchange, self.store, self.symbols, rules, self.quote_coin, self.open, bar=self.bar,
                              poll_s=self.poll_s, polls=self.polls, sleep=self.sleep, checkpoint=self.checkpoint,
                              stopping=self.stopping, book=self._book(), fills=self.fills,
                              resting_exits=self.resting_exits, clock=self.clock)

    def on_bar(
        self, bar_time: pd.Timestamp, ohlc: Mapping[str, tuple[float, float, float, float]],
        entries: Mapping[str, bool], exits: Mapping[str, bool], model_version: str = "",
    ) -> BarOutcome:
        """The bar that just closed: exits first (remainders still exiting, stops touched inside it, the time stop,
        exit signals), then the approved entries, each a market order now. Cash released by an exit can fund an
        entry of this bar. Closed trades include those applied since the last step (a fill found at start-up)."""
        self._begin_step()
        self._stepping = pd.Timestamp(bar_time)
        try:
            return self._step(bar_time, ohlc, entries, exits, model_version)
        finally:
            self._stepping = None

    def _step(self, bar_time: pd.Timestamp, ohlc: Mapping[str, tuple[float, float, float, float]],
              entries: Mapping[str, bool], exits: Mapping[str, bool], model_version: str) -> BarOutcome:
        self._watch_resting()
        fills: list[Fill] = []
        for symbol in list(self.open):
            if symbol not in self.open:  # a resting exit's fill, found just now, closed it
                continue
            position = self.open[symbol]
            if as_utc(position.entry_time) >= as_utc(bar_time):
                continue  # entered at this close (a bar redone after a restart): its stops start with the next bar
            if symbol in ohlc:
                _open, high, low, close = ohlc[symbol]
                position.bars_held = self._bars_held(position, bar_time)
                position.last_close = close
                reason = position.exiting or exit_reason(position, _open, high, low, close, bool(exits.get(symbol)),
                                                         self.rules.max_hold_bars)
            else:
                reason = position.exiting  # no candle: a remainder keeps exiting, the stops wait for the next bar
            if reason:
                fills += self._exit(symbol, bar_time, model_version, reason, "exit")
        for symbol, wanted in entries.items():
            if wanted and symbol not in self.open and symbol in ohlc and not self.unavailable:
                fill = self._buy(symbol, bar_time, model_version, close=ohlc[symbol][3])
                if fill is not None:
                    fills.append(fill)
        for symbol in list(self.open):  # new positions, adopted ones, and exits the exchange refused or dropped
            self._rest_exits(symbol, model_version)
        return BarOutcome(fills, self.take_closed(), {}, self.equity())

    def flatten(self, symbols: Sequence[str], at: pd.Timestamp, model_version: str, reason: str) -> list[ClosedTrade]:
        """Sell these positions at market now, between bars (the kill switch, ``/forceexit``); ``at`` (the
        command's time) keys the orders, so a crash and restart finds them instead of selling twice. Returns the
        trades closed now (to tell a person); the risk counters get them with the next bar."""
        self._begin_step()
        for symbol in symbols:
            if symbol in self.open:
                self._exit(symbol, at, model_version, reason, "exit")
        return self._tell_new()

    def resume_exits(self, at: pd.Timestamp, model_version: str) -> list[ClosedTrade]:
        """Between bars, after an outage or a partial fill: settle orders of unknown fate, then sell what is still
        exiting (exits are retried first, as soon as the exchange answers)."""
        self._begin_step()
        self._settle_open_rows(current=None)
        self._tidy_resting()
        for symbol, position in list(self.open.items()):
            if position.exiting and not self.unavailable:
                self._exit(symbol, at, model_version, position.exiting, "resume")
        return self._tell_new()

    def watch_exits(self, at: pd.Timestamp, model_version: str) -> list[ClosedTrade]:
        """Between bars: what the resting exits did (pushed by the private stream, else one look at the open
        orders): a fill reaches the books and its sibling is cancelled; a stop the exchange triggered but could not
        execute, or a remainder, is sold at market now. Returns the trades closed, to tell a person."""
        self._begin_step()
        self._watch_resting()
        for symbol, position in list(self.open.items()):
            if position.exiting and not self.unavailable:
                self._exit(symbol, at, model_version, position.exiting, "watch")
        return self._tell_new()

    def pending_exits(self) -> list[str]:
        return sorted(s for s, p in self.open.items() if p.exiting)

    def watching(self) -> bool:
        """Exits rest on the exchange: the service looks at them between bars."""
        return any(p.resting for p in self.open.values())

    def take_closed(self) -> list[ClosedTrade]:
        """The trades applied since the last bar (each written to the trades table when its fill was applied), for
        the risk counters; ``told`` then holds the indices of those already told between bars. The caller commits
        the books afterwards, which clears them for good."""
        closed = [_trade_of(raw) for raw in self.unreported]
        self.told = frozenset(k for k, raw in enumerate(self.unreported) if raw.get("told"))
        self.unreported = []
        return closed

    def _tell_new(self) -> list[ClosedTrade]:
        new = [raw for raw in self.unreported if not raw.get("told")]
        for raw in new:
            raw["told"] = True
        return [_trade_of(raw) for raw in new]

    @property
    def cash(self) -> float:
        """Quote coin on the account, read once per step and after every fill (the last read while it is away)."""
        if self._cash is None:
            self._balances()
        return self._cash if self._cash is not None else (self.last_cash or 0.0)

    def equity(self) -> float:
        """Quote coin plus the trader's own holdings at their last close (other coins on the account are not ours).
        While the exchange is away, the last balance read."""
        held = sum(p.size * (p.last_close if math.isfinite(p.last_close) else p.entry_price) for p in self.open.values())
        return self.cash + held

    def positions(self) -> dict[str, dict[str, float]]:
        return {s: asdict(p) for s, p in self.open.items()}

    def held(self) -> int:
        return len(self.open)

    def cancel_pending(self) -> None:
        """Cancel every open order of ours at the exchange (the kill switch)."""
        try:
            for report in self.exchange.open_orders():
                if report.client_id.startswith(OUR_PREFIX):
                    row = self._row(report.client_id)
                    if row:
                        self._record(report.client_id, self._cancel_at_exchange(row))
        except ExchangeUnavailable as exc:
            self._down(f"cancel open orders: {exc}")
        self._tidy_resting()

    def to_state(self) -> dict[str, Any]:
        return {"symbols": list(self.symbols), "positions": self.positions(), "exchange": self.name, **self._book()}

    @classmethod
    def from_state(cls, raw: Mapping[str, Any] | None, exchange: ExchangeClient, store: StateStore,
                   symbols: Sequence[str], rules: StrategyRules, **kwargs: Any) -> ExchangeBroker:
        raw = raw or {}
        positions = {s: Position.from_dict(p) for s, p in (raw.get("positions") or {}).items()}
        return cls(exchange, store, symbols, rules, positions=positions, book=raw, **kwargs)

    def status(self) -> dict[str, Any]:
        """The books beside the exchange account, for ``pricelevel trader status``: balances, open orders and
        every difference, or the error that kept the exchange from answering."""
        books = {s: p.size for s, p in self.open.items()}
        try:
            balances = self.exchange.balances()
            orders = [asdict(o) for o in self.exchange.open_orders()]
            differences = self._differences(balances, report=False)
        except ExchangeUnavailable as exc:
            return {"books": books, "exchange_error": str(exc)}
        return {"books": books, "balances": balances, "open_orders": orders,
                "differences": [d["text"] for d in differences]}

    # ------------------------------------------------------------------------------------ reconciliation

    def reconcile(self, last_bar: str | None, current: pd.Timestamp | None = None) -> list[str]:
        """Start-up, after an error and after an outage: settle every order whose fate we do not know by its client
        id (its fills reach the books, whatever bar it belonged to), then compare the wallet with the books in both
        directions. Coins our own fills bought and no fill sold are adopted as the position; coins this trader
        never bought are reported (once) and left alone; a wallet holding less than the books is a mismatch.

        ``current``: the bar about to be stepped (its intents are resumed by that step, not settled here).
        Returns the mismatches nobody can explain; the trader halts entries on any of them and says so.
        """
        self._begin_step()
        self._settle_open_rows(current)
        self._tidy_resting()
        try:
            open_orders = self.exchange.open_orders()
        except ExchangeUnavailable as exc:
            self._down(f"reconciliation: {exc}")
            return []
        balances = self._balances()
        if balances is None:
            return []
        problems = []
        for report in open_orders:
            if report.client_id.startswith(OUR_PREFIX) and self._row(report.client_id) is None:
                problems.append(f"the exchange has an open order {report.client_id} this trader never placed")
        differences = self._differences(balances, report=True)
        for difference in differences:
            if difference["kind"] == "short":
                problems.append(difference["text"])
        self.differences = [d["text"] for d in differences if d["kind"] != "adopted"]
        self.reconciled_at = str(pd.Timestamp.now(tz="UTC").floor("s"))
        self._save()
        return problems

    def _settle_open_rows(self, current: pd.Timestamp | None) -> None:
        """Look up every order of ours whose fate is open and apply what it filled, whatever bar it belongs to.
        Only the intents of ``current`` (the bar about to be redone) that the exchange has not seen are left to
        that step (it sends them); an older intent never sent is settled as never sent, not sent late."""
        with self.store.transaction() as tx:
            pending = self.store.orders(tx, OPEN_STATUSES)
        for row in pending:
            cid = row["client_id"]
            redone = current is not None and as_utc(row["bar_time"]) == as_utc(current)
            if row["status"] == "NEW":  # committed, never sent
                if not redone:
                    self._update(cid, status="CANCELLED", message="not sent: the process stopped before sending it; superseded")
                continue
            resting = row["intent"] in RESTING
            report = self._lookup(cid)
            if report is None:
                if self.unavailable:
                    return
                if row["status"] in ("SENT", "UNKNOWN") and not (redone and row["status"] == "SENT" and not resting):
                    self._update(cid, status="CANCELLED", message=f"{RESOLVED[row['status']]}; unknown to the exchange "
                                                                  "by its client id: it never reached the exchange")
                continue
            if resting:  # it waits at the exchange by design: what it filled is applied, it stays
                self._record(cid, report)
                continue
            if not report.status.final:
                report = self._cancel_rest(row["symbol"], cid, report)
            self._record(cid, report, resolution=f"{RESOLVED.get(row['status'], row['status'])}; found by client id at "
                                                 "reconciliation")

    def _differences(self, balances: Mapping[str, float], report: bool) -> list[dict[str, Any]]:
        """Books against wallet per symbol we trade: ``short`` (the wallet holds less: someone sold), ``adopted``
        (our own fills bought coins the books missed: now managed), ``foreign`` (coins this trader never bought)."""
        found = []
        with self.store.transaction() as tx:  # the order history, read once for every symbol
            history = self.store.orders(tx)
        for symbol in sorted(set(self.symbols) | set(self.open)):
            rows = [r for r in history if r["symbol"] == symbol]
            try:
                instrument = self.exchange.instrument(symbol)
            except (ExchangeUnavailable, OrderRefused) as exc:
                self._down(f"{symbol}: {exc}")
                continue
            coin = instrument.base_coin
            have = balances.get(coin, 0.0)
            position = self.open.get(symbol)
            books = position.size if position else 0.0
            price = position.last_close if position and math.isfinite(position.last_close) else _last_price(rows)
            tolerance = max(dust_qty(instrument, price) if price else instrument.base_precision, books * 1e-6)
            in_flight = any(r["status"] in MAYBE_AT_THE_EXCHANGE and r["intent"] not in RESTING for r in rows)
            if have < books - tolerance and not in_flight:  # resting exits were just looked up: their fills are in
                found.append({"kind": "short", "text": f"{symbol}: the wallet holds {have:.8g} {coin}, less than our "
                                                       f"position {books:.8g} ({books - have:.8g} missing)"})
                if report and position is not None:
                    position.size, position.cost = have, position.cost * (have / books if books else 0.0)
                    if have <= tolerance:
                        self.open.pop(symbol)
            elif have > books + tolerance:
                ours = _our_unsold(rows)
                adopt = min(have, ours) - books
                if adopt > tolerance:
                    found.append({"kind": "adopted", "text": f"{symbol}: adopted {adopt:.8g} {coin} our own orders "
                                                             f"bought and never sold (books had {books:.8g})"})
                    if report:
                        self._adopt(symbol, adopt, price, rows)
                        self.notes.append(f"reconciliation: {found[-1]['text']}")
                    books += adopt
                foreign = have - max(books, 0.0)
                if foreign > tolerance:
                    text = f"{symbol}: the wallet holds {foreign:.8g} {coin} this trader never bought: left alone"
                    found.append({"kind": "foreign", "text": text})
                    if report and abs(self.foreign.get(coin, 0.0) - foreign) > tolerance:
                        self.foreign[coin] = foreign
                        self.notes.append(f"reconciliation: {text}")
        return found

    def _adopt(self, symbol: str, qty: float, price: float | None, rows: Sequence[Mapping[str, Any]]) -> None:
        """Coins our orders bought that the books missed (a fill in a bar never stepped): ours to manage."""
        position = self.open.get(symbol)
        entries = [r for r in rows if r["side"] == Side.BUY.value and float(r["filled_qty"] or 0) > 0]
        last = entries[-1] if entries else None
        entry_price = float(last["avg_price"]) if last else (price or 0.0)
        if position is None:
            entry_time = str(as_utc(last["bar_time"])) if last else str(pd.Timestamp.now(tz="UTC"))
            fill = FillDelta(qty, qty * entry_price, 0.0)
            position = bought(None, fill, entry_time, last["client_id"] if last else "", self.rules)
            if price:
                position.last_close = price
            self.open[symbol] = position
        else:
            position.size += qty
            position.cost += qty * entry_price
            position.bought += qty

    # ------------------------------------------------------------------------------------ resting exits

    def _rest_exits(self, symbol: str, version: str) -> None:
        """Put the position's stop-loss (a conditional sell) and take-profit (a limit sell) on the exchange, for what
        the wallet holds of it; nothing while they rest, while it exits, or when the rules have neither. A level the
        exchange refuses (e.g. below its minimum order value) is checked at each close instead, and said once."""
        position = self.open.get(symbol)
        if not self.resting_exits or position is None or position.exiting or position.resting or self.unavailable:
            return
        levels = {"stop_loss": position.stop_loss if position.stop_loss > 0 else None,
                  "take_profit": position.take_profit if math.isfinite(position.take_profit) else None}
        if not any(levels.values()) or position.placed < 0:
            return
        holding = self._holding(symbol, "resting exits")
        if holding is None:
            return
        instrument, balances = holding
        qty = instrument.round_qty(min(position.size, balances.get(instrument.base_coin, 0.0)))
        placed = position.placed + 1
        for intent, price in levels.items():
            if price is None or symbol not in self.open or self.unavailable:
                continue
            cid = client_id(version, symbol, pd.Timestamp(position.entry_time), f"{intent}{placed}")
            try:
                order = (RestingOrder(cid, symbol, qty, trigger_price=price) if intent == "stop_loss"
                         else RestingOrder(cid, symbol, qty, limit_price=price, trigger_price=price))
            except ValueError as exc:  # nothing to sell after rounding
                self.notes.append(f"{symbol}: no resting {intent.replace('_', '-')}: {exc}")
                continue
            self._send_resting(order, intent, position, placed, version)
        if position.resting:
            position.placed = placed
        else:
            position.placed = -1  # none would rest: the close checks the levels, no further attempt
        self._save()

    def _send_resting(self, order: RestingOrder, intent: str, position: Position, placed: int, version: str) -> None:
        """Commit the row and the position's pointer to it in one transaction, then send: a crash anywhere leaves
        an order the books know (looked up at reconciliation), never an orphan nobody cancels."""
        if self.stopping.is_set():
            raise StopRequested("stopping: no new order")
        cid = order.client_id
        with self.store.transaction() as tx:
            if self.store.order(tx, cid) is None:
                self.store.add_order(
                    tx, client_id=cid, symbol=order.symbol, side=Side.SELL.value, intent=intent,
                    bar_time=pd.Timestamp(position.entry_time), model_version=version, status="NEW", quote_amount=None,
                    base_qty=order.base_qty, filled_qty=0.0, avg_price=0.0, fee=0.0,
                    message=f"{intent.replace('_', '-')} resting at {order.price:.8g} (placement {placed})")
            position.resting[intent] = cid
            self.store.put(tx, EXECUTION, self.to_state())
        self.checkpoint("committed")
        self._update(cid, status="SENT")
        try:
            answer = self.exchange.place_resting_order(order)
        except OrderRefused as exc:
            self._update(cid, status="REJECTED", message=str(exc)[:500])
            position.resting.pop(intent, None)
            self.notes.append(f"{order.symbol}: the {intent.replace('_', '-')} could not rest at the exchange "
                              f"({str(exc).splitlines()[0][:200]}); it is checked at each close instead")
            return
        except ExchangeUnavailable as exc:
            self._update(cid, status="UNKNOWN", message=f"answer lost: {exc}"[:500])
            found = self._lookup(cid)
            if found is None:
                self._down(f"{order.symbol} {intent}: outcome unknown ({exc}); looked up again at reconciliation")
                return
            answer = found
        self._record(cid, answer)

    def _watch_resting(self) -> None:
        """Bring the resting exits' rows up to date (the private stream pushes them; without it, one look at the
        open orders and a lookup of each one no longer open), then act on what they did (:meth:`_tidy_resting`)."""
        with self.store.transaction() as tx:
            rows = [r for r in self.store.orders(tx, OPEN_STATUSES) if r["intent"] in RESTING]
        if rows and not (self.fills is not None and self.fills.up) and not self.unavailable:
            try:
                still_open = {r.client_id: r for r in self.exchange.open_orders()}
            except ExchangeUnavailable as exc:
                self._down(f"resting exits: {exc}")
                return
            for row in rows:
                report = still_open.get(row["client_id"]) or self._lookup(row["client_id"])
                if report is not None:
                    self._record(row["client_id"], report)
        self._tidy_resting()

    def _tidy_resting(self) -> None:
        """After the resting exits' rows changed: an exit that filled (even in part) takes its sibling with it; a
        stop the exchange triggered but refused to execute (its coins held by the take-profit) is a stop-loss
        exit at market now; one cancelled by someone else is dropped (placed again at the next step)."""
        with self.store.transaction() as tx:  # the open resting rows and those a position points to, not the history
            rows = {r["client_id"]: r for r in self.store.orders(tx, OPEN_STATUSES) if r["intent"] in RESTING}
            for position in self.open.values():
                for cid in position.resting.values():
                    if cid not in rows and (row := self.store.order(tx, cid)) is not None:
                        rows[cid] = row
        pointed = set()
        changed = False
        for symbol, position in self.open.items():
            for intent, cid in list(position.resting.items()):
                row = rows.get(cid)
                if position.exiting or row is None or OrderStatus(row["status"]).final:
                    position.resting.pop(intent)
                    changed = True
                    if row is not None and row["status"] == "REJECTED" and intent == "stop_loss" and not position.exiting:
                        position.exiting = "stop_loss"
                        self.notes.append(f"{symbol}: the exchange triggered the stop-loss but did not execute it "
                                          f"({row['message'] or 'refused'}): selling at market")
                    elif row is not None and row["status"] == "CANCELLED" and not position.exiting:
                        position.placed = max(position.placed, 0)  # dropped at the exchange: placed again
                else:
                    pointed.add(cid)
        orphans = [r for cid, r in rows.items() if r["status"] in MAYBE_AT_THE_EXCHANGE and cid not in pointed]
        for row in orphans:  # the sibling of an exit that filled, or an exit of a position now closed
            if self.unavailable:
                break
            self._record(row["client_id"], self._cancel_at_exchange(row), "cancelled: the other exit filled or the "
                                                                          "position closed")
        if changed:
            self._save()

    def _cancel_resting(self, symbol: str) -> bool:
        """Cancel the position's resting exits before it is sold at market (a fill racing the cancel is applied);
        False while the exchange is away (nothing may be sold twice)."""
        position = self.open.get(symbol)
        if position is None or not position.resting:
            return True
        for intent, cid in list(position.resting.items()):
            row = self._row(cid)
            if row is not None and row["status"] in MAYBE_AT_THE_EXCHANGE:
                report = self._cancel_at_exchange(row)
                if self.unavailable:
                    return False
                self._record(cid, report, f"cancelled before the {position.exiting.replace('_', ' ') or 'exit'}")
            if symbol in self.open:
                self.open[symbol].resting.pop(intent, None)
        self._save()
        return True

    def _cancel_at_exchange(self, row: Mapping[str, Any]) -> OrderReport:
        """Cancel one of our orders by client id, as Bybit spot files it: a resting exit that has not triggered
        under the conditional orders, anything else (a triggered one included) under the active ones."""
        cid, symbol = row["client_id"], row["symbol"]
        report = _report_of(row)
        try:
            for conditional in ((True, False) if row["intent"] in RESTING else (False,)):
                report = self.exchange.cancel_order(symbol, cid, conditional=conditional)
                if report.status.final:
                    break
        except ExchangeUnavailable as exc:
            self._down(f"{symbol}: cancelling {cid}: {exc}")
        except OrderRefused as exc:
            self.errors.append(f"{symbol}: cancelling {cid}: {exc}")
        return report

    # ------------------------------------------------------------------------------------ orders

    def _buy(self, symbol: str, bar_time: pd.Timestamp, version: str, close: float) -> Fill | None:
        # Sized by the one position plan (the backtest's); Bybit takes a buy's fee in base coin, so none here.
        plan = plan_position(self.rules, close, equity=self.equity(), cash=self.cash, fees=0.0)
        if plan.refused is not None:
            return None
        amount = plan.value
        cid = client_id(version, symbol, bar_time, "entry")
        report = self._execute(MarketOrder(cid, symbol, Side.BUY, quote_amount=amount), bar_time, version, "entry",
                               last_close=close)
        position = self.open.get(symbol)
        if report is None or report.filled_qty <= 0 or position is None:
            return None
        return Fill(symbol, "entry", position.size, position.entry_price, position.entry_fees)

    def _exit(self, symbol: str, at: pd.Timestamp, version: str, reason: str, intent: str) -> list[Fill]:
        """Sell the position until it is flat or dust: a partial fill is followed at once by an order for the rest
        (up to ``EXIT_ATTEMPTS`` in one step; what is left keeps exiting at the next step)."""
        position = self.open[symbol]
        if position.exiting != reason:
            position.exiting = reason
            self._save()
        if not self._cancel_resting(symbol) or symbol not in self.open:
            return []  # the exchange is away (the exit waits), or a resting exit's fill just closed the position
        fills = []
        for attempt in range(EXIT_ATTEMPTS):
            if symbol not in self.open or self.unavailable:
                break
            position = self.open[symbol]
            holding = self._holding(symbol, reason)
            if holding is None:
                break
            instrument, balances = holding
            self._cash = balances.get(self.quote_coin, 0.0)
            price = position.last_close if math.isfinite(position.last_close) else position.entry_price
            qty = instrument.round_qty(min(position.size, balances.get(instrument.base_coin, 0.0)))
            if qty <= 0 or qty * price < instrument.min_order_amount or qty < instrument.min_order_qty:
                self._write_off(symbol, at, version, reason, instrument)
                break
            name = intent if attempt == 0 else f"{intent}{attempt}"
            cid = client_id(version, symbol, at, name)
            before = position.size
            report = self._execute(MarketOrder(cid, symbol, Side.SELL, base_qty=qty, price_hint=price), at, version, "exit", reason)
            if report is not None and report.filled_qty > 0:
                fills.append(Fill(symbol, reason, min(report.filled_qty, before), report.avg_price, report.fee))
            if report is None or report.status is OrderStatus.REJECTED or (symbol in self.open and self.open[symbol].size >= before):
                break  # nothing sold this time: try again at the next step
        return fills

    def _write_off(self, symbol: str, at: pd.Timestamp, version: str, reason: str, instrument: Instrument) -> None:
        """What is left cannot be sold (below the exchange's minimum): the position ends, its cost is a loss."""
        position = self.open.get(symbol)
        if position is None:
            return
        trade = ClosedTrade(symbol, pd.Timestamp(position.entry_time), pd.Timestamp(at), position.entry_price,
                            position.last_close if math.isfinite(position.last_close) else 0.0, position.size,
                            -position.cost, position.entry_fees, 0.0, reason or "exit")
        with self.store.transaction() as tx:
            self.open.pop(symbol)
            if position.size > 0 and position.cost > 0:
                self.store.add_trades(tx, [{**asdict_trade(trade), "model_version": version}])
                self.unreported.append(asdict_trade(trade))
            self.store.put(tx, EXECUTION, self.to_state())
        logger.info(f"{symbol}: {position.size:.8g} {instrument.base_coin} left is below the minimum order: written off")

    def _execute(self, order: MarketOrder, bar_time: pd.Timestamp, version: str, intent: str,
                 reason: str = "", last_close: float = math.nan) -> OrderReport | None:
        """One order through its whole life, resumable at every step (see the module docstring)."""
        row = self._row(order.client_id)
        if row is None:
            if self.stopping.is_set():
                raise StopRequested("stopping: no new order")
            with self.store.transaction() as tx:
                self.store.add_order(
                    tx, client_id=order.client_id, symbol=order.symbol, side=order.side.value, intent=intent,
                    bar_time=bar_time, model_version=version, status="NEW", quote_amount=order.quote_amount,
                    base_qty=order.base_qty, filled_qty=0.0, avg_price=0.0, fee=0.0, message=reason)
                self.store.put(tx, EXECUTION, self.to_state())
            self.checkpoint("committed")
            row = self._row(order.client_id)
        self._entry_context[order.client_id] = (str(bar_time), last_close)
        status = row["status"]
        if status == "SENT":  # a crash between marking and answer: did the request ever arrive?
            found = self._lookup(order.client_id)
            if found is not None:
                return self._settle(order, found, "SENT before a restart; found by client id")
            if self.unavailable:
                return None
            status = "NEW"  # the exchange never saw it: sending it now is its first arrival
        if status == "NEW":
            self._update(order.client_id, status="SENT")
            self.checkpoint("sent")
            try:
                answer = self.exchange.place_market_order(order)
            except OrderRefused as exc:
                self._update(order.client_id, status="REJECTED", message=str(exc)[:500])
                self.errors.append(f"{order.symbol} {intent} refused: {exc}")
                return None
            except ExchangeUnavailable as exc:
                self._update(order.client_id, status="UNKNOWN", message=f"answer lost: {exc}"[:500])
                self.checkpoint("answered")
                found = self._lookup(order.client_id)
                if found is None:
                    self._down(f"{order.symbol} {intent}: outcome unknown ({exc}); looked up again at reconciliation")
                    return None
                return self._settle(order, found, "answer lost; found by client id")
            self._record(order.client_id, answer)
            self.checkpoint("answered")
            return self._settle(order, answer)
        if status in ("ACKED", "UNKNOWN", "PARTIAL"):
            found = self._lookup(order.client_id)
            return self._settle(order, found, f"{status} before a restart; found by client id") if found else None
        return _report_of(row) if status == "FILLED" or (status == "CANCELLED" and row["filled_qty"] > 0) else None

    def _settle(self, order: MarketOrder, report: OrderReport, resolution: str = "") -> OrderReport | None:
        """Wait for a final state (a market order is quick); a partial fill's remainder is cancelled. Every report
        on the way is recorded, so its fills reach the books once."""
        self._record(order.client_id, report, resolution)
        for _ in range(self.polls):
            if report.status.final or self.stopping.is_set():
                break
            if self.fills is not None and self.fills.up:  # pushed by the private stream: no polling
                self.fills.apply(self._record, timeout_s=self.poll_s)
                report = _report_of(self._row(order.client_id))
                continue
            self.sleep(self.poll_s)  # the private stream is down (or not used): REST as before
            report = self._lookup(order.client_id) or report
            self._record(order.client_id, report, resolution)
        if not report.status.final:
            report = self._cancel_rest(order.symbol, order.client_id, report)
        self._record(order.client_id, report, resolution)
        self._cash = None
        if report.status is OrderStatus.REJECTED:
            self.errors.append(f"{order.symbol}: {order.client_id} rejected: {report.message}")
        return report if report.filled_qty > 0 else None

    def _holding(self, symbol: str, what: str) -> tuple[Instrument, dict[str, float]] | None:
        """The symbol's rules and the wallet, read before selling it; ``None`` (said) when the exchange is away or
        refuses the symbol."""
        try:
            return self.exchange.instrument(symbol), self.exchange.balances()
        except ExchangeUnavailable as exc:
            self._down(f"{symbol} {what}: {exc}")
        except OrderRefused as exc:
            self.errors.append(f"{symbol} {what}: {exc}")
        return None

    def _cancel_rest(self, symbol: str, cid: str, report: OrderReport) -> OrderReport:
        if self.unavailable:
            return report
        try:
            cancelled = self.exchange.cancel_order(symbol, cid)
            return self._lookup(cid) or cancelled
        except ExchangeUnavailable as exc:
            self._down(f"{symbol}: cancelling the rest of {cid}: {exc}")
            return report

    def _lookup(self, cid: str) -> OrderReport | None:
        if self.unavailable:
            return None
        try:
            return self.exchange.query_order(cid)
        except ExchangeUnavailable as exc:
            self._down(f"looking up {cid}: {exc}")
            return None

    def _balances(self) -> dict[str, float] | None:
        if self.unavailable:
            return None
        try:
            balances = self.exchange.balances()
        except ExchangeUnavailable as exc:
            self._down(f"wallet balance: {exc}")
            return None
        self._cash = self.last_cash = balances.get(self.quote_coin, 0.0)
        return balances

    # ------------------------------------------------------------------------------------ books and rows

    def _begin_step(self) -> None:
        self.errors, self.notes, self.unavailable, self._cash = [], [], False, None
        self._entry_context = {}
        if self.fills is not None:
            self.fills.apply(self._record)  # what the private stream pushed since the last step

    def _down(self, message: str) -> None:
        self.errors.append(message)
        self.unavailable = True
        self.last_error = message[:500]
        if self.down_since is None:
            self.down_since = str(pd.Timestamp.now(tz="UTC"))

    def exchange_answered(self) -> str | None:
        """After a step that reached the exchange: clear the outage, returning since when it lasted (or ``None``)."""
        if self.unavailable or self.down_since is None:
            return None
        since, self.down_since = self.down_since, None
        return since

    def _bars_held(self, position: Position, bar_time: pd.Timestamp) -> int:
        """Bars since the entry bar, by the clock (a restart after several closes counts them all), as the engine's
        time stop counts them (its due bar is a bar index, not a count of candles seen)."""
        if self.bar is None:
            return position.bars_held + 1
        return max(int((pd.Timestamp(bar_time) - pd.Timestamp(position.entry_time)) / self.bar), 0)

    def _record(self, cid: str, report: OrderReport, resolution: str = "") -> None:
        """Store the exchange's report and apply what it adds to the books, in one transaction: a fill is applied
        exactly once whatever crashes around it."""
        with self.store.transaction() as tx:
            row = self.store.order(tx, cid)
            if row is None:
                return
            delta = fill_delta(row, report)
            message = "; ".join(m for m in (resolution, report.message) if m)
            self.store.update_order(tx, cid, status=report.status.value, exchange_id=report.exchange_id,
                                    filled_qty=max(report.filled_qty, float(row["filled_qty"] or 0.0)),
                                    avg_price=report.avg_price or row["avg_price"], fee=max(report.fee, float(row["fee"] or 0.0)),
                                    **({"message": message[:500]} if message else {}))
            if delta is not None:
                trade = self._apply(row, delta)
                if trade is not None:
                    self.store.add_trades(tx, [{**asdict_trade(trade), "model_version": row["model_version"]}])
                self.store.put(tx, EXECUTION, self.to_state())

    def _apply(self, row: Mapping[str, Any], delta: FillDelta) -> ClosedTrade | None:
        symbol = row["symbol"]
        if row["side"] == Side.BUY.value:
            entry_time, close = self._entry_context.get(row["client_id"], (str(as_utc(row["bar_time"])), math.nan))
            position = bought(self.open.get(symbol), delta, entry_time, row["client_id"], self.rules, ref_price=close)
            if math.isfinite(close):
                position.last_close = close
            elif not math.isfinite(position.last_close):
                position.last_close = delta.price
            self.open[symbol] = position
            return None
        position = self.open.get(symbol)
        if position is None:
            logger.warning(f"{symbol}: a sell fill of {delta.qty:.8g} with no position on the books (checked at reconciliation)")
            return None
        try:
            instrument = self.exchange.instrument(symbol)
            dust = dust_qty(instrument, delta.price)
        except (ExchangeUnavailable, OrderRefused):
            dust = 0.0
        resting = row["intent"] in RESTING
        reason = row["intent"] if resting else (position.exiting or "exit")
        exit_time = self._resting_exit_time() if resting else as_utc(row["bar_time"])
        remainder, trade = sold(position, delta, symbol, exit_time, reason, dust)
        if remainder is None:
            self.open.pop(symbol)
        else:
            if resting:  # the exit has begun at the exchange: the rest is sold at market, the sibling cancelled
                remainder.exiting = reason
            self.open[symbol] = remainder
        self.unreported.append(asdict_trade(trade))
        return trade

    def _resting_exit_time(self) -> pd.Timestamp:
        """The bar a resting exit filled in, as the backtest dates an exit (the bar's open time): the bar being
        stepped when its fill is seen at that bar's close, else the bar the clock is in (seen between bars)."""
        if self._stepping is not None:
            return self._stepping
        now = as_utc(self.clock())
        return now.floor(self.bar) if self.bar is not None else now

    def _book(self) -> dict[str, Any]:
        return {"last_cash": self.last_cash, "unreported": self.unreported, "down_since": self.down_since,
                "last_error": self.last_error, "foreign": self.foreign, "differences": self.differences,
                "reconciled_at": self.reconciled_at}

    def _save(self) -> None:
        with self.store.transaction() as tx:
            self.store.write(tx, documents.EXECUTION, self.to_state())

    def _row(self, cid: str) -> dict[str, Any] | None:
        with self.store.transaction() as tx:
            return self.store.order(tx, cid)

    def _update(self, cid: str, **values: Any) -> None:
        with self.store.transaction() as tx:
            self.store.update_order(tx, cid, **values)


def account_status(store: StateStore, exchange: ExchangeClient) -> dict[str, Any]:
    """The books (the state database) beside the exchange account: balances, open orders and every difference,
    for ``pricelevel trader status`` and ``/status`` in an exchange mode (the service need not run)."""
    with store.transaction() as tx:
        document = store.read(tx, documents.EXECUTION)
    saved = document.model_dump() if document else {}
    symbols = tuple(saved.get("symbols") or ())
    broker = ExchangeBroker.from_state(saved, exchange, store, symbols, StrategyRules(threshold=0.5))
    return broker.status()


def exit_reason(position: Position, open_: float, high: float, low: float, close: float, signal: bool,
                max_hold_bars: int | None) -> str | None:
    """Why a position exits at this bar's close (``None``: it stays), by the one position plan's rule
    (:func:`~pricelevel.backtest.plan.bar_exit`, the engine's): the stop-loss wins over the take-profit, then the
    time stop, then the model's exit signal."""
    reason, _price = bar_exit(open_, high, low, close, position.stop_loss, position.take_profit, position.bars_held,
                              max_hold_bars, signal)
    return None if reason is None else ("exit" if reason is ExitReason.SIGNAL else reason.label)


def _our_unsold(rows: Sequence[Mapping[str, Any]]) -> float:
    """Coins one symbol's order rows bought (net of the fee taken in base coin) and none sold, over its history."""
    net = 0.0
    for row in rows:
        qty, price, fee = float(row["filled_qty"] or 0.0), float(row["avg_price"] or 0.0), float(row["fee"] or 0.0)
        if qty > 0:
            net += qty - (fee / price if price else 0.0) if row["side"] == Side.BUY.value else -qty
    return max(net, 0.0)


def _last_price(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The last price one symbol's orders filled at (``None``: none filled)."""
    prices = [float(r["avg_price"]) for r in rows if float(r["avg_price"] or 0) > 0]
    return prices[-1] if prices else None


def asdict_trade(trade: ClosedTrade) -> dict[str, Any]:
    return {f.name: getattr(trade, f.name) for f in fields(trade)}


def _trade_of(raw: Mapping[str, Any]) -> ClosedTrade:
    values = {k: v for k, v in raw.items() if k != "told"}
    values["entry_time"], values["exit_time"] = pd.Timestamp(values["entry_time"]), pd.Timestamp(values["exit_time"])
    return ClosedTrade(**{f.name: values[f.name] for f in fields(ClosedTrade)})


def _report_of(row: Mapping[str, Any]) -> OrderReport:
    return OrderReport(row["client_id"], OrderStatus(row["status"]), row["exchange_id"], float(row["filled_qty"]),
                       float(row["avg_price"]), float(row["fee"]), row["message"] or "")

