"""Load the run's configuration inside a flow, from the same layers the CLI uses."""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config, load_config
from pricelevel.project import BASE_CONFIG, project_root


@task(name="load-config", cache_policy=NO_CACHE)
def load_run_config(
    config_file: str | None,
    overrides: list[str] | None,
    **flow_arguments: object,
) -> Config:
    """Base YAML, then ``config_file``, then ``PRICELEVEL_*`` env, then overrides and the flow's own arguments."""
    root = project_root()
    extra = [f"data.{name}={_yaml(value)}" for name, value in flow_arguments.items() if value is not None]
    config = load_config(
        root / BASE_CONFIG, config_file=config_file, overrides=[*(overrides or []), *extra], env=os.environ
    )
    return config.with_root(root)


def _yaml(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)
