"""The trading service with its companion: the trader on one asyncio loop with the Telegram bot beside it
(when configured), stopped cleanly by SIGINT/SIGTERM. ``pricelevel trade`` and the ``trade`` deployment both
run :func:`trade_with_telegram`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Mapping
from typing import Protocol

from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.service import telegram_companion
from pricelevel.trading.events import FanOut, Notifier
from pricelevel.trading.risk import rule_changes_note
from pricelevel.trading.service import ServiceSections, check_mode, open_service, serve, state_store


class Sections(ServiceSections, Protocol):
    telegram: TelegramConfig


class EchoNotifier:
    """The service's messages on its console or log (and on a phone too, when Telegram is configured)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def notify(self, kind: str, text: str) -> None:
        self.echo(f"[{kind}] {text}")


async def trade_with_telegram(config: Sections, env: Mapping[str, str], echo: Callable[[str], None]) -> int:
    """Trade until SIGINT/SIGTERM; returns the bars traded. The mode is checked before anything starts."""
    check_mode(config.trader, config.tracking, env)
    store = state_store(config.trader, config.data.root)  # the bot reads and commands the trader through it

    def registry_lock():
        return config.catalogue.lock("registry", config.tracking.registered_model)

    async with telegram_companion(config.telegram, store, config.tracking, registry_lock, env) as phone:
        notifier: Notifier = FanOut(EchoNotifier(echo), phone)
        trader = await asyncio.to_thread(open_service, config, env, notifier, None, store)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):  # not the main thread: the worker's cancel kills us
                loop.add_signal_handler(sig, stop.set)
        echo(f"trading {trader.models.uri} (version {trader.models.current.version}) on {config.trader.mode} "
             f"({trader.execution.name}), {', '.join(trader.models.symbols)} at {trader.timeframe}; state "
             f"{trader.store.url}; rules {trader.rules.describe()}; telegram "
             f"{'on' if config.telegram.enabled else 'off'}; Ctrl-C stops")
        note = rule_changes_note(trader.spec.strategy_rules(), trader.rules)
        if note:
            notifier.notify("risk", note)
        traded = await serve(trader, stop, config.trader.poll_delay_s, config.trader.stale_after_s)
        stats = getattr(phone, "stats", None)
        echo(f"stopped after {traded} bars; state kept in {trader.store.url}" + (f"; telegram {stats()}" if stats else ""))
    return traded
