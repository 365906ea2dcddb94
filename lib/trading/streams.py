"""Bybit's public v5 kline stream (``kline.{interval}.{symbol}``) through pybit's ``WebSocket``: each candle
as the exchange closes it, instead of polling REST after every bar.

pybit runs its callbacks on its own thread, and a callback that raises ends the stream for good; so the
callback here only parses the message and hands what it found to ``deliver`` (a thread-safe queue's
``put``, or :func:`to_loop` for an asyncio queue), never raising. pybit reconnects only on some errors and
not on a clean close, so :class:`KlineStream` watches the connection itself: a closed socket, or one silent
longer than ``silent_after_s`` (a healthy stream pushes every subscribed topic every 1-60 s), is dropped,
said (:class:`StreamDown`) and opened again; each open is said too (:class:`StreamUp`), so a feed knows which
candles may have been missed in between and fetches them over REST.

pybit builds its URL from a template (``wss://stream{SUBDOMAIN}.{DOMAIN}.com/v5/public/spot``) and takes no
URL argument: :func:`stream_url` gives the URL for a mode or an override (a local server), and the socket
opened here is pointed at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pricelevel.core.secrets import Secrets, redact
from pricelevel.core.timeframes import Timeframe
from pricelevel.trading.bybit import Coins, fee_in_quote, order_report, received_coin
from pricelevel.trading.exchange import OrderReport, OrderStatus, Side
from pricelevel.trading.state import StateStore

log = logging.getLogger(__name__)

PUBLIC_SPOT_PATH = "/v5/public/spot"
#: pybit's public hosts: demo trading takes its public market data from mainnet (Bybit documents this), and so
#: does paper trading (it trades the real market's candles, as its REST feed does).
PUBLIC_HOSTS = {"mainnet": "wss://stream.bybit.com", "demo": "wss://stream.bybit.com",
                "paper": "wss://stream.bybit.com", "testnet": "wss://stream-testnet.bybit.com"}
#: Bybit spot accepts at most 10 topics per subscribe request.
TOPICS_PER_REQUEST = 10
TIMEFRAME_BY_INTERVAL = {tf.bybit_interval: tf for tf in Timeframe}


def stream_url(mode: str, endpoint: str | None = None) -> str:
    """The public spot stream's URL: ``endpoint`` (a local server, ``ws://127.0.0.1:8766``) with the public
    path appended, else pybit's host for ``mode`` (demo reads mainnet's public stream)."""
    if endpoint:
        return endpoint.rstrip("/") + PUBLIC_SPOT_PATH
    if mode not in PUBLIC_HOSTS:
        raise ValueError(f"no public stream for mode {mode!r}")
    return PUBLIC_HOSTS[mode] + PUBLIC_SPOT_PATH


def topic(symbol: str, timeframe: Timeframe) -> str:
    return f"kline.{Timeframe(timeframe).bybit_interval}.{symbol}"


@dataclass(frozen=True)
class PushedCandle:
    """One kline as pushed; ``timestamp`` is its open time (UTC), ``confirmed`` Bybit's ``confirm`` (the
    candle's last push, after its close); ``received`` the wall-clock second it reached us."""

    symbol: str
    timeframe: Timeframe
    timestamp: pd.Timestamp
    open: float
    high: float
    low: float
    close: float
    volume: float
    turnover: float
    confirmed: bool
    received: float

    @property
    def values(self) -> dict[str, float]:
        return {"open": self.open, "high": self.high, "low": self.low, "close": self.close,
                "volume": self.volume, "turnover": self.turnover}


@dataclass(frozen=True)
class StreamUp:
    """The stream is (again) open and subscribed at ``at`` (wall-clock seconds)."""

    at: float


@dataclass(frozen=True)
class StreamDown:
    """The stream is down: nothing has been heard since ``since`` (wall-clock seconds; ``None`` if it never
    opened), for ``reason``."""

    since: float | None
    reason: str


StreamEvent = PushedCandle | StreamUp | StreamDown


def parse_kline_message(message: Mapping[str, Any], received: float) -> list[PushedCandle]:
    """The klines of one pushed message (none for a command answer or another topic). A malformed kline
    raises ``ValueError``/``KeyError``/``TypeError``; the caller decides what that means."""
    name = message.get("topic")
    if not isinstance(name, str) or not name.startswith("kline."):
        return []
    _, interval, symbol = name.split(".", 2)
    timeframe = TIMEFRAME_BY_INTERVAL.get(interval)
    if timeframe is None:
        return []
    return [
        PushedCandle(
            symbol, timeframe, pd.Timestamp(int(row["start"]), unit="ms", tz="UTC"),
            *(_number(row.get(column)) for column in ("open", "high", "low", "close", "volume", "turnover")),
            confirmed=row.get("confirm") is True, received=received,
        )
        for row in message["data"]
    ]


def _number(value: Any) -> float:
    """Bybit writes numbers as strings; a missing or empty one is NaN (validation names it)."""
    return float("nan") if value is None or value == "" else float(value)


def to_loop(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[StreamEvent], None]:
    """``deliver`` for an asyncio consumer: each event is put on ``queue`` from the loop's own thread."""

    def deliver(event: StreamEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the service is stopping
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return deliver


def _pointed_socket(url: str, on_message: Callable[[dict], None], ping_interval_s: float, ping_timeout_s: float):
    """pybit's public spot ``WebSocket``, connected to ``url`` instead of its template's host; every message
    goes to ``on_message`` (pybit's own subscription bookkeeping races a fast server's answer, so it is
    bypassed), and pybit does not reconnect: :class:`KlineStream` does. (pybit 5.17 raises after its last
    attempt even when that attempt connected: ``retries=2`` is one try that can succeed, then one more.)"""
    from pybit.unified_trading import WebSocket

    class PointedWebSocket(WebSocket):
        def _connect(self, _template: str) -> None:
            super()._connect(url)

    return PointedWebSocket(
        channel_type="spot", testnet=False, callback_function=on_message, restart_on_error=False, retries=2,
        ping_interval=ping_interval_s, ping_timeout=ping_timeout_s,
    )


class KlineStream:
    """Closed (and, with ``confirmed_only=False``, still open) candles of ``symbols`` x ``timeframes`` from
    ``url``, handed to ``deliver`` as :data:`StreamEvent` s on pybit's thread (``deliver`` must be quick and
    thread-safe; an exception from it is logged, never raised into pybit).

    :meth:`start` runs a daemon thread that opens the socket, subscribes, and watches it every
    ``check_s``: closed, or silent for ``silent_after_s``, it is dropped and opened again after
    ``reconnect_s`` (doubling up to ``reconnect_max_s`` while it fails). ``now``: wall-clock seconds.
    """

    def __init__(
        self, url: str, symbols: Sequence[str], timeframes: Sequence[Timeframe],
        deliver: Callable[[StreamEvent], None], *, silent_after_s: float = 120.0, confirmed_only: bool = True,
        reconnect_s: float = 1.0, reconnect_max_s: float = 30.0, check_s: float = 0.1,
        ping_interval_s: float = 20.0, ping_timeout_s: float = 10.0, now: Callable[[], float] = time.time,
        open_socket: Callable[..., Any] = _pointed_socket,
    ) -> None:
        self.url, self.symbols, self.timeframes = url, tuple(symbols), tuple(Timeframe(tf) for tf in timeframes)
        self.deliver, self.silent_after_s, self.confirmed_only = deliver, silent_after_s, confirmed_only
        self.reconnect_s, self.reconnect_max_s, self.check_s = reconnect_s, reconnect_max_s, check_s
        self.ping = (ping_interval_s, ping_timeout_s)
        self.now, self.open_socket = now, open_socket
        #: Wall-clock second of the last message heard (any topic, closed or not); ``None`` before the first.
        self.last_heard: float | None = None
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened_at = 0.0

    def start(self) -> KlineStream:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kline-stream", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> KlineStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ pybit's thread

    def _on_message(self, message: dict) -> None:
        """pybit's callback: parse, hand over, never raise (a raising callback kills pybit's stream)."""
        received = self.now()
        self.last_heard = received
        try:
            candles = parse_kline_message(message, received)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("kline stream: unreadable message %.200s: %s", message, exc)
            return
        for candle in candles:
            if candle.confirmed or not self.confirmed_only:
                self._hand(candle)

    def _hand(self, event: StreamEvent) -> None:
        try:
            self.deliver(event)
        except Exception:  # the consumer's bug must not end the stream
            log.exception("kline stream: delivering %s failed", type(event).__name__)

    # ------------------------------------------------------------------------------- the watcher thread

    def _run(self) -> None:
        backoff = self.reconnect_s
        while not self._stop.is_set():
            socket, reason = self._open()
            if socket is not None:
                backoff = self.reconnect_s
                reason = self._watch(socket)
                self.connected.clear()
                with contextlib.suppress(Exception):
                    socket.exit()
            self._hand(StreamDown(self.last_heard, reason))
            if self._stop.wait(backoff):
                break
            if socket is None:
                backoff = min(backoff * 2, self.reconnect_max_s)

    def _open(self) -> tuple[Any, str]:
        """The socket, subscribed to every topic, or ``(None, why not)``."""
        socket = None
        try:
            socket = self.open_socket(self.url, self._on_message, *self.ping)
            for tf in self.timeframes:
                for first in range(0, len(self.symbols), TOPICS_PER_REQUEST):
                    socket.kline_stream(tf.bybit_interval, list(self.symbols[first:first + TOPICS_PER_REQUEST]),
                                        _unused)
        except Exception as exc:  # refused, timed out, closed while subscribing
            if socket is not None:
                with contextlib.suppress(Exception):
                    socket.exit()
            return None, f"cannot open {self.url}: {type(exc).__name__}: {str(exc).strip()[:200]}"
        opened = self.now()
        self.last_heard = self.last_heard if self.last_heard is not None else opened
        self._opened_at = opened
        self._hand(StreamUp(opened))  # before `connected`: whoever waits on it finds the event queued
        self.connected.set()
        return socket, ""

    def _watch(self, socket: Any) -> str:
        """Wait until the socket closes, goes silent or the stream is stopped; why it ended."""
        while not self._stop.wait(self.check_s):
            if not socket.is_connected():
                return "connection closed"
            heard = max(self.last_heard or 0.0, self._opened_at)
            if self.now() - heard > self.silent_after_s:
                return f"silent for {self.now() - heard:.0f} s (more than {self.silent_after_s:.0f} s)"
        return "stopped"


def _unused(_message: dict) -> None:
    """pybit wants a per-topic callback; messages reach :meth:`KlineStream._on_message` instead."""



# ==================================================================================== the private stream
#
# Fills as Bybit makes them: the private ``order`` and ``execution`` topics, on one authenticated socket
# (``/v5/private``). pybit signs the ``auth`` op itself (HMAC-SHA256 of ``GET/realtime{expires}``) right after
# connecting; its answer, and the subscribe's, reach :meth:`PrivateStream._on_message` like any push. A cancel
# racing a fill can push ``Filled`` twice for one order and the same execution twice: an :class:`OrderEvent`
# carries the order's *cumulative* fill (applying it again adds nothing) and an :class:`ExecutionEvent` its
# exec id, which :class:`ExecutionLedger` records once.

PRIVATE_PATH = "/v5/private"
#: pybit's private hosts per mode (demo trading has its own private stream, unlike its public data).
PRIVATE_HOSTS = {"mainnet": "wss://stream.bybit.com", "demo": "wss://stream-demo.bybit.com",
                 "testnet": "wss://stream-testnet.bybit.com"}
#: The spot-only ("categorised") private topics: Bybit pushes nothing of other categories on them.
PRIVATE_TOPICS = ("order.spot", "execution.spot")
#: Our orders' ``orderLinkId`` prefix (:func:`~pricelevel.trading.exchange.client_id`); others' orders are not ours.
CLIENT_ID_PREFIX = "pl-"


def private_stream_url(mode: str, endpoint: str | None = None) -> str:
    """The private stream's URL: ``endpoint`` (a local server) with ``/v5/private`` appended, else pybit's
    host for ``mode`` (there is none for paper: it has no account)."""
    if endpoint:
        return endpoint.rstrip("/") + PRIVATE_PATH
    if mode not in PRIVATE_HOSTS:
        raise ValueError(f"no private stream for mode {mode!r}")
    return PRIVATE_HOSTS[mode] + PRIVATE_PATH


@dataclass(frozen=True)
class ExecutionEvent:
    """One fill as Bybit pushed it: ``fee`` in ``fee_coin`` (the coin received: base for a buy, quote for a
    sell), ``time`` Bybit's ``execTime``."""

    exec_id: str
    client_id: str
    symbol: str
    side: Side
    qty: float
    price: float
    fee: float
    fee_coin: str
    time: pd.Timestamp
    order_id: str

    def row(self) -> dict[str, Any]:
        """The ``executions`` table's row (:meth:`~pricelevel.trading.state.StateStore.add_execution`)."""
        return {"exec_id": self.exec_id, "client_id": self.client_id, "symbol": self.symbol,
                "side": self.side.value, "qty": self.qty, "price": self.price, "fee": self.fee,
                "fee_coin": self.fee_coin, "time": self.time.to_pydatetime()}


@dataclass(frozen=True)
class OrderEvent:
    """An order's state as Bybit pushed it, as the REST lookup reports it (cumulative fill, fees in quote)."""

    client_id: str
    report: OrderReport


PrivateEvent = ExecutionEvent | OrderEvent | StreamUp | StreamDown


def parse_private_message(message: Mapping[str, Any], coins: Coins,
                          prefix: str = CLIENT_ID_PREFIX) -> list[ExecutionEvent | OrderEvent]:
    """The events of one pushed ``order``/``execution`` message for our orders (``orderLinkId`` starting with
    ``prefix``), spot only; none for a command answer or another topic. ``coins`` gives a symbol's (base,
    quote) coins, asked only for a fee to convert or a fee coin Bybit did not name. A malformed row raises
    ``ValueError``/``KeyError``/``TypeError``."""
    name = message.get("topic")
    if not isinstance(name, str):
        return []
    kind = name.split(".", 1)[0]
    if kind not in ("order", "execution"):
        return []
    events: list[ExecutionEvent | OrderEvent] = []
    for row in message["data"]:
        client_id = str(row.get("orderLinkId") or "")
        if not client_id.startswith(prefix) or row.get("category", "spot") != "spot":
            continue
        if kind == "order":
            events.append(OrderEvent(client_id, order_report(row, coins)))
        elif row.get("execType", "Trade") == "Trade":
            fee = _number(row.get("execFee"))
            events.append(ExecutionEvent(
                exec_id=str(row["execId"]), client_id=client_id, symbol=str(row["symbol"]), side=Side(row["side"]),
                qty=float(row["execQty"]), price=float(row["execPrice"]), fee=0.0 if math.isnan(fee) else fee,
                fee_coin=str(row.get("feeCurrency") or received_coin(row, coins)),
                time=pd.Timestamp(int(row["execTime"]), unit="ms", tz="UTC"), order_id=str(row.get("orderId") or ""),
            ))
    return events


def _private_socket(url: str, api_key: str, api_secret: str, on_message: Callable[[dict], None],
                    ping_interval_s: float, ping_timeout_s: float, auth_expire_s: int):
    """pybit's private ``WebSocket`` connected to ``url`` (its template ignored, as :func:`_pointed_socket`);
    pybit sends the signed ``auth`` op on connecting, and every message, answers included, goes to
    ``on_message`` (pybit's own auth check raises on its thread instead of telling us)."""
    from pybit.unified_trading import WebSocket

    class PointedPrivateWebSocket(WebSocket):
        def _connect(self, _template: str) -> None:
            super()._connect(url)

    return PointedPrivateWebSocket(
        channel_type="private", api_key=api_key, api_secret=api_secret, testnet=False, callback_function=on_message,
        restart_on_error=False, retries=2, ping_interval=ping_interval_s, ping_timeout=ping_timeout_s,
        private_auth_expire=auth_expire_s,
    )


class PrivateStream(KlineStream):
    """Our orders' states and fills from Bybit's private stream at ``url``, handed to ``deliver`` as
    :data:`PrivateEvent` s on pybit's thread (quick, thread-safe; what it raises is logged, never raised
    into pybit), with :class:`StreamUp`/:class:`StreamDown` around every (re)connect: while it is down the
    caller polls REST (:meth:`~pricelevel.trading.exchange.ExchangeClient.query_order`) as before.

    The connection is watched as :class:`KlineStream` does (closed: dropped, said, opened again with
    backoff), but silence is normal here (no orders, no pushes): a dead connection is found by its pings
    (``ping_timeout_s``). A refused ``auth`` or subscribe counts as a failed open (with backoff). The key and
    secret come from ``secrets`` and are masked in everything logged.
    """

    def __init__(
        self, url: str, secrets: Secrets, deliver: Callable[[PrivateEvent], None], coins: Coins, *,
        topics: Sequence[str] = PRIVATE_TOPICS, prefix: str = CLIENT_ID_PREFIX, answer_timeout_s: float = 10.0,
        auth_expire_s: int = 10, silent_after_s: float = math.inf, reconnect_s: float = 1.0,
        reconnect_max_s: float = 30.0, check_s: float = 0.1, ping_interval_s: float = 20.0,
        ping_timeout_s: float = 10.0, now: Callable[[], float] = time.time,
        open_socket: Callable[..., Any] = _private_socket,
    ) -> None:
        super().__init__(url, (), (), deliver, silent_after_s=silent_after_s, reconnect_s=reconnect_s,
                         reconnect_max_s=reconnect_max_s, check_s=check_s, ping_interval_s=ping_interval_s,
                         ping_timeout_s=ping_timeout_s, now=now, open_socket=open_socket)
        self._secrets = secrets
        secrets.require("bybit_api_key"), secrets.require("bybit_api_secret")  # fail at construction, not on the thread
        self.coins, self.topics, self.prefix = coins, tuple(topics), prefix
        self.answer_timeout_s, self.auth_expire_s = answer_timeout_s, auth_expire_s
        self._answers: dict[str, Mapping[str, Any]] = {}
        self._answered = threading.Condition()

    def __repr__(self) -> str:
        return f"PrivateStream(url={self.url!r})"

    def start(self) -> PrivateStream:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="private-stream", daemon=True)
            self._thread.start()
        return self

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # ------------------------------------------------------------------------------------ pybit's thread

    def _on_message(self, message: dict) -> None:
        """pybit's callback: command answers are kept for :meth:`_open`; pushes parsed and handed over."""
        self.last_heard = self.now()
        op = message.get("op")
        if op in ("auth", "subscribe"):
            with self._answered:
                self._answers[op] = message
                self._answered.notify_all()
            return
        try:
            events = parse_private_message(message, self.coins, self.prefix)
        except Exception as exc:  # malformed, or a symbol's coins unknown: REST polling settles the order
            log.warning(self._redact(f"private stream: unreadable message {str(message)[:200]}: "
                                     f"{type(exc).__name__}: {exc}"))
            return
        for event in events:
            self._hand(event)

    def _hand(self, event: PrivateEvent) -> None:
        try:
            self.deliver(event)
        except Exception:  # the consumer's bug must not end the stream
            log.exception("private stream: delivering %s failed", type(event).__name__)

    # ------------------------------------------------------------------------------- the watcher thread

    def _open(self) -> tuple[Any, str]:
        """The socket, authenticated and subscribed, or ``(None, why not)``."""
        with self._answered:
            self._answers.clear()
        socket = None
        try:
            socket = self.open_socket(self.url, self._secrets.require("bybit_api_key"),
                                      self._secrets.require("bybit_api_secret"), self._on_message, *self.ping,
                                      self.auth_expire_s)
            refused = self._refused(self._answer("auth"), "authentication")
            if refused is None:
                socket.ws.send(json.dumps({"op": "subscribe", "req_id": uuid.uuid4().hex, "args": list(self.topics)}))
                refused = self._refused(self._answer("subscribe"), f"subscribing to {', '.join(self.topics)}")
        except Exception as exc:  # refused, timed out, closed while authenticating
            refused = f"cannot open {self.url}: {type(exc).__name__}: {str(exc).strip()[:200]}"
        if refused is not None:
            if socket is not None:
                with contextlib.suppress(Exception):
                    socket.exit()
            refused = self._redact(refused)
            log.warning("private stream: %s; fills are polled over REST until it opens", refused)
            return None, refused
        opened = self.now()
        self.last_heard = self.last_heard if self.last_heard is not None else opened
        self._opened_at = opened
        self._hand(StreamUp(opened))
        self.connected.set()
        return socket, ""

    def _answer(self, op: str) -> Mapping[str, Any] | None:
        with self._answered:
            self._answered.wait_for(lambda: op in self._answers or self._stop.is_set(), self.answer_timeout_s)
            return self._answers.get(op)

    def _refused(self, answer: Mapping[str, Any] | None, what: str) -> str | None:
        if answer is None:
            return f"{what} at {self.url}: no answer in {self.answer_timeout_s:g} s"
        if answer.get("success") is True:
            return None
        return f"{what} refused at {self.url}: {str(answer.get('ret_msg') or 'no reason given')[:200]}"


# ==================================================================================== the ledger

class ExecutionLedger:
    """Every fill the private stream (or a REST read) reported, once, in the state database's ``executions``
    table: :meth:`record` is False for an exec id seen before, so a fill pushed twice is applied once, and
    :meth:`report_for` gives an order's cumulative fill from its recorded executions, the report the exchange
    broker applies (``ExchangeBroker._record``: only what the books do not have yet). ``coins``: a symbol's
    (base, quote) coins, to give fees in quote coin as every :class:`OrderReport` does."""

    def __init__(self, store: StateStore, coins: Coins) -> None:
        self.store, self.coins = store, coins

    def record(self, event: ExecutionEvent) -> bool:
        with self.store.transaction() as tx:
            return self.store.add_execution(tx, **event.row())

    def report_for(self, client_id: str, status: OrderStatus | None = None) -> OrderReport | None:
        """The order's fill so far (quantity, average price, fees in quote coin; ``None`` if none recorded), with
        ``status``, else the order's stored status when final (a ``Filled`` push came first), else PARTIAL: only
        the order stream (or REST) says an order is done. The exchange id is the stored one."""
        with self.store.transaction() as tx:
            fills = self.store.executions(tx, client_id=client_id)
            order = self.store.order(tx, client_id)
        if not fills:
            return None
        qty = sum(float(f["qty"]) for f in fills)
        value = sum(float(f["qty"]) * float(f["price"]) for f in fills)
        fee = sum(fee_in_quote({f["fee_coin"]: float(f["fee"])}, f["symbol"], float(f["price"]), self.coins)
                  for f in fills)
        if status is None:
            stored = OrderStatus(order["status"]) if order is not None else None
            status = stored if stored is not None and stored.final else OrderStatus.PARTIAL
        return OrderReport(client_id, status, order["exchange_id"] if order is not None else None, qty,
                           value / qty if qty else 0.0, fee)

    def pending(self) -> list[str]:
        """Orders with fills recorded but not yet applied (a crash between :meth:`record` and the books)."""
        with self.store.transaction() as tx:
            return list(dict.fromkeys(f["client_id"] for f in self.store.executions(tx, applied=False)))

    def mark_applied(self, client_id: str) -> int:
        """After the broker applied :meth:`report_for`: this order's recorded fills are in the books."""
        with self.store.transaction() as tx:
            ids = [f["exec_id"] for f in self.store.executions(tx, client_id=client_id, applied=False)]
            return self.store.mark_applied(tx, ids)


def instrument_coins(exchange: Any) -> Coins:
    """``coins`` from an exchange client's (cached) instrument rules: ``exchange.instrument(symbol)``."""

    def coins(symbol: str) -> tuple[str, str]:
        instrument = exchange.instrument(symbol)
        return instrument.base_coin, instrument.quote_coin

    return coins


def settle(event: ExecutionEvent | OrderEvent, ledger: ExecutionLedger,
           record: Callable[[str, OrderReport], None]) -> bool:
    """Apply one pushed event through ``record`` (the exchange broker's ``_record``: it stores the report and adds
    to the books only what they lack); False when it brought nothing new (an exec id seen before). An order's
    push is its cumulative state, applied as it is; a fill is recorded once and the order's cumulative fill from
    every recorded fill applied, then marked applied."""
    if isinstance(event, OrderEvent):
        record(event.client_id, event.report)
        return True
    if not ledger.record(event):
        return False
    report = ledger.report_for(event.client_id)
    if report is not None:
        record(event.client_id, report)
    ledger.mark_applied(event.client_id)
    return True


class PushedFills:
    """The hand-over from the private stream (pybit's thread) to the broker (the trader's thread): ``deliver``
    is the stream's callback; :meth:`apply` settles everything pushed so far through ``record`` on the caller's
    thread, waiting up to ``timeout_s`` for the first event. :attr:`up` says whether the stream is connected:
    while it is not, the broker polls REST as before."""

    def __init__(self, ledger: ExecutionLedger) -> None:
        self.ledger = ledger
        self.up = False
        self._events: queue.Queue[PrivateEvent] = queue.Queue()

    def deliver(self, event: PrivateEvent) -> None:
        if isinstance(event, StreamUp | StreamDown):
            self.up = isinstance(event, StreamUp)
        self._events.put(event)

    def apply(self, record: Callable[[str, OrderReport], None], timeout_s: float = 0.0) -> int:
        """Settle every pushed event, waiting up to ``timeout_s`` for a first order or fill event; how many
        brought something new."""
        new, seen, deadline = 0, False, time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                event = self._events.get(timeout=left) if left > 0 and not seen else self._events.get_nowait()
            except queue.Empty:
                return new
            if isinstance(event, ExecutionEvent | OrderEvent):
                seen = True
                new += settle(event, self.ledger, record)

    def recover(self, record: Callable[[str, OrderReport], None]) -> int:
        """At start: fills recorded before a crash but never applied reach the books now."""
        pending = self.ledger.pending()
        for client_id in pending:
            report = self.ledger.report_for(client_id)
            if report is not None:
                record(client_id, report)
            self.ledger.mark_applied(client_id)
        return len(pending)
