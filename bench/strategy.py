"""The strategy research behind README "What was tried": the demo pipeline (`conf/quick.yaml`) trained with a
few variants of the rule search and the inputs, each judged as the promotion gate would judge it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/strategy.py [--variants NAME,...] > strategy.json

For every variant: the walk-forward report (every fold's table, as in the MLflow run), its summary (mean and
worst fold of the model's strategy and of cash, buy-and-hold and the level rule, on the folds' test segments)
and the gate's contest on the newest 90 days
(sharpe after costs of the model and the baselines, and the decision). Nothing is tuned on test: each variant
only changes what the search on validation may choose from. Runs in a temporary project (the bundled sample),
one Prefect run each; about 3 minutes a variant on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "the label's own exits: take-profit = move, time stop = horizon, no stop-loss (the default grid)": [],
    "+ stop-loss and wider exits (sl 2 %/4 %, tp 4 %, no time stop; the first grid)":
        ["selection.sl_stop=[null,0.02,0.04]", "selection.tp_stop=[move,0.04]", "selection.max_hold_bars=[horizon,null]"],
    "+ probability exits (p below the validation median)": ["selection.exit_quantiles=[null,0.5]"],
    "rarer entries (1 % and 2 % of bars)": ["selection.entry_quantiles=[0.01,0.02]"],
    "tuned on the worst fold instead of the mean": ["selection.aggregate=worst"],
    "the first feature set (base: 4 columns)": ["features.set=base"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=None, help="comma-separated prefixes of variant names (default: all)")
    args = parser.parse_args()
    chosen = {k: v for k, v in VARIANTS.items()
              if not args.variants or any(k.startswith(p) for p in args.variants.split(","))}
    with tempfile.TemporaryDirectory(prefix="pricelevel-research-") as tmp:
        project = Path(tmp) / "project"
        (project / "data").mkdir(parents=True)
        shutil.copytree(ROOT / "conf", project / "conf")
        (project / "data" / "sample").symlink_to(ROOT / "data" / "sample", target_is_directory=True)
        os.environ["PRICELEVEL_HOME"] = str(project)
        from pricelevel.core.runtime import bootstrap

        bootstrap()  # quiet, offline environment before Prefect is imported
        results = [run_variant(name, overrides, project) for name, overrides in chosen.items()]
    print(json.dumps({"benchmark": "strategy research on conf/quick.yaml", "variants": results}, indent=2, default=str))


def run_variant(name: str, overrides: list[str], project: Path) -> dict:
    from flows.train import train
    from pricelevel.backtest.trading import rules_of
    from pricelevel.config import load_project_config
    from pricelevel.inference.contest import Contender, score_contest
    from pricelevel.registry.gate import judge
    from pricelevel.registry.tracking import load_model, mlflow_client

    quick = str(project / "conf" / "quick.yaml")
    outcome = train(config_file=quick, overrides=overrides, skip_ingest=(project / "data" / "validated").exists())
    config = load_project_config(quick, overrides)
    model = load_model(f"models:/{config.tracking.registered_model}/{outcome['version']}", mlflow_client(config.tracking))
    contest = score_contest(Contender(model.predict, model.spec, model.version), None, config.catalogue.validated(),
                            config.promotion.window_days, config.tuning.metric, config.backtest, rules_of(config.backtest))
    decision = judge(contest, config.promotion, config.tuning.metric, config.tuning.direction, config.selection.metric)
    summary = outcome["walk_forward"]
    print(f"{name}: {decision.reason}", file=sys.stderr)
    return {
        "variant": name, "overrides": overrides, "version": outcome["version"], "rules": outcome["rules"],
        "walk_forward": {how: {s: {k: summary[how][s][k] for k in ("sharpe", "total_return", "max_drawdown", "n_trades")}
                               for s in summary[how]} for how in ("mean", "worst")},
        "newest_window": {"start": str(contest.start), "end": str(contest.end),
                          "model_sharpe": contest.challenger.trading.sharpe, "model_trades": contest.challenger.trading.n_trades,
                          **{f"{k}_sharpe": v.sharpe for k, v in contest.strategy_baselines.items()}},
        "gate": {"promote": decision.promote, "reason": decision.reason},
        "report": outcome["walk_forward_markdown"],  # every fold's table, as logged to the MLflow run
    }


if __name__ == "__main__":
    main()
