"""The strategy figures of README "Walk-forward evaluation": the demo pipeline (`conf/quick.yaml`) trained once
on the bundled data, its walk-forward report read back, and the gate's verdict on the newest window.

    OMP_NUM_THREADS=1 .venv/bin/python bench/strategy.py [--set KEY=VALUE ...] [--rolling] > strategy.json

One `pricelevel train --quick` run (the training flow itself) in a throwaway project (`PRICELEVEL_HOME` in a
temporary folder, the bundled sample linked in). The figures are read from that run's outputs, never recomputed:
its MLflow artefact `walk_forward.json` (every fold's test segment: the LSTM, LightGBM (`gbm`), the volatility
control, the level rule, buy-and-hold and cash, on the same bars and costs) and its MLflow metrics (the deflated
Sharpe ratio of the registered model's chosen rules on validation). "Mean" and "worst" are the report's own
summary over the folds; "compounded" chains the folds' test returns (the test segments are consecutive).
Then the promotion flow's contest on the newest `promotion.window_days` and the gate's decision, as
`pricelevel promote` would decide for a first champion. With `--rolling`, `research rolling` (demo-sized) over
`--rolling-start` .. `--rolling-end`, both champion policies.

Nothing here is chosen on a test segment: every threshold, exit and parameter was chosen on validation by the
training run; this script only reads and prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The report's rows, in the order of the tables: the two models, then the no-model strategies.
STRATEGIES = ("model", "gbm", "volatility", "level_rule", "buy_and_hold", "cash")
LABELS = {"model": "LSTM", "gbm": "LightGBM", "volatility": "volatility control", "level_rule": "level rule",
          "buy_and_hold": "buy-and-hold", "cash": "cash"}
TRADING = ("sharpe", "total_return", "max_drawdown", "n_trades", "fee_share")
CLASSIFICATION = ("pr_auc", "direction_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a config override (repeatable)")
    parser.add_argument("--rolling", action="store_true", help="also run `research rolling` (demo-sized)")
    parser.add_argument("--rolling-start", default="2023-01-01")
    parser.add_argument("--rolling-end", default="2024-06-30")
    parser.add_argument("--rolling-every", default="60d")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pricelevel-strategy-") as tmp:
        project = Path(tmp) / "project"
        (project / "data").mkdir(parents=True)
        shutil.copytree(ROOT / "conf", project / "conf")
        (project / "data" / "sample").symlink_to(ROOT / "data" / "sample", target_is_directory=True)
        os.environ["PRICELEVEL_HOME"] = str(project)
        from pricelevel.core.runtime import bootstrap

        bootstrap()  # quiet, offline environment before Prefect is imported
        from pricelevel.research.report import finite
        out: dict[str, Any] = {"benchmark": "strategy figures on conf/quick.yaml (bundled sample)",
                               "overrides": args.overrides, "training": training_figures(project, args.overrides)}
        if args.rolling:
            out["rolling"] = rolling_figures(project, args)
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["load_average"] = list(os.getloadavg())
    print(out["training"]["markdown"], file=sys.stderr)
    if "rolling" in out:
        print(out["rolling"]["markdown"], file=sys.stderr)
    print(json.dumps(finite(out), indent=2, default=str))


def training_figures(project: Path, overrides: list[str]) -> dict[str, Any]:
    """One training run of the demo; its walk-forward report, deflated Sharpe and the gate on the newest window."""
    from flows.train import train
    from pricelevel.backtest.trading import rules_of
    from pricelevel.config import load_project_config
    from pricelevel.inference.contest import Contender, score_contest
    from pricelevel.ml.deflation import METRIC as DEFLATED
    from pricelevel.registry.gate import judge
    from pricelevel.registry.model_baseline import window_hurdle
    from pricelevel.registry.tracking import load_model, mlflow_client

    quick = str(project / "conf" / "quick.yaml")
    began = time.perf_counter()
    outcome = train(config_file=quick, overrides=overrides)
    train_seconds = time.perf_counter() - began
    config = load_project_config(quick, overrides)
    client = mlflow_client(config.tracking)
    with tempfile.TemporaryDirectory() as tmp:
        report = json.loads(Path(client.download_artifacts(outcome["run_id"], "walk_forward.json", tmp)).read_text())
    metrics = dict(client.get_run(outcome["run_id"]).data.metrics)
    deflated = {k: v for k, v in metrics.items() if k.startswith(DEFLATED)}

    model = load_model(f"models:/{config.tracking.registered_model}/{outcome['version']}", client)
    contest = score_contest(Contender(model.predict, model.spec, model.version), None, config.catalogue.validated(),
                            config.promotion.window_days, config.tuning.metric, config.backtest, rules_of(config.backtest))
    window = config.promotion.model_copy(update={"hurdle": window_hurdle(config.promotion.hurdle)})
    decision = judge(contest, window, config.tuning.metric, config.tuning.direction, config.selection.metric,
                     deflated.get(DEFLATED, math.nan) if config.promotion.min_deflated_sharpe > 0 else None)
    folds = [fold_rows(fold) for fold in report["folds"]]
    pooled = pooled_rows(report)
    newest = {"start": str(contest.start), "end": str(contest.end), "bars": contest.bars,
              "model": contest.challenger.trading.to_dict(),
              **{name: s.to_dict() for name, s in contest.strategy_baselines.items()},
              "decision": "promoted" if decision.promote else "not promoted", "reason": decision.reason}
    result = {
        "version": outcome["version"], "run_id": outcome["run_id"], "train_seconds": round(train_seconds, 1),
        "folds": [{"fold": f["fold"], "test_start": f["test_start"], "test_end": f["test_end"], "bars": f["bars"],
                   "rules": f["rules"], "gbm_rules": f.get("gbm_rules"), "rows": rows}
                  for f, rows in zip(report["folds"], folds, strict=True)],
        "pooled": pooled, "deflated_sharpe": deflated, "newest_window": newest,
    }
    result["markdown"] = training_markdown(result)
    return result


def fold_rows(fold: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One fold's row per strategy: the classification numbers where the strategy is a classifier, the trading ones."""
    rows = {}
    for name in STRATEGIES:
        trading = fold["trading"].get(name)
        if trading is None:
            continue
        classification = fold["classification"].get(name, {})
        rows[name] = {**{k: classification.get(k) for k in CLASSIFICATION}, **{k: trading.get(k) for k in TRADING}}
    return rows


def pooled_rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Over the folds: the report's mean and worst, the summed trades and the compounded test return."""
    summary, folds = report["summary"], report["folds"]
    rows = {}
    for name in STRATEGIES:
        if name not in summary["mean"]:
            continue
        mean, worst = summary["mean"][name], summary["worst"][name]
        returns = [f["trading"][name]["total_return"] for f in folds]
        compounded = math.prod(1.0 + r for r in returns) - 1.0 if all(r is not None for r in returns) else None
        rows[name] = {
            "mean_pr_auc": mean.get("pr_auc"), "mean_direction_auc": mean.get("direction_auc"),
            "mean_sharpe": mean.get("sharpe"), "worst_sharpe": worst.get("sharpe"), "compounded_return": compounded,
            "worst_drawdown": worst.get("max_drawdown"), "trades": sum(f["trading"][name]["n_trades"] for f in folds),
            "mean_fee_share": mean.get("fee_share"),
        }
    return rows


def num(value: Any, pct: bool = False, digits: int = 3) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    if pct:
        return f"{value:+.1%}"
    return f"{value:.0f}" if isinstance(value, int) else f"{value:.{digits}f}"


def training_markdown(result: dict[str, Any]) -> str:
    deflated = result["deflated_sharpe"].get("deflated_sharpe")
    lines = []
    header = ["| strategy | PR-AUC | direction AUC | Sharpe | total return | max drawdown | trades | fees / gross profit |"
              " deflated Sharpe |", "|---|---|---|---|---|---|---|---|---|"]
    for fold in result["folds"]:
        lines += [f"**Fold {fold['fold']}: test {fold['test_start'][:10]} .. {fold['test_end'][:10]} ({fold['bars']} bars)**",
                  "", *header]
        for name, r in fold["rows"].items():
            lines.append(f"| {LABELS[name]} | {num(r['pr_auc'])} | {num(r['direction_auc'])} | {num(r['sharpe'])} | "
                         f"{num(r['total_return'], True)} | {num(r['max_drawdown'], True)} | {num(r['n_trades'])} | "
                         f"{num(r['fee_share'], True)} | - |")
        lines.append("")
    lines += ["**Over the folds** (mean and worst: the report's summary; compounded: the consecutive test segments "
              "chained)", "", "| strategy | mean PR-AUC | mean direction AUC | mean Sharpe | worst Sharpe | compounded return "
              "| worst drawdown | trades | mean fees / gross profit | deflated Sharpe |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["pooled"].items():
        lines.append(f"| {LABELS[name]} | {num(r['mean_pr_auc'])} | {num(r['mean_direction_auc'])} | "
                     f"{num(r['mean_sharpe'])} | {num(r['worst_sharpe'])} | {num(r['compounded_return'], True)} | "
                     f"{num(r['worst_drawdown'], True)} | {num(r['trades'])} | {num(r['mean_fee_share'], True)} | "
                     f"{num(deflated) if name == 'model' else '-'} |")
    d = result["deflated_sharpe"]
    if deflated is not None:
        lines += ["", f"Deflated Sharpe (the registered model's rules on the validation segment they were chosen on): "
                      f"{num(deflated)}; validation Sharpe {num(d.get('deflated_sharpe.validation_sharpe'), digits=2)} "
                      f"against {num(d.get('deflated_sharpe.luck_sharpe'), digits=2)} expected from luck as the best of "
                      f"{int(d.get('deflated_sharpe.configurations') or 0)} configurations."]
    w = result["newest_window"]
    others = ", ".join(f"{name} {num(w[name]['sharpe'], digits=2)}" for name in ("cash", "level_rule", "volatility",
                                                                                   "buy_and_hold") if name in w)
    lines += ["", f"Newest window {w['start'][:10]} .. {w['end'][:10]} (the gate's): LSTM Sharpe "
                  f"{num(w['model']['sharpe'], digits=2)} ({w['model']['n_trades']} trades); {others}. Gate: "
                  f"{w['decision']}: {w['reason']}", ""]
    return "\n".join(lines)


def rolling_figures(project: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`research rolling` (demo-sized) on the bundled sample; its JSON payload and Markdown."""
    import pandas as pd

    from pricelevel.config import load_project_config
    from pricelevel.data.folder import CandleFolder
    from pricelevel.research.report import rolling_markdown, write_rolling
    from pricelevel.research.rolling import RollingConfig, rolling_backtest

    config = load_project_config(str(project / "conf" / "quick.yaml"), args.overrides)
    rolling = RollingConfig(start=pd.Timestamp(args.rolling_start, tz="UTC"), every=pd.Timedelta(args.rolling_every),
                            end=pd.Timestamp(args.rolling_end, tz="UTC"))
    out = project / "data" / "research" / "rolling"
    began = time.perf_counter()
    result = rolling_backtest(config, CandleFolder.open(ROOT / "data" / "sample"), rolling, out,
                              log=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - began
    json_path, _ = write_rolling(result, out, config.tuning.metric, config.selection.metric)
    payload = json.loads(json_path.read_text())
    payload.pop("curves", None)
    return {"seconds": round(seconds, 1), "payload": payload, "markdown": rolling_markdown(result)}


if __name__ == "__main__":
    main()
