"""A trader process for the restart tests: replays bars of a candle folder against a (fake) Bybit exchange,
with the state in a database that outlives it. Before each bar it moves the exchange's last prices to that
bar's closes (the fake's test-only ``/fake/prices``), so market orders fill where the bar closed.

    python -m tests.workers.trader_replay --folder F --start TS --endpoint URL --state-url URL \
        --tracking-uri URI --artifacts DIR [--crash committed:2]

``--crash STAGE:N`` kills the process (SIGKILL, nothing cleaned up) the N-th time an order reaches STAGE
(committed, sent, answered). Prints one line per bar processed; exit 0 when every bar is done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import urllib.request
from collections import Counter

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--folder", "--start", "--endpoint", "--state-url", "--tracking-uri", "--artifacts"):
        parser.add_argument(name, required=True)
    parser.add_argument("--crash", default=None)
    parser.add_argument("--bars", type=int, default=None, help="replay only this many bars")
    args = parser.parse_args()

    from pricelevel.backtest.config import BacktestConfig
    from pricelevel.core.runtime import bootstrap
    from pricelevel.core.secrets import Secrets
    from pricelevel.core.timeframes import Timeframe
    from pricelevel.data.config import BybitConfig
    from pricelevel.data.folder import CandleFolder
    from pricelevel.registry.config import TrackingConfig
    from pricelevel.trading.bybit import BybitBroker
    from pricelevel.trading.config import RiskConfig
    from pricelevel.trading.feeds import ReplayFeed
    from pricelevel.trading.service import exchange_execution, registry_models
    from pricelevel.trading.state import StateStore
    from pricelevel.trading.trader import Trader

    bootstrap(threads=1)
    stage, _, nth = (args.crash or "::").partition(":")
    seen: Counter[str] = Counter()

    def checkpoint(reached: str) -> None:
        seen[reached] += 1
        if reached == stage and seen[reached] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    tracking = TrackingConfig(tracking_uri=args.tracking_uri, artifact_location=args.artifacts)
    models = registry_models(tracking, "models:/pricelevel@champion")
    spec = models.current.spec
    timeframe = Timeframe(spec.timeframe)
    feed = ReplayFeed(CandleFolder.open(args.folder), models.symbols, spec.table_spec().input_timeframes)
    store = StateStore(args.state_url)
    config = BybitConfig(timeout_s=2.0, max_attempts=3, backoff_s=0.01, backoff_max_s=0.05)
    exchange = BybitBroker(config, "testnet", Secrets.from_env(os.environ), endpoint=args.endpoint)
    make = exchange_execution(exchange, store, models.symbols, poll_s=0.01, polls=5, checkpoint=checkpoint)
    risk = RiskConfig(cooldown_losses=1000, daily_loss_limit=0.99, max_drawdown=0.99, max_positions=10)
    trader = Trader(store, models, feed, make, risk, BacktestConfig())
    for bar in feed.bar_times(timeframe, pd.Timestamp(args.start))[: args.bars]:
        closes = {s: str(float(f[timeframe].loc[f[timeframe]["timestamp"] == bar, "close"].iloc[0]))
                  for s, f in feed.frames.items() if (f[timeframe]["timestamp"] == bar).any()}
        request = urllib.request.Request(f"{args.endpoint}/fake/prices", json.dumps(closes).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).read()
        report = trader.on_bar_close(bar)
        print(f"bar {bar} {'skipped' if report.skipped else 'done'}", flush=True)


if __name__ == "__main__":
    main()
