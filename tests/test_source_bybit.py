"""BybitSource against a fake Bybit v5 on 127.0.0.1: paging, parsing, the open candle, retries, secrets.

The clock is frozen at ``NOW`` on both sides and ``sleep`` only records its delays, so the retry tests
assert the exact backoff schedule without waiting for it.
"""

from __future__ import annotations

import logging
import socket

import pandas as pd
import pytest
import requests
from pandas.testing import assert_frame_equal
from werkzeug.test import Client

from pricelevel.core.secrets import Secrets
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import BybitConfig
from pricelevel.data.sources import SourceError
from pricelevel.data.sources.bybit import BybitSource
from tests.fakes.bybit_server import KLINE_PATH, FakeBybit, Fault, random_candles

NOW = pd.Timestamp("2024-07-01 12:34:56", tz="UTC")
T0 = pd.Timestamp("2024-01-01", tz="UTC")
HOUR = pd.Timedelta(hours=1)
SYMBOL = "BTCUSDT"


def ms(ts: pd.Timestamp) -> int:
    return pd.Timestamp(ts).value // 1_000_000


def concat(pages: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(pages, ignore_index=True)


def when(ts: pd.Timestamp) -> str:
    return f"{ts:%Y-%m-%d %H:%M}"


@pytest.fixture
def fake(httpserver):
    fake = FakeBybit(now=lambda: NOW)
    httpserver.expect_request(KLINE_PATH).respond_with_handler(fake.handle)
    yield fake
    httpserver.check_handler_errors()  # a crash in the fake must not pass for a 500 that the client retried


@pytest.fixture
def endpoint(httpserver) -> str:
    return f"http://127.0.0.1:{httpserver.port}"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_source(endpoint, sleeps):
    def make(secrets: Secrets | None = None, **settings) -> BybitSource:
        defaults = {
            "endpoint": endpoint,
            "timeout_s": 2.0,
            "max_attempts": 4,
            "backoff_s": 0.5,
            "backoff_max_s": 4.0,
        }
        return BybitSource(
            BybitConfig(**{**defaults, **settings}), secrets, now=lambda: NOW, sleep=sleeps.append
        )

    return make


# ------------------------------------------------------------------------------------------ paging, parsing


def test_pages_forward_in_windows_of_page_limit(fake, make_source):
    served = random_candles(T0, 2500, "1h")
    fake.add(SYMBOL, "1h", served)

    pages = list(make_source(page_limit=1000).fetch(SYMBOL, Timeframe.H1, T0, T0 + 2500 * HOUR))

    assert [len(page) for page in pages] == [1000, 1000, 500]
    assert_frame_equal(concat(pages), served, check_exact=True)  # timestamps and every value, float64
    assert all(page["timestamp"].diff().iloc[1:].eq(HOUR).all() for page in pages)
    assert [(int(r["start"]), int(r["end"]), r["limit"]) for r in fake.requests] == [
        (ms(T0), ms(T0 + 999 * HOUR), "1000"),
        (ms(T0 + 1000 * HOUR), ms(T0 + 1999 * HOUR), "1000"),
        (ms(T0 + 2000 * HOUR), ms(T0 + 2499 * HOUR), "1000"),
    ]
    assert {(r["category"], r["symbol"], r["interval"]) for r in fake.requests} == {("spot", SYMBOL, "60")}


def test_small_page_limit_and_a_range_off_the_candle_grid(fake, make_source):
    served = random_candles(T0, 60, "1h", seed=1)
    fake.add(SYMBOL, "1h", served)
    start, end = T0 + 2.5 * HOUR, T0 + 40 * HOUR + pd.Timedelta(minutes=1)  # candles opening at 3h..40h

    pages = list(make_source(page_limit=7).fetch(SYMBOL, "1h", start, end))

    assert [len(page) for page in pages] == [7, 7, 7, 7, 7, 3]
    assert_frame_equal(concat(pages), served.iloc[3:41].reset_index(drop=True), check_exact=True)
    assert len(fake.requests) == 6


@pytest.mark.parametrize("tf", list(Timeframe), ids=str)
def test_each_timeframe_given_as_text_maps_to_its_bybit_interval(fake, make_source, tf):
    served = random_candles(T0, 30, tf)
    fake.add(SYMBOL, tf, served)

    pages = list(make_source().fetch(SYMBOL, tf.value, T0, T0 + 30 * tf.delta))

    assert {r["interval"] for r in fake.requests} == {tf.bybit_interval}
    assert_frame_equal(concat(pages), served, check_exact=True)


def test_the_open_candle_is_never_yielded(fake, make_source, endpoint):
    served = random_candles(NOW.floor("h") - 47 * HOUR, 48, "1h")  # the last one opened 12:00, closes 13:00
    fake.add(SYMBOL, "1h", served)
    open_candle = served["timestamp"].iloc[-1]
    raw = requests.get(
        endpoint + KLINE_PATH,
        params={"category": "spot", "symbol": SYMBOL, "interval": "60", "start": ms(open_candle)},
        timeout=5,
    ).json()
    assert [int(row[0]) for row in raw["result"]["list"]] == [ms(open_candle)]  # the fake does serve it
    fake.requests.clear()

    pages = list(make_source().fetch(SYMBOL, "1h", served["timestamp"].iloc[0], NOW + pd.Timedelta(days=1)))

    assert_frame_equal(concat(pages), served.iloc[:-1], check_exact=True)
    assert max(int(r["end"]) for r in fake.requests) < ms(open_candle)


def test_rows_a_sloppy_server_returns_outside_the_range_are_dropped(fake, make_source):
    served = random_candles(NOW.floor("h") - 99 * HOUR, 100, "1h")  # ends with the open candle
    fake.add(SYMBOL, "1h", served)
    fake.ignore_time_range = True  # answers every request with all 100 rows

    pages = list(make_source().fetch(SYMBOL, "1h", served["timestamp"].iloc[20], None))  # None: up to now

    assert_frame_equal(concat(pages), served.iloc[20:-1].reset_index(drop=True), check_exact=True)


def test_resuming_from_a_later_start_asks_only_for_the_rest(fake, make_source):
    served = random_candles(T0, 2500, "1h")
    fake.add(SYMBOL, "1h", served)
    resume_at = served["timestamp"].iloc[1500]

    pages = list(make_source().fetch(SYMBOL, "1h", resume_at, T0 + 2500 * HOUR))

    assert_frame_equal(concat(pages), served.iloc[1500:].reset_index(drop=True), check_exact=True)
    assert [int(r["start"]) for r in fake.requests] == [ms(resume_at)]


def test_empty_windows_before_the_listing_yield_no_page(fake, make_source):
    listed = T0 + 1500 * HOUR
    served = random_candles(listed, 700, "1h")
    fake.add(SYMBOL, "1h", served)

    pages = list(make_source(page_limit=1000).fetch(SYMBOL, "1h", T0, listed + 700 * HOUR))

    assert [len(page) for page in pages] == [500, 200]
    assert len(fake.requests) == 3  # the first window came back empty and was skipped
    assert_frame_equal(concat(pages), served, check_exact=True)


@pytest.mark.parametrize(
    ("start", "end"),
    [(T0, T0), (T0 + 5 * HOUR, T0), (NOW, NOW + 10 * HOUR), (NOW - pd.Timedelta(minutes=30), NOW + HOUR)],
    ids=["empty", "reversed", "future", "only-the-open-candle"],
)
def test_a_range_without_closed_candles_sends_no_request(fake, make_source, start, end):
    fake.add(SYMBOL, "1h", random_candles(T0, 10, "1h"))

    assert list(make_source().fetch(SYMBOL, "1h", start, end)) == []
    assert fake.requests == []


def test_the_fake_answers_like_bybit(fake, endpoint):
    fake.add(SYMBOL, "1h", random_candles(T0, 10, "1h"))
    url = endpoint + KLINE_PATH
    params = {
        "category": "spot",
        "symbol": SYMBOL,
        "interval": "60",
        "start": ms(T0),
        "end": ms(T0 + 5 * HOUR),
    }

    body = requests.get(url, params={**params, "limit": 3}, timeout=5).json()
    unknown = requests.get(url, params={**params, "symbol": "NOPEUSDT"}, timeout=5).json()

    assert (body["retCode"], body["retMsg"]) == (0, "OK")
    rows = body["result"]["list"]
    # of the 6 rows in [start, end], the newest 3, newest first
    assert [int(row[0]) for row in rows] == [ms(T0 + h * HOUR) for h in (5, 4, 3)]
    assert all(len(row) == 7 and all(isinstance(value, str) for value in row) for row in rows)
    assert unknown["retCode"] == 10001


def test_the_standalone_fake_serves_a_folder_and_cycles_faults(tmp_path):
    served = random_candles(T0, 30, "1h")
    served.to_parquet(tmp_path / "ETHUSDT_1h.parquet")
    client = Client(FakeBybit.from_folder(tmp_path, now=lambda: NOW, fault_every=2).wsgi_app)
    query = {"category": "linear", "symbol": "ETHUSDT", "interval": "60", "limit": 5}

    first, second = client.get(KLINE_PATH, query_string=query), client.get(KLINE_PATH, query_string=query)

    assert [int(row[0]) for row in first.json["result"]["list"]] == [
        ms(t) for t in served["timestamp"].iloc[:-6:-1]
    ]
    assert second.json["retCode"] == 10006  # every 2nd request misbehaves
    assert client.get("/v5/market/tickers").status_code == 404


# ------------------------------------------------------------------------------------------------ retries

TRANSIENT = [
    (Fault.rate_limit(), "retCode 10006"),
    (Fault.api_error(10016, "Internal server error."), "retCode 10016"),
    (Fault.http(403), "HTTP 403"),
    (Fault.http(429), "HTTP 429"),
    (Fault.http(500), "HTTP 500"),
    (Fault.http(502), "HTTP 502"),
    (Fault.http(503), "HTTP 503"),
    (Fault.malformed(), "malformed response body"),
    (Fault.slow(1.3), "timed out after 1 s"),
]


@pytest.mark.parametrize(("fault", "logged"), TRANSIENT, ids=[text for _, text in TRANSIENT])
def test_a_transient_fault_is_retried_then_succeeds(fake, make_source, sleeps, caplog, fault, logged):
    served = random_candles(T0, 24, "1h")
    fake.add(SYMBOL, "1h", served)
    fake.fail_next(fault)

    with caplog.at_level(logging.WARNING, logger="pricelevel.data.sources.bybit"):
        pages = list(make_source(timeout_s=1.0).fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))

    assert_frame_equal(concat(pages), served, check_exact=True)
    assert len(fake.requests) == 2 and fake.requests[0] == fake.requests[1]
    assert sleeps == [0.5]  # ours, once: pybit neither retried nor slept on its own
    assert logged in caplog.text and "retry 2/4" in caplog.text


def test_backoff_doubles_per_attempt_up_to_the_cap(fake, make_source, sleeps):
    served = random_candles(T0, 24, "1h")
    fake.add(SYMBOL, "1h", served)
    fake.fail_next(*[Fault.http(503)] * 5)

    pages = list(
        make_source(max_attempts=6, backoff_s=1.0, backoff_max_s=5.0).fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR)
    )

    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert_frame_equal(concat(pages), served, check_exact=True)  # the 6th attempt got through


@pytest.mark.parametrize(("reset_after_s", "expected"), [(3.0, 3.0), (0.1, 0.5), (600.0, 4.0)])
def test_a_rate_limit_waits_until_bybit_says_it_resets(fake, make_source, sleeps, reset_after_s, expected):
    fake.add(SYMBOL, "1h", random_candles(T0, 24, "1h"))
    fake.fail_next(Fault.rate_limit(reset_after_s))

    list(make_source().fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))  # backoff_s 0.5, backoff_max_s 4

    assert sleeps == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("fault", "error", "hint"),
    [
        (Fault.rate_limit(), "retCode 10006 Too many visits!", "rate-limiting"),
        (Fault.http(403), "HTTP 403", "banned this IP"),
        (Fault.http(503), "HTTP 503", "unavailable"),
    ],
)
def test_a_persistent_fault_ends_in_one_clear_line(fake, make_source, sleeps, endpoint, fault, error, hint):
    fake.add(SYMBOL, "1h", random_candles(T0, 24, "1h"))
    fake.fail_next(*[fault] * 3)

    with pytest.raises(SourceError) as raised:
        list(make_source(max_attempts=3).fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))

    message = str(raised.value)
    assert "\n" not in message
    for part in (
        f"spot {SYMBOL} 1h",
        "2024-01-01 00:00..2024-01-01 23:00 UTC",
        endpoint,
        "after 3 attempts",
        error,
        hint,
    ):
        assert part in message
    assert len(fake.requests) == 3 and sleeps == [0.5, 1.0]


def test_pages_yielded_before_a_failure_are_a_gap_free_prefix(fake, make_source):
    served = random_candles(T0, 2500, "1h")
    fake.add(SYMBOL, "1h", served)
    kept, error = [], None

    try:  # as the ingest step does: store each page as it arrives
        for page in make_source(page_limit=1000, max_attempts=2).fetch(SYMBOL, "1h", T0, T0 + 2500 * HOUR):
            kept.append(page)
            fake.fail_next(Fault.http(502), Fault.http(502))  # Bybit goes down after the first page
    except SourceError as exc:
        error = exc

    assert error is not None and f"{when(T0 + 1000 * HOUR)}..{when(T0 + 1999 * HOUR)}" in str(error)
    assert_frame_equal(concat(kept), served.iloc[:1000], check_exact=True)


def test_an_unreachable_endpoint_is_retried_then_reported(sleeps):
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = BybitConfig(endpoint=f"http://127.0.0.1:{port}", max_attempts=2, backoff_s=0.25)
    source = BybitSource(config, now=lambda: NOW, sleep=sleeps.append)

    with pytest.raises(
        SourceError, match=r"after 2 attempts: connection failed: ConnectionError .*; hint: check the network"
    ):
        list(source.fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))
    assert sleeps == [0.25]


@pytest.mark.parametrize(
    ("symbol", "fault", "error"),
    [
        ("NOPEUSDT", None, "retCode 10001 Not supported symbols"),
        (SYMBOL, Fault.api_error(10001, "params error"), "retCode 10001 params error"),
        (SYMBOL, Fault.http(404), "HTTP 404"),
    ],
    ids=["unknown-symbol", "bad-params", "http-404"],
)
def test_a_rejected_request_fails_at_once(fake, make_source, sleeps, symbol, fault, error):
    fake.add(SYMBOL, "1h", random_candles(T0, 24, "1h"))
    if fault is not None:
        fake.fail_next(fault)

    with pytest.raises(SourceError) as raised:
        list(make_source().fetch(symbol, "1h", T0, T0 + 24 * HOUR))

    message = str(raised.value)
    assert error in message and symbol in message and "(not retryable)" in message
    assert len(fake.requests) == 1 and sleeps == []


@pytest.mark.parametrize("result", [{}, None, {"list": None}], ids=["no-list", "null-result", "null-list"])
def test_a_response_without_a_kline_list_fails_at_once(httpserver, fake, make_source, sleeps, result):
    body = {"retCode": 0, "retMsg": "OK", "result": result}
    httpserver.expect_oneshot_request(KLINE_PATH).respond_with_json(body)

    with pytest.raises(SourceError, match="unexpected response .* no result.list"):
        list(make_source().fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))
    assert sleeps == []


# --------------------------------------------------------------------------------- environments, secrets


@pytest.mark.parametrize(
    ("settings", "base_url"),
    [
        ({}, "https://api.bybit.com"),
        ({"testnet": True}, "https://api-testnet.bybit.com"),
        ({"demo": True}, "https://api-demo.bybit.com"),
        ({"testnet": True, "endpoint": "http://127.0.0.1:9/"}, "http://127.0.0.1:9"),
    ],
    ids=["mainnet", "testnet", "demo", "endpoint-wins"],
)
def test_the_environment_picks_the_base_url(settings, base_url):
    assert BybitSource(BybitConfig(**settings)).session.endpoint == base_url


def test_the_endpoint_override_is_where_requests_go(fake, make_source, httpserver, endpoint):
    fake.add(SYMBOL, "1h", random_candles(T0, 24, "1h"))

    list(make_source(testnet=True).fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))

    ((request, _response),) = httpserver.log
    assert request.url.startswith(f"{endpoint}{KLINE_PATH}?")


def test_api_keys_never_appear_in_errors_or_logs(fake, make_source, httpserver, caplog):
    key, secret = "KEYabc123456", "SECRETxyz987654"
    secrets = Secrets.from_env({"BYBIT_API_KEY": key, "BYBIT_API_SECRET": secret})
    fake.fail_next(
        Fault.api_error(10006, f"Too many visits! api_key={key}"),
        Fault.api_error(10001, f"request from {key} signed with {secret} rejected"),
    )
    source = make_source(secrets, endpoint=f"http://user:{secret}@127.0.0.1:{httpserver.port}")
    assert (source.session.api_key, source.session.api_secret) == (key, secret)  # the keys do reach pybit

    with caplog.at_level(logging.DEBUG), pytest.raises(SourceError) as raised:
        list(source.fetch(SYMBOL, "1h", T0, T0 + 24 * HOUR))

    message = str(raised.value)
    assert "retCode 10001" in message and message.count("***") == 3
    assert key not in message + caplog.text and secret not in message + caplog.text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no pybit text in tracebacks
