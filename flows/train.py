"""Training flow (nightly): the whole DAG from candles to a registered ``challenger``.

    ingest (subflow) -> levels (per symbol) -> features (per symbol: features, labels) -> lookahead
        -> dataset -> start-run -> tune -> train -> evaluate -> backtest -> register

The look-ahead check recomputes the tables on data cut at a few points and fails the run if any value
changed: nothing is trained on features or labels that use the future.

Each heavy task derives its output folder from its real inputs (data fingerprint, its config section, its
code), so a second run with nothing new reuses every output and finishes in seconds. Promotion to
``champion`` is the separate ``promote`` flow.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.ingest import ingest
from tasks.config import load_run_config
from tasks.train import (
    backtest,
    build_dataset,
    evaluate,
    feature_bars,
    find_levels,
    fit_final,
    lookahead,
    register,
    start_run,
    tune,
    validated_folder,
)


@flow(name="train", task_runner=ThreadPoolTaskRunner(max_workers=2))
def train(
    config_file: str | None = None,
    overrides: list[str] | None = None,
    skip_ingest: bool = False,
) -> dict:
    """Returns the registered version, its scores and the backtest metrics."""
    if not skip_ingest:
        ingest(config_file=config_file, overrides=overrides)
    config = load_run_config(config_file, overrides)
    symbols = list(config.training_symbols)
    folder = validated_folder(config)
    folder.require(symbols, [config.dataset.timeframe])

    levels = [find_levels.submit(config, symbol) for symbol in symbols]
    tables = [feature_bars.submit(config, future) for future in levels]
    tables_done = [f.result() for f in tables]
    checked = lookahead(config, tables_done) if config.lookahead.enabled else None
    dataset = build_dataset(config, tables_done, [f.result() for f in levels])
    data_files = [str(p) for s in symbols for p in folder.files.values() if p.name.startswith(f"{s}_")]
    run, created = start_run(config, dataset, data_files, checked)
    study = tune(config, dataset, run, log=created)
    fitted = fit_final(config, dataset, study, run, log=created)
    scores = evaluate(config, fitted, dataset, run, log=created)
    traded = backtest(config, fitted, dataset, run, log=created)
    version = register(config, fitted, dataset, run, scores)
    get_run_logger().info(
        "%s version %s is @challenger; run `pricelevel promote` to compare it with @champion",
        config.tracking.registered_model, version,
    )
    return {"version": version, "run_id": run.run_id, "scores": scores, "backtest": traded["metrics"],
            "report": traded["report"], "reused": not created}
