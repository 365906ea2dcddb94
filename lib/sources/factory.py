"""Pick the candle source named in config."""

from __future__ import annotations

from pricelevel.config import BybitConfig, DataConfig
from pricelevel.secrets import Secrets
from pricelevel.sources import CandleSource
from pricelevel.sources.bybit import BybitSource
from pricelevel.sources.sample import SampleSource


def open_source(data: DataConfig, bybit: BybitConfig, secrets: Secrets | None = None) -> CandleSource:
    if data.source == "sample":
        return SampleSource(data.sample_dir)
    return BybitSource(bybit, secrets)
