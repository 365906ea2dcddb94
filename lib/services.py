"""Long-running local services (Prefect server, MLflow UI) started together and stopped together.

Each service runs in its own process group, so stopping it also stops whatever it spawned (uvicorn
workers): Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pricelevel.config import TrackingConfig


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    argv: tuple[str, ...]


def ui_commands(bin_dir: Path, tracking: TrackingConfig, prefect_port: int, mlflow_port: int) -> list[Service]:
    """Prefect server and MLflow UI, both bound to 127.0.0.1, MLflow reading the project's tracking store."""
    return [
        Service("Prefect", f"http://127.0.0.1:{prefect_port}",
                (str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port))),
        Service("MLflow", f"http://127.0.0.1:{mlflow_port}",
                (str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking.tracking_uri,
                 "--default-artifact-root", tracking.artifact_location,
                 "--host", "127.0.0.1", "--port", str(mlflow_port))),
    ]


def run_services(
    services: Sequence[Service],
    env: Mapping[str, str],
    cwd: Path,
    stop: threading.Event | None = None,
    grace_s: float = 10.0,
) -> int:
    """Run until one service exits, ``stop`` is set, or Ctrl-C; then stop every process group.

    Returns the exit code of the service that ended first (0 when stopped on purpose).
    """
    stop = stop or threading.Event()
    processes: list[subprocess.Popen] = []
    try:
        for service in services:  # started inside the try: one that fails to start stops those before it
            processes.append(subprocess.Popen(service.argv, env=dict(env), cwd=cwd, start_new_session=True))
        while not stop.wait(0.5):
            for process in processes:
                if process.poll() is not None:
                    return process.returncode
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(processes, grace_s)


def stop_all(processes: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each process group, wait ``grace_s``, then SIGKILL what is left."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        _signal_group(process, signal.SIGKILL)  # stragglers in the group (workers) that ignored SIGTERM


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
