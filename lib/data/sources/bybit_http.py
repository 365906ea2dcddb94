"""One way to talk to Bybit v5 through pybit, shared by the candle source and the trading broker.

pybit's own retries are switched off (:func:`new_session`): it sleeps with ``time.sleep`` on rate limits
(untestable), gives up at once on HTTP 403/429/5xx and re-raises timeouts. :class:`BybitRetry` is the one
policy instead: it classifies every failure (:meth:`BybitRetry.describe`), decides what is retried, how long
to wait (exponential backoff, or until Bybit's rate-limit reset when that is later) and what the final,
one-line, redacted error says. A caller may re-judge a failure first (``intercept``): the broker never
resends an order whose request may have reached the exchange.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import pandas as pd
import requests
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


def new_session(
    *,
    testnet: bool,
    demo: bool,
    timeout_s: float,
    endpoint: str | None,
    api_key: str | None,
    api_secret: str | None,
) -> HTTP:
    """A pybit session that makes exactly one attempt per call, so that :class:`BybitRetry` owns retries."""
    session = HTTP(
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
