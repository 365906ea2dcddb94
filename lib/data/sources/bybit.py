"""Live candles from Bybit v5 (``GET /v5/market/kline``) through pybit, under one retry policy of our own.

The session and the retry policy are shared with the trading broker (:mod:`.bybit_http`): pybit's own
retries are off, and one policy decides what is retried, how long to wait and what the final, one-line
:class:`~pricelevel.sources.SourceError` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pandas as pd
from pybit.unified_trading import HTTP

from pricelevel.core.candles import CANDLE_COLUMNS, TIMESTAMP, to_canonical
from pricelevel.core.secrets import Secrets
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.config import BybitConfig
from pricelevel.data.sources import SourceError
from pricelevel.data.sources.bybit_http import (
    RATE_LIMIT_RESET_HEADER,
    RATE_LIMIT_RET_CODES,
    SERVER_ERROR_RET_CODES,
    BybitRetry,
    as_utc,
    new_session,
    one_line,
    utc_now,
)

__all__ = ["KLINE_PATH", "RATE_LIMIT_RESET_HEADER", "RATE_LIMIT_RET_CODES", "SERVER_ERROR_RET_CODES", "BybitSource"]

logger = logging.getLogger(__name__)

KLINE_PATH = "/v5/market/kline"
_MS = 1_000_000  # nanoseconds per millisecond


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
        self._now = now or utc_now
        self._retry = BybitRetry(config, self.secrets, now=self._now, sleep=sleep, logger=logger)
        self.session = session if session is not None else self._new_session()

    def _new_session(self) -> HTTP:
        return new_session(
            testnet=self.config.testnet,
            demo=self.config.demo,
            timeout_s=self.config.timeout_s,
            endpoint=self.config.endpoint,
            api_key=self.secrets.get("bybit_api_key"),
            api_secret=self.secrets.get("bybit_api_secret"),
        )

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
        now = as_utc(self._now())
        start = as_utc(start)
        end = now if end is None else as_utc(end)
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
        response = self._retry.call(
            lambda: self.session.get_kline(**params),
            action="fetch",
            where=where,
            error=lambda message, failure: SourceError(message, retryable=failure.retryable),
            reject_hint=f"Bybit rejected the request; check that {symbol} is listed in category {self.config.category}",
        )
        return self._page(response, where, first_ns, last_ns)

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
                    f"bybit: unexpected response for {where}: {one_line(str(exc))}; "
                    "hint: is bybit.endpoint a Bybit v5 API?"
                )
            ) from None

    def _redact(self, text: str) -> str:
        return self._retry.redact(text)


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


def _when(ns: int) -> str:
    return f"{pd.Timestamp(ns, tz='UTC'):%Y-%m-%d %H:%M}"
