"""Training flow (nightly): the whole DAG from candles to a registered ``challenger``.

    ingest (subflow) -> levels (per symbol) -> features (per symbol: features, labels) -> lookahead
        -> dataset (walk-forward folds) -> start-run -> tune -> train (every fold; rules chosen on its validation)
        -> evaluate (walk-forward report: model vs baselines) -> backtest (newest fold) -> register

The per-symbol tasks fan out ``flow.max_workers`` at a time. The look-ahead check recomputes the tables on
data cut at a few points and fails the run if any value changed: nothing is trained on features or labels
that use the future. Each heavy task derives its output folder from its real inputs (data fingerprint, its
config section, its code), so a second run with nothing new reuses every output and finishes in seconds.
A run that fails ends its MLflow run as FAILED. Promotion to ``champion`` is the separate ``promote`` flow.
"""

from __future__ import annotations

from prefect import flow

from flows.ingest import ingest
from tasks.budget import size_to_budget
from tasks.deflated import deflated_sharpe
from tasks.gbm import gbm_baseline
from tasks.notify import notify_failure
from tasks.runtime import fan_out, load_run_config, routes_to_gpu, training_resources
from tasks.train import (
    backtest,
    build_dataset,
    end_run,
    evaluate,
    feature_bars,
    find_levels,
    fit_final,
    lookahead,
    register,
    start_run,
)
from tasks.tuning import tune


@flow(name="train", on_failure=[notify_failure])
def train(config_file: str | None = None, overrides: list[str] | None = None, skip_ingest: bool = False) -> dict:
    """Returns the registered version, its scores and the backtest metrics."""
    if not skip_ingest:
        ingest(config_file=config_file, overrides=overrides)
    config = load_run_config(config_file, overrides)
    config.catalogue.validated().require(config.training_symbols, [config.dataset.timeframe])
    with fan_out(config.flow) as runner:
        levels = [runner.submit(find_levels, {"config": config, "symbol": symbol}) for symbol in config.training_symbols]
        tables = [runner.submit(feature_bars, {"config": config, "levels": future}) for future in levels]
        # Levels first: a symbol's features wait on its levels, so a levels failure is raised as itself, not as
        # the features task's "UnfinishedRun" (the features still run as their levels finish).
        levels = [f.result() for f in levels]
        tables = [f.result() for f in tables]
    checked = lookahead(config, tables) if config.lookahead.enabled else None
    plan = build_dataset(config, tables, levels)
    config = size_to_budget(config, plan)  # training.budget_hours: trials, epochs, folds sized to this machine
    if config.evaluation.folds != len(plan.folds):
        plan = build_dataset(config, tables, levels)
    started = start_run(config, plan, checked)
    try:
        study = tune(config, plan, started)
        if routes_to_gpu(config.flow, config.model):  # the final fit on a `--resources GPU=1` Dask worker
            with fan_out(config.flow) as runner, training_resources(config.flow, config.model):
                trained = runner.submit(fit_final, {"config": config, "plan": plan, "study": study,
                                                    "started": started}).result()
        else:
            trained = fit_final(config, plan, study, started)
        report = evaluate(config, plan, trained, started)
        report = gbm_baseline(config, plan, trained, started, report)  # LightGBM beside the LSTM in the report
        deflated = deflated_sharpe(config, plan, trained, study, started)
        traded = backtest(config, plan, trained, started)
        registered = register(config, started, trained, plan, report["scores"])
    except BaseException:
        end_run(started, "FAILED")
        raise
    return {"version": registered.version, "run_id": started.run.run_id, "scores": report["scores"],
            "walk_forward": report["summary"], "walk_forward_markdown": report["markdown"], "rules": traded["rules"],
            "backtest": traded["metrics"], "report": traded["report"], "reused": not started.created,
            "deflated_sharpe": deflated}
