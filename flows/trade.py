"""Trading flow: the trader service for the configured mode (paper by default), on its own work pool.

    load-config -> trade (until cancelled; trades @champion, picking up each promotion at the next bar)

The `promote` flow moves ``@champion``; the running trader resolves the alias at every bar and hot-swaps the
new version between bars when it fits (docs/concepts/trader.md "Live trading").
"""

from __future__ import annotations

from prefect import flow

from tasks.notify import notify_failure
from tasks.runtime import load_run_config
from tasks.trade import run_trading_service


@flow(name="trade", on_failure=[notify_failure])
def trade(config_file: str | None = None, overrides: list[str] | None = None) -> dict:
    config = load_run_config(config_file, overrides)
    return run_trading_service(config)
