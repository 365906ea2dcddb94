"""What the trader needs from an exchange, whatever the exchange: market orders addressed by our own client id,
order and execution queries by that id, wallet balances and the instrument rules (lot size, tick size,
minimum order value). :class:`pricelevel.trading.bybit.BybitBroker` implements it on Bybit v5; the tests'
fake exchange speaks the same wire format.

Every order is identified by a client id derived from (model version, symbol, bar time, intent)
(:func:`client_id`), so a retry or a restart can never send a second order for the same decision: an order
whose fate is unknown (a timeout, a lost response) is looked up by that id, never sent blindly again.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from enum import StrEnum
from typing import Protocol

import pandas as pd

#: Bybit's ``orderLinkId``: at most 36 characters of ``[A-Za-z0-9_-]``.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,36}$")


class Side(StrEnum):
    BUY = "Buy"
    SELL = "Sell"


class OrderStatus(StrEnum):
    """NEW (committed, not sent) -> SENT -> ACKED | UNKNOWN -> FILLED / PARTIAL / REJECTED / CANCELLED."""

    NEW = "NEW"
    SENT = "SENT"
    ACKED = "ACKED"
    UNKNOWN = "UNKNOWN"
    PARTIAL = "PARTIAL"
    FILLED = "FILLED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        return self in (OrderStatus.FILLED, OrderStatus.REJECTED, OrderStatus.CANCELLED)


def client_id(model_version: str, symbol: str, bar_time: pd.Timestamp, intent: str) -> str:
    """The order's id at the exchange, the same for the same decision on every retry and restart:
    ``pl-`` + 32 hex digits of sha256(version, symbol, bar open time in ns, intent) = 35 characters."""
    key = f"{model_version}|{symbol}|{pd.Timestamp(bar_time).value}|{intent}"
    return "pl-" + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Instrument:
    """The exchange's rules for one spot symbol (Bybit ``get_instruments_info``)."""

    symbol: str
    base_coin: str
    quote_coin: str
    #: Smallest step of a base quantity (``lotSizeFilter.basePrecision``).
    base_precision: float
    #: Smallest step of a quote amount (``lotSizeFilter.quotePrecision``).
    quote_precision: float
    #: Smallest order value in quote coin (``lotSizeFilter.minOrderAmt``) and smallest base quantity.
    min_order_amount: float
    min_order_qty: float
    #: Smallest price step (``priceFilter.tickSize``).
    tick_size: float

    def round_qty(self, qty: float) -> float:
        """Down to the base precision: never more than we hold or meant to sell."""
        return _floor(qty, self.base_precision)

    def round_amount(self, amount: float) -> float:
        """Down to the quote precision: never more than we meant to spend."""
        return _floor(amount, self.quote_precision)

    def round_price(self, price: float) -> float:
        return _floor(price, self.tick_size)


def _floor(value: float, step: float) -> float:
    if step <= 0 or not math.isfinite(value):
        return value
    steps = (Decimal(repr(value)) / Decimal(repr(step))).to_integral_value(rounding=ROUND_DOWN)
    return float(steps * Decimal(repr(step)))


@dataclass(frozen=True)
class MarketOrder:
    """An order intent: buy ``quote_amount`` of quote coin worth, or sell ``base_qty`` of base coin, at market.

    ``price_hint`` (optional) is the price the caller expects, e.g. the last close: a broker checks a sell's
    value against the exchange's minimum order value with it before sending (a market order has no price).
    """

    client_id: str
    symbol: str
    side: Side
    quote_amount: float | None = None
    base_qty: float | None = None
    price_hint: float | None = None

    def __post_init__(self) -> None:
        if not CLIENT_ID_PATTERN.match(self.client_id):
            raise ValueError(f"client id {self.client_id!r} is not 1-36 characters of [A-Za-z0-9_-]")
        if (self.side is Side.BUY) != (self.quote_amount is not None) or (self.side is Side.SELL) != (self.base_qty is not None):
            raise ValueError("a buy is sized in quote coin (quote_amount), a sell in base coin (base_qty)")


@dataclass(frozen=True)
class RestingOrder:
    """A sell that waits at the exchange for its price, so an open position is protected between closes and while
    the trader is away. With ``trigger_price`` it is a conditional order, which holds no coins until the last price
    reaches the trigger: then it is placed as a limit sell at ``limit_price`` (the take-profit: it fills at that
    price, as the backtest fills a take-profit) or, without one, at market (the stop-loss). ``limit_price`` alone
    is a plain limit sell (it holds the coins while it rests). Sized in base coin."""

    client_id: str
    symbol: str
    base_qty: float
    limit_price: float | None = None
    trigger_price: float | None = None

    def __post_init__(self) -> None:
        if not CLIENT_ID_PATTERN.match(self.client_id):
            raise ValueError(f"client id {self.client_id!r} is not 1-36 characters of [A-Za-z0-9_-]")
        if self.limit_price is None and self.trigger_price is None:
            raise ValueError("a resting order has a limit price, a trigger price, or both")
        for price in (self.limit_price, self.trigger_price):
            if price is not None and not (price > 0 and math.isfinite(price)):
                raise ValueError(f"a resting order's price must be positive, got {price}")
        if not self.base_qty > 0:
            raise ValueError(f"a resting order needs a positive quantity, got {self.base_qty}")

    @property
    def conditional(self) -> bool:
        return self.trigger_price is not None

    @property
    def side(self) -> Side:
        return Side.SELL  # long only: a resting order closes a holding

    @property
    def price(self) -> float:
        """The price it sells at (a limit) or from (a stop's trigger): what its value is checked with."""
        return float(self.limit_price if self.limit_price is not None else self.trigger_price)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OrderReport:
    """What the exchange says about one order."""

    client_id: str
    status: OrderStatus
    exchange_id: str | None = None
    #: Base quantity filled so far, its average price and the fees paid (in quote coin).
    filled_qty: float = 0.0
    avg_price: float = 0.0
    fee: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Execution:
    """One fill (Bybit ``get_executions``)."""

    exec_id: str
    client_id: str
    symbol: str
    side: Side
    qty: float
    price: float
    fee: float
    time: pd.Timestamp


class OrderRefused(RuntimeError):
    """The exchange rejected the order for good (insufficient balance, below the minimum, bad symbol)."""


class ExchangeUnavailable(RuntimeError):
    """The exchange could not be reached after the retries; what happened to an order is unknown."""


class CredentialsRefused(RuntimeError):
    """The exchange refuses the API key itself (unknown, wrong secret, no permission, IP not allowed): nothing
    will work until a person fixes it, so the service stops with this one line instead of retrying forever."""


class ExchangeClient(Protocol):
    """A spot exchange account, as the trader uses it."""

    name: str

    def instrument(self, symbol: str) -> Instrument: ...

    def place_market_order(self, order: MarketOrder) -> OrderReport:
        """Send; returns ACKED (or FILLED) with the exchange's id. Raises :class:`OrderRefused` for a reject and
        :class:`ExchangeUnavailable` when the outcome is unknown (the caller then queries by client id)."""
        ...

    def query_order(self, client_id: str) -> OrderReport | None:
        """The order with this client id (open orders, then the history), ``None`` if the exchange never saw it."""
        ...

    def place_resting_order(self, order: RestingOrder) -> OrderReport:
        """Send a resting sell (see :class:`RestingOrder`); ACKED while it waits. Raises like
        :meth:`place_market_order`."""
        ...

    def open_orders(self) -> list[OrderReport]: ...

    def cancel_order(self, symbol: str, client_id: str, conditional: bool = False) -> OrderReport:
        """Cancel by client id (``conditional``: a stop order that has not triggered, which Bybit spot files
        apart); an order that is no longer open is reported as it ended."""
        ...

    def executions(self, start: pd.Timestamp | None = None) -> list[Execution]: ...

    def balances(self) -> dict[str, float]:
        """Wallet balance per coin (spot holdings are balances: Bybit's position list is derivatives only)."""
        ...
