"""The promotion rule: when a challenger replaces the champion. Pure: scores in, decision out, no MLflow.

Both models are scored on the same newest window, the same rows and the same target (the challenger's label);
each trades with its own rules (:mod:`pricelevel.inference.contest`), under the trader's account protections
(``backtest.protections``, simulated by :mod:`pricelevel.backtest.protections`): the gate judges the strategy
the trader runs.

- **The hurdle, for every champion, the first included**: the challenger's strategy metric
  (``selection.metric``, after costs) must beat each strategy baseline listed in ``promotion.hurdle`` on the
  window, strictly (default: cash, whose Sharpe is 0, the level rule and the volatility control, which ranks
  bars by ATR/close; buy-and-hold may be added, and is reported either way).
- **Not luck**: the challenger's deflated Sharpe ratio (the probability that the Sharpe its training run chose
  on validation beats zero after every configuration the run tried) is at least ``min_deflated_sharpe``; an
  unmeasured one (NaN) fails.
- No champion yet: the challenger must also beat every no-model classifier on the tuned metric, strictly.
- A champion: the challenger's tuned metric must beat the champion's by more than ``min_improvement``
  (in the metric's direction) AND its strategy metric may be worse by at most ``backtest_tolerance``.

A NaN score (an undefined metric, a strategy that never traded) loses to any number and never wins: a NaN
challenger is never promoted; a NaN champion or baseline is beaten by any finite challenger.

**The champion is judged again** at every run, by the same hurdle on the same window (:func:`judge_champion`);
``promotion.retire_after`` failures in a row (:func:`failures_after`) retire it (:func:`retires`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pricelevel.registry.config import PromotionConfig

Direction = Literal["maximize", "minimize"]
TAG_PREFIX = "promotion."


@dataclass(frozen=True)
class Scores:
    """One model's scores on the promotion window; ``baselines`` are the no-model baselines' tuned metric."""

    metric: float
    backtest: float
    baselines: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    promote: bool
    #: One human sentence with the numbers that decided it.
    reason: str
    details: dict[str, float | str | None]


def decide(
    challenger: Scores,
    champion: Scores | None,
    config: PromotionConfig,
    metric: str,
    direction: Direction,
    trading_metric: str = "sharpe",
    hurdle: Mapping[str, float] | None = None,
    deflated_sharpe: float | None = None,
) -> Decision:
    """Apply the rule in the module docstring. ``hurdle`` holds the strategy baselines' ``trading_metric`` on the
    window (``None``: no hurdle numbers, the hurdle is not applied); ``deflated_sharpe`` the challenger's
    (``None``: not applied; NaN: not measured, which fails)."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    details: dict[str, float | str | None] = {
        "metric": metric,
        "direction": direction,
        "challenger": challenger.metric,
        "champion": champion.metric if champion else None,
        "min_improvement": config.min_improvement,
        "backtest_metric": trading_metric,
        "challenger_backtest": challenger.backtest,
        "champion_backtest": champion.backtest if champion else None,
        "backtest_tolerance": config.backtest_tolerance,
    }
    details.update({f"baseline.{name}": value for name, value in sorted(challenger.baselines.items())})
    details.update({f"hurdle.{name}": value for name, value in sorted((hurdle or {}).items())})
    if hurdle is not None:
        failed = _hurdle_failures(challenger.backtest, hurdle, config.hurdle)
        if failed:
            return Decision(False, f"challenger {_not_beaten(challenger.backtest, failed, hurdle, trading_metric)} "
                                   f"on the newest window (hurdle: {', '.join(config.hurdle)}); it stays @challenger", details)
    if deflated_sharpe is not None:
        details.update({"deflated_sharpe": deflated_sharpe, "min_deflated_sharpe": config.min_deflated_sharpe})
        if not deflated_sharpe >= config.min_deflated_sharpe:  # NaN fails
            found = "was not measured" if math.isnan(deflated_sharpe) else f"{deflated_sharpe:.3f} is below"
            return Decision(False, f"challenger's deflated Sharpe {found} promotion.min_deflated_sharpe "
                                   f"{config.min_deflated_sharpe:.2f}: its validation Sharpe is not told apart from the "
                                   "best of the configurations its run tried by luck; it stays @challenger", details)
    if champion is None:
        promote, reason = _against_baselines(challenger, metric, direction)
    else:
        promote, reason = _against_champion(challenger, champion, config, metric, direction, trading_metric)
    if promote and hurdle is not None and config.hurdle:
        cleared = ", ".join(f"{n} {hurdle[n]:.2f}" for n in config.hurdle)
        reason = f"{reason}; {trading_metric} {challenger.backtest:.2f} beats {cleared}{_market(hurdle, config.hurdle)}"
    return Decision(promote, reason, details)


def _market(hurdle: Mapping[str, float], names: tuple[str, ...]) -> str:
    """Buy-and-hold beside a decision that does not require beating it (the market a user could simply hold)."""
    if "buy_and_hold" in names or "buy_and_hold" not in hurdle:
        return ""
    return f" (buy_and_hold {hurdle['buy_and_hold']:.2f}, not in the hurdle)"


@dataclass(frozen=True)
class ChampionVerdict:
    """The champion judged again on the newest window: did it clear the hurdle, and the sentence saying so."""

    version: str
    passed: bool
    reason: str
    #: Consecutive runs it has failed the hurdle, this one included (0 when it passed).
    failures: int
    #: ``promotion.retire_after`` reached: ``@champion`` is taken off it.
    retired: bool


def judge_champion(
    version: str, backtest: float, hurdle: Mapping[str, float], config: PromotionConfig, previous_failures: int,
    trading_metric: str = "sharpe", replaced_by: str | None = None,
) -> ChampionVerdict:
    """The hurdle of :func:`decide` applied to the champion's strategy metric on the same window; its failures in
    a row and whether they retire it (never when ``replaced_by``, the challenger promoted over it in the same
    run). A champion that passes starts again from 0."""
    failed = _hurdle_failures(backtest, hurdle, config.hurdle)
    failures = failures_after(previous_failures, passed=not failed)
    retired = replaced_by is None and retires(failures, config.retire_after)
    if not failed:
        cleared = ", ".join(f"{n} {hurdle[n]:.2f}" for n in config.hurdle)
        return ChampionVerdict(version, True, f"champion v{version} still clears the hurdle: {trading_metric} "
                                              f"{backtest:.2f} beats {cleared}{_market(hurdle, config.hurdle)}", 0, False)
    limit = "never retired (retire_after 0)" if config.retire_after == 0 else f"retired at {config.retire_after}"
    outcome = (f"replaced by v{replaced_by}" if replaced_by is not None
               else "RETIRED: @champion removed, no new entries until a model earns it" if retired
               else f"{failures} failure(s) in a row, {limit}")
    return ChampionVerdict(version, False, f"champion v{version} fails the hurdle on the newest window: "
                                           f"{_not_beaten(backtest, failed, hurdle, trading_metric)}; {outcome}",
                           failures, retired)


def failures_after(previous: int, passed: bool) -> int:
    """Consecutive hurdle failures after one more judgement."""
    return 0 if passed else max(previous, 0) + 1


def retires(failures: int, retire_after: int) -> bool:
    """``retire_after`` failures in a row retire a champion; 0 never does."""
    return retire_after > 0 and failures >= retire_after


def _hurdle_failures(value: float, hurdle: Mapping[str, float], names: tuple[str, ...]) -> list[tuple[str, float]]:
    """The listed baselines the challenger's strategy metric does not strictly beat (a missing one fails)."""
    return [(name, hurdle.get(name, math.nan)) for name in names
            if name not in hurdle or not _beats(value, hurdle[name], 0.0, "maximize")]


def _not_beaten(value: float, failed: list[tuple[str, float]], hurdle: Mapping[str, float], trading_metric: str) -> str:
    """"sharpe 0.40 does not beat level_rule 0.50, volatility 0.90 (also: cash 0.00, ...)": every baseline of the
    hurdle it failed, then the others on the window (buy-and-hold among them)."""
    left, right = _pair(value, failed[0][1], digits=2)
    beaten = ", ".join([f"{failed[0][0]} {right}", *(f"{n} {v:.2f}" for n, v in failed[1:])])
    others = ", ".join(f"{n} {v:.2f}" for n, v in sorted(hurdle.items()) if n not in dict(failed))
    return f"{trading_metric} {left} does not beat {beaten}" + (f" (also: {others})" if others else "")


def _beats(value: float, reference: float, margin: float, direction: Direction) -> bool:
    """``value`` better than ``reference`` by more than ``margin``; NaN never wins and always loses."""
    if math.isnan(value):
        return False
    if math.isnan(reference):
        return True
    return value > reference + margin if direction == "maximize" else value < reference - margin


def _against_baselines(challenger: Scores, metric: str, direction: Direction) -> tuple[bool, str]:
    value = challenger.metric
    if not challenger.baselines:
        return False, f"no champion and no baselines to compare with: challenger {metric} {value:.3f} cannot be judged"
    if math.isnan(value):
        return False, f"challenger {metric} is NaN: a first model must beat every baseline"
    losses = {name: ref for name, ref in challenger.baselines.items() if not _beats(value, ref, 0.0, direction)}
    op = ">" if direction == "maximize" else "<"
    if losses:
        name, ref = sorted(losses.items())[0]
        left, right = _pair(value, ref)
        return False, f"challenger {metric} {left} is not {op} baseline {name} {right}; no champion is set"
    finite = {name: ref for name, ref in challenger.baselines.items() if not math.isnan(ref)}
    if not finite:
        return True, f"challenger {metric} {value:.3f} is finite and every baseline is NaN; no champion yet"
    pick = max if direction == "maximize" else min
    name = pick(finite, key=finite.__getitem__)
    left, right = _pair(value, finite[name])
    return True, f"challenger {metric} {left} {op} every baseline (best: {name} {right}); no champion yet"


def _against_champion(
    challenger: Scores, champion: Scores, config: PromotionConfig, metric: str, direction: Direction,
    trading_metric: str,
) -> tuple[bool, str]:
    op, sign = (">", "+") if direction == "maximize" else ("<", "-")
    metric_ok = _beats(challenger.metric, champion.metric, config.min_improvement, direction)
    left, right = _pair(challenger.metric, champion.metric)
    metric_text = f"challenger {metric} {left} {op if metric_ok else 'is not ' + op} champion {right} {sign} {config.min_improvement:.3f}"
    tolerance = config.backtest_tolerance
    backtest_ok = not math.isnan(challenger.backtest) and (
        math.isnan(champion.backtest) or challenger.backtest >= champion.backtest - tolerance
    )
    b_left, b_right = _pair(challenger.backtest, champion.backtest, digits=2)
    backtest_text = f"{trading_metric} {b_left} {'>=' if backtest_ok else '<'} {b_right} - {tolerance:.2f}"
    if math.isnan(challenger.backtest):
        backtest_text = f"{trading_metric} is NaN for the challenger (champion {b_right})"
    elif math.isnan(champion.backtest):
        backtest_text = f"{trading_metric} {b_left} (the champion's is NaN)"
    if metric_ok and backtest_ok:
        return True, f"{metric_text} and {backtest_text}"
    if metric_ok:
        return False, f"{metric_text} but {backtest_text}"
    return False, f"{metric_text} ({backtest_text})"


def _pair(a: float, b: float, digits: int = 3) -> tuple[str, str]:
    """Both numbers with enough decimals that different values do not print the same."""
    for places in range(digits, 9):
        left, right = f"{a:.{places}f}", f"{b:.{places}f}"
        if left != right or a == b or math.isnan(a) or math.isnan(b):
            return left, right
    return left, right


def decision_tags(
    decision: Decision, challenger_version: str | None, champion_version: str | None, decided_at: str
) -> dict[str, str]:
    """Version tags recording a decision; the same tags go on the challenger and the champion.

    ``promotion.decision`` is ``promoted`` (the challenger takes ``champion``), ``kept`` (the challenger
    already is the champion, so nothing moves) or ``rejected``.
    """
    if decision.promote and challenger_version != champion_version:
        outcome = "promoted"
    elif challenger_version is not None and challenger_version == champion_version:
        outcome = "kept"
    else:
        outcome = "rejected"
    tags = {
        f"{TAG_PREFIX}decision": outcome,
        f"{TAG_PREFIX}reason": decision.reason,
        f"{TAG_PREFIX}challenger": str(challenger_version) if challenger_version is not None else "none",
        f"{TAG_PREFIX}champion": str(champion_version) if champion_version is not None else "none",
        f"{TAG_PREFIX}decided_at": decided_at,
    }
    for key, value in decision.details.items():
        tags[f"{TAG_PREFIX}metric.{key}"] = _tag_value(value)
    return tags


def _tag_value(value: float | str | None) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)
