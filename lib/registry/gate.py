"""The promotion gate applied to a scored contest and recorded in the registry: the decision (pure:
:mod:`pricelevel.registry.promotion`), the alias move with its history, then the decision's tags on both
versions (after the move, retried) and a Markdown account of the numbers."""

from __future__ import annotations

import math

from mlflow import MlflowClient

from pricelevel.inference.contest import ContenderScore, Contest
from pricelevel.registry.config import PromotionConfig
from pricelevel.registry.promotion import Decision, Direction, Scores, decide, decision_tags
from pricelevel.registry.versions import move_champion, retrying


def contest_scores(score: ContenderScore, contest: Contest, trading_metric: str) -> Scores:
    return Scores(score.metric, score.trading.metric(trading_metric), contest.classifier_baselines)


def judge(contest: Contest, config: PromotionConfig, metric: str, direction: Direction, trading_metric: str) -> Decision:
    """The rule of :mod:`pricelevel.registry.promotion` on a contest's numbers (the hurdle included)."""
    hurdle = {name: score.metric(trading_metric) for name, score in contest.strategy_baselines.items()}
    champion = contest_scores(contest.champion, contest, trading_metric) if contest.champion else None
    return decide(contest_scores(contest.challenger, contest, trading_metric), champion, config, metric, direction,
                  trading_metric, hurdle)


def record_decision(
    client: MlflowClient, name: str, contest: Contest, config: PromotionConfig, metric: str, direction: Direction,
    trading_metric: str, decided_at: str,
) -> tuple[Decision, str]:
    """Decide, move ``champion`` if the challenger won, then tag both versions with the decision."""
    decision = judge(contest, config, metric, direction, trading_metric)
    challenger = contest.challenger.version
    champion = contest.champion.version if contest.champion else None
    if decision.promote:
        move_champion(client, name, challenger)
    tags = decision_tags(decision, challenger, champion, decided_at)
    tags["promotion.window"] = f"{contest.start} .. {contest.end}"
    for version in {challenger, *([champion] if champion else [])}:
        for key, value in tags.items():
            retrying(lambda v=version, k=key, x=value: client.set_model_version_tag(name, v, k, x))
    return decision, decision_markdown(name, decision, contest, metric, trading_metric)


def decision_markdown(name: str, decision: Decision, contest: Contest, metric: str, trading_metric: str) -> str:
    def num(value: float, pct: bool = False) -> str:
        return "-" if not math.isfinite(value) else (f"{value:+.2%}" if pct else f"{value:.4f}")

    lines = [
        f"# {'Promoted' if decision.promote else 'Not promoted'}: `{name}` version {contest.challenger.version}", "",
        decision.reason, "", f"Window {contest.start:%Y-%m-%d} .. {contest.end:%Y-%m-%d}: {contest.rows} labelled rows "
        f"(the challenger's target), {contest.bars} bars traded.", "",
        f"| strategy | {metric} | {trading_metric} | total return | max drawdown | trades |", "|---|---|---|---|---|---|",
    ]
    for role, score in (("challenger", contest.challenger), ("champion", contest.champion)):
        if score is not None:
            t = score.trading
            lines.append(f"| {role} v{score.version} | {num(score.metric)} | {num(t.metric(trading_metric))} | "
                         f"{num(t.total_return, True)} | {num(t.max_drawdown, True)} | {t.n_trades} |")
    for baseline, t in contest.strategy_baselines.items():
        lines.append(f"| {baseline} | - | {num(t.metric(trading_metric))} | {num(t.total_return, True)} | "
                     f"{num(t.max_drawdown, True)} | {t.n_trades} |")
    for baseline, value in contest.classifier_baselines.items():
        lines.append(f"| {baseline} (classifier) | {num(value)} | - | - | - | - |")
    return "\n".join(lines) + "\n"
