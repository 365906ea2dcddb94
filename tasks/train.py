"""Prefect tasks of the training flow: each wraps library calls and logs what it did (no logic of its own).

Every heavy task derives its output folder from its inputs (:mod:`pricelevel.steps`), so a re-run with the
same data, config and code reads what the previous run wrote. Prefect's own result cache is not used: the
outputs are files and folders that outlive any Prefect server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import pricelevel.clustering as clustering_module
import pricelevel.dataset as dataset_module
import pricelevel.features as features_module
import pricelevel.indicators as indicators_module
import pricelevel.labels as labels_module
import pricelevel.levels as levels_module
import pricelevel.lookahead as lookahead_module
import pricelevel.model as model_module
import pricelevel.training as training_module
import pricelevel.tuning as tuning_module
from pricelevel.config import Config
from pricelevel.datafolder import CandleFolder
from pricelevel.dataset import TrainingData
from pricelevel.evaluation import baseline_scores, classification_scores, flat_scores
from pricelevel.experiment import RUN_KEY_TAG, TrainingRun, TrialRuns
from pricelevel.feature_catalogue import feature_columns
from pricelevel.levels import walk_forward_levels
from pricelevel.lookahead import check_lookahead, report_lines
from pricelevel.model import MultiSymbolLSTM, predict_proba
from pricelevel.project import project_root
from pricelevel.registry import ALIAS_CHALLENGER, find_version_by_tag, register_version, set_alias
from pricelevel.scoring import backtest_probabilities
from pricelevel.spec import ModelSpec
from pricelevel.steps import DerivedStore, code_fingerprint, step_key
from pricelevel.store import CandleStore, Layer
from pricelevel.tracking import (
    data_fingerprint,
    ensure_experiment,
    lineage_tags,
    log_pricelevel_model,
    mlflow_client,
    run_params,
    tracking_session,
)
from pricelevel.training import (
    SymbolTable,
    build_table,
    dataset_summary,
    embargo_bars,
    feature_table,
    input_timeframes,
    labels_at,
    level_context,
    read_frames,
    read_levels,
    read_table,
    symbol_table,
    training_data,
    write_json,
    write_levels,
    write_table,
)
from pricelevel.tuning import open_study, run_study, train, with_params


def validated_folder(config: Config) -> CandleFolder:
    """The only candles training reads: those that passed validation."""
    return CandleFolder.open(CandleStore(config.data.root).layer_dir(Layer.VALIDATED, config.data.source))


@dataclass(frozen=True)
class StepOutput:
    symbol: str
    key: str
    folder: Path
    data_fingerprint: str


def _timeframes(config: Config) -> tuple:
    return input_timeframes(config.dataset.timeframe, config.levels, config.features)


def _input_files(config: Config, folder: CandleFolder, symbol: str) -> list[Path]:
    return [folder.path(symbol, tf) for tf in _timeframes(config) if folder.has(symbol, tf)] or [
        folder.path(symbol, config.dataset.timeframe)
    ]


@task(name="levels", task_run_name="levels {symbol}", cache_policy=NO_CACHE)
def find_levels(config: Config, symbol: str) -> StepOutput:
    """Walk-forward support/resistance levels of one symbol (refitted as the bars arrive)."""
    folder = validated_folder(config)
    fingerprint = data_fingerprint(_input_files(config, folder, symbol))
    timeframe = config.dataset.timeframe
    key = step_key(
        "levels", symbol=symbol, timeframe=str(timeframe), data=fingerprint,
        config=config.levels.model_dump(mode="json"), code=code_fingerprint(levels_module, clustering_module, indicators_module),
    )

    def write(out: Path) -> None:
        frames = read_frames(folder, symbol, _timeframes(config))
        history = walk_forward_levels(frames[timeframe], timeframe, config.levels, level_context(frames))
        write_levels(out, symbol, history)

    out, built = DerivedStore(config.data.root).build("levels", key, write)
    history = read_levels(out, symbol)
    get_run_logger().info(
        "%s %s: %s %d refits, %d level rows -> %s", symbol, timeframe, "computed" if built else "reused",
        len(history.refits), len(history.levels), out,
    )
    return StepOutput(symbol, key, out, fingerprint)


@task(name="features", task_run_name="features {levels.symbol}", cache_policy=NO_CACHE)
def feature_bars(config: Config, levels: StepOutput) -> StepOutput:
    """The feature and label table of one symbol (``pricelevel features`` writes the same table)."""
    key = step_key(
        "features", levels=levels.key, labels=config.labels.model_dump(mode="json"),
        features=config.features.model_dump(mode="json"),
        code=code_fingerprint(labels_module, features_module, indicators_module, training_module),
    )

    def write(out: Path) -> None:
        timeframe = config.dataset.timeframe
        frames = read_frames(validated_folder(config), levels.symbol, _timeframes(config))
        history = read_levels(levels.folder, levels.symbol)
        write_table(out, levels.symbol, feature_table(
            frames[timeframe], timeframe, history, frames, config.labels, config.features
        ))

    out, built = DerivedStore(config.data.root).build("features", key, write)
    table = read_table(out, levels.symbol)
    target = table["target"].to_numpy(dtype=np.float64)
    get_run_logger().info(
        "%s: %s %d bars x %d features (set %r); %s target positive on %.2f%% of %d labelled bars -> %s",
        levels.symbol, "computed" if built else "reused", len(table), len(feature_columns(config.features, config.dataset.timeframe)),
        config.features.set, config.labels.kind, 100 * float(np.nanmean(target)), int(np.isfinite(target).sum()), out,
    )
    return StepOutput(levels.symbol, key, out, levels.data_fingerprint)


@task(name="lookahead", cache_policy=NO_CACHE)
def lookahead(config: Config, tables: list[StepOutput]) -> dict[str, Any]:
    """Recompute features and labels on data cut at ``lookahead.cuts`` points; fail the run on any difference."""
    key = step_key(
        "lookahead", tables=sorted(o.key for o in tables), cuts=config.lookahead.cuts,
        code=code_fingerprint(lookahead_module),
    )
    timeframe = config.dataset.timeframe
    logger = get_run_logger()

    def write(out: Path) -> None:
        folder = validated_folder(config)
        frames = {o.symbol: read_frames(folder, o.symbol, _timeframes(config)) for o in tables}
        report = check_lookahead(
            frames, timeframe,
            lambda f: build_table(f, timeframe, config.levels, config.labels, config.features)[1],
            config.labels.horizon, config.lookahead.cuts, {o.symbol: read_table(o.folder, o.symbol) for o in tables},
        )
        for line in report_lines(report):
            (logger.info if report.ok else logger.error)("%s", line)
        if not report.ok:
            raise LookaheadError("\n".join(report_lines(report, limit=20)))
        write_json(out / "report.json", report.summary())

    out, built = DerivedStore(config.data.root).build("lookahead", key, write)
    summary = json.loads((out / "report.json").read_text())
    if not built:
        logger.info("look-ahead check of these tables passed before (%s values compared); %s", summary["values_compared"], out)
    return summary


class LookaheadError(RuntimeError):
    """Features or labels changed when later data was added: they use the future."""


@dataclass(frozen=True)
class Dataset:
    """The symbol tables and the keys that name everything computed from them."""

    tables: dict[str, SymbolTable]
    data: TrainingData
    embargo: int
    tune_key: str
    model_key: str
    run_key: str
    data_fingerprint: str
    summary: dict[str, Any]


@task(name="dataset", cache_policy=NO_CACHE)
def build_dataset(config: Config, labelled: list[StepOutput], levels: list[StepOutput]) -> Dataset:
    """Windows of every symbol, split chronologically with an embargo; the keys of the steps after it."""
    history = {out.symbol: read_levels(out.folder, out.symbol) for out in levels}
    columns = feature_columns(config.features, config.dataset.timeframe)
    tables = {
        out.symbol: symbol_table(out.symbol, read_table(out.folder, out.symbol), history[out.symbol], columns)
        for out in labelled
    }
    embargo = embargo_bars(config.dataset, config.tuning.space.seq_len, config.labels.horizon)
    data = training_data(tables, config.dataset, config.dataset.seq_len, embargo)
    code = code_fingerprint(dataset_module, model_module, tuning_module, training_module)
    tune_key = step_key(
        "tune", labels=sorted(o.key for o in labelled), dataset=config.dataset.model_dump(mode="json"),
        model=config.model_inputs.model_dump(mode="json"), tuning=config.tuning.model_dump(mode="json"), code=code,
    )
    model_key = step_key("model", tune=tune_key)
    run_key = step_key("run", model=model_key, backtest=config.backtest.model_dump(mode="json"))
    fingerprint = step_key("data", files=sorted(o.data_fingerprint for o in labelled))
    summary = dataset_summary(data) | {
        "embargo": embargo, "tune_key": tune_key, "model_key": model_key, "feature_set": config.features.set,
        "features": list(columns), "label": config.labels.kind,
    }
    get_run_logger().info(
        "dataset: %s; feature set %r (%d columns); windows train/val/test = %d/%d/%d, embargo %d bars",
        ",".join(data.symbols), config.features.set, len(columns), len(data.train), len(data.val), len(data.test),
        embargo,
    )
    return Dataset(tables, data, embargo, tune_key, model_key, run_key, fingerprint, summary)


@task(name="start-run", cache_policy=NO_CACHE)
def start_run(
    config: Config, dataset: Dataset, data_files: list[str], lookahead_report: dict[str, Any] | None = None
) -> tuple[TrainingRun, bool]:
    """The MLflow run for these inputs: the finished one if it exists, else a new one with params, lineage and
    the look-ahead check's report."""
    client = mlflow_client(config.tracking)
    experiment_id = ensure_experiment(client, config.tracking.experiment, config.tracking.artifact_location)
    lineage = lineage_tags(
        [Path(f) for f in data_files], config.model.seed, project_root()
    )
    lineage |= {"pricelevel.feature_set": config.features.set, "pricelevel.label": config.labels.kind}
    run, created = TrainingRun.find_or_create(
        client, experiment_id, dataset.run_key, f"train-{config.features.set}-{dataset.run_key[:8]}", lineage
    )
    if created:
        run.log_params(run_params(config.flat()))
        run.log_json(dataset.summary, "dataset_summary.json")
        if lookahead_report is not None:
            run.log_json(lookahead_report, "lookahead_report.json")
    get_run_logger().info("MLflow run %s (%s)", run.run_id, "new" if created else "reused: these inputs were trained before")
    return run, created


@task(name="tune", cache_policy=NO_CACHE)
def tune(config: Config, dataset: Dataset, run: TrainingRun, log: bool) -> dict[str, Any]:
    """Optuna study over the search space; resumes a study of the same inputs, a no-op once it is complete."""
    by_seq_len: dict[int, TrainingData] = {}

    def data_for(seq_len: int) -> TrainingData:
        if seq_len not in by_seq_len:
            by_seq_len[seq_len] = training_data(dataset.tables, config.dataset, seq_len, dataset.embargo)
        return by_seq_len[seq_len]

    study_name = f"{config.tuning.study_name}-{dataset.tune_key}"
    _threads(config)
    study = open_study(config.optuna_storage, study_name, config.tuning)
    work = DerivedStore(config.data.root).folder("trials", dataset.tune_key)
    summary = run_study(study, data_for, config.model_inputs, config.tuning, work, TrialRuns(run, study_name))
    if summary.trials_run_now or log:
        run.log_json(summary.to_dict(), "study_summary.json")
        run.log_params({f"best.{k}": v for k, v in summary.best_params.items()})
        run.log_metrics({f"best_trial_{config.tuning.metric}": summary.best_value})
    get_run_logger().info(
        "study %s: %d trials now, %d complete, %d pruned; best %s = %.4f with %s", study_name, summary.trials_run_now,
        summary.trials_complete, summary.trials_pruned, config.tuning.metric, summary.best_value, summary.best_params,
    )
    return summary.to_dict()


def _threads(config: Config) -> None:
    if config.model.num_threads:
        torch.set_num_threads(config.model.num_threads)


@dataclass(frozen=True)
class FittedModel:
    module: MultiSymbolLSTM
    spec: ModelSpec
    result: dict[str, Any]
    data: TrainingData
    folder: Path


@task(name="train", cache_policy=NO_CACHE)
def fit_final(
    config: Config, dataset: Dataset, study: dict[str, Any], run: TrainingRun, log: bool
) -> FittedModel:
    """Train the final model with the study's best parameters (reused when these inputs were trained before)."""
    params = study["best_params"]
    seq_len = int(params.get("seq_len", config.dataset.seq_len))
    data = training_data(dataset.tables, config.dataset, seq_len, dataset.embargo)
    model_config = with_params(config.model_inputs, params)
    _threads(config)

    def write(out: Path) -> None:
        result = train(
            data, model_config, config.tuning, config.model.max_epochs, out / "checkpoints",
            epoch_callback=lambda epoch, metrics: run.log_metrics(metrics, step=epoch),
        )
        spec = ModelSpec(
            symbols=data.symbols, features=feature_columns(config.features, config.dataset.timeframe), seq_len=seq_len,
            timeframe=str(config.dataset.timeframe), horizon=config.labels.horizon,
            normalization=dict(data.normalization), levels=config.levels.model_dump(mode="json"),
            labels=config.labels.model_dump(mode="json"), hparams=dict(result.module.hparams),
            threshold=config.backtest.threshold, feature_config=config.features.model_dump(mode="json"),
            extra={
                "train_end": str(data.bounds.train_end), "val_start": str(data.bounds.val_start),
                "test_start": str(data.bounds.test_start),
                "train_positive_rate": float(np.mean(data.train.targets())),
            },
        )
        torch.save(result.module.state_dict(), out / "weights.pt")
        (out / "spec.json").write_text(spec.to_json())
        write_json(out / "result.json", {
            "best_score": result.best_score, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "history": result.history, "train_samples_per_second": result.train_samples_per_second,
            "device": result.device, "metric": config.tuning.metric, "params": params,
        })

    out, built = DerivedStore(config.data.root).build("models", dataset.model_key, write)
    spec = ModelSpec.from_json((out / "spec.json").read_text())
    module = MultiSymbolLSTM(**spec.hparams)
    module.load_state_dict(torch.load(out / "weights.pt", map_location="cpu", weights_only=True))
    module.eval()
    result = json.loads((out / "result.json").read_text())
    if not built and log:  # a new run over a model trained before (e.g. only backtest settings changed)
        for entry in result["history"]:
            run.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"]))
    get_run_logger().info(
        "model %s: %s; best %s %.4f at epoch %s of %s; %.0f train samples/s on %s", dataset.model_key,
        "trained" if built else "reused", config.tuning.metric, result["best_score"], result["best_epoch"],
        result["epochs_run"], result["train_samples_per_second"], result["device"],
    )
    return FittedModel(module, spec, result, data, out)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(config: Config, fitted: FittedModel, dataset: Dataset, run: TrainingRun, log: bool) -> dict[str, float]:
    """Test-segment scores of the model beside the majority-class and "near a level now" baselines."""
    test = fitted.data.test
    probability = predict_proba(fitted.module, test)
    target = test.targets()
    label_now = labels_at(dataset.tables, test.ends(), "near_level")
    scores = flat_scores("test", classification_scores(target, probability))
    for name, values in baseline_scores(target, label_now, fitted.spec.extra["train_positive_rate"]).items():
        scores |= flat_scores(f"baseline_{name}", values)
    # The validation score of the checkpoint kept (the per-epoch history is under the metric's own name).
    scores[f"best_{config.tuning.metric}"] = float(fitted.result["best_score"])
    scores["train_samples_per_second"] = float(fitted.result["train_samples_per_second"])
    if log:
        run.log_metrics(scores)
    table = [
        {"model": name, **{m: round(scores.get(f"{prefix}_{m}", float("nan")), 4) for m in ("pr_auc", "roc_auc", "f1", "precision", "recall", "accuracy")}}
        for name, prefix in (("LSTM", "test"), ("majority", "baseline_majority"), ("near level now", "baseline_near_level_now"))
    ]
    create_table_artifact(key="test-scores", table=table, description="Test segment: model vs baselines")
    get_run_logger().info("test: %s", {k: round(v, 4) for k, v in scores.items()})
    return scores


@task(name="backtest", cache_policy=NO_CACHE)
def backtest(config: Config, fitted: FittedModel, dataset: Dataset, run: TrainingRun, log: bool) -> dict[str, Any]:
    """Trade the model's test-segment probabilities with the backtest engine; metrics and Plotly report."""
    from pricelevel.backtest.files import write_result_json
    from pricelevel.backtest.report import write_report

    test = fitted.data.test
    ends = test.ends()
    scored = pd.DataFrame({"timestamp": ends["timestamp"], "symbol": ends["symbol"], "probability": predict_proba(fitted.module, test)})
    start = pd.Timestamp(fitted.spec.extra["test_start"])
    outcome = backtest_probabilities(dataset.tables, scored, config.backtest, start=start)
    out = DerivedStore(config.data.root).folder("backtests", dataset.run_key)
    pages = write_report(outcome.result, outcome.metrics, out / "report.html", levels=outcome.levels)
    write_result_json(outcome.result, outcome.metrics, out / "backtest.json")
    portfolio = outcome.metrics.to_json_dict()["portfolio"]
    metrics = {f"backtest_{k}": v for k, v in portfolio.items() if isinstance(v, int | float)}
    if log:
        run.log_metrics(metrics)
        run.log_artifact(out, "backtest")
    get_run_logger().info("backtest on the test segment: %s; report %s", {k: round(v, 4) for k, v in metrics.items()}, pages[0])
    return {"metrics": metrics, "report": str(pages[0])}


@task(name="register", cache_policy=NO_CACHE)
def register(config: Config, fitted: FittedModel, dataset: Dataset, run: TrainingRun, scores: dict[str, float]) -> str:
    """Log the model (signature, input example, explicit pip requirements), register it, alias ``challenger``."""
    client = run.client
    name = config.tracking.registered_model
    existing = find_version_by_tag(client, name, RUN_KEY_TAG, dataset.run_key)
    if existing is not None:
        get_run_logger().info("model %s version %s already holds these inputs; nothing to register", name, existing.version)
        return str(existing.version)
    example = fitted.data.test[0] if len(fitted.data.test) else fitted.data.train[0]
    input_example = {
        "features": example[0].numpy()[None, ...].astype(np.float32),
        "symbol_id": np.array([int(example[1])], dtype=np.int64),
    }
    import mlflow

    with tracking_session(config.tracking), mlflow.start_run(run_id=run.run_id):
        info = log_pricelevel_model(fitted.module, fitted.spec, input_example)
    tags = {
        RUN_KEY_TAG: dataset.run_key, "pricelevel.data_fingerprint": dataset.data_fingerprint,
        "pricelevel.metric": config.tuning.metric,
        f"pricelevel.best_{config.tuning.metric}": f"{scores[f'best_{config.tuning.metric}']:.6f}",
    }
    version = register_version(client, name, info.model_uri, run.run_id, tags)
    set_alias(client, name, ALIAS_CHALLENGER, version.version)
    run.finish()
    get_run_logger().info("registered %s version %s as @%s (%s)", name, version.version, ALIAS_CHALLENGER, info.model_uri)
    create_markdown_artifact(
        key="train-result",
        markdown=(
            f"# Trained `{name}` version {version.version} (@{ALIAS_CHALLENGER})\n\n"
            f"- best {config.tuning.metric}: {scores[f'best_{config.tuning.metric}']:.4f}\n"
            f"- test PR-AUC {scores.get('test_pr_auc', float('nan')):.4f} vs baselines "
            f"{scores.get('baseline_majority_pr_auc', float('nan')):.4f} (majority), "
            f"{scores.get('baseline_near_level_now_pr_auc', float('nan')):.4f} (near level now)\n"
            f"- MLflow run `{run.run_id}`\n"
        ),
        description="Training result",
    )
    return str(version.version)
