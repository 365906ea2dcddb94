"""What every flow starts with: the process runtime, the run's configuration, and the task runner its
fan-out uses, all taken from the same config layers as the CLI (deployments run flows without the CLI)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pricelevel.config import Config, data_overrides, load_project_config
from pricelevel.core.config import FlowConfig
from pricelevel.core.runtime import bootstrap


@task(name="load-config", cache_policy=NO_CACHE)
def load_run_config(config_file: str | None, overrides: list[str] | None, **data_arguments: object) -> Config:
    """Base YAML, then ``config_file``, then ``PRICELEVEL_*`` env, then overrides and the flow's own arguments;
    the process is bootstrapped first (log redaction, quiet environment) and its threads set from the config."""
    bootstrap()
    config = load_project_config(config_file, [*(overrides or []), *data_overrides(**data_arguments)])
    bootstrap(threads=config.model.num_threads)
    return config


def fan_out(flow: FlowConfig) -> TaskRunner:
    """The task runner for a flow's per-dataset / per-symbol tasks: ``flow.max_workers`` at once."""
    return ThreadPoolTaskRunner(max_workers=flow.max_workers)
