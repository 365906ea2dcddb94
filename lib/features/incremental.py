"""A symbol's feature table kept up to date bar by bar: what the live trader scores at every closed bar, at the
cost of the new rows instead of a recomputation over the whole history, and equal to that recomputation to
the bit (``tests/test_incremental.py`` compares them bar by bar on real candles).

:class:`TableBuilder` is handed, at every bar, the candles closed by then (every timeframe the table reads) and
returns what :meth:`TableSpec.build <pricelevel.features.tables.TableSpec.build>` returns on them: the newest
``rows`` rows of the table, and (:attr:`TableBuilder.history`, built when asked for) the level history. It stays
exact because every step is:

- **Appends only.** Each timeframe's candles must be the previous call's, unchanged, with candles appended
  that close after the last bar already computed (a candle arriving late would change rows already made).
  Anything else (a rewrite, a shorter history, a late candle, a NaN in the prices, too short a history for
  the recursions to be past their warm-up) rebuilds from scratch with ``TableSpec.build``. A time gap (a
  missing candle) is an append like any other: every computation counts bars, not hours. The candles seen
  before are compared value by value, except where a column is the very memory seen before (a feed that cuts
  one history, as the replay does): pandas does not write to memory that frames share, and the builder holds
  on to what it saw, so that memory still holds it.
- **Levels** change only at a refit bar: a refit at ``T`` reads only candles closed by ``T``, so the history
  gains that refit's rows (:func:`~pricelevel.levels.walkforward.refit_columns` on the refit inputs extended
  with the new candles, :func:`~pricelevel.levels.walkforward.extend_level_inputs`) and earlier refits never
  change.
- **Indicators**: each registry entry's (:mod:`pricelevel.features.registry`) indicators continue from their
  state (``Indicator.resume``): those with a memory (compensated rolling sums, EMAs, Wilder's RSI and ATR,
  MACD, force index) with the same compiled loops (``pricelevel.ta.indicators.*_resume``); windowed ones are
  recomputed on a tail long enough to give the same values (rolling deviations from their last exact restart).
- **Columns** are combined row by row by the functions the full computation uses (the entries' normalisers
  through :meth:`~pricelevel.features.registry.FeaturePlan.values`, ``level_columns``, ``join_context``);
  ``near_level`` row by row; ``target``, which looks ``horizon`` bars ahead and so changes as bars arrive, from
  the returned rows alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.features.catalogue import needed_timeframes
from pricelevel.features.compute import LEVEL_COLUMNS, join_context, level_columns
from pricelevel.features.labels import targets
from pricelevel.features.registry import LEVEL_ATR, Bars, FeaturePlan
from pricelevel.features.tables import TABLE_COLUMNS, TableSpec, table_columns, table_frame
from pricelevel.levels.history import level_context
from pricelevel.levels.walkforward import (
    CandleArrays,
    LevelHistory,
    LevelInputs,
    column_ns,
    extend_level_inputs,
    level_inputs,
    levels_frame,
    nearest_of_brackets,
    refit_columns,
)

#: With fewer bars every update is a full build: from here on every bar recursion is past its warm-up (more
#: where a registry entry's warm-up needs it: an indicator resumes from a row past the warm-up of its features).
WARM_BARS = 64
#: Likewise for the candles of a ``context`` timeframe (RSI and ATR of 14, SMA of 20 candles).
WARM_CANDLES = 21
_CANDLE_COLUMNS = ("open", "high", "low", "close", "volume")
_TIME_COLUMNS = ("asof", "first_seen", "last_seen")


class TableBuilder:
    """The feature table of one symbol, updated as its candles grow: one builder per symbol, :meth:`update`
    at every closed bar with the candles closed by then, :attr:`history` for the level history if wanted."""

    def __init__(self, spec: TableSpec, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.spec = spec
        self.rows = rows
        self.rebuilds = 0  # updates that recomputed everything (the first one, and any that was not an append)
        self._plan = _Plan.of(spec, rows)
        self._state: _State | None = None
        self._history: LevelHistory | None = None

    def update(self, frames: Mapping[Timeframe, pd.DataFrame | None]) -> pd.DataFrame:
        """The last ``rows`` rows of ``spec.build(frames)``'s table (its index too), for these candles."""
        plan, state = self._plan, self._state
        candles = _read(frames, plan) if state is not None else None
        if state is not None and candles is not None and _appends(plan, state, candles):
            self._state = _advance(plan, state, candles)
            if self._state.refit_ns.size != state.refit_ns.size:
                self._history = None  # rebuilt when asked for: the trader's scoring does not read it
            return _table(plan, self._state)
        self.rebuilds += 1
        self._history, table = self.spec.build(frames)
        self._state = _start(plan, frames, self._history, table)
        return table.iloc[-self.rows :]

    @property
    def history(self) -> LevelHistory:
        """``spec.build(frames)``'s level history for the candles of the last update."""
        if self._history is None:
            if self._state is None:
                raise RuntimeError("no update yet: the history is that of the candles of an update")
            self._history = LevelHistory(refits=_utc_index(self._state.refit_ns), levels=levels_frame(self._state.levels))
        return self._history


@dataclass(frozen=True, eq=False)
class _Plan:
    """What every update of a spec reads, worked out once: columns, timeframes and their lengths."""

    spec: TableSpec
    rows: int
    columns: tuple[str, ...]
    timeframes: tuple[Timeframe, ...]  # every timeframe the table reads
    context_timeframes: tuple[Timeframe, ...]
    nanoseconds: dict[Timeframe, int]
    refit_period: int  # ns
    level_columns: bool  # whether the set reads the levels / level_strength columns
    table_columns: pd.Index
    bars: FeaturePlan  # the registry entries among the columns, what they read (and the levels' ATR)
    level_atr: int | None  # the levels' ATR among the bars' indicators (when the set reads level columns)
    contexts: FeaturePlan  # the registry's context entries, what they read
    warm_bars: int  # fewer bars (context candles) than these: a full build
    warm_candles: int

    @classmethod
    def of(cls, spec: TableSpec, rows: int) -> _Plan:
        columns = spec.columns
        timeframes = spec.input_timeframes
        features = spec.registry.select(columns)
        level = bool(set(columns) & LEVEL_COLUMNS)
        bars = FeaturePlan.of(features, extra=(LEVEL_ATR,) if level else ())
        contexts = FeaturePlan.of(spec.registry.context_features)
        return cls(
            spec=spec,
            rows=rows,
            columns=columns,
            timeframes=timeframes,
            context_timeframes=needed_timeframes(columns),
            nanoseconds={tf: tf.nanoseconds for tf in timeframes},
            refit_period=spec.levels.refit_every * spec.timeframe.nanoseconds,
            level_columns=level,
            table_columns=table_columns(columns),
            bars=bars,
            level_atr=bars.indicators.index(LEVEL_ATR) if level else None,
            contexts=contexts,
            warm_bars=max(WARM_BARS, 1 + max((f.warmup for f in features), default=0), 1 + LEVEL_ATR.window),
            warm_candles=max(WARM_CANDLES, 1 + max((f.warmup for f in contexts.features), default=0)),
        )


# ----------------------------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class _Candles:
    """One timeframe's candles as arrays: open times (UTC ns), timestamps as given, the prices read."""

    ns: np.ndarray
    timestamps: pd.api.extensions.ExtensionArray | np.ndarray
    prices: dict[str, np.ndarray]

    @property
    def arrays(self) -> CandleArrays:
        return CandleArrays(self.ns, *(self.prices[c] for c in ("high", "low", "close", "volume")))

    @property
    def bars(self) -> Bars:
        return Bars(*(self.prices[c] for c in ("high", "low", "close", "volume")))


@dataclass(frozen=True, eq=False)
class _Block:
    """The level set in force: the columns the features read, sorted by price."""

    price: np.ndarray
    touches: np.ndarray
    extrema: np.ndarray
    last_seen_ns: np.ndarray

    @classmethod
    def of(cls, levels: Mapping[str, np.ndarray]) -> _Block:
        """The set from its level columns (times in UTC ns)."""
        block = cls(
            price=np.asarray(levels["price"], dtype=np.float64),
            touches=np.asarray(levels["touches"], dtype=np.float64),
            extrema=np.asarray(levels["n_extrema"], dtype=np.float64),
            last_seen_ns=np.asarray(levels["last_seen"], dtype=np.int64),
        )
        if np.any(block.price[1:] < block.price[:-1]):
            raise ValueError("a refit's levels must be sorted by price")
        return block

    def bracket(self, close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~pricelevel.levels.walkforward.bracketing_levels` within this set: the last level at or
        below the close and the first above it (rows of the set, -1: none)."""
        count = np.searchsorted(self.price, close, side="right")
        valid = ~np.isnan(close)
        below = np.where(valid & (count > 0), count - 1, -1)
        above = np.where(valid & (count < self.price.size), count, -1)
        return below.astype(np.intp), above.astype(np.intp)


@dataclass(frozen=True, eq=False)
class _Context:
    """A ``context`` timeframe: its indicators' states and every candle's values (before the join)."""

    states: tuple  # of the plan's context indicators, in its order
    values: dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class _State:
    """Everything an update continues from: the candles seen, the levels, the recursions, the last rows."""

    candles: dict[Timeframe, _Candles]
    refit_ns: np.ndarray  # the history's refits and levels (as columns, times in UTC ns)
    levels: dict[str, np.ndarray]
    inputs: LevelInputs
    block: _Block
    recursions: tuple  # the states of the plan's bar indicators, in its order
    contexts: dict[Timeframe, _Context]
    features: np.ndarray  # the last rows' feature columns, in the spec's order
    near: np.ndarray  # their near_level


def _read(frames: Mapping[Timeframe, pd.DataFrame | None], plan: _Plan) -> dict[Timeframe, _Candles] | None:
    """The candles of every timeframe the table reads (``None`` if one is missing: a full build says why)."""
    out = {}
    for tf in plan.timeframes:
        frame = frames.get(tf)
        if frame is None:
            return None
        stamps = _stored(frame, "timestamp")
        names = _CANDLE_COLUMNS if tf == plan.spec.timeframe else _CANDLE_COLUMNS[1:]
        out[tf] = _Candles(_stored_ns(stamps), stamps, {c: np.asarray(_stored(frame, c), dtype=np.float64) for c in names})
    return out


def _stored(frame: pd.DataFrame, name: str) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """A column's values as the frame stores them, to be read only, without building a Series: ``frame[name]``
    costs ~40 us in pandas 3, which made reading the candles of every bar a fifth of an update. Through the
    Series where pandas lacks the accessor."""
    stored = getattr(frame, "_get_column_array", None)
    if stored is None:
        return frame[name].array
    return stored(frame.columns.get_loc(name))


def _stored_ns(stamps: pd.api.extensions.ExtensionArray | np.ndarray) -> np.ndarray:
    """:func:`~pricelevel.levels.walkforward.column_ns` of a timestamp column's stored values."""
    if isinstance(stamps, pd.arrays.DatetimeArray):
        return (stamps if stamps.unit == "ns" else stamps.as_unit("ns")).asi8
    return column_ns(pd.Series(stamps))


def _appends(plan: _Plan, state: _State, candles: dict[Timeframe, _Candles]) -> bool:
    """Whether ``candles`` are the state's with finite candles appended, each closing after the last bar seen."""
    seen_until = state.candles[plan.spec.timeframe].ns[-1] + plan.nanoseconds[plan.spec.timeframe]
    for tf, old in state.candles.items():
        new = candles[tf]
        m = old.ns.size
        if new.ns.size < m or not _same(new.ns[:m], old.ns):
            return False
        if new.ns.size > m and (
            new.ns[m] + plan.nanoseconds[tf] <= seen_until or np.any(np.diff(new.ns[m:]) <= 0)
        ):
            return False
        for name, values in new.prices.items():
            if not (_same(values[:m], old.prices[name]) and np.isfinite(values[m:]).all()):
                return False
    return True


def _same(new: np.ndarray, old: np.ndarray) -> bool:
    """Equal values; read off the memory when both are views of the same memory (a feed that cuts one
    history, as the replay does: pandas never writes to memory a frame shares), compared otherwise."""
    if new.__array_interface__["data"][0] == old.__array_interface__["data"][0] and new.strides == old.strides:
        return True
    return np.array_equal(new, old)


def _start(
    plan: _Plan, frames: Mapping[Timeframe, pd.DataFrame | None], history: LevelHistory, table: pd.DataFrame
) -> _State | None:
    """The state after a full build, or ``None`` when the next update must build in full again (too few bars
    for the recursions to be past their warm-up, or non-finite prices)."""
    spec = plan.spec
    candles = _read(frames, plan)
    if candles is None or any(not np.isfinite(v).all() for c in candles.values() for v in c.prices.values()):
        return None
    bars = candles[spec.timeframe]
    if bars.ns.size < plan.warm_bars or any(candles[tf].ns.size < plan.warm_candles for tf in plan.context_timeframes):
        return None
    recursions = plan.bars.start(bars.bars)
    contexts = {tf: _context_start(plan, candles[tf]) for tf in plan.context_timeframes}
    levels = {
        name: column_ns(values) if name in _TIME_COLUMNS else values.to_numpy()
        for name, values in history.levels.items()
    }
    last = int(np.searchsorted(levels["asof"], utc_ns(history.refits)[-1], side="left"))
    tail = table.iloc[-plan.rows :]
    return _State(
        candles=candles,
        refit_ns=utc_ns(history.refits),
        levels=levels,
        inputs=level_inputs(frames[spec.timeframe], spec.timeframe, spec.levels, level_context(frames)),
        block=_Block.of({name: values[last:] for name, values in levels.items()}),
        recursions=recursions,
        contexts=contexts,
        features=tail[list(plan.table_columns[len(TABLE_COLUMNS) :])].to_numpy(dtype=np.float64),
        near=tail["near_level"].to_numpy(dtype=np.int8),
    )


def _context_start(plan: _Plan, candles: _Candles) -> _Context:
    """A context timeframe's indicator states and every candle's values, as ``compute_features`` gives them."""
    bars = candles.bars
    return _Context(states=plan.contexts.start(bars), values=plan.contexts.values(bars, plan.contexts.batch(bars)))


# ----------------------------------------------------------------------------------------------- one update


def _advance(plan: _Plan, state: _State, candles: dict[Timeframe, _Candles]) -> _State:
    """The state after the candles appended since ``state``: the new bars' rows, a refit's rows if one passed."""
    spec = plan.spec
    contexts = {tf: _context_advance(plan, c, state.candles[tf], candles[tf]) for tf, c in state.contexts.items()}
    bars = candles[spec.timeframe]
    begin, end = state.candles[spec.timeframe].ns.size, bars.ns.size
    if end == begin:
        return _State(candles, state.refit_ns, state.levels, state.inputs, state.block, state.recursions, contexts,
                      state.features, state.near)
    refit_ns, levels, inputs, block = state.refit_ns, state.levels, state.inputs, state.block
    periods = np.floor_divide(bars.ns[begin - 1 : end], plan.refit_period)
    segments = []  # (first row, end row, level set in force)
    first = begin
    refits = begin + np.flatnonzero(periods[1:] != periods[:-1])
    for row in refits:
        if row > first:
            segments.append((first, row, block))
        if inputs.bar_ns.size < end:
            context = {tf: c.arrays for tf, c in candles.items()}
            inputs = extend_level_inputs(inputs, bars.arrays, spec.timeframe, spec.levels, context)
        refit = refit_columns(inputs, int(bars.ns[row]), spec.levels)
        levels = {name: np.concatenate([values, refit[name]]) for name, values in levels.items()}
        block = _Block.of(refit)
        first = row
    segments.append((first, end, block))
    if refits.size:
        refit_ns = np.concatenate([refit_ns, bars.ns[refits]])

    arrays = bars.bars
    series, recursions = plan.bars.resume(arrays, begin, state.recursions)
    new_bars = arrays.rows(begin)
    close = new_bars.close
    values = plan.bars.values(new_bars, series)
    atr = series[plan.level_atr] if plan.level_atr is not None else None
    level_values, near = _level_rows(plan, bars, begin, segments, atr)
    values |= level_values
    bar_close_ns = bars.ns[begin:] + plan.nanoseconds[spec.timeframe]
    for tf, context in contexts.items():
        ctx = candles[tf]
        values |= join_context(bar_close_ns, close, ctx.ns + plan.nanoseconds[tf], ctx.prices["close"], context.values, tf)
    new = np.column_stack([values[name] for name in plan.columns])
    new[np.isinf(new)] = np.nan  # as compute_features: an infinity is "not defined"
    features = np.concatenate([state.features, new])[-plan.rows :]
    near = np.concatenate([state.near, near])[-plan.rows :]
    return _State(candles, refit_ns, levels, inputs, block, recursions, contexts, features, near)


def _level_rows(
    plan: _Plan, bars: _Candles, begin: int, segments: list[tuple[int, int, _Block]], atr: np.ndarray | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The level columns (when the set reads them) and ``near_level`` of rows ``begin..``, each segment of rows
    against the level set in force there."""
    threshold = plan.spec.labels.threshold_frac
    parts: list[dict[str, np.ndarray]] = []
    near = []
    for first, end, block in segments:
        close = bars.prices["close"][first:end]
        below, above = block.bracket(close)
        level = nearest_of_brackets(close, block.price, below, above)
        near.append((np.abs(close - level) <= threshold * close).astype(np.int8))  # as labels.level_label
        if plan.level_columns:
            parts.append(level_columns(bars.ns[first:end], close, atr[first - begin : end - begin], block.price,
                                       block.touches, block.extrema, block.last_seen_ns, below, above))
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}
    return columns, np.concatenate(near)


def _context_advance(plan: _Plan, context: _Context, old: _Candles, new: _Candles) -> _Context:
    """A context timeframe's state after its appended candles (their values as ``compute_features`` gives them)."""
    begin = old.ns.size
    if new.ns.size == begin:
        return context
    bars = new.bars
    series, states = plan.contexts.resume(bars, begin, context.states)
    values = plan.contexts.values(bars.rows(begin), series)
    return _Context(
        states=states,
        values={name: np.concatenate([context.values[name], values[name]]) for name in values},
    )


def _utc_index(ns: np.ndarray) -> pd.DatetimeIndex:
    """Refit times as :func:`~pricelevel.levels.walkforward.walk_forward_levels` gives them."""
    return pd.DatetimeIndex(np.asarray(ns, dtype=np.int64).view("datetime64[ns]")).tz_localize("UTC")


def _table(plan: _Plan, state: _State) -> pd.DataFrame:
    """The last rows of the table from the state: candles, ``near_level``, ``target``, feature columns."""
    bars = state.candles[plan.spec.timeframe]
    end = bars.ns.size
    first = end - state.features.shape[0]
    prices = {name: bars.prices[name][first:] for name in _CANDLE_COLUMNS}
    target = targets(prices, state.near, plan.spec.labels)  # reads open/high of these rows only
    return table_frame(bars.timestamps[first:], list(prices.values()), state.near, target, state.features,
                       plan.table_columns, pd.RangeIndex(first, end))
