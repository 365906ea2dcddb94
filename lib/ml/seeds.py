"""How much of the chosen strategy is the seed: the registered rules' pooled validation score over
``model.seeds`` trainings of the same folds.

The same model trained with four seeds had the same PR-AUC and chose rules that made -35 % .. +28 % on unseen
months. So every final training also fits ``model.seeds - 1`` more seeds of every fold's model (same data,
parameters and epochs; seed ``model.seed + i``), trades the registered model's chosen rule recipe on each
seed's own validation probabilities (its thresholds at that seed's own quantiles: the recipe, not the
probability numbers, is what was chosen), pooled over the folds exactly as the rule search scored it, and
reports the spread. The models registered and traded are still the ``model.seed`` ones: the extra seeds
measure, they are not averaged (an ensemble would change the registered artefact and the live trader).
Validation segments only: test is never looked at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pricelevel.backtest.selection import RuleRecipe, StrategyContext, ValidationFold, score_recipe
from pricelevel.backtest.trading import probability_matrix
from pricelevel.core.files import write_json
from pricelevel.ml.config import ModelConfig, TuningConfig
from pricelevel.ml.fit import train
from pricelevel.ml.model import predict_proba

if TYPE_CHECKING:
    from pricelevel.core.runlog import RunLog
    from pricelevel.ml.dataset import TrainingData

#: File of the spread in a model folder, and the prefix of its MLflow metrics.
SEEDS_FILE, PREFIX = "seeds.json", "seeds"


def seed_spread(
    folds: Sequence[tuple[TrainingData, ValidationFold]],
    recipe: RuleRecipe,
    main_score: float,
    model: ModelConfig,
    tuning: TuningConfig,
    max_epochs: int,
    checkpoint_dir: Path,
    strategy: StrategyContext,
) -> dict[str, Any]:
    """``recipe``'s pooled validation ``selection.metric`` for ``model.seed`` (``main_score``, what the search
    measured) and each of the ``model.seeds - 1`` further seeds, every fold of ``folds`` retrained with it."""
    metric = strategy.selection.metric
    seeds, values, trades = [model.seed], [float(main_score)], [None]
    for i in range(1, model.seeds):
        seeded = model.model_copy(update={"seed": model.seed + i})
        pooled = []
        for data, validation in folds:
            fit = train(data, seeded, tuning, max_epochs, checkpoint_dir / f"seed-{seeded.seed}" / f"fold-{validation.fold}")
            rows = data.val.ends()  # symbol, timestamp of each validation window's last bar
            rows["probability"] = predict_proba(fit.module, data.val)
            probability = probability_matrix(validation.market, rows)
            pooled.append(replace(validation, probability=probability))
        scored = score_recipe(recipe, pooled, strategy.costs, strategy.base)
        seeds.append(seeded.seed)
        values.append(scored.score.metric(metric))
        trades.append(scored.score.n_trades)
    return spread_summary(metric, recipe, seeds, values, trades)


def spread_summary(metric: str, recipe: RuleRecipe, seeds: Sequence[int], values: Sequence[float],
                   trades: Sequence[int | None]) -> dict[str, Any]:
    """The per-seed values and their mean, standard deviation (ddof=1; NaN for one seed), min and max."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    return {
        "metric": metric, "recipe": recipe.model_dump(), "seeds": list(seeds), "values": [float(v) for v in array],
        "pooled_trades": list(trades), "count": len(array),
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
        "min": float(finite.min()) if finite.size else math.nan,
        "max": float(finite.max()) if finite.size else math.nan,
    }


def spread_metrics(spread: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics: ``seeds.count`` and ``seeds.validation_<metric>.{mean,std,min,max}`` (finite ones)."""
    name = f"{PREFIX}.validation_{spread['metric']}"
    out = {f"{PREFIX}.count": float(spread["count"])}
    out |= {f"{name}.{k}": float(spread[k]) for k in ("mean", "std", "min", "max") if math.isfinite(spread[k])}
    return out


def save_spread(folder: Path, spread: Mapping[str, Any]) -> None:
    write_json(folder / SEEDS_FILE, spread)


def log_spread(folder: Path, run: RunLog | None) -> dict[str, Any] | None:
    """Log a model folder's seed spread to ``run`` (also for a model trained before); ``None`` when absent."""
    path = folder / SEEDS_FILE
    if not path.exists():
        return None
    spread = json.loads(path.read_text())
    if run is not None:
        run.log_metrics(spread_metrics(spread))
        run.log_json(spread, SEEDS_FILE)
    return spread


def describe(spread: Mapping[str, Any]) -> str:
    """One log line."""
    values = ", ".join(f"{v:.2f}" for v in spread["values"])
    return (f"chosen rules' pooled validation {spread['metric']} over {spread['count']} seed(s): {values} "
            f"(mean {spread['mean']:.2f}, std {spread['std']:.2f})")
