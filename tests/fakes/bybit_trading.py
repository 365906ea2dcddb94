"""A fake Bybit v5 spot exchange: trading and account endpoints on top of :mod:`tests.fakes.bybit_server`'s klines.

It speaks the wire format pybit speaks to the real one: signed private requests (``X-BAPI-API-KEY``,
``X-BAPI-SIGN`` = HMAC-SHA256 of ``timestamp + key + recv_window + payload`` where the payload is the raw
query string of a GET or the raw JSON body of a POST, ``X-BAPI-TIMESTAMP``, ``X-BAPI-RECV-WINDOW``), answers
``{"retCode", "retMsg", "result", "retExtInfo", "time"}`` with every number as a string, and keeps an
account: balances per coin, instruments, a last price per symbol, orders by ``orderId`` and by
``orderLinkId``, executions. Market orders fill at once at the last price (or only ``fill_fraction`` of
them, the rest staying open), paying the taker fee in the coin received, as Bybit spot does: a buy pays it
in the base coin, a sell in the quote coin.

retCodes it emulates (Bybit v5 error table, spot trade section), and when:

========  =====================================================  =====================================
10001     params error                                            bad category/side/type/qty/orderLinkId
10002     request time outside the recv_window                    X-BAPI-TIMESTAMP too far from our clock
                                                                  (``clock_skew_s`` moves our clock)
10003     API key is invalid                                      unknown or missing X-BAPI-API-KEY
10004     error sign (echoes the signed origin string, key        X-BAPI-SIGN does not verify
          included, as Bybit does: the client must redact it)
10006     Too many visits (with the X-Bapi-Limit-* headers)       :meth:`TradeFault.rate_limit`, or
                                                                  more than ``rate_quota`` requests to one
                                                                  endpoint in ``rate_window_s``
10016     Server error                                            :meth:`TradeFault.api_error`
170121    Invalid symbol                                          order on an unknown symbol
170131    Insufficient balance                                    not enough of the coin spent
170136    Order quantity lower than the minimum                   base qty below ``minOrderQty``
170137    Order volume decimal too long                           base qty finer than ``basePrecision``
170140    Order value exceeded lower limit                        value below ``minOrderAmt``
170141    Duplicate clientOrderId                                 an ``orderLinkId`` seen before
110072    OrderLinkedID is duplicate                              the same, with ``unified_account=True``
170148    Market order amount decimal too long                    quote amount finer than ``quotePrecision``
170213    Order does not exist                                    cancel of an unknown or closed order
========  =====================================================  =====================================

Faults (:meth:`FakeBybitExchange.fail_next`): each queued :class:`TradeFault` is served to the next request
on its path (order faults default to ``/v5/order/create``, the others to any trading path), so that a test
can fail "the next order" whatever reads the client does first. ``lost`` is the nasty one: the order IS
created and filled, then the answer stalls past the client's timeout, or is a bare 502.

Every private answer carries Bybit's rate-limit headers (``X-Bapi-Limit``, ``X-Bapi-Limit-Status`` = requests
left, ``X-Bapi-Limit-Reset-Timestamp`` = when the window resets once it is used up, else now), counted per API
key and endpoint in windows of ``rate_window_s`` on the fake's clock; ``rate_quota`` (``None``: a quota no test
reaches) sets the limit. ``/v5/market/time`` answers the fake's server clock, real time plus ``clock_skew_s``,
as Bybit does (``{"timeSecond", "timeNano"}``); the same skewed clock checks every X-BAPI-TIMESTAMP.

Bad days, on demand: :meth:`FakeBybitExchange.set_outage` answers every request (klines included) with an
HTTP status and an HTML page, as a proxy in front of a down exchange does (optionally until a time of the
fake's clock); :meth:`~FakeBybitExchange.revoke_key` answers 10003 to every private request;
:meth:`~FakeBybitExchange.rate_limit_storm` queues N consecutive 10006 answers; ``fill_fraction`` fills only
part of each market order and :meth:`~FakeBybitExchange.fill_rest` (or ``fill_rest_after``) fills the rest
later, as a separate execution with its own ``execId``.

Resting orders, as Bybit spot has them: a ``Limit`` order (``price``, ``timeInForce`` GTC) rests as ``New`` and
holds its coins (the wallet's ``locked``; a sell needs them free when placed, else 170131); it fills at its own
price, as a maker, once the last price reaches it (:meth:`FakeBybitExchange.set_price`, the ``/fake/prices``
control, or :meth:`~FakeBybitExchange.trade_through` for a bar's path). A conditional order (``orderFilter=StopOrder``
with ``triggerPrice``) rests as ``Untriggered`` without holding anything; when the last price crosses its trigger
(from the side it was placed on) it becomes ``Triggered`` and is executed as a market (or limit) order then, or
``Rejected`` if the coins are not free at that moment (a limit holding them). It is cancelled only with
``orderFilter=StopOrder`` (170213 otherwise), as Bybit spot files conditional orders apart.

A test driving the fake in another process uses the ``/fake/...`` control endpoints (never affected by an
outage or a fault), most easily through :class:`FakeExchangeControl`.

Standalone (binds 127.0.0.1 only)::

    python -m tests.fakes.bybit_trading --port 8766 --data data/sample --price BTCUSDT=61200

prints the key and secret to use (``BYBIT_API_KEY`` / ``BYBIT_API_SECRET``) and serves klines too. Run both
the fake and its client under a sped-up clock (libfaketime ``x360``) with ``--clock-speed 360``: the recv
window is then checked in real seconds, not fake ones.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import re
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType

import pandas as pd
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tests.fakes.bybit_server import KLINE_PATH, FakeBybit, Fault

ORDER_CREATE = "/v5/order/create"
ORDER_CANCEL = "/v5/order/cancel"
ORDER_REALTIME = "/v5/order/realtime"
ORDER_HISTORY = "/v5/order/history"
EXECUTION_LIST = "/v5/execution/list"
WALLET_BALANCE = "/v5/account/wallet-balance"
INSTRUMENTS_INFO = "/v5/market/instruments-info"
MARKET_TIME = "/v5/market/time"
PRIVATE_PATHS = (ORDER_CREATE, ORDER_CANCEL, ORDER_REALTIME, ORDER_HISTORY, EXECUTION_LIST, WALLET_BALANCE)
TRADING_PATHS = (*PRIVATE_PATHS, INSTRUMENTS_INFO)
PUBLIC_PATHS = (KLINE_PATH, MARKET_TIME)
#: Not Bybit: how a test in another process moves the fake's last prices (POST {"SYMBOL": "price", ...}).
FAKE_PRICES = "/fake/prices"
#: Not Bybit: POST {"status": 503, "until": "2024-06-20T04:00:00Z" | null}; {"status": null} ends it.
FAKE_OUTAGE = "/fake/outage"
#: Not Bybit: POST [{"kind": "rate_limit", "count": 5}, {"kind": "lost", "stall_s": 3}, {"kind": "http", "status": 502}]
FAKE_FAULTS = "/fake/faults"
#: Not Bybit: POST {"fill_fraction": 0.4, "fill_rest_after_s": 600 | null}.
FAKE_FILL_FRACTION = "/fake/fill_fraction"
#: Not Bybit: POST {"orderLinkId": "..."} fills the rest of that open order; {} fills the rest of every one.
FAKE_FILL_REST = "/fake/fill_rest"
#: Not Bybit: POST {"COIN": "amount", ...} sets balances.
FAKE_BALANCE = "/fake/balance"
#: Not Bybit: POST {"revoked": true} answers 10003 to every private request; {"revoked": false} restores the key.
FAKE_KEY = "/fake/key"
#: Not Bybit: GET the whole account (balances, orders, executions, created, counts of requests).
FAKE_STATE = "/fake/state"
CONTROL_PATHS = (FAKE_PRICES, FAKE_OUTAGE, FAKE_FAULTS, FAKE_FILL_FRACTION, FAKE_FILL_REST, FAKE_BALANCE, FAKE_KEY,
                 FAKE_STATE)

RET_PARAMS = 10001
RET_RECV_WINDOW = 10002
RET_API_KEY_INVALID = 10003
RET_SIGN = 10004
RET_RATE_LIMIT = 10006
RET_SERVER_ERROR = 10016
RET_INVALID_SYMBOL = 170121
RET_INSUFFICIENT_BALANCE = 170131
RET_QTY_TOO_SMALL = 170136
RET_QTY_DECIMALS = 170137
RET_VALUE_TOO_SMALL = 170140
RET_DUPLICATE_LINK_ID = 170141
RET_DUPLICATE_LINK_ID_UNIFIED = 110072
RET_AMOUNT_DECIMALS = 170148
RET_ORDER_NOT_EXISTS = 170213

MESSAGES = MappingProxyType({
    RET_API_KEY_INVALID: "API key is invalid.",
    RET_INSUFFICIENT_BALANCE: "Insufficient balance.",
    RET_QTY_TOO_SMALL: "Order quantity lower than the minimum.",
    RET_QTY_DECIMALS: "Order volume decimal too long.",
    RET_VALUE_TOO_SMALL: "Order value exceeded lower limit.",
    RET_DUPLICATE_LINK_ID: "Duplicate clientOrderId.",
    RET_DUPLICATE_LINK_ID_UNIFIED: "OrderLinkedID is duplicate",
    RET_RATE_LIMIT: "Too many visits!",
    RET_AMOUNT_DECIMALS: "Market order amount decimal too long.",
    RET_ORDER_NOT_EXISTS: "Order does not exist.",
    RET_INVALID_SYMBOL: "Invalid symbol.",
})
OPEN_STATUSES = ("New", "PartiallyFilled", "Untriggered")
LINK_ID = re.compile(r"^[A-Za-z0-9_-]{1,36}$")
SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
#: The quota the rate-limit headers report when a test sets none.
UNLIMITED_QUOTA = 1_000_000
_MS = 1_000_000


@dataclass(frozen=True)
class TradeFault(Fault):
    """A :class:`~tests.fakes.bybit_server.Fault` aimed at one path, plus the faults only orders have.

    ``path=None`` hits the next trading request whatever its path.
    """

    path: str | None = None

    @classmethod
    def lost(cls, stall_s: float | None = None) -> TradeFault:
        """The order is created (and filled), then the answer is lost: it stalls ``stall_s`` (past the
        client's timeout) before answering, or, with ``None``, the client gets a bare HTTP 502."""
        return cls("lost", status=502, seconds=stall_s or 0.0, path=ORDER_CREATE)

    @classmethod
    def reject(cls, reason: str = "EC_NoImmediateQtyToFill") -> TradeFault:
        """Accepted (retCode 0), then rejected by the matching engine: orderStatus ``Rejected``, no fill."""
        return cls("reject", message=reason, path=ORDER_CREATE)

    @classmethod
    def insufficient_balance(cls) -> TradeFault:
        return cls.order_error(RET_INSUFFICIENT_BALANCE)

    @classmethod
    def min_order_value(cls) -> TradeFault:
        return cls.order_error(RET_VALUE_TOO_SMALL)

    @classmethod
    def order_error(cls, ret_code: int, message: str | None = None) -> TradeFault:
        """The next order is refused with this retCode (nothing is created)."""
        return cls("api_error", ret_code=ret_code, message=message or MESSAGES[ret_code], path=ORDER_CREATE)

    def on(self, path: str | None) -> TradeFault:
        """The same fault, aimed at ``path`` (``None``: any trading path)."""
        return replace(self, path=path)

    @classmethod
    def from_json(cls, spec: Mapping[str, object]) -> list[TradeFault]:
        """``count`` faults from one ``/fake/faults`` entry: ``{"kind": "rate_limit" | "http" | "slow" |
        "malformed" | "api_error" | "lost" | "reject" | "order_error", "count": 1, "path": ..., "status": ...,
        "stall_s": ..., "seconds": ..., "ret_code": ..., "message": ...}``."""
        kind, count = str(spec["kind"]), int(str(spec.get("count", 1)))
        seconds = float(str(spec.get("seconds", spec.get("stall_s", 0)) or 0))
        makers: dict[str, Callable[[], Fault]] = {
            "rate_limit": lambda: Fault.rate_limit(seconds),
            "http": lambda: Fault.http(int(str(spec.get("status", 502)))),
            "slow": lambda: Fault.slow(seconds),
            "malformed": Fault.malformed,
            "api_error": lambda: Fault.api_error(int(str(spec.get("ret_code", RET_SERVER_ERROR))),
                                                 str(spec.get("message", "Server error"))),
            "lost": lambda: cls.lost(seconds or None),
            "reject": lambda: cls.reject(str(spec.get("message", "EC_NoImmediateQtyToFill"))),
            "order_error": lambda: cls.order_error(int(str(spec["ret_code"])), spec.get("message")),
        }
        if kind not in makers:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(makers)}")
        made = makers[kind]()
        fault = made if isinstance(made, TradeFault) else cls(**vars(made))
        if "path" in spec:
            fault = fault.on(spec["path"])  # type: ignore[arg-type]
        return [fault] * count


@dataclass(frozen=True)
class Recorded:
    """One request as the fake saw it: ``params`` is the query of a GET or the JSON body of a POST."""

    method: str
    path: str
    params: Mapping[str, object]
    api_key: str | None
    #: The X-BAPI-RECV-WINDOW it was signed with (``None``: unsigned).
    recv_window: str | None = None


@dataclass
class _Order:
    order_id: str
    link_id: str
    symbol: str
    side: str
    qty: Decimal
    market_unit: str
    created_ms: int
    status: str = "New"
    updated_ms: int = 0
    cum_qty: Decimal = Decimal(0)
    cum_value: Decimal = Decimal(0)
    fee: Decimal = Decimal(0)
    fee_coin: str = ""
    reject_reason: str = "EC_NoError"
    cancel_type: str = "UNKNOWN"
    order_type: str = "Market"
    #: A limit order's price (0: market).
    price: Decimal = Decimal(0)
    #: A conditional order's trigger (0: none) and whether it fires on a rise (1) or a fall (2), as Bybit says.
    trigger_price: Decimal = Decimal(0)
    trigger_direction: int = 0
    order_filter: str = "Order"

    def done(self, instrument: _Instrument, price: Decimal) -> bool:
        """Nothing left to fill (in the unit the order was given in, to within one lot at ``price``)."""
        if self.market_unit == "quoteCoin":
            return self.qty - self.cum_value < instrument.base_precision * price + instrument.quote_precision
        return self.qty - self.cum_qty < instrument.base_precision

    def leaves_base(self, price: Decimal) -> Decimal:
        """What is left to fill, in the base coin at ``price``."""
        if self.market_unit == "quoteCoin":
            return (self.qty - self.cum_value) / price
        return self.qty - self.cum_qty

    def to_json(self) -> dict[str, object]:
        """The order as ``/v5/order/realtime`` and ``/v5/order/history`` list it."""
        avg = self.cum_value / self.cum_qty if self.cum_qty else Decimal(0)
        open_ = self.status in OPEN_STATUSES
        if self.market_unit == "quoteCoin":
            leaves_qty, leaves_value = Decimal(0), (self.qty - self.cum_value) if open_ else Decimal(0)
        else:
            leaves_qty = (self.qty - self.cum_qty) if open_ else Decimal(0)
            leaves_value = leaves_qty * avg
        return {
            "orderId": self.order_id,
            "orderLinkId": self.link_id,
            "blockTradeId": "",
            "symbol": self.symbol,
            "price": _text(self.price) if self.price else "0",
            "qty": _text(self.qty),
            "side": self.side,
            "isLeverage": "0",
            "positionIdx": 0,
            "orderStatus": self.status,
            "cancelType": self.cancel_type,
            "rejectReason": self.reject_reason,
            "avgPrice": _text(avg) if self.cum_qty else "",
            "leavesQty": _text(leaves_qty),
            "leavesValue": _text(leaves_value),
            "cumExecQty": _text(self.cum_qty),
            "cumExecValue": _text(self.cum_value),
            "cumExecFee": _text(self.fee),
            "cumFeeDetail": {self.fee_coin: _text(self.fee)} if self.fee else {},
            "timeInForce": "GTC" if self.order_type == "Limit" else "IOC",
            "orderType": self.order_type,
            "marketUnit": self.market_unit,
            "stopOrderType": "Stop" if self.trigger_price else "",
            "triggerPrice": _text(self.trigger_price) if self.trigger_price else "0",
            "triggerDirection": self.trigger_direction,
            "orderFilter": self.order_filter,
            "takeProfit": "0",
            "stopLoss": "0",
            "reduceOnly": False,
            "closeOnTrigger": False,
            "smpType": "None",
            "createdTime": str(self.created_ms),
            "updatedTime": str(self.updated_ms or self.created_ms),
        }


@dataclass
class _Instrument:
    symbol: str
    base_coin: str
    quote_coin: str
    base_precision: Decimal
    quote_precision: Decimal
    #: ``None``: not listed (Bybit deprecated spot ``minOrderQty`` in favour of ``minOrderAmt``).
    min_order_qty: Decimal | None
    max_order_qty: Decimal
    min_order_amt: Decimal
    max_order_amt: Decimal
    tick_size: Decimal

    def to_json(self) -> dict[str, object]:
        lot = {
            "basePrecision": _text(self.base_precision),
            "quotePrecision": _text(self.quote_precision),
            "minOrderQty": _text(self.min_order_qty) if self.min_order_qty is not None else None,
            "maxOrderQty": _text(self.max_order_qty),
            "minOrderAmt": _text(self.min_order_amt),
            "maxOrderAmt": _text(self.max_order_amt),
        }
        return {
            "symbol": self.symbol,
            "baseCoin": self.base_coin,
            "quoteCoin": self.quote_coin,
            "innovation": "0",
            "status": "Trading",
            "marginTrading": "utaOnly",
            "stTag": "0",
            "lotSizeFilter": {key: value for key, value in lot.items() if value is not None},
            "priceFilter": {"tickSize": _text(self.tick_size)},
            "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.05"},
        }


class _Refused(Exception):
    """An order refused with a retCode (nothing created)."""

    def __init__(self, ret_code: int, message: str | None = None) -> None:
        super().__init__(message or MESSAGES[ret_code])
        self.ret_code = ret_code


@dataclass
class FakeBybitExchange:
    """One spot account on a fake Bybit v5, plus the kline fake (``market``) on the same server.

    ``unique_link_ids=False`` makes it refuse a repeated ``orderLinkId`` only while the first order is
    still open (a weaker exchange), to prove that a client does not lean on the exchange's dedupe.
    """

    api_key: str = "fake-api-key-0001"
    api_secret: str = "fake-api-secret-0001"
    balances: dict[str, float] = field(default_factory=lambda: {"USDT": 10_000.0})
    taker_fee: float = 0.001
    #: Share of each market order that fills (the rest stays open, ``PartiallyFilled``).
    fill_fraction: float = 1.0
    #: Fake-clock seconds after which the rest of a partly filled order fills by itself (``None``: never).
    fill_rest_after_s: float | None = None
    unique_link_ids: bool = True
    #: A unified trading account: a repeated ``orderLinkId`` is refused with 110072 instead of classic spot's 170141.
    unified_account: bool = False
    #: Seconds our server clock runs ahead of real time (negative: behind): what X-BAPI-TIMESTAMP is checked
    #: against and what ``/v5/market/time`` answers.
    clock_skew_s: float = 0.0
    #: Requests per API key and endpoint in each ``rate_window_s`` (fake clock) before 10006; ``None``: no limit.
    rate_quota: int | None = None
    rate_window_s: float = 1.0
    #: How many times faster than real time the clocks of the fake and its clients run (libfaketime ``x360``):
    #: the recv window and the allowed clock lead are checked in real time, as network latency is real.
    clock_speed: float = 1.0
    now: Callable[[], pd.Timestamp] = field(default=lambda: pd.Timestamp.now(tz="UTC"))
    market: FakeBybit | None = None

    def __post_init__(self) -> None:
        if self.market is None:
            self.market = FakeBybit(now=self.now)
        self._balances = {coin: _dec(v) for coin, v in self.balances.items()}
        self._instruments: dict[str, _Instrument] = {}
        self._prices: dict[str, Decimal] = {}
        self._orders: dict[str, _Order] = {}
        self._by_link: dict[str, str] = {}
        self._executions: list[dict[str, str]] = []
        self._faults: deque[TradeFault] = deque()
        self._lock = threading.RLock()
        self._outage: tuple[int, pd.Timestamp | None] | None = None
        self._key_revoked = False
        #: Requests answered with the outage's status (klines included), and by path.
        self.outage_answers: dict[str, int] = {}
        #: Refusals answered (retCode -> count), e.g. 170141 for an ``orderLinkId`` sent again, 10002 for a
        #: timestamp outside the recv window, 10006 past ``rate_quota``.
        self.refusals: dict[int, int] = {}
        #: Every trading request, in order (klines are in ``market.requests``).
        self.requests: list[Recorded] = []
        #: Every order created, in order: what the exchange really took.
        self.created: list[dict[str, object]] = []
        #: ``/v5/market/time`` requests answered (not in ``requests``: they are no trading).
        self.time_requests = 0
        self._rate_windows: dict[tuple[str, str], tuple[int, int]] = {}
        self.add_instrument("BTCUSDT", "BTC", "USDT")

    # ----------------------------------------------------------------------------------------- set-up

    def add_instrument(
        self,
        symbol: str,
        base_coin: str,
        quote_coin: str,
        *,
        base_precision: str = "0.000001",
        quote_precision: str = "0.00000001",
        min_order_qty: str | None = "0.000048",
        max_order_qty: str = "71.73956243",
        min_order_amt: str = "1",
        max_order_amt: str = "2000000",
        tick_size: str = "0.01",
    ) -> None:
        """A spot symbol with Bybit's rules (defaults: BTCUSDT's on mainnet); ``min_order_qty=None`` leaves the
        deprecated ``minOrderQty`` out, as Bybit may."""
        self._instruments[symbol] = _Instrument(
            symbol,
            base_coin,
            quote_coin,
            base_precision=Decimal(base_precision),
            quote_precision=Decimal(quote_precision),
            min_order_qty=Decimal(min_order_qty) if min_order_qty is not None else None,
            max_order_qty=Decimal(max_order_qty),
            min_order_amt=Decimal(min_order_amt),
            max_order_amt=Decimal(max_order_amt),
            tick_size=Decimal(tick_size),
        )

    def set_price(self, symbol: str, price: float | str) -> None:
        """The last traded price: market orders on ``symbol`` fill there, resting orders it reaches fill."""
        with self._lock:
            self._prices[symbol] = _dec(price)
            self._match(symbol)

    def trade_through(self, symbol: str, *prices: float | str) -> None:
        """The market trades at each price in turn (a bar's path, e.g. open, low, high, close)."""
        for price in prices:
            self.set_price(symbol, price)

    def cancel_all(self) -> None:
        """Someone cancels every open order on the account (Bybit's app, another client)."""
        with self._lock:
            for order in self._orders.values():
                if order.status in OPEN_STATUSES:
                    order.status = "Deactivated" if order.status == "Untriggered" else (
                        "PartiallyFilledCanceled" if order.cum_qty else "Cancelled")
                    order.cancel_type, order.updated_ms = "CancelByUser", self._now_ms()

    def locked(self, coin: str) -> Decimal:
        """What open limit orders hold of ``coin`` (a sell its base coin, a buy its quote coin)."""
        held = Decimal(0)
        for order in self._orders.values():
            if order.order_type != "Limit" or order.status not in ("New", "PartiallyFilled"):
                continue
            instrument = self._instruments[order.symbol]
            if order.side == "Sell" and instrument.base_coin == coin:
                held += order.qty - order.cum_qty
            elif order.side == "Buy" and instrument.quote_coin == coin:
                held += (order.qty - order.cum_qty) * order.price
        return held

    def _free(self, coin: str) -> Decimal:
        return self._balances.get(coin, Decimal(0)) - self.locked(coin)

    def _match(self, symbol: str) -> None:
        """Resting orders the last price reaches: conditional orders trigger, then limits fill at their price."""
        last = self._prices[symbol]
        for order in [o for o in self._orders.values() if o.symbol == symbol and o.status == "Untriggered"]:
            rose = order.trigger_direction == 1 and last >= order.trigger_price
            fell = order.trigger_direction == 2 and last <= order.trigger_price
            if rose or fell:
                self._trigger(order, last)
        for order in [o for o in self._orders.values() if o.symbol == symbol and o.order_type == "Limit"
                      and o.status in ("New", "PartiallyFilled")]:
            reached = last >= order.price if order.side == "Sell" else last <= order.price
            if reached:
                instrument = self._instruments[symbol]
                qty = order.qty - order.cum_qty
                if order.side == "Sell":
                    qty = min(qty, self._balances.get(instrument.base_coin, Decimal(0)))
                self._fill(order, instrument, order.price, qty, rest=True, maker=True)

    def _trigger(self, order: _Order, last: Decimal) -> None:
        """A conditional order's trigger is reached: it is placed now, if the coins it spends are free."""
        instrument = self._instruments[order.symbol]
        order.updated_ms = self._now_ms()
        spend_coin = instrument.base_coin if order.side == "Sell" else instrument.quote_coin
        need = order.qty if order.side == "Sell" else order.qty * (order.price or last)
        if self._free(spend_coin) < need:
            order.status, order.reject_reason = "Rejected", "EC_InsufficientBalance"
            return
        order.status = "Triggered"
        if order.order_type == "Market":
            self._fill(order, instrument, last, order.qty)
        else:
            order.status = "New"

    def set_balance(self, coin: str, amount: float | str) -> None:
        self._balances[coin] = _dec(amount)

    def balance(self, coin: str) -> float:
        return float(self._balances.get(coin, Decimal(0)))

    def fail_next(self, *faults: Fault) -> None:
        """Queue faults; a plain kline :class:`Fault` here aims at any trading path."""
        for fault in faults:
            self._faults.append(fault if isinstance(fault, TradeFault) else TradeFault(**vars(fault)))

    def rate_limit_storm(self, count: int, path: str | None = None, reset_after_s: float = 0.0) -> None:
        """The next ``count`` trading requests (on ``path``, or any) answer retCode 10006."""
        self.fail_next(*[TradeFault.rate_limit(reset_after_s).on(path)] * count)

    def set_outage(self, status: int | None = 503, *, until: pd.Timestamp | str | None = None) -> None:
        """From now on every request, klines included, answers HTTP ``status`` with an HTML page, as the
        proxy in front of a down exchange does; until ``until`` on the fake's clock, or until
        ``set_outage(None)``. Nothing behind it changes: orders stay as they were."""
        if status is None:
            self._outage = None
            return
        end = pd.Timestamp(until) if until is not None else None
        if end is not None and end.tz is None:
            end = end.tz_localize("UTC")
        self._outage = (int(status), end)

    @property
    def outage(self) -> int | None:
        """The HTTP status every request answers now, or ``None``."""
        if self._outage is None:
            return None
        status, until = self._outage
        if until is not None and pd.Timestamp(self.now()) >= until:
            self._outage = None
            return None
        return status

    def revoke_key(self) -> None:
        """The API key is deleted on the exchange: every private request answers retCode 10003."""
        self._key_revoked = True

    def restore_key(self) -> None:
        self._key_revoked = False

    def fill_rest(self, link_id: str | None = None, price: float | str | None = None) -> list[str]:
        """Fill what is left of the open order ``link_id`` (every open order with ``None``) at ``price``
        (default: the last price), as one more execution each; returns the ``orderLinkId`` s filled.
        A buy fills only what the quote balance still pays for, as the exchange had it locked."""
        with self._lock:
            orders = [o for o in self._orders.values() if o.status in ("New", "PartiallyFilled")
                      and (o.link_id == link_id if link_id is not None else o.order_type == "Market")]
            if link_id is not None and not orders:
                raise KeyError(f"fake Bybit: no open order with orderLinkId {link_id!r}")
            for order in orders:
                instrument = self._instruments[order.symbol]
                at = _dec(price) if price is not None else self._price(order.symbol)
                if at is None:
                    continue
                base_qty = order.leaves_base(at)
                if order.side == "Buy":
                    base_qty = min(base_qty, self._balances.get(instrument.quote_coin, Decimal(0)) / at)
                else:
                    base_qty = min(base_qty, self._balances.get(instrument.base_coin, Decimal(0)))
                self._fill(order, instrument, at, base_qty, rest=True)
            return [o.link_id for o in orders]

    def executions(self, link_id: str | None = None) -> list[dict[str, str]]:
        """Every execution (oldest first), as ``/v5/execution/list`` lists them."""
        return [dict(e) for e in self._executions if link_id is None or e["orderLinkId"] == link_id]

    def snapshot(self) -> dict[str, object]:
        """The whole account, JSON-ready (what ``GET /fake/state`` answers)."""
        with self._lock:
            counts: dict[str, int] = {}
            for recorded in self.requests:
                counts[recorded.path] = counts.get(recorded.path, 0) + 1
            return {
                "now": str(pd.Timestamp(self.now())),
                "balances": {coin: _text(amount) for coin, amount in sorted(self._balances.items())},
                "instruments": {s: i.to_json()["lotSizeFilter"] for s, i in sorted(self._instruments.items())},
                "prices": {s: _text(p) for s in sorted(self._instruments) if (p := self._price(s)) is not None},
                "created": list(self.created),
                "orders": [o.to_json() for o in self._orders.values()],
                "executions": self.executions(),
                "requests": counts,
                "create_link_ids": [str(r.params.get("orderLinkId", "")) for r in self.requests if r.path == ORDER_CREATE],
                "refusals": {str(code): n for code, n in self.refusals.items()},
                "kline_requests": len(self.market.requests) if self.market is not None else 0,
                "outage": self.outage,
                "outage_answers": dict(self.outage_answers),
                "pending_faults": len(self._faults),
                "fill_fraction": self.fill_fraction,
                "key_revoked": self._key_revoked,
                "clock_skew_s": self.clock_skew_s,
                "rate_quota": self.rate_quota,
                "time_requests": self.time_requests,
            }

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    def order(self, link_id: str) -> dict[str, object] | None:
        """The order with this ``orderLinkId`` as Bybit lists it, or ``None``."""
        order_id = self._by_link.get(link_id)
        return self._orders[order_id].to_json() if order_id else None

    def sent(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    # ------------------------------------------------------------------------------------------ serving

    def install(self, httpserver) -> str:
        """Serve every path on a pytest-httpserver; returns the base URL."""
        for path in (*TRADING_PATHS, *PUBLIC_PATHS, *CONTROL_PATHS):
            httpserver.expect_request(path).respond_with_handler(self.handle)
        return httpserver.url_for("").rstrip("/")

    def wsgi_app(self, environ, start_response):
        request = Request(environ)
        known = request.path in TRADING_PATHS or request.path in (*PUBLIC_PATHS, *CONTROL_PATHS)
        response = self.handle(request) if known else Response("Not Found", status=404)
        return response(environ, start_response)

    def handle(self, request: Request) -> Response:
        """Every path (pytest-httpserver's ``respond_with_handler`` signature)."""
        if request.path in CONTROL_PATHS:
            return self._control(request)
        status = self.outage
        if status is not None:
            with self._lock:
                self.outage_answers[request.path] = self.outage_answers.get(request.path, 0) + 1
            return _proxy_page(status)
        self._fill_due()
        if request.path == KLINE_PATH:
            return self.market.handle(request)
        if request.path == MARKET_TIME:
            return self._server_time()
        raw = request.get_data(as_text=True) if request.method == "POST" else request.query_string.decode()
        try:
            params = json.loads(raw) if request.method == "POST" else dict(request.args.items())
        except ValueError:
            params = None
        with self._lock:
            self.requests.append(
                Recorded(request.method, request.path, params or {}, request.headers.get("X-BAPI-API-KEY"),
                         request.headers.get("X-BAPI-RECV-WINDOW"))
            )
            fault = self._next_fault(request.path)
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        elif fault is not None and fault.kind not in ("lost", "reject"):
            return self.market._fault_response(fault)
        if not isinstance(params, dict):
            return self._error(RET_PARAMS, "params error: body is not a JSON object")
        if request.path in PRIVATE_PATHS and self._key_revoked:
            return self._error(RET_API_KEY_INVALID, MESSAGES[RET_API_KEY_INVALID])
        limits: dict[str, str] = {}
        if request.path in PRIVATE_PATHS:
            denied = self._authenticate(request, raw)
            if denied is not None:
                return denied
            with self._lock:
                allowed, limits = self._take_quota(request.headers.get("X-BAPI-API-KEY", ""), request.path)
            if not allowed:
                self.refusals[RET_RATE_LIMIT] = self.refusals.get(RET_RATE_LIMIT, 0) + 1
                refused = self._error(RET_RATE_LIMIT, MESSAGES[RET_RATE_LIMIT])
                refused.headers.update(limits)
                return refused
        with self._lock:
            response = self._route(request.path, params, fault)
        response.headers.update(limits)
        if fault is not None and fault.kind == "lost":
            if not fault.seconds:
                return Response("Bad Gateway", status=502, mimetype="text/plain")
            time.sleep(fault.seconds)
        return response

    def _control(self, request: Request) -> Response:
        """The ``/fake/...`` endpoints: how a test in another process drives the fake."""
        if request.path == FAKE_STATE:
            return self._json(self.snapshot())
        body = json.loads(request.get_data(as_text=True) or "{}")
        with self._lock:
            if request.path == FAKE_PRICES:
                for symbol, price in body.items():
                    self.set_price(symbol, price)
            elif request.path == FAKE_OUTAGE:
                self.set_outage(body.get("status"), until=body.get("until"))
            elif request.path == FAKE_FAULTS:
                for spec in body if isinstance(body, list) else [body]:
                    self.fail_next(*TradeFault.from_json(spec))
            elif request.path == FAKE_FILL_FRACTION:
                self.fill_fraction = float(body.get("fill_fraction", 1.0))
                if "fill_rest_after_s" in body:
                    self.fill_rest_after_s = body["fill_rest_after_s"]
            elif request.path == FAKE_FILL_REST:
                return self._json({"filled": self.fill_rest(body.get("orderLinkId"), body.get("price"))})
            elif request.path == FAKE_BALANCE:
                for coin, amount in body.items():
                    self.set_balance(coin, str(amount))
            elif request.path == FAKE_KEY:
                self._key_revoked = bool(body.get("revoked", True))
        return self._json({"ok": True})

    def _fill_due(self) -> None:
        """With ``fill_rest_after_s``: fill the rest of every partly filled order that waited that long."""
        if self.fill_rest_after_s is None:
            return
        with self._lock:
            now_ms = self._now_ms()
            for order in list(self._orders.values()):
                if order.status == "PartiallyFilled" and now_ms - order.created_ms >= self.fill_rest_after_s * 1000:
                    self.fill_rest(order.link_id)

    def _next_fault(self, path: str) -> TradeFault | None:
        for fault in self._faults:
            if fault.path in (None, path):
                self._faults.remove(fault)
                return fault
        return None

    def _authenticate(self, request: Request, payload: str) -> Response | None:
        """Bybit's checks, in its order: the key, the timestamp against the recv window, the signature."""
        key = request.headers.get("X-BAPI-API-KEY", "")
        sign = request.headers.get("X-BAPI-SIGN", "")
        timestamp = request.headers.get("X-BAPI-TIMESTAMP", "")
        recv_window = request.headers.get("X-BAPI-RECV-WINDOW", "5000")
        if not hmac.compare_digest(key, self.api_key):
            return self._error(RET_API_KEY_INVALID, MESSAGES[RET_API_KEY_INVALID])
        try:
            server_ms, ts, window = self._server_ms(), int(timestamp), int(recv_window)
            window, lead = int(window * self.clock_speed), int(1000 * self.clock_speed)
        except ValueError:
            return self._error(RET_PARAMS, "params error: X-BAPI-TIMESTAMP and X-BAPI-RECV-WINDOW must be integers")
        if not server_ms - window <= ts < server_ms + lead:
            with self._lock:
                self.refusals[RET_RECV_WINDOW] = self.refusals.get(RET_RECV_WINDOW, 0) + 1
            return self._error(
                RET_RECV_WINDOW,
                f"invalid request, please check your server timestamp or recv_window param. "
                f"req_timestamp[{ts}],server_timestamp[{server_ms}],recv_window[{window}]",
            )
        origin = f"{timestamp}{key}{recv_window}{payload}"
        expected = hmac.new(self.api_secret.encode(), origin.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(sign, expected):
            return self._error(RET_SIGN, f"error sign! origin_string[{origin}]")
        return None

    def _server_ms(self) -> int:
        """Our server clock: real time (the recv window is real, see ``clock_speed``) plus ``clock_skew_s``."""
        return int((time.time() + self.clock_skew_s) * 1000)

    def _server_time(self) -> Response:
        """``/v5/market/time`` as Bybit answers it."""
        with self._lock:
            self.time_requests += 1
        ns = time.time_ns() + round(self.clock_skew_s * 1e9)
        body = {"retCode": 0, "retMsg": "OK", "result": {"timeSecond": str(ns // 10**9), "timeNano": str(ns)},
                "retExtInfo": {}, "time": ns // _MS}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")

    def _take_quota(self, api_key: str, path: str) -> tuple[bool, dict[str, str]]:
        """Count one request against (key, endpoint)'s window: whether it is allowed, and the headers to send."""
        limit = self.rate_quota if self.rate_quota is not None else UNLIMITED_QUOTA
        now_ms, window = self._now_ms(), max(1, round(self.rate_window_s * 1000))
        start, used = self._rate_windows.get((api_key, path), (now_ms, 0))
        if now_ms >= start + window:
            start, used = now_ms, 0
        allowed = used < limit
        if allowed:
            used += 1
            self._rate_windows[(api_key, path)] = (start, used)
        left = max(limit - used, 0)
        reset = start + window if left == 0 else now_ms  # Bybit: the reset once exceeded, else the current time
        return allowed, {"X-Bapi-Limit": str(limit), "X-Bapi-Limit-Status": str(left),
                         "X-Bapi-Limit-Reset-Timestamp": str(reset)}

    def _route(self, path: str, params: dict, fault: TradeFault | None) -> Response:
        handlers = {
            ORDER_CREATE: lambda: self._create(params, fault),
            ORDER_CANCEL: lambda: self._cancel(params),
            ORDER_REALTIME: lambda: self._list_orders(params, open_=True),
            ORDER_HISTORY: lambda: self._list_orders(params, open_=False),
            EXECUTION_LIST: lambda: self._list_executions(params),
            WALLET_BALANCE: lambda: self._wallet(params),
            INSTRUMENTS_INFO: lambda: self._instruments_info(params),
        }
        try:
            return self._ok(handlers[path]())
        except _Refused as refused:
            self.refusals[refused.ret_code] = self.refusals.get(refused.ret_code, 0) + 1
            return self._error(refused.ret_code, str(refused))

    # ------------------------------------------------------------------------------------------- orders

    def _create(self, params: dict, fault: TradeFault | None) -> dict[str, object]:
        if params.get("category") != "spot":
            raise _Refused(RET_PARAMS, "params error: this fake trades category spot only")
        instrument = self._instruments.get(str(params.get("symbol")))
        if instrument is None:
            raise _Refused(RET_INVALID_SYMBOL)
        side, unit = params.get("side"), params.get("marketUnit")
        if side not in ("Buy", "Sell"):
            raise _Refused(RET_PARAMS, "params error: side invalid")
        order_type, order_filter = params.get("orderType"), str(params.get("orderFilter") or "Order")
        if order_type not in ("Market", "Limit"):
            raise _Refused(RET_PARAMS, "params error: orderType invalid")
        if order_filter not in ("Order", "StopOrder"):
            raise _Refused(RET_PARAMS, "params error: this fake takes orderFilter Order or StopOrder only")
        limit_price = _parse(params.get("price")) if order_type == "Limit" else None
        trigger = _parse(params.get("triggerPrice")) if order_filter == "StopOrder" else None
        if order_type == "Limit" and (limit_price is None or limit_price <= 0):
            raise _Refused(RET_PARAMS, "params error: price invalid")
        if order_filter == "StopOrder" and (trigger is None or trigger <= 0):
            raise _Refused(RET_PARAMS, "params error: triggerPrice invalid")
        link_id = str(params.get("orderLinkId") or f"fake-{len(self._orders) + 1}")
        if not LINK_ID.match(link_id):
            raise _Refused(RET_PARAMS, "params error: orderLinkId invalid")
        if link_id in self._by_link and (
            self.unique_link_ids or self._orders[self._by_link[link_id]].status in OPEN_STATUSES
        ):
            raise _Refused(RET_DUPLICATE_LINK_ID_UNIFIED if self.unified_account else RET_DUPLICATE_LINK_ID)
        unit = unit or ("quoteCoin" if side == "Buy" and order_type == "Market" else "baseCoin")  # Bybit's defaults
        if order_type == "Limit":
            unit = "baseCoin"  # a limit order's qty is always in base coin
        if unit not in ("quoteCoin", "baseCoin"):
            raise _Refused(RET_PARAMS, "params error: marketUnit invalid")
        qty = _parse(params.get("qty"))
        if qty is None or qty <= 0:
            raise _Refused(RET_PARAMS, "params error: qty invalid")
        price = self._price(instrument.symbol)
        if price is None:
            raise AssertionError(f"fake Bybit: no price for {instrument.symbol}; call set_price() first")
        step = instrument.quote_precision if unit == "quoteCoin" else instrument.base_precision
        if qty % step:
            raise _Refused(RET_AMOUNT_DECIMALS if unit == "quoteCoin" else RET_QTY_DECIMALS)
        for level in (limit_price, trigger):
            if level is not None and level % instrument.tick_size:
                raise _Refused(RET_PARAMS, "params error: price or triggerPrice is not a multiple of tickSize")
        at = limit_price or trigger or price  # what the order is valued at
        base_qty = qty if unit == "baseCoin" else qty / at
        value = qty if unit == "quoteCoin" else qty * at
        if unit == "baseCoin" and instrument.min_order_qty is not None and qty < instrument.min_order_qty:
            raise _Refused(RET_QTY_TOO_SMALL)
        if value < instrument.min_order_amt:
            raise _Refused(RET_VALUE_TOO_SMALL)
        spend_coin, spend = (instrument.quote_coin, value) if side == "Buy" else (instrument.base_coin, base_qty)
        if trigger is None and self._free(spend_coin) < spend:  # a conditional order holds nothing until it triggers
            raise _Refused(RET_INSUFFICIENT_BALANCE)

        now_ms = self._now_ms()
        order = _Order(f"{1_900_000_000_000_000_000 + len(self._orders) + 1}", link_id, instrument.symbol,
                       side, qty, unit, now_ms, order_type=str(order_type), price=limit_price or Decimal(0),
                       order_filter=order_filter)
        self._orders[order.order_id] = order
        self._by_link[link_id] = order.order_id
        if fault is not None and fault.kind == "reject":
            order.status, order.reject_reason = "Rejected", fault.message
        elif trigger is not None:
            order.status, order.trigger_price = "Untriggered", trigger
            order.trigger_direction = 1 if trigger > price else 2
        elif order_type == "Limit":
            reached = price >= limit_price if side == "Sell" else price <= limit_price
            if reached:  # marketable: fills now (at the last price, better than or at its limit)
                self._fill(order, instrument, price, base_qty, rest=True)
        else:
            self._fill(order, instrument, price, base_qty * _dec(self.fill_fraction))
        self.created.append(order.to_json())
        return {"orderId": order.order_id, "orderLinkId": link_id}

    def _fill(self, order: _Order, instrument: _Instrument, price: Decimal, base_qty: Decimal, *,
              rest: bool = False, maker: bool = False) -> None:
        """One execution of ``base_qty`` (down to the lot size) at ``price``; fees in the coin received.
        ``rest``: a later fill of an order already partly filled (nothing to fill leaves it as it is)."""
        qty = _floor(base_qty, instrument.base_precision)
        if qty <= 0:
            if not rest:
                order.status = "Cancelled"
            return
        value, rate = qty * price, _dec(self.taker_fee)
        base, quote = instrument.base_coin, instrument.quote_coin
        if order.side == "Buy":
            fee, fee_coin = qty * rate, base
            self._balances[quote] = self._balances.get(quote, Decimal(0)) - value
            self._balances[base] = self._balances.get(base, Decimal(0)) + qty - fee
        else:
            fee, fee_coin = value * rate, quote
            self._balances[base] = self._balances.get(base, Decimal(0)) - qty
            self._balances[quote] = self._balances.get(quote, Decimal(0)) + value - fee
        order.cum_qty += qty
        order.cum_value += value
        order.fee += fee
        order.fee_coin = fee_coin
        order.updated_ms = self._now_ms()
        whole = order.order_type == "Market" and not rest and self.fill_fraction >= 1
        order.status = "Filled" if order.done(instrument, price) or whole else "PartiallyFilled"
        self._executions.append(
            {
                "symbol": order.symbol,
                "orderId": order.order_id,
                "orderLinkId": order.link_id,
                "side": order.side,
                "orderPrice": _text(order.price) if order.price else "0",
                "orderQty": _text(order.qty),
                "leavesQty": _text(max(order.leaves_base(price), Decimal(0)) if order.status in OPEN_STATUSES
                                   else Decimal(0)),
                "orderType": order.order_type,
                "stopOrderType": "Stop" if order.trigger_price else "",
                "execFee": _text(fee),
                "feeCurrency": fee_coin,
                "execId": f"fake-exec-{len(self._executions) + 1:06d}",
                "execPrice": _text(price),
                "execQty": _text(qty),
                "execType": "Trade",
                "execValue": _text(value),
                "execTime": str(order.updated_ms),
                "isMaker": maker,
                "feeRate": _text(rate),
                "markPrice": "",
                "closedSize": "",
                "seq": len(self._executions) + 1,
                "createType": "CreateByUser",
            }
        )

    def _cancel(self, params: dict) -> dict[str, object]:
        order = self._find(params)
        if order is None or order.status not in OPEN_STATUSES or order.symbol != params.get("symbol"):
            raise _Refused(RET_ORDER_NOT_EXISTS)
        if (order.status == "Untriggered") != (params.get("orderFilter") == "StopOrder"):
            raise _Refused(RET_ORDER_NOT_EXISTS)  # Bybit spot: a conditional order is found under StopOrder only
        order.status = "PartiallyFilledCanceled" if order.cum_qty else ("Deactivated" if order.status == "Untriggered"
                                                                          else "Cancelled")
        order.cancel_type = "CancelByUser"
        order.updated_ms = self._now_ms()
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def _find(self, params: Mapping[str, object]) -> _Order | None:
        order_id = params.get("orderId") or self._by_link.get(str(params.get("orderLinkId")))
        return self._orders.get(str(order_id)) if order_id else None

    # -------------------------------------------------------------------------------------------- reads

    def _list_orders(self, params: dict, *, open_: bool) -> dict[str, object]:
        if params.get("category") != "spot":
            raise _Refused(RET_PARAMS, "params error: category invalid")
        orders = [o for o in reversed(self._orders.values()) if (o.status in OPEN_STATUSES) == open_]
        if params.get("orderFilter"):  # a unified account lists every kind unless asked for one
            orders = [o for o in orders if o.order_filter == params["orderFilter"]]
        for key, attr in (("symbol", "symbol"), ("orderId", "order_id"), ("orderLinkId", "link_id")):
            if params.get(key):
                orders = [o for o in orders if getattr(o, attr) == params[key]]
        page, cursor = _page([o.to_json() for o in orders], params, default=20, most=50)
        return {"list": page, "nextPageCursor": cursor, "category": "spot"}

    def _list_executions(self, params: dict) -> dict[str, object]:
        if params.get("category") != "spot":
            raise _Refused(RET_PARAMS, "params error: category invalid")
        start, end = _int(params.get("startTime")), _int(params.get("endTime"))
        if start is None and end is None:
            end = self._now_ms()
        if start is None:
            start = end - SEVEN_DAYS_MS
        if end is None:
            end = start + SEVEN_DAYS_MS
        if end - start > SEVEN_DAYS_MS:
            raise _Refused(RET_PARAMS, "params error: The time range between startTime and endTime cannot exceed 7 days.")
        rows = [e for e in reversed(self._executions) if start <= int(e["execTime"]) <= end]
        for key in ("symbol", "orderId", "orderLinkId"):
            if params.get(key):
                rows = [e for e in rows if e[key] == params[key]]
        page, cursor = _page(rows, params, default=50, most=100)
        return {"list": page, "nextPageCursor": cursor, "category": "spot"}

    def _wallet(self, params: dict) -> dict[str, object]:
        if params.get("accountType") != "UNIFIED":
            raise _Refused(RET_PARAMS, "accountType only support UNIFIED.")
        wanted = set(str(params["coin"]).split(",")) if params.get("coin") else None
        coins = []
        for coin, amount in sorted(self._balances.items()):
            if amount == 0 or (wanted is not None and coin not in wanted):
                continue  # Bybit leaves out coins with nothing in them
            usd = self._usd(coin, amount)
            coins.append(
                {
                    "coin": coin,
                    "equity": _text(amount),
                    "usdValue": _text(usd) if usd is not None else "",
                    "walletBalance": _text(amount),
                    "locked": _text(self.locked(coin)),
                    "spotHedgingQty": "0",
                    "borrowAmount": "0",
                    "accruedInterest": "0",
                    "totalOrderIM": "0",
                    "totalPositionIM": "0",
                    "totalPositionMM": "0",
                    "unrealisedPnl": "0",
                    "cumRealisedPnl": "0",
                    "bonus": "0",
                    "marginCollateral": True,
                    "collateralSwitch": True,
                    "availableToWithdraw": "",
                }
            )
        total = sum((self._usd(c, a) or Decimal(0)) for c, a in self._balances.items())
        account = {
            "accountType": "UNIFIED",
            "totalEquity": _text(total),
            "totalWalletBalance": _text(total),
            "totalMarginBalance": _text(total),
            "totalAvailableBalance": _text(total),
            "totalPerpUPL": "0",
            "totalInitialMargin": "0",
            "totalMaintenanceMargin": "0",
            "accountIMRate": "0",
            "accountMMRate": "0",
            "accountLTV": "0",
            "coin": coins,
        }
        return {"list": [account]}

    def _instruments_info(self, params: dict) -> dict[str, object]:
        if params.get("category") not in ("spot", "linear", "inverse", "option"):
            raise _Refused(RET_PARAMS, "params error: category invalid")
        rows = [i.to_json() for i in self._instruments.values()] if params.get("category") == "spot" else []
        if params.get("symbol"):
            rows = [r for r in rows if r["symbol"] == params["symbol"]]
        return {"category": params["category"], "list": rows, "nextPageCursor": ""}

    def _usd(self, coin: str, amount: Decimal) -> Decimal | None:
        if coin in ("USDT", "USDC", "USD"):
            return amount
        price = self._price(f"{coin}USDT")
        return amount * price if price is not None else None

    def _price(self, symbol: str) -> Decimal | None:
        """The price set by :meth:`set_price`, else the open of the market fake's newest opened candle."""
        if symbol in self._prices:
            return self._prices[symbol]
        latest = self.market.latest_open(symbol) if self.market is not None else None
        return _dec(latest) if latest is not None else None

    # ---------------------------------------------------------------------------------------- responses

    def _ok(self, result: dict[str, object]) -> Response:
        return self._json({"retCode": 0, "retMsg": "OK", "result": result})

    def _error(self, ret_code: int, message: str) -> Response:
        return self._json({"retCode": ret_code, "retMsg": message, "result": {}})

    def _json(self, body: dict) -> Response:
        body = {**body, "retExtInfo": {}, "time": self._now_ms()}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")

    def _now_ms(self) -> int:
        return pd.Timestamp(self.now()).value // _MS


# --------------------------------------------------------------------------------------------- helpers


def _dec(value: float | str | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(value if isinstance(value, str) else repr(value))


def _parse(value: object) -> Decimal | None:
    """Bybit takes quantities as strings; a float would reach us in exponent notation and is refused."""
    if not isinstance(value, str) or "e" in value.lower():
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        return None


def _int(value: object) -> int | None:
    return int(str(value)) if value not in (None, "") else None


def _floor(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_DOWN) * step


def _text(value: Decimal) -> str:
    """Plain decimal text without trailing zeros ("0.0001", "61200"), as Bybit writes numbers."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _page(rows: list, params: Mapping[str, object], *, default: int, most: int) -> tuple[list, str]:
    """Bybit's cursor paging; the cursor here is an offset, opaque to the client as Bybit's is."""
    limit = min(int(str(params.get("limit") or default)), most)
    offset = int(str(params.get("cursor") or 0))
    page = rows[offset : offset + limit]
    return page, (str(offset + limit) if offset + limit < len(rows) else "")


def _proxy_page(status: int) -> Response:
    """What a client sees when the exchange is down: the proxy's HTML, not Bybit's JSON."""
    reason = HTTP_STATUS_CODES.get(status, "Error")
    html = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} {reason}"
            f"</h1></center>\r\n<hr><center>openresty</center>\r\n</body>\r\n</html>\r\n")
    return Response(html, status=status, mimetype="text/html", headers={"Retry-After": "60"})


class FakeExchangeControl:
    """Drives a fake running in another process through its ``/fake/...`` endpoints (loopback only)."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def outage(self, status: int | None = 503, until: pd.Timestamp | str | None = None) -> None:
        self._post(FAKE_OUTAGE, {"status": status, "until": str(until) if until is not None else None})

    def faults(self, *specs: Mapping[str, object]) -> None:
        """Queue faults, e.g. ``faults({"kind": "rate_limit", "count": 8}, {"kind": "lost", "stall_s": 4})``."""
        self._post(FAKE_FAULTS, list(specs))

    def fill_fraction(self, fraction: float, fill_rest_after_s: float | None = None) -> None:
        self._post(FAKE_FILL_FRACTION, {"fill_fraction": fraction, "fill_rest_after_s": fill_rest_after_s})

    def fill_rest(self, link_id: str | None = None) -> list[str]:
        return self._post(FAKE_FILL_REST, {"orderLinkId": link_id} if link_id else {})["filled"]

    def balance(self, **amounts: float | str) -> None:
        self._post(FAKE_BALANCE, {coin: str(amount) for coin, amount in amounts.items()})

    def prices(self, **prices: float | str) -> None:
        self._post(FAKE_PRICES, {symbol: str(price) for symbol, price in prices.items()})

    def revoke_key(self, revoked: bool = True) -> None:
        self._post(FAKE_KEY, {"revoked": revoked})

    def state(self) -> dict:
        with urllib.request.urlopen(self.base_url + FAKE_STATE, timeout=self.timeout_s) as answer:
            return json.loads(answer.read())

    def _post(self, path: str, body: object) -> dict:
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
            return json.loads(answer.read())


def _prices(pairs: Iterable[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        symbol, _, price = pair.partition("=")
        out[symbol] = price
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Bybit v5 spot exchange on 127.0.0.1 (offline runs).")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--data", type=Path, default=Path("data/sample"), help="folder of SYMBOL_TF.parquet files")
    parser.add_argument("--price", action="append", default=[], metavar="SYMBOL=PRICE")
    parser.add_argument("--usdt", type=float, default=10_000.0, help="starting USDT balance")
    parser.add_argument("--fill-fraction", type=float, default=1.0, help="share of each market order that fills")
    parser.add_argument("--fill-rest-after", type=float, default=None, metavar="SECONDS",
                        help="the rest of a partly filled order fills this many fake-clock seconds later")
    parser.add_argument("--weak-link-ids", action="store_true",
                        help="refuse a repeated orderLinkId only while its first order is open (so an order sent "
                             "twice is taken twice: what a chaos run counts)")
    parser.add_argument("--unified-account", action="store_true",
                        help="refuse a repeated orderLinkId with 110072 (unified account) instead of 170141")
    parser.add_argument("--clock-skew", type=float, default=0.0, metavar="SECONDS",
                        help="the server clock runs this far ahead of real time (10002 for clients that ignore it)")
    parser.add_argument("--rate-quota", type=int, default=None, metavar="N",
                        help="requests per API key and endpoint per second before retCode 10006")
    parser.add_argument("--clock-speed", type=float, default=1.0,
                        help="the clocks run this many times faster than real time (libfaketime x360: 360)")
    parser.add_argument("--shift-to-now", action="store_true",
                        help="move the candles by whole days so the newest day is today: a new candle opens every "
                             "bar, as on the exchange, and market orders fill at the newest candle's open")
    args = parser.parse_args(argv)
    market = FakeBybit.from_folder(args.data)
    if args.shift_to_now:
        market.shift_to_now()
    fake = FakeBybitExchange(balances={"USDT": args.usdt}, market=market, fill_fraction=args.fill_fraction,
                             fill_rest_after_s=args.fill_rest_after, clock_speed=args.clock_speed,
                             unique_link_ids=not args.weak_link_ids, unified_account=args.unified_account,
                             clock_skew_s=args.clock_skew, rate_quota=args.rate_quota)
    for symbol in sorted({key[1] for key in market.datasets}):
        if symbol not in fake._instruments:
            fake.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001", min_order_qty="0.0001")
    for symbol, price in _prices(args.price).items():
        fake.set_price(symbol, price)
    server = make_server("127.0.0.1", args.port, fake.wsgi_app, threaded=True)
    print(
        f"fake Bybit v5 exchange on http://127.0.0.1:{server.port} (klines, spot orders, wallet); "
        f"BYBIT_API_KEY={fake.api_key} BYBIT_API_SECRET={fake.api_secret}",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        server.serve_forever()


if __name__ == "__main__":
    main()
