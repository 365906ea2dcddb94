"""The risk manager: account-level limits on top of the model's own rules, each a small pure function.

The model's rules decide *what* to trade (they are the backtest's); the risk manager decides *whether* a new
position may be opened now and bounds how it is protected and sized:

- ``effective_rules``: the model's rules, which the promotion gate judged, bounded where ``risk:`` asks for
  it: a stop-loss never wider than ``risk.max_stop_loss`` (a model without one gets it), ``risk.take_profit``
  for a model without one (both off by default: the trader then executes exactly the promoted rules); size
  = ``risk_per_trade`` of equity lost at the stop, capped at ``max_position_fraction`` of equity. (With the
  seed's 2 % risk and a 2 % stop the risk rule asks for the whole equity, so the 10 % cap binds first.)
- refusals of new entries, each recorded with its reason: a latched **drawdown halt** (equity
  ``max_drawdown`` below its peak; survives restarts until re-armed), the **kill switch** (latched likewise),
  a manual **stop** (no new entries), the **daily loss limit**, a **cool-down** after ``cooldown_losses``
  losing trades in a row, the **circuit breaker** (repeated exchange errors or stale data) and
  ``max_positions``. Exits are never refused.

The drawdown halt, the daily loss limit, the cool-down and ``max_positions`` are decided by the compiled
functions of :mod:`pricelevel.backtest.protections`, the very ones the backtest engine runs in its loop, on
this state converted to numbers: so every backtest (``backtest --model``, the walk-forward folds, the promotion
gate) refuses the entries the trader refuses. The kill switch, the manual stop, the circuit breaker and
reconciliation halts are live only (a backtest has no exchange and no operator).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from pricelevel.backtest import protections as guard
from pricelevel.backtest.plan import Sizing, order_value
from pricelevel.strategy.rules import StrategyRules
from pricelevel.trading.config import RiskConfig


def effective_rules(model: StrategyRules, risk: RiskConfig) -> StrategyRules:
    """The rules the trader executes: the model's, bounded and sized by the risk limits."""
    stop = model.sl_stop
    if risk.max_stop_loss is not None:
        stop = risk.max_stop_loss if stop is None else min(stop, risk.max_stop_loss)
    take = model.tp_stop if model.tp_stop is not None else risk.take_profit
    update: dict[str, Any] = {"sl_stop": stop, "tp_stop": take,
                              "fraction": min(model.fraction, risk.max_position_fraction)}
    if stop is not None:
        update |= {"sizing": "risk", "risk": risk.risk_per_trade}
    return model.model_copy(update=update)


def rule_changes(model: StrategyRules, executed: StrategyRules) -> list[str]:
    """What the risk limits changed in the model's rules, as ``key model -> executed`` (empty: nothing). The
    promotion gate judged the model's own rules, so a change here trades something it did not judge."""
    before, after = model.model_dump(), executed.model_dump()
    return [f"{key} {before[key]} -> {after[key]}" for key in before if before[key] != after[key]]


def rule_changes_note(model: StrategyRules, executed: StrategyRules) -> str | None:
    """One line for a person when the risk limits change the model's rules (``None`` when they do not)."""
    changed = rule_changes(model, executed)
    if not changed:
        return None
    return (f"the risk limits change the model's rules ({'; '.join(changed)}): the promotion gate judged the "
            "model's own; set the risk: keys to trade exactly those")


def position_value(equity: float, stop: float | None, risk_per_trade: float, max_fraction: float) -> float:
    """What a new position may be worth: lose ``risk_per_trade`` of equity at ``stop``, at most ``max_fraction``
    (the position plan's ``risk`` sizing, :func:`pricelevel.backtest.plan.order_value`; ``fraction`` without a
    stop). A whole entry (cash, fees, slippage, stops): :func:`pricelevel.backtest.plan.plan_position`."""
    sizing, sl = (Sizing.FRACTION, math.nan) if stop is None else (Sizing.RISK, float(stop))
    return float(order_value(int(sizing), float(max_fraction), float(risk_per_trade), sl, float(equity)))


# ------------------------------------------------------------------------------------------------ rules


# Each rule's words; whether it applies is decided by :mod:`pricelevel.backtest.protections`.


def drawdown_breached(equity: float, peak: float, limit: float) -> str | None:
    if not guard.drawdown_reached(equity, peak, limit):
        return None
    drawdown = 1.0 - equity / peak
    return f"drawdown {drawdown:.1%} reached the {limit:.0%} limit (peak {peak:,.2f}, equity {equity:,.2f})"


def daily_loss_breached(equity: float, day_start: float, limit: float) -> str | None:
    if not guard.daily_loss_reached(equity, day_start, limit):
        return None
    return f"today's loss {1.0 - equity / day_start:.1%} reached the {limit:.0%} daily limit"


def cooling_down(cooldown_until: str | None, bar_time: pd.Timestamp) -> str | None:
    if cooldown_until and _ns(bar_time) < _ns(cooldown_until):
        return f"cooling down after consecutive losing trades until {cooldown_until}"
    return None


def too_many_positions(held: int, limit: int) -> str | None:
    return f"{held} positions open or pending: the limit is {limit}" if held >= limit else None


def _number(value: float | None) -> float:
    """The protections' "none yet" for a number: NaN."""
    return math.nan if value is None else float(value)


def _day(day: str | None) -> int:
    return guard.NO_TIME if day is None else _ns(day) // guard.DAY_NS


def _cooldown(until: str | None) -> int:
    return _ns(until) if until else guard.NO_TIME


def _ns(when: pd.Timestamp | str) -> int:
    """UTC nanoseconds since the epoch (a naive time is UTC), the protections' clock."""
    stamp = pd.Timestamp(when)
    return (stamp if stamp.tz is None else stamp.tz_convert("UTC").tz_localize(None)).as_unit("ns").value


@dataclass
class RiskState:
    """What the limits remember between bars (persisted; the latched ones survive restarts)."""

    peak_equity: float | None = None
    #: A latched halt (drawdown or kill switch): no entry until re-armed.
    halted: str | None = None
    kill_switch: bool = False
    #: ``/stop``: no new entries (exits go on), until ``/start``.
    stopped: bool = False
    day: str | None = None
    day_start_equity: float | None = None
    consecutive_losses: int = 0
    cooldown_until: str | None = None
    breaker_errors: int = 0
    breaker_good: int = 0
    breaker_tripped: bool = False
    refusals: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> RiskState:
        return cls(**(raw or {}))


class RiskManager:
    """Applies :class:`RiskConfig` to a :class:`RiskState`; the trader persists the state after every bar."""

    def __init__(self, config: RiskConfig, state: RiskState | None = None) -> None:
        self.config = config
        self.state = state or RiskState()

    def after_bar(
        self, bar_time: pd.Timestamp, bar: pd.Timedelta, equity: float, closed_pnls: list[float], problem: bool
    ) -> list[str]:
        """Update the limits with the bar's outcome; return the events worth telling a person (halts, trips)."""
        state, config, events = self.state, self.config, []
        now = _ns(bar_time)
        peak, day, day_start, _, halted_now = guard.account_after_bar(
            _number(state.peak_equity), _day(state.day), _number(state.day_start_equity), state.halted is not None,
            config.max_drawdown, now // guard.DAY_NS, float(equity))
        state.peak_equity, state.day_start_equity = float(peak), float(day_start)
        state.day = f"{pd.Timestamp(int(day) * guard.DAY_NS):%Y-%m-%d}"
        if halted_now:
            state.halted = drawdown_breached(equity, state.peak_equity, config.max_drawdown)
            events.append(f"HALTED: {state.halted}; no entry until `pricelevel trader rearm`")
        losses, until = state.consecutive_losses, _cooldown(state.cooldown_until)
        ends = now + pd.Timedelta(bar).value * config.cooldown_bars
        for pnl in closed_pnls:
            losses, until, fired = guard.trade_closed(losses, until, config.cooldown_losses, ends, float(pnl))
            if fired:
                state.cooldown_until = str(pd.Timestamp(int(until), tz="UTC"))
                events.append(f"cool-down: {config.cooldown_losses} losing trades in a row; no entry until "
                              f"{state.cooldown_until}")
        state.consecutive_losses = int(losses)
        if problem:
            state.breaker_errors, state.breaker_good = state.breaker_errors + 1, 0
            if not state.breaker_tripped and state.breaker_errors >= config.breaker_errors:
                state.breaker_tripped = True
                events.append(f"circuit breaker tripped: {state.breaker_errors} exchange errors or stale bars in a row")
        else:
            state.breaker_errors, state.breaker_good = 0, state.breaker_good + 1
            if state.breaker_tripped and state.breaker_good >= config.breaker_reset_bars:
                state.breaker_tripped = False
                events.append(f"circuit breaker reset after {state.breaker_good} good bars")
        return events

    def entry_refusal(self, bar_time: pd.Timestamp, equity: float, held: int) -> str | None:
        """Why no new position may be opened now (``None``: it may). Checked once per entry signal."""
        state, config = self.state, self.config
        code = guard.entry_refusal(state.halted is not None, _number(state.day_start_equity),
                                   _cooldown(state.cooldown_until), config.max_positions, config.daily_loss_limit,
                                   _ns(bar_time), float(equity), int(held))
        reason = (
            (f"kill switch: {state.halted}" if state.kill_switch else None)
            or (f"halted: {state.halted}" if state.halted else None)
            or ("stopped: no new entries (`/start` or `pricelevel trader rearm` resumes)" if state.stopped else None)
            or (daily_loss_breached(equity, state.day_start_equity, config.daily_loss_limit)
                if code == guard.REFUSED_DAILY_LOSS else None)
            or (cooling_down(state.cooldown_until, bar_time) if code == guard.REFUSED_COOLDOWN else None)
            or ("circuit breaker: repeated exchange errors or stale data" if state.breaker_tripped else None)
            or (too_many_positions(held, config.max_positions) if code == guard.REFUSED_MAX_POSITIONS else None)
        )
        if reason:
            kind = reason.split(":")[0].split(" ")[0]
            state.refusals[kind] = state.refusals.get(kind, 0) + 1
        return reason

    def halt(self, reason: str) -> None:
        """Latch a halt (a reconciliation mismatch): no entry until re-armed."""
        self.state.halted = self.state.halted or reason

    def kill(self, reason: str = "kill switch engaged") -> None:
        self.state.kill_switch, self.state.halted = True, reason

    def rearm(self) -> None:
        """Clear every latched halt (drawdown, kill switch, stop, breaker); the peak restarts from now."""
        state = self.state
        state.kill_switch, state.halted, state.stopped = False, None, False
        state.breaker_tripped, state.breaker_errors, state.peak_equity = False, 0, None

    def describe(self) -> str:
        s = self.state
        parts = [f"halted: {s.halted}" if s.halted else "armed", "kill switch ON" if s.kill_switch else "",
                 "stopped" if s.stopped else "", "breaker TRIPPED" if s.breaker_tripped else "",
                 f"cool-down until {s.cooldown_until}" if s.cooldown_until else ""]
        return ", ".join(p for p in parts if p) or "armed"


def finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
