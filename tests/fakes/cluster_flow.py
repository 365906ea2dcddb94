"""The training flow's per-symbol fan-out (levels -> features), each task also saying which process ran it.

The probes call the real tasks' functions (``find_levels.fn``, ``feature_bars.fn``) inside a task of their own,
submitted through :func:`tasks.runtime.fan_out` exactly as ``flows/train.py`` submits the real ones.
"""

from __future__ import annotations

import os

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pricelevel.core.cache import SymbolStep
from tasks.runtime import fan_out, load_run_config
from tasks.train import feature_bars, find_levels


@task(name="levels-probe", task_run_name="levels-probe {symbol}", cache_policy=NO_CACHE)
def levels_probe(config, symbol: str) -> tuple[int, SymbolStep]:
    return os.getpid(), find_levels.fn(config, symbol)


@task(name="features-probe", cache_policy=NO_CACHE)
def features_probe(config, levels: tuple[int, SymbolStep]) -> tuple[int, SymbolStep]:
    return os.getpid(), feature_bars.fn(config, levels[1])


@flow(name="tables-probe")
def tables(overrides: list[str] | None = None) -> dict:
    """Levels and features of every training symbol; returns the steps and the pids that computed them."""
    config = load_run_config(None, overrides)
    with fan_out(config.flow) as runner:
        levels = [runner.submit(levels_probe, {"config": config, "symbol": s}) for s in config.training_symbols]
        tables = [runner.submit(features_probe, {"config": config, "levels": future}) for future in levels]
        levels, tables = [f.result() for f in levels], [f.result() for f in tables]
    return {"flow_pid": os.getpid(), "pids": [pid for pid, _ in levels + tables],
            "levels": [step for _, step in levels], "tables": [step for _, step in tables]}
