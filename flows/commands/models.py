"""Model lifecycle commands: ``train``, ``promote``, ``models``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flows.commands.common import UsageError, console, number, relative, run_flow, session, short, table

QUICK_CONFIG = Path("conf") / "quick.yaml"


def train(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Demo-sized run: conf/quick.yaml (minutes on a laptop).")] = False,
    skip_ingest: Annotated[bool, typer.Option("--skip-ingest", help="Train on the validated store as it is.")] = False,
) -> None:
    """Run the training flow: ingest, levels, labels, dataset, tune, train, evaluate, backtest, register."""
    state = session(ctx)
    if quick and state.config_file:
        raise UsageError("--quick is conf/quick.yaml; put your keys in --set or a --config of your own, not both")
    from flows.train import train as train_flow
    from pricelevel.core.runtime import project_root
    from pricelevel.ml.evaluation import scores_table

    if quick:
        state = type(state)(project_root() / QUICK_CONFIG, state.overrides, state.debug)
        ctx.find_root().obj = state
    cfg = state.config()
    outcome = run_flow(ctx, train_flow, skip_ingest=skip_ingest)
    scores, metric = outcome["scores"], cfg.tuning.metric
    columns = ("PR-AUC", "ROC-AUC", "F1", "precision", "recall")
    rows = ([row["model"], *(f"{row[m]:.4f}" for m in ("pr_auc", "roc_auc", "f1", "precision", "recall"))]
            for row in scores_table(scores))
    title = f"{cfg.tracking.registered_model} version {outcome['version']} (@challenger)"
    console().print(table(title + (" — reused, nothing new" if outcome["reused"] else ""), ["", *columns], rows, "right"))
    _print_walk_forward(outcome["walk_forward"], cfg.selection.metric)
    bt = outcome["backtest"]
    console().print(
        f"best {metric} {scores[f'best_{metric}']:.4f} · rules chosen on validation: {_rules(outcome['rules'])}\n"
        f"newest fold's test segment: total return {bt.get('backtest_total_return', float('nan')):+.2%}, "
        f"sharpe {bt.get('backtest_sharpe', float('nan')):.2f}, trades {bt.get('backtest_n_trades', 0):.0f}; "
        f"buy-and-hold {bt.get('backtest_buy_and_hold_return', float('nan')):+.2%}"
    )
    console().print(f"report: {relative(outcome['report'])}")
    console().print("next: `pricelevel promote` (challenger vs champion) · `pricelevel models` · `pricelevel ui`")


def _rules(rules: dict) -> str:
    from pricelevel.strategy.rules import StrategyRules

    return StrategyRules.model_validate(rules).describe()


def _print_walk_forward(summary: dict, metric: str) -> None:
    """Mean and worst fold of the model's strategy beside cash, buy-and-hold and the level rule."""
    columns = (f"mean {metric}", f"worst {metric}", "mean return", "worst return", "worst drawdown", "mean trades")
    rows = (
        [name, number(summary["mean"][name][metric]), number(summary["worst"][name][metric]),
         number(summary["mean"][name]["total_return"], pct=True), number(summary["worst"][name]["total_return"], pct=True),
         number(summary["worst"][name]["max_drawdown"], pct=True), f"{summary['mean'][name]['n_trades']:.0f}"]
        for name in ("model", "cash", "buy_and_hold", "level_rule", "volatility") if name in summary["mean"]
    )
    console().print(table("walk-forward test segments (after costs)", ["strategy", *columns], rows, "right"))


def promote(
    ctx: typer.Context,
    rollback: Annotated[bool, typer.Option("--rollback", help="Put @champion back on the previous champion.")] = False,
) -> None:
    """Run the promotion flow: @champion moves to @challenger only if it wins (docs/concepts/promotion.md "Promotion")."""
    from flows.promote import promote as promote_flow

    name = session(ctx).config().tracking.registered_model
    outcome = run_flow(ctx, promote_flow, rollback_champion=rollback)
    if rollback:
        console().print(f"{name}@champion: version {outcome['from']} -> {outcome['to']}")
        return
    console().print(f"{'PROMOTED' if outcome.get('promote') else 'not promoted'}: {outcome.get('reason')}")
    console().print(f"load it with: mlflow.pyfunc.load_model('models:/{name}@champion') · `pricelevel models`")


def models(
    ctx: typer.Context, json_out: Annotated[Path | None, typer.Option("--json", help="Write the versions here as JSON.")] = None
) -> None:
    """Registered model versions, their aliases and key metrics."""
    from pricelevel.core.files import write_text
    from pricelevel.registry.tracking import mlflow_client
    from pricelevel.registry.versions import champion_status, list_versions

    cfg = session(ctx).config()
    name, metric = cfg.tracking.registered_model, f"best_{cfg.tuning.metric}"
    versions = list_versions(mlflow_client(cfg.tracking), name, metric=metric)
    if json_out:
        write_text(json_out, json.dumps(versions, indent=2, default=str))
    columns = ("version", "aliases", "created", metric, "test PR-AUC", "backtest return", "sharpe", "buy & hold",
               "promotion")
    rows = (
        [v["version"], ",".join(v.get("aliases", [])) or "-", short(v.get("created")), number(m.get(metric)),
         number(m.get("test_pr_auc")), number(m.get("backtest_total_return"), pct=True), number(m.get("backtest_sharpe")),
         number(m.get("backtest_buy_and_hold_return"), pct=True), v.get("tags", {}).get("promotion.decision", "-")]
        for v in versions for m in [v.get("metrics", {})]
    )
    console().print(table(f"registered model {name} ({cfg.tracking.tracking_uri})", columns, rows))
    if not versions:
        console().print("no versions yet: run `pricelevel train`")
    if versions and champion_status(versions):  # the champion judged again at the last promotion run
        console().print(champion_status(versions))
    if versions and not any("champion" in v.get("aliases", []) for v in versions):
        latest = versions[0].get("tags", {}).get("promotion.reason", "not judged yet: run `pricelevel promote`")
        console().print(f"no champion: no version has earned it (latest decision: {latest})")
    if json_out:
        console().print(f"json: {json_out}")
