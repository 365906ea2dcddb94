"""Shared by the cluster tests (test_cluster_faults, test_cluster_signals): the tiny training config that still
runs every task, and what a test reads back (process groups, flow-run states)."""

from __future__ import annotations

import contextlib
from pathlib import Path

TINY = [
    "data.symbols=[BTCUSDT,ETHUSDT]",
    "data.start=2023-06-01",
    "levels.lookback_days=120",
    "labels.threshold_frac=0.005",
    "labels.horizon=6",
    "dataset.timeframe=4h",
    "dataset.seq_len=16",
    "levels.refit_every=6",
    "model.hidden_size=8",
    "model.num_layers=1",
    "model.max_epochs=1",
    "model.patience=1",
    "model.num_threads=1",
    "model.batch_size=128",
    "model.limit_train_batches=5",
    "tuning.max_epochs=1",
    "tuning.space.hidden_size=[8]",
    "tuning.space.num_layers=[1,1]",
    "tuning.space.batch_size=[128]",
    "tuning.space.seq_len=[12,16]",
    "tuning.workers=2",
    "tuning.heartbeat_s=1",
    "tuning.grace_s=5",
    "flow.max_workers=2",
    "flow.task_runner=dask",
]


def _group_alive(pgid: int) -> list[str]:
    """The command lines of the processes still in group ``pgid`` (zombies left out)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state not in ("Z", "X"):
                alive.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:200])
    return alive


def _last_flow_run_state(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return runs[0].state.type.name
