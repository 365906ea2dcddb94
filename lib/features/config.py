"""Configuration of the features stage: the label, the model's input columns, the look-ahead check."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pricelevel.core.config import Frozen
from pricelevel.core.timeframes import Timeframe
from pricelevel.features.catalogue import unknown_feature_names


class LabelsConfig(Frozen):
    """What the model learns to predict (docs/concepts/walk-forward.md "Labels"): the target of bar t is known at the close of t + horizon."""

    #: ``forward_move``: 1 when the highest high of bars t+1..t+horizon reaches ``open[t+1] x (1 + move_frac)``
    #: (entry at the next open, as the backtest fills); ``triple_barrier``: 1 when, from the next open, the upper
    #: barrier is touched before the lower one within ``horizon`` bars (down-first and timeout are 0);
    #: ``level_label``: 1 when bar t+horizon closes within ``threshold_frac`` of a level in force.
    kind: Literal["level_label", "forward_move", "triple_barrier"] = "forward_move"
    #: ``level_label``'s distance, and the "near a level now" baseline of every label.
    threshold_frac: float = Field(0.001, gt=0, lt=1)
    #: ``forward_move``'s x: the rise from the next open that counts as a move (and the +/- barriers of the
    #: direction classes that every label kind reports its direction skill on).
    move_frac: float = Field(0.03, gt=0, lt=1)
    #: Bars ahead the target looks (H); rows whose horizon runs past the data have no target.
    horizon: int = Field(24, ge=1)
    #: ``triple_barrier``'s barrier unit: ``fraction`` of the entry price, or ``atr``: multiples of ATR(``atr_window``)
    #: at the decision bar (volatility-scaled; NaN target while the ATR is warming up).
    barrier_unit: Literal["fraction", "atr"] = "fraction"
    #: ``triple_barrier``'s upper barrier u (in ``barrier_unit``); null: ``move_frac`` (fraction only).
    upper: float | None = Field(None, gt=0)
    #: ``triple_barrier``'s lower barrier d (in ``barrier_unit``); null: the same as the upper one.
    lower: float | None = Field(None, gt=0)
    #: The ATR's window when ``barrier_unit`` is ``atr``.
    atr_window: int = Field(14, ge=1)

    @model_validator(mode="after")
    def _barriers(self) -> LabelsConfig:
        if self.barrier_unit == "atr" and self.upper is None:
            raise ValueError("labels.barrier_unit=atr needs labels.upper (and optionally labels.lower) in ATR multiples")
        if self.barrier_unit == "fraction" and self.down_barrier >= 1:
            raise ValueError(f"labels.lower must be below 1 as a fraction of the entry price, got {self.down_barrier}")
        return self

    @property
    def up_barrier(self) -> float:
        """u: the upper barrier in ``barrier_unit`` (``move_frac`` unless ``upper`` is given)."""
        return self.move_frac if self.upper is None else self.upper

    @property
    def down_barrier(self) -> float:
        """d: the lower barrier in ``barrier_unit`` (the upper one unless ``lower`` is given)."""
        return self.up_barrier if self.lower is None else self.lower


class FeaturesConfig(Frozen):
    """The model's inputs: a named set of feature groups and columns (docs/concepts/walk-forward.md "Features").

    A set lists group names (``returns``, ``indicators``, ``levels``, ``level_strength``, ``context``,
    ``symbol``), which expand to their columns, and/or single column names. ``symbol`` is the learned symbol
    embedding: a set without it trains a model that cannot tell symbols apart.
    """

    #: The set the model reads: a key of ``sets``.
    set: str = "rich"
    #: Named feature sets: each lists groups (``returns``, ``indicators``, ``levels``, ``level_strength``, ``context``, ``symbol``) and/or single columns; add your own.
    sets: dict[str, tuple[str, ...]] = {
        "base": ("log_return", "log_range", "volume_change", "level_distance", "symbol"),
        "rich": ("returns", "indicators", "levels", "level_strength", "context", "symbol"),
    }
    #: Longer timeframes whose candles are joined to each bar once they have closed (``context`` group);
    #: those not longer than the dataset timeframe are skipped.
    context_timeframes: tuple[Timeframe, ...] = (Timeframe("4h"), Timeframe("1d"))

    @model_validator(mode="after")
    def _known_names(self) -> FeaturesConfig:
        if self.set not in self.sets:
            raise ValueError(f"set {self.set!r} is not one of sets: {', '.join(sorted(self.sets))}")
        for name, entries in self.sets.items():
            if not entries or len(set(entries)) != len(entries):
                raise ValueError(f"sets.{name}: at least one entry, no duplicates")
            unknown = unknown_feature_names(entries)
            if unknown:
                raise ValueError(f"sets.{name}: unknown feature or group {unknown} (README \"Features\" lists them)")
            if entries == ("symbol",):
                raise ValueError(f"sets.{name}: the symbol embedding alone is not an input; add a group or column")
        return self

    @property
    def selected(self) -> tuple[str, ...]:
        return self.sets[self.set]


class LookaheadConfig(Frozen):
    """The look-ahead check run by the training flow (and ``pricelevel check lookahead``)."""

    enabled: bool = True
    #: Cut points t: features and labels are recomputed on the data cut at t and compared with the full run.
    cuts: int = Field(3, ge=1)
