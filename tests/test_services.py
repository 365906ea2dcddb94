"""Services started together and stopped together: nothing they spawned outlives ``run_services``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pricelevel.core.processes import process_alive
from pricelevel.core.services import Service, ServiceGroup, run_services, stop_on_signals, ui_commands
from pricelevel.registry.config import TrackingConfig

#: A service that spawns a child (``sleep``, or a Python that ignores SIGTERM), writes "own_pid child_pid"
#: to its first argument once the child is ready, and sleeps; "ignore" also makes it ignore SIGTERM.
FAKE_SERVICE = Path(__file__).parent / "fakes" / "service.py"
#: Runs fake services through run_services in a process of its own, so that it can be sent signals.
DRIVER = Path(__file__).parent / "fakes" / "service_driver.py"

#: Exits with code 3 once the file argv[1] exists (so the other service is surely running by then).
EXITER = r"""
import os, sys, time
deadline = time.time() + 20
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.02)
sys.exit(3)
"""


def _spawner(name: str, pidfile: Path, term: str = "default", child: str = "sleep") -> Service:
    return Service(name, "http://127.0.0.1:0", (sys.executable, str(FAKE_SERVICE), str(pidfile), term, child))


def _gone(pids: list[int], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(process_alive(p) for p in pids):
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
    assert _gone(pids), [p for p in pids if process_alive(p)]


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
    prefect, mlflow = ui_commands(tmp_path / "bin", tracking.tracking_uri, tracking.artifact_location, prefect_port=4321, mlflow_port=5432)

    def option(argv: tuple[str, ...], name: str) -> str:
        assert argv.count(name) == 1, (name, argv)
        return argv[argv.index(name) + 1]

    assert (prefect.name, prefect.url) == ("Prefect", "http://127.0.0.1:4321")
    assert prefect.argv[:3] == (str(tmp_path / "bin" / "prefect"), "server", "start")
    assert option(prefect.argv, "--host") == "127.0.0.1" and option(prefect.argv, "--port") == "4321"
    assert dict(prefect.env)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"  # else the UI calls port 4200

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


def test_stop_on_signals_sets_the_event_and_restores_the_handlers() -> None:
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as inherited by `cmd &` in a script
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            event = threading.Event()
            with stop_on_signals(event) as installed:
                assert installed
                assert callable(signal.getsignal(sig))  # else the kill below would end pytest itself
                os.kill(os.getpid(), sig)
                deadline = time.monotonic() + 2
                while not event.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert event.is_set(), sig
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == previous_term
    finally:
        signal.signal(signal.SIGINT, previous_int)


def test_stop_on_signals_installs_nothing_off_the_main_thread() -> None:
    seen: list[object] = []

    def run() -> None:
        with stop_on_signals(threading.Event()) as installed:
            seen.extend([installed, signal.getsignal(signal.SIGTERM)])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert seen == [False, signal.getsignal(signal.SIGTERM)]


def test_run_services_off_the_main_thread_stops_on_the_event(tmp_path: Path, cleanup) -> None:
    pidfile = tmp_path / "a.pid"
    cleanup.append(pidfile)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_services([_spawner("A", pidfile)], env=dict(os.environ), cwd=tmp_path, stop=stop, grace_s=2)))
    thread.start()
    _stop_when_ready(stop, [pidfile], after_s=0.1).join(20)
    thread.join(10)
    assert result == [0]
    assert _gone(_pids(pidfile))


def test_a_service_killed_by_a_signal_ends_the_run_with_128_plus_the_signal(tmp_path: Path) -> None:
    killed = Service("killed", "-", (sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert run_services([killed], env=dict(os.environ), cwd=tmp_path, grace_s=1) == 128 + signal.SIGKILL


def _driver_output(driver: subprocess.Popen, timeout_s: float) -> str:
    out, _ = driver.communicate(timeout=timeout_s)
    return out


@pytest.mark.parametrize(
    ("sig", "inherit_ignored_sigint"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT", "SIGINT-inherited-ignored"],
)
def test_a_signal_to_the_runner_stops_every_service_and_what_they_spawned(
    tmp_path: Path, cleanup, sig: signal.Signals, inherit_ignored_sigint: bool
) -> None:
    """What systemd, ``docker stop``, ``kill -INT`` (also on ``cmd &`` in a script) and Ctrl-C do."""
    files = [tmp_path / "plain.pid", tmp_path / "deaf.pid"]  # deaf: ignores SIGTERM, and so does its child
    cleanup.extend(files)

    def sigint_as_inherited() -> None:
        # Set both ways: pytest itself may run with SIGINT ignored (started by `cmd &` in a script), and the
        # child inherits that unless told otherwise.
        signal.signal(signal.SIGINT, signal.SIG_IGN if inherit_ignored_sigint else signal.SIG_DFL)

    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), "1.0", f"{files[0]},default,sleep", f"{files[1]},ignore,stubborn-child"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=sigint_as_inherited,
    )
    try:
        deadline = time.monotonic() + 20
        while not all(f.exists() for f in files):
            assert driver.poll() is None, _driver_output(driver, 5)
            assert time.monotonic() < deadline, "fake services not up"
            time.sleep(0.02)
        pids = _pids(*files)
        assert len(set(pids)) == 4 and all(process_alive(p) for p in pids)
        started = time.monotonic()
        driver.send_signal(sig)
        out = _driver_output(driver, 10)
        elapsed = time.monotonic() - started
        assert driver.returncode == 0, out
        assert f"sigint={'ignored' if inherit_ignored_sigint else 'handled'}" in out
        assert "code=0 restored=True" in out
        assert elapsed < 6  # 1 s grace for the deaf one, then SIGKILL; not the fakes' 30 s sleep
        assert _gone(pids), [p for p in pids if process_alive(p)]
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.communicate()


def test_a_service_group_waits_for_health_and_stops_as_a_group(tmp_path: Path) -> None:
    port = _free_ports(1)[0]
    server = Service("http", f"http://127.0.0.1:{port}",
                     (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"),
                     health_url=f"http://127.0.0.1:{port}/")
    with ServiceGroup([server], env=dict(os.environ), cwd=tmp_path, grace_s=2) as group:
        assert group.wait_healthy(timeout_s=20)
        assert group.exit_code() is None
        pid = group.processes[0].pid
    assert group.processes[0].returncode is not None and _gone([pid])

    exits = Service("exits", "http://127.0.0.1:9/", (sys.executable, "-c", "raise SystemExit(4)"))
    with ServiceGroup([exits], env=dict(os.environ), cwd=tmp_path) as group, \
            pytest.raises(RuntimeError, match="code 4"):
        group.wait_healthy(timeout_s=20, poll_s=0.05)


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _processes() -> dict[int, tuple[int, int, str]]:
    """Every running process (zombies left out): pid -> (parent pid, process group, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if state not in ("Z", "X"):
            found[int(entry.name)] = (int(ppid), int(pgrp), cmdline)
    return found


def _descendants(root: int, processes: dict[int, tuple[int, int, str]]) -> set[int]:
    tree, added = {root}, True
    while added:
        new = {pid for pid, (ppid, _, _) in processes.items() if ppid in tree} - tree
        tree |= new
        added = bool(new)
    return tree - {root}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes left in /proc")
def test_pricelevel_ui_leaves_nothing_running_after_sigterm(project: Path, tmp_path: Path) -> None:
    """The real command, as systemd or ``docker stop`` ends it: Prefect, MLflow and their workers all go."""
    exe = Path(sys.executable).with_name("pricelevel")
    prefect_port, mlflow_port = _free_ports(2)
    env = {**os.environ, "PRICELEVEL_HOME": str(project), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        ui = subprocess.Popen([str(exe), "ui", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                              env=env, cwd=project, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    groups = {ui.pid}
    ports = (str(prefect_port), str(mlflow_port))

    def ours(cmdline: str) -> bool:
        return any(arg in ports or arg.endswith((f":{prefect_port}", f":{mlflow_port}")) for arg in cmdline.split())

    def left() -> list[str]:
        return [f"{pid} {cmd[:150]}" for pid, (_, pgrp, cmd) in _processes().items()
                if pid != ui.pid and (pgrp in groups or ours(cmd))]

    try:
        deadline = time.monotonic() + 90
        urls = [f"http://127.0.0.1:{prefect_port}/api/health", f"http://127.0.0.1:{mlflow_port}/"]
        while not all(_answers(u) for u in urls):
            assert ui.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "pricelevel ui not up after 90 s:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        running = _processes()
        tree = _descendants(ui.pid, running)
        groups |= {running[pid][1] for pid in tree}
        assert len(groups) >= 3 and len(tree) >= 3, (groups, tree)  # its own, Prefect's, MLflow's (+ workers)

        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=20)
        assert ui.returncode == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 3
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left(), left()
        assert not [pid for pid in tree if process_alive(pid)]
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        for pid, (_, pgrp, cmd) in _processes().items():  # only what this test started is still matched here
            if pgrp in groups or ours(cmd):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


#: Starts one fake service in a group (argv: pid file, "die" or "live"), then sleeps until killed.
STARTER = r"""
import os, sys, time
from pathlib import Path
from pricelevel.core.services import Service, ServiceGroup
pidfile, mode = sys.argv[1], sys.argv[2]
service = Service("helper", "http://127.0.0.1:0", (sys.executable, sys.argv[3], pidfile))
ServiceGroup([service], dict(os.environ), Path.cwd(), die_with_parent=mode == "die").start()
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["die", "live"])
def test_a_helper_server_dies_with_the_command_that_started_it_even_by_sigkill(tmp_path: Path, cleanup, mode: str) -> None:
    """``pricelevel train`` killed with SIGKILL left its temporary Prefect server running for ever ("live", the old
    behaviour, kept for a cluster's services); with ``die_with_parent`` the kernel sends the server SIGTERM."""
    pidfile = tmp_path / "helper.pid"
    cleanup.append(pidfile)
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(pidfile), mode, str(FAKE_SERVICE)], cwd=tmp_path)
    cleanup.append(starter.pid)
    deadline = time.monotonic() + 20
    while not pidfile.exists():
        assert starter.poll() is None and time.monotonic() < deadline, "the helper did not start"
        time.sleep(0.02)
    helper = _pids(pidfile)[0]
    starter.kill()
    starter.wait()
    if mode == "die":
        assert _gone([helper], within_s=10), "the helper outlived the process that started it"
    else:
        time.sleep(0.5)
        assert process_alive(helper)
