"""Scale-out figures, printed as JSON (README "Scaling out"):

- start-up time of each service of `make cluster-up` (PostgreSQL, Prefect, MLflow, Dask scheduler, workers);
- overhead per task of the thread / process / dask runners (20 no-op tasks, after the runner's start-up);
- wall time of levels + features for 10 symbols at 1h with 1 and 2 Dask workers (speed-up, efficiency);
- Optuna trials per minute with 1 vs 2 workers sharing one PostgreSQL study (1 s of CPU per trial).

    .venv/bin/python bench/cluster.py [--skip-services] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "DOTUSDT", "LINKUSDT", "LTCUSDT"]
TASKS = 20


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


def _noop_overhead() -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-services", action="store_true")
    parser.add_argument("--only", choices=["services", "overhead_per_task", "levels_features", "optuna"])
    parser.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pricelevel-bench-prefect-"))
    for key, value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    work = Path(tempfile.mkdtemp(prefix="pricelevel-bench-cluster-"))
    work.chmod(0o755)  # as root, PostgreSQL runs as user postgres, which must reach .cluster/ inside it
    report: dict = {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    steps = {"services": services, "overhead_per_task": lambda _: _noop_overhead(),
             "levels_features": levels_features, "optuna": optuna_rate}
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
