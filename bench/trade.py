"""Benchmark: the live trader's figures (README "Live trading"); prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trade.py [--bars 1000] [--timeframe 1h] [--exchange-bars 120]
        [--model models:/pricelevel@champion --tracking-uri sqlite:///mlruns/mlflow.db]

1. **Per-bar latency**, from the candles closed by a bar being available to the order intents, split as the
   trader times every bar (``BarReport.timings``): candles (the feed's cut), model (queued commands and
   the registry's answer to where ``@champion`` points: the hot-swap check), features (the incremental table
   builder, one per symbol), prediction (the LSTM on every symbol's window), decision (signals and the risk
   manager), execution (the paper engine), persistence (the bar's state transaction). p50/p99/max over
   ``--bars`` bars of the bundled sample's 10 symbols; the first bar (each symbol's table built in full once)
   is reported apart. Also the replay's speed (bars per second) and the process's memory.
2. **Against the local fake exchange** (``tests.fakes.bybit_trading``, real HTTP on 127.0.0.1, signed v5
   requests through pybit): ``--exchange-bars`` bars traded through the exchange broker; intent -> answer per
   order (from the intent's commit in the state database to the exchange's answer); restart -> reconciled
   (a new trader on the same state: model from the registry, broker state, reconciliation with the
   exchange); duplicate client ids the exchange saw (must be 0).

The model: by default one with the demo champion's architecture and feature set (``conf/quick.yaml``) at
``--timeframe`` on all bundled symbols, with seeded, untrained weights (the latency does not depend on what the
weights learned) and an entry threshold at the 90th percentile of its own probabilities, so it trades; it is
registered in a temporary MLflow store and loaded through the registry as the trader loads ``@champion``.
``--model URI --tracking-uri URI`` measures a registered model instead (the demo champion after ``make demo``,
at its own timeframe). Run on one thread; on a shared machine read the medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fake exchange lives in tests/fakes
PARTS = ("candles", "model", "features", "prediction", "decision", "execution", "persistence", "total")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bars", type=int, default=1000)
    parser.add_argument("--timeframe", default="1h")
    parser.add_argument("--exchange-bars", type=int, default=120)
    parser.add_argument("--model", default=None, help="a registered model URI (default: build the demo-sized one)")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()

    from pricelevel.core.runtime import bootstrap

    bootstrap(threads=1)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the fake's access log
    with tempfile.TemporaryDirectory(prefix="pricelevel-bench-trade-") as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        tracking, uri, about = model_under_test(args, tmp_path)
        setup_s = time.perf_counter() - started
        paper = paper_replay(tracking, uri, tmp_path, args.bars)
        exchange = exchange_run(tracking, uri, tmp_path, args.exchange_bars)
    print(json.dumps({
        "benchmark": "live trader: per-bar latency, exchange round trips, restart, memory",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": 1},
        "model": {**about, "setup_s": round(setup_s, 1)},
        "paper_replay": paper,
        "fake_exchange": exchange,
        "goal": {"p99_total_ms_at_most": 50, "met": paper["latency_ms"]["total"]["p99"] <= 50},
    }, indent=2))


def model_under_test(args, tmp_path: Path):
    """(tracking config, model URI, description): a registered model, or the demo-sized one built here."""
    from pricelevel.registry.config import TrackingConfig

    if args.model:
        tracking = TrackingConfig(tracking_uri=args.tracking_uri or "sqlite:///mlruns/mlflow.db")
        return tracking, args.model, {"uri": args.model, "weights": "trained (registered)"}
    return demo_sized_model(tmp_path, args.timeframe)


def demo_sized_model(tmp_path: Path, timeframe: str):
    import torch

    from pricelevel.config import load_project_config
    from pricelevel.data.folder import CandleFolder
    from pricelevel.inference.scoring import predict_tables, tables_for_spec
    from pricelevel.ml.dataset import fit_normalization
    from pricelevel.ml.model import MultiSymbolLSTM
    from pricelevel.ml.spec import ModelSpec
    from pricelevel.registry.config import TrackingConfig
    from pricelevel.registry.tracking import ensure_experiment, log_pricelevel_model, mlflow_client
    from pricelevel.registry.versions import ALIAS_CHAMPION, register_version, set_alias

    config = load_project_config(str(ROOT / "conf" / "quick.yaml"), [f"dataset.timeframe={timeframe}"])
    table_spec = config.table_spec
    folder = CandleFolder.open(ROOT / "data" / "sample")
    symbols = tuple(s for s in config.data.symbols if folder.has(s, table_spec.timeframe))
    columns = tuple(table_spec.columns)
    torch.manual_seed(config.model.seed)
    hparams = {"n_features": len(columns), "n_symbols": len(symbols), "embedding_dim": config.model.embedding_dim,
               "hidden_size": config.model.hidden_size, "num_layers": config.model.num_layers,
               "dropout": config.model.dropout}
    module = MultiSymbolLSTM(**hparams).eval()

    def spec(normalization, rules) -> ModelSpec:
        return ModelSpec(symbols=symbols, features=columns, seq_len=config.dataset.seq_len, timeframe=timeframe,
                         horizon=config.labels.horizon, normalization=normalization,
                         levels=config.levels.model_dump(mode="json"), labels=config.labels.model_dump(mode="json"),
                         hparams=dict(module.hparams), feature_config=config.features.model_dump(mode="json"),
                         rules=rules)

    tables = tables_for_spec(folder, spec({}, {"threshold": 0.5}), symbols)  # the spec's inputs, before its statistics
    first = tables[symbols[0]].frame.timestamps
    normalization = fit_normalization([t.frame for t in tables.values()], first[len(first) // 2])

    def predict(features: np.ndarray, symbol_id: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(module(torch.from_numpy(features), torch.from_numpy(symbol_id))).numpy()

    scored = predict_tables(predict, spec(normalization, {"threshold": 0.5}), tables, since=first[-2000])
    rules = {"threshold": float(np.quantile(scored["probability"], 0.9)), "tp_stop": config.labels.move_frac,
             "max_hold_bars": config.labels.horizon, "sizing": "fraction", "fraction": 0.1}
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                              artifact_location=str(tmp_path / "mlruns" / "artifacts"))
    client = mlflow_client(tracking)
    run = client.create_run(ensure_experiment(client, "bench", tracking.artifact_location))
    example = {"features": np.zeros((1, config.dataset.seq_len, len(columns)), np.float32),
               "symbol_id": np.zeros(1, np.int64)}
    logged = log_pricelevel_model(client, run.info.run_id, module, spec(normalization, rules), example)
    client.set_terminated(run.info.run_id)
    version = register_version(client, "bench", logged, run.info.run_id, {})
    set_alias(client, "bench", ALIAS_CHAMPION, version.version)
    about = {"uri": "models:/bench@champion", "weights": "seeded, untrained (demo architecture)",
             "timeframe": timeframe, "symbols": len(symbols), "features": len(columns),
             "seq_len": config.dataset.seq_len, "hidden_size": config.model.hidden_size,
             "num_layers": config.model.num_layers}
    return tracking, "models:/bench@champion", about


def paper_replay(tracking, uri: str, tmp_path: Path, bars: int) -> dict:
    from pricelevel.backtest.config import BacktestConfig
    from pricelevel.data.folder import CandleFolder
    from pricelevel.trading.config import RiskConfig
    from pricelevel.trading.service import open_replay, registry_models
    from pricelevel.trading.state import StateStore

    models = registry_models(tracking, uri)
    store = StateStore(f"sqlite:///{tmp_path}/paper.db")
    replay = open_replay(CandleFolder.open(ROOT / "data" / "sample"), models, store, BacktestConfig(), RiskConfig())
    chosen = replay.bars[-bars:]
    rss_before = rss_mb()
    reports: list = []
    started = time.perf_counter()
    replay.trader.replay(chosen, reports.append)
    wall = time.perf_counter() - started
    rest = reports[1:]
    orders = sum(len(r.outcome.fills) for r in reports if r.outcome is not None)
    store.close()
    return {
        "bars": len(reports), "symbols": len(models.symbols), "timeframe": str(replay.trader.timeframe),
        "first_bar_ms": {p: round(1e3 * reports[0].timings.get(p, 0.0), 1) for p in PARTS},
        "latency_ms": {p: percentiles([r.timings.get(p, 0.0) for r in rest]) for p in PARTS},
        "bars_over_50_ms": sum(r.timings.get("total", 0.0) > 0.05 for r in rest),
        "feature_rebuilds": sum(b.rebuilds for b in replay.trader._builders.values()),
        "fills": orders, "bars_per_s": round(len(reports) / wall, 1), "wall_s": round(wall, 1),
        "memory_mb": {"rss_after_replay": rss_mb(), "rss_growth_during_replay": round(rss_mb() - rss_before, 1),
                      "peak_rss_of_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
    }


def exchange_run(tracking, uri: str, tmp_path: Path, bars: int) -> dict:
    from werkzeug.serving import make_server

    from pricelevel.backtest.config import BacktestConfig
    from pricelevel.core.secrets import Secrets
    from pricelevel.data.config import BybitConfig
    from pricelevel.data.folder import CandleFolder
    from pricelevel.trading.bybit import BybitBroker
    from pricelevel.trading.config import RiskConfig
    from pricelevel.trading.feeds import ReplayFeed
    from pricelevel.trading.service import exchange_execution, registry_models
    from pricelevel.trading.state import StateStore
    from pricelevel.trading.trader import Trader
    from tests.fakes.bybit_trading import FakeBybitExchange

    fake = FakeBybitExchange(balances={"USDT": 100_000.0})
    models = registry_models(tracking, uri)
    for symbol in models.symbols:
        if symbol != "BTCUSDT":
            fake.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001",
                                min_order_qty="0.0001")
    server = make_server("127.0.0.1", 0, fake.wsgi_app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    secrets = Secrets.from_env({"BYBIT_API_KEY": fake.api_key, "BYBIT_API_SECRET": fake.api_secret})
    config = BybitConfig(timeout_s=5.0, max_attempts=3, backoff_s=0.05, backoff_max_s=0.5)
    spec = models.current.spec
    timeframe = spec.table_spec().timeframe
    feed = ReplayFeed(CandleFolder.open(ROOT / "data" / "sample"), models.symbols, spec.table_spec().input_timeframes)
    state_url = f"sqlite:///{tmp_path}/exchange.db"
    risk, costs = RiskConfig(), BacktestConfig()
    committed: dict[int, float] = {}
    round_trips: list[float] = []

    def checkpoint(stage: str) -> None:  # one order at a time: committed -> sent -> answered
        if stage == "committed":
            committed[0] = time.perf_counter()
        elif stage == "answered" and 0 in committed:
            round_trips.append(time.perf_counter() - committed.pop(0))

    def trader() -> Trader:
        exchange = BybitBroker(config, "testnet", secrets, endpoint=endpoint)
        make = exchange_execution(exchange, StateStore(state_url), models.symbols, checkpoint=checkpoint)
        return Trader(StateStore(state_url), registry_models(tracking, uri), feed, make, risk, costs)

    try:
        running = trader()
        bar_s = []
        for bar in feed.bar_times(timeframe)[-bars:]:
            for symbol, frames in feed.frames.items():
                row = frames[timeframe].loc[frames[timeframe]["timestamp"] == bar, "close"]
                if len(row):
                    fake.set_price(symbol, float(row.iloc[0]))
            report = running.on_bar_close(bar)
            bar_s.append(report.timings.get("total", 0.0))
        running.store.close()
        restarted = time.perf_counter()
        again = trader()
        problems = again.reconcile()
        restart_s = time.perf_counter() - restarted
        again.store.close()
    finally:
        server.shutdown()
    link_ids = [order["orderLinkId"] for order in fake.created]
    return {
        "endpoint": "127.0.0.1 (werkzeug, threaded), signed v5 requests through pybit",
        "bars": len(bar_s), "orders_sent": len(link_ids),
        "intent_to_answer_ms": percentiles(round_trips),
        "bar_total_ms": percentiles(bar_s),
        "restart_to_reconciled_s": round(restart_s, 2), "reconciliation_problems": problems,
        "duplicate_client_ids": len(link_ids) - len(set(link_ids)),
    }


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = 1e3 * np.asarray(seconds)
    return {"n": len(ms), "p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "max": round(float(ms.max()), 2), "mean": round(float(ms.mean()), 2)}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


if __name__ == "__main__":
    main()
