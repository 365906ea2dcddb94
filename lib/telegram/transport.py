"""The HTTP side of the bot: requests that keep Telegram's outages quiet and short.

* A proxy's HTML error page (nginx's "502 Bad Gateway") is not the Bot API's JSON: python-telegram-bot logs an
  ERROR with a traceback for each such answer before raising. :class:`QuietRequest` parses without that log; the
  failure is still raised (a ``NetworkError`` the outbox waits out) and said once, in one line (:func:`describe`).
* The library's polling loop waits up to 30 s after a failed ``getUpdates`` (growing 1.5 times per failure), so
  commands sent just after an outage waited about 15 s. It retries at once after a timeout, so
  :class:`PollingRequest` waits its own short, capped backoff (at most ``reconnect_max_s``) and reports the
  failure as a timeout: polling resumes within that many seconds of Telegram coming back.
* :class:`Reachability` says once that Telegram is unreachable (one WARNING line, whoever noticed: the outbox,
  polling or the start-up) and once that it answers again (INFO), however many requests fail in between.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from telegram.error import NetworkError, TelegramError, TimedOut
from telegram.request import HTTPXRequest

LOG = logging.getLogger("pricelevel.telegram")
_STATUS = re.compile(r"^(?P<phrase>[A-Za-z ]+) \((?P<code>\d{3})\)\. Parsing the server response")


def describe(exc: BaseException) -> str:
    """One short line for a failed request: ``HTTP 502 Bad Gateway (an HTML page, not the Bot API)`` rather
    than the library's message with the whole page in it."""
    text = str(exc)
    found = _STATUS.match(text)
    if found:
        return f"HTTP {found['code']} {found['phrase']} (an HTML page, not the Bot API)"
    if "Invalid server response" in text:
        return "an answer that is not the Bot API's JSON"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 200 else first[:200] + "..."


def status_text(code: int, payload: bytes) -> str:
    """``HTTP 502 Bad Gateway (an HTML page, not the Bot API)``: what an error answer was, in a few words."""
    try:
        phrase = f" {HTTPStatus(code).phrase}"
    except ValueError:
        phrase = ""
    html = payload.lstrip()[:1] == b"<"
    return f"HTTP {code}{phrase}{' (an HTML page, not the Bot API)' if html else ''}"


class Reachability:
    """Whether Telegram answers, said once per outage (see the module docstring); safe from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.down_since: float | None = None

    def failed(self, exc: BaseException, what: str, detail: str = "") -> bool:
        """Note a request that did not reach Telegram; True when this started an outage (and was logged)."""
        with self._lock:
            first = self.down_since is None
            if first:
                self.down_since = self._clock()
        if first:
            LOG.warning("telegram: cannot reach the Bot API (%s: %s)%s", what, describe(exc), detail)
        else:
            LOG.debug("telegram: still unreachable (%s: %s)", what, describe(exc))
        return first

    def answered(self, detail: str = "", started: float | None = None) -> None:
        """A request answered; ``started``: when it was sent (one sent before the outage began proves nothing)."""
        with self._lock:
            since = self.down_since
            if since is not None and started is not None and started < since:
                return
            self.down_since = None
        if since is not None:
            LOG.info("telegram: the Bot API answers again after %.0f s%s", self._clock() - since, detail)

    def now(self) -> float:
        return self._clock()

    @property
    def down(self) -> bool:
        return self.down_since is not None


class QuietRequest(HTTPXRequest):
    """``HTTPXRequest`` whose JSON parsing fails without logging a traceback (an HTML error page is an outage,
    reported once by :class:`Reachability`, not an error per request)."""

    @staticmethod
    def parse_json_payload(payload: bytes) -> dict[str, Any]:
        try:
            return json.loads(payload.decode("utf-8", "replace"))
        except ValueError as exc:
            raise TelegramError("Invalid server response") from exc


class PollingRequest(QuietRequest):
    """The ``getUpdates`` request: on a failure that is not a timeout (no connection, a 5xx, an HTML page) it
    notes the outage, waits a short doubling backoff capped at ``reconnect_max_s`` and raises ``TimedOut``, which
    the library's polling loop retries at once (its own backoff grows to 30 s)."""

    def __init__(self, reachability: Reachability, reconnect_max_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reachability, self.reconnect_max_s = reachability, reconnect_max_s
        self._streak = 0

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        started = self.reachability.now()
        try:
            code, payload = await super().do_request(*args, **kwargs)
        except TimedOut:
            raise
        except NetworkError as exc:
            await self._pause(exc)
            raise TimedOut(f"polling: {describe(exc)}") from exc
        if code >= 500 or (code >= 300 and not payload.lstrip().startswith(b"{")):
            failure = NetworkError(status_text(code, payload))
            await self._pause(failure)
            raise TimedOut(f"polling: {failure}")
        self._streak = 0
        if 200 <= code < 300:
            self.reachability.answered(started=started)
        return code, payload

    async def _pause(self, exc: BaseException) -> None:
        self.reachability.failed(exc, "polling for commands")
        wait = min(0.25 * 2 ** self._streak, self.reconnect_max_s)
        self._streak += 1
        await asyncio.sleep(wait)
