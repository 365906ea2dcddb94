"""Load the run's configuration inside a flow, from the same layers the CLI uses."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config, data_overrides
from pricelevel.project import load_project_config


@task(name="load-config", cache_policy=NO_CACHE)
def load_run_config(config_file: str | None, overrides: list[str] | None, **data_arguments: object) -> Config:
    """Base YAML, then ``config_file``, then ``PRICELEVEL_*`` env, then overrides and the flow's own arguments."""
    return load_project_config(config_file, [*(overrides or []), *data_overrides(**data_arguments)])
