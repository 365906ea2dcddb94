"""Classification scores of a model beside the two no-model baselines it has to beat.

The baselines answer "is the model worth anything?": always predicting the majority class, and the rule
"the price is near a level now, so it will be next bar" (the label of the last bar in the window, which is
known when the prediction is made).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from pricelevel.backtest.baselines import LevelRule, strategy_baselines
from pricelevel.backtest.selection import StrategyContext
from pricelevel.backtest.trading import probability_matrix, score_result, trade_probabilities
from pricelevel.core.runlog import RunLog
from pricelevel.ml.artifacts import FoldModel, TrainedModel
from pricelevel.ml.dataset import DatasetPlan, SymbolTable
from pricelevel.ml.metrics import METRICS, classification_scores, metric_value
from pricelevel.ml.walkforward import segment_market

__all__ = ["BASELINES", "METRICS", "baseline_scores", "classification_scores", "evaluate_step", "metric_value", "scores_table"]
BASELINES = ("majority", "near_level_now")


def baseline_scores(
    target: np.ndarray, label_now: np.ndarray, train_positive_rate: float
) -> dict[str, dict[str, float]]:
    """Scores of the two baselines on the same rows as the model.

    ``majority`` predicts the training segment's majority class with its base rate as the probability (a
    constant score: PR-AUC equals the positive rate, ROC-AUC 0.5). ``near_level_now`` predicts the label of
    the window's last bar.
    """
    target = np.asarray(target)
    majority = np.full(target.shape, train_positive_rate, dtype=np.float64)
    majority_threshold = 0.5 if train_positive_rate < 0.5 else train_positive_rate
    return {
        "majority": classification_scores(target, majority, threshold=majority_threshold),
        "near_level_now": classification_scores(target, np.asarray(label_now, dtype=np.float64)),
    }


def flat_scores(prefix: str, scores: Mapping[str, float]) -> dict[str, float]:
    """``{"pr_auc": x}`` -> ``{"test_pr_auc": x}``: the names logged to MLflow and printed."""
    return {f"{prefix}_{name}": value for name, value in scores.items()}


#: Rows of the scores table: label and the prefix of its scores.
SCORE_ROWS = (("LSTM (test)", "test"), ("majority", "baseline_majority"), ("near level now", "baseline_near_level_now"))
TABLE_METRICS = ("pr_auc", "roc_auc", "f1", "precision", "recall", "accuracy")


#: Strategies of the walk-forward report, the model first.
STRATEGIES = ("model", "cash", "buy_and_hold", "level_rule")
REPORT_TRADING = ("sharpe", "sortino", "calmar", "total_return", "max_drawdown", "n_trades", "fee_share")


def fold_report(
    fold: int, model: FoldModel, tables: Mapping[str, SymbolTable], strategy: StrategyContext
) -> dict[str, object]:
    """One fold's test segment: the model's classification scores beside the no-model baselines', and its
    strategy (its own rules, chosen on the fold's validation) beside cash, buy-and-hold and the level rule."""
    spec, test = model.spec, model.predictions("test")
    target, probability = test["target"].to_numpy(), test["probability"].to_numpy()
    classification = {"model": classification_scores(target, probability)}
    classification |= baseline_scores(target, test["near_level"].to_numpy(), spec.extra["train_positive_rate"])
    start = pd.Timestamp(spec.extra["test_start"])
    end = pd.Timestamp(spec.extra["test_end"]) if spec.extra.get("test_end") else None
    market = segment_market(tables, start, end, strategy.costs)
    traded = trade_probabilities(market, probability_matrix(market, test), strategy.costs, spec.strategy_rules())
    candles = {s: t.candles for s, t in tables.items()}
    history = {s: t.history for s, t in tables.items()}
    level = LevelRule.model_validate(spec.extra["level_rule"])
    trading = {"model": score_result(traded).to_dict()}
    trading |= {k: v.to_dict() for k, v in strategy_baselines(market, candles, history, level, strategy.costs, strategy.base).items()}
    return {
        "fold": fold, "test_start": str(start), "test_end": str(end or market.timestamps[-1]), "bars": market.n_bars,
        "rules": spec.rules, "level_rule": spec.extra["level_rule"], "classification": classification, "trading": trading,
    }


def summarize_folds(folds: list[dict[str, object]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and worst over the folds of every strategy's trading numbers (worst: lowest, or for drawdown the
    deepest), plus how often the model beat each baseline on ``metric``."""
    out: dict[str, dict[str, dict[str, float]]] = {"mean": {}, "worst": {}}
    for name in STRATEGIES:
        for key in REPORT_TRADING:
            values = np.array([f["trading"][name][key] for f in folds], dtype=np.float64)
            out["mean"].setdefault(name, {})[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
            out["worst"].setdefault(name, {})[key] = float(np.nanmin(values)) if np.isfinite(values).any() else math.nan
    model = [f["trading"]["model"][metric] for f in folds]
    out["model_beats"] = {
        name: {"folds": float(sum(_beats(m, f["trading"][name][metric]) for m, f in zip(model, folds, strict=True)))}
        for name in STRATEGIES[1:]
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


def walk_forward_markdown(report: Mapping[str, object]) -> str:
    """The report as people read it: one table per fold, model beside the baselines, and the summary."""
    metric = report["metric"]

    def num(value: object, pct: bool = False) -> str:
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "-"
        return f"{value:+.1%}" if pct else (f"{value:.0f}" if isinstance(value, int) else f"{value:.3f}")

    lines = [f"# Walk-forward evaluation ({len(report['folds'])} folds; strategies ranked by {metric} after costs)", ""]
    header = "| strategy | PR-AUC | ROC-AUC | Sharpe | total return | max drawdown | trades | fees / profit |"
    for fold in report["folds"]:
        lines += [f"## Fold {fold['fold']}: test {fold['test_start'][:10]} .. {fold['test_end'][:10]} ({fold['bars']} bars)",
                  "", header, "|---|---|---|---|---|---|---|---|"]
        cls = fold["classification"]
        for name in STRATEGIES:
            t = fold["trading"][name]
            c = cls.get("model" if name == "model" else "", {})
            lines.append(f"| {name} | {num(c.get('pr_auc'))} | {num(c.get('roc_auc'))} | {num(t['sharpe'])} | "
                         f"{num(t['total_return'], True)} | {num(t['max_drawdown'], True)} | {t['n_trades']} | "
                         f"{num(t['fee_share'], True)} |")
        for name in BASELINES:
            lines.append(f"| {name.replace('_', ' ')} (classifier) | {num(cls[name]['pr_auc'])} | {num(cls[name]['roc_auc'])} "
                         "| | | | | |")
        rules = fold["rules"]
        lines += ["", f"Rules chosen on validation: threshold {rules['threshold']:.4f}, stop-loss {rules['sl_stop']}, "
                      f"take-profit {rules['tp_stop']}, time stop {rules['max_hold_bars']} bars; level rule "
                      f"{fold['level_rule']}", ""]
    summary = report["summary"]
    lines += ["## Mean and worst fold", "", "| strategy | mean Sharpe | worst Sharpe | mean return | worst return | "
              "worst drawdown | mean trades |", "|---|---|---|---|---|---|---|"]
    for name in STRATEGIES:
        mean, worst = summary["mean"][name], summary["worst"][name]
        lines.append(f"| {name} | {num(mean['sharpe'])} | {num(worst['sharpe'])} | {num(mean['total_return'], True)} | "
                     f"{num(worst['total_return'], True)} | {num(worst['max_drawdown'], True)} | {num(mean['n_trades'])} |")
    beats = ", ".join(f"{name} in {int(v['folds'])} of {len(report['folds'])}" for name, v in summary["model_beats"].items())
    return "\n".join([*lines, "", f"The model's {metric} beat: {beats} folds.", ""])


def scores_table(scores: Mapping[str, float], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, object]]:
    """The model and the baselines side by side: one row each, ``metrics`` across (CLI, Prefect artifact)."""
    return [
        {"model": label, **{m: round(float(scores.get(f"{prefix}_{m}", math.nan)), 4) for m in metrics}}
        for label, prefix in SCORE_ROWS
    ]
