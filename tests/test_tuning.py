"""The Optuna study end to end on a tiny learnable dataset: trials run, are counted, resume from storage, and
each trial's fit carries the pruning callback; ``with_params`` replaces only the searched model keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

import pricelevel.ml.fit as fit_module
from pricelevel.ml.config import ModelConfig, SearchSpace, TuningConfig
from pricelevel.ml.dataset import SymbolFrame, TrainingData, build_training_data
from pricelevel.ml.fit import TrainResult, with_params
from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.tuning import SEARCHED, fit_objective, open_study, run_study

SEQ_LENS = (4, 6)
SPACE = SearchSpace(
    hidden_size=(4,), num_layers=(1, 1), dropout=(0.0, 0.3), learning_rate=(1e-3, 1e-2), batch_size=(32,),
    seq_len=SEQ_LENS,
)
MODEL = ModelConfig(
    hidden_size=4, num_layers=1, embedding_dim=2, batch_size=32, max_epochs=1, patience=1, accelerator="cpu",
    precision="32-true", num_threads=1, limit_train_batches=4, limit_val_batches=2,
)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _frames(n: int = 400) -> list[SymbolFrame]:
    """Target: the window's last bar has a large first feature (learnable from the window)."""
    frames = []
    for seed, symbol in enumerate(("AAAUSDT", "BBBUSDT")):
        rng = np.random.default_rng(seed)
        features = rng.normal(size=(n, 2)).astype(np.float32)
        target = (features[:, 0] > 0.5).astype(np.float32)
        stamps = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC")
        frames.append(SymbolFrame(symbol, stamps, features, target))
    return frames


@pytest.fixture(scope="module")
def data_for():
    frames = _frames()
    cache: dict[int, TrainingData] = {}
    asked: list[int] = []

    def get(seq_len: int) -> TrainingData:
        asked.append(seq_len)
        if seq_len not in cache:
            cache[seq_len] = build_training_data(frames, seq_len, 0.2, 0.2, embargo=max(SEQ_LENS) + 1)
        return cache[seq_len]

    get.asked = asked
    return get


class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self.calls.append(("start", number, dict(params)))

    def epoch_ended(self, number: int, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch", number, epoch, dict(metrics)))

    def trial_ended(self, number: int, state: str, value: float | None) -> None:
        self.calls.append(("end", number, state, value))

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


def _tuning(tmp_path: Path, **overrides: Any) -> TuningConfig:
    values = {"n_trials": 2, "max_epochs": 1, "timeout_s": None, "storage": f"sqlite:///{tmp_path / 'optuna' / 'study.db'}",
              "seed": 7, "space": SPACE}
    return TuningConfig(**(values | overrides))


def _in_space(params: dict[str, Any]) -> None:
    assert set(params) == set(SEARCHED)
    assert params["hidden_size"] in SPACE.hidden_size and params["batch_size"] in SPACE.batch_size
    assert params["seq_len"] in SPACE.seq_len
    assert SPACE.num_layers[0] <= params["num_layers"] <= SPACE.num_layers[1]
    assert SPACE.dropout[0] <= params["dropout"] <= SPACE.dropout[1]
    assert SPACE.learning_rate[0] <= params["learning_rate"] <= SPACE.learning_rate[1]


def test_a_study_runs_counts_and_resumes(tmp_path: Path, data_for) -> None:
    data_for.asked.clear()
    tuning = _tuning(tmp_path)
    work = tmp_path / "work"
    observer = Observer()
    study = open_study(tuning.storage, "tiny", tuning)
    summary = run_study(study, fit_objective(data_for, MODEL, tuning), tuning, work, observer)

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 and summary.trials_run_now == 2
    states = [t.state for t in trials]
    assert summary.trials_complete == states.count(TrialState.COMPLETE) >= 1
    assert summary.trials_pruned == states.count(TrialState.PRUNED)
    assert summary.trials_complete + summary.trials_pruned == 2
    assert summary.metric == "val_pr_auc" and summary.direction == "maximize"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert summary.best_value == max(t.value for t in complete)
    assert 0.0 <= summary.best_value <= 1.0
    assert summary.best_trial == study.best_trial.number and summary.best_params == study.best_trial.params
    _in_space(summary.best_params)
    for t in trials:
        _in_space(t.params)
    # every trial's one epoch was reported to Optuna: the pruning callback is in the real fit
    assert [row["epochs"] for row in summary.trials] == [1, 1]
    for t in complete:
        assert t.intermediate_values[0] == pytest.approx(t.value, rel=1e-6)
    assert sorted(set(data_for.asked)) == sorted({t.params["seq_len"] for t in trials})

    # observer: start, one epoch, end for each trial, in that order
    for t in trials:
        mine = [c for c in observer.calls if c[1] == t.number]
        assert [c[0] for c in mine] == ["start", "epoch", "end"]
        assert mine[0][2] == t.params
        assert mine[1][2] == 0 and {"val_pr_auc", "val_loss", "train_loss"} <= set(mine[1][3])
        assert mine[1][3]["val_pr_auc"] == pytest.approx(t.intermediate_values[0], rel=1e-6)
        expected_state = "complete" if t.state == TrialState.COMPLETE else "pruned"
        assert mine[2][2] == expected_state
        assert (mine[2][3] == pytest.approx(t.value)) if t.value is not None else mine[2][3] is None
    assert not list(work.glob("trial-*"))  # checkpoints of trials are removed

    # Resume: the same study, nothing left to run.
    again_observer = Observer()
    again = run_study(open_study(tuning.storage, "tiny", tuning), fit_objective(data_for, MODEL, tuning), tuning, work, again_observer)
    assert again.trials_run_now == 0 and again_observer.calls == []
    assert again.best_value == summary.best_value and again.best_params == summary.best_params
    assert again.trials_complete == summary.trials_complete

    # One more trial wanted: exactly one more runs.
    more = tuning.model_copy(update={"n_trials": 3})
    third_observer = Observer()
    third = run_study(open_study(tuning.storage, "tiny", more), fit_objective(data_for, MODEL, more), more, work, third_observer)
    assert third.trials_run_now == 1 and len(third.trials) == 3
    assert [c[1] for c in third_observer.of("start")] == [2]
    assert third.best_value >= summary.best_value
    assert third.trials_complete + third.trials_pruned == 3


# --------------------------------------------------------------------------------------- fit replaced


def _fake_result(score: float) -> TrainResult:
    return TrainResult(
        module=MultiSymbolLSTM(n_features=2, n_symbols=2, hidden_size=2, num_layers=1), best_score=score,
        best_epoch=0, epochs_run=1, history=[], checkpoint_path=Path("best.ckpt"), train_samples_per_second=0.0,
        device="cpu",
    )


def test_each_trial_fit_gets_a_pruning_callback_for_its_own_trial(tmp_path: Path, data_for, monkeypatch) -> None:
    seen: list[dict[str, Any]] = []

    def fake_fit(train, val, module, config, **kwargs):
        seen.append({"train": train, "module": module, "config": config, **kwargs})
        assert Path(kwargs["checkpoint_dir"]).parent == tmp_path / "work"
        return _fake_result(0.1 * len(seen))

    monkeypatch.setattr(fit_module, "fit_model", fake_fit)
    tuning = _tuning(tmp_path, n_trials=3)
    study = open_study(tuning.storage, "fake", tuning)
    summary = run_study(study, fit_objective(data_for, MODEL, tuning), tuning, tmp_path / "work")
    assert len(seen) == 3 and summary.trials_complete == 3
    assert summary.best_value == pytest.approx(0.3) and summary.best_trial == 2
    for number, call in enumerate(seen):
        callbacks = call["extra_callbacks"]
        assert len(callbacks) == 1 and isinstance(callbacks[0], PyTorchLightningPruningCallback)
        assert callbacks[0].monitor == tuning.metric
        assert callbacks[0]._trial.number == number
        assert call["monitor"] == "val_pr_auc" and call["direction"] == "maximize"
        assert call["max_epochs"] == tuning.max_epochs
        assert call["checkpoint_dir"].name == f"trial-{number}"
        params = study.trials[number].params
        assert call["train"].seq_len == params["seq_len"]
        assert call["config"].learning_rate == params["learning_rate"]
        assert call["config"].dropout == params["dropout"]
        assert call["module"].hparams.hidden_size == params["hidden_size"]


def test_a_pruned_trial_is_counted_and_reported(tmp_path: Path, data_for, monkeypatch) -> None:
    calls = iter([_fake_result(0.4), optuna.TrialPruned("pruned at epoch 0"), _fake_result(0.2)])

    def fake_fit(*args, **kwargs):
        outcome = next(calls)
        if isinstance(outcome, Exception):
            Path(kwargs["checkpoint_dir"]).mkdir(parents=True)
            raise outcome
        return outcome

    monkeypatch.setattr(fit_module, "fit_model", fake_fit)
    tuning = _tuning(tmp_path, n_trials=3)
    observer = Observer()
    summary = run_study(open_study(tuning.storage, "pruned", tuning), fit_objective(data_for, MODEL, tuning), tuning, tmp_path / "w", observer)
    assert summary.trials_complete == 2 and summary.trials_pruned == 1 and summary.trials_run_now == 3
    assert [row["state"] for row in summary.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert summary.best_value == pytest.approx(0.4) and summary.best_trial == 0
    assert observer.of("end") == [("end", 0, "complete", 0.4), ("end", 1, "pruned", None), ("end", 2, "complete", 0.2)]
    assert not (tmp_path / "w" / "trial-1").exists()


def test_a_failing_fit_is_reported_and_does_not_count_as_finished(tmp_path: Path, data_for, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fit_module, "fit_model", broken)
    tuning = _tuning(tmp_path, n_trials=1)
    observer = Observer()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_study(open_study(tuning.storage, "fails", tuning), fit_objective(data_for, MODEL, tuning), tuning, tmp_path / "w", observer)
    assert observer.of("end") == [("end", 0, "fail", None)]

    monkeypatch.setattr(fit_module, "fit_model", lambda *a, **k: _fake_result(0.5))
    summary = run_study(open_study(tuning.storage, "fails", tuning), fit_objective(data_for, MODEL, tuning), tuning, tmp_path / "w")
    assert summary.trials_run_now == 1 and summary.trials_complete == 1 and len(summary.trials) == 2
    assert summary.trials[0]["state"] == "FAIL"


def test_a_study_where_every_trial_was_pruned_says_so(tmp_path: Path, data_for, monkeypatch) -> None:
    def pruned(*args, **kwargs):
        raise optuna.TrialPruned()

    monkeypatch.setattr(fit_module, "fit_model", pruned)
    tuning = _tuning(tmp_path)
    with pytest.raises(RuntimeError, match="no trial completed"):
        run_study(open_study(tuning.storage, "all-pruned", tuning), fit_objective(data_for, MODEL, tuning), tuning, tmp_path / "w")


# --------------------------------------------------------------------------------------- params


def test_with_params_replaces_only_the_searched_model_keys() -> None:
    base = ModelConfig(hidden_size=128, weight_decay=0.05, seed=3, batch_size=256)
    params = {"hidden_size": 16, "num_layers": 2, "dropout": 0.1, "learning_rate": 0.005, "batch_size": 64,
              "seq_len": 24}
    model = with_params(base, params)
    assert (model.hidden_size, model.num_layers, model.dropout, model.learning_rate, model.batch_size) == (
        16, 2, 0.1, 0.005, 64
    )
    assert model.weight_decay == 0.05 and model.seed == 3 and model.max_epochs == base.max_epochs
    assert "seq_len" not in ModelConfig.model_fields and not hasattr(model, "seq_len")
    assert base.hidden_size == 128  # the original is untouched
    assert with_params(base, {"seq_len": 40}) == base


def test_trial_workers_sharing_a_study_sample_different_parameters(tmp_path: Path) -> None:
    """Seen on the cluster: two trial workers seeded alike drew the same parameters, so one trial was wasted."""
    tuning = _tuning(tmp_path)
    first = open_study(tuning.storage, "shared", tuning, worker=0).ask()
    second = open_study(tuning.storage, "shared", tuning, worker=1).ask()  # asks while the first is still running
    assert first.params == {} and second.params == {}  # nothing suggested yet: draw the same way from each
    drawn = [trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True) for trial in (first, second)]
    assert drawn[0] != drawn[1]
    alone = open_study(tuning.storage, "alone", tuning).ask()  # one worker keeps the configured seed's draws
    assert alone.suggest_float("learning_rate", 1e-4, 1e-2, log=True) == drawn[0]
