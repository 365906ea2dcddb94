"""Benchmark: exchange candle close -> trader decision over the public kline stream; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stream.py [--bars 30] [--timeframe 4h]

A local server speaking Bybit's public stream (``tests.fakes.bybit_ws``) pushes, at each close, the closed
candle of every (symbol, timeframe) closing then, for the bundled sample's 10 symbols; a local fake Bybit
(``tests.fakes.bybit_server``, real HTTP) answers the REST backfill. The trader (the demo champion's
architecture with seeded weights, as ``bench/trade.py`` builds it, registered in a temporary MLflow store)
reads its candles from a :class:`~pricelevel.trading.feeds.StreamFeed` fed by a
:class:`~pricelevel.trading.streams.KlineStream` (pybit's WebSocket) and is stepped at each close, as the
service steps it when ``market_data: websocket`` (no poll delay: the feed waits for the pushes).

Reported: close -> decision made (``on_bar_close`` returned: candles in, features, prediction, risk, the
paper engine's orders) p50/p99/max, split into the trader's parts (``candles`` is the wait for the pushed
candles and their checks); the REST seed at the first bar apart; how many bars needed REST (must be 0).
Goal (issue 21): p50 <= 1 s, p99 <= 3 s. The exchange's own delay between a close and its push is not in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fakes live in tests/fakes

from trade import PARTS, demo_sized_model, percentiles  # noqa: E402  (bench/trade.py, beside this file)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bars", type=int, default=30)
    parser.add_argument("--timeframe", default="4h")
    args = parser.parse_args()

    from pricelevel.core.runtime import bootstrap

    bootstrap(threads=1)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pricelevel-bench-stream-") as tmp:
        tracking, uri, about = demo_sized_model(Path(tmp), args.timeframe)
        result = stream_run(tracking, uri, Path(tmp), args.bars)
    total = result["close_to_decision_ms"]
    print(json.dumps({
        "benchmark": "exchange candle close -> trader decision over the public kline stream",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": 1},
        "model": about, **result,
        "goal": {"p50_ms_at_most": 1000, "p99_ms_at_most": 3000,
                 "met": total["p50"] <= 1000 and total["p99"] <= 3000},
    }, indent=2))


def stream_run(tracking, uri: str, tmp_path: Path, bars: int) -> dict:
    import pandas as pd
    from werkzeug.serving import make_server

    from pricelevel.backtest.config import BacktestConfig
    from pricelevel.core.timeframes import Timeframe
    from pricelevel.data.catalogue import DataCatalogue
    from pricelevel.data.config import BybitConfig, ValidationConfig
    from pricelevel.data.folder import CandleFolder
    from pricelevel.data.sources.bybit import BybitSource
    from pricelevel.trading.config import RiskConfig
    from pricelevel.trading.feeds import StoreFeed, StreamFeed
    from pricelevel.trading.service import paper_execution, registry_models
    from pricelevel.trading.state import StateStore
    from pricelevel.trading.streams import KlineStream, stream_url, topic
    from pricelevel.trading.trader import Trader
    from tests.fakes.bybit_server import FakeBybit
    from tests.fakes.bybit_ws import FakeKlineServer

    models = registry_models(tracking, uri)
    symbols, spec = models.symbols, models.current.spec.table_spec()
    timeframes, bar = [Timeframe(tf) for tf in spec.input_timeframes], Timeframe(spec.timeframe)
    sample = CandleFolder.open(ROOT / "data" / "sample")
    candles = {(s, tf): sample.read(s, tf).set_index("timestamp") for s in symbols for tf in timeframes}
    opens = candles[(symbols[0], bar)].index
    first = opens[-bars - 1]

    virtual = {"now": first + bar.delta}
    fake = FakeBybit.from_folder(ROOT / "data" / "sample", categories=("spot",), now=lambda: virtual["now"])
    http = make_server("127.0.0.1", 0, fake.wsgi_app, threaded=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    source = BybitSource(BybitConfig(endpoint=f"http://127.0.0.1:{http.server_port}", timeout_s=5.0),
                         now=lambda: virtual["now"])
    rest = StoreFeed(source, DataCatalogue(tmp_path / "data", "bybit"), ValidationConfig(), symbols, timeframes,
                     start=min(f.index[0] for f in candles.values()))
    feed = StreamFeed(rest, wait_s=10.0, now=lambda: virtual["now"].timestamp())
    store = StateStore(f"sqlite:///{tmp_path}/stream.db")
    trader = Trader(store, models, feed, paper_execution(symbols, BacktestConfig()), RiskConfig(), BacktestConfig())

    started = time.perf_counter()
    trader.on_bar_close(first)  # seeds every dataset over REST (the stream is not up yet)
    seed_s = time.perf_counter() - started
    reports, latencies, rest_bars, reasons = [], [], 0, set()
    with FakeKlineServer() as server, KlineStream(stream_url("mainnet", server.endpoint), symbols, timeframes,
                                                  feed.deliver, now=lambda: virtual["now"].timestamp(),
                                                  # the virtual clock jumps an hour between pushes, and the fake
                                                  # sends no in-bar updates: no silence verdict from the stream
                                                  silent_after_s=1e12) as stream:
        assert stream.connected.wait(30) and server.wait_subscribed({topic(s, tf) for s in symbols for tf in timeframes})
        finest = min(timeframes, key=lambda tf: tf.delta)

        def closing_at(close):
            return [(s, tf) for s in symbols for tf in timeframes if close.value % tf.nanoseconds == 0]

        for opened in opens[-bars:]:
            close = opened + bar.delta
            for between in pd.date_range(opened + finest.delta, close - finest.delta, freq=finest.delta):
                virtual["now"] = between  # the closes in between are pushed as they happen, not timed
                for symbol, tf in closing_at(between):
                    row = candles[(symbol, tf)].loc[between - tf.delta]
                    server.push(symbol, tf, {"timestamp": between - tf.delta, **row.to_dict()})
            time.sleep(0.05)
            virtual["now"] = close
            closing = closing_at(close)
            pushed_at: list[float] = []

            def exchange_closes(close=close, closing=closing, pushed_at=pushed_at) -> None:
                pushed_at.append(time.perf_counter())  # the exchange closes the candles and pushes them
                for symbol, tf in closing:
                    row = candles[(symbol, tf)].loc[close - tf.delta]
                    server.push(symbol, tf, {"timestamp": close - tf.delta, **row.to_dict()})

            pusher = threading.Thread(target=exchange_closes)
            pusher.start()
            report = trader.on_bar_close(opened)  # the service steps the bar at its close
            done = time.perf_counter()
            pusher.join()
            latencies.append(done - pushed_at[0])
            reports.append(report)
            rest_bars += bool(feed.fetched)
            reasons.update(p.reason for p in feed.problems)
    http.shutdown()
    store.close()
    decided = [r for r in reports if not r.skipped]
    return {
        "symbols": len(symbols), "timeframe": str(bar), "timeframes": [str(tf) for tf in timeframes],
        "bars": len(reports), "bars_decided": len(decided), "bars_needing_rest": rest_bars,
        "rest_seed_s": round(seed_s, 2),
        "close_to_decision_ms": percentiles(latencies),
        "parts_ms": {p: percentiles([r.timings.get(p, 0.0) for r in decided]) for p in PARTS},
        "why_rest": sorted(reasons)[:10],
    }


if __name__ == "__main__":
    main()
