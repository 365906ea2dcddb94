"""How much of a training run's chosen strategy is luck: its deflated Sharpe ratio
(:mod:`pricelevel.backtest.deflated`) after every strategy configuration the run tried.

A run tries ``trials x rule candidates`` configurations: each completed Optuna trial is a model whose rules
are chosen among the rule grid's candidates on validation (a pruned trial stopped before its rules were
searched). The registered model (the newest fold's) trades its chosen rules on the validation segment they
were chosen on; the deflated Sharpe ratio of those returns against the best of that many tries is the
probability that its Sharpe beats zero for a reason other than the search. The count treats the
configurations as independent; they are not (nested thresholds, similar models), so the figure errs on the
strict side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.backtest.deflated import DeflatedSharpe, deflate_returns
from pricelevel.backtest.selection import StrategyContext
from pricelevel.backtest.trading import probability_matrix, score_result, trade_probabilities
from pricelevel.ml.artifacts import FoldModel, TrainedModel
from pricelevel.ml.dataset import DatasetPlan, SymbolTable
from pricelevel.ml.walkforward import segment_market

#: MLflow metric names (the gate reads :data:`METRIC`).
METRIC = "deflated_sharpe"


def configurations_tried(trials_complete: int, rule_candidates: int) -> int:
    """Strategy configurations a run tried: every completed trial's model with every rule candidate."""
    return max(1, int(trials_complete)) * max(1, int(rule_candidates))


def validation_returns(
    fold: FoldModel, tables: Mapping[str, SymbolTable], strategy: StrategyContext,
) -> tuple[np.ndarray, float, float]:
    """Per-bar portfolio returns of the fold's chosen rules on the validation segment they were chosen on (the
    trade the rule search scored), their annualised Sharpe (the number the search ranked by) and bars a year."""
    spec = fold.spec
    market = segment_market(tables, pd.Timestamp(spec.extra["val_start"]), pd.Timestamp(spec.extra["val_end"]),
                            strategy.costs)
    result = trade_probabilities(market, probability_matrix(market, fold.predictions("val")), strategy.costs,
                                 spec.strategy_rules())
    equity = np.concatenate([[result.config.init_cash], result.equity.to_numpy(dtype=np.float64)])
    bars_per_year = (result.config.timeframe or market.timeframe).bars_per_year
    return np.diff(equity) / equity[:-1], score_result(result).sharpe, bars_per_year


def run_deflated_sharpe(
    plan: DatasetPlan, trained: TrainedModel, trials_complete: int, strategy: StrategyContext,
) -> tuple[DeflatedSharpe, dict[str, Any]]:
    """The registered model's deflated Sharpe ratio and the MLflow metrics that report it."""
    newest = trained.newest
    candidates = len(newest.selection["model"]["candidates"])
    tried = configurations_tried(trials_complete, candidates)
    returns, sharpe, bars_per_year = validation_returns(newest, plan.load(), strategy)
    deflated = deflate_returns(returns, tried)
    _, benchmark = deflated.annualised(bars_per_year)
    metrics = {
        METRIC: deflated.probability, f"{METRIC}.configurations": float(tried), f"{METRIC}.trials": float(trials_complete),
        f"{METRIC}.rule_candidates": float(candidates), f"{METRIC}.validation_sharpe": sharpe,
        f"{METRIC}.luck_sharpe": benchmark, f"{METRIC}.bars": float(deflated.n_obs),
    }
    return deflated, metrics


def describe(metrics: Mapping[str, float]) -> str:
    """One log line."""
    return (f"deflated Sharpe {metrics[METRIC]:.3f}: validation Sharpe {metrics[f'{METRIC}.validation_sharpe']:.2f} "
            f"vs {metrics[f'{METRIC}.luck_sharpe']:.2f} expected from luck alone as the best of "
            f"{int(metrics[f'{METRIC}.configurations'])} configurations ({int(metrics[f'{METRIC}.trials'])} trials x "
            f"{int(metrics[f'{METRIC}.rule_candidates'])} rule candidates, {int(metrics[f'{METRIC}.bars'])} bars)")
