"""A flow that records who ran it, and a script that deploys it to a work pool and queues runs.

    python tests/fakes/prefect_runs.py POOL OUT_DIR N     # deploy `record` to POOL, queue N runs writing to OUT_DIR

Each run writes ``<flow run id>.<pid>.<random>`` into OUT_DIR, so a run executed twice leaves two files.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from prefect import flow


@flow(name="record-run")
def record(out: str) -> str:
    from prefect.runtime import flow_run

    Path(out, f"{flow_run.id}.{os.getpid()}.{uuid.uuid4().hex[:8]}").write_text("ran")
    return str(flow_run.id)


def main(pool: str, out: str, runs: int) -> None:
    from prefect.deployments import run_deployment

    here = Path(__file__).resolve().parent
    deployment = record.from_source(source=str(here), entrypoint=f"{Path(__file__).name}:record").deploy(
        name="record", work_pool_name=pool, print_next_steps=False)
    for _ in range(runs):
        run = run_deployment("record-run/record", parameters={"out": out}, timeout=0)
        print(f"RUN {run.id}", flush=True)
    assert deployment


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
