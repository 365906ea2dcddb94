"""The trading service with its companion: the trader on one asyncio loop with the Telegram bot beside it
(when configured), stopped cleanly by SIGINT/SIGTERM. ``pricelevel trade`` and the ``trade`` deployment both
run :func:`trade_with_telegram`.

The service says when it starts and stops, and why it stopped (SIGTERM, Ctrl-C, an error); a start after a run
that never stopped cleanly (kill -9, a crash, a power cut) says "restarted after an unclean stop at <time>",
from the running marker it keeps in the state database (:mod:`pricelevel.trading.lifecycle`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.service import notice_parts, telegram_companion
from pricelevel.trading.events import FanOut, Notifier
from pricelevel.trading.lifecycle import HEARTBEAT_S, RunMarker, unclean_stop_text
from pricelevel.trading.risk import rule_changes_note
from pricelevel.trading.service import ServiceSections, check_mode, open_service, serve, state_store

LOG = logging.getLogger(__name__)
#: The kind of the start, stop and restart messages (a person must know the trader is not running).
LIFECYCLE_KIND = "service"


class Sections(ServiceSections, Protocol):
    telegram: TelegramConfig


class EchoNotifier:
    """The service's messages on its console or log (and on a phone too, when Telegram is configured)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def notify(self, kind: Any, text: str | None = None) -> None:
        kind, text = notice_parts(kind, text)
        self.echo(f"[{kind}] {text}")


async def trade_with_telegram(config: Sections, env: Mapping[str, str], echo: Callable[[str], None]) -> int:
    """Trade until SIGINT/SIGTERM; returns the bars traded. The mode is checked before anything starts."""
    check_mode(config.trader, config.tracking, env)
    store = state_store(config.trader, config.data.root)  # the bot reads and commands the trader through it

    def registry_lock():
        return config.catalogue.lock("registry", config.tracking.registered_model)

    shown = {"trader": config.trader, "risk": config.risk, "backtest": config.backtest, "telegram": config.telegram}
    async with telegram_companion(config.telegram, store, config.tracking, registry_lock, env, risk=config.risk,
                                  sections=shown) as phone:
        notifier: Notifier = FanOut(EchoNotifier(echo), phone)
        marker = RunMarker(store)
        previous = await asyncio.to_thread(marker.start)
        if previous is not None:
            notifier.notify(LIFECYCLE_KIND, unclean_stop_text(previous))
        heartbeat = asyncio.create_task(_heartbeat(marker), name="trader-heartbeat")
        stop = asyncio.Event()
        why: list[str] = []

        def on_signal(reason: str) -> None:
            why.append(reason)
            stop.set()

        loop = asyncio.get_running_loop()
        for sig, reason in ((signal.SIGINT, "Ctrl-C (SIGINT)"), (signal.SIGTERM, "SIGTERM")):
            with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: the worker's cancel kills us
                loop.add_signal_handler(sig, on_signal, reason)
        traded = 0
        try:
            trader = await asyncio.to_thread(open_service, config, env, notifier, None, store)
            notifier.notify(LIFECYCLE_KIND, f"started: trading {trader.models.uri} (version "
                            f"{trader.models.current.version}) on {config.trader.mode} ({trader.execution.name}), "
                            f"{', '.join(trader.models.symbols)} at {trader.timeframe}")
            echo(f"trading {trader.models.uri} (version {trader.models.current.version}) on {config.trader.mode} "
                 f"({trader.execution.name}), {', '.join(trader.models.symbols)} at {trader.timeframe}; state "
                 f"{trader.store.url}; rules {trader.rules.describe()}; telegram "
                 f"{'on' if config.telegram.enabled else 'off'}; Ctrl-C stops")
            note = rule_changes_note(trader.spec.strategy_rules(), trader.rules)
            if note:
                notifier.notify("risk", note)
            # With the stream, the feed waits for the pushed candles itself (poll_delay_s at most, then REST).
            delay = 0.0 if config.trader.candles_from == "websocket" else config.trader.poll_delay_s
            try:
                traded = await serve(trader, stop, delay, config.trader.stale_after_s)
            finally:
                for stream in (getattr(trader, "stream", None), getattr(trader, "private_stream", None)):
                    if stream is not None:
                        stream.stop(timeout_s=0.5)
        except BaseException as exc:
            reason = stop_reason(exc, why)
            notifier.notify(LIFECYCLE_KIND, f"STOPPED by {reason} after {traded} bars")
            raise
        else:
            reason = why[0] if why else "the service's end"
            notifier.notify(LIFECYCLE_KIND, f"stopped by {reason} after {traded} bars")
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            try:
                await asyncio.to_thread(marker.stop, reason)
            except Exception as exc:  # the stop itself must not fail on the database
                LOG.warning("could not mark the clean stop in the state database: %r", exc)
        stats = getattr(phone, "stats", None)
        echo(f"stopped after {traded} bars; state kept in {store.url}" + (f"; telegram {stats()}" if stats else ""))
    return traded


def stop_reason(exc: BaseException, signals: list[str]) -> str:
    """Why the service stopped with ``exc``: the signal that asked for it, or the error, in one line."""
    if signals:
        return signals[0]
    if isinstance(exc, KeyboardInterrupt):
        return "Ctrl-C (SIGINT)"
    if isinstance(exc, asyncio.CancelledError):
        return "cancellation"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}{': ' + first if first else ''}"


async def _heartbeat(marker: RunMarker, every_s: float = HEARTBEAT_S) -> None:
    """Refresh the running marker while the service runs (a database error is logged, never raised)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(marker.beat)
        except Exception as exc:
            LOG.warning("heartbeat: could not write the running marker: %r", exc)
