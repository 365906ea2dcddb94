"""The gradient-boosting baseline: LightGBM on the LSTM's own rows, trained in every run so that the report
shows what the LSTM adds over a model that trains in seconds.

Same everything except the model: for each walk-forward fold, the same windows (the fold's trained ``seq_len``,
so the same rows, targets and per-symbol normalisation fitted on the fold's training segment), the same
label, the same early-stopping metric on the same validation segment, the same rule search on validation
(:func:`pricelevel.backtest.selection.choose_rules` with the label's own exits) and the same test-segment
trading and scores as :mod:`pricelevel.ml.evaluation`.

**Flattening a window** (:func:`flatten`): a gradient-boosted tree reads a row, not a sequence, so each window
becomes the normalised features of its last bar and of the bars ``lags`` back from it (default 0, 1, 2, 4 and
8 bars back, each kept only if it lies inside the window), plus the symbol as a categorical column, as the
LSTM's symbol embedding. No window statistic, no feature of its own: only what the LSTM is given.

Deterministic: seeded bagging, ``deterministic`` and ``force_row_wise`` on, one thread by default (two fits
give the same trees). The LSTM stays the product; this model is never registered or traded live.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from pricelevel.backtest.selection import StrategyContext, choose_rules
from pricelevel.backtest.trading import probability_matrix, score_result, trade_probabilities
from pricelevel.core.cache import DerivedStore, code_fingerprint, step_key
from pricelevel.core.files import write_json
from pricelevel.core.runlog import RunLog
from pricelevel.ml.artifacts import TrainedModel
from pricelevel.ml.config import GbmConfig
from pricelevel.ml.dataset import (
    DatasetPlan,
    SymbolTable,
    TrainingData,
    WindowDataset,
    labels_at,
    positive_weight,
)
from pricelevel.ml.evaluation import REPORT_TRADING, direction_at, model_scores, walk_forward_markdown
from pricelevel.ml.walkforward import label_exits, segment_market

#: The walk-forward report's (and MLflow's) name of this model.
NAME = "gbm"
#: Prefix of its MLflow metrics: ``gbm_test_pr_auc``, ``gbm_fold0_sharpe``, ``gbm_wf_mean_sharpe``, ...
PREFIX = "gbm_"
REPORT = "report.json"
#: Classification numbers summarised over the folds (as the LSTM's).
CLASSIFICATION = ("pr_auc", "roc_auc", "direction_auc", "direction_rows")


def window_lags(lags: tuple[int, ...], seq_len: int) -> tuple[int, ...]:
    """The lags that lie inside a window of ``seq_len`` bars, sorted, without repeats."""
    kept = tuple(sorted({int(lag) for lag in lags if 0 <= lag < seq_len}))
    if not kept:
        raise ValueError(f"no lag of {lags} lies inside a window of {seq_len} bars")
    return kept


def flatten(windows: WindowDataset, lags: tuple[int, ...]) -> np.ndarray:
    """One row per window, in dataset order: the normalised features at ``end - lag`` for each lag (lag-major
    columns), then the symbol id. Only bars inside the window, so nothing the LSTM does not see."""
    lags = window_lags(lags, windows.seq_len)
    out = np.empty((len(windows), len(lags) * windows.n_features + 1), dtype=np.float32)
    for f, array in enumerate(windows.arrays):
        rows = np.flatnonzero(windows.index[:, 0] == f)
        ends = windows.index[rows, 1]
        out[rows, -1] = windows.symbol_ids[f]
        for j, lag in enumerate(lags):
            out[rows, j * windows.n_features:(j + 1) * windows.n_features] = array[ends - lag]
    return out


def column_names(features: tuple[str, ...] | list[str], lags: tuple[int, ...], seq_len: int) -> list[str]:
    return [f"{name}_lag{lag}" for lag in window_lags(lags, seq_len) for name in features] + ["symbol_id"]


def fit_booster(data: TrainingData, config: GbmConfig, features: list[str] | None = None) -> lgb.Booster:
    """LightGBM on the training windows, early-stopped on the validation windows' PR-AUC; the classes are
    balanced as the LSTM's loss balances them (``negatives / positives`` of the training segment)."""
    if len(data.train) == 0 or len(data.val) == 0:
        raise ValueError(f"cannot fit on empty data: {len(data.train)} training and {len(data.val)} validation windows")
    names = column_names(features or [f"f{i}" for i in range(data.train.n_features)], config.lags, data.train.seq_len)
    params = {
        "objective": "binary", "metric": "average_precision", "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves, "min_child_samples": config.min_child_samples,
        "bagging_fraction": config.subsample, "bagging_freq": 1 if config.subsample < 1 else 0,
        "feature_fraction": config.colsample, "scale_pos_weight": positive_weight(data.train),
        "seed": config.seed, "num_threads": config.num_threads, "deterministic": True, "force_row_wise": True,
        "verbosity": -1,
    }
    categorical = [len(names) - 1]
    train = lgb.Dataset(flatten(data.train, config.lags), data.train.targets(), feature_name=names,
                        categorical_feature=categorical, free_raw_data=True)
    val = lgb.Dataset(flatten(data.val, config.lags), data.val.targets(), reference=train, feature_name=names,
                      categorical_feature=categorical)
    return lgb.train(params, train, num_boost_round=config.n_estimators, valid_sets=[val], valid_names=["val"],
                     callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)])


def predict(booster: lgb.Booster, windows: WindowDataset, lags: tuple[int, ...]) -> np.ndarray:
    """The probability of every window (the best iteration's trees)."""
    if len(windows) == 0:
        return np.empty(0, dtype=np.float64)
    return np.asarray(booster.predict(flatten(windows, lags), num_iteration=booster.best_iteration), dtype=np.float64)


def scored_rows(
    booster: lgb.Booster, windows: WindowDataset, lags: tuple[int, ...], tables: Mapping[str, SymbolTable]
) -> pd.DataFrame:
    """As :func:`pricelevel.ml.artifacts.predictions`: ``symbol, timestamp, probability, target, near_level``."""
    rows = windows.ends()
    rows["probability"] = predict(booster, windows, lags)
    rows["target"] = windows.targets().astype(np.float64)
    rows["near_level"] = labels_at(tables, rows, "near_level")
    return rows


def fit_fold(
    plan: DatasetPlan, tables: Mapping[str, SymbolTable], fold: int, seq_len: int, config: GbmConfig,
    strategy: StrategyContext, out: Path,
) -> dict[str, Any]:
    """One fold: fit, choose rules on validation exactly as the LSTM's (:func:`pricelevel.ml.walkforward.fit_fold`),
    then score and trade the test segment as :func:`pricelevel.ml.evaluation.fold_report` does."""
    data = plan.training_data(seq_len, tables, fold)
    started = time.perf_counter()
    booster = fit_booster(data, config, list(plan.spec.columns))
    fit_seconds = time.perf_counter() - started
    scored = {segment: scored_rows(booster, getattr(data, segment), config.lags, tables) for segment in ("val", "test")}
    bounds = data.bounds
    val_market = segment_market(tables, bounds.val_start, bounds.val_end, strategy.costs)
    exits = label_exits(strategy, plan.spec.labels, tables, bounds.val_start, bounds.val_end)
    rules = choose_rules(val_market, probability_matrix(val_market, scored["val"]), strategy.costs, strategy.selection,
                         strategy.base, exits.move, exits.horizon, exits.down)
    test = scored["test"]
    direction = direction_at(tables, test, plan.spec.labels)
    classification = model_scores(test["target"].to_numpy(), test["probability"].to_numpy(), direction)
    test_market = segment_market(tables, bounds.test_start, bounds.test_end, strategy.costs)
    traded = trade_probabilities(test_market, probability_matrix(test_market, test), strategy.costs, rules.chosen)
    folder = out / f"fold-{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(folder / "model.txt"), num_iteration=booster.best_iteration)
    for segment, frame in scored.items():
        frame.to_parquet(folder / f"{segment}_predictions.parquet", index=False)
    write_json(folder / "selection.json", rules.to_dict())
    return {
        "fold": fold, "seq_len": seq_len, "lags": list(window_lags(config.lags, seq_len)),
        "best_iteration": int(booster.best_iteration), "fit_seconds": fit_seconds,
        "classification": classification, "trading": score_result(traded).to_dict(),
        "validation": {"value": rules.value(), **rules.score.to_dict()}, "rules": rules.chosen.model_dump(),
    }


def summarize(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and worst over the folds (worst: lowest; drawdown: deepest), trading and classification."""
    out: dict[str, dict[str, float]] = {"mean": {}, "worst": {}}
    numbers = [(key, "trading") for key in REPORT_TRADING] + [(key, "classification") for key in CLASSIFICATION]
    for key, part in numbers:
        values = np.array([f[part].get(key, math.nan) for f in folds], dtype=np.float64)
        finite = np.isfinite(values).any()
        out["mean"][key] = float(np.nanmean(values)) if finite else math.nan
        out["worst"][key] = float(np.nanmin(values)) if finite else math.nan
    return out


def gbm_key(trained: TrainedModel, config: GbmConfig) -> str:
    """Names the baseline: the LSTM models it sits beside (their key names the data, split, tuning, rule search
    and costs), its own settings, and this code."""
    return step_key("gbm", model=trained.key, gbm=config.model_dump(mode="json"), code=code_fingerprint(fit_fold))


def train_gbm(
    plan: DatasetPlan, trained: TrainedModel, config: GbmConfig, strategy: StrategyContext, derived: DerivedStore,
) -> dict[str, Any]:
    """Every fold's baseline (reused when these inputs were trained before): ``{"folds", "summary", ...}``."""

    def write(out: Path) -> None:
        tables = plan.load()
        folds = [fit_fold(plan, tables, k, trained.fold(k).spec.seq_len, config, strategy, out) for k in range(trained.folds)]
        write_json(out / REPORT, {"config": config.model_dump(mode="json"), "folds": folds, "summary": summarize(folds)})

    out, built = derived.build("gbm", gbm_key(trained, config), write)
    return json.loads((out / REPORT).read_text()) | {"folder": str(out), "built": built}


def gbm_metrics(gbm: Mapping[str, Any], metric: str) -> dict[str, float]:
    """The MLflow metrics, all ``gbm_``-prefixed: per fold (``gbm_fold<k>_<name>``), the newest fold's test
    classification (``gbm_test_pr_auc``, ``gbm_test_direction_auc``, ...), its validation ``metric`` at the chosen
    rules (``gbm_val_sharpe``), and the mean and worst fold (``gbm_wf_mean_sharpe``; the gate's ``gbm`` entry)."""
    out: dict[str, float] = {}
    for fold in gbm["folds"]:
        k = fold["fold"]
        out |= {f"{PREFIX}fold{k}_{name}": float(v) for name, v in fold["trading"].items() if name in REPORT_TRADING}
        out |= {f"{PREFIX}fold{k}_{name}": float(v) for name, v in fold["classification"].items() if name in CLASSIFICATION}
        out[f"{PREFIX}fold{k}_fit_seconds"] = float(fold["fit_seconds"])
    newest = gbm["folds"][-1]
    out |= {f"{PREFIX}test_{name}": float(v) for name, v in newest["classification"].items()}
    out[f"{PREFIX}val_{metric}"] = float(newest["validation"].get(metric, math.nan))
    for how in ("mean", "worst"):
        out |= {f"{PREFIX}wf_{how}_{name}": float(v) for name, v in gbm["summary"][how].items()}
    return out


def with_gbm(report: Mapping[str, Any], gbm: Mapping[str, Any]) -> dict[str, Any]:
    """The walk-forward report with the baseline beside the LSTM: a ``gbm`` row in every fold's table and in the
    mean/worst table, how often the LSTM beat it, and a closing section with its rules and the LSTM's margin."""
    metric = report["metric"]
    folds = []
    for fold, extra in zip(report["folds"], gbm["folds"], strict=True):
        folds.append({**fold, "classification": {**fold["classification"], NAME: extra["classification"]},
                      "trading": {**fold["trading"], NAME: extra["trading"]}, "gbm_rules": extra["rules"]})
    summary = {key: dict(value) for key, value in report["summary"].items()}
    for how in ("mean", "worst"):
        summary[how] = {**summary[how], NAME: gbm["summary"][how]}
    lstm = [f["trading"]["model"][metric] for f in folds]
    beaten = sum(math.isfinite(m) and (not math.isfinite(f["trading"][NAME][metric]) or m > f["trading"][NAME][metric])
                 for m, f in zip(lstm, folds, strict=True))
    summary["model_beats"] = {**summary["model_beats"], NAME: {"folds": float(beaten)}}
    merged = {**report, "folds": folds, "summary": summary, "gbm": {k: v for k, v in gbm.items() if k != "folder"}}
    merged["markdown"] = walk_forward_markdown(merged) + gbm_markdown(merged, gbm)
    return merged


def gbm_markdown(report: Mapping[str, Any], gbm: Mapping[str, Any]) -> str:
    """The closing section: how the baseline reads a window, the rules it chose, LSTM minus LightGBM."""
    metric = report["metric"]
    lines = ["## LightGBM baseline (`gbm`)", "",
             f"LightGBM on the LSTM's rows: the normalised features of each window's last bar and of the bars "
             f"{', '.join(str(lag) for lag in gbm['folds'][-1]['lags'] if lag)} back, plus the symbol; early-stopped on "
             "validation PR-AUC, rules chosen on validation like the LSTM's.", ""]
    for fold in gbm["folds"]:
        rules = fold["rules"]
        lines.append(f"- fold {fold['fold']}: {fold['best_iteration']} trees ({fold['fit_seconds']:.1f} s); threshold "
                     f"{rules['threshold']:.4f}, stop-loss {rules['sl_stop']}, take-profit {rules['tp_stop']}, time stop "
                     f"{rules['max_hold_bars']} bars")
    mean = report["summary"]["mean"]
    lines += ["", f"LSTM minus LightGBM, mean over the folds: {metric} "
                  f"{_diff(mean['model'].get(metric), mean[NAME].get(metric))}, PR-AUC "
                  f"{_diff(mean['model'].get('pr_auc'), mean[NAME].get('pr_auc'))}, direction AUC "
                  f"{_diff(mean['model'].get('direction_auc'), mean[NAME].get('direction_auc'))}.", ""]
    return "\n".join(lines)


def _diff(a: object, b: object) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not (math.isfinite(a) and math.isfinite(b)):
        return "-"
    return f"{a - b:+.3f}"


def gbm_baseline_step(
    plan: DatasetPlan, trained: TrainedModel, report: Mapping[str, Any], config: GbmConfig, strategy: StrategyContext,
    derived: DerivedStore, run: RunLog | None,
) -> dict[str, Any]:
    """Train (or reuse) the baseline on every fold and return the walk-forward ``report`` with it beside the
    LSTM (its ``gbm_*`` metrics added to the report's ``scores``); those metrics, its JSON and the merged report
    go to ``run``."""
    gbm = train_gbm(plan, trained, config, strategy, derived)
    merged = with_gbm(report, gbm)
    metrics = gbm_metrics(gbm, report["metric"])
    merged["scores"] = {**report["scores"], **metrics}
    if run is not None:
        run.log_metrics(metrics)
        run.log_json({k: v for k, v in gbm.items() if k != "folder"}, "gbm_baseline.json")
        run.log_json({k: v for k, v in merged.items() if k != "markdown"}, "walk_forward.json")
        run.log_text(merged["markdown"], "walk_forward.md")
    return merged
