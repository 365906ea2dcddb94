"""The promotion gate applied to a scored contest and recorded in the registry: the decision (pure:
:mod:`pricelevel.registry.promotion`), the alias move with its history, then the decision's tags on both
versions (after the move, retried) and a Markdown account of the numbers. The challenger's deflated Sharpe
ratio is read from its training run (logged there by the training flow, :mod:`pricelevel.ml.deflation`).

The champion is judged again on the same window by the same hurdle (:func:`rejudge_champion`): its consecutive
failures live in its version's ``promotion.champion.*`` tags, and ``promotion.retire_after`` of them take
``@champion`` off it (:func:`pricelevel.registry.versions.retire_champion`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow import MlflowClient

from pricelevel.inference.contest import ContenderScore, Contest
from pricelevel.ml.deflation import METRIC as DEFLATED_SHARPE
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.model_baseline import gbm_markdown, versus_gbm, window_hurdle
from pricelevel.registry.promotion import (
    ChampionVerdict,
    Decision,
    Direction,
    Scores,
    decide,
    decision_tags,
    judge_champion,
)
from pricelevel.registry.versions import (
    champion_failures,
    move_champion,
    record_champion_verdict,
    retire_champion,
    retrying,
)


def contest_scores(score: ContenderScore, contest: Contest, trading_metric: str) -> Scores:
    return Scores(score.metric, score.trading.metric(trading_metric), contest.classifier_baselines)


def judge(
    contest: Contest, config: PromotionConfig, metric: str, direction: Direction, trading_metric: str,
    deflated_sharpe: float | None = None,
) -> Decision:
    """The rule of :mod:`pricelevel.registry.promotion` on a contest's numbers (the hurdle included) and the
    challenger's deflated Sharpe ratio (``None``: that condition is not applied)."""
    hurdle = {name: score.metric(trading_metric) for name, score in contest.strategy_baselines.items()}
    champion = contest_scores(contest.champion, contest, trading_metric) if contest.champion else None
    return decide(contest_scores(contest.challenger, contest, trading_metric), champion, config, metric, direction,
                  trading_metric, hurdle, deflated_sharpe)


def champion_on_window(
    champion: ContenderScore, contest: Contest, config: PromotionConfig, trading_metric: str, previous_failures: int,
    replaced_by: str | None = None,
) -> ChampionVerdict:
    """The champion judged by the hurdle on the contest's window (pure: the rolling backtest uses it too)."""
    hurdle = {name: score.metric(trading_metric) for name, score in contest.strategy_baselines.items()}
    return judge_champion(str(champion.version), champion.trading.metric(trading_metric), hurdle, config,
                          previous_failures, trading_metric, replaced_by)


def rejudge_champion(
    client: MlflowClient, name: str, champion: ContenderScore, contest: Contest, config: PromotionConfig,
    trading_metric: str, judged_at: str, replaced_by: str | None = None,
) -> ChampionVerdict:
    """Judge the champion on the window, count its failures in a row on its version's tags, and retire it (take
    ``@champion`` off it) when they reach ``promotion.retire_after``; not when ``replaced_by`` took the alias."""
    version = str(champion.version)
    verdict = champion_on_window(champion, contest, config, trading_metric, champion_failures(client, name, version),
                                 replaced_by)
    if verdict.retired:
        retire_champion(client, name, version)
    state = "retired" if verdict.retired else "passed" if verdict.passed else "failed"
    record_champion_verdict(client, name, version, state, verdict.failures, verdict.reason, judged_at)
    return verdict


@dataclass(frozen=True)
class Recorded:
    """What a promotion run decided and wrote: the challenger's decision, the champion's verdict (``None``: no
    champion), and the Markdown account of both."""

    decision: Decision
    champion: ChampionVerdict | None
    markdown: str


def training_metrics(client: MlflowClient, name: str, version: str | None) -> dict[str, float]:
    """The metrics of the run that trained ``version`` (empty when it has none)."""
    if version is None:
        return {}
    run_id = client.get_model_version(name, version).run_id
    return dict(client.get_run(run_id).data.metrics) if run_id else {}


def deflated_sharpe_of(client: MlflowClient, name: str, version: str | None) -> float:
    """The version's deflated Sharpe ratio from its training run; NaN when that run did not measure it (a model
    trained before it was measured: retrain it), so the gate refuses rather than skips the condition."""
    return float(training_metrics(client, name, version).get(DEFLATED_SHARPE, math.nan))


def record_decision(
    client: MlflowClient, name: str, contest: Contest, config: PromotionConfig, metric: str, direction: Direction,
    trading_metric: str, decided_at: str,
) -> Recorded:
    """Decide, move ``champion`` if the challenger won, then tag both versions with the decision; judge the
    champion again on the same window (and retire it when it has failed often enough)."""
    deflated = deflated_sharpe_of(client, name, contest.challenger.version) if config.min_deflated_sharpe > 0 else None
    window = config.model_copy(update={"hurdle": window_hurdle(config.hurdle)})  # `gbm` is judged on the training run
    decision = versus_gbm(judge(contest, window, metric, direction, trading_metric, deflated), config.hurdle,
                          training_metrics(client, name, contest.challenger.version), trading_metric)
    challenger = contest.challenger.version
    champion = contest.champion.version if contest.champion else None
    if decision.promote:
        move_champion(client, name, challenger)
    tags = decision_tags(decision, challenger, champion, decided_at)
    tags["promotion.window"] = f"{contest.start} .. {contest.end}"
    for version in {challenger, *([champion] if champion else [])}:
        for key, value in tags.items():
            retrying(lambda v=version, k=key, x=value: client.set_model_version_tag(name, v, k, x))
    verdict = None
    if contest.champion is not None:
        verdict = rejudge_champion(client, name, contest.champion, contest, window, trading_metric, decided_at,
                                   replaced_by=str(challenger) if decision.promote else None)
    return Recorded(decision, verdict, decision_markdown(name, decision, contest, metric, trading_metric, verdict))


def decision_markdown(
    name: str, decision: Decision, contest: Contest, metric: str, trading_metric: str,
    champion: ChampionVerdict | None = None,
) -> str:
    def num(value: float, pct: bool = False) -> str:
        return "-" if not math.isfinite(value) else (f"{value:+.2%}" if pct else f"{value:.4f}")

    lines = [
        f"# {'Promoted' if decision.promote else 'Not promoted'}: `{name}` version {contest.challenger.version}", "",
        decision.reason, "", f"Window {contest.start:%Y-%m-%d} .. {contest.end:%Y-%m-%d}: {contest.rows} labelled rows "
        f"(the challenger's target), {contest.bars} bars traded.", "",
        f"| strategy | {metric} | direction AUC | {trading_metric} | total return | max drawdown | trades |",
        "|---|---|---|---|---|---|---|",
    ]
    for role, score in (("challenger", contest.challenger), ("champion", contest.champion)):
        if score is not None:
            t = score.trading
            direction = float(score.classification.get("direction_auc", math.nan))
            lines.append(f"| {role} v{score.version} | {num(score.metric)} | {num(direction)} | "
                         f"{num(t.metric(trading_metric))} | {num(t.total_return, True)} | {num(t.max_drawdown, True)} | "
                         f"{t.n_trades} |")
    for baseline, t in contest.strategy_baselines.items():
        lines.append(f"| {baseline} | - | - | {num(t.metric(trading_metric))} | {num(t.total_return, True)} | "
                     f"{num(t.max_drawdown, True)} | {t.n_trades} |")
    for baseline, value in contest.classifier_baselines.items():
        lines.append(f"| {baseline} (classifier) | {num(value)} | - | - | - | - | - |")
    lines += gbm_markdown(decision.details, trading_metric)  # LightGBM beside the LSTM (its training run)
    if "deflated_sharpe" in decision.details:
        deflated = float(decision.details["deflated_sharpe"])  # type: ignore[arg-type]
        lines += ["", f"Deflated Sharpe ratio of the challenger's training run (validation, after every configuration "
                      f"it tried): {num(deflated)} (minimum {decision.details['min_deflated_sharpe']})."]
    if champion is not None:
        lines += ["", f"The champion judged again on this window: {champion.reason}."]
    return "\n".join(lines) + "\n"
