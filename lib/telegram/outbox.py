"""Every message the bot sends goes through one bounded queue, sent in order by one worker that keeps to
Telegram's limits (about one message a second per chat, 30 a second overall), honours a 429's
``retry_after``, retries network errors with a growing wait, and splits long texts (4096 characters a
message). Nothing here ever blocks the caller: a message that cannot be queued or sent is counted, so a
Telegram outage shows in the counters instead of in the trader's timing."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError, RetryAfter
from telegram.warnings import PTBDeprecationWarning

from pricelevel.telegram.config import TelegramConfig

LOG = logging.getLogger(__name__)
#: Telegram's limit on one message's text (UTF-16 code units, as Telegram counts them).
MAX_MESSAGE = 4096
#: The longest wait between two tries of one message.
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Outgoing:
    chat_id: int
    text: str
    #: An inline keyboard (on the last part of a split message), or ``None``.
    markup: Any = None
    kind: str = "reply"


Send = Callable[[Outgoing], Awaitable[object]]


class Counters:
    """What happened to the messages, safe to count from any thread. ``dropped``: the queue was full;
    ``failed``: given up after its tries (or refused by Telegram); ``unsent``: still queued at shutdown;
    ``filtered``: its kind is switched off; ``ignored``: updates from chats that are not authorised."""

    NAMES = ("queued", "sent", "retried", "rate_limited", "dropped", "failed", "unsent", "filtered", "ignored")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def lost(self) -> int:
        counts = self.snapshot()
        return counts["dropped"] + counts["failed"] + counts["unsent"]


def _utf16_units(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


def split_message(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """``text`` in parts of at most ``limit`` UTF-16 units, cut at the last newline that fits when there is one."""
    parts: list[str] = []
    while text:
        units, end = 0, len(text)
        for i, char in enumerate(text):
            units += _utf16_units(char)
            if units > limit:
                end = i
                break
        if end == len(text):
            parts.append(text)
            break
        newline = text.rfind("\n", 0, end + 1)
        if newline > 0:
            parts.append(text[:newline])
            text = text[newline + 1:]
        else:
            parts.append(text[:end])
            text = text[end:]
    return parts or [""]


def retry_after_s(exc: RetryAfter) -> float:
    """A 429's wait in seconds (the library returns a number or a timedelta, and warns about the change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


class Outbox:
    """The queue and its worker. :meth:`put` is called on the loop's thread (a notifier from another thread
    goes through ``loop.call_soon_threadsafe``); :meth:`run` is the worker task; :meth:`close` drains it.

    The worker waits for :attr:`ready` (the bot reached Telegram) before the first send, so messages made
    while Telegram is unreachable at start wait in the queue rather than burn their tries."""

    def __init__(self, send: Send, config: TelegramConfig, counters: Counters | None = None,
                 mask: Callable[[str], str] = lambda text: text, clock: Callable[[], float] = time.monotonic) -> None:
        self._send, self.config, self._mask, self._clock = send, config, mask, clock
        self.counters = counters or Counters()
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=config.queue_size)
        self.ready = asyncio.Event()
        self._refused: str | None = None
        self._closed = False
        self._next_for_chat: dict[int, float] = {}
        self._recent: deque[float] = deque()
        self._paused_until = 0.0
        self._dropping = False

    def put(self, chat_id: int, text: str, markup: Any = None, kind: str = "reply") -> None:
        """Queue ``text`` for ``chat_id`` (split if long); never blocks, never raises."""
        parts = split_message(self._mask(text))
        for i, part in enumerate(parts):
            if self._closed:
                self.counters.add("unsent")
                continue
            try:
                self._queue.put_nowait(Outgoing(chat_id, part, markup if i == len(parts) - 1 else None, kind))
            except asyncio.QueueFull:
                self.counters.add("dropped")
                if not self._dropping:
                    LOG.warning("telegram: outbox full (%d messages waiting): new messages are dropped and counted",
                                self._queue.qsize())
                self._dropping = True
                continue
            self.counters.add("queued")

    def refuse(self, reason: str) -> None:
        """Telegram will not take our messages (the token was rejected): count each one as failed from now on."""
        self._refused = reason
        self.ready.set()

    async def run(self) -> None:
        """The worker: forever, the next message, sent within the limits."""
        while True:
            item = await self._queue.get()
            try:
                await self.ready.wait()
                await self._deliver(item)
            except asyncio.CancelledError:
                self.counters.add("unsent")
                raise
            finally:
                self._queue.task_done()

    async def close(self, timeout_s: float, worker: asyncio.Task[None] | None = None) -> None:
        """Stop taking messages, send what is queued for at most ``timeout_s``, then count the rest as unsent."""
        self._closed = True
        if worker is not None and not worker.done():
            if self.ready.is_set():  # connected: drain; never connected: nothing would go out, so no wait
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout_s)
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        left = self._queue.qsize()
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if left:
            self.counters.add("unsent", left)
        unsent = self.counters.snapshot()["unsent"]
        if unsent:
            LOG.warning("telegram: %d messages not sent (Telegram unreachable or shutting down); counted as unsent", unsent)

    async def _deliver(self, item: Outgoing) -> None:
        attempts = self.config.send_attempts
        for attempt in range(1, attempts + 1):
            if self._refused:
                self.counters.add("failed")
                return
            await self._wait_turn(item.chat_id)
            try:
                await self._send(item)
            except RetryAfter as exc:
                wait = retry_after_s(exc)
                self.counters.add("rate_limited")
                self._paused_until = self._clock() + wait
                LOG.info("telegram: rate limited (429): waiting %.1f s as asked", wait)
            except (BadRequest, Forbidden, InvalidToken, ChatMigrated) as exc:
                self.counters.add("failed")
                LOG.warning("telegram: a %s message to chat %s was refused: %s", item.kind, item.chat_id, exc)
                return
            except NetworkError as exc:  # TimedOut included: Telegram unreachable or failing, try again later
                wait = min(self.config.retry_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                self._paused_until = max(self._paused_until, self._clock() + wait)
                LOG.info("telegram: send failed (%s), try %d of %d", exc, attempt, attempts)
            except Exception as exc:  # never let one message stop the worker
                self.counters.add("failed")
                LOG.warning("telegram: a %s message to chat %s failed: %r", item.kind, item.chat_id, exc)
                return
            else:
                self.counters.add("sent")
                self._dropping = False
                return
            if attempt < attempts:
                self.counters.add("retried")
        self.counters.add("failed")
        LOG.warning("telegram: gave up a %s message to chat %s after %d tries (counted as failed)",
                    item.kind, item.chat_id, attempts)

    async def _wait_turn(self, chat_id: int) -> None:
        """Sleep until this chat's interval, the overall rate and any 429 pause allow one more request."""
        while True:
            now = self._clock()
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            wait = max(self._paused_until, self._next_for_chat.get(chat_id, 0.0)) - now
            if len(self._recent) >= self.config.max_per_second:
                wait = max(wait, self._recent[0] + 1.0 - now)
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        now = self._clock()
        self._recent.append(now)
        self._next_for_chat[chat_id] = now + self.config.per_chat_interval_s
