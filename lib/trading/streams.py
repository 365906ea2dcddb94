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
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pricelevel.core.timeframes import Timeframe

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

