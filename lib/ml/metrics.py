"""Classification scores, computed one way everywhere: the per-epoch validation metrics of training (early
stopping, checkpoints, Optuna's pruning), the test scores and baselines of evaluation, and promotion.

One-class targets have no ranking to score. By one convention everywhere: PR-AUC (average precision) is 0
when there is no positive to find and 1 when everything is positive; ROC-AUC is 0.5 (chance). A model can then
never beat a baseline on such a window (they tie), and early stopping still sees "higher is better".

**Direction skill** (:func:`direction_scores`) is the ROC-AUC of the same probability on the bars where exactly one
barrier was touched first (up-first = 1, down-first = 0; timeouts and unknown bars left out): a model that only
ranks volatile bars high scores PR-AUC above the base rate and direction AUC 0.5.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "loss")
#: Probabilities are clipped to [EPS, 1 - EPS] in the log loss.
EPS = 1e-7


def classification_scores(target: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall and F1 at ``threshold``; ROC-AUC and PR-AUC from the ranking; log loss
    (unweighted binary cross-entropy of the probabilities: the calibration, whatever ``pos_weight`` trained)."""
    target = np.asarray(target, dtype=np.float64) >= 0.5
    probability = np.asarray(probability, dtype=np.float64)
    if target.shape != probability.shape or target.size == 0:
        raise ValueError(f"need equal, non-empty target and probability arrays, got {target.shape} and {probability.shape}")
    predicted = probability >= threshold
    positives = int(target.sum())
    clipped = np.clip(probability, EPS, 1 - EPS)
    loss = -np.mean(np.where(target, np.log(clipped), np.log(1 - clipped)))
    if 0 < positives < target.size:
        roc_auc, pr_auc = float(roc_auc_score(target, probability)), float(average_precision_score(target, probability))
    else:
        roc_auc, pr_auc = 0.5, float(positives > 0)
    return {
        "accuracy": float(accuracy_score(target, predicted)),
        "precision": float(precision_score(target, predicted, zero_division=0)),
        "recall": float(recall_score(target, predicted, zero_division=0)),
        "f1": float(f1_score(target, predicted, zero_division=0)),
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "loss": float(loss),
    }


def direction_scores(direction: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """``direction_auc``: the ROC-AUC of ``probability`` for separating up-first from down-first bars, by the
    classes of :func:`pricelevel.features.labels.first_touch` (+1 up first, -1 down first; 0 and NaN are left
    out), 0.5 when either class is missing; ``direction_rows``: how many bars it was measured on."""
    direction = np.asarray(direction, dtype=np.float64)
    probability = np.asarray(probability, dtype=np.float64)
    if direction.shape != probability.shape:
        raise ValueError(f"need equal direction and probability arrays, got {direction.shape} and {probability.shape}")
    decided = (np.abs(direction) == 1.0) & np.isfinite(probability)
    up = direction[decided] > 0
    auc = float(roc_auc_score(up, probability[decided])) if 0 < up.sum() < up.size else 0.5
    return {"direction_auc": auc, "direction_rows": float(up.size)}


def metric_value(scores: dict[str, float], tuned_metric: str) -> float:
    """The tuned metric (``val_pr_auc``) read from unprefixed scores (``pr_auc``)."""
    return float(scores[tuned_metric.split("_", 1)[1]])
