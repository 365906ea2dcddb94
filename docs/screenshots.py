"""Screenshots of what a user sees, taken in a real browser (headless Chromium), so the docs can refresh them.

    .venv/bin/python docs/screenshots.py [--out docs/img]                  # demo run in a throwaway folder
    .venv/bin/python docs/screenshots.py --project DIR                     # DIR's own runs (copies, read only)
    .venv/bin/python docs/screenshots.py --prefect-url URL --mlflow-url URL  # a running cluster, as it is

Writes five PNGs:

- ``prefect-deployments.png``: the Prefect UI's deployments page (``prefect.yaml``'s four deployments);
- ``prefect-flow-run.png``: a completed ``train`` flow run, its task graph on top;
- ``mlflow-models.png``: the registered model ``pricelevel``, its versions and their aliases;
- ``mlflow-compare.png``: MLflow's comparison of the newest training run's Optuna trials;
- ``backtest-report.png``: the Plotly backtest report logged with the registered version's run.

With no option, the script starts a Prefect server on a free port with its own ``PREFECT_HOME`` in a temporary
folder under /tmp and the MLflow UI (``mlflow ui``, as ``pricelevel ui`` starts it) on a store there, runs
``pricelevel train --quick`` and ``pricelevel promote`` into that folder (``make demo``'s steps: 3-5 minutes on
an idle 2-core machine, 50 on a loaded one), registers ``prefect.yaml`` with ``make deploy``, and starts a worker
per pool for the deployments page only (scheduled runs due in the next two minutes are deleted first, so the
workers run nothing). Everything it started is stopped at the end, also on Ctrl-C or SIGTERM.
``--workspace DIR`` uses and keeps DIR instead: a second call finds its run and only takes the pictures.
``--project DIR`` serves copies of DIR's Prefect database (``.prefect/prefect.db``) and MLflow store, and falls
back to the demo run when they hold no completed ``train`` run or no registered model. ``--prefect-url`` with
``--mlflow-url`` only reads a running cluster: nothing is deployed, started or written there.

Each page is loaded in headless Chromium over the DevTools protocol and photographed once its text holds the
words the page is about and has stopped changing; a page that never gets there (a spinner, an error page, a UI
that cannot reach its API) fails the script with the text it showed. A picture must not be blank (grey-level
spread and colour count), and is reduced to 256 colours (downscaled if needed) to stay under ``--max-kb``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WINDOW = (1440, 900)
DEPLOYMENTS = ("ingest-hourly", "train-nightly", "promote", "trade")  # prefect.yaml


@dataclass(frozen=True)
class Shot:
    """One page: where it is, the words its DOM must contain once rendered, the file it becomes."""

    name: str
    url: str
    expect: tuple[str, ...]
    settle_s: float = 3.0
    #: localStorage items set before the page's own scripts run (UI preferences: no assistant panel, ...).
    storage: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Site:
    """The two UIs to photograph and the project folder their runs came from."""

    prefect_url: str  # http://host:port (the UI; the API is <url>/api)
    mlflow_url: str  # http://host:port (UI and tracking API)
    project: Path = PROJECT


@dataclass
class Processes:
    """Background services of this script, each in its own process group; all stopped together."""

    logs: Path
    started: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(process)
        return process

    def stop(self, processes: Sequence[subprocess.Popen] | None = None) -> None:
        from pricelevel.core.services import stop_all

        chosen = list(self.started if processes is None else processes)
        stop_all(chosen, grace_s=15)
        self.started = [p for p in self.started if p not in chosen]


def say(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_json(url: str, body: object | None = None, timeout_s: float = 30) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read() or b"null")


def wait_answering(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until ``url`` answers 200; a service that exits first, or a timeout, fails with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise SystemExit(f"{url} did not answer within {timeout_s:.0f} s{'' if process is None or process.poll() is None else ' (exited)'}\n{tail}")


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, timeout_s: float) -> None:
    """A step that must succeed; its output goes to ``log``, whose tail is shown if it fails. Interrupted
    (Ctrl-C, SIGTERM, timeout), its whole process group is stopped."""
    from pricelevel.core.services import stop_all

    say("$ " + " ".join(str(a) for a in argv))
    with log.open("ab") as out:
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        finally:
            stop_all([process], grace_s=15)
    if code:
        raise SystemExit(f"failed ({code}): {' '.join(map(str, argv))}\n" + log.read_text(errors="replace")[-3000:])


# --- the services --------------------------------------------------------------------------------------------


def base_env(workspace: Path, prefect_api: str | None) -> dict[str, str]:
    """The project's quiet defaults, with Prefect's home, the data root and the MLflow store in ``workspace``."""
    from pricelevel.core.runtime import quiet_environment

    env = {**os.environ, **quiet_environment(PROJECT, {})}
    env.update({
        "PREFECT_HOME": str(workspace / "prefect"),
        "PRICELEVEL_HOME": str(PROJECT),
        "PRICELEVEL_DATA__ROOT": str(workspace / "data"),
        "PRICELEVEL_TRACKING__TRACKING_URI": f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}",
        "PRICELEVEL_TRACKING__ARTIFACT_LOCATION": str(workspace / "mlruns" / "artifacts"),
    })
    env.pop("PREFECT_API_URL", None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    for name in ("PRICELEVEL_FLOW__TASK_RUNNER", "PRICELEVEL_FLOW__DASK_ADDRESS", "PRICELEVEL_TUNING__STORAGE"):
        env.pop(name, None)  # a sourced .cluster/env must not send the demo run to a cluster
    return env


def start_prefect(processes: Processes, env: Mapping[str, str]) -> str:
    """``prefect server start`` on a free port. Its UI asks ``PREFECT_UI_API_URL`` (else ``PREFECT_API_URL``,
    else host and port from the *settings*, not from ``--port``: 4200) where the API is: set it, or the UI
    shows whichever server answers on 4200. No Prefect Cloud advertising in the pictures."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
    env.pop("PREFECT_API_URL", None)
    process = processes.start("prefect-server", argv, env, PROJECT)
    wait_answering(f"{url}/api/health", 180, process, processes.logs / "prefect-server.log")
    say(f"Prefect server {url}")
    return url


def start_mlflow(processes: Processes, env: Mapping[str, str], store: str, artifacts: str) -> str:
    """``mlflow ui`` on ``store``, as ``pricelevel ui`` starts it."""
    port = free_port()
    argv = [str(BIN / "mlflow"), "ui", "--backend-store-uri", store, "--default-artifact-root", artifacts,
            "--host", "127.0.0.1", "--port", str(port)]
    process = processes.start("mlflow-ui", argv, env, PROJECT)
    url = f"http://127.0.0.1:{port}"
    wait_answering(f"{url}/health", 180, process, processes.logs / "mlflow-ui.log")
    say(f"MLflow UI {url}")
    return url


def demo_run(workspace: Path, env: Mapping[str, str]) -> None:
    """``make demo``'s two steps, into ``workspace``."""
    (workspace / "mlruns").mkdir(parents=True, exist_ok=True)
    log = workspace / "logs" / "pipeline.log"
    run([str(BIN / "pricelevel"), "train", "--quick"], env, PROJECT, log, timeout_s=3600)
    run([str(BIN / "pricelevel"), "promote"], env, PROJECT, log, timeout_s=1800)


def deploy(env: Mapping[str, str], log: Path) -> None:
    """``make deploy`` (work pools, queue, ``prefect deploy --all``) against our own server; ``-o`` keeps make
    from reinstalling the project on the way."""
    run(["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv/.installed-dev", "deploy",
         f"BIN={BIN}"], env, PROJECT, log, timeout_s=600)


def poll_pools_once(processes: Processes, env: Mapping[str, str], api: str) -> list[subprocess.Popen]:
    """A worker per pool, so the deployments read "Ready" as they do with workers running. Scheduled runs due
    within the next two minutes are deleted first (our throwaway server only): the workers must not run them."""
    soon = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    due = http_json(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}},
                                                               "expected_start_time": {"before_": soon}}})
    for flow_run in due:
        urllib.request.urlopen(urllib.request.Request(f"{api}/flow_runs/{flow_run['id']}", method="DELETE"), timeout=30)
    workers = []
    for pool in ("pricelevel-process", "pricelevel-trader"):
        argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--prefetch-seconds", "0"]
        workers.append(processes.start(f"worker-{pool}", argv, env, PROJECT))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        deployments = http_json(f"{api}/deployments/filter", {})
        if deployments and all(d.get("status") == "READY" for d in deployments):
            return workers
        time.sleep(1)
    say("warning: not every deployment became Ready within 120 s")
    return workers


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database that may be in use (the backup API, not a file copy)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def project_config(project: Path = PROJECT):  # noqa: ANN201 (pricelevel.config.Config, imported lazily)
    """``project``'s configuration as its commands see it (base, ``PRICELEVEL_*``), paths resolved there."""
    from pricelevel.config import load_project_config

    return load_project_config(env={**os.environ, "PRICELEVEL_HOME": str(project)})


def project_stores(project: Path) -> tuple[Path, Path, str]:
    """``project``'s Prefect database (its temporary servers' ``.prefect``), MLflow database and artifact root."""
    tracking = project_config(project).tracking
    if not tracking.tracking_uri.startswith("sqlite:///"):
        raise SystemExit(f"--project: {project}'s tracking store is {tracking.tracking_uri}; pass --mlflow-url")
    return (project / ".prefect" / "prefect.db", Path(tracking.tracking_uri.removeprefix("sqlite:///")),
            tracking.artifact_location)


# --- what is on the pages ------------------------------------------------------------------------------------


def newest_completed_train(api: str) -> dict | None:
    runs = http_json(f"{api}/flow_runs/filter", {
        "flows": {"name": {"any_": ["train"]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "START_TIME_DESC", "limit": 1})
    return runs[0] if runs else None


def deployment_names(api: str) -> list[str]:
    return [d["name"] for d in http_json(f"{api}/deployments/filter", {})]


@dataclass(frozen=True)
class Registered:
    """The newest registered version, the run that made it, its Optuna trials and its experiment."""

    model: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    trial_ids: tuple[str, ...]
    trial_names: tuple[str, ...]
    experiment_id: str


def newest_registered(mlflow_url: str, model: str) -> Registered | None:
    api = f"{mlflow_url}/api/2.0/mlflow"
    try:
        found = http_json(f"{api}/registered-models/get?name={urllib.parse.quote(model)}")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    versions = http_json(f"{api}/model-versions/search?" + urllib.parse.urlencode({"filter": f"name='{model}'"}))
    versions = sorted(versions.get("model_versions", []), key=lambda v: int(v["version"]))
    if not versions:
        return None
    newest = versions[-1]
    run = http_json(f"{api}/runs/get?run_id={newest['run_id']}")["run"]
    experiment = run["info"]["experiment_id"]
    trials = http_json(f"{api}/runs/search", {
        "experiment_ids": [experiment], "max_results": 50, "order_by": ["attributes.start_time ASC"],
        "filter": f"tags.mlflow.parentRunId = '{newest['run_id']}'"}).get("runs", [])
    aliases = tuple(a["alias"] for a in found["registered_model"].get("aliases", []))
    return Registered(model, newest["version"], aliases, newest["run_id"],
                      tuple(t["info"]["run_id"] for t in trials), tuple(t["info"]["run_name"] for t in trials), experiment)


def backtest_report(mlflow_url: str, registered: Registered, into: Path) -> Path:
    """The registered version's ``backtest/report.html`` (with ``plotly.min.js`` beside it), from its run."""
    import mlflow.artifacts

    folder = Path(mlflow.artifacts.download_artifacts(run_id=registered.run_id, artifact_path="backtest",
                                                      dst_path=str(into), tracking_uri=mlflow_url))
    report = folder / "report.html"
    if not report.exists():
        raise SystemExit(f"run {registered.run_id} has no backtest/report.html among its artifacts")
    return report


#: MLflow UI preferences: the "Model training" sidebar (not GenAI), the assistant panel closed, light theme.
MLFLOW_STORAGE = (("mlflow.workflowType_v1", json.dumps("machine_learning")),
                  ("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true"),
                  ("mlflow.assistant.panelOpen_v1", "false"),
                  ("_mlflow_dark_mode_toggle_enabled", "false"))


def shots(site: Site, registered: Registered, flow_run: dict, report: Path, symbols: Sequence[str]) -> list[Shot]:
    compare = "#/compare-runs?" + urllib.parse.urlencode(
        {"runs": json.dumps(list(registered.trial_ids)), "experiments": json.dumps([registered.experiment_id])},
        quote_via=urllib.parse.quote)
    return [
        Shot("prefect-deployments", f"{site.prefect_url}/deployments", DEPLOYMENTS),
        Shot("prefect-flow-run", f"{site.prefect_url}/runs/flow-run/{flow_run['id']}",
             (flow_run["name"], "Completed")),
        Shot("mlflow-models", f"{site.mlflow_url}/#/models/{registered.model}",
             (registered.model, *registered.aliases), storage=MLFLOW_STORAGE),
        Shot("mlflow-compare", f"{site.mlflow_url}/{compare}", registered.trial_names[:3], storage=MLFLOW_STORAGE),
        Shot("backtest-report", report.resolve().as_uri(), tuple(symbols[:2])),
    ]


# --- the browser ---------------------------------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install -y chromium (or pass --chromium PATH)")


class Browser:
    """Headless Chromium driven over the DevTools protocol: load a page, wait in real time until its text holds
    the expected words and stops changing, then photograph it. (``--screenshot`` with ``--virtual-time-budget``
    never returned on MLflow's WebGL comparison charts on a loaded machine; this waits with a deadline.)"""

    def __init__(self, executable: str, profile: Path, processes: Processes):
        argv = [executable, "--headless=new", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--mute-audio", "--disable-crash-reporter", "--disable-breakpad",
                "--remote-debugging-port=0", f"--user-data-dir={profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--no-sandbox")  # Chromium refuses to start as root with its sandbox
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a previous browser's
        self.process = processes.start("chromium", argv, os.environ, profile)
        try:
            self.socket = self._connect(port_file, processes.logs / "chromium.log")
        except BaseException:
            processes.stop([self.process])
            raise
        self.next_id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})

    def _connect(self, port_file: Path, log: Path):  # noqa: ANN202 (a websockets ClientConnection)
        from websockets.sync.client import connect

        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"Chromium did not start (see {log})")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in http_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page"]
        return connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def call(self, method: str, params: Mapping[str, object] | None = None, timeout_s: float = 120) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": dict(params or {})}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def text(self) -> str:
        result = self.call("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''",
                                                "returnByValue": True})
        return str(result.get("result", {}).get("value") or "")

    def photograph(self, shot: Shot, raw: Path, timeout_s: float) -> None:
        """Load ``shot.url``; once its text holds every expected word and has not changed for 3 s, the picture.
        A page that never gets there fails with the text it showed."""
        self.call("Page.navigate", {"url": "about:blank"})
        if shot.storage:
            origin = urllib.parse.urlsplit(shot.url)
            items = json.dumps(dict(shot.storage))
            self.call("Page.addScriptToEvaluateOnNewDocument", {"source": (
                f"if (location.origin === {json.dumps(f'{origin.scheme}://{origin.netloc}')}) "
                f"for (const [k, v] of Object.entries({items})) localStorage.setItem(k, v);")})
        self.call("Page.navigate", {"url": shot.url})
        deadline = time.monotonic() + timeout_s
        previous, steady_since = None, time.monotonic()
        while True:
            time.sleep(1)
            text = self.text()
            if text != previous:
                previous, steady_since = text, time.monotonic()
            missing = [word for word in shot.expect if word.lower() not in text.lower()]
            if not missing and time.monotonic() - steady_since >= 3:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{shot.name}: {shot.url} still lacks {missing or 'a steady page'} after "
                                 f"{timeout_s:.0f} s (a spinner or an error page?); it shows: {text[:400]!r}")
        time.sleep(shot.settle_s)  # charts drawn after the text (Plotly, the flow run graph)
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        raw.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.socket.close()


def capture(browser: Browser, shot: Shot, out: Path, scratch: Path, max_kb: int, timeout_s: float) -> Path:
    """The page's picture, checked not blank, in ``out``."""
    raw = scratch / f"{shot.name}.raw.png"
    browser.photograph(shot, raw, timeout_s)
    target = out / f"{shot.name}.png"
    check_and_shrink(raw, target, max_kb)
    return target


def check_and_shrink(raw: Path, target: Path, max_kb: int) -> None:
    """Not blank (enough distinct colours and contrast), then 256 colours, downscaled until under ``max_kb``."""
    from PIL import Image, ImageStat

    with Image.open(raw) as image:
        rgb = image.convert("RGB")
    gray = rgb.convert("L")
    spread = ImageStat.Stat(gray).stddev[0]
    colours = len(rgb.getcolors(maxcolors=1 << 20) or ())
    if spread < 8 or colours < 16:
        raise SystemExit(f"{target.name}: the page looks blank (grey-level spread {spread:.1f}, {colours} colours)")
    scale = 1.0
    while True:
        size = (round(rgb.width * scale), round(rgb.height * scale))
        picture = rgb if scale == 1.0 else rgb.resize(size, Image.Resampling.LANCZOS)
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            target, optimize=True)
        if target.stat().st_size <= max_kb * 1024 or scale < 0.5:
            return
        scale *= 0.85


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROJECT / "docs" / "img", help="folder for the PNGs")
    parser.add_argument("--project", type=Path, help="serve copies of this project's Prefect and MLflow stores")
    parser.add_argument("--prefect-url", help="a running Prefect server (http://host:4200), read only")
    parser.add_argument("--mlflow-url", help="a running MLflow server (http://host:5000), read only")
    parser.add_argument("--model", default="pricelevel", help="registered model name")
    parser.add_argument("--chromium", help="the browser (default: chromium on PATH)")
    parser.add_argument("--max-kb", type=int, default=300, help="largest PNG, in KB")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--workspace", type=Path, help="use and keep this folder instead of a temporary one; a "
                        "second call reuses its run (no pipeline) and only takes the pictures again")
    parser.add_argument("--page-timeout", type=float, default=180, help="seconds a page may take to render")
    args = parser.parse_args(argv)
    if bool(args.prefect_url) != bool(args.mlflow_url):
        parser.error("--prefect-url and --mlflow-url go together")
    if args.project and args.prefect_url:
        parser.error("--project or --prefect-url/--mlflow-url, not both")
    return args


def serve_demo(workspace: Path, processes: Processes, model: str) -> Site:
    """Our own Prefect server and MLflow UI on ``workspace``; the demo pipeline runs into it first when it holds
    no completed ``train`` run or no registered model yet (a ``--workspace`` kept from an earlier call may)."""
    (workspace / "mlruns").mkdir(parents=True, exist_ok=True)
    env = base_env(workspace, None)
    prefect = start_prefect(processes, env)
    env = base_env(workspace, f"{prefect}/api")
    mlflow = start_mlflow(processes, env, env["PRICELEVEL_TRACKING__TRACKING_URI"],
                          env["PRICELEVEL_TRACKING__ARTIFACT_LOCATION"])
    if newest_completed_train(f"{prefect}/api") is None or newest_registered(mlflow, model) is None:
        say("running the demo pipeline (pricelevel train --quick; pricelevel promote): minutes")
        demo_run(workspace, env)
    else:
        say(f"{workspace} already holds a completed train run and a registered model: reusing them")
    return Site(prefect, mlflow)


def serve_project(project: Path, workspace: Path, processes: Processes, model: str) -> Site | None:
    """Copies of ``project``'s stores, served; None when they hold no completed train run or no model."""
    prefect_db, mlflow_db, artifacts = project_stores(project)
    if not prefect_db.exists() or not mlflow_db.exists():
        say(f"{project}: no Prefect database ({prefect_db}) or MLflow store ({mlflow_db})")
        return None
    copy_sqlite(prefect_db, workspace / "prefect" / "prefect.db")
    copy_sqlite(mlflow_db, workspace / "mlruns" / "mlflow.db")
    env = base_env(workspace, None)
    prefect = start_prefect(processes, env)
    mlflow = start_mlflow(processes, env, f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}", artifacts)
    site = Site(prefect, mlflow, project)
    if newest_completed_train(f"{prefect}/api") is None or newest_registered(mlflow, model) is None:
        say(f"{project}: no completed train flow run or no registered {model!r} version; the demo run instead")
        processes.stop()
        shutil.rmtree(workspace / "prefect")  # the demo starts from empty stores, not from these copies
        (workspace / "mlruns" / "mlflow.db").unlink()
        return None
    return site


def take(site: Site, args: argparse.Namespace, workspace: Path, processes: Processes) -> list[Path]:
    api = f"{site.prefect_url}/api"
    flow_run = newest_completed_train(api)
    registered = newest_registered(site.mlflow_url, args.model)
    if flow_run is None:
        raise SystemExit(f"{site.prefect_url} has no completed `train` flow run")
    if registered is None:
        raise SystemExit(f"{site.mlflow_url} has no registered version of {args.model!r}")
    if len(registered.trial_ids) < 2:
        raise SystemExit(f"run {registered.run_id} has {len(registered.trial_ids)} trial run(s); the comparison needs 2")
    missing = set(DEPLOYMENTS) - set(deployment_names(api))
    if missing:
        raise SystemExit(f"{site.prefect_url} lacks the deployments {sorted(missing)}: run `make deploy` against it")
    report = backtest_report(site.mlflow_url, registered, workspace / "report")
    symbols = project_config().training_symbols
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = workspace / "raw"
    scratch.mkdir(exist_ok=True)
    shutil.rmtree(workspace / "chromium", ignore_errors=True)
    browser = Browser(args.chromium or chromium(), workspace / "chromium", processes)
    written = []
    try:
        for shot in shots(site, registered, flow_run, report, symbols):
            started = time.monotonic()
            path = capture(browser, shot, args.out, scratch, args.max_kb, args.page_timeout)
            say(f"{path} ({path.stat().st_size // 1024} KB, {time.monotonic() - started:.0f} s): {shot.url}")
            written.append(path)
    finally:
        browser.close()
        processes.stop([browser.process])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import pricelevel  # noqa: F401
    except ImportError:
        raise SystemExit("pricelevel is not importable: run this with the project's environment "
                         "(.venv/bin/python docs/screenshots.py)") from None
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop what we started
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    started = time.monotonic()
    if args.workspace:
        workspace = args.workspace.resolve()
        workspace.mkdir(parents=True, exist_ok=True)
    else:
        workspace = Path(tempfile.mkdtemp(prefix="plshots-", dir="/tmp"))
    (workspace / "logs").mkdir(exist_ok=True)
    processes = Processes(workspace / "logs")
    say(f"working in {workspace} (service logs in {workspace / 'logs'})")
    try:
        if args.prefect_url:
            site = Site(args.prefect_url.rstrip("/"), args.mlflow_url.rstrip("/"))
            return finish(take(site, args, workspace, processes), started)
        site = serve_project(args.project.resolve(), workspace, processes, args.model) if args.project else None
        if site is None:
            site = serve_demo(workspace, processes, args.model)
        env = base_env(workspace, f"{site.prefect_url}/api")
        if not set(DEPLOYMENTS) <= set(deployment_names(f"{site.prefect_url}/api")):
            deploy(env, workspace / "logs" / "deploy.log")
        workers = poll_pools_once(processes, env, f"{site.prefect_url}/api")
        try:
            return finish(take(site, args, workspace, processes), started)
        finally:
            processes.stop(workers)
    finally:
        processes.stop()
        if args.keep or args.workspace:
            say(f"kept {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)


def finish(written: list[Path], started: float) -> int:
    say(f"{len(written)} screenshots in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
