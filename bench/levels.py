"""Benchmark: support/resistance levels, compiled, against the scikit-learn implementation they replaced; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/levels.py [--bars 1000000] [--repeat 3] [--sklearn-refits 200] [--quick]

Synthetic input: a seeded geometric random walk of hourly candles (consistent OHLC, random volume); its 4h and 1d
candles are resampled from it. Reported (best of ``--repeat`` where timed, compile excluded: everything is
warmed up on a small input first):

- ``extrema``: :func:`local_extrema` (window 12) on all bars; goal >= 20M bars/s.
- ``walk_forward``: :func:`walk_forward_levels`, refit every 24 bars over a trailing 730-day window, every
  filter off; goal <= 1 s. The scikit-learn path (``tests/reference_levels.py``, the independent test oracle:
  plain Python loops and DBSCAN at every refit, slower than the vectorised code this replaced) is timed on
  ``--sklearn-refits`` refits spread over the run, and its full time *extrapolated* (mean per refit x refits,
  plus its one-off preparation); those sampled level sets are compared to ours.
- ``walk_forward_filters``: the same with every filter on (extra information, no goal).
- ``btcusdt_1h``: the bundled BTCUSDT 1h candles with ``LevelsConfig()`` and their 1d/4h context, ours against
  the reference (both timed, results compared).
- ``labels``: :func:`pricelevel.levels.clustering.dbscan_1d` against ``sklearn.cluster.DBSCAN`` on random inputs
  (integer grids where distances equal eps exactly, duplicates, floats) and on windows of real extrema prices.
- ``compile``: the first call in fresh processes: ``cold_s`` with an empty numba cache, ``cached_s`` with the
  on-disk cache (what every later process pays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import sklearn
from sklearn.cluster import DBSCAN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the reference implementation lives with the tests

from pricelevel.core.timeframes import Timeframe  # noqa: E402
from pricelevel.data.folder import CandleFolder  # noqa: E402
from pricelevel.levels.clustering import dbscan_1d  # noqa: E402
from pricelevel.levels.config import LevelsConfig  # noqa: E402
from pricelevel.levels.history import read_context  # noqa: E402
from pricelevel.levels.walkforward import MultiTimeframe, local_extrema, walk_forward_levels  # noqa: E402
from tests import reference_levels as reference  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
SYMBOLS = ("ADAUSDT", "BNBUSDT", "BTCUSDT", "DOGEUSDT", "DOTUSDT", "ETHUSDT", "LINKUSDT", "LTCUSDT", "SOLUSDT",
           "XRPUSDT")
FILTERS = ("touches", "age", "volume", "approach")
GOAL_EXTREMA_BARS_PER_S = 20e6
GOAL_WALK_FORWARD_S = 1.0

FIRST_CALL = """
import time, numpy as np, pandas as pd
t = time.perf_counter()
from pricelevel.levels.config import LevelsConfig
from pricelevel.levels.walkforward import MultiTimeframe, walk_forward_levels
close = 100 + np.sin(np.arange(400) / 7.0)
frame = pd.DataFrame({"timestamp": pd.date_range("2024-01-01", periods=400, freq="1h", tz="UTC"), "open": close,
                      "high": close + 1, "low": close - 1, "close": close, "volume": 1.0, "turnover": close})
walk_forward_levels(frame, "1h", LevelsConfig(lookback_days=5, refit_every=6), MultiTimeframe(d1=frame, h4=frame))
print(time.perf_counter() - t)
"""


def synthetic_candles(n_bars: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    returns = rng.normal(0, 0.002, n_bars)
    close = 100 * np.exp(np.cumsum(returns))
    open_ = np.r_[close[0], close[:-1]]
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.001, n_bars)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.001, n_bars)))
    volume = rng.lognormal(0, 0.5, n_bars) * (1 + 200 * np.abs(returns))
    return pd.DataFrame({
        "timestamp": pd.date_range("2000-01-01", periods=n_bars, freq="1h", tz="UTC", unit="ns"),
        "open": open_, "high": high, "low": low, "close": close, "volume": volume, "turnover": close * volume,
    })


def resampled(candles: pd.DataFrame, rule: str) -> pd.DataFrame:
    groups = candles.set_index("timestamp").resample(rule)
    frame = pd.DataFrame({
        "open": groups["open"].first(), "high": groups["high"].max(), "low": groups["low"].min(),
        "close": groups["close"].last(), "volume": groups["volume"].sum(), "turnover": groups["turnover"].sum(),
    })
    return frame.dropna().reset_index()


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def first_call_seconds(cache_dir: str | None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def same_block(history, asof_ns: int, block: list[dict]) -> bool:
    """Our rows at one refit against the reference's rows for it."""
    rows = history.levels[history.levels["asof"] == pd.Timestamp(asof_ns, tz="UTC")]
    rows = rows.drop(columns="asof").reset_index(drop=True)
    try:
        pd.testing.assert_frame_equal(rows, reference.levels_frame(block, with_asof=False), check_exact=True)
    except AssertionError:
        return False
    return True


def bench_walk_forward(candles: pd.DataFrame, repeat: int, sklearn_refits: int) -> dict:
    config = LevelsConfig.model_validate({
        "refit_every": 24, "lookback_days": 730, "filters": {name: {"enabled": False} for name in FILTERS},
    })
    seconds, history = best_of(repeat, lambda: walk_forward_levels(candles, Timeframe.H1, config))
    n_refits = len(history.refits)

    started = time.perf_counter()
    inputs = reference.prepare(candles, Timeframe.H1, config, None, False)
    prepare_s = time.perf_counter() - started
    refit_ns = history.refits.as_unit("ns").asi8
    sample = refit_ns[np.unique(np.linspace(0, n_refits - 1, min(sklearn_refits, n_refits)).round().astype(int))]
    per_refit, identical = [], True
    for t in sample.tolist():
        started = time.perf_counter()
        block = reference.levels_at(inputs, t, config, False)
        per_refit.append(time.perf_counter() - started)
        identical &= same_block(history, t, block)
    mean_refit_s = float(np.mean(per_refit))
    extrapolated = prepare_s + mean_refit_s * n_refits
    return {
        "bars": len(candles),
        "refit_every": config.refit_every,
        "lookback_days": config.lookback_days,
        "filters": "all disabled",
        "refits": n_refits,
        "levels": len(history.levels),
        "walk_forward_s": round(seconds, 4),
        "goal_s": GOAL_WALK_FORWARD_S,
        "goal_walk_forward_met": bool(seconds <= GOAL_WALK_FORWARD_S),
        "sklearn_refits_timed": len(sample),
        "sklearn_s_per_refit": round(mean_refit_s, 6),
        "sklearn_extrapolated_full_s": round(extrapolated, 1),
        "sklearn_time_is": "extrapolated: mean of the timed refits x refits + the oracle's preparation "
                           "(tests/reference_levels.py: plain Python loops around DBSCAN)",
        "speedup_vs_sklearn_extrapolated": round(extrapolated / seconds, 1),
        "sampled_refits_identical_to_sklearn_path": bool(identical),
    }


def bench_filters(candles: pd.DataFrame, repeat: int) -> dict:
    context = MultiTimeframe(d1=resampled(candles, "1D"), h4=resampled(candles, "4h"))
    config = LevelsConfig(refit_every=24, lookback_days=730)
    seconds, history = best_of(repeat, lambda: walk_forward_levels(candles, Timeframe.H1, config, context))
    raw_s, raw = best_of(1, lambda: walk_forward_levels(candles, Timeframe.H1, config, context, raw=True))
    return {
        "bars": len(candles),
        "context": "4h and 1d resampled from the synthetic 1h candles",
        "filters": "all enabled (LevelsConfig defaults)",
        "walk_forward_filters_s": round(seconds, 4),
        "walk_forward_filters_raw_s": round(raw_s, 4),
        "levels_kept": len(history.levels),
        "levels_raw": len(raw.levels),
        "levels_kept_note": "random volume is unrelated to price: few levels, if any, reach volume.factor 1.3",
    }


def bench_real(repeat: int) -> dict:
    config = LevelsConfig()
    folder = CandleFolder.open(SAMPLE)
    candles = folder.read("BTCUSDT", Timeframe("1h"))
    context = read_context(folder, "BTCUSDT", config)
    seconds, history = best_of(repeat, lambda: walk_forward_levels(candles, Timeframe.H1, config, context))
    reference_s, expected = best_of(1, lambda: reference.walk_forward_levels(candles, Timeframe.H1, config, context))
    try:
        pd.testing.assert_frame_equal(history.levels, expected.levels, check_exact=True)
        identical = bool(history.refits.equals(expected.refits))
    except AssertionError:
        identical = False
    return {
        "bars": len(candles),
        "refits": len(history.refits),
        "levels": len(history.levels),
        "walk_forward_s": round(seconds, 4),
        "reference_sklearn_s": round(reference_s, 3),
        "speedup": round(reference_s / seconds, 1),
        "identical_to_reference": identical,
    }


def random_cases(n_cases: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        n = int(rng.integers(1, 400))
        min_samples = int(rng.integers(1, 9))
        kind = case % 3
        if kind == 0:  # integers: distances exactly eps, duplicates
            yield rng.integers(-40, 40, n).astype(np.float64), float(rng.integers(1, 6)), min_samples
        elif kind == 1:  # a few clumps plus noise
            centres = rng.uniform(0, 100, int(rng.integers(1, 8)))
            points = rng.choice(centres, n) + rng.normal(0, rng.uniform(0.05, 3), n)
            yield points, float(rng.uniform(0.1, 3)), min_samples
        else:  # a price walk, tick-rounded, eps from the median as the levels use it
            points = np.round(100 * np.exp(np.cumsum(rng.normal(0, 0.01, n))), 2)
            yield points, 0.005 * float(np.median(points)), min_samples


def real_cases(windows_per_series: int):
    config = LevelsConfig()
    for symbol in SYMBOLS:
        for timeframe in ("1h", "4h"):
            close = pd.read_parquet(SAMPLE / f"{symbol}_{timeframe}.parquet")["close"].to_numpy()
            is_max, is_min = local_extrema(close, config.window)
            prices = close[is_max | is_min]
            for start in np.linspace(0, max(prices.size - 700, 0), windows_per_series).astype(int).tolist():
                window = prices[start : start + 700]
                for min_samples in (2, config.min_samples, 9):
                    yield window, config.eps_frac * float(np.median(window)), min_samples


def bench_labels(n_random: int, windows_per_series: int) -> dict:
    counts = {"random": 0, "real": 0}
    identical = True
    for name, cases in (("random", random_cases(n_random)), ("real", real_cases(windows_per_series))):
        for points, eps, min_samples in cases:
            expected = DBSCAN(eps=eps, min_samples=min_samples).fit(points[:, None]).labels_
            identical &= bool(np.array_equal(dbscan_1d(points, eps, min_samples), expected))
            counts[name] += 1
    return {
        "random_cases": counts["random"],
        "real_extrema_windows": counts["real"],
        "labels_identical_to_sklearn": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bars", type=int, default=1_000_000, help="synthetic hourly bars")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is reported)")
    parser.add_argument("--sklearn-refits", type=int, default=200, help="refits timed on the scikit-learn path")
    parser.add_argument("--quick", action="store_true", help="200k bars, fewer refits and label cases")
    args = parser.parse_args()
    if args.quick:
        args.bars, args.repeat, args.sklearn_refits = 200_000, 1, 40
    n_random, windows_per_series = (300, 4) if args.quick else (2000, 20)

    started = time.perf_counter()
    small = synthetic_candles(3000)
    walk_forward_levels(small, Timeframe.H1, LevelsConfig(lookback_days=30),
                        MultiTimeframe(d1=resampled(small, "1D"), h4=resampled(small, "4h")))
    dbscan_1d(np.array([1.0, 2.0]), 1.0, 1)
    warmup_s = time.perf_counter() - started

    candles = synthetic_candles(args.bars)
    close = candles["close"].to_numpy()
    extrema_s, _ = best_of(max(args.repeat, 5), lambda: local_extrema(close, 12))
    result = {
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "sklearn": sklearn.__version__,
        },
        "compile": {
            "warmup_in_process_s": round(warmup_s, 2),
            "cold_s": round(first_call_seconds(tempfile.mkdtemp(prefix="numba-cold-")), 2),
            "cached_s": round(first_call_seconds(None), 2),
        },
        "extrema": {
            "bars": args.bars,
            "window": 12,
            "extrema_s": round(extrema_s, 5),
            "extrema_bars_per_s": round(args.bars / extrema_s),
            "goal_bars_per_s": GOAL_EXTREMA_BARS_PER_S,
            "goal_extrema_met": bool(args.bars / extrema_s >= GOAL_EXTREMA_BARS_PER_S),
        },
        "walk_forward": bench_walk_forward(candles, args.repeat, args.sklearn_refits),
        "walk_forward_filters": bench_filters(candles, args.repeat),
        "btcusdt_1h": bench_real(args.repeat),
        "labels": bench_labels(n_random, windows_per_series),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
