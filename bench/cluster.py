"""Scale-out figures, printed as JSON (README "Scaling out"):

- start-up time of each service of `make cluster-up` (PostgreSQL, Prefect, MLflow, Dask scheduler, workers);
- overhead per task of the thread / process / dask runners (20 no-op tasks, after the runner's start-up);
- wall time of levels + features for 10 symbols at 1h with 1 and 2 Dask workers (speed-up, efficiency);
- Optuna trials per minute with 1 vs 2 workers sharing one PostgreSQL study (1 s of CPU per trial);
- the nightly (``pricelevel train`` on a small config) on a local cluster (PostgreSQL, Prefect and MLflow servers,
  a real ``dask scheduler`` with 2 workers, ``tuning.workers: 2``) vs the thread runner on the default local
  config, wall time by step from the Prefect API's task runs; the per-task overhead on that scheduler; and the
  cost model's inputs and break-even (README "Scaling out", "When the cluster pays off").

    .venv/bin/python bench/cluster.py [--skip-services] [--only STEP] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "DOTUSDT", "LINKUSDT", "LTCUSDT"]
TASKS = 20
#: The nightly's config: 4 symbols at 4h, a tiny LSTM, 4 trials (each task does real work, in seconds).
NIGHTLY = ["data.symbols=[BTCUSDT,ETHUSDT,SOLUSDT,XRPUSDT]", "data.start=2023-06-01", "levels.lookback_days=120",
           "levels.refit_every=6", "labels.horizon=6", "dataset.timeframe=4h", "dataset.seq_len=16",
           "model.hidden_size=8", "model.num_layers=1", "model.max_epochs=1", "model.patience=1",
           "model.num_threads=1", "model.batch_size=128", "model.limit_train_batches=5", "tuning.n_trials=4",
           "tuning.max_epochs=1", "tuning.space.hidden_size=[8]", "tuning.space.num_layers=[1,1]",
           "tuning.space.batch_size=[128]", "tuning.space.seq_len=[12,16]", "flow.max_workers=2"]
#: The bench cluster's ports (engineer C's range of this session, 22000-22999): PostgreSQL, Prefect, MLflow,
#: scheduler, dashboard (worker dashboards and Prefect worker health checks take the next four).
PORTS = {"postgres_port": 22433, "prefect_port": 22200, "mlflow_port": 22500, "dask_port": 22786,
         "dashboard_port": 22787}


def _project(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "conf", folder / "conf")
    (folder / "data" / "sample").symlink_to(ROOT / "data" / "sample", target_is_directory=True)
    return folder


def services(work: Path) -> dict:
    """`cluster up` in a throwaway project (ports shifted by 30000), its start-up times, then `cluster down`."""
    project = _project(work / "services")
    env = {**os.environ, "PRICELEVEL_HOME": str(project), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "flows.commands.cluster"]
    started = time.perf_counter()
    up = subprocess.run([*command, "up", "--port-offset", "30000"], cwd=project, env=env, capture_output=True,
                        text=True, timeout=600)
    total = time.perf_counter() - started
    startup = json.loads((project / ".cluster" / "startup.json").read_text()) if up.returncode == 0 else {}
    started = time.perf_counter()
    subprocess.run([*command, "down"], cwd=project, env=env, capture_output=True, timeout=300)
    return {"ready_after_s": startup, "cluster_up_s": round(total, 1), "cluster_down_s": round(time.perf_counter() - started, 1),
            "ok": up.returncode == 0}


def _noop_overhead(dask_address: str | None = None) -> dict:
    from prefect import flow, task

    from pricelevel.core.config import FlowConfig
    from tasks.runtime import fan_out

    @task(name="noop")
    def noop(i: int) -> int:
        return i

    @flow(name="bench-overhead")
    def overhead(kind: str) -> dict:
        started = time.perf_counter()
        with fan_out(FlowConfig(task_runner=kind, max_workers=2)) as runner:
            runner.submit(noop, {"i": -1}).result()  # the runner's (and its workers') start-up
            warm = time.perf_counter()
            [f.result() for f in [runner.submit(noop, {"i": i}) for i in range(TASKS)]]
            done = time.perf_counter()
        return {"startup_s": round(warm - started, 2), "per_task_ms": round(1000 * (done - warm) / TASKS, 1)}

    @flow(name="bench-overhead-scheduler")
    def overhead_on(address: str) -> dict:
        started = time.perf_counter()
        with fan_out(FlowConfig(task_runner="dask", dask_address=address, max_workers=2)) as runner:
            runner.submit(noop, {"i": -1}).result()  # the client's connection
            warm = time.perf_counter()
            [f.result() for f in [runner.submit(noop, {"i": i}) for i in range(TASKS)]]
            done = time.perf_counter()
        return {"startup_s": round(warm - started, 2), "per_task_ms": round(1000 * (done - warm) / TASKS, 1)}

    if dask_address:  # a running scheduler (its workers started already): needs PREFECT_API_URL
        return {"dask_scheduler": overhead_on(dask_address)}
    return {kind: overhead(kind) for kind in ("thread", "process", "dask")}


def _tables(validated: Path, work: Path, workers: int) -> dict:
    from prefect import flow

    from tasks.runtime import fan_out, load_run_config
    from tasks.train import feature_bars, find_levels

    @flow(name="bench-tables")
    def tables(overrides: list[str]) -> dict:
        config = load_run_config(None, overrides)
        with fan_out(config.flow) as runner:
            started = time.perf_counter()
            _ = runner.client  # the LocalCluster starts here; timed apart from the work
            warm = time.perf_counter()
            levels = [runner.submit(find_levels, {"config": config, "symbol": s}) for s in SYMBOLS]
            done = [runner.submit(feature_bars, {"config": config, "levels": f}) for f in levels]
            built = [f.result().built for f in done]
            end = time.perf_counter()
        assert all(built)
        return {"cluster_start_s": round(warm - started, 1), "wall_s": round(end - warm, 1)}

    project = _project(work / f"tables-{workers}")
    shutil.copytree(validated, project / "data" / "validated")
    os.environ["PRICELEVEL_HOME"] = str(project)
    return tables([f"data.symbols=[{','.join(SYMBOLS)}]", "dataset.timeframe=1h", "flow.task_runner=dask",
                   f"flow.max_workers={workers}"])


def levels_features(work: Path) -> dict:
    from flows.ingest import ingest

    source = _project(work / "ingest")
    os.environ["PRICELEVEL_HOME"] = str(source)
    ingest(overrides=[f"data.symbols=[{','.join(SYMBOLS)}]"])
    one, two = (_tables(source / "data" / "validated", work, n) for n in (1, 2))
    speedup = one["wall_s"] / two["wall_s"]
    return {"symbols": len(SYMBOLS), "timeframe": "1h", "dask_1_worker": one, "dask_2_workers": two,
            "speedup": round(speedup, 2), "efficiency": round(speedup / 2, 2), "goal_speedup": 1.7}


def optuna_rate(work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import optuna

    from pricelevel.core.postgres import LocalPostgres
    from tests.postgres import TEST_SETTINGS, free_port

    folder = Path(tempfile.mkdtemp(prefix="pricelevel-pg-bench-"))
    folder.chmod(0o755)
    pg = LocalPostgres(folder / "pg", free_port())
    pg.init("bench-only")
    pg.start(settings=TEST_SETTINGS)
    os.environ["PGPASSFILE"] = str(pg.write_pgpass("bench-only"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = ROOT / "tests" / "fakes" / "optuna_worker.py"
    results = {}
    try:
        for workers in (1, 2):
            database = f"optuna_{workers}"
            pg.create_database(database, "bench-only")
            trials = 12
            outs = [work / f"optuna-{workers}-{k}" / "out.json" for k in range(workers)]
            for out in outs:
                out.parent.mkdir(parents=True)
            # The workers begin together, imports done; the rate counts from the first trial's start to the last end.
            optuna.create_study(study_name="bench", storage=pg.url(database), direction="maximize")
            start_at = time.time() + 45
            procs = [subprocess.Popen([sys.executable, str(worker), pg.url(database), "bench", str(trials), str(out),
                                       "--work", "1.0", "--start-at", str(start_at)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for out in outs]
            for proc in procs:
                proc.wait(timeout=900)
            study = optuna.load_study(study_name="bench", storage=pg.url(database))
            done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
            span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            results[f"{workers}_workers"] = {"trials": len(done), "span_s": round(span, 1),
                                             "trials_per_minute": round(60 * len(done) / span, 1)}
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
    results["speedup"] = round(results["2_workers"]["trials_per_minute"] / results["1_workers"]["trials_per_minute"], 2)
    return results


def _api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _step(name: str) -> str:
    """A task run's step: ``levels BTCUSDT`` -> levels, ``start-run-a1b`` -> start-run (Prefect's suffix), and
    ``ingest-0`` (the task run that stands for a subflow) -> ``ingest (subflow)``."""
    if re.fullmatch(r"[a-z-]+-\d{1,2}", name):
        return f"{name.rsplit('-', 1)[0]} (subflow)"
    return re.sub(r"-[0-9a-f]{3}$", "", name.split(" ")[0])


def steps_from_api(api_url: str, after: datetime) -> dict:
    """Wall time by step of the flow runs started after ``after`` (``train`` and its ``ingest`` subflow): per step,
    its task runs, their summed run time and the span from the first start to the last end."""
    runs = _api(api_url, "/flow_runs/filter", {"flow_runs": {"start_time": {"after_": after.isoformat()}},
                                                "limit": 50})
    ids = [run["id"] for run in runs]
    tasks = _api(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "limit": 200}) if ids else []
    steps: dict[str, dict] = {}
    for run in tasks:
        if not run.get("start_time") or not run.get("end_time"):
            continue
        step = steps.setdefault(_step(run["name"]), {"tasks": 0, "run_s": 0.0, "first": run["start_time"],
                                                     "last": run["end_time"]})
        step["tasks"] += 1
        step["run_s"] += run["total_run_time"]
        step["first"] = min(step["first"], run["start_time"], key=_when)
        step["last"] = max(step["last"], run["end_time"], key=_when)
    ordered = sorted(steps.items(), key=lambda item: _when(item[1]["first"]))
    return {
        "flow_runs": [{"state": run["state_type"], "run_s": round(run["total_run_time"], 1)} for run in runs],
        "steps": {name: {"tasks": s["tasks"], "run_s": round(s["run_s"], 2),
                         "span_s": round((_when(s["last"]) - _when(s["first"])).total_seconds(), 2)}
                  for name, s in ordered},
    }


def _train(env: dict[str, str], project: Path, overrides: list[str], log: Path) -> dict:
    """``pricelevel train`` as a user runs it; its wall time and, from the Prefect API, its wall time by step."""
    args = [str(Path(sys.executable).parent / "pricelevel"), "train"]
    for override in overrides:
        args += ["--set", override]
    after = datetime.now().astimezone()
    started = time.perf_counter()
    with log.open("ab") as out:
        done = subprocess.run(args, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"pricelevel train failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), **steps_from_api(env["PREFECT_API_URL"], after)}


def _supervise(folder: str, workers: int) -> None:
    """The bench cluster's supervisor (what ``cluster run`` is, on :data:`PORTS`)."""
    from pricelevel.core.cluster import ClusterPlan, run_cluster
    from pricelevel.core.runtime import bootstrap

    bootstrap()
    plan = ClusterPlan(Path(folder), dask_workers=workers, **PORTS)
    raise SystemExit(run_cluster(plan, Path(sys.executable).parent, dict(os.environ), Path.cwd()))


def nightly(work: Path) -> dict:
    """The nightly on the local cluster (every service of ``make cluster-up``, 2 Dask workers, ``tuning.workers``
    2 on PostgreSQL, the MLflow server) and on the thread runner (the default local config: SQLite study, one
    trial worker, local MLflow), each in a fresh project; both report to the cluster's Prefect server."""
    from pricelevel.core.cluster import ClusterPlan, start_detached, stop_detached

    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in [k for k in base if k.startswith("PRICELEVEL_") or k in ("PREFECT_API_URL", "PREFECT_HOME")]:
        base.pop(key)
    cluster_project = _project(work / "c")
    plan = ClusterPlan(cluster_project / ".cluster", dask_workers=2, **PORTS)
    argv = [sys.executable, str(Path(__file__).resolve()), "--supervise", str(plan.folder)]
    started = time.perf_counter()
    if start_detached(plan, argv, {**base, "PRICELEVEL_HOME": str(cluster_project)}, cluster_project) != 0:
        raise RuntimeError(f"the bench cluster did not start: {plan.log_file.read_text()[-3000:]}")
    result: dict = {"config": NIGHTLY, "cluster_up_s": round(time.perf_counter() - started, 1),
                    "ready_after_s": json.loads(plan.startup_file.read_text())}
    try:
        cluster_env = {**base, **plan.client_environment(), "PRICELEVEL_HOME": str(cluster_project)}
        api = {"PREFECT_API_URL": cluster_env["PREFECT_API_URL"]}
        thread_project = _project(work / "t")
        thread_env = {**base, **api, "PRICELEVEL_HOME": str(thread_project)}
        result["thread"] = _train(thread_env, thread_project, [*NIGHTLY, "flow.task_runner=thread"], work / "t.log")
        print(f"BENCH nightly.thread {json.dumps(result['thread'])}", file=sys.stderr, flush=True)
        result["cluster_failures"] = []
        for _ in range(2):  # on a machine loaded by others a run can fail (seen: the scheduler connection lost)
            try:
                result["cluster"] = _train(cluster_env, cluster_project, NIGHTLY, work / "c.log")
                break
            except RuntimeError as failed:
                result["cluster_failures"].append(str(failed).splitlines()[-2:])
                print(f"BENCH nightly.cluster failed {failed}", file=sys.stderr, flush=True)
        else:
            raise RuntimeError("the nightly failed twice on the cluster")
        print(f"BENCH nightly.cluster {json.dumps(result['cluster'])}", file=sys.stderr, flush=True)
        result["second_run_reuses"] = {  # nothing new: every step reused (ingest still checks the sources)
            "thread": _train(thread_env, thread_project, [*NIGHTLY, "flow.task_runner=thread"], work / "t.log"),
            "cluster": _train(cluster_env, cluster_project, NIGHTLY, work / "c.log")}
        overhead = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--only", "overhead_per_task",
                                   "--dask-address", plan.scheduler], env={**base, **api}, capture_output=True,
                                  text=True, timeout=600, check=True)
        result["overhead_per_task"] = json.loads(overhead.stdout)["overhead_per_task"]
    finally:
        stop_detached(plan)
        logs = Path(tempfile.gettempdir()) / "pricelevel-bench-cluster-logs"
        logs.mkdir(exist_ok=True)
        for log in (work / "t.log", work / "c.log", plan.log_file):
            if log.exists():
                shutil.copy(log, logs / log.name)
        print(f"BENCH nightly logs in {logs}", file=sys.stderr, flush=True)
    result["cost_model"] = cost_model(result)
    return result


def cost_model(result: dict) -> dict:
    """The inputs of ``T_cluster = start + N x tasks_per_dataset x overhead + N x work / W`` against
    ``T_thread = N x work / P``, and the datasets (symbols x timeframes) N from which the cluster is faster.

    ``work``: one dataset's levels + features, from the cluster's task runs (each alone in a one-thread worker
    process; a thread's own run time also counts the time it waits for the GIL). ``P``: the thread runner's
    measured parallelism on the same fan-out (N x work / its wall time; the kernels hold the GIL, so about 1).
    ``start``: a flow's client connecting to the running scheduler; ``overhead``: per task on that scheduler."""
    thread, cluster = result["thread"]["steps"], result["cluster"]["steps"]
    fan = [step for step in ("levels", "features") if step in cluster]
    datasets = cluster[fan[0]]["tasks"]
    work = sum(cluster[step]["run_s"] for step in fan) / datasets
    thread_wall = sum(thread[step]["span_s"] for step in fan)
    parallelism = datasets * work / thread_wall
    scheduler = result["overhead_per_task"]["dask_scheduler"]
    overhead, start = scheduler["per_task_ms"] / 1000, scheduler["startup_s"]

    def break_even(workers: int) -> float | None:
        gain = work / parallelism - work / workers - len(fan) * overhead  # seconds saved per dataset
        return round(start / gain, 1) if gain > 0 else None

    return {"work_per_dataset_s": round(work, 2), "thread_parallelism": round(parallelism, 2),
            "overhead_per_task_s": round(overhead, 3), "tasks_per_dataset": len(fan), "start_s": start,
            "break_even_datasets": {f"W={w}": break_even(w) for w in (2, 4, 8, 16)},
            "fan_out_wall_s": {"thread": round(thread_wall, 1),
                               "cluster": round(sum(cluster[step]["span_s"] for step in fan), 1)}}

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-services", action="store_true")
    parser.add_argument("--only", choices=["services", "overhead_per_task", "levels_features", "optuna", "nightly"])
    parser.add_argument("--out")
    parser.add_argument("--dask-address", help=argparse.SUPPRESS)  # overhead on a running scheduler (nightly)
    parser.add_argument("--supervise", help=argparse.SUPPRESS)  # the bench cluster's supervisor (nightly)
    args = parser.parse_args()
    if args.supervise:
        _supervise(args.supervise, 2)
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pricelevel-bench-prefect-"))
    for key, value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="pricelevel-bench-cluster-"))
    work.chmod(0o755)  # as root, PostgreSQL runs as user postgres, which must reach .cluster/ inside it
    report: dict = {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    steps = {"services": services, "overhead_per_task": lambda _: _noop_overhead(args.dask_address),
             "levels_features": levels_features, "optuna": optuna_rate, "nightly": nightly}
    try:
        for name, step in steps.items():
            if (name == "services" and args.skip_services) or (args.only and name != args.only):
                continue
            report[name] = step(work)
            print(f"BENCH {name} {json.dumps(report[name], default=str)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
