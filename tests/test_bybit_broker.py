"""BybitBroker against a fake Bybit v5 spot exchange on 127.0.0.1: orders, fills, fees, rules, faults, keys.

``sleep`` only records the backoff, so no test waits for it; the one real wait is the lost answer that
stalls past the client's 1 s timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time

import pandas as pd
import pytest
import requests
from werkzeug.test import Client

from pricelevel.core.secrets import MissingSecretError, Secrets
from pricelevel.data.config import BybitConfig
from pricelevel.data.sources.bybit import BybitSource
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.exchange import (
    CredentialsRefused,
    ExchangeUnavailable,
    Instrument,
    MarketOrder,
    OrderRefused,
    OrderStatus,
    RestingOrder,
    Side,
    client_id,
)
from tests.fakes.bybit_server import SLOW_MACHINE_TIMEOUT_S, random_candles
from tests.fakes.bybit_trading import (
    EXECUTION_LIST,
    INSTRUMENTS_INFO,
    MARKET_TIME,
    ORDER_CANCEL,
    ORDER_CREATE,
    ORDER_HISTORY,
    ORDER_REALTIME,
    RET_RATE_LIMIT,
    WALLET_BALANCE,
    FakeBybitExchange,
    TradeFault,
)

API_KEY, API_SECRET = "PLKEYbroker1234567", "PLSECRETbroker98765432"
SECRETS = Secrets.from_env({"BYBIT_API_KEY": API_KEY, "BYBIT_API_SECRET": API_SECRET})
PRICE = 61_200.0
BAR = pd.Timestamp("2024-07-01 12:00", tz="UTC")


def cid(intent: str = "entry") -> str:
    return client_id("v7", "BTCUSDT", BAR, intent)


def buy(quote: float, intent: str = "entry", symbol: str = "BTCUSDT") -> MarketOrder:
    return MarketOrder(client_id("v7", symbol, BAR, intent), symbol, Side.BUY, quote_amount=quote)


def sell(qty: float, intent: str = "exit", symbol: str = "BTCUSDT") -> MarketOrder:
    return MarketOrder(client_id("v7", symbol, BAR, intent), symbol, Side.SELL, base_qty=qty)


@pytest.fixture
def fake(httpserver):
    fake = FakeBybitExchange(api_key=API_KEY, api_secret=API_SECRET)
    fake.set_price("BTCUSDT", PRICE)
    fake.install(httpserver)
    yield fake
    httpserver.check_handler_errors()  # a crash in the fake must not pass for a 500 that the client retried


@pytest.fixture
def endpoint(httpserver) -> str:
    return httpserver.url_for("").rstrip("/")


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_broker(endpoint, sleeps):
    def make(secrets: Secrets = SECRETS, mode: str = "testnet", **settings) -> BybitBroker:
        defaults = {"timeout_s": SLOW_MACHINE_TIMEOUT_S, "max_attempts": 4, "backoff_s": 0.5, "backoff_max_s": 4.0}
        config = BybitConfig(**{**defaults, **settings})
        return BybitBroker(config, mode, secrets, endpoint=endpoint, sleep=sleeps.append)

    return make


@pytest.fixture
def broker(fake, make_broker) -> BybitBroker:
    return make_broker()


def creates(fake: FakeBybitExchange) -> list[dict]:
    return [dict(r.params) for r in fake.sent(ORDER_CREATE)]


# ------------------------------------------------------------------------------------ orders and fills


def test_a_buy_is_sized_in_quote_coin_and_pays_its_fee_in_base_coin(fake, broker):
    report = broker.place_market_order(buy(1000.0))

    assert report.status is OrderStatus.ACKED and report.exchange_id
    assert creates(fake) == [
        {
            "category": "spot",
            "symbol": "BTCUSDT",
            "side": "Buy",
            "orderType": "Market",
            "qty": "1000",
            "marketUnit": "quoteCoin",
            "orderLinkId": cid(),
        }
    ]
    filled = broker.query_order(cid())
    qty = 0.016339  # 1000 / 61200 down to basePrecision 0.000001
    assert filled.status is OrderStatus.FILLED and filled.exchange_id == report.exchange_id
    assert filled.filled_qty == pytest.approx(qty) and filled.avg_price == pytest.approx(PRICE)
    assert filled.fee == pytest.approx(qty * 0.001 * PRICE)  # paid in BTC, reported in USDT
    assert broker.balances() == pytest.approx({"USDT": 10_000 - qty * PRICE, "BTC": qty * 0.999})


def test_a_sell_is_sized_in_base_coin_and_pays_its_fee_in_quote_coin(fake, broker):
    fake.set_balance("BTC", 0.5)

    broker.place_market_order(sell(0.1234567))

    (sent,) = creates(fake)
    assert (sent["side"], sent["qty"], sent["marketUnit"]) == ("Sell", "0.123456", "baseCoin")
    filled = broker.query_order(cid("exit"))
    value = 0.123456 * PRICE
    assert filled.status is OrderStatus.FILLED and filled.filled_qty == pytest.approx(0.123456)
    assert filled.fee == pytest.approx(value * 0.001)
    assert broker.balances() == pytest.approx({"USDT": 10_000 + value * 0.999, "BTC": 0.5 - 0.123456})


def test_executions_are_reported_oldest_first_with_fees_in_quote_coin(fake, broker):
    start = pd.Timestamp.now(tz="UTC") - pd.Timedelta(days=20)  # three of Bybit's 7-day windows
    broker.place_market_order(buy(1000.0))
    broker.place_market_order(sell(0.01))

    executions = broker.executions(start)

    assert [(e.client_id, e.side, e.price) for e in executions] == [
        (cid(), Side.BUY, PRICE),
        (cid("exit"), Side.SELL, PRICE),
    ]
    assert executions[0].fee == pytest.approx(0.016339 * 0.001 * PRICE)
    assert executions[1].fee == pytest.approx(0.01 * PRICE * 0.001)
    assert executions[0].time <= executions[1].time
    windows = [(int(r.params["startTime"]), int(r.params["endTime"])) for r in fake.sent(EXECUTION_LIST)]
    assert len(windows) == 3 and all(end - begin < 7 * 86_400_000 for begin, end in windows)
    assert broker.executions() == executions  # no start: Bybit's default, the last 7 days


def test_sizes_are_rounded_down_to_the_instrument_and_instruments_are_cached(fake, broker):
    fake.add_instrument("ETHUSDT", "ETH", "USDT", base_precision="0.0001", quote_precision="0.01",
                        min_order_qty="0.001", min_order_amt="5", tick_size="0.05")
    fake.set_price("ETHUSDT", 3400.0)
    fake.set_balance("ETH", 2.0)

    broker.place_market_order(buy(123.456789, symbol="ETHUSDT"))
    broker.place_market_order(sell(1.23456789, symbol="ETHUSDT"))

    assert [(c["qty"], c["marketUnit"]) for c in creates(fake)] == [("123.45", "quoteCoin"), ("1.2345", "baseCoin")]
    eth = broker.instrument("ETHUSDT")
    assert (eth.base_precision, eth.quote_precision, eth.min_order_qty, eth.min_order_amount, eth.tick_size) == (
        0.0001, 0.01, 0.001, 5.0, 0.05,
    )
    assert eth.round_price(3456.789) == pytest.approx(3456.75) and eth.round_qty(0.00019) == pytest.approx(0.0001)
    assert len(fake.sent(INSTRUMENTS_INFO)) == 1  # cached for the broker's life


@pytest.mark.parametrize(
    ("order", "needle"),
    [
        (buy(0.999), "minimum order value (minOrderAmt) 1 USDT"),
        (buy(0.000000001), "minimum order value"),  # rounds down to 0
        (buy(float("nan")), "Buy NaN USDT"),  # never sent as "nan"
        (sell(0.0000479), "minimum order quantity (minOrderQty) 0.000048 BTC"),
    ],
    ids=["buy-below-min-value", "buy-rounds-to-zero", "buy-nan", "sell-below-min-qty"],
)
def test_dust_is_refused_locally_and_nothing_is_sent(fake, broker, order, needle):
    fake.set_balance("BTC", 1.0)

    with pytest.raises(OrderRefused, match="nothing sent") as raised:
        broker.place_market_order(order)

    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert creates(fake) == []


# ------------------------------------------------------------------------------ faults around an order


def test_a_lost_answer_is_not_resent_and_the_order_is_found_filled(fake, make_broker, sleeps):
    broker = make_broker(timeout_s=1.0)
    fake.unique_link_ids = False  # even an exchange that would take the id again gets one order only
    fake.fail_next(TradeFault.lost(stall_s=1.4))  # created and filled, the answer comes after the 1 s timeout

    with pytest.raises(ExchangeUnavailable) as raised:
        broker.place_market_order(buy(1000.0))

    message = str(raised.value)
    assert "timed out after 1 s" in message and "not resent: its outcome is unknown" in message
    assert "query_order(client_id)" in message and "\n" not in message
    found = broker.query_order(cid())
    assert found.status is OrderStatus.FILLED and found.filled_qty == pytest.approx(0.016339)
    assert len(creates(fake)) == 1 and len(fake.created) == 1 and sleeps == []


def test_a_lost_answer_behind_a_502_is_looked_up_not_resent(fake, broker, sleeps):
    fake.unique_link_ids = False
    fake.fail_next(TradeFault.lost())  # created and filled, then a bare 502 from the "gateway"

    report = broker.place_market_order(buy(1000.0))

    assert report.status is OrderStatus.FILLED and report.client_id == cid()
    assert len(creates(fake)) == 1 and len(fake.created) == 1 and sleeps == []
    assert [r.path for r in fake.requests][-2:] == [ORDER_REALTIME, ORDER_HISTORY]


def test_a_5xx_before_bybit_took_the_order_is_looked_up_then_resent_once(fake, broker, sleeps, caplog):
    fake.fail_next(TradeFault.http(503).on(ORDER_CREATE))  # refused at the gateway: nothing created

    with caplog.at_level(logging.WARNING, logger="pricelevel.trading.bybit"):
        report = broker.place_market_order(buy(1000.0))

    assert report.status is OrderStatus.ACKED
    paths = [r.path for r in fake.requests if r.path != INSTRUMENTS_INFO]
    assert paths == [ORDER_CREATE, ORDER_REALTIME, ORDER_HISTORY, ORDER_CREATE]
    assert creates(fake)[0] == creates(fake)[1] and len(fake.created) == 1
    assert sleeps == [0.5] and "HTTP 503" in caplog.text and "retry 2/4" in caplog.text


def test_a_rate_limit_is_retried_and_one_order_is_placed(fake, broker, sleeps, caplog):
    fake.fail_next(TradeFault.rate_limit(0.1).on(ORDER_CREATE))

    with caplog.at_level(logging.WARNING, logger="pricelevel.trading.bybit"):
        report = broker.place_market_order(buy(1000.0))

    assert report.status is OrderStatus.ACKED
    assert len(creates(fake)) == 2 and creates(fake)[0] == creates(fake)[1]
    assert len(fake.created) == 1 and sleeps == [0.5]  # no lookup: a rate-limited request never reached the engine
    assert not fake.sent(ORDER_REALTIME) and "retCode 10006" in caplog.text


def test_a_persistent_rate_limit_ends_unavailable_after_the_attempts(fake, broker, sleeps):
    fake.fail_next(*[TradeFault.rate_limit().on(ORDER_CREATE)] * 4)

    with pytest.raises(ExchangeUnavailable, match=r"after 4 attempts: retCode 10006 Too many visits!"):
        broker.place_market_order(buy(1000.0))
    assert fake.created == [] and sleeps == [0.5, 1.0, 2.0]


def test_a_refused_connection_is_retried_it_never_reached_bybit(sleeps):
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = BybitConfig(max_attempts=3, backoff_s=0.25)
    broker = BybitBroker(config, "testnet", SECRETS, endpoint=f"http://127.0.0.1:{port}", sleep=sleeps.append)
    broker._instruments["BTCUSDT"] = Instrument("BTCUSDT", "BTC", "USDT", 1e-6, 1e-8, 1.0, 0.000048, 0.01)

    with pytest.raises(ExchangeUnavailable, match=r"after 3 attempts: connection failed: ConnectionError"):
        broker.place_market_order(buy(100.0))
    assert sleeps == [0.25, 0.5]


@pytest.mark.parametrize(("unified", "code"), [(False, 170141), (True, 110072)], ids=["classic-170141", "unified-110072"])
def test_a_duplicate_client_id_is_looked_up_never_resent(fake, broker, sleeps, unified, code):
    fake.unified_account = unified
    first = broker.place_market_order(buy(1000.0))

    again = broker.place_market_order(buy(1000.0))  # the answer to the first was lost; a restart decides again

    assert fake.refusals == {code: 1}
    assert again.status is OrderStatus.FILLED and again.exchange_id == first.exchange_id
    assert "duplicate client id" in again.message
    paths = [r.path for r in fake.requests if r.path != INSTRUMENTS_INFO]
    assert paths == [ORDER_CREATE, ORDER_CREATE, ORDER_REALTIME, ORDER_HISTORY]  # looked up, not sent a third time
    assert len(fake.created) == 1 and sleeps == []


def test_a_duplicate_client_id_returns_the_existing_order(fake, broker):
    first = broker.place_market_order(buy(1000.0))

    again = broker.place_market_order(buy(1000.0))  # a restart deciding the same bar again

    assert again.status is OrderStatus.FILLED and again.exchange_id == first.exchange_id
    assert len(creates(fake)) == 2 and len(fake.created) == 1
    assert fake.balance("USDT") == pytest.approx(10_000 - 0.016339 * PRICE)  # spent once


@pytest.mark.parametrize(
    ("fault", "order", "code", "hint"),
    [
        (None, buy(20_000.0), "retCode 170131 Insufficient balance.", "not enough USDT in the UNIFIED wallet"),
        (TradeFault.insufficient_balance(), sell(0.01), "retCode 170131", "not enough BTC"),
        (None, sell(0.0001), "retCode 170140 Order value exceeded lower limit.", "refused the order"),
        (TradeFault.min_order_value(), buy(5.0), "retCode 170140", "refused the order"),
    ],
    ids=["insufficient-usdt", "insufficient-fault", "sell-below-min-value", "min-value-fault"],
)
def test_a_refused_order_raises_order_refused_in_one_line(fake, broker, sleeps, fault, order, code, hint):
    fake.set_balance("BTC", 1.0)
    fake.set_price("BTCUSDT", 5000.0)  # 0.0001 BTC is worth 0.5 USDT, below minOrderAmt 1
    if fault is not None:
        fake.fail_next(fault)

    with pytest.raises(OrderRefused) as raised:
        broker.place_market_order(order)

    message = str(raised.value)
    assert "\n" not in message and "(not retryable)" in message
    assert code in message and hint in message and order.client_id in message
    assert len(creates(fake)) == 1 and fake.created == [] and sleeps == []


@pytest.mark.parametrize("listed_min_qty", ["0.000048", None], ids=["minOrderQty-listed", "minOrderQty-dropped"])
def test_a_sell_below_the_minimum_order_value_is_refused_before_sending(fake, make_broker, listed_min_qty):
    fake.add_instrument("BTCUSDT", "BTC", "USDT", min_order_qty=listed_min_qty)  # minOrderAmt 1 USDT
    fake.set_balance("BTC", 1.0)
    fake.set_price("BTCUSDT", 5000.0)
    broker = make_broker()
    order = MarketOrder(cid("exit"), "BTCUSDT", Side.SELL, base_qty=0.00019999, price_hint=5000.0)

    with pytest.raises(OrderRefused, match="nothing sent") as raised:
        broker.place_market_order(order)  # 0.000199 BTC (basePrecision) is worth 0.995 USDT

    message = str(raised.value)
    assert "Sell 0.000199 BTC" in message and "below the minimum order value (minOrderAmt) 1 USDT" in message
    assert fake.sent(ORDER_CREATE) == [] and fake.refusals == {}
    assert broker.instrument("BTCUSDT").min_order_qty == (0.000048 if listed_min_qty else 0.0)
    worth_it = MarketOrder(cid("exit2"), "BTCUSDT", Side.SELL, base_qty=0.0002, price_hint=5000.0)
    assert broker.place_market_order(worth_it).status is OrderStatus.ACKED  # exactly 1 USDT: sent and taken


def test_a_rules_refusal_reloads_the_instrument(fake, broker):
    fake.set_balance("BTC", 1.0)
    fake.set_price("BTCUSDT", 5000.0)
    with pytest.raises(OrderRefused):
        broker.place_market_order(sell(0.0001))

    broker.instrument("BTCUSDT")

    assert len(fake.sent(INSTRUMENTS_INFO)) == 2


def test_a_rejected_order_is_reported_rejected(fake, broker):
    fake.fail_next(TradeFault.reject("EC_NoImmediateQtyToFill"))

    assert broker.place_market_order(buy(1000.0)).status is OrderStatus.ACKED
    report = broker.query_order(cid())

    assert report.status is OrderStatus.REJECTED and report.filled_qty == 0 and report.fee == 0
    assert "EC_NoImmediateQtyToFill" in report.message
    assert broker.balances() == {"USDT": 10_000.0}


def test_a_partial_fill_is_partial_until_cancelled(fake, broker):
    fake.fill_fraction = 0.4

    broker.place_market_order(buy(1000.0))
    partial = broker.query_order(cid())
    (listed,) = broker.open_orders()
    cancelled = broker.cancel_order("BTCUSDT", cid())

    qty = 0.006535  # 400 / 61200 down to the lot size
    assert partial.status is OrderStatus.PARTIAL and partial.filled_qty == pytest.approx(qty)
    assert listed == partial
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.filled_qty == pytest.approx(qty)
    assert "PartiallyFilledCanceled" in cancelled.message and broker.open_orders() == []
    assert broker.cancel_order("BTCUSDT", cid()) == cancelled  # cancelling again: how it ended


def test_cancelling_an_unknown_order_is_refused(fake, broker):
    with pytest.raises(OrderRefused, match="retCode 170213 Order does not exist.*no order with client id"):
        broker.cancel_order("BTCUSDT", cid("nope"))


def test_an_order_bybit_never_saw_is_none(fake, broker):
    assert broker.query_order(cid("never-sent")) is None
    assert [r.path for r in fake.requests] == [ORDER_REALTIME, ORDER_HISTORY]


def test_a_read_retries_then_ends_unavailable(fake, broker, sleeps):
    fake.fail_next(*[TradeFault.http(502).on(WALLET_BALANCE)] * 4)

    with pytest.raises(ExchangeUnavailable, match=r"read the UNIFIED wallet balance at .* after 4 attempts: HTTP 502"):
        broker.balances()
    assert sleeps == [0.5, 1.0, 2.0]


# ---------------------------------------------------------------------------------- clock and rate limits


def clock_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "off Bybit's" in r.getMessage()]


def test_a_skewed_clock_is_read_before_the_first_private_call_and_never_refused(fake, broker, sleeps, caplog):
    fake.clock_skew_s = 30.0  # Bybit's clock is 30 s ahead of ours: our timestamps look 30 s old

    with caplog.at_level(logging.INFO, logger="pricelevel.trading.bybit"):
        assert broker.balances() == {"USDT": 10_000.0}
        assert broker.place_market_order(buy(1000.0)).status is OrderStatus.ACKED
        assert broker.query_order(cid()).status is OrderStatus.FILLED

    assert fake.refusals == {} and sleeps == [] and fake.time_requests == 1
    (said,) = clock_warnings(caplog)
    assert "clock is +30." in said and "NTP" in said


def test_a_clock_refusal_reads_bybit_time_widens_recv_window_and_retries(fake, broker, sleeps, caplog):
    assert broker.balances() == {"USDT": 10_000.0}  # in sync: Bybit's clock read once, offset ~0
    fake.clock_skew_s = 30.0  # then this machine's clock falls 30 s behind

    with caplog.at_level(logging.INFO, logger="pricelevel.trading.bybit"):
        report = broker.place_market_order(buy(1000.0))
        fake.clock_skew_s = 75.0  # and again, further: corrected again, not said again
        assert broker.balances() == pytest.approx({"USDT": 10_000 - 0.016339 * PRICE, "BTC": 0.016339 * 0.999})

    assert report.status is OrderStatus.ACKED and len(fake.created) == 1
    assert fake.refusals == {10002: 2} and fake.time_requests == 3
    windows = [r.recv_window for r in fake.requests if r.path in (ORDER_CREATE, WALLET_BALANCE)]
    assert windows == ["5000", "5000", "10000", "10000", "20000"]  # widened after each refusal, up to 20 s
    assert sleeps == [0.5, 0.5]  # the usual backoff before each resend, nothing more
    (said,) = clock_warnings(caplog)
    assert "retCode 10002" in said and "clock is +30." in said and "recv_window 10000 ms" in said
    assert "clock is +75." in caplog.text  # the second correction is logged, at INFO


class FakeClock:
    """One clock for the fake exchange and the broker; ``sleep`` moves it instead of waiting."""

    def __init__(self) -> None:
        self.now = pd.Timestamp("2024-07-01 12:00", tz="UTC")
        self.sleeps: list[float] = []

    def __call__(self) -> pd.Timestamp:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += pd.Timedelta(seconds=seconds)


def test_the_rate_limit_headers_pace_a_burst_below_the_quota(httpserver, endpoint):
    clock = FakeClock()
    fake = FakeBybitExchange(api_key=API_KEY, api_secret=API_SECRET, now=clock, rate_quota=5)
    fake.set_price("BTCUSDT", PRICE)
    fake.install(httpserver)
    config = BybitConfig(timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=4, backoff_s=0.5, backoff_max_s=4.0)
    broker = BybitBroker(config, "testnet", SECRETS, endpoint=endpoint, sleep=clock.sleep, now=clock)

    reports = [broker.place_market_order(buy(100.0, f"burst{i}")) for i in range(10)]

    httpserver.check_handler_errors()
    assert all(r.status is OrderStatus.ACKED for r in reports) and len(fake.created) == 10
    assert RET_RATE_LIMIT not in fake.refusals and len(fake.sent(ORDER_CREATE)) == 10  # never refused, never resent
    assert clock.sleeps == [1.0, 1.0, 1.0]  # after the 3rd, 6th and 9th order: 2 of 5 left, wait for the window
    assert broker.pacer.waited_s == pytest.approx(3.0)


def test_the_fake_reports_the_quota_and_refuses_past_it(fake, endpoint):
    fake.rate_quota = 2
    query = "accountType=UNIFIED"
    url = f"{endpoint}{WALLET_BALANCE}?{query}"

    answers = [requests.get(url, headers=signed_headers(query), timeout=5) for _ in range(3)]

    assert [a.json()["retCode"] for a in answers] == [0, 0, 10006]
    assert [a.headers["X-Bapi-Limit-Status"] for a in answers] == ["1", "0", "0"]
    assert answers[0].headers["X-Bapi-Limit"] == "2"
    assert int(answers[2].headers["X-Bapi-Limit-Reset-Timestamp"]) > int(answers[0].headers["X-Bapi-Limit-Reset-Timestamp"])
    skewed = requests.get(endpoint + MARKET_TIME, timeout=5).json()["result"]
    assert set(skewed) == {"timeSecond", "timeNano"} and int(skewed["timeNano"]) // 10**9 == int(skewed["timeSecond"])


# ------------------------------------------------------------------------------------- keys and secrets


def test_a_bad_api_key_names_the_key_problem_without_the_key(fake, make_broker):
    wrong = Secrets.from_env({"BYBIT_API_KEY": "PLKEYwrong0000000", "BYBIT_API_SECRET": API_SECRET})
    broker = make_broker(wrong)

    # A refused key is no outage: the trading service stops on it (CredentialsRefused) instead of waiting.
    with pytest.raises(CredentialsRefused) as read:
        broker.balances()
    with pytest.raises(CredentialsRefused) as order:
        broker.place_market_order(buy(100.0))

    for raised in (read, order):
        message = str(raised.value)
        assert "retCode 10003 API key is invalid." in message and "(not retryable)" in message
        assert "Bybit does not know BYBIT_API_KEY in testnet" in message
        assert "PLKEYwrong0000000" not in message and API_SECRET not in message
    assert fake.created == []


def test_a_bad_secret_is_reported_and_the_echoed_key_is_masked(fake, make_broker):
    wrong = Secrets.from_env({"BYBIT_API_KEY": API_KEY, "BYBIT_API_SECRET": "PLSECRETwrong000000"})

    with pytest.raises(CredentialsRefused) as raised:
        make_broker(wrong).balances()

    message = str(raised.value)  # Bybit echoes the signed string, key included: it must be masked
    assert "retCode 10004 error sign! origin_string[" in message and "***" in message
    assert "BYBIT_API_SECRET is not the secret of BYBIT_API_KEY" in message
    assert API_KEY not in message and "PLSECRETwrong000000" not in message


def test_a_missing_key_fails_at_construction():
    only_key = Secrets.from_env({"BYBIT_API_KEY": API_KEY})

    with pytest.raises(MissingSecretError, match="BYBIT_API_SECRET is not set"):
        BybitBroker(BybitConfig(), "testnet", only_key)
    with pytest.raises(MissingSecretError, match="BYBIT_API_KEY is not set"):
        BybitBroker(BybitConfig(), "testnet", Secrets())


def test_secrets_never_appear_in_logs_errors_or_reprs(fake, make_broker, caplog):
    broker = make_broker()
    fake.fail_next(
        TradeFault.rate_limit().on(ORDER_CREATE),
        TradeFault.api_error(10006, f"Too many visits! api_key={API_KEY}").on(ORDER_CREATE),
        TradeFault.http(503).on(ORDER_CREATE),
    )
    errors = []
    with caplog.at_level(logging.DEBUG):
        broker.place_market_order(buy(1000.0))
        for call in (
            lambda: make_broker(Secrets.from_env({"BYBIT_API_KEY": API_KEY, "BYBIT_API_SECRET": "x" * 12})).balances(),
            lambda: broker.place_market_order(buy(50_000.0, "big")),
            lambda: broker.cancel_order("BTCUSDT", cid("nope")),
        ):
            with pytest.raises((ExchangeUnavailable, OrderRefused, CredentialsRefused)) as raised:
                call()
            errors.append(raised.value)

    said = caplog.text + " ".join(f"{e} {e!r}" for e in errors) + repr(broker)
    assert "retCode 10006" in caplog.text and "api_key=***" in caplog.text
    assert API_KEY not in said and API_SECRET not in said
    assert all(e.__cause__ is None and e.__suppress_context__ for e in errors)  # no pybit text in tracebacks


@pytest.mark.parametrize(
    ("mode", "base_url"),
    [("mainnet", "https://api.bybit.com"), ("testnet", "https://api-testnet.bybit.com"),
     ("demo", "https://api-demo.bybit.com")],
)
def test_the_mode_picks_the_base_url_and_the_market_data_endpoint_never_does(mode, base_url):
    config = BybitConfig(endpoint="http://127.0.0.1:9", testnet=True)  # market data settings

    assert BybitBroker(config, mode, SECRETS).endpoint == base_url
    assert BybitBroker(config, mode, SECRETS, endpoint="http://127.0.0.1:7/").endpoint == "http://127.0.0.1:7"
    with pytest.raises(ValueError, match="mode must be one of testnet, demo, mainnet"):
        BybitBroker(config, "paper", SECRETS)


# -------------------------------------------------------------------------------------------- the fake


def signed_headers(payload: str, *, secret: str = API_SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(timestamp if timestamp is not None else int(time.time() * 1000))
    sign = hmac.new(secret.encode(), f"{ts}{API_KEY}5000{payload}".encode(), hashlib.sha256).hexdigest()
    return {"X-BAPI-API-KEY": API_KEY, "X-BAPI-SIGN": sign, "X-BAPI-TIMESTAMP": ts, "X-BAPI-RECV-WINDOW": "5000"}


def test_the_fake_checks_signatures_and_timestamps_like_bybit(fake, endpoint):
    query = "accountType=UNIFIED"
    url = f"{endpoint}{WALLET_BALANCE}?{query}"
    body = json.dumps({"category": "spot", "symbol": "BTCUSDT", "side": "Buy", "orderType": "Market",
                       "qty": "10", "orderLinkId": "by-hand-1"})

    ok = requests.get(url, headers=signed_headers(query), timeout=5).json()
    tampered = requests.get(url + "&coin=BTC", headers=signed_headers(query), timeout=5).json()
    stale = requests.get(url, headers=signed_headers(query, timestamp=int(time.time() * 1000) - 60_000), timeout=5)
    created = requests.post(endpoint + ORDER_CREATE, data=body, headers=signed_headers(body), timeout=5).json()

    assert ok["retCode"] == 0 and ok["result"]["list"][0]["coin"][0]["walletBalance"] == "10000"
    assert tampered["retCode"] == 10004 and stale.json()["retCode"] == 10002
    assert created["retCode"] == 0 and fake.order("by-hand-1")["marketUnit"] == "quoteCoin"  # Bybit's default


def test_one_fake_server_serves_candles_and_trading(fake, endpoint):
    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    fake.market.add("BTCUSDT", "1h", random_candles(t0, 24, "1h"))

    pages = list(BybitSource(BybitConfig(endpoint=endpoint)).fetch("BTCUSDT", "1h", t0, t0 + pd.Timedelta(hours=24)))

    assert sum(map(len, pages)) == 24 and len(fake.market.requests) == 1


def test_the_standalone_fake_routes_trading_and_candles():
    client = Client(FakeBybitExchange().wsgi_app)

    info = client.get(INSTRUMENTS_INFO, query_string={"category": "spot", "symbol": "BTCUSDT"}).json
    unsigned = client.get(WALLET_BALANCE, query_string={"accountType": "UNIFIED"}).json

    assert info["retCode"] == 0 and info["result"]["list"][0]["lotSizeFilter"]["basePrecision"] == "0.000001"
    assert unsigned["retCode"] == 10003
    assert client.get("/v5/market/kline", query_string={"category": "spot", "symbol": "X", "interval": "60"}).json[
        "retCode"
    ] == 10001
    assert client.get("/v5/market/tickers").status_code == 404


# ------------------------------------------------------------------------------------ resting exits


def test_resting_exits_are_conditional_orders_a_limit_take_profit_and_a_market_stop(fake, broker):
    broker.place_market_order(buy(1000.0))
    held = fake.balance("BTC")
    tp = broker.place_resting_order(RestingOrder(cid("tp"), "BTCUSDT", held, limit_price=64_260.004,
                                                 trigger_price=64_260.004))
    sl = broker.place_resting_order(RestingOrder(cid("sl"), "BTCUSDT", held, trigger_price=59_976.009))
    assert tp.status is OrderStatus.ACKED and sl.status is OrderStatus.ACKED
    sent_tp, sent_sl = creates(fake)[1:]
    assert sent_tp["orderType"] == "Limit" and sent_tp["timeInForce"] == "GTC" and sent_tp["orderFilter"] == "StopOrder"
    assert sent_tp["price"] == sent_tp["triggerPrice"] == "64260.01", "rounded up: never below the rule's price"
    assert sent_sl["orderType"] == "Market" and sent_sl["orderFilter"] == "StopOrder" and "price" not in sent_sl
    assert sent_sl["triggerPrice"] == "59976" and sent_sl["marketUnit"] == "baseCoin"
    assert sent_tp["qty"] == sent_sl["qty"] and float(sent_tp["qty"]) == pytest.approx(held, abs=1e-6)
    assert broker.query_order(cid("sl")).status is OrderStatus.ACKED, "an untriggered order is open"
    # Bybit spot files untriggered conditional orders apart: cancelled with orderFilter=StopOrder.
    cancelled = broker.cancel_order("BTCUSDT", cid("sl"), conditional=True)
    assert cancelled.status is OrderStatus.CANCELLED
    assert fake.sent(ORDER_CANCEL)[-1].params["orderFilter"] == "StopOrder"
    report = broker.cancel_order("BTCUSDT", cid("tp"))  # without the filter Bybit does not find it: still open
    assert report.status is OrderStatus.ACKED and fake.refusals[170213] == 1


def test_a_resting_sell_below_the_minimum_order_value_is_refused_before_sending(fake, broker):
    with pytest.raises(OrderRefused, match="minOrderAmt"):
        broker.place_resting_order(RestingOrder(cid("sl"), "BTCUSDT", 0.00005, trigger_price=10_000.0))
    assert creates(fake) == []
