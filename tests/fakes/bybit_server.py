"""A fake Bybit v5 ``GET /v5/market/kline``: for tests (pytest-httpserver) and offline end-to-end runs.

It answers like the real API: rows newest first with every value a string, ``start``/``end`` inclusive in
milliseconds, the *newest* ``limit`` rows when more match (default 200, at most 1000), retCode 10001 for an
unknown symbol, and only candles that have opened by the fake's ``now`` (the still-open one included, as
Bybit does). It misbehaves on demand: each request consumes one queued :class:`Fault`; :meth:`FakeBybit.set_outage`
answers every kline request with an HTTP status (503: a maintenance window) until lifted; and
:meth:`FakeBybit.serve_bad_candle` serves one candle wrong (by default ``high < low``) until
:meth:`FakeBybit.correct_candle`, as an exchange that publishes a bad candle and corrects it later.

Standalone (binds 127.0.0.1 only)::

    python -m tests.fakes.bybit_server --port 8765 --data data/sample [--fault-every N]

then point the pipeline at it with ``--set bybit.endpoint=http://127.0.0.1:8765``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from pricelevel.core.candles import CANDLE_COLUMNS, TIMESTAMP, to_canonical
from pricelevel.core.timeframes import Timeframe

KLINE_PATH = "/v5/market/kline"
#: A client timeout for tests that are not about timeouts: pytest-httpserver serves one request at a time, and on a loaded
#: 2-core CI machine it has gone unscheduled for seconds (a 1 s timeout then read as an outage, and flaked a test).
SLOW_MACHINE_TIMEOUT_S = 10.0
CATEGORIES = ("spot", "linear", "inverse")
TIMEFRAME_BY_INTERVAL = {tf.bybit_interval: tf for tf in Timeframe}
DEFAULT_LIMIT, MAX_LIMIT = 200, 1000
_MS = 1_000_000


@dataclass(frozen=True)
class Fault:
    """One misbehaviour, served instead of (or, for ``slow``, before) a normal answer."""

    kind: str  # "rate_limit" | "http" | "slow" | "malformed" | "api_error"
    status: int = 200
    ret_code: int = 0
    message: str = ""
    seconds: float = 0.0

    @classmethod
    def rate_limit(cls, reset_after_s: float = 0.0) -> Fault:
        """retCode 10006 on HTTP 200, with the limit headers; the limit resets ``reset_after_s`` from now."""
        return cls("rate_limit", ret_code=10006, message="Too many visits!", seconds=reset_after_s)

    @classmethod
    def http(cls, status: int) -> Fault:
        return cls("http", status=status)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Answer correctly but only after ``seconds``: longer than the client's timeout, it is a timeout."""
        return cls("slow", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        """A truncated JSON body, as a dropped connection behind a proxy produces."""
        return cls("malformed")

    @classmethod
    def api_error(cls, ret_code: int, message: str) -> Fault:
        return cls("api_error", ret_code=ret_code, message=message)


#: What ``--fault-every`` cycles through: every kind a client must survive with the default timeout.
FAULT_CYCLE = (
    Fault.rate_limit(0.2),
    Fault.http(403),
    Fault.http(429),
    Fault.http(500),
    Fault.http(502),
    Fault.http(503),
    Fault.malformed(),
)


class FakeBybit:
    """Candles per (category, symbol, interval), served like Bybit v5; records every request's params.

    ``ignore_time_range`` makes it a sloppy server that ignores ``start``/``end`` (``limit`` still holds),
    to prove that the client itself keeps only the range it asked for.
    """

    def __init__(self, *, now: Callable[[], pd.Timestamp] | None = None, fault_every: int = 0) -> None:
        self.now = now or (lambda: pd.Timestamp.now(tz="UTC"))
        self.fault_every = fault_every
        self.ignore_time_range = False
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, str]] = []
        self._candles: dict[tuple[str, str, str], pd.DataFrame] = {}
        #: Candles served instead of the true ones: (category, symbol, interval) -> open ms -> column values.
        self._bad: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
        self._outage: tuple[int, pd.Timestamp | None] | None = None
        self._lock = threading.Lock()

    def add(
        self, symbol: str, timeframe: Timeframe | str, candles: pd.DataFrame, *, category: str = "spot"
    ) -> None:
        self._candles[(category, symbol, Timeframe(timeframe).bybit_interval)] = to_canonical(candles)

    def shift_to_now(self) -> pd.Timedelta:
        """Move every candle by the whole days that put the newest day's candles at today's (UTC) date."""
        newest = max(frame[TIMESTAMP].max() for frame in self._candles.values())
        delta = pd.Timestamp(self.now()).floor("1D") - newest.floor("1D")
        for key, frame in self._candles.items():
            self._candles[key] = frame.assign(**{TIMESTAMP: frame[TIMESTAMP] + delta})
        return delta

    def latest_open(self, symbol: str, category: str = "spot") -> float | None:
        """The open of the newest candle that has opened, on the finest timeframe served for ``symbol``."""
        served = [f for (c, s, _), f in self._candles.items() if c == category and s == symbol and len(f) > 1]
        if not served:
            return None
        frames = sorted(served, key=lambda f: f[TIMESTAMP].diff().median())
        frame = frames[0]
        opened = frame[frame[TIMESTAMP] <= pd.Timestamp(self.now())]
        return float(opened["open"].iloc[-1]) if len(opened) else None

    @property
    def datasets(self) -> list[tuple[str, str, str]]:
        """(category, symbol, interval) of every series served."""
        return sorted(self._candles)

    def fail_next(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def set_outage(self, status: int | None = 503, *, until: pd.Timestamp | str | None = None) -> None:
        """From now on every kline request answers HTTP ``status`` (a maintenance window: 503), until
        ``until`` on the fake's clock or until ``set_outage(None)``. The candles behind it keep coming."""
        if status is None:
            self._outage = None
            return
        end = pd.Timestamp(until) if until is not None else None
        if end is not None and end.tz is None:
            end = end.tz_localize("UTC")
        self._outage = (int(status), end)

    @property
    def outage(self) -> int | None:
        """The HTTP status every kline request answers now, or ``None``."""
        if self._outage is None:
            return None
        status, end = self._outage
        if end is not None and pd.Timestamp(self.now()) >= end:
            self._outage = None
            return None
        return status

    def serve_bad_candle(
        self, symbol: str, timeframe: Timeframe | str, at: pd.Timestamp | str, *, category: str = "spot",
        **values: float,
    ) -> dict[str, float]:
        """Serve the candle opening at ``at`` with ``values`` instead (default: high and low swapped, so
        ``high < low``) until :meth:`correct_candle`; returns the values served."""
        key = (category, symbol, Timeframe(timeframe).bybit_interval)
        stamp = _utc(at)
        frame = self._candles[key]
        true = frame.loc[frame[TIMESTAMP] == stamp]
        if true.empty:
            raise KeyError(f"no {symbol} {timeframe} candle opens at {stamp}")
        row = true.iloc[0]
        if not values:
            values = {"high": float(row["low"]), "low": float(row["high"])}
        self._bad.setdefault(key, {})[stamp.value // _MS] = dict(values)
        return dict(values)

    def correct_candle(
        self, symbol: str, timeframe: Timeframe | str, at: pd.Timestamp | str, *, category: str = "spot"
    ) -> None:
        """Serve the true candle at ``at`` again (the exchange corrected it)."""
        self._bad.get((category, symbol, Timeframe(timeframe).bybit_interval), {}).pop(_utc(at).value // _MS, None)

    @classmethod
    def from_folder(cls, folder: Path, categories: Iterable[str] = ("spot", "linear"), **kwargs) -> FakeBybit:
        """Serve every ``SYMBOL_TF.parquet`` of ``folder`` (the layout of ``data/sample``) in each category."""
        fake = cls(**kwargs)
        for path in sorted(Path(folder).glob("*_*.parquet")):
            symbol, _, tf = path.stem.rpartition("_")
            if tf in {t.value for t in Timeframe}:
                candles = pd.read_parquet(path)
                for category in categories:
                    fake.add(symbol, tf, candles, category=category)
        return fake

    # ------------------------------------------------------------------------------------------ serving

    def handle(self, request: Request) -> Response:
        """The ``/v5/market/kline`` handler (pytest-httpserver's ``respond_with_handler`` signature)."""
        params = dict(request.args.items())
        outage = self.outage
        with self._lock:
            self.requests.append(params)
            fault = None if outage is not None else self._next_fault()  # an outage keeps queued faults for later
        if outage is not None:
            page = f"<html><body><h1>{outage} {HTTP_STATUS_CODES.get(outage, 'error')}</h1></body></html>"
            return Response(page, status=outage, mimetype="text/html")
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.seconds)
        elif fault is not None:
            return self._fault_response(fault)
        return self._klines(params)

    def wsgi_app(self, environ, start_response):
        """WSGI entry point for the standalone server: the kline route, 404 elsewhere."""
        request = Request(environ)
        response = self.handle(request) if request.path == KLINE_PATH else Response("Not Found", status=404)
        return response(environ, start_response)

    def _next_fault(self) -> Fault | None:
        if self.faults:
            return self.faults.popleft()
        count = len(self.requests)
        if self.fault_every and count % self.fault_every == 0:
            return FAULT_CYCLE[(count // self.fault_every - 1) % len(FAULT_CYCLE)]
        return None

    def _klines(self, params: dict[str, str]) -> Response:
        category, symbol, interval = params.get("category"), params.get("symbol"), params.get("interval")
        if category not in CATEGORIES:
            return self._api_error(10001, "Illegal category")
        if interval not in TIMEFRAME_BY_INTERVAL:
            return self._api_error(10001, "Invalid period!")
        candles = self._candles.get((category, symbol or "", interval))
        if candles is None:
            return self._api_error(10001, "Not supported symbols")
        try:
            limit = int(params.get("limit", DEFAULT_LIMIT))
            start = int(params["start"]) if "start" in params else None
            end = int(params["end"]) if "end" in params else None
        except ValueError:
            return self._api_error(10001, "params error")
        if not 1 <= limit <= MAX_LIMIT:
            return self._api_error(10001, f"limit must be within [1, {MAX_LIMIT}]")

        open_ms = candles[TIMESTAMP].to_numpy("datetime64[ms]").astype("int64")
        keep = open_ms <= self._now_ms()  # a candle exists once it has opened
        if start is not None and not self.ignore_time_range:
            keep &= open_ms >= start
        if end is not None and not self.ignore_time_range:
            keep &= open_ms <= end
        served = candles.loc[keep].tail(limit)  # Bybit keeps the newest `limit` rows...
        bad = self._bad.get((category, symbol or "", interval))
        if bad:
            served = served.copy()
            for ms, values in bad.items():
                at = served[TIMESTAMP] == pd.Timestamp(ms * _MS, tz="UTC")
                for column, value in values.items():
                    served.loc[at, column] = value
        values = served[list(CANDLE_COLUMNS[1:])].to_numpy()
        rows = [
            [str(ms), *map(_decimal, row)] for ms, row in zip(open_ms[keep][-limit:], values, strict=True)
        ]
        rows.reverse()  # ...and lists them newest first
        return self._json(
            {"retCode": 0, "retMsg": "OK", "result": {"category": category, "symbol": symbol, "list": rows}}
        )

    # ------------------------------------------------------------------------------------------- faults

    def _fault_response(self, fault: Fault) -> Response:
        if fault.kind == "rate_limit":
            reset_ms = self._now_ms() + round(fault.seconds * 1000)
            headers = {
                "X-Bapi-Limit": "600",
                "X-Bapi-Limit-Status": "0",
                "X-Bapi-Limit-Reset-Timestamp": str(reset_ms),
            }
            return self._api_error(fault.ret_code, fault.message, headers)
        if fault.kind == "http":
            return Response(
                HTTP_STATUS_CODES.get(fault.status, "error"), status=fault.status, mimetype="text/plain"
            )
        if fault.kind == "malformed":
            return Response('{"retCode":0,"retMsg":"OK","result":{"list":[["17', mimetype="application/json")
        if fault.kind == "api_error":
            return self._api_error(fault.ret_code, fault.message)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _api_error(self, ret_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return self._json({"retCode": ret_code, "retMsg": message, "result": {}}, headers)

    def _json(self, body: dict, headers: dict[str, str] | None = None) -> Response:
        body = {**body, "retExtInfo": {}, "time": self._now_ms()}
        return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json", headers=headers)

    def _now_ms(self) -> int:
        return pd.Timestamp(self.now()).value // _MS


def _utc(value: pd.Timestamp | str) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tz is None else stamp.tz_convert("UTC")


def _decimal(value: float) -> str:
    """Shortest decimal text that reads back as the same float ("61200", "0.18134"), as Bybit writes them."""
    return "" if math.isnan(value) else np.format_float_positional(value, trim="-")


def random_candles(
    first_open: str | pd.Timestamp, count: int, timeframe: Timeframe | str, seed: int = 0
) -> pd.DataFrame:
    """``count`` consecutive canonical candles of a random walk, with exchange-like decimals."""
    tf = Timeframe(timeframe)
    rng = np.random.default_rng(seed)
    close = np.round(30_000 * np.exp(np.cumsum(rng.normal(0, 0.01, count))), 2)
    open_ = np.round(np.r_[close[0], close[:-1]], 2)
    high = np.round(np.maximum(open_, close) * (1 + rng.uniform(0, 0.005, count)), 2)
    low = np.round(np.minimum(open_, close) * (1 - rng.uniform(0, 0.005, count)), 2)
    volume = np.round(rng.uniform(1, 500, count), 6)
    start = pd.Timestamp(first_open)
    start = start.tz_localize("UTC") if start.tz is None else start.tz_convert("UTC")
    frame = pd.DataFrame(
        {
            TIMESTAMP: pd.date_range(start, periods=count, freq=tf.delta),
            "open": open_,
            "high": high,
            "low": low,
            "close": close,
            "volume": volume,
            "turnover": np.round(volume * close, 4),
        }
    )
    return to_canonical(frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Bybit v5 kline server on 127.0.0.1 (offline runs).")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--data", type=Path, default=Path("data/sample"), help="folder of SYMBOL_TF.parquet files"
    )
    parser.add_argument(
        "--fault-every", type=int, default=0, metavar="N", help="misbehave on every Nth request"
    )
    args = parser.parse_args(argv)
    fake = FakeBybit.from_folder(args.data, fault_every=args.fault_every)
    server = make_server("127.0.0.1", args.port, fake.wsgi_app, threaded=True)
    print(
        f"fake Bybit v5 serving {len(fake.datasets)} datasets from {args.data} on http://127.0.0.1:{server.port}"
        f"{KLINE_PATH}; use --set bybit.endpoint=http://127.0.0.1:{server.port}",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        server.serve_forever()


if __name__ == "__main__":
    main()
