"""Configuration of the Telegram companion (``telegram:``). The bot token is not configuration: it is read from
``TELEGRAM_BOT_TOKEN`` only (:mod:`pricelevel.core.secrets`)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from pricelevel.core.config import Frozen
from pricelevel.trading.events import EVENT_KINDS


class TelegramConfig(Frozen):
    """Who may talk to the bot, what it tells them, and how hard it may push Telegram (docs/how-to/telegram.md "Telegram")."""

    #: Off by default: nothing contacts Telegram unless this is true (and then ``TELEGRAM_BOT_TOKEN`` is required).
    enabled: bool = False
    #: The chats that receive notifications and may command the bot; empty admits nobody.
    chat_ids: tuple[int, ...] = ()
    #: In a group chat (listed in ``chat_ids``) only these users may command; private chats need no entry here.
    user_ids: tuple[int, ...] = ()
    #: The kinds of notification sent (``pricelevel.trading.events.EVENT_KINDS``); remove one to silence it.
    notify: tuple[str, ...] = EVENT_KINDS
    #: Kinds sent without a sound (Telegram's ``disable_notification``): they arrive, the phone stays quiet.
    silent: tuple[str, ...] = ()
    #: Bot API server (a local fake in tests, a self-hosted Bot API server).
    base_url: str = "https://api.telegram.org"
    #: Telegram's limits: about one message a second per chat, 30 a second overall.
    per_chat_interval_s: float = Field(1.0, ge=0)
    max_per_second: int = Field(30, ge=1)
    #: Messages waiting to be sent (kept in the state database through outages and restarts); beyond this new
    #: ones are dropped and counted.
    queue_size: int = Field(1000, ge=1)
    #: Tries per message that fail unexpectedly before it is given up and counted as failed. Telegram unreachable
    #: (no connection, a timeout, a 5xx) and 429s never use one: the message waits until Telegram answers; a refusal
    #: (a bad request, the bot blocked) ends it at once.
    send_attempts: int = Field(5, ge=1)
    #: First wait after a failed send; doubles per try, at most 30 s. A 429 waits its ``retry_after`` instead.
    retry_backoff_s: float = Field(1.0, ge=0)
    #: Connect/read timeout of every request except the long poll.
    request_timeout_s: float = Field(10.0, gt=0)
    #: Long-poll timeout of ``getUpdates`` (the server holds the request this long when nothing is pending).
    poll_timeout_s: float = Field(10.0, ge=0)
    #: Longest wait between two tries to reach Telegram while it is away (polling for commands, and connecting at
    #: start): commands answer within about this long after an outage ends.
    reconnect_max_s: float = Field(4.0, gt=0, le=60)
    #: Seconds the buttons of a ``/kill``, ``/rearm``, ``/rollback``, ``/start`` or ``/forceexit`` question stay valid.
    confirm_timeout_s: float = Field(60.0, gt=0)
    #: UTC hour of an extra daily summary (equity, P&L, trades, positions) from the bot; ``null``: none (the trader
    #: itself sends one at the first bar of each UTC day).
    summary_hour: int | None = Field(None, ge=0, le=23)
    #: At shutdown, keep sending what is queued for at most this long (not at all while Telegram is unreachable);
    #: the rest stays in the state database's outbox and is sent at the next start.
    flush_timeout_s: float = Field(5.0, ge=0)
    #: A flow's lifecycle message (promotion, failed run) gives up after this long: a flow never waits on Telegram.
    lifecycle_timeout_s: float = Field(15.0, gt=0)

    @field_validator("notify", "silent")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(EVENT_KINDS))
        if unknown:
            raise ValueError(f"unknown notification kind {', '.join(unknown)}; known: {', '.join(EVENT_KINDS)}")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")
