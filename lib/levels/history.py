"""The levels step: a symbol's walk-forward level history from the candles its filters read, kept in the
derived store under a key of those candles, the levels config and the levels code."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pricelevel.core.cache import DerivedStore, SymbolStep, code_fingerprint, step_key
from pricelevel.core.files import files_fingerprint
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.folder import CandleFolder
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import (
    FILTER_TIMEFRAMES,
    LevelHistory,
    MultiTimeframe,
    levels_asof,
    walk_forward_levels,
)

STEP = "levels"


def filter_timeframes(levels: LevelsConfig) -> tuple[Timeframe, ...]:
    """The extra timeframes the enabled filters read."""
    filters = levels.filters
    return tuple(tf for name, (tf, _) in FILTER_TIMEFRAMES.items() if getattr(filters, name).enabled)


def level_timeframes(timeframe: Timeframe, levels: LevelsConfig) -> tuple[Timeframe, ...]:
    """Every timeframe the levels of bars of ``timeframe`` read: the bars' and the filters'."""
    return tuple(sorted({Timeframe(timeframe), *filter_timeframes(levels)}, key=lambda tf: tf.delta))


def level_context(frames: Mapping[Timeframe, pd.DataFrame | None]) -> MultiTimeframe:
    return MultiTimeframe(d1=frames.get(Timeframe.D1), h4=frames.get(Timeframe.H4), h1=frames.get(Timeframe.H1))


def read_context(folder: CandleFolder, symbol: str, levels: LevelsConfig) -> MultiTimeframe:
    """The 1d/4h/1h candles of ``symbol`` that the enabled filters read (missing ones stay ``None``)."""
    return level_context(folder.read_many(symbol, filter_timeframes(levels)))


def levels_document(
    folder: CandleFolder, symbol: str, timeframe: Timeframe, asof: pd.Timestamp, levels: LevelsConfig, raw: bool = False
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The levels in force at ``asof`` from the candles closed by then (``raw``: before the filters), and the
    JSON document ``pricelevel levels`` writes."""
    context = None if raw else read_context(folder, symbol, levels)
    found = levels_asof(folder.read(symbol, timeframe), timeframe, asof, levels, context, raw=raw)
    document = {
        "symbol": symbol, "timeframe": str(timeframe), "asof": asof.isoformat(), "raw": raw,
        "config": levels.model_dump(mode="json"), "levels": json.loads(found.to_json(orient="records", date_format="iso")),
    }
    return found, document


def history_from_frames(
    frames: Mapping[Timeframe, pd.DataFrame | None], timeframe: Timeframe, levels: LevelsConfig
) -> LevelHistory:
    """Walk-forward levels of the ``timeframe`` bars in ``frames``, filtered with the other timeframes there."""
    candles = frames.get(Timeframe(timeframe))
    if candles is None:
        raise ValueError(f"no {timeframe} candles")
    return walk_forward_levels(candles, timeframe, levels, level_context(frames))


def write_history(folder: Path, symbol: str, history: LevelHistory) -> None:
    history.levels.to_parquet(folder / f"{symbol}_levels.parquet", index=False)
    pd.DataFrame({"asof": history.refits}).to_parquet(folder / f"{symbol}_refits.parquet", index=False)


def read_history(folder: Path, symbol: str) -> LevelHistory:
    levels = pd.read_parquet(folder / f"{symbol}_levels.parquet")
    refits = pd.DatetimeIndex(pd.read_parquet(folder / f"{symbol}_refits.parquet")["asof"])
    return LevelHistory(refits=refits, levels=levels)


def levels_step(
    folder: CandleFolder, derived: DerivedStore, symbol: str, timeframe: Timeframe, levels: LevelsConfig
) -> SymbolStep:
    """The level history of ``symbol`` (computed, or read back when these inputs were computed before)."""
    timeframe = Timeframe(timeframe)
    timeframes = level_timeframes(timeframe, levels)
    fingerprint = files_fingerprint(folder.existing(symbol, timeframes))
    key = step_key(
        STEP, symbol=symbol, timeframe=str(timeframe), data=fingerprint, config=levels.model_dump(mode="json"),
        code=code_fingerprint(history_from_frames),
    )

    def write(out: Path) -> None:
        write_history(out, symbol, history_from_frames(folder.read_many(symbol, timeframes), timeframe, levels))

    out, built = derived.build(STEP, key, write)
    history = read_history(out, symbol)
    return SymbolStep(
        STEP, symbol, key, out, fingerprint, built,
        f"{len(history.refits)} refits, {len(history.levels)} level rows ({timeframe})",
    )
