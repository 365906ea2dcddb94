"""Benchmark: ingest + validation of the bundled sample, cold and warm (no-op) — prints JSON.

    .venv/bin/python bench/ingest.py [--symbols BTCUSDT,ETHUSDT] [--timeframes 1d,4h,1h]

Measures the library path (no Prefect server) so the numbers are about our code: the first run writes the
raw and validated layers and runs every expectation; the second must find nothing to do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from pricelevel.config import load_config  # noqa: E402
from pricelevel.data.catalogue import DataCatalogue  # noqa: E402
from pricelevel.data.ingest import ingest_dataset  # noqa: E402
from pricelevel.data.publish import validate_and_publish  # noqa: E402
from pricelevel.data.sources.sample import SampleSource  # noqa: E402


def run_once(catalogue: DataCatalogue, source: SampleSource, config, symbols, timeframes) -> dict:
    timings = {"ingest_s": 0.0, "validate_s": 0.0, "rows": 0, "written": 0}
    for symbol in symbols:
        for tf in timeframes:
            t0 = time.perf_counter()
            result = ingest_dataset(source, catalogue.store, symbol, tf, pd.Timestamp(config.data.start), pd.Timestamp(config.data.end))
            t1 = time.perf_counter()
            outcome = validate_and_publish(catalogue, result.key, config.validation)
            timings["ingest_s"] += t1 - t0
            timings["validate_s"] += time.perf_counter() - t1
            timings["rows"] += result.rows_after
            timings["written"] += int(result.changed) + int(outcome.status == "published")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--symbols", default=None)
    parser.add_argument("--timeframes", default=None)
    args = parser.parse_args()
    overrides = []
    if args.symbols:
        overrides.append(f"data.symbols=[{args.symbols}]")
    if args.timeframes:
        overrides.append(f"data.timeframes=[{args.timeframes}]")
    config = load_config(ROOT / "conf" / "base.yaml", overrides=overrides).with_root(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        store, source = DataCatalogue(Path(tmp), "sample"), SampleSource(config.data.sample_dir)
        cold = run_once(store, source, config, config.data.symbols, config.data.timeframes)
        warm = run_once(store, source, config, config.data.symbols, config.data.timeframes)
    result = {
        "benchmark": "ingest+validate bundled sample",
        "datasets": len(config.data.symbols) * len(config.data.timeframes),
        "cold": cold,
        "warm_noop": warm,
        "cold_rows_per_s": round(cold["rows"] / max(cold["ingest_s"] + cold["validate_s"], 1e-9)),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
