"""The entry points: :func:`telegram_companion`, the bot beside the trader in its asyncio loop, and
:func:`send_lifecycle`, one message from a flow (a promotion decision, a failed run).

The companion never stands in the trader's way: entering it does not wait for Telegram (the bot connects in
the background and retries while Telegram is unreachable, with pending updates dropped when it connects, so a
``/kill`` queued during an outage never fires late); the notifier it yields only hands a message to the loop and
returns. Its messages wait in the state database's outbox (:class:`~pricelevel.telegram.outbox.StoredQueue`)
until Telegram takes them, through outages and restarts; leaving it sends what waits for at most
``flush_timeout_s`` and keeps the rest for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from pydantic import BaseModel
from telegram import Bot, BotCommand
from telegram.constants import ParseMode
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application

from pricelevel.core.secrets import Secrets
from pricelevel.registry.config import TrackingConfig
from pricelevel.registry.tracking import mlflow_client
from pricelevel.telegram.bot import ControlBot, Extras, build_application
from pricelevel.telegram.commands import COMMANDS, Registry, summary_text
from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.logtail import log_tail
from pricelevel.telegram.outbox import Counters, Outbox, Outgoing, StoredQueue
from pricelevel.telegram.redaction import Mask, masked_logs, masker
from pricelevel.telegram.render import notice_html
from pricelevel.telegram.transport import QuietRequest, Reachability, describe
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.events import NoNotifier, Notifier
from pricelevel.trading.state import StateStore

LOG = logging.getLogger(__name__)


def message_text(kind: str, text: str) -> str:
    """A notification as sent (HTML; :func:`pricelevel.telegram.render.notice_html`)."""
    return notice_html(kind, text)


def notice_parts(notice: Any, text: str | None = None) -> tuple[str, str]:
    """``(kind, text)`` of ``notify(kind, text)`` or of ``notify(notice)`` (an object with ``.kind`` and ``.text``)."""
    if text is None and hasattr(notice, "kind"):
        return str(notice.kind), str(notice.text)
    return str(notice), str(text)


class TelegramNotifier:
    """:class:`~pricelevel.trading.events.Notifier` for the authorised chats, callable from any thread: the
    message is handed to the loop with ``call_soon_threadsafe`` and queued there; it never blocks or raises."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox, config: TelegramConfig, counters: Counters) -> None:
        self._loop, self._outbox, self._config, self.counters = loop, outbox, config, counters
        self._kinds = frozenset(config.notify)
        self._closed = False

    def notify(self, kind: Any, text: str | None = None) -> None:
        try:
            kind, text = notice_parts(kind, text)
            if kind not in self._kinds:  # not asked for, or not a kind at all: a typo must not page everyone
                self.counters.add("filtered")
                return
            if self._closed:
                self.counters.add("unsent", len(self._config.chat_ids))
                return
            for chat_id in self._config.chat_ids:
                self._loop.call_soon_threadsafe(self._outbox.put, chat_id, message_text(kind, text), None, kind)
        except Exception:  # a closed loop, anything: count it, never raise into the trader
            self.counters.add("dropped", max(len(self._config.chat_ids), 1))

    def close(self) -> None:
        self._closed = True

    def stats(self) -> dict[str, int]:
        """The message counters (docs/how-to/telegram.md "Telegram": what happens when Telegram is down)."""
        return self.counters.snapshot()


@asynccontextmanager
async def telegram_companion(
    config: TelegramConfig, store: StateStore, tracking: TrackingConfig,
    registry_lock: Callable[[], AbstractContextManager[Any]], env: Mapping[str, str], *,
    mlflow: Callable[[TrackingConfig], MlflowClient] = mlflow_client, risk: RiskConfig | None = None,
    sections: Mapping[str, BaseModel] | None = None,
) -> AsyncIterator[Notifier]:
    """The bot for the trader's loop; yields its notifier (``NoNotifier`` when ``telegram.enabled`` is false).

    ``registry_lock`` is the lock ``pricelevel promote --rollback`` takes (``config.catalogue.lock("registry",
    name)``); ``mlflow`` makes the registry's client (tests hand in a fake); ``risk`` the limits ``/count`` and
    ``/locks`` report; ``sections`` the configuration ``/show_config`` shows (masked). Raises
    :class:`~pricelevel.core.secrets.MissingSecretError` when enabled without ``TELEGRAM_BOT_TOKEN``; Telegram
    being unreachable is never an error here.
    """
    if not config.enabled:
        yield NoNotifier()
        return
    secrets = Secrets.from_env(env)
    token = secrets.require("telegram_bot_token")
    mask = masker(secrets)
    counters = Counters()
    reachability = Reachability()
    with masked_logs(mask), log_tail(mask) as logs:
        app = build_application(config, token, reachability)
        outbox = Outbox(lambda item: _send(app.bot, item, config), config, counters, mask, queue=StoredQueue(store),
                        reachability=reachability)
        extras = Extras(risk=risk, sections=dict(sections or {"telegram": config}), logs=logs, mask=mask)
        ControlBot(config, store, Registry(tracking, registry_lock, mlflow), outbox, counters, extras=extras).install(app)
        loop = asyncio.get_running_loop()
        notifier = TelegramNotifier(loop, outbox, config, counters)
        worker = asyncio.create_task(outbox.run(), name="telegram-outbox")
        helpers = [asyncio.create_task(_connect(app, outbox, config), name="telegram-connect")]
        if config.summary_hour is not None:
            helpers.append(asyncio.create_task(_daily_summaries(config.summary_hour, store, notifier), name="telegram-summary"))
        try:
            yield notifier
        finally:
            notifier.close()
            started = loop.time()
            await outbox.until_connected(config.flush_timeout_s)  # stopped right after a start: its messages still go
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await _stop(app, outbox, worker, config, max(config.flush_timeout_s - (loop.time() - started), 0.0))
            LOG.info("telegram: stopped; messages %s", counters.snapshot())


async def _send(bot: Bot, item: Outgoing, config: TelegramConfig) -> None:
    """One message, as HTML; a kind listed in ``telegram.silent`` arrives without a sound."""
    await bot.send_message(item.chat_id, item.text, parse_mode=ParseMode.HTML, reply_markup=item.markup,
                           disable_notification=item.kind in config.silent)


async def set_menu(bot: Bot) -> bool:
    """Telegram's "/" menu: every command with its one-line description (``setMyCommands``); never raises."""
    try:
        await bot.set_my_commands([BotCommand(name, what[:256]) for name, what in COMMANDS.items()])
    except TelegramError as exc:
        LOG.warning("telegram: the command menu was not set (%s); the commands work without it", describe(exc))
        return False
    return True


async def _connect(app: Application, outbox: Outbox, config: TelegramConfig) -> None:
    """Start the bot, retrying (doubling waits, at most ``reconnect_max_s``) while Telegram is unreachable."""
    delay = min(max(config.retry_backoff_s, 0.1), config.reconnect_max_s)
    while True:
        try:
            await app.initialize()
            if not app.running:
                await app.start()
            await app.updater.start_polling(timeout=config.poll_timeout_s, drop_pending_updates=True,
                                            error_callback=_polling_error)
        except InvalidToken:
            LOG.error("telegram: the Bot API rejected TELEGRAM_BOT_TOKEN: no messages, no commands until it is fixed "
                      "(trading goes on)")
            outbox.refuse("token rejected")
            return
        except NetworkError as exc:
            outbox.unreachable()
            outbox.reachability.failed(exc, "connecting", "; trying again (trading goes on)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, config.reconnect_max_s)
        except Exception as exc:  # a bug or an unexpected answer: say so once, stay out of the trader's way
            LOG.error("telegram: the bot could not start: %r (trading goes on without it)", exc)
            outbox.refuse("bot not started")
            return
        else:
            outbox.reachability.answered()
            LOG.info("telegram: connected as @%s; authorised chats: %d", app.bot.username, len(config.chat_ids))
            outbox.connected()
            await set_menu(app.bot)
            return


def _polling_error(exc: TelegramError) -> None:
    """A polling failure the request did not turn into a quick retry (a 409 conflict, say): one line."""
    LOG.warning("telegram: polling for updates failed (%s); the library retries", describe(exc))


async def _stop(app: Application, outbox: Outbox, worker: asyncio.Task[None], config: TelegramConfig,
                flush_s: float) -> None:
    """Polling first (no new commands), then the handlers still running, then the outbox's flush, then the
    HTTP clients; each step bounded, none may raise."""
    bound = config.request_timeout_s + 1.0
    for step in (lambda: app.updater.stop() if app.updater and app.updater.running else None,
                 lambda: app.stop() if app.running else None):
        with contextlib.suppress(Exception):
            awaitable = step()
            if awaitable is not None:
                await asyncio.wait_for(awaitable, bound)
    await outbox.close(flush_s, worker)
    for step in (app.shutdown, app.bot.shutdown):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(step(), bound)


def seconds_until(hour: int, now: pd.Timestamp) -> float:
    """Seconds from ``now`` to the next ``hour``:00 UTC (strictly later)."""
    target = now.tz_convert("UTC").normalize() + pd.Timedelta(hours=hour)
    if target <= now:
        target += pd.Timedelta(days=1)
    return (target - now).total_seconds()


async def _daily_summaries(hour: int, store: StateStore, notifier: Notifier,
                           now: Callable[[], pd.Timestamp] = lambda: pd.Timestamp.now(tz="UTC")) -> None:
    while True:
        await asyncio.sleep(seconds_until(hour, now()))
        try:
            notifier.notify("summary", await asyncio.to_thread(summary_text, store))
        except Exception as exc:
            LOG.warning("telegram: daily summary failed: %r", exc)
        await asyncio.sleep(1.0)


# ------------------------------------------------------------------------------------------------ lifecycle


def send_lifecycle(config: TelegramConfig, kind: str, text: str, env: Mapping[str, str]) -> bool:
    """Send one message of ``kind`` to every authorised chat from synchronous code (a flow); True when every
    part was sent. Never raises and gives up after ``lifecycle_timeout_s``: a flow never waits on Telegram."""
    if not config.enabled or kind not in config.notify or not config.chat_ids:
        return False
    secrets = Secrets.from_env(env)
    token = secrets.get("telegram_bot_token")
    if token is None:
        LOG.warning("telegram: enabled but TELEGRAM_BOT_TOKEN is not set: %s message not sent", kind)
        return False
    mask = masker(secrets)
    outcome: dict[str, dict[str, int]] = {}

    def run() -> None:  # its own thread and loop: callable from any code, a running event loop included
        try:
            outcome["counts"] = asyncio.run(_send_now(config, token, mask, kind, text))
        except Exception as exc:
            LOG.warning("telegram: %s message not sent: %s", kind, mask(repr(exc)))

    thread = threading.Thread(target=run, name="telegram-lifecycle", daemon=True)
    thread.start()
    thread.join(config.lifecycle_timeout_s + 5.0)
    counts = outcome.get("counts")
    return bool(counts) and counts["queued"] > 0 and counts["sent"] == counts["queued"]


async def _send_now(config: TelegramConfig, token: str, mask: Mask, kind: str, text: str) -> dict[str, int]:
    counters = Counters()
    timeout = config.request_timeout_s
    with masked_logs(mask):
        bot = Bot(token, base_url=f"{config.base_url}/bot", base_file_url=f"{config.base_url}/file/bot",
                  request=QuietRequest(connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout))
        outbox = Outbox(lambda item: _send(bot, item, config), config, counters, mask)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.lifecycle_timeout_s
        try:
            await asyncio.wait_for(bot.initialize(), config.lifecycle_timeout_s)
            outbox.ready.set()
            worker = asyncio.create_task(outbox.run())
            for chat_id in config.chat_ids:
                outbox.put(chat_id, message_text(kind, text), kind=kind)
            await outbox.close(max(deadline - loop.time(), 0.0), worker)
        except (TelegramError, TimeoutError) as exc:
            counters.add("failed", len(config.chat_ids))
            LOG.warning("telegram: %s message not sent: %s", kind, mask(describe(exc)))
        finally:
            with contextlib.suppress(Exception):
                await bot.shutdown()
    return counters.snapshot()
