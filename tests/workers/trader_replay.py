"""A trader process for the restart tests: replays bars of a candle folder against a (fake) Bybit exchange,
with the state in a database that outlives it. Before each bar it moves the exchange's last prices to that
bar's closes (the fake's test-only ``/fake/prices``), so market orders fill where the bar closed.

    python -m tests.workers.trader_replay --folder F --start TS --endpoint URL --state-url URL \
        --tracking-uri URI --artifacts DIR [--crash committed:2]

``--crash STAGE:N`` kills the process (SIGKILL, nothing cleaned up) the N-th time an order reaches STAGE
(committed, sent, answered). Prints one line per bar processed; exit 0 when every bar is done.

The restart test starts it many times: :func:`forked` runs the same ``main`` in a process forked from a
``multiprocessing`` fork server that imported :data:`PRELOAD` once (a fresh interpreter spends seconds importing
torch and MLflow each time); it is a process of its own all the same, and SIGKILL ends it as abruptly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd

#: What ``main`` imports, for a fork server to import once (nothing here starts a thread, so forking is safe).
PRELOAD = ("pricelevel.backtest.config", "pricelevel.core.runtime", "pricelevel.core.secrets",
           "pricelevel.core.timeframes", "pricelevel.data.config", "pricelevel.data.folder",
           "pricelevel.registry.config", "pricelevel.trading.bybit", "pricelevel.trading.config",
           "pricelevel.trading.feeds", "pricelevel.trading.service", "pricelevel.trading.state",
           "pricelevel.trading.trader", "tests.workers.trader_replay")


def ready() -> None:
    """Nothing: the fork server's first child, started to wait until its preload is done."""


def forked(argv: Sequence[str], env: Mapping[str, str], stderr_path: str) -> None:
    """``main(argv)`` in a forked process: ``env`` added to its environment, stdout dropped, stderr to a file."""
    os.environ.update(env)
    for fd, path, flags in ((1, os.devnull, os.O_WRONLY), (2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    main(argv)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    for name in ("--folder", "--start", "--endpoint", "--state-url", "--tracking-uri", "--artifacts"):
        parser.add_argument(name, required=True)
    parser.add_argument("--crash", default=None)
    parser.add_argument("--bars", type=int, default=None, help="replay only this many bars")
    args = parser.parse_args(argv)

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
