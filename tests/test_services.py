"""Services started together and stopped together: nothing they spawned outlives ``run_services``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pricelevel.config import TrackingConfig
from pricelevel.services import Service, run_services, ui_commands

#: A service that spawns a child (``sleep``, or a Python that ignores SIGTERM), writes "own_pid child_pid"
#: to argv[1] once the child is ready, and sleeps. argv[2] == "ignore" also makes the service ignore SIGTERM.
SPAWNER = r"""
import os, signal, subprocess, sys, time
if sys.argv[3] == "stubborn-child":
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
else:
    child = subprocess.Popen(["sleep", "30"])
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(tmp, sys.argv[1])
time.sleep(30)
"""

#: Exits with code 3 once the file argv[1] exists (so the other service is surely running by then).
EXITER = r"""
import os, sys, time
deadline = time.time() + 20
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.02)
sys.exit(3)
"""


def _spawner(name: str, pidfile: Path, term: str = "default", child: str = "sleep") -> Service:
    return Service(name, "http://127.0.0.1:0", (sys.executable, "-c", SPAWNER, str(pidfile), term, child))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone: it runs nothing and holds no port)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone(pids: list[int], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _pids(*pidfiles: Path) -> list[int]:
    return [int(v) for f in pidfiles if f.exists() for v in f.read_text().split()]


def _stop_when_ready(stop: threading.Event, pidfiles: list[Path], after_s: float = 1.0) -> threading.Thread:
    def wait() -> None:
        deadline = time.monotonic() + 20
        while not all(f.exists() for f in pidfiles) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(after_s)
        stop.set()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def cleanup():
    """Kill, by pid, whatever a failing test left running (only processes these tests started)."""
    started: list[Path | int] = []  # pid files, or pids
    yield started
    pids = [p for p in started if isinstance(p, int)] + _pids(*(p for p in started if isinstance(p, Path)))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def test_stop_ends_every_service_and_everything_they_spawned(tmp_path: Path, cleanup) -> None:
    files = [tmp_path / "a.pid", tmp_path / "b.pid"]
    cleanup.extend(files)
    stop = threading.Event()
    thread = _stop_when_ready(stop, files)
    started = time.monotonic()
    code = run_services([_spawner("A", files[0]), _spawner("B", files[1])], env=dict(os.environ), cwd=tmp_path,
                        stop=stop, grace_s=5)
    elapsed = time.monotonic() - started
    thread.join(5)
    assert code == 0
    assert elapsed < 10  # stopped on request, not when the 30 s sleeps ended
    pids = _pids(*files)
    assert len(pids) == 4 and len(set(pids)) == 4  # two services, two children
    assert _gone(pids), [p for p in pids if _alive(p)]


def test_children_that_ignore_sigterm_are_killed_too(tmp_path: Path, cleanup) -> None:
    files = [tmp_path / "stubborn.pid", tmp_path / "deaf.pid"]
    cleanup.extend(files)
    stop = threading.Event()
    thread = _stop_when_ready(stop, files, after_s=0.2)
    started = time.monotonic()
    code = run_services(
        [_spawner("stubborn child", files[0], child="stubborn-child"),
         _spawner("deaf service", files[1], term="ignore")],
        env=dict(os.environ), cwd=tmp_path, stop=stop, grace_s=1.0,
    )
    thread.join(5)
    assert code == 0
    assert time.monotonic() - started < 15  # the deaf one got grace_s, then SIGKILL
    assert _gone(_pids(*files))


def test_a_service_that_exits_ends_the_run_with_its_code_and_stops_the_others(tmp_path: Path, cleanup) -> None:
    pidfile = tmp_path / "b.pid"
    cleanup.append(pidfile)
    exiter = Service("exits", "http://127.0.0.1:0", (sys.executable, "-c", EXITER, str(pidfile)))
    started = time.monotonic()
    code = run_services([exiter, _spawner("B", pidfile)], env=dict(os.environ), cwd=tmp_path, grace_s=5)
    assert code == 3
    assert time.monotonic() - started < 10
    pids = _pids(pidfile)
    assert len(pids) == 2 and _gone(pids)


def test_services_run_in_the_given_folder_with_the_given_environment(tmp_path: Path) -> None:
    out = tmp_path / "seen.txt"
    code = "import os, sys; open(sys.argv[1], 'w').write(os.getcwd() + '|' + os.environ['PRICELEVEL_TEST_MARK']); sys.exit(0)"
    env = {**os.environ, "PRICELEVEL_TEST_MARK": "mark-42"}
    result = run_services([Service("once", "-", (sys.executable, "-c", code, str(out)))], env=env, cwd=tmp_path)
    assert result == 0
    assert out.read_text() == f"{tmp_path}|mark-42"


def test_ui_commands_bind_localhost_and_read_the_project_tracking_store(tmp_path: Path) -> None:
    tracking = TrackingConfig(tracking_uri="sqlite:////proj/mlruns/mlflow.db", artifact_location="/proj/mlruns/artifacts")
    prefect, mlflow = ui_commands(tmp_path / "bin", tracking, prefect_port=4321, mlflow_port=5432)

    def option(argv: tuple[str, ...], name: str) -> str:
        assert argv.count(name) == 1, (name, argv)
        return argv[argv.index(name) + 1]

    assert (prefect.name, prefect.url) == ("Prefect", "http://127.0.0.1:4321")
    assert prefect.argv[:3] == (str(tmp_path / "bin" / "prefect"), "server", "start")
    assert option(prefect.argv, "--host") == "127.0.0.1" and option(prefect.argv, "--port") == "4321"

    assert (mlflow.name, mlflow.url) == ("MLflow", "http://127.0.0.1:5432")
    assert mlflow.argv[:2] == (str(tmp_path / "bin" / "mlflow"), "ui")
    assert option(mlflow.argv, "--host") == "127.0.0.1" and option(mlflow.argv, "--port") == "5432"
    assert option(mlflow.argv, "--backend-store-uri") == "sqlite:////proj/mlruns/mlflow.db"
    assert option(mlflow.argv, "--default-artifact-root") == "/proj/mlruns/artifacts"
    assert not any("0.0.0.0" in part for part in (*prefect.argv, *mlflow.argv))


def test_a_service_that_cannot_start_leaves_nothing_running(tmp_path: Path, cleanup, monkeypatch) -> None:
    started: list[int] = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self.pid)
            cleanup.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    pidfile = tmp_path / "first.pid"
    cleanup.append(pidfile)
    missing = Service("missing", "-", (str(tmp_path / "no-such-binary"),))
    with pytest.raises(FileNotFoundError):
        run_services([_spawner("first", pidfile), missing], env=dict(os.environ), cwd=tmp_path, grace_s=1)
    monkeypatch.undo()
    assert len(started) == 1  # the first service was started
    assert _gone([*started, *_pids(pidfile)], within_s=1.0)
