"""Configuration of the strategy stage: how a model's decision rules (and the level rule's parameters) are
chosen on validation, and the one trading metric that ranks strategies everywhere."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pricelevel.core.config import Frozen

#: A stop given as the label's own move or horizon, resolved per model.
LabelMove = Literal["move"]
LabelHorizon = Literal["horizon"]
#: A stop-loss given as the label's lower barrier (``triple_barrier``'s d; none for labels without one).
LabelDown = Literal["down"]


class LevelRuleGrid(Frozen):
    """The no-model level rule's parameters searched on validation (docs/concepts/walk-forward.md "Strategy baselines")."""

    #: Enter when the close is at most this many ATR(14) above a support level in force.
    proximity_atr: tuple[float, ...] = (0.25, 0.5, 1.0)
    #: Stop-loss this many ATR below the support.
    stop_atr: tuple[float, ...] = (0.25, 0.5)
    #: Time-stop candidates; ``horizon`` = ``labels.horizon``, ``null`` = none.
    max_hold_bars: tuple[int | LabelHorizon | None, ...] = ("horizon", None)


class SelectionConfig(Frozen):
    """How a model's decision rules (and the level rule's) are chosen on validation, and which trading metric
    ranks strategies everywhere: the rule search, the tuning objective and the promotion gate."""

    metric: Literal["sharpe", "sortino", "calmar", "total_return"] = "sharpe"
    #: How walk-forward folds combine into the one number the tuner maximises: their mean or their worst. (The
    #: registered model's rules are chosen on the folds' validation segments pooled: docs/concepts/walk-forward.md "Choosing the rules".)
    aggregate: Literal["mean", "worst"] = "mean"
    #: A candidate with fewer validation trades than this, in any one fold of the pooled search, cannot be chosen.
    min_trades: int = Field(10, ge=1)
    #: Share of the validation bars that may enter (the threshold is that quantile of each fold's own validation
    #: probabilities). The rarest entries (1 %, 2 %) pay the fees least often (docs/figures.md "What was tried").
    entry_quantiles: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
    #: Exit when the probability falls below this quantile of the validation probabilities (null: no such exit).
    exit_quantiles: tuple[float | None, ...] = (None,)
    #: The exits searched; the default is the label's own question (+move within horizon bars, before -down for a
    #: triple barrier), which did best out of sample (docs/figures.md "What was tried": stop-loss candidates won on
    #: validation and lost on test). ``down`` is the triple barrier's lower barrier, and no stop for other labels.
    sl_stop: tuple[float | LabelDown | None, ...] = ("down",)
    tp_stop: tuple[float | LabelMove | None, ...] = ("move",)
    max_hold_bars: tuple[int | LabelHorizon | None, ...] = ("horizon",)
    level_rule: LevelRuleGrid = LevelRuleGrid()

    @field_validator("entry_quantiles")
    @classmethod
    def _shares(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < q < 1 for q in value):
            raise ValueError(f"entry_quantiles must be shares of bars in (0, 1), at least one; got {list(value)}")
        return value
