"""The bot: a python-telegram-bot ``Application`` whose handlers answer the commands of
:mod:`pricelevel.telegram.commands`, for authorised chats only.

Authorisation: a chat listed in ``telegram.chat_ids``; in a group, the sender must also be listed in
``telegram.user_ids`` (a private chat is its user). An update from anyone else gets no reply at all: a gate
in front of every handler logs its chat id and command (never its text) and stops it there, and each handler
also carries the same filter. ``/kill``, ``/rearm`` and ``/rollback`` act only after their inline "yes"
button is pressed, by the same person, within ``telegram.confirm_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.request import HTTPXRequest

from pricelevel.telegram import commands
from pricelevel.telegram.commands import Registry, UsageError
from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.outbox import Counters, Outbox
from pricelevel.trading import control
from pricelevel.trading.state import StateStore

LOG = logging.getLogger(__name__)

#: Actions that ask first: the question and the label of the "yes" button.
CONFIRM = {
    "kill": ("Engage the KILL SWITCH? Every position is closed, open orders are cancelled and no entry is made "
             "until /rearm.", "Yes, kill"),
    "rearm": ("Re-arm the trader? The kill switch, drawdown halt, /stop and the breaker are cleared.", "Yes, re-arm"),
    "rollback": ("Roll @champion back to the previous champion? The trader switches at its next bar.", "Yes, roll back"),
    # Telegram's Start button sends /start too: opening the bot must never re-allow entries by itself.
    "start": ("Allow new entries again (after /stop)?", "Yes, allow entries"),
}


def authorised(config: TelegramConfig, chat_id: int | None, chat_type: str | None, user_id: int | None) -> bool:
    """The one rule (module docstring): a listed chat, and in a group a listed user too."""
    if chat_id is None or chat_id not in config.chat_ids:
        return False
    return chat_type == ChatType.PRIVATE or (user_id is not None and user_id in config.user_ids)


def auth_filter(config: TelegramConfig) -> filters.BaseFilter:
    """:func:`authorised` as python-telegram-bot filters (an empty list admits nobody)."""
    return filters.Chat(chat_id=config.chat_ids) & (filters.ChatType.PRIVATE | filters.User(user_id=config.user_ids))


def build_application(config: TelegramConfig, token: str) -> Application:
    """An ``Application`` on ``config.base_url`` with short timeouts; no job queue, updates handled in order."""
    timeout = config.request_timeout_s

    def request() -> HTTPXRequest:
        return HTTPXRequest(connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout, pool_timeout=timeout)

    return (ApplicationBuilder().token(token).base_url(f"{config.base_url}/bot")
            .base_file_url(f"{config.base_url}/file/bot").request(request()).get_updates_request(request())
            .job_queue(None).concurrent_updates(False).build())


@dataclass(frozen=True)
class Pending:
    action: str
    chat_id: int
    user_id: int | None
    expires: float


def _command_of(update: Update) -> str:
    """What an update asked for, without its content: ``/kill``, ``button``, ``message``."""
    message = update.effective_message
    if update.callback_query is not None:
        return "button"
    if message is not None and message.text and message.text.startswith("/"):
        return message.text.split(maxsplit=1)[0].split("@")[0][:32]
    return "message" if message is not None else "update"


class ControlBot:
    """The handlers; answers go through ``outbox``, so they keep to the same limits as notifications."""

    def __init__(self, config: TelegramConfig, store: StateStore, registry: Registry, outbox: Outbox,
                 counters: Counters, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.store, self.registry, self.outbox, self.counters = config, store, registry, outbox, counters
        self._clock = clock
        self._pending: dict[str, Pending] = {}
        self._actions: dict[str, Callable[[str], str]] = {
            "kill": lambda by: commands.queue_command(store, "kill", (), by),
            "rearm": lambda by: commands.queue_command(store, "rearm", (), by),
            "start": lambda by: commands.queue_command(store, "start", (), by),
            "rollback": lambda by: registry.rollback_text(),
        }

    def install(self, app: Application) -> None:
        allowed = auth_filter(self.config)
        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        answers = {
            "status": lambda args: commands.status_text(self.store, self.counters.snapshot()),
            "positions": lambda args: commands.positions_text(self.store),
            "balance": lambda args: commands.balance_text(self.store),
            "profit": lambda args: commands.profit_text(self.store, commands.parse_number(args, None, "days")),
            "trades": lambda args: commands.trades_text(
                self.store, int(commands.parse_number(args, 10, "n", integer=True, limit=50))),
            "model": lambda args: self.registry.model_text(control.status(self.store)["model"]),
            "help": lambda args: commands.help_text(),
        }
        for name, answer in answers.items():
            app.add_handler(CommandHandler(name, self._answering(answer), filters=allowed))
        app.add_handler(CommandHandler("stop", self._answering(
            lambda args, by: commands.queue_command(self.store, "stop", (), by), with_by=True), filters=allowed))
        app.add_handler(CommandHandler("forceexit", self._answering(
            lambda args, by: commands.queue_command(self.store, "forceexit", commands.parse_forceexit(args), by),
            with_by=True), filters=allowed))
        for action in CONFIRM:
            app.add_handler(CommandHandler(action, self._asking(action), filters=allowed))
        app.add_handler(MessageHandler(filters.COMMAND & allowed, self._unknown))
        app.add_handler(CallbackQueryHandler(self._on_button))
        app.add_error_handler(self._on_error)

    # ------------------------------------------------------------------------------------------ handlers

    async def _gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Before every handler: an unauthorised update stops here, unanswered, logged without its content."""
        chat, user = update.effective_chat, update.effective_user
        if authorised(self.config, chat.id if chat else None, chat.type if chat else None, user.id if user else None):
            return
        self.counters.add("ignored")
        LOG.warning("telegram: ignored %s from chat %s (user %s): not authorised", _command_of(update),
                    chat.id if chat else "-", user.id if user else "-")
        raise ApplicationHandlerStop

    def _answering(self, answer: Callable[..., str], with_by: bool = False):
        async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            args = tuple(context.args or ())
            call = (lambda: answer(args, _by(update))) if with_by else (lambda: answer(args))
            self.reply(update, await self._run(_command_of(update), call))

        return handle

    def _asking(self, action: str):
        async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            now = self._clock()
            self._pending = {k: p for k, p in self._pending.items() if p.expires > now}
            nonce = secrets.token_hex(8)
            user = update.effective_user
            self._pending[nonce] = Pending(action, update.effective_chat.id, user.id if user else None,
                                           now + self.config.confirm_timeout_s)
            question, yes = CONFIRM[action]
            keyboard = InlineKeyboardMarkup([[InlineKeyboardButton(yes, callback_data=f"yes:{nonce}"),
                                              InlineKeyboardButton("Cancel", callback_data=f"no:{nonce}")]])
            self.reply(update, f"{question}\n(valid {self.config.confirm_timeout_s:.0f} s)", keyboard)

        return handle

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        with contextlib.suppress(TelegramError):  # answerCallbackQuery only stops the button's spinner
            await query.answer()
        answer, _, nonce = (query.data or "").partition(":")
        pending = self._pending.get(nonce)
        user = update.effective_user
        if pending is None or pending.expires <= self._clock() or pending.chat_id != update.effective_chat.id:
            self._pending.pop(nonce, None)
            self.reply(update, "That confirmation has expired or was used already; send the command again.")
            return
        if pending.user_id != (user.id if user else None):
            self.reply(update, f"Only the person who sent /{pending.action} can confirm it.")
            return
        del self._pending[nonce]
        if answer != "yes":
            self.reply(update, f"/{pending.action} cancelled: nothing done.")
            return
        self.reply(update, await self._run(f"/{pending.action}", lambda: self._actions[pending.action](_by(update))))

    async def _unknown(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.reply(update, f"unknown command {_command_of(update)}; /help lists them")

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        LOG.error("telegram: a handler failed: %r", context.error, exc_info=context.error)

    # ------------------------------------------------------------------------------------------ helpers

    def reply(self, update: Update, text: str, markup: InlineKeyboardMarkup | None = None) -> None:
        self.outbox.put(update.effective_chat.id, text, markup)

    async def _run(self, what: str, call: Callable[[], str]) -> str:
        """A library call in a worker thread (database, registry): the loop, and the trader, never wait on it."""
        try:
            return await asyncio.to_thread(call)
        except UsageError as exc:
            return str(exc)
        except Exception as exc:
            LOG.warning("telegram: %s failed: %r", what, exc)
            return f"{what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _by(update: Update) -> str:
    user = update.effective_user
    return f"telegram:{user.username or user.id}" if user else "telegram"
