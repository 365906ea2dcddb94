"""The live candle feed against a fake Bybit: a bad candle is named, fetched again and recovered from, for
its symbol only; an outage (even at a first start) is reported, never raised."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.timeframes import Timeframe
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import BybitConfig, ValidationConfig
from pricelevel.data.ingest import first_bad_candle, ingest_dataset
from pricelevel.data.publish import validate_and_publish
from pricelevel.data.sources.bybit import BybitSource
from pricelevel.data.store import CandleStore, DatasetKey, Layer
from pricelevel.data.validation import DataValidationError
from pricelevel.trading.feeds import FeedProblem, StoreFeed, bar_ohlc
from tests.fakes.bybit_server import KLINE_PATH, SLOW_MACHINE_TIMEOUT_S, FakeBybit, random_candles

H4 = Timeframe.H4
START = pd.Timestamp("2024-01-01", tz="UTC")
BAR = pd.Timestamp("2024-01-20", tz="UTC")  # the bar opening then closes at BAR + 4h
SYMBOLS = ("BTCUSDT", "ETHUSDT")
ATTEMPTS = 2


class Clock:
    def __init__(self, now: pd.Timestamp) -> None:
        self.now = now

    def __call__(self) -> pd.Timestamp:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(BAR + H4.delta)


@pytest.fixture
def served() -> dict[str, pd.DataFrame]:
    return {symbol: random_candles(START, 6 * 60, H4, seed=k) for k, symbol in enumerate(SYMBOLS)}


@pytest.fixture
def fake(httpserver, clock: Clock, served: dict[str, pd.DataFrame]) -> FakeBybit:
    fake = FakeBybit(now=clock)
    for symbol, candles in served.items():
        fake.add(symbol, H4, candles)
    httpserver.expect_request(KLINE_PATH).respond_with_handler(fake.handle)
    yield fake
    httpserver.check_handler_errors()


@pytest.fixture
def catalogue(tmp_path: Path) -> DataCatalogue:
    return DataCatalogue(tmp_path / "data", "bybit")


@pytest.fixture
def feed(httpserver, fake: FakeBybit, clock: Clock, catalogue: DataCatalogue) -> StoreFeed:
    config = BybitConfig(endpoint=f"http://127.0.0.1:{httpserver.port}", timeout_s=SLOW_MACHINE_TIMEOUT_S, max_attempts=ATTEMPTS,
                         backoff_s=0.0, backoff_max_s=0.0)
    source = BybitSource(config, now=clock, sleep=lambda _s: None)
    return StoreFeed(source, catalogue, ValidationConfig(), SYMBOLS, [H4], start=START)


def served_until(candles: pd.DataFrame, bar: pd.Timestamp) -> pd.DataFrame:
    return candles[candles.timestamp <= bar].reset_index(drop=True)


def quarantined(catalogue: DataCatalogue, symbol: str) -> list[Path]:
    return sorted(catalogue.layer_dir(Layer.QUARANTINE).glob(f"{symbol}_{H4}.*.parquet"))


def test_a_high_below_low_candle_is_named_refetched_and_recovered_for_its_symbol_only(
    fake: FakeBybit, feed: StoreFeed, catalogue: DataCatalogue, served: dict[str, pd.DataFrame]
) -> None:
    bad = fake.serve_bad_candle("ETHUSDT", H4, BAR)
    assert bad["high"] < bad["low"]

    frames = feed.closed_by(BAR + H4.delta)

    # Only ETH is without this bar; BTC is returned exactly as served.
    assert set(bar_ohlc(frames, H4, BAR)) == {"BTCUSDT"}
    pd.testing.assert_frame_equal(frames["BTCUSDT"][H4], served_until(served["BTCUSDT"], BAR))
    assert frames["ETHUSDT"] == {H4: None}
    # The reason reaches the caller, typed and per symbol, and names the file, the rule and the row.
    [problem] = feed.problems
    assert isinstance(problem, FeedProblem)
    assert (problem.symbol, problem.timeframe, problem.kind) == ("ETHUSDT", H4, "bad_data")
    raw_path = catalogue.store.path(Layer.RAW, DatasetKey("bybit", "ETHUSDT", H4))
    assert str(raw_path) in problem.reason
    assert "high >= low" in problem.reason
    row = int((served["ETHUSDT"].timestamp == BAR).to_numpy().argmax())
    assert f"row {row}: timestamp={BAR.isoformat()}" in problem.reason
    assert f"high={bad['high']}" in problem.reason
    # The bad candle (and nothing before it) left the raw layer, so the next attempt asks for it again.
    raw = catalogue.store.read(Layer.RAW, DatasetKey("bybit", "ETHUSDT", H4))
    assert raw.timestamp.max() == BAR - H4.delta

    fake.correct_candle("ETHUSDT", H4, BAR)
    asked = len(fake.requests)
    frames = feed.closed_by(BAR + H4.delta)

    assert feed.problems == ()
    assert len(fake.requests) - asked == 1  # ETH's missing candle; BTC is up to date
    assert set(bar_ohlc(frames, H4, BAR)) == set(SYMBOLS)
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], served_until(served[symbol], BAR))


def test_a_bad_candle_is_quarantined_once_per_episode_not_at_every_attempt(
    fake: FakeBybit, feed: StoreFeed, clock: Clock, catalogue: DataCatalogue, served: dict[str, pd.DataFrame]
) -> None:
    fake.serve_bad_candle("ETHUSDT", H4, BAR)
    reasons = []
    for bar in (BAR, BAR, BAR + H4.delta, BAR + 2 * H4.delta):  # two attempts at one bar, then two more bars
        clock.now = bar + H4.delta
        frames = feed.closed_by(bar + H4.delta)
        assert set(bar_ohlc(frames, H4, bar)) == {"BTCUSDT"}
        assert [(p.symbol, p.kind) for p in feed.problems] == [("ETHUSDT", "bad_data")]
        reasons.append(feed.problems[0].reason)
    [copy] = quarantined(catalogue, "ETHUSDT")
    assert all(str(copy) in reason for reason in reasons)
    assert "high >= low" in copy.with_suffix(".md").read_text()

    fake.correct_candle("ETHUSDT", H4, BAR)
    frames = feed.closed_by(BAR + 3 * H4.delta)
    assert feed.problems == ()
    pd.testing.assert_frame_equal(frames["ETHUSDT"][H4], served_until(served["ETHUSDT"], BAR + 2 * H4.delta))

    # A new bad candle later is a new episode: a second copy.
    fake.serve_bad_candle("ETHUSDT", H4, BAR + 3 * H4.delta)
    clock.now = BAR + 4 * H4.delta
    feed.closed_by(BAR + 4 * H4.delta)
    assert [p.kind for p in feed.problems] == ["bad_data"]
    assert len(quarantined(catalogue, "ETHUSDT")) == 2


def test_a_first_start_during_an_outage_reports_unavailable_and_recovers(
    fake: FakeBybit, feed: StoreFeed, catalogue: DataCatalogue, served: dict[str, pd.DataFrame]
) -> None:
    fake.set_outage(503)

    frames = feed.closed_by(BAR + H4.delta)  # no validated folder exists yet: must not raise

    assert frames == {symbol: {H4: None} for symbol in SYMBOLS}
    assert [(p.symbol, p.timeframe, p.kind) for p in feed.problems] == [(s, H4, "unavailable") for s in SYMBOLS]
    assert all("503" in p.reason for p in feed.problems)
    # The first dataset waited out its retries; the next was not asked again during the same outage.
    assert len(fake.requests) == ATTEMPTS
    assert not catalogue.layer_dir(Layer.VALIDATED).exists()

    fake.set_outage(None)
    frames = feed.closed_by(BAR + H4.delta)
    assert feed.problems == ()
    for symbol in SYMBOLS:
        pd.testing.assert_frame_equal(frames[symbol][H4], served_until(served[symbol], BAR))


def test_an_outage_after_a_start_keeps_up_to_date_symbols_and_reports_the_rest(
    fake: FakeBybit, feed: StoreFeed, clock: Clock, catalogue: DataCatalogue, served: dict[str, pd.DataFrame]
) -> None:
    feed.closed_by(BAR + H4.delta)
    assert feed.problems == ()
    validated = {p: p.read_bytes() for p in catalogue.layer_dir(Layer.VALIDATED).glob("*.parquet")}

    clock.now = BAR + 2 * H4.delta
    fake.set_outage(503)
    frames = feed.closed_by(BAR + 2 * H4.delta)

    assert {p.kind for p in feed.problems} == {"unavailable"} and {p.symbol for p in feed.problems} == set(SYMBOLS)
    assert bar_ohlc(frames, H4, BAR + H4.delta) == {}
    assert {p: p.read_bytes() for p in validated} == validated  # the last good candles stay in place

    # A retry of the bar that is already stored needs no request: it is returned during the outage.
    frames = feed.closed_by(BAR + H4.delta)
    assert feed.problems == ()
    assert set(bar_ohlc(frames, H4, BAR)) == set(SYMBOLS)


def test_only_failures_of_candle_values_say_where_to_fetch_again(tmp_path: Path, served) -> None:
    catalogue = DataCatalogue(tmp_path, "test")
    key = DatasetKey("test", "ETHUSDT", H4)
    candles = served["ETHUSDT"].copy()
    candles.loc[40, "close"] = -1.0
    candles.loc[45, ["high", "low"]] = candles.loc[45, ["low", "high"]].to_numpy()
    catalogue.store.upsert(Layer.RAW, key, candles)
    with pytest.raises(DataValidationError) as failed:
        validate_and_publish(catalogue, key, ValidationConfig())
    assert first_bad_candle(failed.value.report) == candles.timestamp[40]

    gappy = served["ETHUSDT"].drop(index=range(100, 140))  # a 40-bar hole: not the source's candles to correct
    catalogue.store.drop_from(Layer.RAW, key, START)
    catalogue.store.upsert(Layer.RAW, key, gappy)
    with pytest.raises(DataValidationError) as failed:
        validate_and_publish(catalogue, key, ValidationConfig())
    assert first_bad_candle(failed.value.report) is None


def test_drop_from_keeps_the_candles_before_and_the_next_ingest_fetches_the_rest(tmp_path: Path, served) -> None:
    store = CandleStore(tmp_path)

    class Served:
        name = "test"

        def fetch(self, symbol, timeframe, start, end):
            frame = served[symbol]
            yield frame[(frame.timestamp >= start) & (frame.timestamp < end)].reset_index(drop=True)

    end = BAR + H4.delta
    first = ingest_dataset(Served(), store, "BTCUSDT", H4, START, end)
    dropped = store.drop_from(Layer.RAW, first.key, BAR - 2 * H4.delta)
    assert dropped.changed and dropped.rows_before - dropped.rows_after == 3
    assert store.drop_from(Layer.RAW, first.key, BAR).changed is False  # nothing at or after it any more
    again = ingest_dataset(Served(), store, "BTCUSDT", H4, START, end)
    assert again.rows_added == 3
    pd.testing.assert_frame_equal(store.read(Layer.RAW, first.key), served_until(served["BTCUSDT"], BAR))


def test_drop_from_waits_for_the_datasets_lock(tmp_path: Path, served) -> None:
    store = CandleStore(tmp_path)
    key = DatasetKey("test", "BTCUSDT", H4)
    store.upsert(Layer.RAW, key, served["BTCUSDT"])
    done = threading.Event()
    with store.lock(Layer.RAW, key):  # another writer in the middle of its read-modify-write
        worker = threading.Thread(target=lambda: (store.drop_from(Layer.RAW, key, BAR), done.set()))
        worker.start()
        assert not done.wait(0.3)
        assert len(store.read(Layer.RAW, key)) == len(served["BTCUSDT"])
    worker.join(5)
    assert done.is_set() and store.read(Layer.RAW, key).timestamp.max() == BAR - H4.delta
