"""The feature registry: every entry has all its parts and they agree (its warm-up is the column's leading NaN rows
on real candles, its indicators resume to the bit what they compute whole), and a feature added to the registry
alone appears in both table builders' outputs, equal to the bit, context columns included."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from pricelevel.config import load_project_config
from pricelevel.core.timeframes import Timeframe, utc_ns
from pricelevel.data.folder import CandleFolder
from pricelevel.features.catalogue import GROUPS, feature_columns
from pricelevel.features.compute import bar_values, bars_of
from pricelevel.features.config import FeaturesConfig
from pricelevel.features.incremental import TableBuilder
from pricelevel.features.lookahead import cut_frames
from pricelevel.features.registry import REGISTRY, Bars, Feature, FeaturePlan, FeatureRegistry, Indicator
from pricelevel.features.tables import FEATURE_PREFIX, TableSpec
from tests.conftest import ROOT, SAMPLE, real_candles


def test_every_entry_has_all_its_parts() -> None:
    assert REGISTRY.features
    for feature in REGISTRY.features:
        assert feature.name.isidentifier() and feature.name in GROUPS[feature.group], feature
        assert callable(feature.normalise), feature.name
        assert isinstance(feature.warmup, int) and feature.warmup >= 0, feature.name
        assert isinstance(feature.inputs, tuple), feature.name
        for indicator in feature.inputs:
            assert isinstance(indicator, Indicator), (feature.name, indicator)
            assert not type(indicator).__abstractmethods__, (feature.name, indicator)  # batch, start, resume
    assert set(REGISTRY.context_values[:-1]) <= {f.name for f in REGISTRY.features}


@pytest.mark.parametrize(
    "broken, message",
    [
        (dict(name="no name"), "not an identifier"),
        (dict(group="context"), "not a group name"),
        (dict(inputs=[np.mean]), "tuple of Indicator"),
        (dict(normalise=None), "normalise must be callable"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=None), "warmup"),
    ],
)
def test_an_entry_without_one_of_its_parts_is_refused(broken: dict, message: str) -> None:
    parts = dict(name="toy", group="returns", inputs=(), normalise=lambda bars: bars.close, warmup=0)
    with pytest.raises(ValueError, match=message):
        Feature(**{**parts, **broken})
    with pytest.raises(TypeError):
        Feature("toy", "returns", (), lambda bars: bars.close)  # no warm-up given
    with pytest.raises(ValueError, match="unique"):
        REGISTRY.with_features(Feature(**{**parts, "name": "rsi_14"}))
    with pytest.raises(ValueError, match="clash"):
        REGISTRY.with_features(Feature(**{**parts, "group": "levels"}))


@pytest.fixture(scope="module")
def bars() -> Bars:
    return bars_of(real_candles("BTCUSDT", "1h", 3000))


@pytest.mark.parametrize("feature", REGISTRY.features, ids=lambda f: f.name)
def test_the_warm_up_is_the_columns_leading_nan_rows(feature: Feature, bars: Bars) -> None:
    column = bar_values(bars, [feature])[feature.name]
    assert np.isnan(column[: feature.warmup]).all()
    assert np.isfinite(column[feature.warmup])


@pytest.mark.parametrize("feature", REGISTRY.features, ids=lambda f: f.name)
@pytest.mark.parametrize("new", [1, 7])
def test_the_incremental_parts_equal_the_batch_ones(feature: Feature, new: int, bars: Bars) -> None:
    """From the first row the incremental builder resumes at (past the warm-up) and later, for one or several
    new rows, states carried over two resumes."""
    plan = FeaturePlan.of([feature])
    whole = plan.values(bars, plan.batch(bars))[feature.name]
    for begin in (feature.warmup + 1, 64, 2000):
        states = plan.start(bars_of_rows(bars, begin))
        for first in (begin, begin + new):
            end = first + new
            series, states = plan.resume(bars_of_rows(bars, end), first, states)
            got = plan.values(bars_of_rows(bars, end).rows(first), series)[feature.name]
            assert got.shape == (new,)
            assert np.array_equal(got.view(np.int64), whole[first:end].view(np.int64)), (begin, first)


def bars_of_rows(bars: Bars, end: int) -> Bars:
    return Bars(*(values[:end] for values in bars))


# ----------------------------------------------------------------------------------------------- a new entry


@dataclass(frozen=True)
class RunningHigh(Indicator):
    """A toy indicator with a state: the highest close so far (a sequential accumulate, so resumed to the bit)."""

    def batch(self, bars: Bars) -> np.ndarray:
        return np.maximum.accumulate(bars.close)

    def start(self, bars: Bars) -> float:
        return float(np.max(bars.close))

    def resume(self, bars: Bars, begin: int, state: float) -> tuple[np.ndarray, float]:
        values = np.maximum.accumulate(np.concatenate([[state], bars.close[begin:]]))[1:]
        return values, float(values[-1])


TOY = Feature("toy_drawdown", "returns", (RunningHigh(),), lambda bars, high: bars.close / high - 1.0, warmup=0,
              context=True)


def test_a_feature_added_only_to_the_registry_is_in_both_builders_alike() -> None:
    base = load_project_config(ROOT / "conf/base.yaml").table_spec
    features = FeaturesConfig.model_validate({**base.features.model_dump(), "set": "toy",
                                              "sets": {"toy": ["returns", "level_distance", "context"]}})
    plain = TableSpec(base.timeframe, base.levels, base.labels, features)
    spec = TableSpec(base.timeframe, base.levels, base.labels, features, REGISTRY.with_features(TOY))
    added = {"toy_drawdown", "ctx_4h_toy_drawdown", "ctx_1d_toy_drawdown"}
    assert added <= set(spec.columns) and not added & set(plain.columns)
    assert set(spec.columns) - added == set(plain.columns)
    assert feature_columns(features, Timeframe.H1) == plain.columns  # the default registry is untouched

    frames = cut_frames(spec.read_frames(CandleFolder.open(SAMPLE), "ETHUSDT"),
                        int(pd.Timestamp("2021-06-01", tz="UTC").value))
    ends = utc_ns(frames[spec.timeframe]["timestamp"])[-14:] + spec.timeframe.nanoseconds  # 3 4h closes, a 1d
    builder = TableBuilder(spec, 48)
    for until in ends:
        cut = cut_frames(frames, int(until))
        table = builder.update(cut)
        _, full = spec.build(cut)
        pd.testing.assert_frame_equal(table, full.iloc[-48:], check_exact=True)
        assert np.array_equal(table.filter(like=FEATURE_PREFIX).to_numpy().view(np.int64),
                              full.iloc[-48:].filter(like=FEATURE_PREFIX).to_numpy().view(np.int64))
    assert builder.rebuilds == 1
    close = frames[spec.timeframe]["close"].to_numpy()
    expected = close / np.maximum.accumulate(close) - 1.0
    assert np.array_equal(table[FEATURE_PREFIX + "toy_drawdown"].to_numpy(), expected[-48:])
    assert np.isfinite(table[FEATURE_PREFIX + "ctx_1d_toy_drawdown"]).all()
    _, plain_table = plain.build(cut)
    pd.testing.assert_frame_equal(full[plain_table.columns], plain_table, check_exact=True)  # nothing else moved


def test_a_spec_pickles_with_the_default_registry_by_reference() -> None:
    spec = load_project_config(ROOT / "conf/base.yaml").table_spec
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.registry is REGISTRY
    toy = FeatureRegistry((TOY,))  # another registry pickles as its entries (lambdas do not: tests only)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(toy)
