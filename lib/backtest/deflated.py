"""The deflated Sharpe ratio (Bailey & López de Prado, "The Deflated Sharpe Ratio: Correcting for Selection
Bias, Backtest Overfitting and Non-Normality", Journal of Portfolio Management 40(5), 2014).

A strategy chosen as the best of ``N`` configurations has a high Sharpe ratio partly by luck: even if none of
them had any skill, the best of ``N`` would show about ``sqrt(V) * E[max of N standard normals]``. The deflated
Sharpe ratio is the probability that the chosen strategy's true Sharpe exceeds zero once that luck is priced in:
the probabilistic Sharpe ratio (PSR, which also corrects for a short, skewed or fat-tailed record) against the
expected maximum Sharpe of ``N`` tries as the benchmark. Pure functions on per-bar returns; no annualisation
inside (every Sharpe here is per bar, as in the paper's formulas).

skfolio's ``deflated_sharpe_ratio`` would do; it is not a dependency of this project, so the published formula is
implemented here and tested against the paper's worked example (DSR 0.9004).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

#: The Euler-Mascheroni constant of the expected-maximum approximation.
EULER_GAMMA = 0.5772156649015329
_NORMAL = NormalDist()


def expected_max_sharpe(n_trials: int, sr_variance: float) -> float:
    """``SR0``: the expected maximum Sharpe ratio of ``n_trials`` independent strategies without skill whose
    Sharpe estimates have variance ``sr_variance`` (paper, eq. 2 via the false strategy theorem)."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if n_trials == 1:
        return 0.0  # one try: nothing to deflate
    z = (1.0 - EULER_GAMMA) * _NORMAL.inv_cdf(1.0 - 1.0 / n_trials) + EULER_GAMMA * _NORMAL.inv_cdf(
        1.0 - 1.0 / (n_trials * math.e))
    return math.sqrt(sr_variance) * z


def probabilistic_sharpe_ratio(sharpe: float, benchmark: float, n_obs: int, skew: float = 0.0, kurtosis: float = 3.0) -> float:
    """PSR: the probability that the true per-bar Sharpe exceeds ``benchmark``, given ``sharpe`` measured on
    ``n_obs`` returns with that skewness and (non-excess) kurtosis. NaN when it cannot be computed."""
    if n_obs < 2 or not all(math.isfinite(v) for v in (sharpe, benchmark, skew, kurtosis)):
        return math.nan
    spread = 1.0 - skew * sharpe + (kurtosis - 1.0) / 4.0 * sharpe**2
    if spread <= 0:
        return math.nan
    return _NORMAL.cdf((sharpe - benchmark) * math.sqrt(n_obs - 1) / math.sqrt(spread))


def null_sharpe_variance(n_obs: int) -> float:
    """The variance of a Sharpe estimate over ``n_obs`` returns when the true Sharpe is zero: what the
    configurations' Sharpes scatter by if none of them has skill (the hypothesis the ratio tests)."""
    return 1.0 / (n_obs - 1)


def deflated_sharpe_ratio(
    sharpe: float, n_obs: int, n_trials: int, sr_variance: float | None = None, skew: float = 0.0,
    kurtosis: float = 3.0,
) -> float:
    """DSR: PSR against the expected maximum Sharpe of ``n_trials`` tries (paper, eq. 2). ``sr_variance``: the
    variance of the Sharpe estimates across the tries; ``None``: :func:`null_sharpe_variance`."""
    if n_obs < 2:
        return math.nan
    variance = null_sharpe_variance(n_obs) if sr_variance is None else sr_variance
    return probabilistic_sharpe_ratio(sharpe, expected_max_sharpe(n_trials, variance), n_obs, skew, kurtosis)


@dataclass(frozen=True)
class DeflatedSharpe:
    """The deflated Sharpe ratio of one chosen strategy, and the numbers that make it."""

    #: The probability that the chosen strategy's true Sharpe beats zero after ``n_trials`` tries.
    probability: float
    #: Per-bar Sharpe of the chosen strategy, and the per-bar Sharpe luck alone gives the best of ``n_trials``.
    sharpe: float
    benchmark: float
    n_trials: int
    n_obs: int
    skew: float
    kurtosis: float
    sr_variance: float

    def annualised(self, bars_per_year: float) -> tuple[float, float]:
        """``(sharpe, benchmark)`` on the yearly scale the reports use."""
        scale = math.sqrt(bars_per_year)
        return self.sharpe * scale, self.benchmark * scale

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def deflate_returns(returns: np.ndarray, n_trials: int, sr_variance: float | None = None) -> DeflatedSharpe:
    """The :class:`DeflatedSharpe` of a strategy with these per-bar returns, chosen as the best of ``n_trials``
    configurations (moments from the returns; Sharpe with ``ddof=1`` as :func:`~pricelevel.backtest.metrics.curve_metrics`)."""
    r = np.asarray(returns, dtype=np.float64)
    r = r[np.isfinite(r)]
    n = int(r.size)
    std = float(r.std(ddof=1)) if n >= 2 else math.nan
    if not (n >= 2 and std > 0):
        return DeflatedSharpe(math.nan, math.nan, math.nan, n_trials, n, math.nan, math.nan, math.nan)
    sharpe = float(r.mean()) / std
    centred = r - r.mean()
    m2 = float(np.mean(centred**2))
    skew, kurtosis = float(np.mean(centred**3)) / m2**1.5, float(np.mean(centred**4)) / m2**2
    variance = null_sharpe_variance(n) if sr_variance is None else sr_variance
    benchmark = expected_max_sharpe(n_trials, variance)
    return DeflatedSharpe(probabilistic_sharpe_ratio(sharpe, benchmark, n, skew, kurtosis), sharpe, benchmark, n_trials,
                          n, skew, kurtosis, variance)
