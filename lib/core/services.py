"""Long-running local services (Prefect server, MLflow UI) started together and stopped together.

Each service runs in its own process group, so stopping it also stops whatever it spawned (uvicorn workers,
huey consumers). ``run_services`` stops them all on Ctrl-C, SIGINT or SIGTERM (systemd, ``docker stop``),
when one of them exits, or when the caller's ``stop`` event is set: nothing is left behind. A process that
moves itself to another group or session (``setsid``) escapes this; none of ours do.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Signals that mean "stop now, cleanly": Ctrl-C / ``kill -INT``, and what systemd and ``docker stop`` send.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    argv: tuple[str, ...]
    #: What answers once the service is ready (``url`` when empty).
    health_url: str = ""
    #: Variables set for this service only, on top of the group's environment.
    env: tuple[tuple[str, str], ...] = ()


def prefect_server(bin_dir: Path, host: str, port: int, database_url: str | None = None) -> Service:
    """``prefect server start``; on ``database_url`` (``postgresql+asyncpg://user@host/db``, password from
    ``PGPASSWORD``/``PGPASSFILE``) instead of its SQLite file."""
    env = (("PREFECT_API_DATABASE_CONNECTION_URL", database_url),) if database_url else ()
    return Service("Prefect", f"http://{host}:{port}",
                   (str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(port)),
                   health_url=f"http://{host}:{port}/api/health", env=(*_ui_api(host, port), *env))


def _ui_api(host: str, port: int) -> tuple[tuple[str, str], ...]:
    """The API address the Prefect UI's browser code calls: without it the UI asks port 4200 whatever ``--port``
    says, and shows "Can't connect" (or another server's runs)."""
    return (("PREFECT_UI_API_URL", f"http://{host}:{port}/api"),
            ("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false"))


def mlflow_server(bin_dir: Path, backend_store_uri: str, artifacts_destination: str, host: str, port: int,
                  allowed_hosts: str | None = None) -> Service:
    """``mlflow server`` that stores runs and the registry in ``backend_store_uri`` and serves the artifacts
    itself (clients on any machine upload and download through it: ``mlflow-artifacts:/``)."""
    argv = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
            "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    return Service("MLflow", f"http://{host}:{port}", tuple(argv), health_url=f"http://{host}:{port}/health")


def dask_scheduler(bin_dir: Path, host: str, port: int, dashboard_port: int) -> Service:
    """``dask scheduler`` with the workers' preload: it unpickles every graph, and importing the task modules
    (torch, Lightning, Prefect) on the first one blocked it for 37 s on a loaded machine, long enough for a
    flow's connection to drop mid-fan-out; the preload imports them at start-up instead."""
    return Service("Dask scheduler", f"tcp://{host}:{port}",
                   (str(bin_dir / "dask"), "scheduler", "--host", host, "--port", str(port),
                    "--dashboard-address", f"{host}:{dashboard_port}", "--preload", "tasks.runtime"),
                   health_url=f"http://{host}:{dashboard_port}/health")


def dask_worker(bin_dir: Path, scheduler: str, name: str, host: str, dashboard_port: int,
                resources: str | None = None) -> Service:
    """One worker process with one thread (the numba kernels hold the GIL), bootstrapped like a flow;
    ``resources="GPU=1"`` makes it the one that receives the training tasks asking for CUDA."""
    argv = [str(bin_dir / "dask"), "worker", scheduler, "--name", name, "--nworkers", "1", "--nthreads", "1",
            "--host", host, "--dashboard-address", f"{host}:{dashboard_port}", "--preload", "tasks.runtime"]
    if resources:
        argv += ["--resources", resources]
    return Service(f"Dask worker {name}", scheduler, tuple(argv), health_url=f"http://{host}:{dashboard_port}/health")


def prefect_worker(bin_dir: Path, pool: str, host: str, health_port: int) -> Service:
    """``prefect worker start`` on ``pool``; its health check answers once it polls the server."""
    return Service(f"Prefect worker {pool}", pool,
                   (str(bin_dir / "prefect"), "worker", "start", "--pool", pool, "--with-healthcheck"),
                   health_url=f"http://{host}:{health_port}/health",
                   env=(("PREFECT_WORKER_WEBSERVER_HOST", host), ("PREFECT_WORKER_WEBSERVER_PORT", str(health_port))))


def ui_commands(
    bin_dir: Path, tracking_uri: str, artifact_location: str, prefect_port: int, mlflow_port: int
) -> list[Service]:
    """Prefect server and MLflow UI, both bound to 127.0.0.1, MLflow reading the project's tracking store."""
    return [
        Service("Prefect", f"http://127.0.0.1:{prefect_port}",
                (str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)),
                health_url=f"http://127.0.0.1:{prefect_port}/api/health", env=_ui_api("127.0.0.1", prefect_port)),
        Service("MLflow", f"http://127.0.0.1:{mlflow_port}",
                (str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
                 "--default-artifact-root", artifact_location,
                 "--host", "127.0.0.1", "--port", str(mlflow_port))),
    ]


@contextlib.contextmanager
def stop_on_signals(event: threading.Event, signals: Sequence[int] = STOP_SIGNALS) -> Iterator[bool]:
    """Turn ``signals`` into ``event.set()`` for the duration, so the caller can stop its children first.

    Installed whatever the inherited disposition: ``cmd &`` in a script starts ``cmd`` with SIGINT ignored,
    which would make ``kill -INT`` do nothing. The previous handlers come back on exit (one installed outside
    Python cannot be restored and becomes SIG_DFL). Yields whether the handlers were installed: Python only
    allows it in the main thread; elsewhere nothing is installed and the caller relies on ``event`` alone.

    The handler runs in the main thread, so do not block there in ``event.wait()`` (the handler's ``set()``
    could wait for the lock that ``wait()`` holds): poll ``event.is_set()`` or wait from another thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(signum: int, frame: object) -> None:
        event.set()

    previous: dict[int, object] = {}
    try:
        for sig in signals:
            old = signal.signal(sig, handler)
            previous[sig] = signal.SIG_DFL if old is None else old
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: prctl(2) option: the signal this process gets when the thread that forked it exits.
PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> Callable[[], object] | None:
    """A hook for the child, before exec: SIGTERM when the parent's starting thread dies. Looked up in the parent
    (nothing may be loaded between fork and exec); None where there is no prctl (not Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, PR_SET_PDEATHSIG, int(signal.SIGTERM))


class ServiceGroup:
    """Services started together, each in its own process group, and stopped together (also as ``with``)."""

    def __init__(self, services: Sequence[Service], env: Mapping[str, str], cwd: Path, grace_s: float = 10.0,
                 quiet: bool = False, die_with_parent: bool = False):
        self.services = tuple(services)
        #: Discard the services' output (a helper server whose banner would mix into a command's output).
        self.quiet = quiet
        #: Linux: the services get SIGTERM when the thread that started them dies, even by SIGKILL (a helper server
        #: of one command must not outlive it; a cluster's services outlive their supervisor on purpose).
        self.die_with_parent = die_with_parent
        self.env = dict(env)
        self.cwd = cwd
        self.grace_s = grace_s
        self.processes: list[subprocess.Popen] = []
        #: Seconds from :meth:`wait_healthy`'s call until each service answered.
        self.ready_s: dict[str, float] = {}
        self._stopped = False

    def start(self) -> None:
        """Start every service; if one cannot start, stop those started before it and raise."""
        before_exec = _terminate_with_parent() if self.die_with_parent else None
        try:
            for service in self.services:
                output = subprocess.DEVNULL if self.quiet else None
                self.processes.append(subprocess.Popen(
                    service.argv, env={**self.env, **dict(service.env)}, cwd=self.cwd, start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                    preexec_fn=before_exec))
        except BaseException:
            self.stop()
            raise

    def exit_code(self) -> int | None:
        """Exit code of the first service found to have exited (128+N when killed by signal N), else None."""
        for process in self.processes:
            code = _exit_code(process)
            if code is not None:
                return code
        return None

    def wait(self, stop: threading.Event, poll_s: float = 0.2) -> int:
        """Block until a service exits (its exit code) or ``stop`` is set (0).

        Polls rather than blocking in ``stop.wait()``: see :func:`stop_on_signals`.
        """
        while not stop.is_set():
            code = self.exit_code()
            if code is not None:
                return code
            time.sleep(poll_s)
        return 0

    def wait_healthy(self, timeout_s: float, stop: threading.Event | None = None, poll_s: float = 0.5) -> bool:
        """Block until every service answers its health URL (True), or ``stop`` is set (False).

        Raises RuntimeError when a service exits first, TimeoutError after ``timeout_s``.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        waiting = list(self.services)
        while waiting:
            if stop is not None and stop.is_set():
                return False
            code = self.exit_code()
            if code is not None:
                raise RuntimeError(f"a service exited with code {code} before every service was up")
            for service in [s for s in waiting if _answers(s.health_url or s.url)]:
                self.ready_s[service.name] = time.monotonic() - started
            waiting = [s for s in waiting if s.name not in self.ready_s]
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not up after {timeout_s:g} s: {', '.join(s.name for s in waiting)}")
            if waiting:
                time.sleep(poll_s)
        return True

    def stop(self) -> None:
        """Stop every process group (once; later calls do nothing): see :func:`stop_all`."""
        if not self._stopped:
            self._stopped = True
            stop_all(self.processes, self.grace_s)

    def __enter__(self) -> ServiceGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_services(
    services: Sequence[Service],
    env: Mapping[str, str],
    cwd: Path,
    stop: threading.Event | None = None,
    grace_s: float = 10.0,
    *,
    handle_signals: bool = True,
) -> int:
    """Run until one service exits, ``stop`` is set, or SIGINT/SIGTERM/Ctrl-C; then stop every process group.

    Returns the exit code of the service that ended first (128+N when killed by signal N), 0 when stopped
    on purpose. Signal handlers are installed only when called from the main thread (and
    ``handle_signals``); elsewhere ``stop`` is the way to end the run.
    """
    stop = stop or threading.Event()
    group = ServiceGroup(services, env, cwd, grace_s)
    with stop_on_signals(stop) if handle_signals else contextlib.nullcontext(False):
        try:
            group.start()
            return group.wait(stop)
        except KeyboardInterrupt:  # off the main thread's handlers, or before they were installed
            return 0
        finally:
            group.stop()  # handlers still installed: a second signal cannot cut the stopping short


def stop_all(processes: Sequence[subprocess.Popen], grace_s: float, poll_s: float = 0.05) -> None:
    """SIGTERM each process group, give them ``grace_s`` together to exit, then SIGKILL what is left.

    Waits for every live member of a group, not only its leader, so workers get their grace too. Leaders
    are reaped last: until then a leader's pid, which is its group id, cannot be reused by another group,
    so the final SIGKILL cannot reach a stranger. Anything raised while waiting (Ctrl-C) goes straight to
    the SIGKILL.
    """
    for process in processes:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        while any(_group_running(p) for p in processes) and time.monotonic() < deadline:
            time.sleep(poll_s)
    finally:
        for process in processes:
            _signal_group(process, signal.SIGKILL)  # what ignored SIGTERM, leader or worker
        for process in processes:
            process.wait()


def _exit_code(process: subprocess.Popen) -> int | None:
    """Exit code if ``process`` has ended, without reaping it (see :func:`stop_all`)."""
    if process.returncode is not None:
        code = process.returncode
    elif hasattr(os, "waitid"):
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            code = process.poll()
        else:
            if info is None:
                return None
            return info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status
    else:
        code = process.poll()
    if code is None:
        return None
    return 128 - code if code < 0 else code


def _group_running(process: subprocess.Popen) -> bool:
    """Whether any process of the group runs (zombies do not: where init does not reap, they stay)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():  # no /proc: the leader is all we can tell
        return _exit_code(process) is None
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(pgrp) == process.pid and state not in ("Z", "X"):
            return True
    return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    if process.returncode is not None and not _group_running(process):
        return  # leader reaped and group empty: its id may belong to someone else by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _answers(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False
