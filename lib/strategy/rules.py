"""The decision rules that turn a model's probabilities into trades, frozen in the model that was chosen with
them: the backtest of a model, the promotion flow and the live trader all read them from its spec, so the same
model trades the same way whatever the current configuration says.

Costs and the account (fees, slippage, fill timing, cash, position limits) are the market's, not the model's:
they stay in ``backtest:``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pricelevel.core.config import Frozen
from pricelevel.strategy.signals import signals_from_probability

#: The ``backtest.*`` keys that are decision rules (the others are costs and account settings).
RULE_KEYS = ("threshold", "exit_threshold", "sl_stop", "tp_stop", "max_hold_bars", "sizing", "fraction", "risk")


class StrategyRules(Frozen):
    """Enter when ``p >= threshold``; leave on ``p < exit_threshold``, the stop-loss, the take-profit or after
    ``max_hold_bars`` bars held; size each position by ``sizing``."""

    threshold: float = Field(ge=0, le=1)
    exit_threshold: float | None = Field(None, ge=0, le=1)
    sl_stop: float | None = Field(None, gt=0, lt=1)
    tp_stop: float | None = Field(None, gt=0)
    max_hold_bars: int | None = Field(None, ge=1)
    sizing: Literal["all_in", "fraction", "risk"] = "fraction"
    fraction: float = Field(0.1, gt=0, le=1)
    risk: float = Field(0.02, gt=0, le=1)

    @model_validator(mode="after")
    def _risk_needs_stop(self) -> StrategyRules:
        if self.sizing == "risk" and self.sl_stop is None:
            raise ValueError("sizing=risk needs sl_stop: the risk is measured to the stop-loss")
        return self

    def signals(self, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(entries, exits)`` of the probabilities: the one signal path of backtest and trader."""
        return signals_from_probability(probability, self.threshold, self.exit_threshold)

    def describe(self) -> str:
        def pct(value: float | None) -> str:
            return "off" if value is None else f"{value:.2%}"

        hold = "off" if self.max_hold_bars is None else f"{self.max_hold_bars} bars"
        exit_ = "" if self.exit_threshold is None else f", exit p < {self.exit_threshold:.4f}"
        return (f"enter p >= {self.threshold:.4f}{exit_}; stop-loss {pct(self.sl_stop)}, take-profit {pct(self.tp_stop)}, "
                f"time stop {hold}; sizing {self.sizing} ({self.fraction:.0%} of equity)")
