"""The whole DAG under a temporary Prefect API, on a small slice of the bundled data with the real config
shrunk: train -> register @challenger -> promote; a re-run reuses everything; a worse challenger is not
promoted; rollback restores the previous champion; the champion scores a folder it has never seen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import SAMPLE

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
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    """One project trained once by the flow; the tests below read it (and some modify its registry)."""
    import shutil

    root = tmp_path_factory.mktemp("train") / "project"
    (root / "data").mkdir(parents=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", root / "conf")
    (root / "data" / "sample").symlink_to(SAMPLE, target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("PRICELEVEL_HOME", str(root))
    torch.set_num_threads(1)
    from flows.train import train

    first = train(overrides=SMALL)
    yield root, first
    mp.undo()


def _client(root: Path):
    from pricelevel.project import load_project_config
    from pricelevel.tracking import mlflow_client

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


def test_promotion_first_model_then_a_worse_challenger_is_not_promoted_and_rollback(trained, tmp_path):
    root, _ = trained
    import mlflow

    from flows.promote import promote
    from pricelevel.registry import move_champion, register_version, set_alias
    from pricelevel.tracking import load_model, log_pricelevel_model, tracking_session

    config, client = _client(root)
    first = promote(overrides=SMALL)
    v1 = client.get_model_version("pricelevel", "1")
    assert v1.tags["promotion.decision"] in ("promoted", "rejected")
    if not first["promote"]:  # the tiny model did not beat the baselines: the rule said so, make it champion to go on
        assert "baseline" in first["reason"]
        move_champion(client, "pricelevel", "1")

    # A deliberately worse challenger: the champion's weights with the head's sign flipped (inverted ranking).
    champion = load_model("models:/pricelevel@champion", client)
    from pricelevel.model import MultiSymbolLSTM

    module = MultiSymbolLSTM(**champion.spec.hparams)
    module.load_state_dict(champion.pyfunc_model.unwrap_python_model().module.state_dict())
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith("head"):
                param.neg_()
    example = {"features": np.zeros((1, champion.spec.seq_len, len(champion.spec.features)), np.float32),
               "symbol_id": np.zeros(1, np.int64)}
    with tracking_session(config.tracking), mlflow.start_run() as run:
        info = log_pricelevel_model(module, champion.spec, example)
    worse = register_version(client, "pricelevel", info.model_uri, run.info.run_id, {})
    set_alias(client, "pricelevel", "challenger", worse.version)

    decision = promote(overrides=SMALL)
    assert not decision["promote"]
    assert str(client.get_model_version_by_alias("pricelevel", "champion").version) == "1"
    assert client.get_model_version("pricelevel", worse.version).tags["promotion.decision"] == "rejected"

    # Force the worse one in, then roll back.
    move_champion(client, "pricelevel", worse.version)
    rolled = promote(overrides=SMALL, rollback_champion=True)
    assert rolled["to"] == "1"
    assert str(client.get_model_version_by_alias("pricelevel", "champion").version) == "1"


def test_champion_backtests_a_folder_it_has_never_seen(trained, tmp_path, cli, monkeypatch):
    root, _ = trained
    monkeypatch.setenv("PRICELEVEL_HOME", str(root))
    config, client = _client(root)
    if client.get_registered_model("pricelevel").aliases.get("champion") is None:
        from pricelevel.registry import move_champion

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
    assert document["metrics"]["portfolio"]["final_value"] > 0
    code, stdout, _ = cli("models", *sum((["--set", s] for s in SMALL), []))
    assert code == 0 and "champion" in stdout


def test_a_leaky_feature_fails_the_training_run_before_anything_is_trained(tmp_path, prefect_harness, monkeypatch):
    import shutil

    import pricelevel.training as training
    from flows.train import train
    from tasks.train import LookaheadError

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", root / "conf")
    (root / "data" / "sample").symlink_to(SAMPLE, target_is_directory=True)
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
