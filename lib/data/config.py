"""Configuration of the data stage: where candles come from, where they are kept, how they are judged."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pricelevel.core.config import Frozen, HttpUrl, Symbol, UtcDatetime
from pricelevel.core.timeframes import Timeframe


class DataConfig(Frozen):
    """Where candles come from and where they are kept."""

    #: Store root: ``raw/``, ``validated/``, ``quarantine/``, ``reports/``, ``derived/`` live under it.
    root: Path = Path("data")
    source: Literal["sample", "bybit"] = "sample"
    sample_dir: Path = Path("data/sample")
    #: Symbols to ingest (and train on, unless ``dataset.symbols`` names others).
    symbols: tuple[Symbol, ...] = Field(min_length=1)
    timeframes: tuple[Timeframe, ...] = Field(min_length=1)
    start: UtcDatetime
    #: Exclusive end of the range (candle open time < end); ``null`` means "up to now". No default here:
    #: ``conf/base.yaml`` sets it (to the end of the bundled sample), the one place defaults are written.
    end: UtcDatetime | None

    @field_validator("symbols", "timeframes")
    @classmethod
    def _unique(cls, value: tuple) -> tuple:
        if len(set(value)) != len(value):
            raise ValueError("duplicates are not allowed")
        return value

    @model_validator(mode="after")
    def _range(self) -> DataConfig:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end:%Y-%m-%d %H:%M}) must be after start ({self.start:%Y-%m-%d %H:%M})")
        return self


class BybitConfig(Frozen):
    """Bybit v5 market data through pybit. Keys/secrets come from the environment, never from here."""

    category: Literal["spot", "linear"] = "spot"
    #: Base URL override (a mirror, a local fake server). ``null``: pybit's URL for mainnet/testnet/demo.
    endpoint: HttpUrl = None
    testnet: bool = False
    demo: bool = False
    timeout_s: float = Field(10.0, gt=0)
    #: Attempts per request on rate limits (retCode 10006, HTTP 403/429), 5xx and timeouts.
    max_attempts: int = Field(6, ge=1, le=50)
    backoff_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    page_limit: int = Field(1000, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_environment(self) -> BybitConfig:
        if self.testnet and self.demo:
            raise ValueError("testnet and demo are exclusive: pick one")
        return self


class GapPolicy(Frozen):
    """How missing candles are judged. Exchange outages leave real gaps; a broken fetch leaves big ones."""

    #: Longest single run of missing candles that still passes (with a warning).
    max_gap_bars: int = Field(24, ge=0)
    #: Largest share of missing candles over the dataset's span that still passes.
    max_missing_fraction: float = Field(0.01, ge=0, le=1)


class ValidationConfig(Frozen):
    gaps: GapPolicy = GapPolicy()
    #: How many offending rows a failure message and report show.
    example_rows: int = Field(5, ge=1, le=100)
