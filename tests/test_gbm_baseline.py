"""The LightGBM baseline (:mod:`pricelevel.ml.gbm`): it reads only bars inside the LSTM's windows, learns a
learnable label and beats chance, is deterministic, and runs in the training flow with its metrics in MLflow
and its rows in the walk-forward report (that part in tests/test_flow_train.py, on its trained project)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pricelevel.ml.dataset import SymbolFrame, build_training_data
from pricelevel.ml.gbm import GbmConfig, fit_booster, flatten, predict, window_lags

SEQ_LEN = 8


def _frames(n: int = 2500, learnable: bool = True, seed: int = 0) -> list[SymbolFrame]:
    """Two symbols, four noise features; the target of bar t is ``f0[t] + f1[t-2] > 0.6`` plus a little noise
    (both inside a window of 8 bars), or a coin flip when not ``learnable``."""
    rng = np.random.default_rng(seed)
    frames = []
    for symbol in ("AAAUSDT", "BBBUSDT"):
        stamps = pd.date_range("2022-01-01", periods=n, freq="4h", tz="UTC")
        features = rng.normal(size=(n, 4)).astype(np.float32)
        features[:5] = np.nan  # warm-up rows: never in a window
        score = features[:, 0] + np.roll(features[:, 1], 2) + 0.3 * rng.normal(size=n)
        target = (score > 0.6).astype(np.float32) if learnable else (rng.random(n) < 0.3).astype(np.float32)
        target[-3:] = np.nan
        frames.append(SymbolFrame(symbol, stamps, features, target))
    return frames


def _data(learnable: bool = True):
    return build_training_data(_frames(learnable=learnable), SEQ_LEN, val_frac=0.2, test_frac=0.2, embargo=SEQ_LEN + 3)


FAST = GbmConfig(n_estimators=120, early_stopping_rounds=20, num_threads=1)


def test_a_flattened_row_is_the_windows_bars_at_the_lags_and_never_outside_the_window():
    data = _data()
    windows = data.test
    assert window_lags((0, 1, 4, 8, 50), SEQ_LEN) == (0, 1, 4)  # 8 and 50 bars back lie outside a window of 8
    rows = flatten(windows, (0, 1, 4, 8, 50))
    assert rows.shape == (len(windows), 3 * windows.n_features + 1)
    for i in (0, len(windows) // 2, len(windows) - 1):
        window, symbol_id, _ = windows[i]
        window = window.numpy()
        expected = np.concatenate([window[-1], window[-2], window[-5], [float(symbol_id)]])
        np.testing.assert_array_equal(rows[i], expected.astype(np.float32))
    assert np.isfinite(rows).all()
    with pytest.raises(ValueError, match="inside a window"):
        window_lags((8,), SEQ_LEN)


def test_it_learns_a_learnable_label_and_beats_chance_on_unseen_bars():
    data = _data()
    booster = fit_booster(data, FAST)
    target = data.test.targets()
    probability = predict(booster, data.test, FAST.lags)
    base_rate = float(target.mean())
    assert 0.1 < base_rate < 0.5
    assert roc_auc_score(target, probability) > 0.85
    assert average_precision_score(target, probability) > base_rate + 0.3


def test_on_a_coin_flip_label_it_does_not_pretend():
    """The same fit on an unlearnable label ranks the unseen bars at chance: the score above is the label's."""
    data = _data(learnable=False)
    probability = predict(fit_booster(data, FAST), data.test, FAST.lags)
    assert abs(roc_auc_score(data.test.targets(), probability) - 0.5) < 0.06


def test_two_fits_are_identical():
    data = _data()
    first = predict(fit_booster(data, FAST), data.test, FAST.lags)
    second = predict(fit_booster(data, FAST), data.test, FAST.lags)
    np.testing.assert_array_equal(first, second)


# ------------------------------------------------------------------------------ in the promotion gate


def test_the_gate_reports_lightgbm_and_blocks_on_it_only_when_gbm_is_in_the_hurdle():
    from pricelevel.registry.config import PromotionConfig
    from pricelevel.registry.model_baseline import gbm_markdown, versus_gbm, window_hurdle
    from pricelevel.registry.promotion import Decision

    assert "gbm" not in PromotionConfig().hurdle  # reported, not blocking, by default
    hurdle = PromotionConfig(hurdle=("cash", "level_rule", "gbm")).hurdle
    assert window_hurdle(hurdle) == ("cash", "level_rule")
    promoted = Decision(True, "beats every baseline", {})
    worse = {"wf_mean_model_sharpe": 0.4, "gbm_wf_mean_sharpe": 0.9, "wf_mean_model_pr_auc": 0.5, "gbm_wf_mean_pr_auc": 0.55}

    reported = versus_gbm(promoted, ("cash",), worse, "sharpe")
    assert reported.promote and reported.details["gbm.gbm.sharpe"] == 0.9 and reported.details["gbm.lstm.sharpe"] == 0.4
    table = "\n".join(gbm_markdown(reported.details, "sharpe"))
    assert "| LightGBM | 0.900 | 0.550 | - |" in table and "reported only" in table

    blocked = versus_gbm(promoted, hurdle, worse, "sharpe")
    assert not blocked.promote and "does not beat LightGBM 0.90" in blocked.reason
    better = versus_gbm(promoted, hurdle, {**worse, "wf_mean_model_sharpe": 1.2}, "sharpe")
    assert better.promote and "beats LightGBM" in better.reason
    assert not versus_gbm(promoted, hurdle, {}, "sharpe").promote  # not measured: refused, never skipped
    rejected = Decision(False, "does not beat cash", {})
    assert not versus_gbm(rejected, hurdle, {**worse, "wf_mean_model_sharpe": 1.2}, "sharpe").promote
