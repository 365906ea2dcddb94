"""Fills from Bybit's private stream (pybit's private WebSocket against a local server speaking the wire format:
signed ``auth``, ``order.spot``/``execution.spot`` pushes), each fill applied to the books once by its exec id,
however many times Bybit pushes it or its order's ``Filled``."""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import time

import pandas as pd
import pytest

from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.exchange import OrderStatus, Side
from pricelevel.trading.live import ExchangeBroker
from pricelevel.trading.state import StateStore
from pricelevel.trading.streams import (
    PRIVATE_TOPICS,
    ExecutionEvent,
    ExecutionLedger,
    OrderEvent,
    PrivateStream,
    PushedFills,
    StreamDown,
    StreamUp,
    instrument_coins,
    private_stream_url,
    settle,
)
from tests.fakes.bybit_server import SLOW_MACHINE_TIMEOUT_S
from tests.fakes.bybit_trading import FakeBybitExchange
from tests.fakes.bybit_ws import FakePrivateServer, execution_row, order_row

KEY, SECRET = "ws-key-4f1c9a", "ws-secret-8d2e7b55aa"
COINS = {"ETHUSDT": ("ETH", "USDT"), "BTCUSDT": ("BTC", "USDT")}
CID = "pl-" + "a" * 32
BAR = pd.Timestamp("2024-06-01 12:00", tz="UTC")
RULES = StrategyRules(threshold=0.5, sl_stop=0.02, tp_stop=0.04, sizing="fraction", fraction=0.2)


def secrets(key: str = KEY, secret: str = SECRET) -> Secrets:
    return Secrets.from_env({"BYBIT_API_KEY": key, "BYBIT_API_SECRET": secret})


@pytest.fixture
def server():
    with FakePrivateServer(KEY, SECRET) as fake:
        yield fake


class Events:
    """What the stream handed over, read from the test's thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()

    def deliver(self, event) -> None:
        self.queue.put(event)

    def next(self, kind: type | tuple[type, ...], timeout_s: float = 10.0):
        """The next event of ``kind`` (others before it are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            if isinstance(event, kind):
                return event

    def drain(self, wait_s: float = 0.3) -> list:
        time.sleep(wait_s)
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out


def stream(server: FakePrivateServer, events: Events, creds: Secrets | None = None, **options) -> PrivateStream:
    return PrivateStream(private_stream_url("testnet", server.endpoint), creds or secrets(), events.deliver,
                         COINS.__getitem__, answer_timeout_s=3.0, reconnect_s=0.05, reconnect_max_s=0.2, **options)


def test_auth_with_the_right_signature_subscribes_and_a_wrong_secret_is_refused(server) -> None:
    events = Events()
    with stream(server, events):
        assert isinstance(events.next((StreamUp, StreamDown)), StreamUp)
        assert server.wait_subscribed(set(PRIVATE_TOPICS))
    auth = next(m for m in server.received if m.get("op") == "auth")
    key, expires, signature = auth["args"]
    assert key == KEY and int(expires) > time.time() * 1000 - 60_000
    assert signature == hmac.new(SECRET.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    assert server.auths == [True]

    refused = Events()
    with stream(server, refused, secrets(secret="not-the-secret")) as wrong:
        down = refused.next((StreamUp, StreamDown))
        assert isinstance(down, StreamDown) and "authentication refused" in down.reason
        assert not wrong.connected.is_set()
    assert server.auths[-1] is False and server.auths.count(True) == 1
    assert sum(m.get("op") == "subscribe" for m in server.received) == 1  # a refused key never subscribes


def test_an_execution_and_its_order_reach_the_callback_parsed_with_bybits_numbers(server) -> None:
    events = Events()
    with stream(server, events):
        events.next(StreamUp)
        assert server.wait_subscribed(set(PRIVATE_TOPICS))
        at = int(BAR.value // 1_000_000)
        server.push_execution(execution_row("e-1", CID, "ETHUSDT", "Buy", qty=0.5, price=3001.5, fee=0.0005,
                                            fee_coin="ETH", order_id="1789", ms=at))
        execution = events.next(ExecutionEvent)
        server.push_order(order_row(CID, "ETHUSDT", "Sell", "PartiallyFilledCanceled", qty=0.8, cum_qty=0.5,
                                    avg_price=3001.5, fee=1.2, fee_coin="USDT", order_id="1790"))
        order = events.next(OrderEvent)
    assert execution == ExecutionEvent("e-1", CID, "ETHUSDT", Side.BUY, 0.5, 3001.5, 0.0005, "ETH", BAR, "1789")
    report = order.report
    assert order.client_id == CID and report.status is OrderStatus.CANCELLED and report.exchange_id == "1790"
    assert (report.filled_qty, report.avg_price, report.fee) == (0.5, 3001.5, 1.2)
    assert "PartiallyFilledCanceled" in report.message


def test_a_buy_fee_in_base_coin_is_given_in_quote_as_the_rest_report_does(server) -> None:
    events = Events()
    with stream(server, events):
        events.next(StreamUp)
        server.wait_subscribed(set(PRIVATE_TOPICS))
        server.push_order(order_row(CID, "ETHUSDT", "Buy", "Filled", qty=0.5, cum_qty=0.5, avg_price=3000.0,
                                    fee=0.0005, fee_coin="ETH"))
        report = events.next(OrderEvent).report
    assert report.status is OrderStatus.FILLED and report.fee == pytest.approx(1.5)


def test_only_our_client_ids_are_passed_on(server) -> None:
    events = Events()
    with stream(server, events):
        events.next(StreamUp)
        server.wait_subscribed(set(PRIVATE_TOPICS))
        server.push_execution([
            execution_row("e-manual", "manual-web-order", "ETHUSDT", "Buy", qty=1, price=3000, fee=0.001, fee_coin="ETH"),
            execution_row("e-none", "", "ETHUSDT", "Sell", qty=1, price=3000, fee=3, fee_coin="USDT"),
            execution_row("e-ours", CID, "ETHUSDT", "Buy", qty=0.1, price=3000, fee=0.0001, fee_coin="ETH"),
        ])
        server.push_order(order_row("someone-else", "ETHUSDT", "Buy", "Filled", qty=1, cum_qty=1, avg_price=3000))
        server.push_order(order_row(CID, "ETHUSDT", "Buy", "New", qty=0.1))
        seen = [events.next((ExecutionEvent, OrderEvent)) for _ in range(2)]  # ours: one fill, one order
        seen += [e for e in events.drain() if isinstance(e, ExecutionEvent | OrderEvent)]
    assert [type(e) for e in seen] == [ExecutionEvent, OrderEvent]
    assert seen[0].exec_id == "e-ours" and seen[1].client_id == CID and seen[1].report.status is OrderStatus.ACKED


def test_a_disconnect_is_said_and_the_stream_authenticates_and_subscribes_again(server) -> None:
    events = Events()
    with stream(server, events) as private:
        events.next(StreamUp)
        assert server.wait_subscribed(set(PRIVATE_TOPICS))
        server.disconnect()
        down = events.next(StreamDown)
        assert down.reason == "connection closed"
        events.next(StreamUp)
        assert server.wait_authenticated(2) and server.wait_subscribed(set(PRIVATE_TOPICS))
        assert private.connected.is_set()
        server.push_execution(execution_row("e-after", CID, "ETHUSDT", "Buy", qty=0.2, price=2990, fee=0.0002,
                                            fee_coin="ETH"))
        assert events.next(ExecutionEvent).exec_id == "e-after"
    assert server.auths == [True, True]


def test_a_refused_server_is_retried_with_backoff_until_it_accepts(server) -> None:
    server.refuse = True
    events = Events()
    with stream(server, events) as private:
        assert isinstance(events.next((StreamUp, StreamDown)), StreamDown)
        assert isinstance(events.next((StreamUp, StreamDown)), StreamDown)  # tried again, still down
        server.refuse = False
        events.next(StreamUp)
        assert private.connected.wait(5)


# ----------------------------------------------------------------------------------------- applied once


@pytest.fixture
def fake_rest(httpserver) -> FakeBybitExchange:
    fake = FakeBybitExchange(balances={"USDT": 10_000.0})
    fake.add_instrument("ETHUSDT", "ETH", "USDT", base_precision="0.0001", min_order_qty="0.0001", min_order_amt="1")
    fake.set_price("ETHUSDT", 3_000)
    fake.install(httpserver)
    yield fake
    httpserver.check_handler_errors()


def _broker(fake: FakeBybitExchange, httpserver, store: StateStore) -> ExchangeBroker:
    config = BybitConfig(timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=2, backoff_s=0.0, backoff_max_s=0.0)
    exchange = BybitBroker(config, "testnet", secrets(fake.api_key, fake.api_secret),
                           endpoint=httpserver.url_for("").rstrip("/"), sleep=lambda s: None)
    return ExchangeBroker(exchange, store, ("ETHUSDT",), RULES, sleep=lambda s: None, bar=pd.Timedelta(hours=1))


def _order(store: StateStore, client_id: str = CID, side: str = "Buy") -> None:
    with store.transaction() as tx:
        store.add_order(tx, client_id=client_id, symbol="ETHUSDT", side=side, intent="entry", bar_time=BAR,
                        model_version="1", status=OrderStatus.ACKED.value, exchange_id="1789", quote_amount=1500.0,
                        filled_qty=0.0, avg_price=0.0, fee=0.0, message="")


def test_two_filled_messages_and_a_duplicate_execution_for_one_order_are_applied_once(
    server, fake_rest, httpserver, tmp_path
) -> None:
    """The cancel-races-fill case: Bybit pushes the order's ``Filled`` twice and its fills twice, the two topics
    interleaved; the books hold the fill once (the same as if it came once), the order is FILLED."""
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    broker = _broker(fake_rest, httpserver, store)
    _order(store)
    ledger = ExecutionLedger(store, instrument_coins(broker.exchange))
    events = Events()
    fills = [execution_row(f"e-{k}", CID, "ETHUSDT", "Buy", qty=0.25, price=price, fee=0.00025, fee_coin="ETH",
                           order_id="1789") for k, price in ((1, 3000.0), (2, 3002.0))]
    filled = order_row(CID, "ETHUSDT", "Buy", "Filled", qty=0.5, cum_qty=0.5, avg_price=3001.0, fee=0.0005,
                       fee_coin="ETH", order_id="1789")
    with stream(server, events):
        events.next(StreamUp)
        assert server.wait_subscribed(set(PRIVATE_TOPICS))
        server.push_execution(fills[0], times=2)
        server.push_order(filled)
        server.push_execution(fills, times=2)
        server.push_order(filled, times=2)
        pushed = [events.next((ExecutionEvent, OrderEvent)) for _ in range(2 + 1 + 4 + 2)]
    new = [settle(event, ledger, broker._record) for event in pushed]

    assert sum(isinstance(e, ExecutionEvent) for e in pushed) == 6 and new.count(False) == 4  # 2 fills, 6 pushes
    position = broker.positions()["ETHUSDT"]
    assert position["size"] == pytest.approx(0.5 - 0.0005)  # bought once, the buy's fee paid in ETH
    assert position["entry_price"] == pytest.approx(3001.0)
    with store.transaction() as tx:
        row = store.order(tx, CID)
        recorded = store.executions(tx, client_id=CID)
    assert row["status"] == "FILLED" and row["filled_qty"] == pytest.approx(0.5)
    assert row["fee"] == pytest.approx(1.5005, rel=1e-3) and row["exchange_id"] == "1789"
    assert [r["exec_id"] for r in recorded] == ["e-1", "e-2"] and all(r["applied"] for r in recorded)
    assert ledger.pending() == []


def test_the_ledger_gives_an_orders_fill_from_its_fills_and_keeps_a_final_status(tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    _order(store, side="Sell")
    ledger = ExecutionLedger(store, COINS.__getitem__)
    assert ledger.report_for(CID) is None
    first = ExecutionEvent("x-1", CID, "ETHUSDT", Side.SELL, 0.3, 3000.0, 0.9, "USDT", BAR, "1789")
    second = ExecutionEvent("x-2", CID, "ETHUSDT", Side.SELL, 0.1, 3004.0, 0.3, "USDT", BAR, "1789")
    assert ledger.record(first) and not ledger.record(first) and ledger.record(second)
    report = ledger.report_for(CID)
    assert report.status is OrderStatus.PARTIAL and report.exchange_id == "1789"
    assert (report.filled_qty, report.avg_price, report.fee) == pytest.approx((0.4, 3001.0, 1.2))
    assert ledger.pending() == [CID]
    with store.transaction() as tx:
        store.update_order(tx, CID, status="FILLED")
    assert ledger.report_for(CID).status is OrderStatus.FILLED  # a late fill never undoes the Filled push
    assert ledger.mark_applied(CID) == 2 and ledger.mark_applied(CID) == 0 and ledger.pending() == []


def test_no_secret_reaches_the_logs(server, caplog) -> None:
    """pybit, websocket-client and the stream at DEBUG: the key and secret appear nowhere, not even when the
    server's refusal echoes the key."""
    caplog.set_level(logging.DEBUG)
    for creds in (secrets(), secrets(secret="wrong-secret-1234")):
        events = Events()
        with stream(server, events, creds) as private:
            event = events.next((StreamUp, StreamDown))
            server.push_execution({"orderLinkId": CID, "topic": "broken"})  # unreadable: logged
            if isinstance(event, StreamUp):
                server.wait_subscribed(set(PRIVATE_TOPICS))
                server.push_execution({"orderLinkId": CID, "execId": "e-bad"})
                time.sleep(0.3)
            else:
                assert KEY not in event.reason
            assert SECRET not in repr(private) and KEY not in repr(private)
    # what this process logs as the client (the fake server's own frame log, websockets.server, is not ours)
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.server"))
    assert "unreadable message" in text and "authentication refused" in text  # it did log
    assert SECRET not in text and "wrong-secret-1234" not in text and KEY not in text


def test_the_mode_picks_the_private_stream_and_an_endpoint_overrides_it() -> None:
    assert private_stream_url("testnet") == "wss://stream-testnet.bybit.com/v5/private"
    assert private_stream_url("demo") == "wss://stream-demo.bybit.com/v5/private"
    assert private_stream_url("mainnet") == "wss://stream.bybit.com/v5/private"
    assert private_stream_url("demo", "ws://127.0.0.1:8766/") == "ws://127.0.0.1:8766/v5/private"
    with pytest.raises(ValueError):
        private_stream_url("paper")


def test_pushed_fills_reach_the_brokers_thread_and_a_fill_recorded_before_a_crash_is_applied_at_start(
    server, fake_rest, httpserver, tmp_path
) -> None:
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    broker = _broker(fake_rest, httpserver, store)
    _order(store)
    fills = PushedFills(ExecutionLedger(store, instrument_coins(broker.exchange)))
    with PrivateStream(private_stream_url("testnet", server.endpoint), secrets(), fills.deliver,
                       instrument_coins(broker.exchange), answer_timeout_s=3.0):
        assert server.wait_subscribed(set(PRIVATE_TOPICS))
        fill = execution_row("e-1", CID, "ETHUSDT", "Buy", qty=0.25, price=3000.0, fee=0.00025, fee_coin="ETH")
        server.push_execution(fill, times=2)
        assert fills.apply(broker._record, timeout_s=5.0) >= 1 and fills.up
        time.sleep(0.2)
        assert fills.apply(broker._record) == 0  # the duplicate push brought nothing
    assert broker.positions()["ETHUSDT"]["size"] == pytest.approx(0.25 - 0.00025)
    # A crash after recording a fill, before the books: the next start applies it, once.
    fills.ledger.record(ExecutionEvent("e-2", CID, "ETHUSDT", Side.BUY, 0.25, 3002.0, 0.00025, "ETH", BAR, "1789"))
    assert fills.recover(broker._record) == 1 and fills.recover(broker._record) == 0
    assert broker.positions()["ETHUSDT"]["size"] == pytest.approx(0.5 - 0.0005)
