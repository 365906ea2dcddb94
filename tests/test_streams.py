"""Closed candles from Bybit's public kline stream (pybit's WebSocket against a local server speaking the
wire format), each checked alone, with REST (a fake Bybit over HTTP) filling what the stream missed."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.timeframes import Timeframe
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import BybitConfig, ValidationConfig
from pricelevel.data.sources.bybit import BybitSource
from pricelevel.data.validation import validate_candles
from pricelevel.trading.feeds import StoreFeed, StreamFeed, bar_ohlc, candle_faults
from pricelevel.trading.streams import KlineStream, StreamUp, stream_url, topic
from tests.fakes.bybit_server import KLINE_PATH, SLOW_MACHINE_TIMEOUT_S, FakeBybit, random_candles
from tests.fakes.bybit_ws import FakeKlineServer

H4 = Timeframe.H4
START = pd.Timestamp("2024-01-01", tz="UTC")
BAR = pd.Timestamp("2024-01-20", tz="UTC")  # the bar opening then closes at BAR + 4h
SYMBOLS = ("BTCUSDT", "ETHUSDT")


class Clock:
    """The exchange's and the stream's time in one: the fake REST serves what has opened by it, and the stream
    and the feed read it as wall-clock seconds."""

    def __init__(self, now: pd.Timestamp) -> None:
        self.now = now

    def __call__(self) -> pd.Timestamp:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(BAR)


@pytest.fixture
def served() -> dict[str, pd.DataFrame]:
    return {symbol: random_candles(START, 6 * 40, H4, seed=k) for k, symbol in enumerate(SYMBOLS)}


@pytest.fixture
def rest(httpserver, clock: Clock, served: dict[str, pd.DataFrame]) -> FakeBybit:
    fake = FakeBybit(now=clock)
    for symbol, candles in served.items():
        fake.add(symbol, H4, candles)
    httpserver.expect_request(KLINE_PATH).respond_with_handler(fake.handle)
    yield fake
    httpserver.check_handler_errors()


@pytest.fixture
def server():
    with FakeKlineServer() as server:
        yield server


def make_feed(httpserver, clock: Clock, tmp_path: Path, wait_s: float) -> StreamFeed:
    config = BybitConfig(endpoint=f"http://127.0.0.1:{httpserver.port}", timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=2,
                         backoff_s=0.0, backoff_max_s=0.0)
    source = BybitSource(config, now=clock, sleep=lambda _s: None)
    store_feed = StoreFeed(source, DataCatalogue(tmp_path / "data", "bybit"), ValidationConfig(), SYMBOLS, [H4],
                           start=START)
    return StreamFeed(store_feed, wait_s=wait_s, now=clock.seconds)


@pytest.fixture
def feed(httpserver, rest: FakeBybit, clock: Clock, tmp_path: Path) -> StreamFeed:
    # Long: a test here waits that long only when it fails (a pushed candle ends the wait), and a loaded 2-core CI
    # machine once delivered a push 5 s late, which the feed rightly backfilled over REST.
    return make_feed(httpserver, clock, tmp_path, wait_s=3 * SLOW_MACHINE_TIMEOUT_S)


def listen(server: FakeKlineServer, feed: StreamFeed, clock: Clock) -> KlineStream:
    stream = KlineStream(stream_url("testnet", server.endpoint), SYMBOLS, [H4], feed.deliver, now=clock.seconds,
                         reconnect_s=0.05, silent_after_s=1e9).start()
    assert stream.connected.wait(10) and server.wait_subscribed({topic(s, H4) for s in SYMBOLS})
    return stream


def candle(served: dict[str, pd.DataFrame], symbol: str, at: pd.Timestamp) -> dict:
    frame = served[symbol]
    return frame.loc[frame.timestamp == at].iloc[0].to_dict()


def until(candles: pd.DataFrame, bar: pd.Timestamp) -> pd.DataFrame:
    return candles[candles.timestamp <= bar].reset_index(drop=True)


def close_bar(server: FakeKlineServer, clock: Clock, served: dict[str, pd.DataFrame], bar: pd.Timestamp,
              symbols=SYMBOLS) -> None:
    """The exchange closes ``bar``: its time moves to the close and each symbol's closed candle is pushed."""
    clock.now = bar + H4.delta
    for symbol in symbols:
        server.push(symbol, H4, candle(served, symbol, bar))


def seeded(feed: StreamFeed, served: dict[str, pd.DataFrame]) -> None:
    """The first closed_by seeds every dataset over REST (the stream is not up yet)."""
    frames = feed.closed_by(BAR)
    assert set(feed.fetched) == {(s, H4) for s in SYMBOLS}
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR - H4.delta))


def test_a_pushed_closed_candle_reaches_the_trader_without_any_rest_call(
    server: FakeKlineServer, feed: StreamFeed, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame]
) -> None:
    seeded(feed, served)
    with listen(server, feed, clock):
        asked = len(rest.requests)
        close_bar(server, clock, served, BAR)
        started = time.monotonic()
        frames = feed.closed_by(BAR + H4.delta)

    assert time.monotonic() - started < feed.wait_s  # handed over as pushed, not after the wait
    assert len(rest.requests) == asked and feed.fetched == () and feed.problems == ()
    assert set(bar_ohlc(frames, H4, BAR)) == set(SYMBOLS)
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR))


def test_a_disconnect_mid_bar_is_backfilled_over_rest_and_gives_the_frames_of_an_uninterrupted_stream(
    server: FakeKlineServer, feed: StreamFeed, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame]
) -> None:
    seeded(feed, served)
    with listen(server, feed, clock) as stream:
        clock.now = BAR + pd.Timedelta(hours=3)
        server.push("BTCUSDT", H4, candle(served, "BTCUSDT", BAR), confirm=False)  # heard mid-bar
        time.sleep(0.2)
        server.refuse = True
        server.disconnect()
        close_bar(server, clock, served, BAR)  # pushed to nobody: the stream is down at the close
        assert not server.topics()
        server.refuse = False
        stream.connected.clear()
        assert stream.connected.wait(10) and server.wait_subscribed({topic(s, H4) for s in SYMBOLS})
        asked = len(rest.requests)
        started = time.monotonic()
        frames = feed.closed_by(BAR + H4.delta)

        assert time.monotonic() - started < feed.wait_s  # known missed at the reconnect: not waited for
        assert len(rest.requests) - asked == len(SYMBOLS)
        assert set(feed.fetched) == {(s, H4) for s in SYMBOLS}
        assert all(p.kind == "stream" and "stream down" in p.reason for p in feed.problems)
        for symbol in SYMBOLS:
            pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR))

        # ...and the stream carries on from there: the next close needs no REST.
        asked = len(rest.requests)
        close_bar(server, clock, served, BAR + H4.delta)
        frames = feed.closed_by(BAR + 2 * H4.delta)
    assert len(rest.requests) == asked and feed.problems == ()
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR + H4.delta))


def test_a_missing_candle_is_backfilled_for_its_symbol_only(
    server: FakeKlineServer, feed: StreamFeed, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame]
) -> None:
    seeded(feed, served)
    with listen(server, feed, clock):
        close_bar(server, clock, served, BAR, symbols=["BTCUSDT"])  # ETH's candle of BAR never comes
        close_bar(server, clock, served, BAR + H4.delta)
        asked = len(rest.requests)
        frames = feed.closed_by(BAR + 2 * H4.delta)

    assert feed.fetched == (("ETHUSDT", H4),) and len(rest.requests) - asked == 1
    [problem] = feed.problems
    assert (problem.symbol, problem.kind) == ("ETHUSDT", "stream") and "gap" in problem.reason
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR + H4.delta))


def test_an_unconfirmed_candle_is_never_used(
    httpserver, server: FakeKlineServer, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    feed = make_feed(httpserver, clock, tmp_path, wait_s=0.5)
    seeded(feed, served)
    with listen(server, feed, clock) as stream:
        clock.now = BAR + H4.delta
        for symbol in SYMBOLS:
            still_open = candle(served, symbol, BAR)
            still_open["close"] = still_open["high"] = still_open["high"] * 1.01
            server.push(symbol, H4, still_open, confirm=False)
        deadline = time.monotonic() + 5
        while stream.last_heard != clock.seconds() and time.monotonic() < deadline:
            time.sleep(0.01)
        frames = feed.closed_by(BAR + H4.delta)

    assert set(feed.fetched) == {(s, H4) for s in SYMBOLS}  # the closed candle came over REST
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR))


def test_a_pushed_candle_with_high_below_low_is_refused_and_named(
    httpserver, server: FakeKlineServer, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    feed = make_feed(httpserver, clock, tmp_path, wait_s=0.5)
    seeded(feed, served)
    with listen(server, feed, clock):
        clock.now = BAR + H4.delta
        bad = candle(served, "ETHUSDT", BAR)
        bad["high"], bad["low"] = bad["low"], bad["high"]
        server.push("ETHUSDT", H4, bad)
        server.push("BTCUSDT", H4, candle(served, "BTCUSDT", BAR))
        frames = feed.closed_by(BAR + H4.delta)

    refused = [p for p in feed.problems if p.kind == "bad_data"]
    assert [(p.symbol, p.timeframe) for p in refused] == [("ETHUSDT", H4)]
    assert "refused" in refused[0].reason and "high >= low" in refused[0].reason
    assert f"high={bad['high']:g}" in refused[0].reason
    assert feed.fetched == (("ETHUSDT", H4),)  # the exchange's REST answer replaces it (here: the true candle)
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR))


def test_a_silent_stream_is_taken_as_down_and_not_waited_for(
    server: FakeKlineServer, feed: StreamFeed, rest: FakeBybit, clock: Clock, served: dict[str, pd.DataFrame]
) -> None:
    seeded(feed, served)
    with listen(server, feed, clock):
        clock.now = BAR + 3 * H4.delta  # open, yet nothing pushed for three bars
        started = time.monotonic()
        frames = feed.closed_by(BAR + H4.delta)

    assert time.monotonic() - started < feed.wait_s
    assert {p.kind for p in feed.problems} == {"stream"} and all("silent" in p.reason for p in feed.problems)
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], until(served[symbol], BAR))


def test_a_consumer_that_raises_does_not_end_the_stream(server: FakeKlineServer, served) -> None:
    got, raised = [], []

    def deliver(event) -> None:
        if isinstance(event, StreamUp):
            return
        if not raised:
            raised.append(event.timestamp)
            raise RuntimeError("consumer bug")
        got.append(event.timestamp)

    with KlineStream(stream_url("testnet", server.endpoint), ["BTCUSDT"], [H4], deliver, reconnect_s=0.05) as stream:
        assert stream.connected.wait(10) and server.wait_subscribed({topic("BTCUSDT", H4)})
        server.push("BTCUSDT", H4, candle(served, "BTCUSDT", BAR))
        server.push("BTCUSDT", H4, candle(served, "BTCUSDT", BAR + H4.delta))
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.connected.is_set()
    assert raised == [BAR] and got == [BAR + H4.delta]


@pytest.mark.parametrize("values", [
    {"open": 100.0, "high": 99.0, "low": 101.0, "close": 100.0, "volume": 1.0, "turnover": 100.0},  # high < low
    {"open": -1.0, "high": 2.0, "low": 1.0, "close": float("nan"), "volume": -3.0, "turnover": float("inf")},
    {"open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 0.0, "turnover": float("nan")},  # fine
])
def test_one_candle_is_judged_by_the_same_rules_as_the_store(values: dict) -> None:
    for at in (BAR, BAR + pd.Timedelta(minutes=1)):  # on the 4h grid, and off it
        frame = pd.DataFrame([{"timestamp": at, **values}]).astype({"timestamp": "datetime64[ns, UTC]"})
        report = validate_candles(frame, H4, ValidationConfig(), "pushed")
        store_rules = {issue.check for issue in report.failures}
        assert set(candle_faults(at, values, H4)) == store_rules


@pytest.mark.parametrize(("mode", "url"), [
    ("mainnet", "wss://stream.bybit.com/v5/public/spot"),
    ("demo", "wss://stream.bybit.com/v5/public/spot"),  # demo trading reads mainnet's public candles
    ("testnet", "wss://stream-testnet.bybit.com/v5/public/spot"),
])
def test_the_mode_picks_the_public_stream_and_an_endpoint_overrides_it(mode: str, url: str) -> None:
    assert stream_url(mode) == url
    assert stream_url(mode, "ws://127.0.0.1:8766/") == "ws://127.0.0.1:8766/v5/public/spot"
