"""Configuration of the backtest: costs, fills, sizing and the probability thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pricelevel.core.config import Frozen
from pricelevel.core.timeframes import Timeframe


class ProtectionsConfig(Frozen):
    """The account-level protections the live trader applies by default (``risk:``), which every backtest
    simulates with the very same functions (:mod:`pricelevel.backtest.protections`), so the backtest, the
    walk-forward folds, the promotion gate and ``trade --replay`` judge the strategy the trader runs.

    The defaults here are the trader's defaults: ``RiskConfig`` (``risk:``) is this class plus the live-only
    limits, so one place holds them."""

    #: Positions open or pending across all symbols; a new entry is refused at this many (judged before the
    #: bar's fills, as the trader sees the account).
    max_positions: int = Field(5, ge=1)
    #: Equity this far below its peak halts entries for good (the trader: until re-armed; a backtest never re-arms).
    max_drawdown: float = Field(0.2, gt=0, lt=1)
    #: Today's loss (UTC day, from the equity after the day's first bar) beyond this refuses entries until tomorrow.
    daily_loss_limit: float = Field(0.05, gt=0, lt=1)
    #: After this many losing trades in a row, no entry for ``cooldown_bars`` bars.
    cooldown_losses: int = Field(3, ge=1)
    #: Bars without a new entry after ``cooldown_losses`` losing trades in a row.
    cooldown_bars: int = Field(24, ge=1)

    def protections(self) -> ProtectionsConfig:
        """Just the simulated protections (a ``RiskConfig`` also carries live-only limits)."""
        return ProtectionsConfig(**{name: getattr(self, name) for name in ProtectionsConfig.model_fields})


class BacktestConfig(Frozen):
    """How signals become trades and money (rules: :mod:`pricelevel.backtest.engine`)."""

    init_cash: float = Field(10_000.0, gt=0, allow_inf_nan=False)
    #: Fraction of traded value paid on every fill (Bybit spot taker: 0.1 %).
    fees: float = Field(0.001, ge=0, lt=0.1)
    #: Fraction the price moves against us on signal fills (stop exits fill at the stop price).
    slippage: float = Field(0.0005, ge=0, lt=0.1)
    #: Stop-loss / take-profit as fractions of the entry price; ``null`` switches one off.
    sl_stop: float | None = Field(0.02, gt=0, lt=1)
    tp_stop: float | None = Field(0.04, gt=0)
    #: Time stop: exit at the close of the N-th bar held, N bars after the signal bar in both fill modes (a
    #: label's horizon); ``null`` switches it off.
    max_hold_bars: int | None = Field(None, ge=1)
    #: ``close``: at the signal bar's close (vectorbt's rule); ``next_open``: at the next bar's open.
    fill: Literal["close", "next_open"] = "next_open"
    #: ``all_in``: all cash; ``fraction``: ``fraction`` of equity; ``risk``: lose ``risk`` of equity at the
    #: stop-loss, capped by ``fraction``.
    sizing: Literal["all_in", "fraction", "risk"] = "fraction"
    fraction: float = Field(0.1, gt=0, le=1)
    risk: float = Field(0.02, gt=0, le=1)
    #: Entries worth less than this (quote currency) are rejected as dust.
    min_order_value: float = Field(5.0, ge=0)
    #: Concurrent positions across all symbols (they share one cash balance).
    max_positions: int = Field(5, ge=1)
    #: The trader's account protections, simulated bar by bar (``null``: none, the plain engine). Commands take
    #: them from ``risk:`` (:func:`with_protections`), so a backtest trades what the trader would.
    protections: ProtectionsConfig | None = ProtectionsConfig()
    #: Probability signals: ``p >= threshold`` is an entry; ``p < exit_threshold`` an exit (``null``: none).
    threshold: float = Field(0.5, ge=0, le=1)
    exit_threshold: float | None = Field(None, ge=0, le=1)
    #: Annualisation; ``null`` infers it from the candles' spacing.
    timeframe: Timeframe | None = None
    #: Candles drawn per chart; longer series are merged into coarser candles for display only.
    report_max_bars: int = Field(4000, ge=100)

    @model_validator(mode="after")
    def _risk_needs_stop(self) -> BacktestConfig:
        if self.sizing == "risk" and self.sl_stop is None:
            raise ValueError("sizing=risk needs sl_stop: the risk is measured to the stop-loss")
        return self


def with_protections(costs: BacktestConfig, risk: ProtectionsConfig) -> BacktestConfig:
    """``costs`` simulating the trader's protections ``risk`` (the ``risk:`` section, a ``RiskConfig``): where a
    backtest takes them from. ``backtest.protections: null`` keeps them off (the plain engine)."""
    if costs.protections is None:
        return costs
    return costs.model_copy(update={"protections": risk.protections()})
