"""A searchable model key given a value is honoured: taken out of the search, and every trial and the final
model use it (README "Dataset and model"); nothing the user writes is silently overwritten. The demo's search
counts trials, not seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

import pricelevel.ml.fit as fit_module
from pricelevel.config import load_config
from pricelevel.ml.config import SEARCHABLE_MODEL_KEYS, ModelConfig, SearchSpace, TuningConfig
from pricelevel.ml.dataset import SymbolFrame, TrainingData, build_training_data
from pricelevel.ml.fit import TrainResult
from pricelevel.ml.model import MultiSymbolLSTM
from pricelevel.ml.tuning import SEARCHED, fit_objective, open_study, run_study

ROOT = Path(__file__).resolve().parents[1]
BASE, QUICK = ROOT / "conf" / "base.yaml", ROOT / "conf" / "quick.yaml"
SPACE = SearchSpace(hidden_size=(4, 8), num_layers=(1, 2), dropout=(0.0, 0.3), learning_rate=(1e-3, 1e-2),
                    batch_size=(32, 64), seq_len=(4, 6))
#: A value for each searchable key that the space above cannot suggest, as ``--set`` would give it.
GIVEN = {"hidden_size": "7", "num_layers": "3", "dropout": "0.45", "learning_rate": "0.05", "batch_size": "16"}


def _model(**fixed: Any) -> ModelConfig:
    return ModelConfig(embedding_dim=2, max_epochs=1, patience=1, accelerator="cpu", precision="32-true", num_threads=1,
                       **fixed)


def _tuning(tmp_path: Path, n_trials: int = 3) -> TuningConfig:
    return TuningConfig(n_trials=n_trials, max_epochs=1, timeout_s=None, seed=3, space=SPACE,
                        storage=f"sqlite:///{tmp_path / 'study.db'}")


@pytest.fixture(scope="module")
def data_for():
    rng = np.random.default_rng(0)
    stamps = pd.date_range("2024-01-01", periods=200, freq="1h", tz="UTC")
    frames = [SymbolFrame(s, stamps, rng.normal(size=(200, 2)).astype(np.float32),
                          (rng.random(200) < 0.3).astype(np.float32)) for s in ("AAAUSDT", "BBBUSDT")]
    cache: dict[int, TrainingData] = {}
    return lambda seq_len: cache.setdefault(seq_len, build_training_data(frames, seq_len, 0.2, 0.2, embargo=7))


@pytest.fixture
def fits(monkeypatch) -> list[dict[str, Any]]:
    """Every fit's model config and module, the fit itself replaced (what is fitted, not how well)."""
    seen: list[dict[str, Any]] = []

    def fake_fit(train, val, module, config, **kwargs):
        seen.append({"config": config, "module": module, "seq_len": train.seq_len})
        return TrainResult(module=MultiSymbolLSTM(n_features=2, n_symbols=2, hidden_size=2, num_layers=1),
                           best_score=0.1 * len(seen), best_epoch=0, epochs_run=1, history=[],
                           checkpoint_path=Path("best.ckpt"), train_samples_per_second=0.0, device="cpu")

    monkeypatch.setattr(fit_module, "fit_model", fake_fit)
    return seen


@pytest.mark.parametrize("key", SEARCHABLE_MODEL_KEYS)
def test_a_searched_key_given_explicitly_is_fixed_and_left_out_of_the_search(
    tmp_path: Path, data_for, fits, key: str
) -> None:
    """``--set model.<key>=v``: every trial fits with v, Optuna never searches the key, the best parameters (what
    the final model trains with) carry v, and the study's log line says it was fixed."""
    config = load_config(BASE, overrides=[f"model.{key}={GIVEN[key]}"])
    value = getattr(config.model, key)
    assert value == yaml.safe_load(GIVEN[key]) and config.model.fixed_params() == {key: value}
    model = _model(**config.model.fixed_params())
    tuning = _tuning(tmp_path)
    study = open_study(tuning.storage, f"fixed-{key}", tuning)
    summary = run_study(study, fit_objective(data_for, model, tuning), tuning, tmp_path / "work",
                        fixed=model.fixed_params())

    assert len(fits) == tuning.n_trials == summary.trials_complete
    for fit, trial in zip(fits, study.trials, strict=True):
        assert getattr(fit["config"], key) == value  # honoured in every trial's fit
        assert key not in trial.params and set(trial.params) == set(SEARCHED) - {key}  # not searched
        for other in set(SEARCHABLE_MODEL_KEYS) - {key}:
            assert getattr(fit["config"], other) == trial.params[other]  # the rest are searched
    if key == "hidden_size":
        assert all(fit["module"].hparams.hidden_size == value for fit in fits)
    assert summary.best_params[key] == value and summary.fixed == {key: value}
    assert f"fixed by model: {key}={value} (not searched)" in summary.describe()


def test_nothing_given_is_silently_dropped(tmp_path: Path, data_for, fits) -> None:
    """base.yaml leaves every searchable key to the search; each one a user sets is fixed (never dropped); and a
    study run without the fixed keys refuses to overwrite them with one line instead of ignoring them."""
    base = load_config(BASE)
    assert base.model.fixed_params() == {} and set(base.model.unset_params()) == set(SEARCHABLE_MODEL_KEYS)
    everything = load_config(BASE, overrides=[f"model.{k}={v}" for k, v in GIVEN.items()]).model
    assert everything.fixed_params() == {k: yaml.safe_load(v) for k, v in GIVEN.items()} and not everything.unset_params()

    model = _model(hidden_size=7)  # 7 is not in SPACE.hidden_size
    tuning = _tuning(tmp_path, n_trials=1)
    study = open_study(tuning.storage, "not-told", tuning)
    with pytest.raises(ValueError, match=r"model\.hidden_size=7 is fixed by the configuration but the trial searched") as err:
        run_study(study, fit_objective(data_for, model, tuning), tuning, tmp_path / "work")  # fixed=... forgotten
    assert "\n" not in str(err.value) and not fits


def test_quick_yaml_has_no_dead_model_keys() -> None:
    """The demo's model keys mean what they say: each is fixed (and in the fitted model), and its search space
    lists no entry for a key it fixes (an entry nobody reads)."""
    quick = load_config(BASE, QUICK)
    written = yaml.safe_load(QUICK.read_text())
    fixed = quick.model.fixed_params()
    assert fixed == {k: v for k, v in written["model"].items() if k in SEARCHABLE_MODEL_KEYS}
    assert fixed.keys() == {"hidden_size", "num_layers", "dropout", "batch_size"}
    assert not set(written["tuning"].get("space", {})) & set(fixed)


def test_the_demo_search_counts_trials_not_seconds() -> None:
    """A loaded machine must run the same demo trials as an idle one: no time limit on the demo's search (a
    user may still set one)."""
    quick = load_config(BASE, QUICK)
    assert quick.tuning.timeout_s is None and quick.tuning.n_trials >= 1
    assert load_config(BASE, QUICK, ["tuning.timeout_s=600"]).tuning.timeout_s == 600
