"""Pick the candle source named in config."""

from __future__ import annotations

import time
from collections.abc import Callable

from pricelevel.core.secrets import Secrets
from pricelevel.data.config import BybitConfig, DataConfig
from pricelevel.data.sources import CandleSource
from pricelevel.data.sources.bybit import BybitSource
from pricelevel.data.sources.sample import SampleSource


def open_source(data: DataConfig, bybit: BybitConfig, secrets: Secrets | None = None,
                sleep: Callable[[float], None] = time.sleep) -> CandleSource:
    """The configured candle source; ``sleep`` is its retries' backoff (the trader's stops it short on a stop)."""
    if data.source == "sample":
        return SampleSource(data.sample_dir)
    return BybitSource(bybit, secrets, sleep=sleep)
