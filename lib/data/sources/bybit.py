"""Live candles from Bybit v5 (``GET /v5/market/kline``) through pybit, under one retry policy of our own.

pybit's own retries are switched off: it sleeps with ``time.sleep`` on rate limits (untestable), gives up
at once on HTTP 403/429/5xx and re-raises timeouts. Here one policy decides what is retried, how long to
wait (exponential backoff, or until Bybit's rate-limit reset when that is later) and what the final,
one-line :class:`~pricelevel.sources.SourceError` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import requests
from pybit.exceptions import FailedRequestError, InvalidRequestError
from pybit.unified_trading import HTTP

from pricelevel.core.candles import CANDLE_COLUMNS, TIMESTAMP, to_canonical
from pricelevel.core.secrets import Secrets, redact
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import BybitConfig
from pricelevel.data.sources import SourceError

logger = logging.getLogger(__name__)

KLINE_PATH = "/v5/market/kline"
#: retCodes that mean "try again later"; any other non-zero retCode is a request Bybit will never accept.
RATE_LIMIT_RET_CODES = frozenset({10006, 10018, 10429})  # per UID, per IP, system-level frequency protection
SERVER_ERROR_RET_CODES = frozenset({10000, 10016})  # server timeout, server error / restarting
RATE_LIMIT_RESET_HEADER = "X-Bapi-Limit-Reset-Timestamp"
_NETWORK_ERRORS = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
)
_MS = 1_000_000  # nanoseconds per millisecond

_HINT_RATE_LIMIT = "Bybit is rate-limiting this client; wait a minute and rerun, or raise bybit.backoff_s"
_HINT_IP_BAN = (
    "HTTP 403 means Bybit banned this IP for at least 10 minutes (too many requests) or serves no API to "
    "its region; wait, then rerun"
)
_HINT_UNAVAILABLE = "Bybit (or bybit.endpoint) is unavailable; rerun later, the stored candles are kept"
_HINT_NETWORK = "check the network and bybit.endpoint, or raise bybit.timeout_s"


@dataclass(frozen=True)
class _Failure:
    """One failed request, described for the log and for the final error."""

    description: str
    retryable: bool
    hint: str
    reset_at_ms: int | None = None


def _utc_now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC")


class BybitSource:
    """Closed Bybit candles in forward pages of ``config.page_limit``, each page yielded as it arrives.

    Paging forward (oldest window first) makes whatever was yielded before a failure a gap-free prefix of
    the range, which the caller stores before the error propagates; the next run resumes after it.
    ``now`` and ``sleep`` are injectable so that tests control the clock and the backoff without waiting.
    An injected ``session`` is used as is (no endpoint override, no retry settings).
    """

    name = "bybit"

    def __init__(
        self,
        config: BybitConfig,
        secrets: Secrets | None = None,
        *,
        now: Callable[[], pd.Timestamp] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        session: HTTP | None = None,
    ) -> None:
        self.config = config
        self.secrets = secrets or Secrets()
        self._now = now or _utc_now
        self._sleep = sleep
        self.session = session if session is not None else self._new_session()

    def _new_session(self) -> HTTP:
        session = HTTP(
            testnet=self.config.testnet,
            demo=self.config.demo,
            timeout=self.config.timeout_s,
            api_key=self.secrets.get("bybit_api_key"),
            api_secret=self.secrets.get("bybit_api_secret"),
            max_retries=1,  # one attempt per call: our loop retries
            retry_delay=0,
            force_retry=False,  # timeouts and undecodable bodies are raised to us, not slept on
            log_requests=False,
        )
        # pybit fills an empty retry_codes with {10006, ...} at construction and would then sleep on those
        # itself; emptied afterwards, every non-zero retCode reaches us as InvalidRequestError.
        session.retry_codes = set()
        if self.config.endpoint:
            session.endpoint = self.config.endpoint
        return session

    # ------------------------------------------------------------------------------------------- paging

    def fetch(
        self,
        symbol: str,
        timeframe: Timeframe | str,
        start: pd.Timestamp,
        end: pd.Timestamp | None,
    ) -> Iterator[pd.DataFrame]:
        """Yield pages of closed candles with open time in ``[start, end)``, oldest first, never empty.

        ``end=None`` means "up to now". Windows are aligned to the candle grid, so each request asks for
        at most ``page_limit`` candles and Bybit's newest-first truncation never drops any.
        """
        tf = Timeframe(timeframe)
        step = tf.nanoseconds
        now = _as_utc(self._now())
        start = _as_utc(start)
        end = now if end is None else _as_utc(end)
        first_open = -(-start.value // step) * step
        # The last candle wanted opens before `end` and has closed by `now` (open + step <= now).
        last_open = min((end.value - 1) // step * step, now.value // step * step - step)
        span = step * self.config.page_limit
        for window_start in range(first_open, last_open + 1, span):
            window_end = min(window_start + span - step, last_open)
            page = self._request_window(symbol, tf, window_start, window_end)
            if len(page):
                yield page

    def _request_window(self, symbol: str, tf: Timeframe, first_ns: int, last_ns: int) -> pd.DataFrame:
        params = {
            "category": self.config.category,
            "symbol": symbol,
            "interval": tf.bybit_interval,
            "start": first_ns // _MS,
            "end": last_ns // _MS,  # inclusive in Bybit
            "limit": self.config.page_limit,
        }
        where = (
            f"{self.config.category} {symbol} {tf} candles {_when(first_ns)}..{_when(last_ns)} UTC "
            f"from {getattr(self.session, 'endpoint', '?')}{KLINE_PATH}"
        )
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                response = self.session.get_kline(**params)
            except (FailedRequestError, InvalidRequestError, *_NETWORK_ERRORS) as exc:
                failure = self._describe(exc, symbol)
            else:
                return self._page(response, where, first_ns, last_ns)
            if not failure.retryable or attempt == attempts:
                tried = (
                    f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                    if failure.retryable
                    else "(not retryable)"
                )
                # `from None`: pybit's exception text (request line, headers) stays out of logs and tracebacks.
                raise SourceError(
                    self._redact(
                        f"bybit: could not fetch {where} {tried}: {failure.description}; hint: {failure.hint}"
                    )
                ) from None
            delay = self._delay(attempt, failure)
            logger.warning(
                self._redact(
                    f"bybit: {where}: {failure.description}; retry {attempt + 1}/{attempts} in {delay:.1f} s"
                )
            )
            self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    # --------------------------------------------------------------------------------------- retry policy

    def _delay(self, attempt: int, failure: _Failure) -> float:
        """``backoff_s * 2**(attempt-1)``, or longer if Bybit says when the rate limit resets; capped."""
        delay = self.config.backoff_s * 2 ** (attempt - 1)
        if failure.reset_at_ms is not None:
            now_ms = _as_utc(self._now()).value // _MS
            delay = max(delay, (failure.reset_at_ms - now_ms) / 1000)
        return min(delay, self.config.backoff_max_s)

    def _describe(self, exc: Exception, symbol: str) -> _Failure:
        if isinstance(exc, InvalidRequestError):  # HTTP 200 carrying a non-zero retCode
            text = f"retCode {exc.status_code} {_one_line(str(exc.message))}"
            if exc.status_code in RATE_LIMIT_RET_CODES:
                return _Failure(text, True, _HINT_RATE_LIMIT, _reset_at_ms(exc.resp_headers))
            if exc.status_code in SERVER_ERROR_RET_CODES:
                return _Failure(text, True, _HINT_UNAVAILABLE)
            hint = f"Bybit rejected the request; check that {symbol} is listed in category {self.config.category}"
            return _Failure(text, False, hint)
        if isinstance(exc, FailedRequestError):
            status = exc.status_code
            # pybit's marker for a body that is not JSON (truncated, an HTML page from a proxy)
            if exc.request == "JSON decoding":
                return _Failure("malformed response body (not JSON)", True, _HINT_UNAVAILABLE)
            if status == 403:
                return _Failure("HTTP 403 (IP rate limit or region block)", True, _HINT_IP_BAN)
            if status == 429:
                return _Failure(
                    "HTTP 429 (too many requests)", True, _HINT_RATE_LIMIT, _reset_at_ms(exc.resp_headers)
                )
            if status >= 500:
                return _Failure(f"HTTP {status} (server error)", True, _HINT_UNAVAILABLE)
            return _Failure(
                f"HTTP {status}", False, "check bybit.endpoint: it should be a Bybit v5 API base URL"
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return _Failure(
                f"timed out after {self.config.timeout_s:g} s ({_one_line(str(exc))})", True, _HINT_NETWORK
            )
        return _Failure(
            f"connection failed: {type(exc).__name__} ({_one_line(str(exc))})", True, _HINT_NETWORK
        )

    def _page(self, response: Any, where: str, first_ns: int, last_ns: int) -> pd.DataFrame:
        """The canonical page in a successful response; a malformed one is a contract break, not retried."""
        result = response.get("result") if isinstance(response, Mapping) else None
        rows = result.get("list") if isinstance(result, Mapping) else None
        try:
            if not isinstance(rows, list):
                raise ValueError(f"no result.list in {response}")
            return _to_page(rows, first_ns, last_ns)
        except (TypeError, ValueError, KeyError) as exc:
            raise SourceError(
                self._redact(
                    f"bybit: unexpected response for {where}: {_one_line(str(exc))}; "
                    "hint: is bybit.endpoint a Bybit v5 API?"
                )
            ) from None

    def _redact(self, text: str) -> str:
        return redact(text, self.secrets)


# ------------------------------------------------------------------------------------------------ helpers


def _to_page(rows: list[Any], first_ns: int, last_ns: int) -> pd.DataFrame:
    """Canonical page of the rows that open inside the requested window (raises ValueError on bad rows).

    Bybit rows are ``[startTime ms, open, high, low, close, volume, turnover]`` as strings, newest first.
    The window already lies inside ``[start, end)`` and before the open candle, so keeping only rows
    inside it also drops whatever a server returns outside the range and the still-open candle.
    """
    frame = pd.DataFrame([row[: len(CANDLE_COLUMNS)] for row in reversed(rows)], columns=list(CANDLE_COLUMNS))
    open_ns = frame[TIMESTAMP].astype("int64") * _MS
    frame[TIMESTAMP] = pd.to_datetime(open_ns, utc=True)
    return to_canonical(frame.loc[(open_ns >= first_ns) & (open_ns <= last_ns)])


def _reset_at_ms(headers: Mapping[str, str] | None) -> int | None:
    try:
        return int(headers[RATE_LIMIT_RESET_HEADER]) if headers else None
    except (KeyError, TypeError, ValueError):
        return None


def _as_utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")


def _when(ns: int) -> str:
    return f"{pd.Timestamp(ns, tz='UTC'):%Y-%m-%d %H:%M}"


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
