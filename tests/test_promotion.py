"""The promotion rule as a table: metric better/worse/equal/NaN, tolerances, first model vs baselines."""

from __future__ import annotations

import math

import pytest

from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.promotion import Decision, Scores, decide, decision_tags

NAN = math.nan
BASELINES = {"majority": 0.30, "near_level_now": 0.35}


def _decide(challenger: Scores, champion: Scores | None, direction: str = "maximize", **config) -> Decision:
    metric = "val_loss" if direction == "minimize" else "val_pr_auc"
    return decide(challenger, champion, PromotionConfig(**config), metric, direction)


@pytest.mark.parametrize(
    ("challenger", "champion", "config", "promote"),
    [
        # (metric, backtest) pairs, maximize
        ((0.412, 1.20), (0.398, 0.95), {}, True),
        ((0.390, 1.20), (0.398, 0.95), {}, False),  # worse metric
        ((0.398, 1.20), (0.398, 0.95), {}, False),  # equal metric is not better
        ((0.412, 0.90), (0.398, 0.95), {}, False),  # worse backtest, no tolerance
        ((0.412, 0.95), (0.398, 0.95), {}, True),  # equal backtest passes (>=)
        ((0.412, 0.90), (0.398, 0.95), {"backtest_tolerance": 0.1}, True),
        ((0.412, 0.80), (0.398, 0.95), {"backtest_tolerance": 0.1}, False),
        ((0.405, 1.20), (0.398, 0.95), {"min_improvement": 0.01}, False),  # better, not by enough
        ((0.409, 1.20), (0.398, 0.95), {"min_improvement": 0.01}, True),
        ((NAN, 1.20), (0.398, 0.95), {}, False),  # NaN never wins
        ((0.412, NAN), (0.398, 0.95), {"backtest_tolerance": 10.0}, False),  # NaN backtest loses
        ((0.412, 1.20), (NAN, 0.95), {}, True),  # a NaN champion is beaten
        ((0.412, 0.10), (0.398, NAN), {}, True),  # champion's NaN backtest loses
        ((NAN, NAN), (NAN, NAN), {}, False),
    ],
)
def test_rule_against_champion(challenger, champion, config, promote) -> None:
    decision = _decide(Scores(*challenger), Scores(*champion), **config)
    assert decision.promote is promote, decision.reason
    assert "challenger val_pr_auc" in decision.reason and "sharpe" in decision.reason
    assert decision.details["challenger"] is challenger[0] and decision.details["champion"] is champion[0]


@pytest.mark.parametrize(
    ("challenger", "champion", "config", "promote"),
    [
        ((0.40, 0.5), (0.42, 0.5), {}, True),  # lower loss is better
        ((0.44, 0.5), (0.42, 0.5), {}, False),
        ((0.42, 0.5), (0.42, 0.5), {}, False),
        ((0.415, 0.5), (0.42, 0.5), {"min_improvement": 0.01}, False),
        ((0.405, 0.5), (0.42, 0.5), {"min_improvement": 0.01}, True),
        ((0.40, 0.4), (0.42, 0.5), {}, False),
    ],
)
def test_rule_minimize(challenger, champion, config, promote) -> None:
    decision = _decide(Scores(*challenger), Scores(*champion), "minimize", **config)
    assert decision.promote is promote, decision.reason
    assert "val_loss" in decision.reason and "<" in decision.reason


def test_reason_names_metric_and_both_values() -> None:
    decision = _decide(Scores(0.412, 1.20), Scores(0.398, 0.95))
    assert decision.reason == "challenger val_pr_auc 0.412 > champion 0.398 + 0.000 and sharpe 1.20 >= 0.95 - 0.00"
    rejected = _decide(Scores(0.412, 0.90), Scores(0.398, 0.95))
    assert rejected.reason.endswith("but sharpe 0.90 < 0.95 - 0.00")
    close = _decide(Scores(0.39812, 1.0), Scores(0.39784, 1.0))  # more decimals when 3 would look equal
    assert "0.3981 > champion 0.3978 +" in close.reason


@pytest.mark.parametrize(
    ("metric", "baselines", "direction", "promote"),
    [
        (0.40, BASELINES, "maximize", True),
        (0.35, BASELINES, "maximize", False),  # ties the best baseline: not strictly better
        (0.32, BASELINES, "maximize", False),  # beats one baseline only
        (NAN, BASELINES, "maximize", False),
        (0.40, {}, "maximize", False),  # nothing to beat: no judgement
        (0.40, {"majority": NAN, "near_level_now": 0.35}, "maximize", True),
        (0.20, {"majority": 0.30, "near_level_now": 0.25}, "minimize", True),
        (0.27, {"majority": 0.30, "near_level_now": 0.25}, "minimize", False),
    ],
)
def test_first_model_against_baselines(metric, baselines, direction, promote) -> None:
    decision = _decide(Scores(metric, 1.0, baselines), None, direction)
    assert decision.promote is promote, decision.reason
    assert decision.details["champion"] is None
    for name in baselines:
        assert f"baseline.{name}" in decision.details


def test_first_model_reason_names_the_best_baseline() -> None:
    decision = _decide(Scores(0.40, 1.0, BASELINES), None)
    assert decision.reason == "challenger val_pr_auc 0.400 > every baseline (best: near_level_now 0.350); no champion yet"
    rejected = _decide(Scores(0.32, 1.0, BASELINES), None)
    assert "not > baseline near_level_now 0.350" in rejected.reason


def test_decision_tags() -> None:
    decision = _decide(Scores(0.412, 1.20), Scores(0.398, 0.95))
    tags = decision_tags(decision, "3", "2", "2026-01-01T00:00:00+00:00")
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.challenger"] == "3" and tags["promotion.champion"] == "2"
    assert tags["promotion.reason"] == decision.reason
    assert tags["promotion.decided_at"] == "2026-01-01T00:00:00+00:00"
    assert float(tags["promotion.metric.challenger"]) == 0.412
    assert tags["promotion.metric.metric"] == "val_pr_auc"
    assert all(isinstance(v, str) for v in tags.values())

    rejected = _decide(Scores(0.3, 1.0), Scores(0.398, 0.95))
    assert decision_tags(rejected, "3", "2", "t")["promotion.decision"] == "rejected"
    first = _decide(Scores(0.40, 1.0, BASELINES), None)
    first_tags = decision_tags(first, "1", None, "t")
    assert first_tags["promotion.decision"] == "promoted" and first_tags["promotion.champion"] == "none"
    assert first_tags["promotion.metric.baseline.majority"] == "0.3"
    assert decision_tags(rejected, "2", "2", "t")["promotion.decision"] == "kept"


def test_bad_direction_is_rejected() -> None:
    with pytest.raises(ValueError, match="direction"):
        decide(Scores(0.4, 1.0), None, PromotionConfig(), "val_pr_auc", "up")  # type: ignore[arg-type]
