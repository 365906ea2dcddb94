"""The LightGBM baseline in the promotion gate (pure: metrics in, decision out, no MLflow).

The LightGBM model is not registered and cannot be scored on the promotion window, so the gate compares the
two models where both were judged on the same bars: the challenger's training run, mean over its walk-forward
test folds (``wf_mean_model_<metric>`` against ``gbm_wf_mean_<metric>``, :mod:`pricelevel.ml.gbm`). It is always
reported (the decision's details, tags and Markdown); it blocks promotion only when ``gbm`` is listed in
``promotion.hurdle`` (not by default): then the challenger's strategy metric must strictly beat LightGBM's,
and a run that did not measure it (trained before the baseline existed) fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pricelevel.registry.promotion import Decision

#: The hurdle entry that names the LightGBM baseline (judged on the training run, not on the window).
GBM = "gbm"


def window_hurdle(names: tuple[str, ...]) -> tuple[str, ...]:
    """The hurdle entries judged on the promotion window: all but :data:`GBM`."""
    return tuple(name for name in names if name != GBM)


def gbm_numbers(metrics: Mapping[str, float], trading_metric: str) -> dict[str, float]:
    """The challenger's and LightGBM's walk-forward test means (strategy metric, PR-AUC, direction AUC) from the
    challenger's training run; NaN where the run did not log them."""
    names = (trading_metric, "pr_auc", "direction_auc")
    logged = {**{f"lstm.{n}": f"wf_mean_model_{n}" for n in names}, **{f"gbm.{n}": f"gbm_wf_mean_{n}" for n in names}}
    return {f"gbm.{key}": float(metrics.get(name, math.nan)) for key, name in logged.items()}


def versus_gbm(decision: Decision, hurdle: tuple[str, ...], metrics: Mapping[str, float], trading_metric: str) -> Decision:
    """``decision`` with the LightGBM comparison in its details; refused when :data:`GBM` is in ``hurdle`` and the
    challenger's walk-forward strategy metric does not strictly beat LightGBM's (or either was not measured)."""
    numbers = gbm_numbers(metrics, trading_metric)
    details = {**decision.details, **numbers, "gbm.in_hurdle": str(GBM in hurdle)}
    lstm, gbm = numbers[f"gbm.lstm.{trading_metric}"], numbers[f"gbm.gbm.{trading_metric}"]
    if not decision.promote or GBM not in hurdle:
        return Decision(decision.promote, decision.reason, details)
    if math.isnan(lstm) or math.isnan(gbm):
        return Decision(False, f"the challenger's training run did not measure the LightGBM baseline ({GBM} is in "
                               "promotion.hurdle): retrain it; it stays @challenger", details)
    if not lstm > gbm:
        return Decision(False, f"challenger {trading_metric} {lstm:.2f} does not beat LightGBM {gbm:.2f} (walk-forward "
                               f"test mean of its training run; {GBM} is in promotion.hurdle); it stays @challenger", details)
    return Decision(True, f"{decision.reason}; walk-forward {trading_metric} {lstm:.2f} beats LightGBM {gbm:.2f}", details)


def gbm_markdown(details: Mapping[str, object], trading_metric: str) -> list[str]:
    """The promotion table's LightGBM lines (empty when the decision carries no comparison)."""
    if f"gbm.gbm.{trading_metric}" not in details:
        return []

    def num(key: str) -> str:
        value = details.get(key)
        return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "-"

    blocking = "yes: it must be beaten" if details.get("gbm.in_hurdle") == "True" else "no, reported only"
    return ["", "Model baseline, from the challenger's training run (mean over its walk-forward test folds; "
                f"`{GBM}` in promotion.hurdle: {blocking}):", "",
            f"| model | {trading_metric} | PR-AUC | direction AUC |", "|---|---|---|---|",
            f"| LSTM (challenger) | {num(f'gbm.lstm.{trading_metric}')} | {num('gbm.lstm.pr_auc')} | "
            f"{num('gbm.lstm.direction_auc')} |",
            f"| LightGBM | {num(f'gbm.gbm.{trading_metric}')} | {num('gbm.gbm.pr_auc')} | {num('gbm.gbm.direction_auc')} |"]
