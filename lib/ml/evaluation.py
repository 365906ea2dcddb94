"""Classification scores of a model beside the two no-model baselines it has to beat.

The baselines answer "is the model worth anything?": always predicting the majority class, and the rule
"the price is near a level now, so it will be next bar" (the label of the last bar in the window, which is
known when the prediction is made).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pricelevel.core.runlog import RunLog
from pricelevel.ml.artifacts import TrainedModel

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "loss")
BASELINES = ("majority", "near_level_now")


def classification_scores(target: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 at ``threshold``; ROC-AUC and PR-AUC from the ranking; log loss
    (unweighted binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7]).

    With one class only, the ranking scores are undefined and reported as NaN rather than guessed.
    """
    target = np.asarray(target, dtype=np.int8)
    probability = np.asarray(probability, dtype=np.float64)
    if target.shape != probability.shape or target.size == 0:
        raise ValueError(f"need equal, non-empty target and probability arrays, got {target.shape} and {probability.shape}")
    predicted = (probability >= threshold).astype(np.int8)
    both_classes = 0 < int(target.sum()) < target.size
    clipped = np.clip(probability, 1e-7, 1 - 1e-7)
    loss = -np.mean(target * np.log(clipped) + (1 - target) * np.log(1 - clipped))
    return {
        "accuracy": float(accuracy_score(target, predicted)),
        "precision": float(precision_score(target, predicted, zero_division=0)),
        "recall": float(recall_score(target, predicted, zero_division=0)),
        "f1": float(f1_score(target, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(target, probability)) if both_classes else math.nan,
        "pr_auc": float(average_precision_score(target, probability)) if both_classes else math.nan,
        "loss": float(loss),
    }


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


def metric_value(scores: Mapping[str, float], tuned_metric: str) -> float:
    """The tuned metric (``val_pr_auc``) read from unprefixed scores (``pr_auc``)."""
    return float(scores[tuned_metric.split("_", 1)[1]])


#: Rows of the scores table: label and the prefix of its scores.
SCORE_ROWS = (("LSTM (test)", "test"), ("majority", "baseline_majority"), ("near level now", "baseline_near_level_now"))
TABLE_METRICS = ("pr_auc", "roc_auc", "f1", "precision", "recall", "accuracy")


def evaluate_step(trained: TrainedModel, tuned_metric: str, run: RunLog | None) -> dict[str, float]:
    """Test-segment scores of the model beside the majority-class and "near a level now" baselines, from the
    predictions saved with it; logged to ``run``."""
    predictions = trained.predictions()
    target, probability = predictions["target"].to_numpy(), predictions["probability"].to_numpy()
    scores = flat_scores("test", classification_scores(target, probability))
    base = baseline_scores(target, predictions["near_level"].to_numpy(), trained.spec.extra["train_positive_rate"])
    for name, values in base.items():
        scores |= flat_scores(f"baseline_{name}", values)
    result = trained.result
    # The validation score of the checkpoint kept (the per-epoch history is under the metric's own name).
    scores[f"best_{tuned_metric}"] = float(result["best_score"])
    scores["train_samples_per_second"] = float(result["train_samples_per_second"])
    if run is not None:
        run.log_metrics(scores)
    return scores


def scores_table(scores: Mapping[str, float], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, object]]:
    """The model and the baselines side by side: one row each, ``metrics`` across (CLI, Prefect artifact)."""
    return [
        {"model": label, **{m: round(float(scores.get(f"{prefix}_{m}", math.nan)), 4) for m in metrics}}
        for label, prefix in SCORE_ROWS
    ]
