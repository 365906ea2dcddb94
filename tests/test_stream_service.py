"""The trading service end to end on both streams: ``open_service`` and ``serve`` (the loop ``pricelevel trade``
runs) in testnet mode against a local Bybit: the public kline stream and the private order/execution stream
(``tests.fakes.bybit_ws.FakeBybitStreams``, pybit's WebSocket on both), and the REST exchange with its candles
(``tests.fakes.bybit_trading``, real HTTP, signed requests through pybit), fills pushed on the private stream as
the exchange makes them (``FillRelay``).

One virtual clock is the exchange's time and the service's: ``serve`` steps a bar when it says the bar has
closed, the REST fake serves the candles opened by it, the stream and the feed stamp what they hear with it. The
test moves it one hour at a time and pushes, at each hour, the candles closing then; a 4h bar takes a fraction of
a second instead of four hours. (The stream's own silence rule, a real-time one covered in test_streams.py, is
off: the clock jumps an hour between pushes.)

- a closed candle pushed -> the bar decided on pushed candles alone (no REST) -> the entry order at the exchange,
  its fill pushed back and applied once;
- the public stream dropped mid-bar, candles closing while it is down (the REST fake has them), reconnected:
  the missed candles are fetched over REST before deciding, and the decisions and orders equal those of the
  run whose stream never dropped;
- one candle skipped by the stream (present over REST): the gap is filled over REST before deciding, same
  decisions and orders.
"""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from werkzeug.serving import make_server

from pricelevel.backtest.config import BacktestConfig
from pricelevel.config import load_project_config
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.trading import service
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.exchange import client_id
from pricelevel.trading.feeds import FeedProblem, StreamFeed
from pricelevel.trading.service import open_replay, open_service, registry_models, serve
from pricelevel.trading.state import DECISIONS, EXECUTIONS, ORDERS, StateStore
from pricelevel.trading.streams import KlineStream, topic
from tests.fakes.bybit_server import FakeBybit
from tests.fakes.bybit_trading import FakeBybitExchange
from tests.fakes.bybit_ws import FakeBybitStreams, FillRelay
from tests.fakes.trading_model import SYMBOLS, TinyModel, register_tiny_model

pytestmark = pytest.mark.slow  # ~10 s a run of the service; the first also registers the model and seeds its store

ROOT = Path(__file__).resolve().parents[1]
H1, H4 = Timeframe.H1, Timeframe.H4
BARS_STREAMED = 4  # after the first bar (every dataset seeded over REST), bars decided on the stream
WAIT_S = 20.0  # real seconds any one step may take before the test gives up


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return register_tiny_model(tmp_path_factory.mktemp("stream-service"))


@pytest.fixture(scope="module")
def first_bar(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> pd.Timestamp:
    """The bar before the first one the model enters on (a paper replay of the folder's last bars says which),
    so the service seeds at it and the entry comes on the first bar decided on the stream."""
    folder = CandleFolder.open(tiny.folder)
    models = registry_models(tiny.tracking, tiny.champion)
    store = StateStore(f"sqlite:///{tmp_path_factory.mktemp('replay')}/replay.db")
    replay = open_replay(folder, models, store, BacktestConfig(), RiskConfig())
    bars = replay.bars[-40:-BARS_STREAMED]
    replay.trader.replay(bars)
    decisions = store.frame(DECISIONS)
    store.close()
    entries = decisions[(decisions["signal"] == "entry") & (decisions["verdict"] == "approved")]
    entered = sorted(set(pd.to_datetime(entries["bar_time"], utc=True)) - {bars[0]})
    assert entered, "the tiny model enters nowhere in the replayed bars"
    return entered[0] - H4.delta


class Clock:
    """The exchange's time and the service's, moved by the test."""

    def __init__(self, now: pd.Timestamp) -> None:
        self.now = now

    def __call__(self) -> pd.Timestamp:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()


class Messages:
    def __init__(self) -> None:
        self.said: list[tuple[str, str]] = []

    def notify(self, kind, text: str | None = None) -> None:
        if text is None:  # a (kind, text) notice
            kind, text = kind
        self.said.append((str(kind), str(text)))


@dataclass
class Run:
    """What one run of the service did, per bar stepped on the stream."""

    version: str
    decisions: pd.DataFrame
    orders: list[tuple]  # what the exchange took: (orderLinkId, symbol, side, qty, marketUnit)
    order_rows: pd.DataFrame
    executions: pd.DataFrame
    pushed: list[tuple[str, str, str]]
    fetched: dict[pd.Timestamp, tuple] = field(default_factory=dict)
    problems: dict[pd.Timestamp, tuple[FeedProblem, ...]] = field(default_factory=dict)
    rest_kline_requests: dict[pd.Timestamp, int] = field(default_factory=dict)
    said: list[tuple[str, str]] = field(default_factory=list)
    #: The candles the feed held at the end, and the exchange's candles closed by then.
    frames: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)
    #: Its data root (the store its REST fetches wrote).
    data_root: Path | None = None


class ServiceLoop:
    """``serve`` on its own thread and asyncio loop, as ``pricelevel trade`` runs it (no poll delay: with the
    stream, the feed waits for the pushed candles itself)."""

    def __init__(self, trader, clock: Clock, stale_after_s: float) -> None:
        self.trader, self.clock, self.stale_after_s = trader, clock, stale_after_s
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="service-loop", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await serve(self.trader, self.stop_event, 0.0, self.stale_after_s, now=self.clock, poll_s=0.02)

        try:
            asyncio.run(main())
        except BaseException as exc:  # raised in the test's thread by wait_bar
            self.error = exc
            self._ready.set()

    def start(self) -> ServiceLoop:
        self._thread.start()
        self._ready.wait(10)
        return self

    def wait_bar(self, bar: pd.Timestamp) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.trader.last_bar is None or pd.Timestamp(self.trader.last_bar) < bar:
            assert self.error is None, f"the service loop failed: {self.error!r}"
            assert time.monotonic() < deadline, f"bar {bar} not stepped in {WAIT_S:g} s"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.error is None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self._thread.join(10)


def _wait(predicate, what: str, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def trade(tiny: TinyModel, tmp_path: Path, first_bar: pd.Timestamp, *, skip: frozenset = frozenset(),
          down: tuple[pd.Timestamp, pd.Timestamp] | None = None, seeded: Path | None = None) -> Run:
    """Run the service from the close of ``first_bar`` over ``BARS_STREAMED`` more bars, hour by hour.

    ``skip``: ``(symbol, timeframe, close)`` candles the stream never pushes; ``down``: the public stream is
    dropped (and new connections refused) just after the pushes of the first hour and let in again at the
    second, before that hour's pushes. ``seeded``: a data root whose store already holds the candles up to
    the first bar (another run's: its first step then finds them fetched and validated, and spends no
    validation on them); the run's own is ``tmp_path / "data"``."""
    if seeded is not None:
        shutil.copytree(seeded, tmp_path / "data")
    folder = CandleFolder.open(tiny.folder)
    timeframes = tiny.spec.table_spec().input_timeframes
    candles = {(s, tf): folder.read(s, tf).set_index("timestamp") for s in SYMBOLS for tf in timeframes}
    clock = Clock(first_bar + H4.delta)
    market = FakeBybit.from_folder(tiny.folder, categories=("spot",), now=clock)
    exchange = FakeBybitExchange(balances={"USDT": 10_000.0}, market=market, now=clock)
    for symbol in SYMBOLS[1:]:
        exchange.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001",
                                min_order_qty="0.0001")
    http = make_server("127.0.0.1", 0, exchange.wsgi_app, threaded=True)
    threading.Thread(target=http.serve_forever, name="fake-exchange", daemon=True).start()
    url = f"http://127.0.0.1:{http.server_port}"
    messages = Messages()
    with FakeBybitStreams(exchange.api_key, exchange.api_secret) as streams, \
            FillRelay(exchange, streams.private) as relay, pytest.MonkeyPatch.context() as patch:
        sets = {"trader.mode": "testnet", "trader.endpoint": url, "bybit.endpoint": url,
                "trader.stream_endpoint": streams.endpoint, "data.source": "bybit", "data.root": str(tmp_path / "data"),
                "data.start": str(candles[(SYMBOLS[0], H4)].index[0].date()),
                "trader.state_url": f"sqlite:///{tmp_path}/state.db", "trader.poll_delay_s": 3,
                "tracking.tracking_uri": tiny.tracking.tracking_uri,
                "tracking.artifact_location": tiny.tracking.artifact_location,
                "bybit.timeout_s": 5, "bybit.max_attempts": 2, "bybit.backoff_s": 0.1, "bybit.backoff_max_s": 0.2}
        config = load_project_config(None, [f"{k}={v}" for k, v in sets.items()], env={"PRICELEVEL_HOME": str(ROOT)})
        # The service's clock is the virtual one (open_service takes none: its stream and feed are told here).
        patch.setattr(service, "StreamFeed", functools.partial(StreamFeed, now=clock.seconds))
        patch.setattr(service, "KlineStream", functools.partial(KlineStream, now=clock.seconds, silent_after_s=math.inf))
        env = {"BYBIT_API_KEY": exchange.api_key, "BYBIT_API_SECRET": exchange.api_secret}
        trader = open_service(config, env, messages)
        loop = ServiceLoop(trader, clock, config.trader.stale_after_s).start()
        run = None
        try:
            loop.wait_bar(first_bar)  # the seed: every dataset over REST
            assert trader.private_stream.connected.wait(WAIT_S) and streams.private.wait_authenticated()
            topics = {topic(s, tf) for s in SYMBOLS for tf in timeframes}
            assert trader.stream.connected.wait(WAIT_S) and streams.public.wait_subscribed(topics)
            run = Run(str(trader.models.current.version), pd.DataFrame(), [], pd.DataFrame(), pd.DataFrame(), [])
            finest = min(timeframes, key=lambda tf: tf.delta)
            for hour in pd.date_range(first_bar + H4.delta + finest.delta,
                                      first_bar + (1 + BARS_STREAMED) * H4.delta, freq=finest.delta):
                asked = len(market.requests)
                clock.now = hour
                if down is not None and hour == down[1]:
                    streams.public.refuse = False
                    assert streams.public.wait_subscribed(topics, WAIT_S), "the stream did not come back"
                    _wait(trader.stream.connected.is_set, "the stream to say it is up")
                for symbol, tf in ((s, tf) for s in SYMBOLS for tf in timeframes):
                    if hour.value % tf.nanoseconds or (symbol, tf, hour) in skip:
                        continue
                    row = candles[(symbol, tf)].loc[hour - tf.delta]
                    sent = streams.public.push(symbol, tf, {"timestamp": hour - tf.delta, **row.to_dict()})
                    assert sent == (0 if down is not None and down[0] < hour < down[1] else 1)
                if down is not None and hour == down[0]:
                    streams.public.refuse = True
                    streams.public.disconnect()
                    _wait(lambda: not trader.stream.connected.is_set(), "the stream to see its socket closed")
                if hour.value % H4.nanoseconds == 0:
                    bar = hour - H4.delta
                    loop.wait_bar(bar)
                    run.fetched[bar] = trader.feed.fetched
                    run.problems[bar] = trader.feed.problems
                    run.rest_kline_requests[bar] = len(market.requests) - asked
            last_close = first_bar + (1 + BARS_STREAMED) * H4.delta
            run.frames = {s: trader.feed.closed_by(last_close)[s] for s in SYMBOLS}  # what it holds, no REST
            run.expected = {s: {tf: candles[(s, tf)].loc[:last_close - tf.delta].reset_index() for tf in timeframes}
                            for s in SYMBOLS}
        finally:
            loop.stop()
            trader.stream.stop(0.5)
            trader.private_stream.stop(0.5)
            http.shutdown()
    store = trader.store
    run.decisions = store.frame(DECISIONS)[["bar_time", "symbol", "probability", "signal", "verdict"]]
    run.order_rows = store.frame(ORDERS)
    run.executions = store.frame(EXECUTIONS)
    run.orders = [(o["orderLinkId"], o["symbol"], o["side"], o["qty"], o.get("marketUnit")) for o in exchange.created]
    run.pushed = list(relay.pushed)
    run.said = messages.said
    run.data_root = tmp_path / "data"
    store.close()
    return run


@pytest.fixture(scope="module")
def uninterrupted(tiny: TinyModel, first_bar: pd.Timestamp, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return trade(tiny, tmp_path_factory.mktemp("uninterrupted"), first_bar)


def streamed_bars(first_bar: pd.Timestamp) -> list[pd.Timestamp]:
    return [first_bar + k * H4.delta for k in range(1, BARS_STREAMED + 1)]


def assert_held_every_candle(run: Run) -> None:
    """The feed holds exactly the exchange's closed candles: none missing, none twice, none still open."""
    for symbol, by_tf in run.expected.items():
        for tf, expected in by_tf.items():
            pd.testing.assert_frame_equal(run.frames[symbol][tf].reset_index(drop=True), expected,
                                          obj=f"{symbol} {tf}")


def assert_same_trading(run: Run, reference: Run) -> None:
    assert_held_every_candle(run)
    pd.testing.assert_frame_equal(run.decisions, reference.decisions)
    assert run.orders == reference.orders


def test_a_pushed_closed_candle_is_decided_on_at_once_and_its_order_reaches_the_exchange(
    uninterrupted: Run, first_bar: pd.Timestamp
) -> None:
    run = uninterrupted
    assert_held_every_candle(run)
    entry_bar = first_bar + H4.delta
    for bar in streamed_bars(first_bar):  # every bar after the seed: pushed candles only, not one REST call
        assert run.fetched[bar] == () and run.problems[bar] == () and run.rest_kline_requests[bar] == 0, bar
    decisions = run.decisions[pd.to_datetime(run.decisions["bar_time"], utc=True) == entry_bar]
    entered = decisions[(decisions["signal"] == "entry") & (decisions["verdict"] == "approved")]["symbol"].tolist()
    assert entered, "the model enters on the first streamed bar (chosen so by a replay)"
    taken = {link_id: (symbol, side) for link_id, symbol, side, *_ in run.orders}
    for symbol in entered:
        cid = client_id(run.version, symbol, entry_bar, "entry")
        assert taken.get(cid) == (symbol, "Buy"), f"no entry order for {symbol} at {entry_bar}"
        # its fill came back on the private stream and is in the books once, by its exec id
        assert ("order", cid, "Filled") in run.pushed
        fills = run.executions[run.executions["client_id"] == cid]
        assert len(fills) >= 1 and fills["exec_id"].is_unique and fills["applied"].astype(bool).all()
        row = run.order_rows.set_index("client_id").loc[cid]
        assert row["status"] == "FILLED" and row["filled_qty"] == pytest.approx(fills["qty"].astype(float).sum())
    assert not [text for kind, text in run.said if kind == "stale"], run.said


def test_a_public_stream_dropped_mid_bar_is_backfilled_over_rest_and_trades_as_if_it_never_dropped(
    uninterrupted: Run, tiny: TinyModel, first_bar: pd.Timestamp, tmp_path: Path
) -> None:
    bar = first_bar + 2 * H4.delta  # a bar after the first entry
    run = trade(tiny, tmp_path, first_bar, down=(bar + H1.delta, bar + 3 * H1.delta),
                seeded=uninterrupted.data_root)

    missed = {(s, H1) for s in SYMBOLS}  # the 1h candles closing at +2h went to nobody; 4h and 1d were not due
    assert set(run.fetched[bar]) == missed and run.rest_kline_requests[bar] >= len(missed)
    assert all(p.kind == "stream" and "stream down" in p.reason for p in run.problems[bar]), run.problems[bar]
    for other in set(streamed_bars(first_bar)) - {bar}:
        assert run.fetched[other] == (), other
    assert_same_trading(run, uninterrupted)


def test_a_candle_the_stream_skipped_is_fetched_over_rest_before_the_bar_is_decided(
    uninterrupted: Run, tiny: TinyModel, first_bar: pd.Timestamp, tmp_path: Path
) -> None:
    bar = first_bar + 3 * H4.delta
    run = trade(tiny, tmp_path, first_bar, skip=frozenset({("ETHUSDT", H1, bar + 2 * H1.delta)}),
                seeded=uninterrupted.data_root)

    assert run.fetched[bar] == (("ETHUSDT", H1),) and run.rest_kline_requests[bar] >= 1
    [problem] = run.problems[bar]
    assert (problem.symbol, problem.timeframe, problem.kind) == ("ETHUSDT", H1, "stream") and "gap" in problem.reason
    assert_same_trading(run, uninterrupted)
