"""Configuration of the levels stage: extrema, clustering, walk-forward refits, multi-timeframe filters."""

from __future__ import annotations

from pydantic import Field

from pricelevel.core.config import Frozen


class TouchFilter(Frozen):
    """A level must have been touched on 1d: a candle's range reaches it within ``atr_buffer`` x ATR."""

    #: Apply the touches filter.
    enabled: bool = True
    #: Fewest 1d candles whose range reaches the level.
    min_touches: int = Field(4, ge=1)
    #: Wilder ATR period on 1d candles.
    atr_period: int = Field(7, ge=1)
    #: A candle touches the level when its range comes within this many ATR of it.
    atr_buffer: float = Field(0.2, ge=0)


class AgeFilter(Frozen):
    """A level whose newest extremum is older than this has gone stale."""

    #: Apply the age filter.
    enabled: bool = True
    #: Oldest the cluster's newest extremum may be, in days.
    max_age_days: float = Field(90.0, gt=0)


class VolumeFilter(Frozen):
    """Mean 4h volume of the candles touching a level, against the mean 4h volume of the lookback."""

    #: Apply the volume filter.
    enabled: bool = True
    #: Mean 4h volume at the touches must be at least this times the lookback's mean 4h volume.
    factor: float = Field(1.3, gt=0)


class ApproachFilter(Frozen):
    """How fast the 1h price closed in on a level over the last ``bars`` candles, in ATR per bar."""

    #: Apply the approach filter.
    enabled: bool = True
    #: 1h candles over which the approach speed is measured.
    bars: int = Field(6, ge=1)
    #: ATR period of the speed's unit (1h candles).
    atr_period: int = Field(14, ge=1)
    #: Levels approached faster than this (ATR(atr_period) per bar) are dropped: a fast move breaks levels.
    max_speed: float = Field(1.0, gt=0)


class LevelFilters(Frozen):
    touches: TouchFilter = TouchFilter()
    age: AgeFilter = AgeFilter()
    volume: VolumeFilter = VolumeFilter()
    approach: ApproachFilter = ApproachFilter()


class LevelsConfig(Frozen):
    """Support/resistance levels: extrema of closes, clustered with DBSCAN, refitted walk-forward."""

    #: Bar i is an extremum when its close is the max/min of ``close[i-window : i+window+1]``.
    window: int = Field(12, ge=1)
    #: DBSCAN eps as a fraction of the median clustered price.
    eps_frac: float = Field(0.005, gt=0, lt=1)
    min_samples: int = Field(4, ge=1)
    #: Extrema older than this (at refit time) are not clustered.
    lookback_days: float = Field(365.0, gt=0)
    #: Re-cluster every this many bars of the levels' timeframe; levels are constant in between.
    refit_every: int = Field(24, ge=1)
    filters: LevelFilters = LevelFilters()
