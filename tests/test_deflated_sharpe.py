"""The deflated Sharpe ratio (Bailey & López de Prado 2014) against the paper's worked example, and the gate
condition it feeds: the best of many noise strategies is refused, a genuinely good strategy passes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from pricelevel.backtest.deflated import (
    deflate_returns,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    probabilistic_sharpe_ratio,
)
from pricelevel.ml.deflation import METRIC, configurations_tried
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.gate import deflated_sharpe_of
from pricelevel.registry.promotion import Scores, decide

BARS, CONFIGURATIONS = 1000, 200
HURDLE = {"cash": 0.0, "level_rule": -0.5, "volatility": -0.5}
BASELINES = {"majority": 0.30}


def test_the_papers_worked_example() -> None:
    """Section "A numerical example": 100 trials, annualised Sharpe variance 1/2, best annualised Sharpe 2.5 over
    five years of daily returns (1250), skewness -3, kurtosis 10: SR0 = 0.1132 a day and DSR = 0.9004."""
    sharpe, variance = 2.5 / math.sqrt(250), 0.5 / 250
    assert expected_max_sharpe(100, variance) == pytest.approx(0.1132, abs=5e-5)
    assert deflated_sharpe_ratio(sharpe, 1250, 100, variance, skew=-3, kurtosis=10) == pytest.approx(0.9004, abs=5e-5)


def test_psr_and_its_limits() -> None:
    assert probabilistic_sharpe_ratio(0.1, 0.1, 500) == pytest.approx(0.5)
    assert probabilistic_sharpe_ratio(0.1, 0.0, 500) > probabilistic_sharpe_ratio(0.1, 0.0, 50)  # longer record
    assert probabilistic_sharpe_ratio(0.1, 0.0, 500, skew=-3, kurtosis=10) < probabilistic_sharpe_ratio(0.1, 0.0, 500)
    assert expected_max_sharpe(1, 0.01) == 0.0 and expected_max_sharpe(1000, 0.01) > expected_max_sharpe(10, 0.01)
    assert math.isnan(deflated_sharpe_ratio(0.1, 1, 10))
    assert math.isnan(deflate_returns(np.zeros(50), 10).probability)  # never traded: no Sharpe, nothing to deflate
    assert configurations_tried(3, 4) == 12 and configurations_tried(0, 4) == 4


def test_moments_and_sharpe_from_returns() -> None:
    rng = np.random.default_rng(1)
    returns = rng.standard_t(4, BARS) * 0.01 + 0.001
    deflated = deflate_returns(returns, 1)
    assert deflated.sharpe == pytest.approx(returns.mean() / returns.std(ddof=1))
    assert deflated.kurtosis > 3.5 and deflated.n_obs == BARS and deflated.benchmark == 0.0
    assert deflated.probability == pytest.approx(
        probabilistic_sharpe_ratio(deflated.sharpe, 0.0, BARS, deflated.skew, deflated.kurtosis))


def _best_of_noise(seed: int) -> np.ndarray:
    """The returns of the best (by Sharpe) of ``CONFIGURATIONS`` strategies with no skill at all."""
    returns = np.random.default_rng(seed).normal(0.0, 0.01, (CONFIGURATIONS, BARS))
    sharpes = returns.mean(axis=1) / returns.std(axis=1, ddof=1)
    return returns[int(np.argmax(sharpes))]


def _gate(deflated: float, sharpe: float):
    return decide(Scores(0.40, sharpe, BASELINES), None, PromotionConfig(), "val_pr_auc", "maximize", "sharpe", HURDLE,
                  deflated)


def test_the_best_of_many_noise_strategies_is_refused_and_a_good_one_passes() -> None:
    noise = _best_of_noise(0)
    chosen = deflate_returns(noise, CONFIGURATIONS)
    naive = deflate_returns(noise, 1)
    assert naive.probability > 0.95  # undeflated, the lucky pick looks like skill...
    assert chosen.probability < PromotionConfig().min_deflated_sharpe  # ...deflated by 200 tries, it does not
    refused = _gate(chosen.probability, chosen.sharpe * math.sqrt(2190))
    assert not refused.promote and "deflated Sharpe" in refused.reason and f"{chosen.probability:.3f}" in refused.reason
    assert refused.details["deflated_sharpe"] == chosen.probability
    assert _gate(naive.probability, chosen.sharpe * math.sqrt(2190)).promote  # the same numbers pass without it

    # A strategy with a real edge (true per-bar Sharpe 0.2), chosen among the same number of configurations.
    good = np.random.default_rng(1).normal(0.002, 0.01, BARS)
    deflated = deflate_returns(good, CONFIGURATIONS)
    assert deflated.probability > PromotionConfig().min_deflated_sharpe
    passed = _gate(deflated.probability, deflated.sharpe * math.sqrt(2190))
    assert passed.promote, passed.reason


def test_the_condition_refuses_lucky_picks_at_about_its_false_positive_rate() -> None:
    """Over 40 searches of pure noise the naive test passes nearly all; the deflated one about 1 in 10 at 0.9."""
    naive = [deflate_returns(_best_of_noise(seed), 1).probability for seed in range(40)]
    deflated = [deflate_returns(_best_of_noise(seed), CONFIGURATIONS).probability for seed in range(40)]
    assert np.mean(np.array(naive) >= 0.9) >= 0.95
    assert np.mean(np.array(deflated) >= 0.9) <= 0.2


def test_an_unmeasured_deflated_sharpe_fails_and_zero_turns_the_condition_off() -> None:
    unmeasured = _gate(math.nan, 1.5)
    assert not unmeasured.promote and "was not measured" in unmeasured.reason
    off = decide(Scores(0.40, 1.5, BASELINES), None, PromotionConfig(min_deflated_sharpe=0), "val_pr_auc", "maximize",
                 "sharpe", HURDLE, None)
    assert off.promote and "deflated_sharpe" not in off.details
    # The hurdle is judged first: a strategy that does not beat cash is told so, whatever its deflated Sharpe.
    assert "does not beat cash" in _gate(0.99, -0.2).reason


class _Registry:
    """The two MLflow calls the gate makes: a version's run, and that run's metrics."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def get_model_version(self, name: str, version: str):
        return SimpleNamespace(run_id="run-1")

    def get_run(self, run_id: str):
        return SimpleNamespace(data=SimpleNamespace(metrics=self.metrics))


def test_the_gate_reads_the_challengers_training_run() -> None:
    assert deflated_sharpe_of(_Registry({METRIC: 0.93, "val_pr_auc": 0.4}), "pricelevel", "3") == 0.93
    assert math.isnan(deflated_sharpe_of(_Registry({"val_pr_auc": 0.4}), "pricelevel", "3"))  # trained before
