"""One way to talk to Bybit v5 through pybit, shared by the candle source and the trading broker.

pybit's own retries are switched off (:func:`new_session`): it sleeps with ``time.sleep`` on rate limits
(untestable), gives up at once on HTTP 403/429/5xx and re-raises timeouts. :class:`BybitRetry` is the one
policy instead: it classifies every failure (:meth:`BybitRetry.describe`), decides what is retried, how long
to wait (exponential backoff, or until Bybit's rate-limit reset when that is later) and what the final,
one-line, redacted error says. A caller may re-judge a failure first (``intercept``): the broker never
resends an order whose request may have reached the exchange.

Two things pybit does not do, both off unless asked for (the candle source uses neither): the session signs
with a clock offset (:attr:`BybitHTTP.time_offset_ms`, Bybit's clock minus ours, for a machine whose clock is
off) and reports every answer's rate-limit headers to a :class:`RequestPacer`, which waits before a request
whose endpoint has almost no quota left instead of running into retCode 10006.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pandas as pd
import requests
from pybit import _helpers as pybit_helpers
from pybit.exceptions import FailedRequestError, InvalidRequestError
from pybit.unified_trading import HTTP
from urllib3.exceptions import NewConnectionError

from pricelevel.core.secrets import Secrets, redact
from pricelevel.data.config import BybitConfig

T = TypeVar("T")

#: retCodes that mean "try again later"; any other non-zero retCode is a request Bybit will never accept.
RATE_LIMIT_RET_CODES = frozenset({10006, 10018, 10429})  # per UID, per IP, system-level frequency protection
SERVER_ERROR_RET_CODES = frozenset({10000, 10016})  # server timeout, server error / restarting
RATE_LIMIT_RESET_HEADER = "X-Bapi-Limit-Reset-Timestamp"
#: Requests left for this endpoint in the current window (Bybit's limits are per UID, per endpoint, per second).
RATE_LIMIT_STATUS_HEADER = "X-Bapi-Limit-Status"
NETWORK_ERRORS = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)
_MS = 1_000_000  # nanoseconds per millisecond

HINT_RATE_LIMIT = "Bybit is rate-limiting this client; wait a minute and rerun, or raise bybit.backoff_s"
HINT_IP_BAN = (
    "HTTP 403 means Bybit banned this IP for at least 10 minutes (too many requests) or serves no API to "
    "its region; wait, then rerun"
)
HINT_UNAVAILABLE = "Bybit (or bybit.endpoint) is unavailable; rerun later, the stored candles are kept"
HINT_NETWORK = "check the network and bybit.endpoint, or raise bybit.timeout_s"
HINT_ENDPOINT = "check bybit.endpoint: it should be a Bybit v5 API base URL"
#: The hints :meth:`BybitRetry.describe` gives, by situation; a caller may word them for its own settings.
DEFAULT_HINTS = MappingProxyType(
    {
        "rate_limit": HINT_RATE_LIMIT,
        "ip_ban": HINT_IP_BAN,
        "unavailable": HINT_UNAVAILABLE,
        "network": HINT_NETWORK,
        "endpoint": HINT_ENDPOINT,
    }
)


@dataclass(frozen=True)
class Failure:
    """One failed request, described for the log and for the final error."""

    description: str
    retryable: bool
    hint: str
    reset_at_ms: int | None = None
    #: Bybit's retCode when it answered with one (HTTP 200), else ``None``.
    ret_code: int | None = None
    #: The request may have reached Bybit and been acted on: a timeout or a connection lost after sending,
    #: HTTP 5xx, an undecodable body, retCode 10000/10016. Harmless for a read, decisive for an order.
    maybe_processed: bool = False
    #: No HTTP answer at all (timeout, connection failure), as opposed to an answer we did not like.
    network: bool = False


class RequestPacer:
    """Slows requests down before Bybit's rate limit refuses one (retCode 10006).

    Every answer carries ``X-Bapi-Limit-Status`` (requests left for that endpoint) and
    ``X-Bapi-Limit-Reset-Timestamp`` (when the limit resets once exceeded, else the answer's time). When an
    endpoint has ``reserve`` requests or fewer left, the next request to it waits until the reset when Bybit
    gives one in the future, else one ``window_s`` after that answer (Bybit's windows are rolling seconds), at
    most ``max_wait_s``. A refusal (10006, HTTP 429) is not noted here: :class:`BybitRetry` waits for its reset.
    ``now``/``sleep`` are injectable; ``offset_ms`` gives Bybit's clock minus ours (the reset is Bybit's time).
    """

    def __init__(
        self,
        *,
        now: Callable[[], pd.Timestamp],
        sleep: Callable[[float], None],
        offset_ms: Callable[[], int] = lambda: 0,
        reserve: int = 2,
        window_s: float = 1.0,
        max_wait_s: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self._now, self._sleep, self._offset_ms = now, sleep, offset_ms
        self.reserve, self.window_s, self.max_wait_s = reserve, window_s, max_wait_s
        self._logger = logger
        self._lock = threading.Lock()
        #: endpoint path -> (requests left, local ms until which to wait when low)
        self._quota: dict[str, tuple[int, int]] = {}
        #: Seconds waited so far, for tests and the log.
        self.waited_s = 0.0

    def observe(self, url: str, headers: Mapping[str, str] | None) -> None:
        """Note the quota an answer reports (no headers: nothing known, nothing changes)."""
        try:
            left = int(headers[RATE_LIMIT_STATUS_HEADER]) if headers else None
        except (KeyError, TypeError, ValueError):
            left = None
        if left is None:
            return
        now_ms = self._now_ms()
        reset = reset_at_ms(headers)
        reset = reset - self._offset_ms() if reset is not None else None  # on our clock
        until = reset if reset is not None and reset > now_ms else now_ms + round(self.window_s * 1000)
        with self._lock:
            self._quota[_endpoint(url)] = (left, until)

    def before(self, url: str) -> None:
        """Wait, if the last answer from this endpoint left ``reserve`` requests or fewer."""
        path = _endpoint(url)
        with self._lock:
            left, until = self._quota.get(path, (self.reserve + 1, 0))
            if left > self.reserve:
                return
            self._quota.pop(path, None)  # after the wait the window has reset
        wait = min((until - self._now_ms()) / 1000, self.max_wait_s)
        if wait <= 0:
            return
        if self._logger is not None:
            self._logger.info(f"bybit: {left} request(s) left on {path}; waiting {wait:.2f} s for the rate limit")
        self.waited_s += wait
        self._sleep(wait)

    def _now_ms(self) -> int:
        return as_utc(self._now()).value // _MS


class BybitHTTP(HTTP):
    """pybit's session, signing with Bybit's clock (``time_offset_ms``) and reporting rate-limit headers.

    pybit takes the signing time from its ``_helpers.generate_timestamp`` inside ``_prepare_headers`` and has
    no offset setting, so that one method is replaced (same headers, same signature); ``recv_window`` is
    pybit's own attribute. Pinned pybit version: these are its internals.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        #: Bybit's clock minus ours, in milliseconds, added to every signed timestamp.
        self.time_offset_ms = 0
        self.pacer: RequestPacer | None = None

    def _prepare_headers(self, payload, recv_window, content_type="application/json"):  # type: ignore[no-untyped-def]
        timestamp = pybit_helpers.generate_timestamp() + self.time_offset_ms
        sign = self._auth_binary if isinstance(payload, bytes) else self._auth
        signature = sign(payload=payload, recv_window=recv_window, timestamp=timestamp)
        return {
            "Content-Type": content_type,
            "X-BAPI-API-KEY": self.api_key,
            "X-BAPI-SIGN": signature,
            "X-BAPI-SIGN-TYPE": "2",
            "X-BAPI-TIMESTAMP": str(timestamp),
            "X-BAPI-RECV-WINDOW": str(recv_window),
        }

    def _submit_request(self, method=None, path=None, query=None, auth=False):  # type: ignore[no-untyped-def]
        if self.pacer is not None and path:
            self.pacer.before(path)
        return super()._submit_request(method=method, path=path, query=query, auth=auth)

    def _check_status_code(self, response, method, path, params):  # type: ignore[no-untyped-def]
        if self.pacer is not None and not _rate_limited(response):  # every answer passes here first
            self.pacer.observe(str(path), response.headers)
        return super()._check_status_code(response, method, path, params)


def _rate_limited(response: requests.Response) -> bool:
    """HTTP 403/429, or retCode 10006/10018/10429: a refusal, which the retry policy waits out."""
    if response.status_code in (403, 429):
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, Mapping) and body.get("retCode") in RATE_LIMIT_RET_CODES


def _endpoint(url: str) -> str:
    return urlsplit(url).path or url


def new_session(
    *,
    testnet: bool,
    demo: bool,
    timeout_s: float,
    endpoint: str | None,
    api_key: str | None,
    api_secret: str | None,
    pacer: RequestPacer | None = None,
) -> BybitHTTP:
    """A pybit session that makes exactly one attempt per call, so that :class:`BybitRetry` owns retries;
    ``pacer`` (the broker's) waits before a request that would exceed the rate limit."""
    session = BybitHTTP(
        testnet=testnet,
        demo=demo,
        timeout=timeout_s,
        api_key=api_key,
        api_secret=api_secret,
        max_retries=1,  # one attempt per call: our loop retries
        retry_delay=0,
        force_retry=False,  # timeouts and undecodable bodies are raised to us, not slept on
        log_requests=False,  # pybit would log the signed headers
    )
    # pybit fills an empty retry_codes with {10006, ...} at construction and would then sleep on those
    # itself; emptied afterwards, every non-zero retCode reaches us as InvalidRequestError.
    session.retry_codes = set()
    session.pacer = pacer
    if endpoint:
        session.endpoint = endpoint
    return session


class BybitRetry:
    """The retry policy for every Bybit call: ``config`` gives attempts, backoff and the timeout.

    ``now`` and ``sleep`` are injectable so that tests control the clock and the backoff without waiting;
    every text that leaves (log records, errors) is redacted with ``secrets``. ``hints`` replaces some of
    :data:`DEFAULT_HINTS` (the trader's settings are not the ingest's).
    """

    def __init__(
        self,
        config: BybitConfig,
        secrets: Secrets | None,
        *,
        now: Callable[[], pd.Timestamp],
        sleep: Callable[[float], None] = time.sleep,
        logger: logging.Logger,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.hints = {**DEFAULT_HINTS, **(hints or {})}
        self.secrets = secrets or Secrets()
        self._now = now
        self._sleep = sleep
        self._logger = logger

    def call(
        self,
        request: Callable[[], T],
        *,
        action: str,
        where: str,
        error: Callable[[str, Failure], Exception],
        reject_hint: str,
        intercept: Callable[[Failure], Failure] | None = None,
    ) -> T:
        """``request()`` under the policy; the final failure becomes ``error(one_line_message, failure)``.

        ``intercept`` sees each failure before the policy acts on it and returns the failure to act on
        (e.g. made non-retryable); it may also raise to end the call its own way.
        """
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return request()
            except (FailedRequestError, InvalidRequestError, *NETWORK_ERRORS) as exc:
                failure = self.describe(exc, reject_hint)
            if intercept is not None:
                failure = intercept(failure)
            if not failure.retryable or attempt == attempts:
                if failure.retryable:
                    tried = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                elif failure.maybe_processed:
                    tried = "(not resent: its outcome is unknown)"
                else:
                    tried = "(not retryable)"
                # Raised outside the `except`: pybit's exception text (request line, headers) stays out of
                # logs and tracebacks.
                message = f"bybit: could not {action} {where} {tried}: {failure.description}; hint: {failure.hint}"
                raise error(self.redact(message), failure) from None
            delay = self.delay(attempt, failure)
            self._logger.warning(
                self.redact(f"bybit: {where}: {failure.description}; retry {attempt + 1}/{attempts} in {delay:.1f} s")
            )
            self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def delay(self, attempt: int, failure: Failure) -> float:
        """``backoff_s * 2**(attempt-1)``, or longer if Bybit says when the rate limit resets; capped."""
        delay = self.config.backoff_s * 2 ** (attempt - 1)
        if failure.reset_at_ms is not None:
            now_ms = as_utc(self._now()).value // _MS
            delay = max(delay, (failure.reset_at_ms - now_ms) / 1000)
        return min(delay, self.config.backoff_max_s)

    def describe(self, exc: Exception, reject_hint: str) -> Failure:
        """What went wrong, whether to retry, and whether Bybit may have acted on the request."""
        hints = self.hints
        if isinstance(exc, InvalidRequestError):  # HTTP 200 carrying a non-zero retCode
            code = exc.status_code
            text = f"retCode {code} {one_line(str(exc.message))}"
            if code in RATE_LIMIT_RET_CODES:
                return Failure(text, True, hints["rate_limit"], reset_at_ms(exc.resp_headers), ret_code=code)
            if code in SERVER_ERROR_RET_CODES:
                return Failure(text, True, hints["unavailable"], ret_code=code, maybe_processed=True)
            return Failure(text, False, reject_hint, ret_code=code)
        if isinstance(exc, FailedRequestError):
            status = exc.status_code
            # pybit's marker for a body that is not JSON (truncated, an HTML page from a proxy)
            if exc.request == "JSON decoding":
                return Failure("malformed response body (not JSON)", True, hints["unavailable"], maybe_processed=True)
            if status == 403:
                return Failure("HTTP 403 (IP rate limit or region block)", True, hints["ip_ban"])
            if status == 429:
                return Failure(
                    "HTTP 429 (too many requests)", True, hints["rate_limit"], reset_at_ms(exc.resp_headers)
                )
            if status >= 500:
                return Failure(f"HTTP {status} (server error)", True, hints["unavailable"], maybe_processed=True)
            return Failure(f"HTTP {status}", False, hints["endpoint"])
        sent = _may_have_been_sent(exc)
        if isinstance(exc, requests.exceptions.Timeout):
            return Failure(
                f"timed out after {self.config.timeout_s:g} s ({one_line(str(exc))})",
                True,
                hints["network"],
                maybe_processed=sent,
                network=True,
            )
        return Failure(
            f"connection failed: {type(exc).__name__} ({one_line(str(exc))})",
            True,
            hints["network"],
            maybe_processed=sent,
            network=True,
        )

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)


def _may_have_been_sent(exc: Exception) -> bool:
    """False only when the connection was never made (refused, or timed out while connecting)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return False
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return not isinstance(reason, NewConnectionError)


def reset_at_ms(headers: Mapping[str, str] | None) -> int | None:
    try:
        return int(headers[RATE_LIMIT_RESET_HEADER]) if headers else None
    except (KeyError, TypeError, ValueError):
        return None


def as_utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")


def utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
