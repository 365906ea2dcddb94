"""Classification scores of a model beside the two no-model baselines it has to beat.

The baselines answer "is the model worth anything?": always predicting the majority class, and the rule
"the price is near a level now, so it will be next bar" (the label of the last bar in the window, which is
known when the prediction is made).

Beside PR-AUC every classifier gets its **direction skill** (``direction_auc``,
:func:`pricelevel.ml.metrics.direction_scores`): the ROC-AUC of its probability on the bars where exactly one of
the label's barriers was touched first (:func:`pricelevel.features.labels.direction_classes`: the triple
barrier's own, +/- ``move_frac`` for the other labels), up-first against down-first. A model that ranks
volatile bars well but cannot tell up from down has a PR-AUC above the base rate and a direction AUC of 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from pricelevel.backtest.baselines import BASELINE_NAMES, LevelRule, strategy_baselines, volatility_rules_of
from pricelevel.backtest.selection import StrategyContext
from pricelevel.backtest.trading import probability_matrix, score_result, trade_probabilities
from pricelevel.core.runlog import RunLog
from pricelevel.features.config import LabelsConfig
from pricelevel.features.labels import direction_classes
from pricelevel.ml.artifacts import FoldModel, TrainedModel
from pricelevel.ml.dataset import DatasetPlan, SymbolTable
from pricelevel.ml.metrics import METRICS, classification_scores, direction_scores, metric_value
from pricelevel.ml.walkforward import segment_market

__all__ = [
    "BASELINES", "METRICS", "baseline_scores", "classification_scores", "direction_at", "direction_scores", "evaluate_step",
    "metric_value", "scores_table",
]
BASELINES = ("majority", "near_level_now")


def baseline_scores(
    target: np.ndarray, label_now: np.ndarray, train_positive_rate: float, direction: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Scores of the two baselines on the same rows as the model (with their direction skill when the rows'
    ``direction`` classes are given).

    ``majority`` predicts the training segment's majority class with its base rate as the probability (a
    constant score: PR-AUC equals the positive rate, ROC-AUC 0.5). ``near_level_now`` predicts the label of
    the window's last bar.
    """
    target = np.asarray(target)
    majority = np.full(target.shape, train_positive_rate, dtype=np.float64)
    majority_threshold = 0.5 if train_positive_rate < 0.5 else train_positive_rate
    near = np.asarray(label_now, dtype=np.float64)
    return {
        "majority": model_scores(target, majority, direction, threshold=majority_threshold),
        "near_level_now": model_scores(target, near, direction),
    }


def model_scores(
    target: np.ndarray, probability: np.ndarray, direction: np.ndarray | None, threshold: float = 0.5
) -> dict[str, float]:
    """:func:`classification_scores`, plus :func:`direction_scores` when ``direction`` is given."""
    scores = classification_scores(target, probability, threshold=threshold)
    return scores if direction is None else scores | direction_scores(direction, probability)


def direction_at(tables: Mapping[str, SymbolTable], rows: pd.DataFrame, labels: LabelsConfig) -> np.ndarray:
    """The first-touch class (+1 up, -1 down, 0 timeout, NaN unknown) of each ``(symbol, timestamp)`` row, from
    each symbol's candles by ``labels`` (:func:`pricelevel.features.labels.direction_classes`)."""
    out = np.full(len(rows), np.nan)
    symbols = rows["symbol"].to_numpy()
    timestamps = pd.DatetimeIndex(rows["timestamp"])
    for symbol in pd.unique(symbols):
        at = np.flatnonzero(symbols == symbol)
        candles = tables[symbol].candles
        position = pd.DatetimeIndex(candles["timestamp"]).get_indexer(timestamps[at])
        if (position < 0).any():
            raise KeyError(f"{symbol}: rows not in its candles")
        out[at] = direction_classes(candles, labels)[position]
    return out


def flat_scores(prefix: str, scores: Mapping[str, float]) -> dict[str, float]:
    """``{"pr_auc": x}`` -> ``{"test_pr_auc": x}``: the names logged to MLflow and printed."""
    return {f"{prefix}_{name}": value for name, value in scores.items()}


#: Rows of the scores table: label and the prefix of its scores.
SCORE_ROWS = (("LSTM (test)", "test"), ("majority", "baseline_majority"), ("near level now", "baseline_near_level_now"))
TABLE_METRICS = ("pr_auc", "roc_auc", "direction_auc", "f1", "precision", "recall", "accuracy")
#: The classification numbers of each fold logged to MLflow (``fold<k>_<classifier>_<name>``) and summarised.
FOLD_CLASSIFICATION = ("pr_auc", "roc_auc", "direction_auc", "direction_rows")


#: Strategies of the walk-forward report, the model first.
STRATEGIES = ("model", *BASELINE_NAMES)
REPORT_TRADING = ("sharpe", "sortino", "calmar", "total_return", "max_drawdown", "n_trades", "fee_share")


def fold_report(
    fold: int, model: FoldModel, tables: Mapping[str, SymbolTable], strategy: StrategyContext
) -> dict[str, object]:
    """One fold's test segment: the model's classification scores beside the no-model baselines', and its
    strategy (its own rules, chosen on the fold's validation) beside cash, buy-and-hold and the level rule."""
    spec, test = model.spec, model.predictions("test")
    target, probability = test["target"].to_numpy(), test["probability"].to_numpy()
    direction = direction_at(tables, test, LabelsConfig.model_validate(spec.labels))
    classification = {"model": model_scores(target, probability, direction)}
    classification |= baseline_scores(target, test["near_level"].to_numpy(), spec.extra["train_positive_rate"], direction)
    start = pd.Timestamp(spec.extra["test_start"])
    end = pd.Timestamp(spec.extra["test_end"]) if spec.extra.get("test_end") else None
    market = segment_market(tables, start, end, strategy.costs)
    traded = trade_probabilities(market, probability_matrix(market, test), strategy.costs, spec.strategy_rules())
    candles = {s: t.candles for s, t in tables.items()}
    history = {s: t.history for s, t in tables.items()}
    level = LevelRule.model_validate(spec.extra["level_rule"])
    trading = {"model": score_result(traded).to_dict()}
    trading |= {k: v.to_dict() for k, v in strategy_baselines(market, candles, history, level, strategy.costs, strategy.base,
                                                              volatility_rules_of(spec.extra)).items()}
    return {
        "fold": fold, "test_start": str(start), "test_end": str(end or market.timestamps[-1]), "bars": market.n_bars,
        "rules": spec.rules, "level_rule": spec.extra["level_rule"], "classification": classification, "trading": trading,
    }


def summarize_folds(folds: list[dict[str, object]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and worst over the folds of every strategy's trading numbers (worst: lowest, or for drawdown the
    deepest), plus how often the model beat each baseline on ``metric``."""
    out: dict[str, dict[str, dict[str, float]]] = {"mean": {}, "worst": {}}
    names = [name for name in STRATEGIES if all(name in f["trading"] for f in folds)]  # a model trained before a control
    for name in names:
        for key in REPORT_TRADING:
            values = np.array([f["trading"][name][key] for f in folds], dtype=np.float64)
            out["mean"].setdefault(name, {})[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            out["worst"].setdefault(name, {})[key] = float(np.nanmin(values)) if np.isfinite(values).any() else math.nan
    for key in FOLD_CLASSIFICATION:  # the model's classification numbers beside its trading ones
        values = np.array([f["classification"]["model"].get(key, math.nan) for f in folds], dtype=np.float64)
        out["mean"]["model"][key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        out["worst"]["model"][key] = float(np.nanmin(values)) if np.isfinite(values).any() else math.nan
    model = [f["trading"]["model"][metric] for f in folds]
    out["model_beats"] = {
        name: {"folds": float(sum(_beats(m, f["trading"][name][metric]) for m, f in zip(model, folds, strict=True)))}
        for name in names[1:]
    }
    return out


def _beats(value: float, reference: float) -> bool:
    return math.isfinite(value) and (not math.isfinite(reference) or value > reference)


def evaluate_step(
    plan: DatasetPlan, trained: TrainedModel, tuned_metric: str, strategy: StrategyContext, run: RunLog | None
) -> dict[str, object]:
    """The walk-forward report: every fold's test segment, model against baselines, classification and trading
    (same bars, same costs), with the mean and worst fold; logged to ``run`` (metrics, JSON and Markdown).
    The flat ``test_*`` / ``baseline_*`` scores are the newest fold's (the registered model's)."""
    tables = plan.load()
    folds = [fold_report(k, trained.fold(k), tables, strategy) for k in range(trained.folds)]
    metric = strategy.selection.metric
    report = {"metric": metric, "folds": folds, "summary": summarize_folds(folds, metric)}
    newest = folds[-1]
    scores = flat_scores("test", newest["classification"]["model"])
    for name in BASELINES:
        scores |= flat_scores(f"baseline_{name}", newest["classification"][name])
    result = trained.newest.result
    # The validation score of the checkpoint kept (the per-epoch history is under the metric's own name).
    scores[f"best_{tuned_metric}"] = float(result["best_score"])
    scores["train_samples_per_second"] = float(result["train_samples_per_second"])
    for fold in folds:
        for name, values in fold["trading"].items():
            scores |= {f"fold{fold['fold']}_{name}_{k}": v for k, v in values.items() if k in REPORT_TRADING}
        for name, values in fold["classification"].items():
            scores |= {f"fold{fold['fold']}_{name}_{k}": v for k, v in values.items() if k in FOLD_CLASSIFICATION}
    for how in ("mean", "worst"):
        for name, values in report["summary"][how].items():
            scores |= {f"wf_{how}_{name}_{k}": v for k, v in values.items()}
    report["scores"] = scores
    report["markdown"] = walk_forward_markdown(report)
    if run is not None:
        run.log_metrics(scores)
        run.log_json({k: v for k, v in report.items() if k != "markdown"}, "walk_forward.json")
        run.log_text(report["markdown"], "walk_forward.md")
    return report


#: Model baselines a report may carry (:mod:`pricelevel.ml.gbm` adds ``gbm``), shown right after the model.
MODEL_BASELINES = ("gbm",)


def report_rows(present: Mapping[str, object]) -> list[str]:
    """The report's rows: the model, the model baselines in ``present``, then the no-model strategies."""
    return [STRATEGIES[0], *(name for name in MODEL_BASELINES if name in present),
            *(name for name in STRATEGIES[1:] if name in present)]


def walk_forward_markdown(report: Mapping[str, object]) -> str:
    """The report as people read it: one table per fold, model beside the baselines, and the summary."""
    metric = report["metric"]

    def num(value: object, pct: bool = False) -> str:
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "-"
        return f"{value:+.1%}" if pct else (f"{value:.0f}" if isinstance(value, int) else f"{value:.3f}")

    lines = [f"# Walk-forward evaluation ({len(report['folds'])} folds; strategies ranked by {metric} after costs)", ""]
    header = ("| strategy | PR-AUC | ROC-AUC | direction AUC | Sharpe | total return | max drawdown | trades | "
              "fees / profit |")
    for fold in report["folds"]:
        lines += [f"## Fold {fold['fold']}: test {fold['test_start'][:10]} .. {fold['test_end'][:10]} ({fold['bars']} bars)",
                  "", header, "|---|---|---|---|---|---|---|---|---|"]
        cls = fold["classification"]
        for name in report_rows(fold["trading"]):
            t = fold["trading"][name]
            c = cls.get(name, {})  # the models' classification (LSTM, gbm); none for the no-model strategies
            lines.append(f"| {name} | {num(c.get('pr_auc'))} | {num(c.get('roc_auc'))} | {num(c.get('direction_auc'))} | "
                         f"{num(t['sharpe'])} | {num(t['total_return'], True)} | {num(t['max_drawdown'], True)} | "
                         f"{t['n_trades']} | {num(t['fee_share'], True)} |")
        for name in BASELINES:
            lines.append(f"| {name.replace('_', ' ')} (classifier) | {num(cls[name]['pr_auc'])} | {num(cls[name]['roc_auc'])} "
                         f"| {num(cls[name].get('direction_auc'))} | | | | | |")
        rows = cls["model"].get("direction_rows")
        if rows is not None:
            lines += ["", f"Direction AUC: up-first against down-first on the {int(rows)} test bars where exactly one "
                          "barrier was touched first."]
        rules = fold["rules"]
        lines += ["", f"Rules chosen on validation: threshold {rules['threshold']:.4f}, stop-loss {rules['sl_stop']}, "
                      f"take-profit {rules['tp_stop']}, time stop {rules['max_hold_bars']} bars; level rule "
                      f"{fold['level_rule']}", ""]
    summary = report["summary"]
    lines += ["## Mean and worst fold", "", "| strategy | mean Sharpe | worst Sharpe | mean return | worst return | "
              "worst drawdown | mean trades |", "|---|---|---|---|---|---|---|"]
    for name in report_rows(summary["mean"]):
        mean, worst = summary["mean"][name], summary["worst"][name]
        lines.append(f"| {name} | {num(mean['sharpe'])} | {num(worst['sharpe'])} | {num(mean['total_return'], True)} | "
                     f"{num(worst['total_return'], True)} | {num(worst['max_drawdown'], True)} | {num(mean['n_trades'])} |")
    lines += ["", f"Model classification over the folds: PR-AUC mean {num(summary['mean']['model'].get('pr_auc'))}, "
                  f"worst {num(summary['worst']['model'].get('pr_auc'))}; direction AUC mean "
                  f"{num(summary['mean']['model'].get('direction_auc'))}, worst {num(summary['worst']['model'].get('direction_auc'))}."]
    beats = ", ".join(f"{name} in {int(v['folds'])} of {len(report['folds'])}" for name, v in summary["model_beats"].items())
    return "\n".join([*lines, "", f"The model's {metric} beat: {beats} folds.", ""])


def scores_table(scores: Mapping[str, float], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, object]]:
    """The model and the baselines side by side: one row each, ``metrics`` across (CLI, Prefect artifact)."""
    return [
        {"model": label, **{m: round(float(scores.get(f"{prefix}_{m}", math.nan)), 4) for m in metrics}}
        for label, prefix in SCORE_ROWS
    ]
