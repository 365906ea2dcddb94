"""The trading service as one long-running task (until the flow run is cancelled): the trader and, when
configured, its Telegram bot (:func:`pricelevel.telegram.trader_service.trade_with_telegram`, which
``pricelevel trade`` runs without Prefect)."""

from __future__ import annotations

import asyncio
import os

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.telegram.trader_service import trade_with_telegram


@task(name="trade", cache_policy=NO_CACHE)
def run_trading_service(config: Config) -> dict:
    """The service until the flow run is cancelled (the worker's SIGTERM)."""
    logger = get_run_logger()
    return {"bars": asyncio.run(trade_with_telegram(config, dict(os.environ), logger.info))}
