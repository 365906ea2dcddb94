"""The bot: a python-telegram-bot ``Application`` whose handlers answer the commands of
:mod:`pricelevel.telegram.commands`, for authorised chats only.

Authorisation: a chat listed in ``telegram.chat_ids``; in a group, the sender must also be listed in
``telegram.user_ids`` (a private chat is its user). An update from anyone else gets no reply at all: a gate
in front of every handler logs its chat id and command (never its text) and stops it there, and each handler
also carries the same filter. ``/kill``, ``/rearm``, ``/rollback`` and ``/start`` act only after their inline
"yes" button is pressed, by the same person, within ``telegram.confirm_timeout_s``; ``/forceexit`` without a
symbol offers the open positions as buttons. A question, once answered, is edited to its outcome ("killed at
14:02 UTC by @alice", "cancelled ...") and loses its buttons, so no stale "Yes, kill" stays on screen.

Every message is HTML (:mod:`pricelevel.telegram.render`): answers are escaped, reports are laid out there.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import telegram
from pydantic import BaseModel
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ChatType, ParseMode
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

from pricelevel.telegram import commands
from pricelevel.telegram.commands import Registry, UsageError
from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.logtail import LogTail
from pricelevel.telegram.outbox import Counters, Outbox
from pricelevel.telegram.render import escape, report_html
from pricelevel.telegram.transport import PollingRequest, QuietRequest, Reachability, describe
from pricelevel.trading import control
from pricelevel.trading.config import RiskConfig
from pricelevel.trading.reports import Report, config_view
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
#: What a confirmed question is edited to say first (then the outcome, then when and by whom).
DONE = {"kill": "killed", "rearm": "re-armed", "rollback": "rolled back", "start": "entries allowed",
        "forceexit": "force-exit"}
#: At most this many position buttons under ``/forceexit`` (three a row), then "All" and "Cancel".
MAX_POSITION_BUTTONS = 30


def authorised(config: TelegramConfig, chat_id: int | None, chat_type: str | None, user_id: int | None) -> bool:
    """The one rule (module docstring): a listed chat, and in a group a listed user too."""
    if chat_id is None or chat_id not in config.chat_ids:
        return False
    return chat_type == ChatType.PRIVATE or (user_id is not None and user_id in config.user_ids)


def auth_filter(config: TelegramConfig) -> filters.BaseFilter:
    """:func:`authorised` as python-telegram-bot filters (an empty list admits nobody)."""
    return filters.Chat(chat_id=config.chat_ids) & (filters.ChatType.PRIVATE | filters.User(user_id=config.user_ids))


def build_application(config: TelegramConfig, token: str, reachability: Reachability | None = None) -> Application:
    """An ``Application`` on ``config.base_url`` with short timeouts; no job queue, updates handled in order.
    Its requests parse quietly, and polling comes back within ``reconnect_max_s`` of an outage's end
    (:mod:`pricelevel.telegram.transport`)."""
    timeout = config.request_timeout_s
    limits = dict(connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout, pool_timeout=timeout)
    polling = PollingRequest(reachability or Reachability(), config.reconnect_max_s, **limits)
    return (ApplicationBuilder().token(token).base_url(f"{config.base_url}/bot")
            .base_file_url(f"{config.base_url}/file/bot").request(QuietRequest(**limits)).get_updates_request(polling)
            .job_queue(None).concurrent_updates(False).build())


@dataclass(frozen=True)
class Pending:
    action: str
    chat_id: int
    user_id: int | None
    expires: float


@dataclass(frozen=True)
class Extras:
    """What some answers need beyond the state database: the risk limits (``/count``, ``/locks``), the sections
    ``/show_config`` shows, the log lines ``/logs`` shows, and the mask for what is shown."""

    risk: RiskConfig | None = None
    sections: Mapping[str, BaseModel] = field(default_factory=dict)
    logs: LogTail | None = None
    mask: Callable[[str], str] = lambda text: text


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
                 counters: Counters, clock: Callable[[], float] = time.monotonic, extras: Extras | None = None,
                 now: Callable[[], dtm.datetime] = lambda: dtm.datetime.now(dtm.UTC)) -> None:
        self.config, self.store, self.registry, self.outbox, self.counters = config, store, registry, outbox, counters
        self.extras = extras or Extras()
        self._clock, self._now = clock, now
        self._pending: dict[str, Pending] = {}
        self._actions: dict[str, Callable[[str], str]] = {
            "kill": lambda by: commands.queue_command(store, "kill", (), by),
            "rearm": lambda by: commands.queue_command(store, "rearm", (), by),
            "start": lambda by: commands.queue_command(store, "start", (), by),
            "rollback": lambda by: registry.rollback_text(),
        }

    def answers(self) -> dict[str, Callable[[tuple[str, ...]], str | Report]]:
        """The commands that only read: ``/name args`` -> the answer (a report or plain text)."""
        store, extras = self.store, self.extras
        answers: dict[str, Callable[[tuple[str, ...]], str | Report]] = {
            "status": lambda args: commands.status_text(store, self.counters.snapshot()),
            "positions": lambda args: commands.positions_text(store),
            "balance": lambda args: commands.balance_text(store),
            "profit": lambda args: commands.profit_text(store, commands.parse_number(args, None, "days")),
            "trades": lambda args: commands.trades_text(
                store, int(commands.parse_number(args, 10, "n", integer=True, limit=50))),
            "performance": lambda args: control.performance(store).report(),
            "stats": lambda args: control.trade_stats(store).report(),
            "count": lambda args: control.count(store, extras.risk).report(),
            "locks": lambda args: control.locks(store, extras.risk).report(),
            "health": lambda args: self._health(),
            "version": lambda args: control.versions(store, (("python-telegram-bot", telegram.__version__),)).report(),
            "show_config": lambda args: config_view(extras.sections, extras.mask).report(),
            "logs": lambda args: self._logs(int(commands.parse_number(args, 10, "n", integer=True, limit=50))),
            "model": lambda args: self.registry.model_text(control.status(store)["model"]),
            "help": lambda args: commands.help_text(),
        }
        for name, (unit, default, limit) in commands.PERIODS.items():
            answers[name] = lambda args, unit=unit, default=default, limit=limit: control.period_profit(
                store, unit, int(commands.parse_number(args, default, "n", integer=True, limit=limit))).report()
        return answers

    def install(self, app: Application) -> None:
        allowed = auth_filter(self.config)
        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        for name, answer in self.answers().items():
            app.add_handler(CommandHandler(name, self._answering(answer), filters=allowed))
        app.add_handler(CommandHandler("tg_info", self._tg_info, filters=allowed))
        app.add_handler(CommandHandler("stop", self._answering(
            lambda args, by: commands.queue_command(self.store, "stop", (), by), with_by=True), filters=allowed))
        app.add_handler(CommandHandler("forceexit", self._forceexit, filters=allowed))
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

    def _answering(self, answer: Callable[..., str | Report], with_by: bool = False):
        async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            args = tuple(context.args or ())
            call = (lambda: answer(args, _by(update))) if with_by else (lambda: answer(args))
            self.reply_html(update, _html(await self._run(_command_of(update), call)))

        return handle

    def _ask(self, action: str, update: Update) -> str:
        """Remember a question to ``update``'s sender; returns the nonce its buttons carry."""
        now = self._clock()
        self._pending = {k: p for k, p in self._pending.items() if p.expires > now - 3600}  # expired ones: 1 h
        nonce = secrets.token_hex(8)
        user = update.effective_user
        self._pending[nonce] = Pending(action, update.effective_chat.id, user.id if user else None,
                                       now + self.config.confirm_timeout_s)
        return nonce

    def _asking(self, action: str):
        async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            nonce = self._ask(action, update)
            question, yes = CONFIRM[action]
            keyboard = InlineKeyboardMarkup([[InlineKeyboardButton(yes, callback_data=f"yes:{nonce}"),
                                              InlineKeyboardButton("Cancel", callback_data=f"no:{nonce}")]])
            self.reply(update, f"{question}\n(valid {self.config.confirm_timeout_s:.0f} s)", keyboard)

        return handle

    async def _forceexit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """``/forceexit SYMBOL|all``: checked against the open positions; no symbol: they are offered as buttons."""
        args = tuple(context.args or ())
        if args:
            by = _by(update)
            self.reply(update, await self._run("/forceexit", lambda: commands.forceexit_text(self.store, args, by)))
            return
        symbols = await self._run("/forceexit", lambda: control.open_symbols(self.store))
        if isinstance(symbols, str):  # the database failed: said in the answer
            self.reply(update, symbols)
            return
        if not symbols:
            self.reply(update, "no open positions: nothing to close")
            return
        nonce = self._ask("forceexit", update)
        shown = symbols[:MAX_POSITION_BUTTONS]
        buttons = [InlineKeyboardButton(s, callback_data=f"fx:{nonce}:{s}") for s in shown]
        rows = [buttons[k:k + 3] for k in range(0, len(buttons), 3)]
        rows.append([InlineKeyboardButton(f"All ({len(symbols)})", callback_data=f"fx:{nonce}:ALL"),
                     InlineKeyboardButton("Cancel", callback_data=f"no:{nonce}")])
        more = f" ({len(symbols) - len(shown)} more: /forceexit SYMBOL)" if len(shown) < len(symbols) else ""
        self.reply(update, f"Close which position at market?{more}\n(valid {self.config.confirm_timeout_s:.0f} s)",
                   InlineKeyboardMarkup(rows))

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button under a question: only its asker may answer it, once, in time; the question is then edited to
        the outcome and loses its buttons. Anything else gets a short notice on the asker's screen only."""
        query = update.callback_query
        answer, _, rest = (query.data or "").partition(":")
        nonce, _, choice = rest.partition(":")
        pending = self._pending.get(nonce)
        user = update.effective_user
        if pending is None or pending.chat_id != update.effective_chat.id:
            await _notice(query, "That question has expired or was answered already; send the command again.")
            return
        if pending.user_id != (user.id if user else None):
            await _notice(query, f"Only the person who sent /{pending.action} can answer it.")
            return
        del self._pending[nonce]
        action, stamp = pending.action, f"at {self._now():%H:%M} UTC by {_who(update)}"
        if pending.expires <= self._clock():
            await _notice(query, "expired")
            await self._edit(update, f"/{action}: expired, nothing done; send /{action} again.")
            return
        await _notice(query)
        if answer == "no":
            await self._edit(update, f"/{action}: cancelled {stamp}: nothing done.")
            return
        if answer == "fx" and action == "forceexit":
            by = _by(update)
            outcome = await self._run("/forceexit", lambda: commands.forceexit_text(self.store, (choice,), by))
            head = f"{DONE[action]} {choice.lower() if choice == 'ALL' else choice}"
        elif answer == "yes" and action in self._actions:
            outcome = await self._run(f"/{action}", lambda: self._actions[action](_by(update)))
            head = DONE[action]
        else:
            return
        await self._edit(update, f"{head} {stamp}\n{outcome}")

    async def _tg_info(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        chat, user = update.effective_chat, update.effective_user
        facts = (("chat id", str(chat.id)), ("chat type", str(chat.type)),
                 ("user id", str(user.id) if user else "-"), ("username", f"@{user.username}" if user and user.username else "-"))
        self.reply_html(update, report_html(Report("this chat", facts=facts, notes=(
            "chat ids go in telegram.chat_ids; in a group, user ids in telegram.user_ids",))))

    async def _unknown(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.reply(update, f"unknown command {_command_of(update)}; /help lists them")

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        LOG.error("telegram: a handler failed: %r", context.error, exc_info=context.error)

    # ------------------------------------------------------------------------------------------ answers

    def _health(self) -> Report:
        counts = self.counters.snapshot()
        lost = counts["dropped"] + counts["failed"] + counts["unsent"]
        reachability = self.outbox.reachability
        telegram_state = "unreachable" if reachability.down else "answers"
        report = control.health(self.store).report()
        return Report(report.title, facts=(*report.facts, ("telegram", f"{telegram_state}; {counts['sent']} sent, "
                                                                      f"{lost} not sent, {self.outbox.waiting} waiting")))

    def _logs(self, n: int) -> Report:
        if self.extras.logs is None:
            return Report("log", notes=("no log lines are kept in this process",))
        return self.extras.logs.report(n)

    # ------------------------------------------------------------------------------------------ helpers

    def reply(self, update: Update, text: str, markup: InlineKeyboardMarkup | None = None) -> None:
        """Plain text (escaped here)."""
        self.reply_html(update, escape(text), markup)

    def reply_html(self, update: Update, text: str, markup: InlineKeyboardMarkup | None = None) -> None:
        self.outbox.put(update.effective_chat.id, text, markup)

    async def _edit(self, update: Update, text: str) -> None:
        """The question becomes its outcome, without buttons; if Telegram refuses the edit, the outcome is sent."""
        try:
            await update.callback_query.edit_message_text(escape(text), parse_mode=ParseMode.HTML, reply_markup=None)
        except TelegramError as exc:
            LOG.info("telegram: could not edit the question (%s); its outcome is sent instead", describe(exc))
            self.reply(update, text)

    async def _run(self, what: str, call: Callable[[], object]) -> object:
        """A library call in a worker thread (database, registry): the loop, and the trader, never wait on it."""
        try:
            return await asyncio.to_thread(call)
        except UsageError as exc:
            return str(exc)
        except Exception as exc:
            LOG.warning("telegram: %s failed: %r", what, exc)
            return f"{what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _html(answer: object) -> str:
    return report_html(answer) if isinstance(answer, Report) else escape(str(answer))


async def _notice(query, text: str | None = None) -> None:
    """Answer a button press (stops its spinner; ``text``: a short notice on the presser's screen)."""
    with contextlib.suppress(TelegramError):
        await query.answer(text=text, show_alert=bool(text) and len(text) > 60)


def _who(update: Update) -> str:
    user = update.effective_user
    return (f"@{user.username}" if user.username else str(user.id)) if user else "someone"


def _by(update: Update) -> str:
    user = update.effective_user
    return f"telegram:{user.username or user.id}" if user else "telegram"
