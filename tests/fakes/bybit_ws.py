"""A local server speaking Bybit's public v5 stream (``/v5/public/spot``) for tests and benchmarks.

The wire format is Bybit's: ``{"op":"subscribe","req_id":..,"args":["kline.240.BTCUSDT"]}`` is answered
``{"success":true,"ret_msg":"","conn_id":..,"req_id":..,"op":"subscribe"}``; ``{"op":"ping"}`` is answered
``{"success":true,"ret_msg":"pong","conn_id":..,"req_id":..,"op":"ping"}``; a kline is pushed as
``{"topic":"kline.240.BTCUSDT","data":[{"start":..,"end":..,"interval":"240","open":"..",...,"confirm":true,
"timestamp":..}],"ts":..,"type":"snapshot"}`` (numbers as strings, times in milliseconds), to the connections
subscribed to its topic only. :meth:`FakeKlineServer.disconnect` drops every connection (as a network failure
or Bybit's own restarts do) and ``refuse`` keeps new ones out; ``answer_pings = False`` makes a silent server.

Runs its own asyncio loop in a daemon thread, bound to 127.0.0.1::

    with FakeKlineServer() as server:
        server.endpoint   # ws://127.0.0.1:PORT, what trader.stream_endpoint takes

:class:`FakeBybitStreams` serves the public and the private stream on one port, as ``trader.stream_endpoint``
addresses both, and :class:`FillRelay` pushes a fake exchange's (``tests.fakes.bybit_trading``) orders and fills
on the private stream as Bybit does: with the REST fake, a whole exchange for the service to trade against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Mapping

import pandas as pd
from websockets.asyncio.server import ServerConnection, serve

from pricelevel.core.timeframes import Timeframe
from tests.fakes.bybit_server import _decimal

_MS = 1_000_000


class FakeKlineServer:
    def __init__(self, path: str = "/v5/public/spot") -> None:
        self.path = path
        self.refuse = False
        self.answer_pings = True
        self.received: list[dict] = []
        self._subscribers: dict[ServerConnection, set[str]] = {}
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._attached = False
        self.port = 0

    # ------------------------------------------------------------------------------------------- control

    @property
    def endpoint(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> FakeKlineServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()

            async def open_server():
                return await serve(self._handle, "127.0.0.1", 0)

            self._server = self._loop.run_until_complete(open_server())
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-kline-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def attach(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        """Serve on another server's loop and port (:class:`FakeBybitStreams` routes this path's connections to
        :meth:`handle`); that server starts and stops it."""
        self._loop, self.port, self._attached = loop, port, True

    async def handle(self, connection: ServerConnection) -> None:
        await self._handle(connection)

    def stop(self) -> None:
        if self._loop is None or self._attached:
            return

        async def close() -> None:
            await self._drop_all()
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeKlineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def topics(self) -> set[str]:
        """Every topic some open connection is subscribed to."""
        with self._changed:
            return set().union(*self._subscribers.values()) if self._subscribers else set()

    def wait_subscribed(self, topics: set[str] | list[str], timeout_s: float = 10.0) -> bool:
        """Until every topic in ``topics`` has a subscriber (after a (re)connect) or ``timeout_s``."""
        wanted = set(topics)
        with self._changed:
            return self._changed.wait_for(lambda: wanted <= set().union(*self._subscribers.values()), timeout_s)

    def wait_disconnected(self, timeout_s: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._subscribers, timeout_s)

    def disconnect(self) -> None:
        """Drop every connection now (the client sees its socket closed)."""
        self._call(self._drop_all())
        self.wait_disconnected()

    def push(self, symbol: str, timeframe: Timeframe | str, candle: Mapping, *, confirm: bool = True,
             ts_ms: int | None = None) -> int:
        """Push one kline (``candle``: ``timestamp`` = open time, ``open`` ... ``turnover``) to its topic's
        subscribers; returns how many connections it went to."""
        return self._call(self._send(*self._kline_message(symbol, timeframe, candle, confirm, ts_ms)))

    def _kline_message(self, symbol: str, timeframe: Timeframe | str, candle: Mapping, confirm: bool,
                       ts_ms: int | None) -> tuple[str, str]:
        tf = Timeframe(timeframe)
        start = pd.Timestamp(candle["timestamp"])
        start_ms = start.value // _MS
        now_ms = ts_ms if ts_ms is not None else int(time.time() * 1000)
        row = {"start": start_ms, "end": start_ms + tf.nanoseconds // _MS - 1, "interval": tf.bybit_interval}
        for column in ("open", "close", "high", "low", "volume", "turnover"):
            value = candle.get(column, float("nan"))
            row[column] = _decimal(float(value))
        row |= {"confirm": confirm, "timestamp": now_ms}
        name = f"kline.{tf.bybit_interval}.{symbol}"
        return name, json.dumps({"topic": name, "data": [row], "ts": now_ms, "type": "snapshot"}, separators=(",", ":"))

    def push_many(self, pushes: list[tuple[str, Timeframe | str, Mapping]]) -> int:
        """Several closed klines at once, the way a close pushes every topic in the same instant (one hand-over
        to the server's loop, not one per kline); how many messages went out."""
        messages = [self._kline_message(symbol, tf, candle, True, None) for symbol, tf, candle in pushes]

        async def send_all() -> int:
            return sum([await self._send(name, message) for name, message in messages])

        return self._call(send_all())

    # ------------------------------------------------------------------------------------------ serving

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _send(self, name: str, message: str) -> int:
        sent = 0
        for connection, topics in list(self._subscribers.items()):
            if name in topics:
                with contextlib.suppress(Exception):
                    await connection.send(message)
                    sent += 1
        return sent

    async def _drop_all(self) -> None:
        for connection in list(self._subscribers):
            connection.transport.abort()  # no close handshake: a broken network, not a polite goodbye
        for connection in list(self._subscribers):
            with contextlib.suppress(Exception):
                await connection.wait_closed()

    async def _handle(self, connection: ServerConnection) -> None:
        if self.refuse or connection.request.path != self.path:
            await connection.close(1008 if not self.refuse else 1013)
            return
        conn_id = str(uuid.uuid4())
        with self._changed:
            self._subscribers[connection] = set()
            self._changed.notify_all()
        try:
            async for raw in connection:
                message = json.loads(raw)
                self.received.append(message)
                op, req_id = message.get("op"), message.get("req_id", "")
                if op == "subscribe":
                    args = [a for a in message.get("args", []) if isinstance(a, str)]
                    ok = bool(args) and len(args) <= 10 and all(a.startswith("kline.") for a in args)
                    await connection.send(json.dumps({"success": ok, "ret_msg": "" if ok else "error:args",
                                                      "conn_id": conn_id, "req_id": req_id, "op": "subscribe"}))
                    if ok:
                        with self._changed:
                            self._subscribers[connection].update(args)
                            self._changed.notify_all()
                elif op == "ping" and self.answer_pings:
                    await connection.send(json.dumps({"success": True, "ret_msg": "pong", "conn_id": conn_id,
                                                      "req_id": req_id, "op": "ping"}))
        except Exception:  # the client went away or the connection was dropped
            pass
        finally:
            with self._changed:
                self._subscribers.pop(connection, None)
                self._changed.notify_all()


class FakePrivateServer(FakeKlineServer):
    """Bybit's private v5 stream (``/v5/private``): ``{"op":"auth","args":[api_key, expires, signature]}`` with
    ``signature`` = hex HMAC-SHA256(secret, ``"GET/realtime" + expires``) and ``expires`` (ms) still ahead of the
    server's clock is answered ``{"success":true,"ret_msg":"","op":"auth","conn_id":..}``; anything else
    ``success: false`` (the refusal echoes the key it was given, as Bybit's REST 10004 echoes the signed string:
    the client must redact what it logs). Private topics (``order``/``execution``, all-in-one or ``.spot``) are
    subscribable only after a successful auth ("Request not authorized" before).

    :meth:`push_order` / :meth:`push_execution` push rows in the wire format (``{"id", "topic",
    "creationTime", "data": [...]}``, numbers as strings) to every authenticated connection subscribed to the
    kind, ``times`` times in a row (Bybit's duplicate pushes); :func:`order_row` / :func:`execution_row` build
    the rows.
    """

    def __init__(self, api_key: str = "fake-ws-key", api_secret: str = "fake-ws-secret",
                 path: str = "/v5/private") -> None:
        super().__init__(path)
        self.api_key, self.api_secret = api_key, api_secret
        #: Every auth attempt's outcome, in order.
        self.auths: list[bool] = []
        self._authed: set[ServerConnection] = set()

    def signature(self, expires: int) -> str:
        return hmac.new(self.api_secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()

    def wait_authenticated(self, count: int = 1, timeout_s: float = 10.0) -> bool:
        """Until ``count`` successful auths have happened (over all connections) or ``timeout_s``."""
        with self._changed:
            return self._changed.wait_for(lambda: self.auths.count(True) >= count, timeout_s)

    def push_order(self, rows: Mapping | list[Mapping], *, times: int = 1) -> int:
        return self._push("order", rows, times)

    def push_execution(self, rows: Mapping | list[Mapping], *, times: int = 1) -> int:
        return self._push("execution", rows, times)

    def _push(self, kind: str, rows: Mapping | list[Mapping], times: int) -> int:
        data = [dict(rows)] if isinstance(rows, Mapping) else [dict(r) for r in rows]
        return self._call(self._send_private(kind, data, times))

    async def _send_private(self, kind: str, data: list[dict], times: int) -> int:
        sent = 0
        for connection, topics in list(self._subscribers.items()):
            name = next((t for t in (f"{kind}.spot", kind) if t in topics), None)
            if name is None or connection not in self._authed:
                continue
            message = json.dumps({"id": uuid.uuid4().hex, "topic": name, "creationTime": int(time.time() * 1000),
                                  "data": data}, separators=(",", ":"))
            for _ in range(times):
                with contextlib.suppress(Exception):
                    await connection.send(message)
                    sent += 1
        return sent

    def _auth_ok(self, args: object) -> bool:
        if not isinstance(args, list) or len(args) != 3:
            return False
        key, expires, signature = args
        try:
            expires = int(expires)
        except (TypeError, ValueError):
            return False
        return (key == self.api_key and expires > time.time() * 1000
                and hmac.compare_digest(str(signature), self.signature(expires)))

    async def _handle(self, connection: ServerConnection) -> None:
        if self.refuse:  # dropped at once: a polite close would wait for a client that has given up
            connection.transport.abort()
            return
        if connection.request.path != self.path:
            await connection.close(1008)
            return
        conn_id = str(uuid.uuid4())
        with self._changed:
            self._subscribers[connection] = set()
            self._changed.notify_all()
        try:
            async for raw in connection:
                message = json.loads(raw)
                self.received.append(message)
                op, req_id = message.get("op"), message.get("req_id", "")
                if op == "auth":
                    args = message.get("args")
                    ok = self._auth_ok(args)
                    given = args[0] if isinstance(args, list) and args else ""
                    await connection.send(json.dumps({
                        "success": ok, "ret_msg": "" if ok else f"error:sign for api_key {given}", "op": "auth",
                        "conn_id": conn_id, **({"req_id": req_id} if req_id else {})}))
                    with self._changed:
                        self.auths.append(ok)
                        if ok:
                            self._authed.add(connection)
                        self._changed.notify_all()
                elif op == "subscribe":
                    args = [a for a in message.get("args", []) if isinstance(a, str)]
                    known = bool(args) and all(a.split(".", 1)[0] in ("order", "execution") for a in args)
                    ok = known and connection in self._authed
                    reason = "" if ok else ("Request not authorized" if known else "error:args")
                    await connection.send(json.dumps({"success": ok, "ret_msg": reason, "conn_id": conn_id,
                                                      "req_id": req_id, "op": "subscribe"}))
                    if ok:
                        with self._changed:
                            self._subscribers[connection].update(args)
                            self._changed.notify_all()
                elif op == "ping" and self.answer_pings:
                    await connection.send(json.dumps({"success": True, "ret_msg": "pong", "conn_id": conn_id,
                                                      "req_id": req_id, "op": "ping"}))
        except Exception:  # the client went away or the connection was dropped
            pass
        finally:
            with self._changed:
                self._subscribers.pop(connection, None)
                self._authed.discard(connection)
                self._changed.notify_all()


def order_row(client_id: str, symbol: str, side: str, status: str, *, qty: float, cum_qty: float = 0.0,
              avg_price: float = 0.0, fee: float = 0.0, fee_coin: str = "", order_id: str = "",
              cancel_type: str = "UNKNOWN", ms: int | None = None) -> dict:
    """One spot market order as Bybit's ``order`` topic pushes it (the fields the REST list has too)."""
    now = ms if ms is not None else int(time.time() * 1000)
    return {
        "category": "spot", "symbol": symbol, "orderId": order_id or f"fake-order-{client_id}", "orderLinkId": client_id,
        "side": side, "orderType": "Market", "price": "0", "qty": _decimal(qty), "timeInForce": "IOC",
        "orderStatus": status, "cancelType": cancel_type, "rejectReason": "EC_NoError",
        "avgPrice": _decimal(avg_price) if cum_qty else "", "leavesQty": _decimal(max(qty - cum_qty, 0.0)),
        "cumExecQty": _decimal(cum_qty), "cumExecValue": _decimal(cum_qty * avg_price), "cumExecFee": _decimal(fee),
        "feeCurrency": fee_coin, "cumFeeDetail": {fee_coin: _decimal(fee)} if fee and fee_coin else {},
        "isLeverage": "0", "positionIdx": 0, "stopOrderType": "", "triggerPrice": "0", "marketUnit": "baseCoin",
        "createdTime": str(now), "updatedTime": str(now), "createType": "CreateByUser",
    }


def execution_row(exec_id: str, client_id: str, symbol: str, side: str, *, qty: float, price: float,
                  fee: float, fee_coin: str, order_qty: float | None = None, order_id: str = "",
                  ms: int | None = None) -> dict:
    """One spot fill as Bybit's ``execution`` topic pushes it."""
    return {
        "category": "spot", "symbol": symbol, "orderId": order_id or f"fake-order-{client_id}", "orderLinkId": client_id,
        "side": side, "orderType": "Market", "orderPrice": "0", "orderQty": _decimal(order_qty or qty),
        "leavesQty": "0", "execId": exec_id, "execType": "Trade", "execQty": _decimal(qty), "execPrice": _decimal(price),
        "execValue": _decimal(qty * price), "execFee": _decimal(fee), "feeCurrency": fee_coin, "feeRate": "0.001",
        "execTime": str(ms if ms is not None else int(time.time() * 1000)), "isMaker": False, "stopOrderType": "",
        "markPrice": "", "closedSize": "", "seq": 1, "createType": "CreateByUser",
    }


class FakeBybitStreams:
    """Bybit's public spot stream (:attr:`public`, a :class:`FakeKlineServer` on ``/v5/public/spot``) and private
    stream (:attr:`private`, a :class:`FakePrivateServer` on ``/v5/private``) on one port, the way
    ``trader.stream_endpoint`` addresses both; a connection to another path is closed (1008).

    Each half is driven as on its own (``public.push``, ``public.disconnect``, ``private.push_order`` ...)::

        with FakeBybitStreams(api_key, api_secret) as streams:
            streams.endpoint   # ws://127.0.0.1:PORT
    """

    def __init__(self, api_key: str = "fake-ws-key", api_secret: str = "fake-ws-secret") -> None:
        self.public = FakeKlineServer()
        self.private = FakePrivateServer(api_key, api_secret)
        self._routes = {self.public.path: self.public, self.private.path: self.private}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> FakeBybitStreams:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()

            async def open_server():
                return await serve(self._route, "127.0.0.1", 0)

            self._server = self._loop.run_until_complete(open_server())
            self.port = self._server.sockets[0].getsockname()[1]
            for half in self._routes.values():
                half.attach(self._loop, self.port)
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-bybit-streams", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            for half in self._routes.values():
                await half._drop_all()
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FakeBybitStreams:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _route(self, connection: ServerConnection) -> None:
        half = self._routes.get(connection.request.path)
        if half is None:
            await connection.close(1008)
            return
        await half.handle(connection)


class FillRelay:
    """Pushes what a fake exchange (``tests.fakes.bybit_trading.FakeBybitExchange``) does with our orders on a
    :class:`FakePrivateServer`, as Bybit's private stream does: each new execution on ``execution.spot`` and
    each change of an order's status or cumulative fill on ``order.spot``, looked for every ``every_s`` on a
    daemon thread (a fill is pushed within that of the exchange making it). ``exchange`` is read through its
    public listing methods only (``created``, ``executions()``, ``order(link_id)``)."""

    def __init__(self, exchange, server: FakePrivateServer, every_s: float = 0.005) -> None:
        self.exchange, self.server, self.every_s = exchange, server, every_s
        #: Pushes made: (kind, orderLinkId, status or exec id).
        self.pushed: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._orders_seen = 0
        self._executions_seen = 0
        self._states: dict[str, tuple[object, object]] = {}

    def start(self) -> FillRelay:
        self._thread = threading.Thread(target=self._run, name="fill-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FillRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # a listing read while the exchange changes it: next round
                self.relay()

    def relay(self) -> int:
        """Push what changed since the last call; how many messages."""
        created = list(self.exchange.created)
        for order in created[self._orders_seen:]:
            self._states.setdefault(str(order["orderLinkId"]), (None, None))
        self._orders_seen = len(created)
        executions = self.exchange.executions()
        pushed = 0
        for row in executions[self._executions_seen:]:
            self.server.push_execution({"category": "spot", **row})
            self.pushed.append(("execution", row["orderLinkId"], row["execId"]))
            self._states.setdefault(row["orderLinkId"], (None, None))
            pushed += 1
        self._executions_seen = len(executions)
        for link_id, state in list(self._states.items()):
            order = self.exchange.order(link_id)
            if order is None:
                continue
            now = (order["orderStatus"], order["cumExecQty"])
            if now != state:
                self.server.push_order({"category": "spot", **order})
                self.pushed.append(("order", link_id, str(order["orderStatus"])))
                self._states[link_id] = now
                pushed += 1
        return pushed
