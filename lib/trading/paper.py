"""Paper trading: the backtest engine itself as the exchange, fed one closed bar at a time.

Fills follow the engine's own rules (fees, slippage, stops inside the bar, fill at the next open), and the
engine's state is what is persisted between bars, so a paper trader over historical bars makes exactly the
trades of ``pricelevel backtest --model`` over the same bars (the engine's chunking invariance, one bar a chunk).

The account protections are not run here: the trader's risk manager judges every entry before the bar is
executed, with the same compiled functions the backtest engine runs in its loop
(:mod:`pricelevel.backtest.protections`), and passes only the admitted entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from pricelevel.backtest.config import BacktestConfig
from pricelevel.backtest.engine import EngineState, ExitReason, account_equity, step
from pricelevel.backtest.run import engine_params
from pricelevel.backtest.trading import with_rules
from pricelevel.strategy.rules import StrategyRules

REASONS = {int(r): r.label for r in ExitReason}


@dataclass(frozen=True)
class Fill:
    """One fill the paper exchange made at this bar (an entry, or an exit with its reason)."""

    symbol: str
    intent: str  # "entry", "exit" (a signal), "stop_loss", "take_profit", "time_stop"
    size: float
    price: float
    fee: float


@dataclass(frozen=True)
class ClosedTrade:
    symbol: str
    entry_time: pd.Timestamp
    exit_time: pd.Timestamp
    entry_price: float
    exit_price: float
    size: float
    pnl: float
    entry_fees: float
    exit_fees: float
    exit_reason: str


@dataclass(frozen=True)
class BarOutcome:
    fills: list[Fill]
    closed: list[ClosedTrade]
    #: Orders queued at this close for the next open (next_open fills): ``symbol -> "entry" | "exit"``.
    queued: dict[str, str]
    equity: float


class PaperBroker:
    """The engine over ``symbols``, one bar per :meth:`on_bar`; :meth:`to_state` / :meth:`from_state` persist it."""

    name = "paper"
    records_orders = False  # the trader writes the paper fills as FILLED order rows

    @property
    def errors(self) -> list[str]:
        return []  # the engine cannot fail to fill

    def reconcile(self, last_bar: str | None, current: pd.Timestamp | None = None) -> list[str]:
        return []  # the engine's state is the account: nothing to compare it with

    def flatten(self, symbols: Sequence[str], at: pd.Timestamp, model_version: str, reason: str) -> list[ClosedTrade]:
        return []  # the engine fills only at a bar: forced exits wait for the next close

    def __init__(self, symbols: Sequence[str], costs: BacktestConfig, rules: StrategyRules, state: EngineState | None = None,
                 bar_times: Sequence[str] = ()) -> None:
        self.symbols = tuple(symbols)
        # no protections in the engine: the trader's RiskManager applies them (the same functions) before the bar
        self.config = with_rules(costs, rules).model_copy(update={"protections": None})
        self.params = engine_params(self.config)
        self.state = state or EngineState.initial(len(self.symbols), self.params.init_cash)
        self.bar_times = list(bar_times)  # the time of every bar fed, by engine bar index

    def with_rules(self, rules: StrategyRules) -> PaperBroker:
        """The same positions and cash under new rules (a champion hot-swap): open positions keep their stops."""
        return PaperBroker(self.symbols, self.config, rules, self.state, self.bar_times)

    def on_bar(
        self, bar_time: pd.Timestamp, ohlc: Mapping[str, tuple[float, float, float, float]],
        entries: Mapping[str, bool], exits: Mapping[str, bool], model_version: str = "",
    ) -> BarOutcome:
        """One closed bar: pending orders fill at its open, stops inside it, signals at its close."""
        nan = (np.nan,) * 4
        prices = np.array([ohlc.get(s, nan) for s in self.symbols], dtype=np.float64).T[:, None, :]
        entry = np.array([[bool(entries.get(s, False)) for s in self.symbols]])
        exit_ = np.array([[bool(exits.get(s, False)) for s in self.symbols]])
        before_position, before_pending = self.state.position.copy(), self.state.pending.copy()
        before_price = self.state.entry_price.copy()
        self.bar_times.append(str(bar_time))
        chunk = step(self.state, self.params, *prices, entry, exit_)
        closed = [self._closed(chunk.trades, k) for k in range(len(chunk.trades["size"]))]
        fills = [Fill(t.symbol, "exit" if t.exit_reason == "signal" else t.exit_reason, t.size, t.exit_price, t.exit_fees)
                 for t in closed]
        for s, symbol in enumerate(self.symbols):
            opened = self.state.position[s] > 0 and (before_position[s] == 0 or self.state.entry_price[s] != before_price[s])
            if opened:
                fills.append(Fill(symbol, "entry", float(self.state.position[s]), float(self.state.entry_price[s]),
                                  float(self.state.entry_fees[s])))
        queued = {symbol: ("entry" if self.state.pending[s] == 1 else "exit") for s, symbol in enumerate(self.symbols)
                  if self.state.pending[s] != 0 and self.state.pending[s] != before_pending[s]}
        return BarOutcome(fills, closed, queued, float(chunk.equity[-1]))

    def _closed(self, trades: Mapping[str, np.ndarray], k: int) -> ClosedTrade:
        size, entry, exit_ = float(trades["size"][k]), float(trades["entry_price"][k]), float(trades["exit_price"][k])
        entry_fees, exit_fees = float(trades["entry_fees"][k]), float(trades["exit_fees"][k])
        return ClosedTrade(
            self.symbols[int(trades["symbol_idx"][k])], pd.Timestamp(self.bar_times[int(trades["entry_bar"][k])]),
            pd.Timestamp(self.bar_times[int(trades["exit_bar"][k])]), entry, exit_, size,
            size * exit_ - size * entry - entry_fees - exit_fees, entry_fees, exit_fees, REASONS[int(trades["exit_reason"][k])],
        )

    # ---------------------------------------------------------------------------------------- the account

    @property
    def cash(self) -> float:
        return float(self.state.cash[0])

    def equity(self) -> float:
        """Cash + positions at their last close: the engine's own sum (the equity its protections judge with)."""
        return float(account_equity(self.state.cash, self.state.position, self.state.last_close))

    def positions(self) -> dict[str, dict[str, float]]:
        s = self.state
        return {
            symbol: {"size": float(s.position[k]), "entry_price": float(s.entry_price[k]), "stop_loss": float(s.sl_price[k]),
                     "take_profit": float(s.tp_price[k]), "last_close": float(s.last_close[k]),
                     "entry_time": self.bar_times[int(s.entry_bar[k])] if s.entry_bar[k] >= 0 else None}
            for k, symbol in enumerate(self.symbols) if s.position[k] > 0
        }

    def cancel_pending(self) -> None:
        """Cancel the buys queued for the next open (the kill switch); queued exits stay."""
        self.state.pending[self.state.pending == 1] = 0

    def held(self) -> int:
        """Positions open or pending (what ``max_positions`` counts)."""
        return int(((self.state.position > 0) | (self.state.pending == 1)).sum())

    # ---------------------------------------------------------------------------------------- persistence

    def to_state(self) -> dict[str, Any]:
        engine = {f.name: np.asarray(getattr(self.state, f.name)).tolist() if f.name != "bars_done" else self.state.bars_done
                  for f in fields(EngineState)}
        return {"symbols": list(self.symbols), "engine": engine, "bar_times": self.bar_times}

    @classmethod
    def from_state(cls, raw: Mapping[str, Any], costs: BacktestConfig, rules: StrategyRules) -> PaperBroker:
        initial = EngineState.initial(len(raw["symbols"]), costs.init_cash)
        values = {}
        for f in fields(EngineState):  # a field added since the state was saved starts as in a new engine
            value = raw["engine"].get(f.name, getattr(initial, f.name))
            values[f.name] = value if f.name == "bars_done" else np.asarray(value, dtype=np.asarray(getattr(initial, f.name)).dtype)
        return cls(raw["symbols"], costs, rules, EngineState(**values), raw["bar_times"])
