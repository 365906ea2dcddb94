"""The training budget: the sizing is a pure function checked on hand-computed cases; the demo (no budget) runs
the same trials and epochs whatever the measured speed; a decision is kept per inputs; the calibration times
the real training loop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pricelevel.config import load_config
from pricelevel.core.cache import DerivedStore
from pricelevel.ml.budget import (
    FoldSize,
    RunSizes,
    SizingDecision,
    Throughput,
    budget_step,
    calibration_params,
    configured_sizes,
    estimate_seconds,
    fit_seconds,
    floor_sizes,
    measure_throughput,
    size_run,
    sized_sections,
)
from pricelevel.ml.config import ModelConfig, SearchSpace, TrainingConfig, TuningConfig
from pricelevel.ml.dataset import SymbolFrame, build_training_data

ROOT = Path(__file__).resolve().parents[1]
BASE, QUICK = ROOT / "conf" / "base.yaml", ROOT / "conf" / "quick.yaml"
FLOORS = RunSizes(n_trials=2, trial_epochs=2, folds=1, final_epochs=2)


def rate(train: float, scoring: float | None = None) -> Throughput:
    return Throughput(train, scoring if scoring is not None else train, "test")


# --- the cost model, by hand --------------------------------------------------------------------------------

def test_a_fit_costs_its_epochs_of_train_and_validation_then_one_scoring_of_validation_and_test() -> None:
    fold = FoldSize(train_windows=600, val_windows=100, test_windows=100)
    # epoch: 600/100 + 100/200 = 6.5 s; scoring: 200/200 = 1 s
    assert fit_seconds(fold, 2, rate(100, 200)) == pytest.approx(2 * 6.5 + 1)
    # two folds, 2 trials x 2 epochs + a final fit of 4: fold 0 2*14 + 27 = 55; fold 1 (900 train) 2*20 + 39 = 79
    folds = [fold, FoldSize(900, 100, 100)]
    assert estimate_seconds(RunSizes(2, 2, 2, 4), folds, rate(100, 200)) == pytest.approx(134)
    # one fold: the newest
    assert estimate_seconds(RunSizes(2, 2, 1, 4), folds, rate(100, 200)) == pytest.approx(79)


# --- the sizing, by hand ------------------------------------------------------------------------------------

ONE_FOLD = [FoldSize(1000, 0, 0)]  # 10 s an epoch at 100 windows/s
CEILING = RunSizes(n_trials=4, trial_epochs=4, folds=1, final_epochs=8)  # 4*4*10 + 8*10 = 240 s


def test_a_budget_the_configured_sizes_fit_keeps_them() -> None:
    decision = size_run(rate(100), 240 / 3600, CEILING, ONE_FOLD, FLOORS)
    assert decision.sizes == CEILING and decision.fits
    assert decision.estimated_s == pytest.approx(240) and decision.epoch_minutes == pytest.approx(10 / 60)


def test_a_smaller_budget_halves_final_then_trial_epochs_then_trials_and_spends_the_rest_on_trials() -> None:
    # final 8 -> 4: 160 + 40 = 200 > 100; trial epochs 4 -> 2: 80 + 40 = 120 > 100; trials 4 -> 2: 40 + 40 = 80
    # fits; then trials as far as the budget goes: (100 - 40) // 20 = 3 -> 60 + 40 = 100.
    decision = size_run(rate(100), 100 / 3600, CEILING, ONE_FOLD, FLOORS)
    assert decision.sizes == RunSizes(n_trials=3, trial_epochs=2, folds=1, final_epochs=4)
    assert decision.estimated_s == pytest.approx(100) and decision.fits
    assert decision.configured_estimate_s == pytest.approx(240)


def test_folds_go_last_and_the_ones_kept_are_the_newest() -> None:
    folds = [FoldSize(600, 100, 100), FoldSize(900, 100, 100)]
    configured = RunSizes(n_trials=2, trial_epochs=2, folds=2, final_epochs=4)  # 134 s (above)
    # final 4 -> 2: fold 0 2*14 + 14 = 42, fold 1 2*20 + 20 = 60: 102 > 60; trial epochs and trials are at their
    # floors; folds 2 -> 1 (the newest): 60 <= 60. Trials: (60 - 20) // 20 = 2, no more than configured.
    decision = size_run(rate(100, 200), 60 / 3600, configured, folds, FLOORS)
    assert decision.sizes == RunSizes(n_trials=2, trial_epochs=2, folds=1, final_epochs=2)
    assert decision.estimated_s == pytest.approx(60) and decision.fits


def test_a_budget_below_the_least_run_runs_the_least_and_says_it_is_over() -> None:
    folds = [FoldSize(600, 100, 100), FoldSize(900, 100, 100)]
    decision = size_run(rate(100, 200), 30 / 3600, RunSizes(2, 2, 2, 4), folds, FLOORS)
    assert decision.sizes == FLOORS and not decision.fits and decision.estimated_s == pytest.approx(60)
    assert "OVER" in decision.describe()


def test_floors_above_the_configured_sizes_never_raise_them() -> None:
    decision = size_run(rate(1), 1 / 3600, RunSizes(1, 1, 1, 1), ONE_FOLD, RunSizes(5, 5, 5, 5))
    assert decision.sizes == RunSizes(1, 1, 1, 1)


def test_the_log_block_names_speed_epoch_minutes_sizes_and_budget() -> None:
    text = size_run(rate(100), 100 / 3600, CEILING, ONE_FOLD, FLOORS).describe()
    for part in ("100 training windows/s", "0.2 min", "3 trials x 1 folds x 2 epochs", "estimated 1.7 min",
                 "within the budget of 2 min", "configured: 4 trials x 1 folds x 4 epochs"):
        assert part in text, (part, text)


# --- the nightly and the demo -------------------------------------------------------------------------------

def _base_folds() -> list[FoldSize]:
    """Roughly base.yaml's 1h folds on the 10 bundled symbols (train grows by the test share each fold)."""
    return [FoldSize(150_000, 45_000, 45_000), FoldSize(195_000, 45_000, 45_000), FoldSize(240_000, 45_000, 45_000)]


def _sizes(config, speed: float) -> RunSizes:
    decision = size_run(rate(speed, 3 * speed), config.training.budget_hours,
                        configured_sizes(config.model, config.tuning, config.evaluation), _base_folds()[-config.evaluation.folds:],
                        floor_sizes(config.training))
    return decision.sizes


def test_the_nightly_is_sized_by_the_measured_speed_and_a_fast_machine_runs_the_configured_search() -> None:
    base = load_config(BASE)
    assert base.training.budget_hours == 3
    configured = configured_sizes(base.model, base.tuning, base.evaluation)
    assert _sizes(base, 1e7) == configured == RunSizes(20, 10, 3, 30)  # a GPU-fast machine: the GPU-sized search
    slow = _sizes(base, 220)
    assert slow != configured and slow.n_trials < 20 and slow.final_epochs < 30


def test_the_demo_runs_the_same_trials_and_epochs_at_any_measured_speed(tmp_path: Path) -> None:
    quick = load_config(BASE, QUICK)
    assert quick.training.budget_hours is None
    configured = configured_sizes(quick.model, quick.tuning, quick.evaluation)
    assert configured == RunSizes(n_trials=3, trial_epochs=2, folds=2, final_epochs=4)
    assert {_sizes(quick, speed) for speed in (1.0, 220.0, 1e7)} == {configured}

    def must_not_measure(plan, params):
        raise AssertionError("the demo measured the machine")

    plan = SimpleNamespace(key="k", summary={"folds": [vars(f) for f in _base_folds()[-2:]]})
    decision, measured = budget_step(plan, quick.model, quick.tuning, quick.evaluation, quick.training,
                                     DerivedStore(tmp_path), measure=must_not_measure)
    assert decision.sizes == configured and not measured and math.isnan(decision.estimated_s)
    model, tuning, evaluation = sized_sections(decision, quick.model, quick.tuning, quick.evaluation)
    assert (model, tuning, evaluation) == (quick.model, quick.tuning, quick.evaluation)  # timeout_s stays null
    assert not (tmp_path / "derived").exists()


def test_a_decision_is_kept_for_its_inputs_and_not_measured_again(tmp_path: Path) -> None:
    base = load_config(BASE)
    plan = SimpleNamespace(key="plan-1", summary={"folds": [vars(f) for f in _base_folds()]})
    calls: list[dict] = []

    def measure(plan, params) -> Throughput:
        calls.append(dict(params))
        return rate(220.0 * len(calls), 660.0)  # a second measurement would differ

    store = DerivedStore(tmp_path)
    first, measured = budget_step(plan, base.model, base.tuning, base.evaluation, base.training, store, measure)
    again, measured_again = budget_step(plan, base.model, base.tuning, base.evaluation, base.training, store, measure)
    assert measured and not measured_again and len(calls) == 1 and again == first
    assert calls[0] == {"hidden_size": 128, "num_layers": 2, "dropout": 0.25, "learning_rate": pytest.approx(1e-3),
                        "batch_size": 256, "seq_len": 80}
    model, tuning, evaluation = sized_sections(first, base.model, base.tuning, base.evaluation)
    assert (tuning.n_trials, tuning.max_epochs, evaluation.folds, model.max_epochs) == (
        first.sizes.n_trials, first.sizes.trial_epochs, first.sizes.folds, first.sizes.final_epochs)
    assert tuning.timeout_s == 3 * 3600  # the sizes bound the study; the budget only stops a runaway
    assert SizingDecision.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_calibration_uses_the_middle_of_the_space_and_the_fixed_model_keys() -> None:
    space = SearchSpace(hidden_size=(64, 128, 256), num_layers=(1, 3), batch_size=(128, 256, 512), seq_len=(40, 80, 120))
    params = calibration_params(ModelConfig(hidden_size=32, num_layers=1), space)
    assert params["hidden_size"] == 32 and params["num_layers"] == 1
    assert params["batch_size"] == 256 and params["seq_len"] == 80


def test_the_calibration_times_the_training_loop(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    frames = []
    for seed, symbol in enumerate(("AAAUSDT", "BBBUSDT")):
        rng = np.random.default_rng(seed)
        features = rng.normal(size=(600, 3)).astype(np.float32)
        stamps = pd.date_range("2024-01-01", periods=600, freq="1h", tz="UTC")
        frames.append(SymbolFrame(symbol, stamps, features, (features[:, 0] > 0.5).astype(np.float32)))
    data = build_training_data(frames, 8, 0.2, 0.2, embargo=9)
    model = ModelConfig(embedding_dim=2, accelerator="cpu", precision="32-true")
    params = {"hidden_size": 8, "num_layers": 1, "dropout": 0.0, "learning_rate": 1e-3, "batch_size": 32, "seq_len": 8}
    measured = measure_throughput(data, model, TuningConfig(), params, batches=4)
    assert measured.train_windows_per_s > 0 and measured.eval_windows_per_s > 0
    assert "cpu" in measured.device and measured.params == params
    assert TrainingConfig().budget_hours == 3.0
