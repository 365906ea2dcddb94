"""Putting a trader together from the configuration, for a replay over historical candles or for the service
that trades each bar as it closes; and the replay's result in the backtest's own format."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import market_from_candles
from pricelevel.backtest.run import TRADE_COLUMNS, BacktestResult
from pricelevel.backtest.trading import with_rules
from pricelevel.core.secrets import Secrets
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import BybitConfig, DataConfig, ValidationConfig
from pricelevel.data.folder import CandleFolder
from pricelevel.data.sources.factory import open_source
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import load_model, mlflow_client
from pricelevel.registry.versions import alias_version
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading import documents
from pricelevel.trading.bybit import BybitBroker
from pricelevel.trading.config import RiskConfig, TraderConfig
from pricelevel.trading.control import pending_commands
from pricelevel.trading.events import Notifier
from pricelevel.trading.exchange import CredentialsRefused, ExchangeClient, ExchangeUnavailable
from pricelevel.trading.feeds import ReplayFeed, StoreFeed, StreamFeed
from pricelevel.trading.live import ExchangeBroker, StopRequested
from pricelevel.trading.models import ModelProvider
from pricelevel.trading.paper import PaperBroker
from pricelevel.trading.state import EQUITY, TRADES, StateStore, default_state_url
from pricelevel.trading.streams import (
    ExecutionLedger,
    KlineStream,
    PrivateStream,
    PushedFills,
    instrument_coins,
    private_stream_url,
    stream_url,
)
from pricelevel.trading.trader import Trader

LIVE_VARIABLE = "PRICELEVEL_TRADER__LIVE"
#: Seconds between attempts while a closed candle has not arrived yet, and between looks for queued commands.
RETRY_S = 5.0


class TradingRefused(RuntimeError):
    """The trader will not start as configured; ``str()`` is one line saying why."""


def model_uri(trader: TraderConfig, tracking: TrackingConfig) -> str:
    return trader.model or f"models:/{tracking.registered_model}@champion"


def check_mode(trader: TraderConfig, tracking: TrackingConfig, env: Mapping[str, str]) -> None:
    """Real money needs two explicit acts; exchange modes trade the champion only."""
    if trader.mode == "mainnet" and env.get(LIVE_VARIABLE) != "yes":
        raise TradingRefused(
            f"mainnet trades real money: it needs trader.mode: mainnet AND {LIVE_VARIABLE}=yes in the environment; "
            "refusing to start"
        )
    champion = f"models:/{tracking.registered_model}@champion"
    if trader.mode != "paper" and model_uri(trader, tracking) != champion:
        raise TradingRefused(f"{trader.mode} trades {champion} only (got {trader.model}); a named model may paper-trade")


def registry_models(tracking: TrackingConfig, uri: str, symbols: tuple[str, ...] | None = None,
                    last_version: str | None = None) -> ModelProvider:
    """A :class:`ModelProvider` on the MLflow registry (alias resolution and loading through one client).
    ``last_version``: the version the trader last traded (kept for its open positions when the alias is gone)."""
    client = mlflow_client(tracking)

    def resolve(alias_uri: str) -> str:
        name, alias = alias_uri.removeprefix("models:/").split("@")
        version = alias_version(client, name, alias)
        if version is None:
            raise LookupError(f"no version of {name} holds @{alias}")
        return str(version)

    return ModelProvider(uri, resolve, lambda u: load_model(u, client), symbols, last_version=last_version)


def paper_execution(symbols: tuple[str, ...], costs: BacktestConfig) -> Callable[[StrategyRules, dict | None], PaperBroker]:
    def make(rules: StrategyRules, saved: dict[str, Any] | None) -> PaperBroker:
        return PaperBroker.from_state(saved, costs, rules) if saved else PaperBroker(symbols, costs, rules)

    return make


@dataclass(frozen=True)
class Replay:
    trader: Trader
    feed: ReplayFeed
    bars: pd.DatetimeIndex


def open_replay(
    folder: CandleFolder, models: ModelProvider, store: StateStore, costs: BacktestConfig, risk: RiskConfig,
    start: pd.Timestamp | None = None, end: pd.Timestamp | None = None, notifier: Notifier | None = None,
) -> Replay:
    """A paper trader over ``folder``'s history, bar by bar from ``start`` (the backtest's clock)."""
    spec = models.current.spec
    timeframes = spec.table_spec().input_timeframes
    feed = ReplayFeed(folder, models.symbols, timeframes)
    trader = Trader(store, models, feed, paper_execution(models.symbols, costs), risk, costs, notifier)
    return Replay(trader, feed, feed.bar_times(spec.table_spec().timeframe, start, end))


def replay_result(replay: Replay, costs: BacktestConfig) -> BacktestResult:
    """The replay as a :class:`BacktestResult` (its trades, equity and refusals on the replayed bars), so it is
    written and compared exactly like ``pricelevel backtest --json``."""
    trader = replay.trader
    spec = trader.spec
    start = replay.bars[0]
    candles = pd.concat([f[spec.table_spec().timeframe].assign(symbol=s) for s, f in replay.feed.frames.items()], ignore_index=True)
    candles = candles[(candles["timestamp"] >= start) & (candles["timestamp"] <= replay.bars[-1])]
    market = market_from_candles(candles, timeframe=costs.timeframe)
    trades = trader.store.frame(TRADES)
    rows = [trades] if len(trades) else []
    execution = trader.execution
    last = market.timestamps[-1]
    for symbol, held in execution.positions().items():
        entry_fees = float(execution.state.entry_fees[execution.symbols.index(symbol)])
        pnl = held["size"] * held["last_close"] - held["size"] * held["entry_price"] - entry_fees - 0.0
        rows.append(pd.DataFrame([{"symbol": symbol, "entry_time": pd.Timestamp(held["entry_time"]), "exit_time": last,
                                   "entry_price": held["entry_price"], "exit_price": held["last_close"], "size": held["size"],
                                   "pnl": pnl, "entry_fees": entry_fees, "exit_fees": 0.0, "exit_reason": "open"}]))
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=TRADE_COLUMNS)
    frame["entry_time"] = pd.to_datetime(frame["entry_time"], utc=True)
    frame["exit_time"] = pd.to_datetime(frame["exit_time"], utc=True)
    frame["entry_bar"] = market.timestamps.get_indexer(pd.DatetimeIndex(frame["entry_time"]))
    frame["exit_bar"] = market.timestamps.get_indexer(pd.DatetimeIndex(frame["exit_time"]))
    frame["return"] = frame["pnl"] / (frame["size"] * frame["entry_price"])
    equity = trader.store.frame(EQUITY).set_index("bar_time")["equity"]
    equity.index = pd.to_datetime(equity.index, utc=True)
    labels = ("no_cash", "dust", "max_positions")
    rejected = {label: int(n) for label, n in zip(labels, np.asarray(execution.state.rejected), strict=True)}
    return BacktestResult(market, with_rules(costs, trader.rules), equity.reindex(market.timestamps).rename("equity"),
                          frame[list(TRADE_COLUMNS)].reset_index(drop=True), rejected)


#: Seconds a stop waits for the step in progress to reach a safe point (``docker stop`` and systemd give 10).
STOP_GRACE_S = 1.5
#: Between bars, while the exchange is away: the first retry after this many seconds, doubling up to the cap.
RECOVER_FIRST_S, RECOVER_MAX_S = 5.0, 60.0
#: Between bars, how often the resting exits are looked at (what the private stream pushed, or one REST look at
#: the open orders when it is down): a take-profit's sibling is cancelled, a refused stop sold, within this.
WATCH_S = 5.0


async def serve(
    trader: Trader, stop: asyncio.Event, delay_s: float, stale_after_s: float,
    now: Callable[[], pd.Timestamp] | None = None, poll_s: float = RETRY_S, grace_s: float = STOP_GRACE_S,
) -> int:
    """Trade every bar as it closes until ``stop`` is set; returns the bars traded.

    ``delay_s`` after a close the newest closed bar is stepped; while a traded symbol's candle is still missing
    the step is retried every few seconds, and ``stale_after_s`` after the close it goes ahead without it (no
    decision on that symbol). Commands (``pricelevel trader kill``, Telegram) are looked for every ``poll_s``
    seconds (``RETRY_S``) and applied between bars. While the exchange is away or an exit is still under way,
    :meth:`Trader.recover` is retried with a capped backoff; otherwise, while exits rest on the exchange, they are
    looked at every ``WATCH_S`` seconds (:meth:`Trader.watch_exits`). An exchange error never ends the service; a refused
    API key does (:class:`~pricelevel.trading.exchange.CredentialsRefused`).

    Each step runs in a daemon thread, so the loop (and a Telegram bot on it) stays responsive, and a stop does
    not wait for the bar in progress: the step is told to end at its next safe point and given ``grace_s``; an
    order it committed is then either sent or left for the restart's reconciliation (the same guarantee a
    kill -9 has), so the service ends within seconds even mid-bar. A bar already committed is never stepped again.
    """
    clock = now or (lambda: pd.Timestamp.now(tz="UTC"))
    bar = trader.timeframe.delta
    traded = 0
    backoff, retry_at, watch_at = RECOVER_FIRST_S, 0.0, 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            if pending_commands(trader.store):  # a kill switch must not wait for the next close
                await _step(trader, stop, grace_s, trader.act_between_bars)
            current = clock()
            closed_at = current.floor(bar)  # the close of the newest closed bar
            newest = closed_at - bar
            due = current >= closed_at + pd.Timedelta(seconds=delay_s)
            if due and (trader.last_bar is None or pd.Timestamp(trader.last_bar) < newest):
                final = current >= closed_at + pd.Timedelta(seconds=stale_after_s)
                report = await _step(trader, stop, grace_s, trader.on_bar_close, newest, not final)
                if report is None:
                    break
                if not report.waiting:
                    traded += not report.skipped
                    continue
                wake = min(current + pd.Timedelta(seconds=poll_s), closed_at + pd.Timedelta(seconds=stale_after_s))
            else:
                wake = closed_at + bar + pd.Timedelta(seconds=delay_s)
                if trader.needs_recovery() and loop.time() >= retry_at:
                    await _step(trader, stop, grace_s, trader.recover)
                    if trader.needs_recovery():
                        retry_at, backoff = loop.time() + backoff, min(backoff * 2, RECOVER_MAX_S)
                    else:
                        backoff = RECOVER_FIRST_S
                elif trader.watching_exits() and loop.time() >= watch_at:
                    await _step(trader, stop, grace_s, trader.watch_exits)
                    watch_at = loop.time() + WATCH_S
        except CredentialsRefused:
            raise
        except (ExchangeUnavailable, OSError) as exc:  # an unguarded exchange or network failure: wait, then again
            trader.needs_reconcile = True
            trader.notifier.notify("risk", f"step failed, retried in {backoff:.0f} s: {str(exc).splitlines()[0][:300]}")
            retry_at, backoff = loop.time() + backoff, min(backoff * 2, RECOVER_MAX_S)
            wake = clock() + pd.Timedelta(seconds=poll_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(poll_s, max((wake - clock()).total_seconds(), 0.05)))
    trader.stopping.set()
    return traded


async def _step(trader: Trader, stop: asyncio.Event, grace_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread; ``None`` when a stop ended it (at a safe point, or after ``grace_s``)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the loop, raised there
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: the service has stopped already
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="trader-step", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not done.done():
        trader.stopping.set()  # end at the next safe point: before the next order is committed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), timeout=grace_s)
        if not done.done():
            return None
    try:
        return done.result()
    except StopRequested:
        return None


def state_store(trader: TraderConfig, data_root: Path) -> StateStore:
    """The trader's database: ``trader.state_url``, else one SQLite file per mode (paper and testnet never mix)."""
    return StateStore(trader.state_url or default_state_url(data_root, trader.mode))


def exchange_execution(exchange: ExchangeClient, store: StateStore, symbols: tuple[str, ...], **options: Any
                       ) -> Callable[[StrategyRules, dict | None], ExchangeBroker]:
    def make(rules: StrategyRules, saved: dict[str, Any] | None) -> ExchangeBroker:
        return ExchangeBroker.from_state(saved, exchange, store, symbols, rules, **options)

    return make


class ServiceSections(Protocol):
    """The configuration sections the service reads (``pricelevel.config.Config`` has them all)."""

    trader: TraderConfig
    risk: RiskConfig
    backtest: BacktestConfig
    tracking: TrackingConfig
    data: DataConfig
    bybit: BybitConfig
    validation: ValidationConfig

    @property
    def catalogue(self) -> DataCatalogue: ...


def open_service(
    config: ServiceSections, env: Mapping[str, str], notifier: Notifier | None = None, exchange: ExchangeClient | None = None,
    store: StateStore | None = None,
) -> Trader:
    """The trading service as configured: mode checked first (real money needs two acts), the model from the
    registry, live candles through the ingest path into the store, and the paper engine or the exchange."""
    trader_config = config.trader
    check_mode(trader_config, config.tracking, env)
    secrets = Secrets.from_env(env)
    store = store or state_store(trader_config, config.data.root)
    uri = model_uri(trader_config, config.tracking)
    with store.transaction() as tx:
        in_use = store.read(tx, documents.MODEL)
    last = in_use.version if in_use is not None and in_use.uri == uri else None  # a retired champion: exits go on
    models = registry_models(config.tracking, uri, trader_config.symbols, last_version=last)
    table_spec = models.current.spec.table_spec()
    stopping = threading.Event()
    fills = private = None
    source = open_source(config.data, config.bybit, secrets, sleep=interruptible_sleep(stopping))
    feed: StoreFeed | StreamFeed = StoreFeed(source, config.catalogue, config.validation, models.symbols,
                                             table_spec.input_timeframes, start=config.data.start)
    stream = None
    if trader_config.candles_from == "websocket":  # closed candles pushed by the exchange; REST fills the gaps
        feed = StreamFeed(feed, wait_s=trader_config.poll_delay_s, stopping=stopping)
        stream = KlineStream(stream_url(trader_config.mode, trader_config.stream_endpoint), models.symbols,
                             table_spec.input_timeframes, feed.deliver)
    if trader_config.mode == "paper":
        make = paper_execution(models.symbols, config.backtest)
    else:
        exchange = exchange or BybitBroker(config.bybit, trader_config.mode, secrets, endpoint=trader_config.endpoint,
                                           sleep=interruptible_sleep(stopping))
        bar = Timeframe(models.current.spec.timeframe).delta
        if trader_config.candles_from == "websocket":  # fills pushed by the private stream, each applied once
            coins = instrument_coins(exchange)
            fills = PushedFills(ExecutionLedger(store, coins))
            private = PrivateStream(private_stream_url(trader_config.mode, trader_config.stream_endpoint), secrets,
                                    fills.deliver, coins)
        make = exchange_execution(exchange, store, models.symbols, bar=bar, stopping=stopping, fills=fills,
                                  resting_exits=trader_config.resting_exits)
    with store.transaction() as tx:
        store.put(tx, "mode", trader_config.mode)
    trader = Trader(store, models, feed, make, config.risk, config.backtest, notifier, stopping=stopping)
    trader.stream = stream.start() if stream is not None else None
    trader.private_stream = private.start() if private is not None else None
    return trader


def interruptible_sleep(stopping: threading.Event) -> Callable[[float], None]:
    """A retry's backoff that a stop cuts short: the call ends with :class:`StopRequested` instead of retrying."""

    def sleep(seconds: float) -> None:
        if stopping.wait(seconds):
            raise StopRequested("stopping: no retry")

    return sleep
