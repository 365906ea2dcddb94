"""Walk-forward evaluation of a model and its strategy: for every expanding-window fold, train on the fold's
past, choose the decision rules on its validation segment, and keep its test segment for the report. The
Optuna objective and the final training both go through :func:`fit_fold`, so the number a trial is ranked by
is the number the report shows for the same fold and segment. Every fold trades under ``strategy.costs``,
account protections included (``costs.protections``: the trader's max positions, drawdown halt, daily loss
limit and cool-down, simulated by :mod:`pricelevel.backtest.protections`), so a fold's score is that of the
strategy the trader runs.

The rule grid's ``move`` / ``down`` / ``horizon`` are the label's own exits (:func:`label_exits`): for a
``triple_barrier`` label, take-profit = u, stop-loss = d and time stop = horizon, the trade the label describes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.backtest.baselines import VOLATILITY_KEY, choose_level_rule, choose_volatility_rules
from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.market import Market, market_from_candles
from pricelevel.backtest.selection import (
    Selection,
    StrategyContext,
    ValidationFold,
    aggregate,
    choose_pooled_rules,
    choose_rules,
)
from pricelevel.backtest.trading import probability_matrix
from pricelevel.core.cache import DerivedStore, code_fingerprint, step_key
from pricelevel.core.runlog import RunLog
from pricelevel.features.config import LabelsConfig
from pricelevel.features.labels import barrier_fractions
from pricelevel.ml.artifacts import FoldModel, TrainedModel, build_spec, input_example, predictions
from pricelevel.ml.config import ModelConfig, TuningConfig
from pricelevel.ml.dataset import DatasetPlan, SymbolTable, TrainingData
from pricelevel.ml.fit import TrainResult, train, with_params
from pricelevel.ml.seeds import log_spread, save_spread, seed_spread
from pricelevel.strategy.rules import StrategyRules


def segment_market(
    tables: Mapping[str, SymbolTable], start: pd.Timestamp, end: pd.Timestamp | None, costs: BacktestConfig
) -> Market:
    """Every symbol's candles of one segment, on one clock."""
    candles = pd.concat([t.candles.assign(symbol=s) for s, t in sorted(tables.items())], ignore_index=True)
    keep = candles["timestamp"] >= start
    if end is not None:
        keep &= candles["timestamp"] <= end
    return market_from_candles(candles[keep], timeframe=costs.timeframe)


def label_exits(
    strategy: StrategyContext, labels: LabelsConfig, tables: Mapping[str, SymbolTable], start: pd.Timestamp,
    end: pd.Timestamp | None,
) -> StrategyContext:
    """``strategy`` with the label's own take-profit (``move``) and stop-loss (``down``) for the rule grid.

    ``triple_barrier`` with fraction barriers: u and d. With ATR barriers the engine's stops are fractions fixed
    in the model's rules, so they are the median of the barriers (as fractions of the entry price) over the
    segment's bars from ``start`` to ``end`` (the validation segment: chosen on validation like every rule).
    Other labels keep ``strategy.move`` (``move_frac``) and have no lower barrier.
    """
    if labels.kind != "triple_barrier":
        return strategy
    if labels.barrier_unit == "fraction":
        return replace(strategy, move=labels.up_barrier, down=labels.down_barrier)
    ups, downs = [], []
    for table in tables.values():
        stamps = pd.DatetimeIndex(table.candles["timestamp"])
        keep = (stamps >= start) & ((stamps <= end) if end is not None else True)
        up, down = barrier_fractions(table.candles, labels)
        ups.append(up[keep])
        downs.append(down[keep])
    up, down = np.concatenate(ups), np.concatenate(downs)
    if not np.isfinite(up).any():
        raise ValueError(f"no ATR barrier defined between {start} and {end}: too few bars for ATR({labels.atr_window})")
    return replace(strategy, move=float(np.nanmedian(up)), down=min(float(np.nanmedian(down)), 0.99))


@dataclass(frozen=True)
class FoldFit:
    """One fold trained and its rules chosen on its validation segment (``validation``: that segment as the
    pooled rule search of :func:`train_step` takes it)."""

    fold: int
    data: TrainingData
    result: TrainResult
    scored: dict[str, pd.DataFrame]
    rules: Selection[StrategyRules]
    validation: ValidationFold

    @property
    def value(self) -> float:
        """The fold's validation strategy metric at the chosen rules (what tuning ranks)."""
        return self.rules.value()


def fit_fold(
    plan: DatasetPlan,
    tables: Mapping[str, SymbolTable],
    fold: int,
    seq_len: int,
    model: ModelConfig,
    tuning: TuningConfig,
    max_epochs: int,
    checkpoint_dir: Path,
    strategy: StrategyContext,
    extra_callbacks: tuple = (),
    epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> FoldFit:
    """Train on fold ``fold``'s past (early-stopped on ``tuning.metric``), predict its validation and test
    windows, and choose the strategy's rules on validation only."""
    data = plan.training_data(seq_len, tables, fold)
    result = train(data, model, tuning, max_epochs, checkpoint_dir, extra_callbacks, epoch_callback)
    scored = {"val": predictions(result.module, data.val, tables), "test": predictions(result.module, data.test, tables)}
    market = segment_market(tables, data.bounds.val_start, data.bounds.val_end, strategy.costs)
    probability = probability_matrix(market, scored["val"])
    exits = label_exits(strategy, plan.spec.labels, tables, data.bounds.val_start, data.bounds.val_end)
    rules = choose_rules(market, probability, strategy.costs, strategy.selection, strategy.base, exits.move,
                         exits.horizon, exits.down)
    validation = ValidationFold(fold, market, probability, exits.move, exits.horizon, exits.down)
    return FoldFit(fold, data, result, scored, rules, validation)


def folds_value(fits: Sequence[FoldFit], how: str) -> float:
    """The folds' validation strategy metrics as the one number a trial is ranked by."""
    return aggregate([fit.value for fit in fits], how)  # type: ignore[arg-type]


def model_key(tune_key: str, strategy: StrategyContext) -> str:
    """Names the final models: the study they take their parameters from (which names their inputs), the rule
    search and costs, and this code."""
    return step_key(
        "model", tune=tune_key, costs=strategy.costs.model_dump(mode="json"),
        selection=strategy.selection.model_dump(mode="json"), base=strategy.base.model_dump(mode="json"),
        code=code_fingerprint(train_step),
    )


def train_step(
    plan: DatasetPlan,
    model: ModelConfig,
    tuning: TuningConfig,
    best_params: Mapping[str, Any],
    key: str,
    strategy: StrategyContext,
    derived: DerivedStore,
    run: RunLog | None,
) -> TrainedModel:
    """Train every fold's final model with the study's best parameters for ``model.max_epochs``, choose its
    rules on the pooled validation segments of it and the folds before it (the newest fold's, pooled over all
    folds, are the registered model's; :func:`pricelevel.backtest.selection.choose_pooled_rules`) and the level
    rule's parameters on its own validation segment, measure the seed spread when ``model.seeds > 1``
    (:mod:`pricelevel.ml.seeds`), and keep it all (reused when these inputs were trained before). The newest
    fold's per-epoch metrics and the seed spread go to ``run``."""
    params = dict(best_params)
    seq_len = int(params.get("seq_len", plan.dataset.seq_len))
    folds = len(plan.folds)

    def write(out: Path) -> None:
        tables = plan.load()
        history = {symbol: table.history for symbol, table in tables.items()}
        candles = {symbol: table.candles for symbol, table in tables.items()}
        fits: list[FoldFit] = []
        for k in range(folds):
            newest = k == folds - 1
            fit = fit_fold(
                plan, tables, k, seq_len, with_params(model, params), tuning, model.max_epochs, out / f"fold-{k}" / "checkpoints",
                strategy, epoch_callback=(lambda e, m: run.log_metrics(m, step=e)) if (run and newest) else None,
            )
            fits.append(fit)
            # Fold k's rules: pooled over the validation segments of folds 0..k (never a later fold's, which
            # overlaps fold k's test); the newest fold's, pooled over all folds, are the registered model's.
            pooled = choose_pooled_rules([f.validation for f in fits], strategy.costs, strategy.selection, strategy.base)
            market = segment_market(tables, fit.data.bounds.val_start, fit.data.bounds.val_end, strategy.costs)
            level = choose_level_rule(market, candles, history, strategy.costs, strategy.selection, strategy.base,
                                      strategy.horizon)
            volatility = choose_volatility_rules(market, candles, label_exits(
                strategy, plan.spec.labels, tables, fit.data.bounds.val_start, fit.data.bounds.val_end))
            spec = build_spec(plan, fit.data, fit.result.module.hparams, pooled.rules.model_dump(),
                              {"fold": k, "level_rule": level.chosen.model_dump(), "validation_score": pooled.selection.score.to_dict(),
                               "rule_recipe": pooled.selection.chosen.model_dump(), "pooled_folds": list(pooled.folds),
                               VOLATILITY_KEY: volatility.chosen.model_dump()})
            summary = {
                "best_score": fit.result.best_score, "best_epoch": fit.result.best_epoch, "epochs_run": fit.result.epochs_run,
                "history": fit.result.history, "train_samples_per_second": fit.result.train_samples_per_second,
                "device": fit.result.device, "metric": tuning.metric, "params": params,
            }
            FoldModel(out / f"fold-{k}").save(
                fit.result.module, spec, summary, fit.scored,
                {"model": pooled.to_dict(), "model_own_fold": fit.rules.to_dict(), "level_rule": level.to_dict(),
                 "volatility": volatility.to_dict()},
                input_example(fit.data),
            )
        if model.seeds > 1:  # the spread of the registered rules' pooled validation score over seeds
            save_spread(out, seed_spread([(f.data, f.validation) for f in fits], pooled.selection.chosen,
                                         pooled.selection.score.metric(strategy.selection.metric), with_params(model, params),
                                         tuning, model.max_epochs, out / "seeds", strategy))

    out, built = derived.build("models", key, write)
    trained = TrainedModel(key, out, built, folds)
    log_spread(out, run)
    if not built and run is not None:  # a new run over models trained before (e.g. only report settings changed)
        for entry in trained.newest.result["history"]:
            run.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"]))
    return trained

