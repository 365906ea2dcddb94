"""Trading on an exchange account (:class:`~pricelevel.trading.exchange.ExchangeClient`): the trader's execution
for ``testnet``, ``demo`` and ``mainnet``, with the same decision rules as the paper broker and the backtest.

Every order goes through the state database first (:class:`~pricelevel.trading.state.StateStore`):

    NEW (committed, nothing sent) -> SENT (about to be sent) -> ACKED | UNKNOWN -> FILLED / PARTIAL / REJECTED / CANCELLED

Its client id is derived from (model version, symbol, bar time, intent), so processing a bar again after a
crash finds the same rows: a NEW row is sent (it never was), a SENT or UNKNOWN row is looked up at the
exchange by its client id and adopted, never sent blindly a second time. A SENT row the exchange confirms it
never saw (the process died before the request left) is sent under the same client id, which the exchange
refuses to take twice; an UNKNOWN row (sent, the answer lost) is only ever looked up.

Exits on an exchange are market orders at a bar's close: a stop-loss or take-profit touched inside the bar
(its low or high), the time stop, or the model's exit signal. The paper engine fills a stop at the stop price
inside the bar; here the fill is the next market price, usually a little worse (README "Live trading").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.exchange import (
    ExchangeClient,
    ExchangeUnavailable,
    MarketOrder,
    OrderRefused,
    OrderReport,
    OrderStatus,
    Side,
    client_id,
)
from pricelevel.trading.paper import BarOutcome, ClosedTrade, Fill
from pricelevel.trading.risk import position_value
from pricelevel.trading.state import StateStore, as_utc

logger = logging.getLogger(__name__)

#: Order rows whose fate is still open.
OPEN_STATUSES = ("NEW", "SENT", "ACKED", "UNKNOWN", "PARTIAL")
#: Our client ids (:func:`~pricelevel.trading.exchange.client_id`); other orders on the account are not ours.
OUR_PREFIX = "pl-"


@dataclass
class Position:
    """One spot holding the trader opened: what it paid, its stops and how long it has been held."""

    size: float  # base coin received, net of the fee Bybit takes in the received coin
    entry_price: float
    entry_time: str
    entry_fees: float  # in quote coin
    cost: float  # quote coin spent
    stop_loss: float
    take_profit: float
    bars_held: int = 0
    last_close: float = math.nan
    entry_client_id: str = ""


class ExchangeBroker:
    """The trader's execution on ``exchange``; ``checkpoint(stage)`` is called at every step of an order's life
    ("committed", "sent", "answered") so tests can crash the process exactly there."""

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
        poll_s: float = 0.2,
        polls: int = 10,
        sleep: Callable[[float], None] = time.sleep,
        checkpoint: Callable[[str], None] = lambda stage: None,
    ) -> None:
        self.exchange, self.store, self.symbols, self.rules = exchange, store, tuple(symbols), rules
        self.quote_coin = quote_coin
        self.open: dict[str, Position] = dict(positions or {})
        self.poll_s, self.polls, self.sleep, self.checkpoint = poll_s, polls, sleep, checkpoint
        self.name = f"{exchange.name}"
        self._cash: float | None = None
        #: What went wrong at the last bar (an exchange error or an order of unknown fate): the breaker counts it.
        self.errors: list[str] = []

    # ------------------------------------------------------------------------------------ the Execution API

    def with_rules(self, rules: StrategyRules) -> ExchangeBroker:
        """New rules for new positions (a champion hot-swap); open positions keep the stops they were opened with."""
        return ExchangeBroker(self.exchange, self.store, self.symbols, rules, self.quote_coin, self.open,
                              poll_s=self.poll_s, polls=self.polls, sleep=self.sleep, checkpoint=self.checkpoint)

    def on_bar(
        self, bar_time: pd.Timestamp, ohlc: Mapping[str, tuple[float, float, float, float]],
        entries: Mapping[str, bool], exits: Mapping[str, bool], model_version: str = "",
    ) -> BarOutcome:
        """The bar that just closed: exits first (stops touched inside it, the time stop, exit signals), then the
        approved entries, each a market order now. Cash released by an exit can fund an entry of this bar."""
        self.errors = []
        self._cash = None  # read the account once per bar, and again after every fill
        fills: list[Fill] = []
        closed: list[ClosedTrade] = []
        for symbol in list(self.open):
            if symbol not in ohlc:
                continue  # no candle: nothing known about this bar; the stops are checked at the next one
            position = self.open[symbol]
            _open, high, low, close = ohlc[symbol]
            position.bars_held += 1
            position.last_close = close
            reason = exit_reason(position, high, low, bool(exits.get(symbol)), self.rules.max_hold_bars)
            if reason:
                trade = self._sell(symbol, bar_time, model_version, reason)
                if trade is not None:
                    closed.append(trade)
                    fills.append(Fill(symbol, reason, trade.size, trade.exit_price, trade.exit_fees))
        for symbol, wanted in entries.items():
            if wanted and symbol not in self.open and symbol in ohlc:
                position = self._buy(symbol, bar_time, model_version, close=ohlc[symbol][3])
                if position is not None:
                    fills.append(Fill(symbol, "entry", position.size, position.entry_price, position.entry_fees))
        return BarOutcome(fills, closed, {}, self.equity())

    def flatten(self, symbols: Sequence[str], at: pd.Timestamp, model_version: str, reason: str) -> list[ClosedTrade]:
        """Sell these positions at market now, between bars (the kill switch, ``/forceexit``); ``at`` (the
        command's time) keys the orders, so a crash and restart finds them instead of selling twice."""
        self.errors = []
        closed = []
        for symbol in symbols:
            if symbol in self.open:
                trade = self._sell(symbol, at, model_version, reason)
                if trade is not None:
                    closed.append(trade)
        return closed

    @property
    def cash(self) -> float:
        if self._cash is None:
            self._cash = self._balances().get(self.quote_coin, 0.0)
        return self._cash

    def equity(self) -> float:
        """Quote coin plus the trader's own holdings at their last close (other coins on the account are not ours)."""
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
                    symbol = row["symbol"] if row else None
                    if symbol:
                        self._record(report.client_id, self.exchange.cancel_order(symbol, report.client_id))
        except ExchangeUnavailable as exc:
            self.errors.append(f"cancel open orders: {exc}")

    def to_state(self) -> dict[str, Any]:
        return {"symbols": list(self.symbols), "positions": self.positions(), "exchange": self.name}

    @classmethod
    def from_state(cls, raw: Mapping[str, Any] | None, exchange: ExchangeClient, store: StateStore,
                   symbols: Sequence[str], rules: StrategyRules, **kwargs: Any) -> ExchangeBroker:
        positions = {s: Position(**p) for s, p in ((raw or {}).get("positions") or {}).items()}
        return cls(exchange, store, symbols, rules, positions=positions, **kwargs)

    # ------------------------------------------------------------------------------------ reconciliation

    def reconcile(self, last_bar: str | None) -> list[str]:
        """Start-up and after an error: settle every order whose fate we do not know by its client id, adopt the
        fills of bars already committed, and compare the account with what we think we hold.

        Returns the mismatches nobody can explain (an order of ours the database does not know, a holding
        smaller than our position); the trader halts entries on any of them and says so.
        """
        problems: list[str] = []
        committed = pd.Timestamp(last_bar) if last_bar else None
        with self.store.transaction() as tx:
            pending = self.store.orders(tx, OPEN_STATUSES)
        for row in pending:
            report = self._lookup(row["client_id"])
            if report is None:
                if row["status"] == "UNKNOWN" and committed is not None and as_utc(row["bar_time"]) < committed:
                    self._update(row["client_id"], status="CANCELLED", message="never reached the exchange (no order with this client id)")
                continue
            self._record(row["client_id"], report)
            if committed is not None and as_utc(row["bar_time"]) <= committed and report.status.final:
                self._adopt(row, report)  # filled while we were down or while its answer was lost
        try:
            open_orders = self.exchange.open_orders()
            balances = self._balances()
        except ExchangeUnavailable as exc:
            return [f"the exchange could not be read for reconciliation: {exc}"]
        for report in open_orders:
            if report.client_id.startswith(OUR_PREFIX) and self._row(report.client_id) is None:
                problems.append(f"the exchange has an open order {report.client_id} this trader never placed")
        with self.store.transaction() as tx:
            settled = self.store.orders(tx)
        # Orders of the bar being redone (after a crash) filled already: that bar adopts them when it is redone.
        redone = {row["symbol"] for row in settled if row["filled_qty"] > 0
                  and (committed is None or as_utc(row["bar_time"]) > committed)}
        for symbol, position in self.open.items():
            coin = self.exchange.instrument(symbol).base_coin
            have = balances.get(coin, 0.0)
            if symbol not in redone and have < position.size * (1 - 1e-6):
                problems.append(f"{symbol}: the wallet holds {have:.8g} {coin}, less than our position {position.size:.8g}")
        return problems

    def _adopt(self, row: Mapping[str, Any], report: OrderReport) -> None:
        """Apply a now-known fill of an already committed bar to the positions."""
        symbol = row["symbol"]
        if report.filled_qty <= 0:
            return
        if row["intent"] == "entry" and symbol not in self.open:
            self.open[symbol] = self._position(report, str(as_utc(row["bar_time"])), row["client_id"])
        elif row["intent"] == "exit" and symbol in self.open:
            self.open.pop(symbol)

    # ------------------------------------------------------------------------------------ orders

    def _buy(self, symbol: str, bar_time: pd.Timestamp, version: str, close: float) -> Position | None:
        equity = self.equity()
        value = position_value(equity, self.rules.sl_stop, self.rules.risk, self.rules.fraction) \
            if self.rules.sizing == "risk" else self.rules.fraction * equity
        amount = min(value, self.cash)
        cid = client_id(version, symbol, bar_time, "entry")
        report = self._execute(MarketOrder(cid, symbol, Side.BUY, quote_amount=amount), bar_time, version, "entry")
        if report is None or report.filled_qty <= 0:
            return None
        position = self._position(report, str(bar_time), cid)
        position.last_close = close
        self.open[symbol] = position
        return position

    def _sell(self, symbol: str, bar_time: pd.Timestamp, version: str, reason: str) -> ClosedTrade | None:
        position = self.open[symbol]
        coin = self.exchange.instrument(symbol).base_coin
        qty = min(position.size, self._balances().get(coin, position.size))
        cid = client_id(version, symbol, bar_time, "exit")
        report = self._execute(MarketOrder(cid, symbol, Side.SELL, base_qty=qty), bar_time, version, "exit", reason)
        if report is None or report.filled_qty <= 0:
            return None
        self.open.pop(symbol)
        received = report.filled_qty * report.avg_price - report.fee
        return ClosedTrade(symbol, pd.Timestamp(position.entry_time), pd.Timestamp(bar_time), position.entry_price,
                           report.avg_price, position.size, received - position.cost, position.entry_fees, report.fee, reason)

    def _position(self, report: OrderReport, entry_time: str, cid: str) -> Position:
        price = report.avg_price
        size = report.filled_qty - (report.fee / price if price else 0.0)  # Bybit takes a buy's fee in base coin
        sl = price * (1 - self.rules.sl_stop) if self.rules.sl_stop else 0.0
        tp = price * (1 + self.rules.tp_stop) if self.rules.tp_stop else math.inf
        return Position(size, price, entry_time, report.fee, report.filled_qty * price, sl, tp, entry_client_id=cid)

    def _execute(self, order: MarketOrder, bar_time: pd.Timestamp, version: str, intent: str,
                 reason: str = "") -> OrderReport | None:
        """One order through its whole life, resumable at every step (see the module docstring)."""
        row = self._row(order.client_id)
        if row is None:
            with self.store.transaction() as tx:
                self.store.add_order(
                    tx, client_id=order.client_id, symbol=order.symbol, side=order.side.value, intent=intent,
                    bar_time=bar_time, model_version=version, status="NEW", quote_amount=order.quote_amount,
                    base_qty=order.base_qty, filled_qty=0.0, avg_price=0.0, fee=0.0, message=reason)
            self.checkpoint("committed")
            row = self._row(order.client_id)
        status = row["status"]
        if status == "SENT":  # a crash between marking and answer: did the request ever arrive?
            found = self._lookup(order.client_id)
            if found is not None:
                return self._settle(order, found)
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
                self._update(order.client_id, status="UNKNOWN", message=str(exc)[:500])
                self.checkpoint("answered")
                found = self._lookup(order.client_id)
                if found is None:
                    self.errors.append(f"{order.symbol} {intent}: outcome unknown ({exc}); looked up again at reconciliation")
                    return None
                return self._settle(order, found)
            self._record(order.client_id, answer)
            self.checkpoint("answered")
            return self._settle(order, answer)
        if status in ("ACKED", "UNKNOWN", "PARTIAL"):
            found = self._lookup(order.client_id)
            return self._settle(order, found) if found else None
        return _report_of(row) if status == "FILLED" or (status == "CANCELLED" and row["filled_qty"] > 0) else None

    def _settle(self, order: MarketOrder, report: OrderReport) -> OrderReport | None:
        """Wait for a final state (a market order is quick); a partial fill's remainder is cancelled."""
        for _ in range(self.polls):
            if report.status.final:
                break
            self.sleep(self.poll_s)
            report = self._lookup(order.client_id) or report
        if report.status is OrderStatus.PARTIAL or not report.status.final:
            try:
                cancelled = self.exchange.cancel_order(order.symbol, order.client_id)
                report = self._lookup(order.client_id) or cancelled
            except ExchangeUnavailable as exc:
                self.errors.append(f"{order.symbol}: cancelling the rest of {order.client_id}: {exc}")
        self._record(order.client_id, report)
        self._cash = None
        if report.status is OrderStatus.REJECTED:
            self.errors.append(f"{order.symbol}: {order.client_id} rejected: {report.message}")
        return report if report.filled_qty > 0 else None

    def _lookup(self, cid: str) -> OrderReport | None:
        try:
            return self.exchange.query_order(cid)
        except ExchangeUnavailable as exc:
            self.errors.append(f"looking up {cid}: {exc}")
            return None

    def _balances(self) -> dict[str, float]:
        balances = self.exchange.balances()
        self._cash = balances.get(self.quote_coin, 0.0)
        return balances

    # ------------------------------------------------------------------------------------ rows

    def _row(self, cid: str) -> dict[str, Any] | None:
        with self.store.transaction() as tx:
            return self.store.order(tx, cid)

    def _update(self, cid: str, **values: Any) -> None:
        with self.store.transaction() as tx:
            self.store.update_order(tx, cid, **values)

    def _record(self, cid: str, report: OrderReport) -> None:
        self._update(cid, status=report.status.value, exchange_id=report.exchange_id, filled_qty=report.filled_qty,
                     avg_price=report.avg_price, fee=report.fee, **({"message": report.message[:500]} if report.message else {}))


def exit_reason(position: Position, high: float, low: float, signal: bool, max_hold_bars: int | None) -> str | None:
    """Why a position exits at this bar's close (``None``: it stays): the stop-loss wins over the take-profit,
    then the time stop, then the model's exit signal (the engine's order)."""
    if position.stop_loss and low <= position.stop_loss:
        return "stop_loss"
    if high >= position.take_profit:
        return "take_profit"
    if max_hold_bars and position.bars_held >= max_hold_bars:
        return "time_stop"
    return "exit" if signal else None


def _report_of(row: Mapping[str, Any]) -> OrderReport:
    return OrderReport(row["client_id"], OrderStatus(row["status"]), row["exchange_id"], float(row["filled_qty"]),
                       float(row["avg_price"]), float(row["fee"]), row["message"] or "")
