"""The whole DAG under a temporary Prefect API, on a small slice of the bundled data with the real config
shrunk: train -> register @challenger -> promote; a re-run reuses everything; a worse challenger is not
promoted; rollback restores the previous champion; the champion scores a folder it has never seen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import SAMPLE, project_folder

pytestmark = pytest.mark.flow

SMALL = [
    "data.symbols=[BTCUSDT,ETHUSDT]",
    "data.start=2023-01-01",
    "levels.lookback_days=120",
    "labels.threshold_frac=0.005",
    "labels.horizon=6",
    "dataset.timeframe=4h",
    "dataset.seq_len=16",
    "levels.refit_every=6",
    "model.hidden_size=8",
    "model.num_layers=1",
    "model.max_epochs=2",
    "model.patience=1",
    "model.num_threads=1",
    "model.batch_size=128",
    "model.limit_train_batches=10",
    "tuning.n_trials=2",
    "tuning.max_epochs=1",
    "tuning.space.hidden_size=[8]",
    "tuning.space.num_layers=[1,1]",
    "tuning.space.batch_size=[128]",
    "tuning.space.seq_len=[12,16]",
    "promotion.window_days=60",
    "training.budget_hours=null",  # fixed-size, as the demo: tests/test_budget.py covers the sizing
    "model.seeds=1",  # one final fit per fold: tests/test_seeds.py covers the spread over seeds
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    """One project trained once by the flow; the tests below read it (and some modify its registry)."""
    root = project_folder(tmp_path_factory.mktemp("train") / "project")
    mp = pytest.MonkeyPatch()
    mp.setenv("PRICELEVEL_HOME", str(root))
    torch.set_num_threads(1)
    from flows.train import train

    first = train(overrides=SMALL)
    yield root, first
    mp.undo()


def _client(root: Path):
    from pricelevel.config import load_project_config
    from pricelevel.registry.tracking import mlflow_client

    config = load_project_config(None, SMALL)
    return config, mlflow_client(config.tracking)


def test_train_registers_a_challenger_with_lineage(trained):
    root, first = trained
    config, client = _client(root)
    assert first["version"] == "1" and not first["reused"]
    version = client.get_model_version_by_alias("pricelevel", "challenger")
    assert str(version.version) == "1"
    run = client.get_run(version.run_id)
    tags = run.data.tags
    assert len(tags["pricelevel.git_commit"]) in (40, len("unknown"))
    assert tags["pricelevel.data_fingerprint"] and tags["pricelevel.seed"] == "42"
    # who owns the run, so a later run can end it if its process dies (lib/registry/orphans.py)
    from pricelevel.registry.orphans import Owner
    from tasks.runtime import flow_run_ended

    assert Owner.parse(tags["pricelevel.owner"]).pid == os.getpid()  # the thread runner: this process
    assert flow_run_ended(tags["pricelevel.flow_run_id"]) == "COMPLETED"  # the train flow run that made it
    assert "tuning.metric" in run.data.params and run.data.params["tuning.metric"] == "val_pr_auc"
    metrics = run.data.metrics
    for name in ("test_pr_auc", "baseline_majority_pr_auc", "baseline_near_level_now_pr_auc", "best_val_pr_auc",
                 "backtest_total_return"):
        assert name in metrics, name
    # per-epoch history of the final model
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) >= 1
    # nested trial runs under the training run
    trials = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(trials) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dataset_summary.json", "study_summary.json", "lookahead_report.json", "backtest"} <= artifacts
    assert Path(first["report"]).is_file()
    # which inputs and label the model was trained on, searchable in the MLflow UI
    assert tags["pricelevel.feature_set"] == "rich" and tags["pricelevel.label"] == "forward_move"
    assert run.data.params["features.set"] == "rich" and run.info.run_name.startswith("train-rich-")
    summary = json.loads((Path(client.download_artifacts(run.info.run_id, "dataset_summary.json"))).read_text())
    assert "ctx_1d_rsi_14" in summary["features"] and "rsi_14" in summary["features"]
    # the look-ahead check ran before the dataset and compared every table
    (report,) = (root / "data" / "derived" / "lookahead").glob("*/report.json")
    checked = json.loads(report.read_text())
    assert checked["ok"] and checked["symbols"] == ["BTCUSDT", "ETHUSDT"] and checked["values_compared"] > 10_000


def test_second_run_with_nothing_new_reuses_every_output(trained):
    root, first = trained
    from flows.train import train

    derived = root / "data" / "derived"
    before = {p: p.stat().st_mtime_ns for p in derived.rglob("*") if p.is_file() and "backtests" not in p.parts}
    second = train(overrides=SMALL)
    after = {p: p.stat().st_mtime_ns for p in derived.rglob("*") if p.is_file() and "backtests" not in p.parts}
    assert second["reused"] and second["version"] == first["version"]
    assert before == after  # nothing heavy recomputed or rewritten
    _, client = _client(root)
    assert len(client.search_model_versions("name='pricelevel'")) == 1


def _register_constant_model(config, client, like: str, probability: float) -> str:
    """A challenger whose output is the same for every window (zero weights, head bias = logit(p)): it ranks
    nothing, so its PR-AUC is exactly the positive rate, the majority baseline's score. Guaranteed no better."""
    from dataclasses import replace

    from pricelevel.ml.model import MultiSymbolLSTM
    from pricelevel.registry.tracking import ensure_experiment, load_model, log_pricelevel_model
    from pricelevel.registry.versions import register_version

    spec = load_model(like, client).spec
    spec = replace(spec, rules={**spec.rules, "threshold": 0.5})  # enters on p >= 0.5: never, for p < 0.5
    module = MultiSymbolLSTM(**spec.hparams)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.zero_()
            if name == "head.bias":
                param.fill_(float(np.log(probability / (1 - probability))))
    run = client.create_run(ensure_experiment(client, config.tracking.experiment, config.tracking.artifact_location))
    example = {"features": np.zeros((1, spec.seq_len, len(spec.features)), np.float32), "symbol_id": np.zeros(1, np.int64)}
    logged = log_pricelevel_model(client, run.info.run_id, module, spec, example)
    client.set_terminated(run.info.run_id)
    return str(register_version(client, "pricelevel", logged, run.info.run_id, {"test.constant": str(probability)}).version)


def _rule_says_promote(tags: dict[str, str]) -> bool:
    """The first-promotion rule recomputed from the numbers the flow recorded: the strategy (sharpe after
    costs) strictly above cash and the level rule, the deflated Sharpe at least its minimum, and the tuned metric
    strictly above every classifier."""
    strategy = float(tags["promotion.metric.challenger_backtest"])
    hurdle = [float(tags[f"promotion.metric.hurdle.{name}"]) for name in ("cash", "level_rule", "volatility")]
    challenger = float(tags["promotion.metric.challenger"])
    baselines = [float(v) for k, v in tags.items() if k.startswith("promotion.metric.baseline.")]
    clears = not np.isnan(strategy) and all(strategy > h or np.isnan(h) for h in hurdle)
    deflated = float(tags.get("promotion.metric.deflated_sharpe", "nan"))
    lucky = not deflated >= float(tags.get("promotion.metric.min_deflated_sharpe", "0"))  # NaN: not measured, fails
    return (clears and not lucky and bool(baselines) and all(challenger > b or np.isnan(b) for b in baselines)
            and not np.isnan(challenger))


def test_promotion_follows_the_rule_a_constant_model_never_wins_and_rollback(trained, tmp_path):
    root, _ = trained
    from flows.promote import promote
    from pricelevel.registry.versions import move_champion, set_alias

    config, client = _client(root)
    # A constant-probability challenger, first in line: it ranks nothing (ties the majority classifier) and, its
    # p below its threshold, never trades, so it cannot clear the cash hurdle: Sharpe NaN is not > 0.
    constant = _register_constant_model(config, client, "models:/pricelevel/1", probability=0.3)
    set_alias(client, "pricelevel", "challenger", constant)
    refused = promote(overrides=SMALL)
    assert not refused["promote"] and "does not beat cash" in refused["reason"]
    assert client.get_registered_model("pricelevel").aliases.get("champion") is None
    assert client.get_model_version("pricelevel", constant).tags["promotion.decision"] == "rejected"

    # The trained model: the decision is exactly what the rule says about the numbers it was scored with.
    set_alias(client, "pricelevel", "challenger", "1")
    first = promote(overrides=SMALL)
    tags = client.get_model_version("pricelevel", "1").tags
    assert first["promote"] == _rule_says_promote(tags)
    assert tags["promotion.decision"] == ("promoted" if first["promote"] else "rejected")
    champion = client.get_registered_model("pricelevel").aliases.get("champion")
    assert (champion is not None and str(champion) == "1") == first["promote"]

    # Rollback puts back the former champion, whatever moved the alias since.
    move_champion(client, "pricelevel", "1")
    move_champion(client, "pricelevel", constant)
    rolled = promote(overrides=SMALL, rollback_champion=True)
    assert (rolled["from"], rolled["to"]) == (constant, "1")
    assert str(client.get_model_version_by_alias("pricelevel", "champion").version) == "1"


def test_champion_backtests_a_folder_it_has_never_seen(trained, tmp_path, cli, monkeypatch):
    root, _ = trained
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))
    config, client = _client(root)
    if client.get_registered_model("pricelevel").aliases.get("champion") is None:
        from pricelevel.registry.versions import move_champion

        move_champion(client, "pricelevel", "1")
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    for tf in ("1d", "4h", "1h"):  # a symbol the model never trained on, over the newest months
        frame = pd.read_parquet(SAMPLE / f"SOLUSDT_{tf}.parquet")
        frame[frame["timestamp"] >= pd.Timestamp("2023-09-01", tz="UTC")].to_parquet(unseen / f"SOLUSDT_{tf}.parquet")
    out = tmp_path / "bt.json"
    code, stdout, err = cli("backtest", "--model", "models:/pricelevel@champion", "--data", str(unseen),
                            "--json", str(out), *sum((["--set", s] for s in SMALL), []))
    assert code == 0, err
    document = json.loads(out.read_text())
    final, trades = document["metrics"]["portfolio"]["final_value"], document["trades"]
    # Every dollar is accounted for: the equity's change is the sum of the trades' P&L, fees included.
    assert final == pytest.approx(10_000 + sum(trade["pnl"] for trade in trades), rel=1e-9)
    assert document["period"]["symbols"] == ["SOLUSDT"] and document["period"]["start"] >= "2023-09-01"
    code, stdout, _ = cli("models", *sum((["--set", s] for s in SMALL), []))
    assert code == 0 and "champion" in stdout


def test_a_leaky_feature_fails_the_training_run_before_anything_is_trained(tmp_path, prefect_harness, monkeypatch):
    import pricelevel.features.tables as training
    from flows.train import train
    from pricelevel.features.lookahead import LookaheadError

    root = project_folder(tmp_path / "project")
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))
    real = training.compute_features

    def peeking(candles, timeframe, columns, history=None, context=None):
        values = real(candles, timeframe, columns, history, context)
        values["rsi_14"] = values["rsi_14"].shift(-2)  # the RSI two bars ahead
        return values

    monkeypatch.setattr(training, "compute_features", peeking)
    with pytest.raises(LookaheadError, match="feature_rsi_14 at"):
        train(overrides=[*SMALL, "data.symbols=[ETHUSDT]"])
    derived = root / "data" / "derived"
    assert not (derived / "lookahead").exists() or not any((derived / "lookahead").glob("*/report.json"))
    assert not (derived / "models").exists() and not (root / "mlruns").exists()


def test_promotions_are_serialised_by_the_registry_lock(trained):
    """While another process promotes (it holds the store's registry lock), a promotion waits its turn."""
    import threading

    from flows.promote import promote
    from pricelevel.registry.versions import NothingToRollBackError

    root, _ = trained
    config, client = _client(root)
    outcome: dict = {}

    def roll_back() -> None:
        try:
            outcome["promoted"] = promote(overrides=SMALL, rollback_champion=True)
        except NothingToRollBackError as exc:  # this store never had a champion: judged, after the lock
            outcome["refused"] = str(exc)

    with config.catalogue.lock("registry", "pricelevel"):
        worker = threading.Thread(target=roll_back)
        worker.start()
        worker.join(timeout=8)
        assert worker.is_alive() and not outcome  # still waiting for the lock
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "no former champion" in outcome["refused"]


def test_a_failing_levels_step_reaches_the_user_with_its_own_error(tmp_path, prefect_harness, monkeypatch):
    """The features of a symbol wait on its levels: when levels fail, the flow raises the levels' error, not
    Prefect's ``UnfinishedRun`` of the features task that never ran."""

    import tasks.train as train_tasks
    from flows.train import train

    root = project_folder(tmp_path / "project")
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))

    def broken(*args, **kwargs):
        raise ValueError("the levels of ETHUSDT could not be found")

    monkeypatch.setattr(train_tasks, "levels_step", broken)
    with pytest.raises(ValueError, match="the levels of ETHUSDT could not be found"):
        train(overrides=[*SMALL, "data.symbols=[ETHUSDT]", "lookahead.enabled=false"])


def test_a_training_run_whose_flow_fails_is_ended_as_failed(tmp_path, prefect_harness, monkeypatch):
    import tasks.tuning as tuning_tasks
    from flows.train import train
    from pricelevel.registry.tracking import mlflow_client

    root = project_folder(tmp_path / "project")
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the tuner ran out of memory")

    monkeypatch.setattr(tuning_tasks, "tune_step", out_of_memory)
    overrides = [*SMALL, "data.symbols=[ETHUSDT]", "lookahead.enabled=false"]
    with pytest.raises(MemoryError):
        train(overrides=overrides)
    from pricelevel.config import load_project_config

    client = mlflow_client(load_project_config(None, overrides).tracking)
    runs = client.search_runs([client.get_experiment_by_name("pricelevel").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]


def test_the_training_flow_trains_it_beside_the_lstm_on_the_same_rows_and_logs_it(trained):
    root, first = trained
    config, client = _client(root)
    run = client.get_run(first["run_id"])
    metrics = run.data.metrics
    for name in ("gbm_test_pr_auc", "gbm_test_roc_auc", "gbm_test_direction_auc", "gbm_val_sharpe", "gbm_fold0_sharpe",
                 "gbm_fold0_pr_auc", "gbm_wf_mean_sharpe", "gbm_wf_worst_sharpe", "gbm_wf_mean_pr_auc"):
        assert name in metrics, name
        assert first["scores"][name] == pytest.approx(metrics[name], nan_ok=True)
    assert 0.0 <= metrics["gbm_test_pr_auc"] <= 1.0

    # Beside the LSTM in the report: a row in every fold's table and in the mean/worst table.
    markdown = first["walk_forward_markdown"]
    folds = config.evaluation.folds
    assert markdown.count("\n| gbm |") == folds + 1 and "## LightGBM baseline (`gbm`)" in markdown
    assert "gbm in " in markdown.split("beat:")[-1]
    logged = Path(client.download_artifacts(run.info.run_id, "walk_forward.md")).read_text()
    assert logged == markdown
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "gbm_baseline.json")).read_text())
    assert len(report["folds"]) == folds

    # The same rows as the LSTM, fold by fold: same bars, same targets.
    (gbm_folder,) = (root / "data" / "derived" / "gbm").iterdir()
    (lstm_folder,) = (root / "data" / "derived" / "models").iterdir()
    for k in range(folds):
        for segment in ("val", "test"):
            ours = pd.read_parquet(gbm_folder / f"fold-{k}" / f"{segment}_predictions.parquet")
            theirs = pd.read_parquet(lstm_folder / f"fold-{k}" / f"{segment}_predictions.parquet")
            pd.testing.assert_frame_equal(ours[["symbol", "timestamp", "target"]], theirs[["symbol", "timestamp", "target"]])
            assert not np.allclose(ours["probability"], theirs["probability"])
