"""Benchmark: the live trader's per-bar features, full rebuild against the incremental builder; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/features_latency.py [--config conf/base.yaml] [--bars 300]
        [--full-bars 48] [--rows 64] [--symbols BTCUSDT,ETHUSDT,...]

For every symbol of the bundled sample (10 by default) and each of the last ``--bars`` bars of the config's
timeframe, the candles closed by the bar's close (as the replay feed hands them to the trader) go through
``TableSpec.build`` (what ``Trader.score`` recomputes today) and :class:`TableBuilder.update` (one builder per
symbol, fed bar after bar). A bar's time is the sum over the symbols, in ms: that is the features part of the
latency from a closed candle to the order intent. Reported as wall and as CPU time (the process's own: steadier
on a shared machine): p50, p99, mean, max and total of both (the full rebuild on the last ``--full-bars`` bars
only: it costs ~0.1 s per symbol and bar), the incremental builder's refit bars and other bars apart, its first
update (a full build that sets up its state), and whether the two gave identical outputs on every bar both
computed (history and table, to the bit). Run on one thread; on a shared machine read the medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pricelevel.config import load_project_config
from pricelevel.core.timeframes import utc_ns
from pricelevel.data.folder import CandleFolder
from pricelevel.features.incremental import TableBuilder
from pricelevel.features.lookahead import cut_frames

ROOT = Path(__file__).resolve().parents[1]


def stats(ms: list[tuple[float, float]]) -> dict:
    """Wall and CPU time per bar (ms); on a shared machine the CPU time is the steadier one."""
    out: dict[str, float | int] = {"bars": len(ms)}
    for k, kind in enumerate(("wall", "cpu")):
        values = np.asarray([m[k] for m in ms]) if ms else np.full(1, np.nan)
        out |= {
            f"{kind}_p50_ms": round(float(np.median(values)), 3),
            f"{kind}_p99_ms": round(float(np.percentile(values, 99)), 3),
            f"{kind}_mean_ms": round(float(values.mean()), 3), f"{kind}_max_ms": round(float(values.max()), 3),
            f"{kind}_total_s": round(float(values.sum()) / 1e3, 3),
        }
    return out


def timed(fn, *args):
    """``fn(*args)`` and the (wall, CPU) ms it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    return value, ((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3)


def identical(table, history, full_history, full_table, rows: int) -> bool:
    try:
        pd.testing.assert_frame_equal(history.levels, full_history.levels, check_exact=True)
        pd.testing.assert_index_equal(history.refits, full_history.refits, exact=True)
        pd.testing.assert_frame_equal(table, full_table.iloc[-rows:], check_exact=True)
    except AssertionError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/base.yaml")
    parser.add_argument("--bars", type=int, default=300)
    parser.add_argument("--full-bars", type=int, default=48)
    parser.add_argument("--rows", type=int, default=64, help="rows the builder returns (the model's seq_len)")
    parser.add_argument("--symbols", default=None, help="comma-separated; default: the config's data.symbols")
    args = parser.parse_args()

    config = load_project_config(ROOT / args.config)
    spec = config.table_spec
    folder = CandleFolder.open(ROOT / "data" / "sample")
    symbols = args.symbols.split(",") if args.symbols else list(config.data.symbols)
    frames = {s: spec.read_frames(folder, s) for s in symbols}
    bar_ns = sorted(set.intersection(*(set(utc_ns(f[spec.timeframe]["timestamp"]).tolist()) for f in frames.values())))
    bar_ns = bar_ns[-(args.bars + 1) :]  # one more: the builders' first update, a full build, is not a timed bar
    close_ns = [t + spec.timeframe.nanoseconds for t in bar_ns]
    period = spec.levels.refit_every * spec.timeframe.nanoseconds
    refit = [t // period != previous // period for previous, t in zip(bar_ns[:-1], bar_ns[1:], strict=True)]

    builders = {s: TableBuilder(spec, args.rows) for s in symbols}
    first = [timed(builders[s].update, cut_frames(frames[s], close_ns[0]))[1] for s in symbols]

    incremental, full, same = [], [], True
    full_from = len(close_ns) - min(args.full_bars, args.bars)
    gc.collect()
    for k, until in enumerate(close_ns[1:], start=1):
        cut = {s: cut_frames(frames[s], until) for s in symbols}  # the feed's work, not timed
        outputs, bar = {}, np.zeros(2)
        for s in symbols:
            outputs[s], took = timed(builders[s].update, cut[s])
            bar += took
        incremental.append(tuple(bar))
        if k >= full_from:
            bar = np.zeros(2)
            for s in symbols:
                built, took = timed(spec.build, cut[s])
                bar += took
                same &= identical(outputs[s], builders[s].history, *built, args.rows)
            full.append(tuple(bar))

    refit_ms = [ms for ms, r in zip(incremental, refit, strict=True) if r]
    other_ms = [ms for ms, r in zip(incremental, refit, strict=True) if not r]
    report = {
        "benchmark": "features per closed bar, all symbols together: full rebuild vs incremental builder",
        "config": args.config, "timeframe": str(spec.timeframe), "feature_set": spec.features.set,
        "columns": len(spec.columns), "symbols": len(symbols), "rows_returned": args.rows,
        "history_bars": int(len(frames[symbols[0]][spec.timeframe])),
        "first_bar": str(pd.Timestamp(bar_ns[1], tz="UTC")), "last_bar": str(pd.Timestamp(bar_ns[-1], tz="UTC")),
        "full_rebuild": stats(full),
        "incremental": {**stats(incremental), "refit_bars": stats(refit_ms), "other_bars": stats(other_ms),
                        "first_update_wall_ms": round(sum(w for w, _ in first), 1),
                        "rebuilds_after_first": sum(b.rebuilds - 1 for b in builders.values())},
        "speedup_cpu_p50": round(float(np.median([c for _, c in full])) / float(np.median([c for _, c in incremental])), 1),
        "identical_on_full_bars": bool(same),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
