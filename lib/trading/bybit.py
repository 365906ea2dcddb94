"""Bybit v5 spot trading through pybit: :class:`BybitBroker`, the :class:`~.exchange.ExchangeClient` of the
testnet, demo and mainnet modes.

Every call runs under the candle source's retry policy (:class:`~pricelevel.data.sources.bybit_http.BybitRetry`),
with one difference for ``place_order``: a request that may have reached Bybit is never simply sent again.

* A timeout or a connection lost after sending raises :class:`~.exchange.ExchangeUnavailable` at once: the
  outcome is unknown, and the caller looks the order up by its client id (:meth:`BybitBroker.query_order`).
* HTTP 5xx, an undecodable body or retCode 10000/10016 may come from a gateway after the exchange took the
  order: the broker looks the order up first and resends only if Bybit does not list it.
* Rate limits (retCode 10006/10018/10429, HTTP 403/429) and refused connections never reach the matching
  engine: retried with the usual backoff.
* retCode 110072 ("OrderLinkedID is duplicate", unified accounts) or 170141 ("Duplicate clientOrderId",
  classic spot) means Bybit already has an order with this ``orderLinkId``: that order is looked up and
  returned, nothing new is placed.
* retCode 10002 (the request's time is outside ``recv_window``) never reached the matching engine: the
  broker reads Bybit's clock (``/v5/market/time``), signs with the offset from then on, widens
  ``recv_window`` (at most :data:`MAX_RECV_WINDOW_MS`), says so once, and sends the request again. The
  clock is also read before the first private call, so a skewed machine never sees 10002 at all.
* Any other retCode is a refusal (:class:`~.exchange.OrderRefused`): 170131 insufficient balance, 170136 /
  170140 below the minimum quantity / value, 170121 unknown symbol, 10003/10004 a bad key or secret, ...

Dust is refused before sending: a buy below ``minOrderAmt`` (its amount is its value), a sell whose value
at ``order.price_hint`` is below ``minOrderAmt`` (Bybit deprecated spot ``minOrderQty``; it is still checked
while Bybit lists it). Sizes are rounded down to ``basePrecision``/``quotePrecision``. Every answer's
``X-Bapi-Limit-Status``/``X-Bapi-Limit-Reset-Timestamp`` headers pace the next request to that endpoint
(:class:`~pricelevel.data.sources.bybit_http.RequestPacer`), so a burst waits instead of meeting 10006.

Fees are reported in quote coin. Bybit spot charges them in the coin received (a buy pays in the base
coin, a sell in the quote coin): a base-coin fee is converted at the order's average price (the fill's
price for an execution). Orders carry ``cumFeeDetail`` (coin -> fee) where Bybit gives it; otherwise
``cumExecFee`` is read in the coin received.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from decimal import ROUND_CEILING, Decimal
from types import MappingProxyType
from typing import Any, Literal

import pandas as pd
from pybit import _helpers as pybit_helpers
from pybit.exceptions import FailedRequestError, InvalidRequestError

from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.data.sources.bybit_http import (
    NETWORK_ERRORS,
    BybitRetry,
    Failure,
    RequestPacer,
    as_utc,
    new_session,
    utc_now,
)
from pricelevel.trading.exchange import (
    CredentialsRefused,
    ExchangeUnavailable,
    Execution,
    Instrument,
    MarketOrder,
    OrderRefused,
    OrderReport,
    OrderStatus,
    RestingOrder,
    Side,
)

logger = logging.getLogger(__name__)

Mode = Literal["testnet", "demo", "mainnet"]
#: A spot symbol's ``(base coin, quote coin)`` (the broker asks its cached instrument rules).
Coins = Callable[[str], tuple[str, str]]
MODES: tuple[Mode, ...] = ("testnet", "demo", "mainnet")
CATEGORY = "spot"
ACCOUNT_TYPE = "UNIFIED"

#: Bybit v5 spot retCodes the broker acts on (besides the retry policy's rate limits and server errors).
RET_DUPLICATE_LINK_ID = 170141  # classic spot, "Duplicate clientOrderId": the order exists, look it up
RET_DUPLICATE_LINK_ID_UNIFIED = 110072  # unified account, "OrderLinkedID is duplicate": the same
RET_DUPLICATE_LINK_IDS = frozenset({RET_DUPLICATE_LINK_ID, RET_DUPLICATE_LINK_ID_UNIFIED})
RET_RECV_WINDOW = 10002  # the request's timestamp is outside recv_window of Bybit's clock
RET_ORDER_NOT_EXISTS = 170213  # cancel of an order that is not (or no longer) open
RET_INSUFFICIENT_BALANCE = 170131
RET_INVALID_SYMBOL = 170121
#: retCodes that refuse the key itself: the service stops (:class:`~.exchange.CredentialsRefused`).
CREDENTIAL_RET_CODES = frozenset({10003, 10004, 10005, 10007, 10010, 33004})
#: Refusals that mean our cached instrument rules may be stale (lot size, decimals, minimums).
RULE_RET_CODES = frozenset({170136, 170137, 170140, 170148})

#: Bybit ``orderStatus`` -> ours. ``PartiallyFilledCanceled`` (spot only: a market order's unfilled rest
#: is cancelled) is final: CANCELLED, with the filled quantity in the report.
STATUSES = MappingProxyType(
    {
        "Created": OrderStatus.ACKED,
        "New": OrderStatus.ACKED,
        "Untriggered": OrderStatus.ACKED,
        "Triggered": OrderStatus.ACKED,
        "PartiallyFilled": OrderStatus.PARTIAL,
        "Filled": OrderStatus.FILLED,
        "Cancelled": OrderStatus.CANCELLED,
        "PartiallyFilledCanceled": OrderStatus.CANCELLED,
        "Deactivated": OrderStatus.CANCELLED,
        "Rejected": OrderStatus.REJECTED,
    }
)

_HINTS = MappingProxyType(
    {
        "rate_limit": "Bybit is rate-limiting this API key; wait, or raise bybit.backoff_s",
        "unavailable": (
            "Bybit (or trader.endpoint) is unavailable; an order in doubt is looked up by its client id, "
            "never sent blindly again"
        ),
        "network": "check the network and trader.endpoint, or raise bybit.timeout_s",
        "endpoint": "check trader.endpoint: it should be a Bybit v5 API base URL",
    }
)
#: What an authentication retCode means, for the one-line error (the key itself is never shown).
_AUTH_HINTS = MappingProxyType(
    {
        10002: "the request time is outside Bybit's recv_window: sync this machine's clock (NTP)",
        10003: (
            "Bybit does not know BYBIT_API_KEY in {mode}: mainnet, testnet and demo keys differ, "
            "check the key and the mode"
        ),
        10004: "the signature does not verify: BYBIT_API_SECRET is not the secret of BYBIT_API_KEY",
        10005: "the API key lacks a permission: it needs spot trading and wallet read",
        10007: "Bybit could not authenticate BYBIT_API_KEY: check the key and the mode ({mode})",
        10009: "Bybit banned this IP; wait before retrying",
        10010: "the API key is bound to other IP addresses: add this machine's IP to it",
    }
)
_HINT_UNKNOWN_OUTCOME = (
    "Bybit may have taken the order: look it up with query_order(client_id) before deciding anything"
)
#: The widest ``recv_window`` the broker signs with after a clock refusal (Bybit's default is 5000 ms).
MAX_RECV_WINDOW_MS = 20_000
#: A clock this far off Bybit's (either way) is worth a warning at start.
SKEW_WARNING_MS = 1_000
_PAGE_LIMIT = 50
_MAX_PAGES = 200
_WINDOW = pd.Timedelta(days=7)  # the longest range Bybit's execution list answers for


class _Settled(Exception):
    """Ends a call early with what Bybit already knows about the order."""

    def __init__(self, report: OrderReport) -> None:
        super().__init__(report.client_id)
        self.report = report


class BybitBroker:
    """A Bybit v5 UNIFIED account's spot trading, through pybit.

    ``mode`` picks pybit's base URL (api-testnet, api-demo or api.bybit.com) and ``endpoint`` (the trader's
    ``trader.endpoint``) overrides it; ``config`` gives only the timeout and the retry schedule:
    its ``testnet``/``demo``/``endpoint`` serve market data and never decide where signed orders go.
    The keys come from ``secrets`` only and must be there (:class:`MissingSecretError` otherwise); every
    message is redacted. Instruments are cached for the broker's life, refreshed after a rules refusal.
    """

    name = "bybit"

    def __init__(
        self,
        config: BybitConfig,
        mode: Mode,
        secrets: Secrets,
        *,
        endpoint: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], pd.Timestamp] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Bybit mode must be one of {', '.join(MODES)}, got {mode!r}")
        api_key = secrets.require("bybit_api_key")
        api_secret = secrets.require("bybit_api_secret")
        self.config = config
        self.mode = mode
        self.secrets = secrets
        self._now = now or utc_now
        self._retry = BybitRetry(config, secrets, now=self._now, sleep=sleep, logger=logger, hints=_HINTS)
        self.pacer = RequestPacer(now=self._now, sleep=sleep, offset_ms=lambda: self._session.time_offset_ms,
                                  max_wait_s=config.backoff_max_s, logger=logger)
        self._session = new_session(
            testnet=mode == "testnet",
            demo=mode == "demo",
            timeout_s=config.timeout_s,
            endpoint=endpoint.rstrip("/") if endpoint else None,
            api_key=api_key,
            api_secret=api_secret,
            pacer=self.pacer,
        )
        self.endpoint: str = self._session.endpoint
        self._instruments: dict[str, Instrument] = {}
        self._clock_read = False  # Bybit's clock is read before the first private call
        self._skew_said = False  # the clock warning is given once

    def __repr__(self) -> str:  # pybit's session repr carries the secret: never show it
        return f"BybitBroker(mode={self.mode!r}, endpoint={self.endpoint!r})"

    # ------------------------------------------------------------------------------------- instruments

    def instrument(self, symbol: str) -> Instrument:
        """The spot rules of ``symbol`` (cached); :class:`OrderRefused` if Bybit does not list it."""
        cached = self._instruments.get(symbol)
        if cached is not None:
            return cached
        what = f"the spot instrument {symbol}"
        rows = self._rows(
            self._read(lambda: self._session.get_instruments_info(category=CATEGORY, symbol=symbol), what,
                       private=False),
            what,
        )
        row = next((r for r in rows if isinstance(r, Mapping) and r.get("symbol") == symbol), None)
        if row is None:
            raise OrderRefused(
                f"bybit: {symbol} is not a spot symbol at {self.endpoint}; hint: check the symbol and the mode ({self.mode})"
            )
        try:
            lot, price = row["lotSizeFilter"], row["priceFilter"]
            instrument = Instrument(
                symbol=symbol,
                base_coin=str(row["baseCoin"]),
                quote_coin=str(row["quoteCoin"]),
                base_precision=float(lot["basePrecision"]),
                quote_precision=float(lot["quotePrecision"]),
                min_order_amount=float(lot["minOrderAmt"]),
                min_order_qty=_number(lot.get("minOrderQty")),  # deprecated for spot: 0 once Bybit drops it
                tick_size=float(price["tickSize"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unexpected(what, f"bad instrument {exc!r}") from None
        self._instruments[symbol] = instrument
        return instrument

    # ------------------------------------------------------------------------------------------ orders

    def place_market_order(self, order: MarketOrder) -> OrderReport:
        """Send a spot market order under ``orderLinkId = order.client_id``; ACKED with Bybit's order id.

        Sizes are rounded down to the instrument's precision and dust is refused here, before sending:
        a buy below ``minOrderAmt`` (its quote amount is its value); a sell whose value at
        ``order.price_hint`` is below ``minOrderAmt``, or below ``minOrderQty`` while Bybit still lists that
        deprecated rule. A sell without a price hint has its value checked by Bybit (170140 -> :class:`OrderRefused`).
        """
        instrument = self.instrument(order.symbol)
        if order.side is Side.BUY:
            size, unit, coin = instrument.round_amount(order.quote_amount or 0.0), "quoteCoin", instrument.quote_coin
            text = _decimal_text(size, instrument.quote_precision)
        else:
            size, unit, coin = instrument.round_qty(order.base_qty or 0.0), "baseCoin", instrument.base_coin
            text = _decimal_text(size, instrument.base_precision)
        what = f"{order.side.value} {text} {coin} of {order.symbol} as {order.client_id}"
        dust = _dust(order, instrument, size)
        if dust:
            raise OrderRefused(
                f"bybit: refused {what} locally, nothing sent: {dust}; hint: the order is dust, size it up or skip it"
            )
        params = {
            "category": CATEGORY,
            "symbol": order.symbol,
            "side": order.side.value,
            "orderType": "Market",
            "qty": text,
            # Explicit: a spot market buy's qty is in quote coin by default, a sell's in base coin.
            "marketUnit": unit,
            "orderLinkId": order.client_id,
        }
        return self._place(order, params, what, instrument)

    def place_resting_order(self, order: RestingOrder) -> OrderReport:
        """Send a resting sell under ``orderLinkId = order.client_id``; ACKED while it waits.

        A trigger makes it a spot conditional order (``orderFilter=StopOrder``, ``triggerPrice`` rounded down to the
        tick), which Bybit places once the last price reaches the trigger and which reserves no coins until then, so
        a take-profit and a stop-loss can both wait on the same coins: the take-profit as a conditional GTC limit
        sell at its price (rounded *up*: never below the rule's price), the stop-loss as a conditional market sell.
        A limit price alone is a plain GTC limit sell (it holds its coins). Dust (its value at its price below
        ``minOrderAmt``) is refused here, before sending.
        """
        instrument = self.instrument(order.symbol)
        size = instrument.round_qty(order.base_qty)
        text = _decimal_text(size, instrument.base_precision)
        dust = _dust(MarketOrder(order.client_id, order.symbol, Side.SELL, base_qty=size, price_hint=order.price),
                     instrument, size)
        kind = "take-profit" if order.limit_price is not None else "stop-loss"
        what = f"{kind} sell {text} {instrument.base_coin} of {order.symbol} as {order.client_id}"
        if dust:
            raise OrderRefused(
                f"bybit: refused {what} locally, nothing sent: {dust}; hint: the order is dust, size it up or skip it"
            )
        params: dict[str, Any] = {"category": CATEGORY, "symbol": order.symbol, "side": Side.SELL.value, "qty": text,
                                  "orderLinkId": order.client_id}
        if order.limit_price is not None:
            price = _ceil(order.limit_price, instrument.tick_size)
            params |= {"orderType": "Limit", "price": _decimal_text(price, instrument.tick_size), "timeInForce": "GTC"}
            what += f" at {_plain(price)}"
        else:
            params |= {"orderType": "Market", "marketUnit": "baseCoin"}
        if order.trigger_price is not None:
            trigger = instrument.round_price(order.trigger_price)
            if order.limit_price is not None:  # a take-profit triggers at its own (rounded) price
                trigger = _ceil(order.trigger_price, instrument.tick_size)
            params |= {"orderFilter": "StopOrder", "triggerPrice": _decimal_text(trigger, instrument.tick_size)}
            what += f" once the price reaches {_plain(trigger)}"
        return self._place(order, params, what, instrument)

    def _place(self, order: MarketOrder | RestingOrder, params: dict[str, Any], what: str,
               instrument: Instrument) -> OrderReport:
        """``/v5/order/create``: never twice for one client id (a duplicate or a lost answer is looked up)."""
        self._read_clock_once()

        def judge(failure: Failure) -> Failure:
            return self._after_place_failure(failure, order, instrument)

        try:
            response = self._retry.call(
                lambda: self._session.place_order(**params),
                action="place",
                where=f"{what} at {self.endpoint}",
                error=_order_error,
                reject_hint="Bybit refused the order",
                intercept=judge,
            )
        except _Settled as settled:
            logger.info(f"bybit: {what} was already at Bybit: {settled.report.status} ({settled.report.exchange_id})")
            return settled.report
        result = response.get("result") if isinstance(response, Mapping) else None
        order_id = result.get("orderId") if isinstance(result, Mapping) else None
        logger.info(f"bybit: placed {what}: orderId {order_id}")
        return OrderReport(order.client_id, OrderStatus.ACKED, exchange_id=str(order_id) if order_id else None)

    def _after_place_failure(self, failure: Failure, order: MarketOrder | RestingOrder,
                             instrument: Instrument) -> Failure:
        """Never resend an order that Bybit may have: return it if it is there, or say the outcome is unknown."""
        if failure.ret_code in RET_DUPLICATE_LINK_IDS:
            report = self.query_order(order.client_id)
            if report is None:
                return replace(
                    failure,
                    maybe_processed=True,
                    hint="Bybit says this client id exists but lists no such order; look it up later",
                )
            raise _Settled(replace(report, message=_joined("already at Bybit (duplicate client id); found by client id",
                                                           report.message)))
        if failure.maybe_processed:
            if failure.network:  # sent, no answer: it may still be on its way to the matching engine
                return replace(failure, retryable=False, hint=_HINT_UNKNOWN_OUTCOME)
            report = self.query_order(order.client_id)  # a gateway's 5xx may hide an accepted order
            if report is not None:
                lost = f"answer lost ({failure.description}); found by client id"
                raise _Settled(replace(report, message=_joined(lost, report.message)))
            return failure  # Bybit does not have it: the policy may send it again
        if failure.ret_code in RULE_RET_CODES:
            self._instruments.pop(order.symbol, None)  # the rules may have changed: reload them next time
        if failure.ret_code == RET_INSUFFICIENT_BALANCE:
            spent = instrument.quote_coin if order.side is Side.BUY else instrument.base_coin
            return replace(failure, hint=f"not enough {spent} in the {ACCOUNT_TYPE} wallet for this order")
        return self._judge(failure)

    def query_order(self, client_id: str) -> OrderReport | None:
        """Bybit's open orders, then its order history, by ``orderLinkId``; ``None`` if neither has it."""
        sources = (("open orders", self._session.get_open_orders), ("order history", self._session.get_order_history))
        for label, fetch in sources:
            what = f"the {label} for {client_id}"
            response = self._read(lambda fetch=fetch: fetch(category=CATEGORY, orderLinkId=client_id), what)
            for row in self._rows(response, what):
                if isinstance(row, Mapping) and row.get("orderLinkId") == client_id:
                    return self._report(row)
        return None

    def open_orders(self) -> list[OrderReport]:
        rows = self._paged(
            lambda cursor: self._session.get_open_orders(category=CATEGORY, limit=_PAGE_LIMIT, cursor=cursor),
            "the open spot orders",
        )
        return [self._report(row) for row in _mappings(rows)]

    def cancel_order(self, symbol: str, client_id: str, conditional: bool = False) -> OrderReport:
        """Cancel by client id; an order that is no longer open is reported as it ended. ``conditional``: a spot
        stop order that has not triggered (Bybit cancels it only with ``orderFilter=StopOrder``)."""
        extra = {"orderFilter": "StopOrder"} if conditional else {}

        def judge(failure: Failure) -> Failure:
            if failure.ret_code == RET_ORDER_NOT_EXISTS:
                report = self.query_order(client_id)
                if report is not None:
                    raise _Settled(report)
                return replace(failure, hint=f"Bybit has no order with client id {client_id} on {symbol}")
            return self._judge(failure)

        self._read_clock_once()
        try:
            self._retry.call(  # idempotent: a resent cancel of a cancelled order ends in 170213, then a lookup
                lambda: self._session.cancel_order(category=CATEGORY, symbol=symbol, orderLinkId=client_id, **extra),
                action="cancel",
                where=f"{client_id} on {symbol} at {self.endpoint}",
                error=_order_error,
                reject_hint="Bybit refused the cancel",
                intercept=judge,
            )
        except _Settled as settled:
            return settled.report
        return self.query_order(client_id) or OrderReport(client_id, OrderStatus.CANCELLED)

    # -------------------------------------------------------------------------------------- the account

    def balances(self) -> dict[str, float]:
        """``{coin: walletBalance}`` of the UNIFIED wallet, non-zero coins only."""
        what = f"the {ACCOUNT_TYPE} wallet balance"
        rows = self._rows(self._read(lambda: self._session.get_wallet_balance(accountType=ACCOUNT_TYPE), what), what)
        balances: dict[str, float] = {}
        for account in rows:
            coins = account.get("coin") if isinstance(account, Mapping) else None
            for coin in _mappings(coins or ()):
                amount = _number(coin.get("walletBalance"))
                if amount and coin.get("coin"):
                    balances[str(coin["coin"])] = amount
        return balances

    def executions(self, start: pd.Timestamp | None = None) -> list[Execution]:
        """Spot fills since ``start`` (``None``: Bybit's default, the last 7 days), oldest first.

        Bybit answers at most 7 days per request, so a longer range is asked for in 7-day windows.
        """
        windows: list[tuple[int | None, int | None]] = [(None, None)]
        if start is not None:
            begin, now, step = as_utc(start), as_utc(self._now()), pd.Timedelta(milliseconds=1)
            windows = []
            while True:
                end = begin + _WINDOW - step
                windows.append((_ms(begin), _ms(end)))
                if end >= now:
                    break
                begin = end + step
        seen: dict[str, Execution] = {}
        for first, last in windows:
            rows = self._paged(
                lambda cursor, first=first, last=last: self._session.get_executions(
                    category=CATEGORY, startTime=first, endTime=last, limit=100, cursor=cursor
                ),
                "the spot executions",
            )
            for row in _mappings(rows):
                execution = self._execution(row)
                seen.setdefault(execution.exec_id, execution)
        return sorted(seen.values(), key=lambda e: (e.time, e.exec_id))

    # -------------------------------------------------------------------------------------- conversions

    def _report(self, row: Mapping[str, Any]) -> OrderReport:
        return order_report(row, self._coins)

    def _execution(self, row: Mapping[str, Any]) -> Execution:
        try:
            price = _number(row["execPrice"])
            coin = str(row.get("feeCurrency") or self._received_coin(row))
            return Execution(
                exec_id=str(row["execId"]),
                client_id=str(row.get("orderLinkId") or ""),
                symbol=str(row["symbol"]),
                side=Side(row["side"]),
                qty=_number(row["execQty"]),
                price=price,
                fee=self._fee_in_quote({coin: _number(row.get("execFee"))}, str(row["symbol"]), price),
                time=pd.Timestamp(int(row["execTime"]), unit="ms", tz="UTC"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unexpected("the spot executions", f"bad execution {exc!r}") from None

    def _coins(self, symbol: str) -> tuple[str, str]:
        instrument = self.instrument(symbol)
        return instrument.base_coin, instrument.quote_coin

    def _received_coin(self, row: Mapping[str, Any]) -> str:
        return received_coin(row, self._coins)

    def _fee_in_quote(self, fees: Mapping[str, float], symbol: str, price: float) -> float:
        return fee_in_quote(fees, symbol, price, self._coins)

    # ------------------------------------------------------------------------------------------- calls

    def _read(self, request: Callable[[], Any], what: str, *, private: bool = True) -> Any:
        """A read under the retry policy; whatever stops it is :class:`ExchangeUnavailable`."""
        if private:
            self._read_clock_once()
        return self._retry.call(
            request,
            action="read",
            where=f"{what} at {self.endpoint}",
            error=_read_error,
            reject_hint="Bybit refused the request",
            intercept=self._judge,
        )

    def _paged(self, request: Callable[[str | None], Any], what: str) -> list[Any]:
        rows: list[Any] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            response = self._read(lambda cursor=cursor: request(cursor), what)
            rows.extend(self._rows(response, what))
            cursor = response["result"].get("nextPageCursor") or None
            if cursor is None:
                return rows
        raise self._unexpected(what, f"more than {_MAX_PAGES} pages")

    def _judge(self, failure: Failure) -> Failure:
        """Name the key problem behind an authentication retCode (never the key); a clock refusal (10002) is
        corrected (Bybit's clock read again, ``recv_window`` widened) and the request sent again."""
        hint = _auth_hint(failure.ret_code, self.mode)
        if failure.ret_code == RET_RECV_WINDOW:
            self._correct_clock(failure)
            return replace(failure, retryable=True, hint=hint or failure.hint)
        return replace(failure, hint=hint) if hint else failure

    # ------------------------------------------------------------------------------------------- clock

    def _read_clock_once(self) -> None:
        """Before the first private call: sign with Bybit's clock from the start."""
        if self._clock_read:
            return
        self._clock_read = True
        offset = self._server_offset_ms()
        if offset is None:
            return
        self._session.time_offset_ms = offset
        if abs(offset) >= SKEW_WARNING_MS:
            self._say_skew(f"this machine's clock is {offset / 1000:+.3f} s off Bybit's")

    def _correct_clock(self, failure: Failure) -> None:
        """After retCode 10002: read Bybit's clock again and widen ``recv_window`` (within bounds)."""
        offset = self._server_offset_ms()
        if offset is not None:
            self._session.time_offset_ms = offset
        window = min(max(int(self._session.recv_window) * 2, 10_000), MAX_RECV_WINDOW_MS)
        self._session.recv_window = window
        self._say_skew(f"Bybit refused a request's time ({self._retry.redact(failure.description)[:160]}); "
                       f"this machine's clock is {self._session.time_offset_ms / 1000:+.3f} s off Bybit's")

    def _say_skew(self, what: str) -> None:
        text = (f"bybit: {what}: signing with Bybit's time (offset {self._session.time_offset_ms} ms, recv_window "
                f"{self._session.recv_window} ms) from now on; hint: sync this machine's clock (NTP)")
        if self._skew_said:
            logger.info(text)
        else:
            self._skew_said = True
            logger.warning(text)

    def _server_offset_ms(self) -> int | None:
        """Bybit's clock minus ours (``/v5/market/time``, the midpoint of the round trip); ``None`` if it
        could not be read (one attempt: the next clock refusal tries again)."""
        try:
            before = pybit_helpers.generate_timestamp()
            response = self._session.get_server_time()
            after = pybit_helpers.generate_timestamp()
            server_ms = _server_time_ms(response)
        except (FailedRequestError, InvalidRequestError, *NETWORK_ERRORS, ValueError, TypeError, KeyError) as exc:
            logger.info(self._retry.redact(f"bybit: could not read Bybit's clock at {self.endpoint}: "
                                           f"{type(exc).__name__}; the signing offset stays "
                                           f"{self._session.time_offset_ms} ms"))
            return None
        return server_ms - (before + after) // 2

    def _rows(self, response: Any, what: str) -> list[Any]:
        result = response.get("result") if isinstance(response, Mapping) else None
        rows = result.get("list") if isinstance(result, Mapping) else None
        if not isinstance(rows, list):
            raise self._unexpected(what, "no result.list")
        return rows

    def _unexpected(self, what: str, detail: str) -> ExchangeUnavailable:
        return ExchangeUnavailable(
            self._retry.redact(
                f"bybit: unexpected response for {what} from {self.endpoint}: {detail}; "
                "hint: is trader.endpoint a Bybit v5 API?"
            )
        )


# ------------------------------------------------------------------------------------------------ helpers


def _dust(order: MarketOrder, instrument: Instrument, size: float) -> str:
    """Why an order is below the exchange's minimums ("" if it is not)."""
    if order.side is Side.BUY:
        coin, minimum = instrument.quote_coin, instrument.min_order_amount
        if not math.isfinite(size) or size <= 0 or size < minimum:
            return f"below the minimum order value (minOrderAmt) {_plain(minimum)} {coin}"
        return ""
    coin = instrument.base_coin
    if not math.isfinite(size) or size <= 0:
        return f"nothing to sell after rounding to the base precision (basePrecision) {_plain(instrument.base_precision)} {coin}"
    price = order.price_hint
    if price is not None and math.isfinite(price) and price > 0 and size * price < instrument.min_order_amount:
        return (f"worth about {size * price:.6g} {instrument.quote_coin} at {price:g}, below the minimum order "
                f"value (minOrderAmt) {_plain(instrument.min_order_amount)} {instrument.quote_coin}")
    if size < instrument.min_order_qty:  # deprecated for spot, still enforced while listed
        return f"below the minimum order quantity (minOrderQty) {_plain(instrument.min_order_qty)} {coin}"
    return ""


def _ceil(value: float, step: float) -> float:
    """Up to a multiple of ``step`` (a take-profit never sells below the rule's price)."""
    if step <= 0 or not math.isfinite(value):
        return value
    steps = (Decimal(repr(value)) / Decimal(repr(step))).to_integral_value(rounding=ROUND_CEILING)
    return float(steps * Decimal(repr(step)))


def _server_time_ms(response: Any) -> int:
    """``/v5/market/time``: ``result.timeNano`` (ns), else ``result.timeSecond``, else the envelope's ``time``."""
    result = response.get("result") if isinstance(response, Mapping) else None
    if isinstance(result, Mapping) and result.get("timeNano"):
        return int(str(result["timeNano"])) // 1_000_000
    if isinstance(result, Mapping) and result.get("timeSecond"):
        return int(str(result["timeSecond"])) * 1000
    return int(str(response["time"]))


def order_report(row: Mapping[str, Any], coins: Coins) -> OrderReport:
    """Bybit's order (REST list row or private ``order`` stream push: the same fields) as our report: its status
    (:data:`STATUSES`), cumulative fill, average price and fees in quote coin. ``coins`` is asked only when
    there are fees to convert."""
    raw = str(row.get("orderStatus", ""))
    status = STATUSES.get(raw, OrderStatus.UNKNOWN)
    filled, value = _number(row.get("cumExecQty")), _number(row.get("cumExecValue"))
    avg = _number(row.get("avgPrice")) or (value / filled if filled else 0.0)
    message = ""
    if status is OrderStatus.REJECTED:
        message = f"Rejected: {row.get('rejectReason') or 'no reason given'}"
    elif status is OrderStatus.CANCELLED:
        message = f"{raw} ({row.get('cancelType') or 'UNKNOWN'})"
    elif status is OrderStatus.UNKNOWN:
        message = f"unknown Bybit orderStatus {raw!r}"
    detail = row.get("cumFeeDetail")
    if isinstance(detail, Mapping) and detail:
        fees = {str(coin): _number(amount) for coin, amount in detail.items()}
    else:
        fee = _number(row.get("cumExecFee"))
        fees = {received_coin(row, coins): fee} if fee else {}
    return OrderReport(
        client_id=str(row.get("orderLinkId", "")),
        status=status,
        exchange_id=str(row["orderId"]) if row.get("orderId") else None,
        filled_qty=filled,
        avg_price=avg,
        fee=fee_in_quote(fees, str(row.get("symbol")), avg, coins),
        message=message,
    )


def received_coin(row: Mapping[str, Any], coins: Coins) -> str:
    """Bybit spot's fee coin when a row does not name it: the coin the trade brought in."""
    base, quote = coins(str(row.get("symbol")))
    return base if row.get("side") == Side.BUY.value else quote


def fee_in_quote(fees: Mapping[str, float], symbol: str, price: float, coins: Coins) -> float:
    """``fees`` (coin -> amount) in ``symbol``'s quote coin, a base-coin fee at ``price``."""
    if not any(fees.values()):
        return 0.0
    base, quote = coins(symbol)
    total = 0.0
    for coin, amount in fees.items():
        if coin == quote:
            total += amount
        elif coin == base:
            total += amount * price
        elif amount:
            logger.warning(f"bybit: a {symbol} fee of {amount:g} {coin} is not in {symbol}'s coins; left out")
    return total


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _read_error(message: str, failure: Failure) -> Exception:
    """A read that failed: the key refused (the service stops), or the exchange unavailable (it waits)."""
    if failure.ret_code in CREDENTIAL_RET_CODES:
        return CredentialsRefused(message)
    return ExchangeUnavailable(message)


def _order_error(message: str, failure: Failure) -> Exception:
    """A refusal Bybit gave for good is :class:`OrderRefused`; anything else leaves the order in doubt."""
    if failure.ret_code in CREDENTIAL_RET_CODES:
        return CredentialsRefused(message)
    if failure.retryable or failure.maybe_processed:
        return ExchangeUnavailable(message)
    return OrderRefused(message)


def _auth_hint(ret_code: int | None, mode: str) -> str | None:
    hint = _AUTH_HINTS.get(ret_code) if ret_code is not None else None
    return hint.format(mode=mode) if hint else None


def _number(value: Any) -> float:
    """Bybit writes numbers as strings, ``""`` for none."""
    try:
        return float(value) if value not in (None, "") else 0.0
    except (TypeError, ValueError):
        return 0.0


def _decimal_text(value: float, step: float) -> str:
    """``value`` with no more decimals than ``step`` has and no exponent: Bybit refuses ``1e-05``."""
    places = max(0, -int(Decimal(repr(step)).normalize().as_tuple().exponent))
    return format(Decimal(f"{value:.{places}f}").normalize(), "f")


def _plain(value: float) -> str:
    return format(Decimal(repr(value)).normalize(), "f")


def _ms(ts: pd.Timestamp) -> int:
    return ts.value // 1_000_000


def _mappings(rows: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    return (row for row in rows if isinstance(row, Mapping))
