"""A training run that fits its machine: time a few training batches, then size the search to a budget.

The nightly's configured sizes (``tuning.n_trials`` x ``evaluation.folds`` x ``tuning.max_epochs``, plus every
fold's final fit for ``model.max_epochs``) are a GPU-sized search; on CPU they take days. With
``training.budget_hours`` the run measures its own windows/s (:func:`measure_throughput`, the one edge here
that reads a clock) and :func:`size_run` (pure) halves the sizes in turn until the estimate fits, then spends
what is left on trials. Without a budget (``null``, the demo) nothing is measured and the configured sizes are
used as they are, so a loaded machine runs the same trials as an idle one and promotes the same model.

The estimate is an upper bound: every fit is counted at its full epochs, though early stopping and the
pruner end many sooner. The rule search after each fit is not counted (seconds against minutes of training).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from pricelevel.core.cache import DerivedStore, code_fingerprint, step_key
from pricelevel.ml.config import EvaluationConfig, ModelConfig, SearchSpace, TrainingConfig, TuningConfig
from pricelevel.ml.dataset import DatasetPlan, TrainingData
from pricelevel.ml.fit import resolve_precision, train, with_params
from pricelevel.ml.model import predict_proba

#: The knobs the budget shrinks, in the order it halves them (one per step, round-robin): the final fit's
#: epochs first (early stopping rarely needs 30), the folds last (they are what the report and the rules stand on).
SHRINK_ORDER = ("final_epochs", "trial_epochs", "n_trials", "folds")


@dataclass(frozen=True)
class Throughput:
    """What the calibration measured: training windows/s (forward, backward, step) and scoring windows/s."""

    train_windows_per_s: float
    eval_windows_per_s: float
    #: Where it ran, as printed: ``cuda (NVIDIA H100 ...)`` or ``cpu (no CUDA), 2 threads``.
    device: str = ""
    #: The model the calibration timed (the middle of the search space; fixed model keys as given).
    params: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class FoldSize:
    """Windows of one walk-forward fold's segments (oldest fold first in a plan)."""

    train_windows: int
    val_windows: int
    test_windows: int


@dataclass(frozen=True)
class RunSizes:
    n_trials: int
    trial_epochs: int
    folds: int
    final_epochs: int

    def describe(self) -> str:
        return (f"{self.n_trials} trials x {self.folds} folds x {self.trial_epochs} epochs, "
                f"final fits {self.folds} folds x {self.final_epochs} epochs")


@dataclass(frozen=True)
class SizingDecision:
    """The sizes a run uses and why: the configured ceilings, the estimate at the chosen sizes, the budget."""

    sizes: RunSizes
    configured: RunSizes
    #: Seconds of training the chosen sizes are estimated to take (NaN without a measurement).
    estimated_s: float
    #: ``None``: no budget, the configured sizes.
    budget_s: float | None
    #: Whether the estimate is within the budget (a run at its least sizes may still exceed it).
    fits: bool
    throughput: Throughput | None
    #: Minutes of one training epoch over the newest fold (train + validation), at the measured speed.
    epoch_minutes: float
    #: The estimate at the configured sizes (what the budget saved).
    configured_estimate_s: float

    def describe(self) -> str:
        """One block for the flow log."""
        if self.budget_s is None:
            return f"training budget: none (training.budget_hours: null): the configured {self.sizes.describe()}"
        t = self.throughput
        assert t is not None
        verdict = "within" if self.fits else "OVER (the least sizes, run anyway)"
        lines = [
            f"training budget {self.budget_s / 3600:g} h on {t.device}",
            f"  measured: {t.train_windows_per_s:,.0f} training windows/s, {t.eval_windows_per_s:,.0f} scoring windows/s"
            f" (model {', '.join(f'{k}={v:g}' for k, v in (t.params or {}).items())})",
            f"  one epoch of the newest fold: {self.epoch_minutes:.1f} min",
            f"  configured: {self.configured.describe()}: estimated {_hours(self.configured_estimate_s)}",
            f"  chosen:     {self.sizes.describe()}: estimated {self.estimated_s / 60:.1f} min, {verdict} the budget"
            f" of {self.budget_s / 60:.0f} min (an upper bound: early stopping and pruning end fits sooner)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SizingDecision:
        t = d["throughput"]
        return cls(
            sizes=RunSizes(**d["sizes"]), configured=RunSizes(**d["configured"]), estimated_s=d["estimated_s"],
            budget_s=d["budget_s"], fits=d["fits"], throughput=Throughput(**t) if t else None,
            epoch_minutes=d["epoch_minutes"], configured_estimate_s=d["configured_estimate_s"],
        )


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def fit_seconds(fold: FoldSize, epochs: int, rate: Throughput) -> float:
    """One fit of one fold: ``epochs`` x (train + validation pass), then scoring its validation and test."""
    epoch = fold.train_windows / rate.train_windows_per_s + fold.val_windows / rate.eval_windows_per_s
    return epochs * epoch + (fold.val_windows + fold.test_windows) / rate.eval_windows_per_s


def estimate_seconds(sizes: RunSizes, folds: Sequence[FoldSize], rate: Throughput) -> float:
    """Study plus final fits at ``sizes``, on the newest ``sizes.folds`` of ``folds`` (fewer folds are the newest
    ones: :func:`~pricelevel.ml.dataset.walk_forward_bounds` lays folds back from the end of the data)."""
    used = folds[len(folds) - sizes.folds:]
    return sum(sizes.n_trials * fit_seconds(f, sizes.trial_epochs, rate) + fit_seconds(f, sizes.final_epochs, rate)
               for f in used)


def size_run(
    rate: Throughput | None, budget_hours: float | None, configured: RunSizes, folds: Sequence[FoldSize],
    floors: RunSizes,
) -> SizingDecision:
    """The sizes that fit ``budget_hours`` at ``rate``: starting from ``configured``, halve (rounding up) one
    knob at a time in :data:`SHRINK_ORDER`, never below its floor (nor above its configured value), until the
    estimate fits; then raise ``n_trials`` as far as the budget allows (at most the configured count). Without a
    budget the configured sizes, whatever ``rate``. If even the floors do not fit, the floors (``fits`` False)."""
    if len(folds) != configured.folds:
        raise ValueError(f"{len(folds)} fold sizes for {configured.folds} configured folds")
    newest = folds[-1]
    if budget_hours is None or rate is None:
        estimate = estimate_seconds(configured, folds, rate) if rate else math.nan
        epoch = fit_seconds(newest, 1, rate) - fit_seconds(newest, 0, rate) if rate else math.nan
        return _decision(configured, configured, estimate, None, True, rate, epoch, folds)
    budget = budget_hours * 3600.0
    floor = RunSizes(**{k: min(getattr(floors, k), getattr(configured, k)) for k in SHRINK_ORDER})
    sizes = configured
    turn = 0
    while estimate_seconds(sizes, folds, rate) > budget:
        knobs = [SHRINK_ORDER[(turn + i) % len(SHRINK_ORDER)] for i in range(len(SHRINK_ORDER))]
        knob = next((k for k in knobs if getattr(sizes, k) > getattr(floor, k)), None)
        if knob is None:
            break
        turn = SHRINK_ORDER.index(knob) + 1
        sizes = replace(sizes, **{knob: max(getattr(floor, knob), math.ceil(getattr(sizes, knob) / 2))})
    used = folds[len(folds) - sizes.folds:]
    per_trial = sum(fit_seconds(f, sizes.trial_epochs, rate) for f in used)
    finals = sum(fit_seconds(f, sizes.final_epochs, rate) for f in used)
    room = math.floor((budget - finals) / per_trial) if per_trial > 0 else configured.n_trials
    sizes = replace(sizes, n_trials=max(sizes.n_trials, min(configured.n_trials, room)))
    estimate = estimate_seconds(sizes, folds, rate)
    epoch = fit_seconds(newest, 1, rate) - fit_seconds(newest, 0, rate)
    return _decision(sizes, configured, estimate, budget, estimate <= budget, rate, epoch, folds)


def _decision(sizes: RunSizes, configured: RunSizes, estimate: float, budget: float | None, fits: bool,
              rate: Throughput | None, epoch_s: float, folds: Sequence[FoldSize]) -> SizingDecision:
    configured_s = estimate_seconds(configured, folds, rate) if rate else math.nan
    return SizingDecision(sizes, configured, estimate, budget, fits, rate, epoch_s / 60, configured_s)


def configured_sizes(model: ModelConfig, tuning: TuningConfig, evaluation: EvaluationConfig) -> RunSizes:
    return RunSizes(tuning.n_trials, tuning.max_epochs, evaluation.folds, model.max_epochs)


def floor_sizes(training: TrainingConfig) -> RunSizes:
    return RunSizes(training.min_trials, training.min_epochs, training.min_folds, training.min_epochs)


def fold_sizes(plan: DatasetPlan) -> list[FoldSize]:
    """Every fold's window counts, from the plan's summary (nothing loaded)."""
    return [FoldSize(int(f["train_windows"]), int(f["val_windows"]), int(f["test_windows"]))
            for f in plan.summary["folds"]]  # type: ignore[union-attr]


def sized_sections(
    decision: SizingDecision, model: ModelConfig, tuning: TuningConfig, evaluation: EvaluationConfig,
) -> tuple[ModelConfig, TuningConfig, EvaluationConfig]:
    """The three sections at the decision's sizes. With a budget, the study's ``timeout_s`` becomes the budget
    (the sizes, not a clock, bound the study; the budget only stops a study the estimate badly undercounted),
    or ``null`` when even the least sizes are over it (they run whole)."""
    s = decision.sizes
    tuned = {"n_trials": s.n_trials, "max_epochs": s.trial_epochs}
    if decision.budget_s is not None:
        tuned["timeout_s"] = decision.budget_s if decision.fits else None
    return (model.model_copy(update={"max_epochs": s.final_epochs}), tuning.model_copy(update=tuned),
            evaluation.model_copy(update={"folds": s.folds}))


def calibration_params(model: ModelConfig, space: SearchSpace) -> dict[str, Any]:
    """The model the calibration times: the middle of each searched choice or range (a trial's cost varies
    around it with hidden_size, num_layers and seq_len), the keys ``model`` fixes as given."""
    def middle(choices: Sequence[Any]) -> Any:
        return sorted(choices)[len(choices) // 2]

    searched = {
        "hidden_size": middle(space.hidden_size), "num_layers": round(statistics.fmean(space.num_layers)),
        "dropout": statistics.fmean(space.dropout), "learning_rate": statistics.geometric_mean(space.learning_rate),
        "batch_size": middle(space.batch_size), "seq_len": middle(space.seq_len),
    }
    return searched | model.fixed_params()


def describe_device(model: ModelConfig) -> str:
    """What ``model.accelerator`` resolves to here, as the log prints it."""
    cuda = model.accelerator in ("gpu", "cuda") or (model.accelerator == "auto" and torch.cuda.is_available())
    precision = resolve_precision(model.precision, model.accelerator)
    if cuda and torch.cuda.is_available():
        return f"accelerator {model.accelerator} -> cuda ({torch.cuda.get_device_name(0)}), {precision}"
    why = "no CUDA" if model.accelerator == "auto" else "configured"
    return (f"accelerator {model.accelerator} -> {'cpu' if model.accelerator == 'auto' else model.accelerator} "
            f"({why}), {torch.get_num_threads()} torch threads, {precision}")


def measure_throughput(
    data: TrainingData, model: ModelConfig, tuning: TuningConfig, params: Mapping[str, Any], batches: int,
) -> Throughput:
    """Time ``batches`` training batches of the real training loop (one epoch capped by ``limit_train_batches``)
    and the scoring of as many validation windows, with the model ``params``."""
    probe = with_params(model, dict(params)).model_copy(
        update={"limit_train_batches": batches, "limit_val_batches": 1, "patience": 1})
    # val_loss is finite on any batch (a PR-AUC of one batch may not be): the checkpoint always has a score.
    with tempfile.TemporaryDirectory(prefix="calibration-") as tmp:
        fitted = train(data, probe, tuning.model_copy(update={"metric": "val_loss"}), 1, Path(tmp))
    module = fitted.module.to("cuda") if fitted.device == "cuda" else fitted.module
    scored = Subset(data.val, range(min(len(data.val), batches * int(probe.batch_size or 256))))
    started = time.perf_counter()
    predict_proba(module, scored)
    if fitted.device == "cuda":
        torch.cuda.synchronize()
    eval_rate = len(scored) / max(time.perf_counter() - started, 1e-9)
    return Throughput(fitted.train_samples_per_second, eval_rate, describe_device(model), dict(params))


def budget_key(plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, evaluation: EvaluationConfig,
               training: TrainingConfig) -> str:
    """A decision is kept per inputs and machine kind: a re-run with nothing new reuses it (and so every output
    after it) instead of measuring again and perhaps landing on other sizes."""
    return step_key("budget", dataset=plan.key, model=model.model_dump(mode="json"),
                    tuning=tuning.model_dump(mode="json"), evaluation=evaluation.model_dump(mode="json"),
                    training=training.model_dump(mode="json"), device=describe_device(model),
                    code=code_fingerprint(size_run))


def budget_step(
    plan: DatasetPlan, model: ModelConfig, tuning: TuningConfig, evaluation: EvaluationConfig,
    training: TrainingConfig, derived: DerivedStore,
    measure: Callable[[DatasetPlan, Mapping[str, Any]], Throughput] | None = None,
) -> tuple[SizingDecision, bool]:
    """Size the run (``plan`` built with the configured folds). No budget: the configured sizes, nothing
    measured. Else the decision kept for these inputs, or a new one from a calibration (``measure(plan,
    params)``; default :func:`measure_throughput` on the newest fold). Returns ``(decision, measured_now)``."""
    configured, floors = configured_sizes(model, tuning, evaluation), floor_sizes(training)
    folds = fold_sizes(plan)
    if training.budget_hours is None:
        return size_run(None, None, configured, folds, floors), False

    def calibrate(p: DatasetPlan, params: Mapping[str, Any]) -> Throughput:
        return measure_throughput(p.training_data(int(params["seq_len"])), model, tuning, params,
                                  training.calibration_batches)

    def write(out: Path) -> None:
        rate = (measure or calibrate)(plan, calibration_params(model, tuning.space))
        decision = size_run(rate, training.budget_hours, configured, folds, floors)
        (out / "decision.json").write_text(json.dumps(decision.to_dict(), indent=2))

    out, built = derived.build("budget", budget_key(plan, model, tuning, evaluation, training), write)
    return SizingDecision.from_dict(json.loads((out / "decision.json").read_text())), built
