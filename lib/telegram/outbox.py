"""Every message the bot sends goes through one bounded queue, sent in order by one worker that keeps to
Telegram's limits (about one message a second per chat, 30 a second overall), honours a 429's
``retry_after`` and splits long texts (4096 characters a message).

The queue outlives Telegram's outages and the process: in the service it is the state database's ``outbox``
table (:class:`StoredQueue`), so a message is kept from the moment it is notified until Telegram has taken it,
through an outage of any length and across a restart, and each is marked sent once. A network error (Telegram
unreachable, a timeout, a 5xx or an HTML error page from a proxy) never uses up a message's tries: the head of
the queue waits, with a growing wait capped at ``telegram.reconnect_max_s``, until Telegram answers, and the rest wait behind it in
order. Only Telegram's refusals end a message (a bad request, a blocked bot: counted as failed). A flow's one-off
message uses :class:`MemoryQueue`. Nothing here ever blocks the caller: :meth:`Outbox.put` only hands the
message to the loop; the database writes run in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import json
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from telegram import InlineKeyboardMarkup
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.warnings import PTBDeprecationWarning

from pricelevel.telegram.config import TelegramConfig
from pricelevel.telegram.transport import Reachability
from pricelevel.trading.state import StateStore, as_utc

LOG = logging.getLogger(__name__)
#: Telegram's limit on one message's text (UTF-16 code units, as Telegram counts them).
MAX_MESSAGE = 4096
#: The longest wait between two tries of one message.
MAX_BACKOFF_S = 30.0
#: A message sent this long after it was queued says when it was queued (an outage, a restart).
LATE_AFTER_S = 60.0
#: Messages read from the queue at a time.
BATCH = 20


@dataclass(frozen=True)
class Outgoing:
    chat_id: int
    text: str
    #: An inline keyboard (on the last part of a split message), or ``None``.
    markup: Any = None
    kind: str = "reply"


Send = Callable[[Outgoing], Awaitable[object]]


@dataclass(frozen=True)
class Waiting:
    """A queued message and its place in the queue."""

    id: int
    item: Outgoing
    created: dtm.datetime
    #: Tries that failed for a reason other than the network (see :class:`Outbox`).
    attempts: int = 0


class MessageQueue(Protocol):
    """Where messages wait, oldest first. ``blocking``: its calls do I/O (the outbox runs them in worker threads)."""

    blocking: bool

    def add(self, items: Sequence[Outgoing]) -> None: ...
    def waiting(self, limit: int) -> list[Waiting]: ...
    def count(self) -> int: ...
    def settle(self, message_id: int, status: str, attempts: int = 0, error: str = "") -> bool: ...
    def expire(self, chat_ids: Sequence[int]) -> int: ...


class MemoryQueue:
    """The queue in memory: gone with the process (a flow's one-off message, tests)."""

    blocking = False

    def __init__(self, now: Callable[[], dtm.datetime] = lambda: dtm.datetime.now(dtm.UTC)) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, Waiting] = {}
        self._next = 1
        self._now = now

    def add(self, items: Sequence[Outgoing]) -> None:
        with self._lock:
            for item in items:
                self._items[self._next] = Waiting(self._next, item, self._now())
                self._next += 1

    def waiting(self, limit: int) -> list[Waiting]:
        with self._lock:
            return list(self._items.values())[:limit]

    def count(self) -> int:
        with self._lock:
            return len(self._items)

    def settle(self, message_id: int, status: str, attempts: int = 0, error: str = "") -> bool:
        with self._lock:
            return self._items.pop(message_id, None) is not None

    def expire(self, chat_ids: Sequence[int]) -> int:
        return 0


class StoredQueue:
    """The queue in the state database's ``outbox`` table: kept across outages and restarts."""

    blocking = True

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def add(self, items: Sequence[Outgoing]) -> None:
        rows = [{"chat_id": i.chat_id, "kind": i.kind, "text": i.text,
                 "markup": json.dumps(i.markup.to_dict()) if i.markup is not None else None} for i in items]
        with self.store.transaction() as tx:
            self.store.queue_messages(tx, rows)

    def waiting(self, limit: int) -> list[Waiting]:
        with self.store.transaction() as tx:
            rows = self.store.waiting_messages(tx, limit)
        return [Waiting(r["id"], Outgoing(r["chat_id"], r["text"], _markup(r["markup"]), r["kind"]),
                        as_utc(r["created"]).to_pydatetime(), r["attempts"]) for r in rows]

    def count(self) -> int:
        with self.store.transaction() as tx:
            return self.store.count_waiting(tx)

    def settle(self, message_id: int, status: str, attempts: int = 0, error: str = "") -> bool:
        with self.store.transaction() as tx:
            return self.store.settle_message(tx, message_id, status, attempts, error[:500])

    def expire(self, chat_ids: Sequence[int]) -> int:
        """At start: replies an earlier run left (their question is gone) and messages to chats no longer
        authorised are not sent."""
        expired = 0
        with self.store.transaction() as tx:
            for row in self.store.waiting_messages(tx, limit=1_000_000):
                if row["kind"] == "reply" or row["chat_id"] not in chat_ids:
                    expired += self.store.settle_message(tx, row["id"], "expired", row["attempts"],
                                                         "a reply from an earlier run" if row["kind"] == "reply"
                                                         else "chat no longer authorised")
        return expired


def _markup(text: str | None) -> InlineKeyboardMarkup | None:
    return InlineKeyboardMarkup.de_json(json.loads(text), None) if text else None


class Counters:
    """What happened to the messages, safe to count from any thread. ``dropped``: the queue was full;
    ``failed``: refused by Telegram (or failing unexpectedly ``send_attempts`` times); ``unsent``: still queued at
    shutdown (in the state database: sent at the next start); ``expired``: a reply left by an earlier run, or for a
    chat no longer authorised; ``filtered``: its kind is switched off; ``ignored``: updates from chats that are not
    authorised; ``retried``: tries after a network error, a 429 or a failure (none uses up a message)."""

    NAMES = ("queued", "sent", "retried", "rate_limited", "dropped", "failed", "unsent", "expired", "filtered",
             "ignored")

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
            amp = text.rfind("&", max(end - 10, 0), end)  # never cut an HTML entity (``&amp;``) in two
            if amp > 0 and ";" not in text[amp:end]:
                end = amp
            parts.append(text[:end])
            text = text[end:]
    return parts or [""]


def unreachable(exc: BaseException) -> bool:
    """Telegram did not answer our request (no connection, a timeout, a 5xx, an HTML page from a proxy): the
    message was not refused and waits for the next try."""
    return isinstance(exc, NetworkError) or (type(exc) is TelegramError and "Invalid server response" in str(exc))


def retry_after_s(exc: RetryAfter) -> float:
    """A 429's wait in seconds (the library returns a number or a timedelta, and warns about the change)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


class Outbox:
    """The queue and its worker. :meth:`put` is called on the loop's thread (a notifier from another thread goes
    through ``loop.call_soon_threadsafe``); :meth:`run` is the worker task; :meth:`close` drains it.

    :meth:`put` only appends to memory; the worker stores what arrived in ``queue`` (in a thread when it is the
    database) and sends the oldest waiting message, one at a time. It sends nothing before :attr:`ready` (the bot
    reached Telegram), so messages made while Telegram is unreachable at start just wait. ``queue_size`` bounds
    the messages waiting (in memory and in the queue); beyond it new ones are dropped and counted."""

    def __init__(self, send: Send, config: TelegramConfig, counters: Counters | None = None,
                 mask: Callable[[str], str] = lambda text: text, clock: Callable[[], float] = time.monotonic,
                 queue: MessageQueue | None = None,
                 now: Callable[[], dtm.datetime] = lambda: dtm.datetime.now(dtm.UTC),
                 reachability: Reachability | None = None) -> None:
        self._send, self.config, self._mask, self._clock, self._now = send, config, mask, clock, now
        #: Says once per outage that Telegram is unreachable, whoever notices first (polling, sending).
        self.reachability = reachability or Reachability(clock)
        self.counters = counters or Counters()
        self.queue: MessageQueue = queue if queue is not None else MemoryQueue()
        self.ready = asyncio.Event()
        self._incoming: deque[Outgoing] = deque()
        self._arrived = asyncio.Event()  # something is in _incoming (or close wants the recorder to finish)
        self._stored = asyncio.Event()  # the queue has something new
        self._waiting = 0  # accepted and not settled: in memory or in the queue
        self._unsettled: dict[int, tuple[str, int, str]] = {}  # settled here, not yet in the queue (a database error)
        self._refused: str | None = None
        self._closed = False
        self._next_for_chat: dict[int, float] = {}
        self._recent: deque[float] = deque()
        self._paused_until = 0.0
        self._dropping = False
        self._unreachable_since: float | None = None
        self._backoff_streak = 0
        self._recorder: asyncio.Task[None] | None = None

    def put(self, chat_id: int, text: str, markup: Any = None, kind: str = "reply") -> None:
        """Queue ``text`` for ``chat_id`` (split if long); never blocks, never raises."""
        parts = split_message(self._mask(text))
        for i, part in enumerate(parts):
            if self._closed:
                self.counters.add("unsent")
                continue
            if self._refused:
                self.counters.add("failed")
                continue
            if self._waiting >= self.config.queue_size:
                self.counters.add("dropped")
                if not self._dropping:
                    LOG.warning("telegram: outbox full (%d messages waiting): new messages are dropped and counted",
                                self._waiting)
                self._dropping = True
                continue
            self._incoming.append(Outgoing(chat_id, part, markup if i == len(parts) - 1 else None, kind))
            self._waiting += 1
            self._arrived.set()
            self.counters.add("queued")

    def refuse(self, reason: str) -> None:
        """Telegram will not take our messages (the token was rejected): new ones are counted as failed; those in
        the queue stay there (a restart with a valid token sends them)."""
        self._refused = reason
        self.ready.set()

    def connected(self) -> None:
        """The bot reached Telegram: sending may start."""
        self._unreachable_since = None
        self.ready.set()

    def unreachable(self) -> None:
        """The bot could not reach Telegram (at start): a stop need not wait for it to connect."""
        if self._unreachable_since is None:
            self._unreachable_since = self._clock()

    @property
    def connecting(self) -> bool:
        """Not connected yet, and no failure to connect either (the bot is still on its first try)."""
        return not self.ready.is_set() and self._unreachable_since is None

    async def until_connected(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` while :attr:`connecting` (a stop right after a start still sends)."""
        deadline = time.monotonic() + timeout_s
        while self.connecting and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @property
    def waiting(self) -> int:
        """Messages accepted and not yet sent (or given up)."""
        return self._waiting

    async def run(self) -> None:
        """The worker: what an earlier run left first, then every new message, in order, forever."""
        try:
            expired = await self._call(self.queue.expire, self.config.chat_ids)
            left = await self._call(self.queue.count)
        except Exception as exc:
            LOG.warning("telegram: cannot read the outbox (%r); messages are kept in memory until it answers", exc)
            expired = left = 0
        if expired:
            self.counters.add("expired", expired)
        if left:
            self._waiting += left
            LOG.info("telegram: %d messages from an earlier run wait to be sent", left)
        self._recorder = asyncio.create_task(self._record(), name="telegram-outbox-recorder")
        try:
            await self._send_waiting()
        finally:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder

    async def close(self, timeout_s: float, worker: asyncio.Task[None] | None = None) -> None:
        """Stop taking messages, send what waits for at most ``timeout_s``; what is left stays in the queue (the
        database: sent at the next start) and is counted as unsent."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if worker is not None and not worker.done():
            if self.ready.is_set() and not self._refused:  # connected: drain; never connected: nothing would go out
                while self._waiting > 0 and loop.time() < deadline and not worker.done():
                    if self.queue.blocking and self._unreachable_since is not None:
                        break  # Telegram is away: what waits is kept for the next start, the stop need not wait
                    await asyncio.sleep(0.02)
            if self._recorder is not None and not self._recorder.done():  # store what is still in memory
                self._arrived.set()
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(self._recorder), max(deadline - loop.time(), 1.0))
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        left = self._waiting
        if left:
            self.counters.add("unsent", left)
            kept = left - len(self._incoming)
            where = "kept in the state database: sent at the next start" if self.queue.blocking and kept else "lost"
            LOG.warning("telegram: %d messages not sent (Telegram unreachable or shutting down): %s", left, where)

    # ------------------------------------------------------------------------------------------ the worker

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args) if self.queue.blocking else function(*args)

    async def _record(self) -> None:
        """Move what :meth:`put` accepted into the queue, in order; on a database error keep it and try again."""
        failing = False
        while True:
            await self._arrived.wait()
            if self._incoming:
                batch = list(self._incoming)
                try:
                    await self._call(self.queue.add, batch)
                except Exception as exc:
                    if not failing:
                        LOG.warning("telegram: cannot store messages in the outbox (%r); they wait in memory", exc)
                    failing = True
                    await asyncio.sleep(1.0)
                    continue
                failing = False
                for _ in batch:
                    self._incoming.popleft()
                self._stored.set()
            if not self._incoming:
                self._arrived.clear()
                if self._closed:
                    return

    async def _send_waiting(self) -> None:
        while True:
            await self.ready.wait()
            if self._refused:
                await asyncio.Event().wait()  # nothing goes out; close() cancels us
            await self._settle_unsettled()
            batch = await self._next_batch()
            if not batch:
                self._stored.clear()
                batch = await self._next_batch()  # again: something may have been stored before the clear
                if not batch:
                    await self._stored.wait()
                    continue
            for message in batch:
                await self._deliver(message)
                if self._refused:
                    break

    async def _next_batch(self) -> list[Waiting]:
        try:
            batch = await self._call(self.queue.waiting, BATCH + len(self._unsettled))
        except Exception as exc:
            LOG.warning("telegram: cannot read the outbox (%r); trying again", exc)
            await asyncio.sleep(1.0)
            return []
        return [m for m in batch if m.id not in self._unsettled][:BATCH]

    async def _deliver(self, message: Waiting) -> None:
        """Send one message until Telegram takes it or refuses it; a network error or a 429 only waits."""
        item, attempts = message.item, message.attempts
        while not self._refused:
            await self._wait_turn(item.chat_id)
            started = self.reachability.now()
            try:
                await self._send(self._dated(message))
            except RetryAfter as exc:
                wait = retry_after_s(exc)
                self.counters.add("rate_limited")
                self._paused_until = self._clock() + wait
                LOG.info("telegram: rate limited (429): waiting %.1f s as asked", wait)
            except InvalidToken as exc:
                LOG.error("telegram: the Bot API rejected TELEGRAM_BOT_TOKEN (%s): no messages until it is fixed; "
                          "the waiting ones are kept", exc)
                self.refuse("token rejected")
                return
            except (BadRequest, Forbidden, ChatMigrated) as exc:
                LOG.warning("telegram: a %s message to chat %s was refused: %s", item.kind, item.chat_id, exc)
                await self._settle(message, "failed", attempts + 1, str(exc))
                return
            except Exception as exc:
                if unreachable(exc):
                    self._wait_for_telegram(exc)
                else:  # an unexpected failure: counts against the message, never stops the worker
                    attempts += 1
                    LOG.warning("telegram: a %s message to chat %s failed (try %d of %d): %r", item.kind, item.chat_id,
                                attempts, self.config.send_attempts, exc)
                    if attempts >= self.config.send_attempts:
                        await self._settle(message, "failed", attempts, repr(exc))
                        return
                    self._back_off()
            else:
                await self._settle(message, "sent", attempts, started=started)
                return
            self.counters.add("retried")

    def _wait_for_telegram(self, exc: BaseException) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = self._clock()
        self.reachability.failed(exc, "sending", f": {self._waiting} messages wait and are sent in order when it "
                                 f"answers{' (kept in the state database)' if self.queue.blocking else ''}")
        self._back_off(self.config.reconnect_max_s)  # tried often enough to go on within seconds of its return

    def _back_off(self, longest: float = MAX_BACKOFF_S) -> None:
        wait = min(self.config.retry_backoff_s * 2 ** self._backoff_streak, longest)
        self._backoff_streak += 1
        self._paused_until = max(self._paused_until, self._clock() + wait)

    async def _settle(self, message: Waiting, status: str, attempts: int, error: str = "",
                      started: float | None = None) -> None:
        self.counters.add(status)
        self._waiting -= 1
        if status == "sent":
            self._dropping = False
            self._backoff_streak = 0
            if self._unreachable_since is not None:
                self._unreachable_since = None
            self.reachability.answered(f"; {self._waiting} messages still wait", started)
        try:
            await self._call(self.queue.settle, message.id, status, attempts, error)
        except Exception as exc:  # never send it again: remember, and write it down later
            LOG.warning("telegram: cannot mark message %d %s in the outbox (%r); trying again later", message.id, status, exc)
            self._unsettled[message.id] = (status, attempts, error)

    async def _settle_unsettled(self) -> None:
        for message_id, (status, attempts, error) in list(self._unsettled.items()):
            try:
                await self._call(self.queue.settle, message_id, status, attempts, error)
            except Exception:
                return
            del self._unsettled[message_id]

    def _dated(self, message: Waiting) -> Outgoing:
        """The message, saying when it was queued if that was long ago (an outage, a restart)."""
        late = (self._now() - message.created).total_seconds()
        if late < LATE_AFTER_S:
            return message.item
        note = f"\n(queued {message.created.astimezone(dtm.UTC):%Y-%m-%d %H:%M} UTC, sent late)"
        text = message.item.text + note
        fits = sum(_utf16_units(c) for c in text) <= MAX_MESSAGE
        return Outgoing(message.item.chat_id, text, message.item.markup, message.item.kind) if fits else message.item

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
