"""Classification scores against hand-computed values, and the two no-model baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pricelevel.ml.evaluation import (
    BASELINES,
    METRICS,
    baseline_scores,
    classification_scores,
    flat_scores,
    metric_value,
)

TARGET = np.array([0, 0, 1, 1, 1, 0])
PROBABILITY = np.array([0.1, 0.6, 0.4, 0.8, 0.9, 0.2])


def _log_loss(target, probability) -> float:
    return -sum(math.log(p) if y else math.log(1 - p) for y, p in zip(target, probability, strict=True)) / len(target)


def test_scores_on_a_tiny_array_match_the_hand_computed_values() -> None:
    scores = classification_scores(TARGET, PROBABILITY)
    assert set(scores) == set(METRICS)
    # At 0.5: predicted 0 1 0 1 1 0 -> TP 2 (0.8, 0.9), FP 1 (0.6), FN 1 (0.4), TN 2.
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    # Ranking 0.9+ 0.8+ 0.6- 0.4+ 0.2- 0.1-: average precision = sum (R_k - R_k-1) P_k = 1/3 + 1/3 + 1/3 * 3/4.
    assert scores["pr_auc"] == pytest.approx(11 / 12)
    # 8 of the 9 (positive, negative) pairs are ordered right (0.4 < 0.6 is the one wrong).
    assert scores["roc_auc"] == pytest.approx(8 / 9)
    assert scores["loss"] == pytest.approx(_log_loss(TARGET, PROBABILITY))
    assert all(isinstance(v, float) for v in scores.values())


def test_threshold_moves_the_thresholded_scores_only() -> None:
    scores = classification_scores(TARGET, PROBABILITY, threshold=0.35)
    # predicted 0 1 1 1 1 0: TP 3, FP 1
    assert scores["precision"] == pytest.approx(3 / 4) and scores["recall"] == 1.0
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["pr_auc"] == pytest.approx(11 / 12) and scores["roc_auc"] == pytest.approx(8 / 9)
    # the boundary is inclusive: p >= threshold is positive
    assert classification_scores(np.array([1, 0]), np.array([0.5, 0.2]))["recall"] == 1.0


def test_pr_auc_is_sklearn_average_precision_with_ties_not_the_trapezoid() -> None:
    # One tied group of three (two positives) first: precision 2/3 at recall 1 -> AP = 2/3.
    # A trapezoid under the PR curve would give another number (it interpolates from precision 1).
    scores = classification_scores(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.1]))
    assert scores["pr_auc"] == pytest.approx(2 / 3)
    assert scores["roc_auc"] == pytest.approx(0.75)  # tied pairs count one half: (1 + 0.5 + 1 + 0.5) / 4


def test_loss_clips_certain_wrong_answers() -> None:
    scores = classification_scores(np.array([1, 0]), np.array([0.0, 1.0]))
    assert scores["loss"] == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert math.isfinite(scores["loss"])
    perfect = classification_scores(np.array([1, 0]), np.array([1.0, 0.0]))
    assert perfect["loss"] == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
    assert perfect["pr_auc"] == 1.0 and perfect["roc_auc"] == 1.0 and perfect["accuracy"] == 1.0


@pytest.mark.parametrize("value", [0, 1])
def test_one_class_target_ties_every_model(value: int) -> None:
    """One convention everywhere (training, tuning, promotion): nothing to rank, so every model ties."""
    target = np.full(4, value)
    probability = np.array([0.2, 0.7, 0.4, 0.9])
    scores = classification_scores(target, probability)
    assert scores["pr_auc"] == float(value) and scores["roc_auc"] == 0.5
    assert classification_scores(target, probability[::-1])["pr_auc"] == scores["pr_auc"]
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["loss"] == pytest.approx(_log_loss(target, probability))
    if value == 0:
        assert scores["precision"] == 0.0 and scores["recall"] == 0.0 and scores["f1"] == 0.0
    else:
        assert scores["precision"] == 1.0 and scores["recall"] == 0.5


def test_mismatched_or_empty_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="equal, non-empty"):
        classification_scores(np.array([0, 1]), np.array([0.5]))
    with pytest.raises(ValueError, match="equal, non-empty"):
        classification_scores(np.array([]), np.array([]))


def test_majority_baseline_pr_auc_is_the_positive_rate() -> None:
    target = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])  # 20 % positive here
    label_now = np.zeros(10)
    low = baseline_scores(target, label_now, train_positive_rate=0.3)
    assert set(low) == set(BASELINES)
    assert low["majority"]["pr_auc"] == pytest.approx(0.2)  # of these rows, not of training
    assert low["majority"]["roc_auc"] == pytest.approx(0.5)
    # rate < 0.5: the majority is 0, nothing is predicted positive
    assert low["majority"]["recall"] == 0.0 and low["majority"]["accuracy"] == pytest.approx(0.8)
    assert low["majority"]["loss"] == pytest.approx(_log_loss(target, [0.3] * 10))
    # rate >= 0.5: the majority is 1, everything is predicted positive
    high = baseline_scores(target, label_now, train_positive_rate=0.7)
    assert high["majority"]["recall"] == 1.0 and high["majority"]["precision"] == pytest.approx(0.2)
    assert high["majority"]["pr_auc"] == pytest.approx(0.2)


def test_near_level_now_baseline_scores_the_label_of_the_last_bar() -> None:
    target = np.array([1, 1, 0, 0, 1, 0])
    label_now = np.array([1, 0, 0, 1, 1, 0])
    near = baseline_scores(target, label_now, 0.1)["near_level_now"]
    # TP 2, FN 1, FP 1, TN 2
    assert near["accuracy"] == pytest.approx(4 / 6)
    assert near["precision"] == pytest.approx(2 / 3) and near["recall"] == pytest.approx(2 / 3)
    assert near == classification_scores(target, label_now.astype(float))
    # a perfect "now" rule scores perfectly: label_now, not the target or the base rate, is used
    assert baseline_scores(target, target, 0.1)["near_level_now"]["pr_auc"] == 1.0


def test_metric_value_reads_the_unprefixed_score() -> None:
    scores = classification_scores(TARGET, PROBABILITY)
    assert metric_value(scores, "val_pr_auc") == scores["pr_auc"]
    assert metric_value(scores, "val_loss") == scores["loss"]
    assert metric_value(scores, "val_roc_auc") == scores["roc_auc"]
    assert metric_value({"pr_auc": 0.25, "loss": 0.75}, "val_loss") == 0.75
    assert flat_scores("test", {"pr_auc": 0.25, "loss": 0.75}) == {"test_pr_auc": 0.25, "test_loss": 0.75}
