"""What every step's configuration is built from: a frozen pydantic base, shared field types, one error.

Each stage package owns the config class of its step (``pricelevel.data.config``, ``pricelevel.levels.config``
...); :mod:`pricelevel.config` only composes them into the whole run and loads the layers.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Keys that must never be put in a config file or ``--set``: they come from the environment only.
SECRET_KEYS = frozenset({"api_key", "api_secret", "token", "bot_token", "password", "secret"})


class ConfigError(ValueError):
    """A configuration value is missing or invalid; ``str()`` is one line naming the key and why."""


class Frozen(BaseModel):
    """Base of every config section: immutable, no unknown keys, defaults validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Symbol = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}USDT?$|^[A-Z0-9]{2,20}USDC$")]


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/") if value else value


#: An optional base URL (an endpoint override): http(s), without the trailing slash.
HttpUrl = Annotated[str | None, AfterValidator(_http_url)]


class FlowConfig(Frozen):
    """Orchestration knobs (not what is computed, only how it is scheduled)."""

    #: Tasks run at once by every flow's fan-out (datasets in ingest, symbols in training).
    max_workers: int = Field(4, ge=1, le=64)
    #: Prefect retries of the network-facing ingest task.
    task_retries: int = Field(2, ge=0)
    #: Seconds between those Prefect retries.
    task_retry_delay_s: float = Field(10.0, ge=0)
    #: Where fanned-out tasks run: threads of the flow's process, worker processes, or Dask workers. The numba
    #: kernels hold the GIL, so only ``process`` and ``dask`` compute several symbols at once.
    task_runner: Literal["thread", "process", "dask"] = "thread"
    #: ``tcp://host:8786`` of a running Dask scheduler; ``null`` = a temporary ``LocalCluster`` per fan-out
    #: (``min(max_workers, cores)`` process workers, one thread each).
    dask_address: str | None = None
