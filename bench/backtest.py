"""Benchmark: the backtest engine against vectorbt on the same random signals, side by side — prints JSON.

    .venv/bin/python bench/backtest.py [--bars 1000000,5000000] [--repeat 7] [--density 0.005]

For each size: one symbol of hourly random-walk candles with consistent OHLC, random entries and exits,
fees, slippage, stop-loss and take-profit, fill at the close and all-in sizing (the setting in which both
must agree; the bench checks they do). Reported per size, best of ``--repeat``:

- ``engine_bars_per_s``: the compiled engine alone (``engine.step``: equity curve + trade records);
  ``engine_cpu_bars_per_s``: the same timed in the thread's CPU time, which a busy machine disturbs much less
  (compare code changes with it when other processes share the cores);
- ``engine_time_stop_bars_per_s``: the same with a time stop (``max_hold_bars``, ``TIME_STOP_BARS``) on top;
- ``engine_protections_bars_per_s``: the same with the trader's account protections on (``PROTECTIONS``: max 5
  positions, the 3-loss cool-down for 24 bars, the daily loss and drawdown checks at every bar and entry, with
  limits they never reach, so trading goes on to the end: a halt would stop it and flatter the timing; the bars
  are timed one minute apart there, since 5M hours do not fit in int64 nanoseconds);
  ``protections_trades`` / ``protections_refused`` say what they did;
- ``run_backtest_bars_per_s``: the library call users make (adds the trade frame);
- ``vectorbt_bars_per_s``: ``Portfolio.from_signals`` on numpy arrays (its fastest input form) + ``final_value``;
- ``vectorbt_pandas_bars_per_s`` (sizes up to 1M): the same with pandas Series and ``freq``, as users call it;
- ``speedup_vs_vectorbt`` = engine / vectorbt on numpy; ``peak_traced_bytes_per_bar`` (tracemalloc during one engine
  call: the arrays it allocates, per bar).

``compile`` is measured in fresh subprocesses: ``cold_s`` with an empty numba cache (compiling), ``cached_s``
with the on-disk cache warm (what every later process pays).
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
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from pricelevel.backtest.config import BacktestConfig  # noqa: E402
from pricelevel.backtest.engine import EngineState, step  # noqa: E402
from pricelevel.backtest.market import Market  # noqa: E402
from pricelevel.backtest.protections import REFUSAL_LABELS  # noqa: E402
from pricelevel.backtest.run import engine_params, run_backtest  # noqa: E402
from pricelevel.core.timeframes import Timeframe, utc_ns  # noqa: E402

#: Random trading loses to costs: over 5M bars equity shrinks by about e^-28. A large initial cash keeps the
#: orders far above vectorbt's ``min_size=1e-8`` units (a rule ours does not have), so both stay comparable.
CONFIG = BacktestConfig(init_cash=1e9, fees=0.0005, slippage=0.0002, sl_stop=0.02, tp_stop=0.04, fill="close",
                        sizing="all_in", min_order_value=0, max_positions=1, protections=None)
#: Time stop of the extra engine timing (vectorbt 1.2 has no time stop, so that run is ours alone).
TIME_STOP_BARS = 24
#: The protections of the extra engine timing: the trader's defaults, with drawdown and daily loss limits that
#: never bind (1.0: only at zero equity), so every check runs and trading never stops.
PROTECTIONS = dict(protections=True, protect_max_positions=5, cooldown_losses=3, cooldown_bars=24, max_drawdown=1.0,
                   daily_loss_limit=1.0)

FIRST_CALL = """
import time, numpy as np
t = time.perf_counter()
from pricelevel.backtest.engine import EngineParams, EngineState, step
a = np.full((3, 1), 10.0); s = np.zeros((3, 1), dtype=bool)
step(EngineState.initial(1, 100.0), EngineParams(), a, a, a, a, s, s)
print(time.perf_counter() - t)
"""


def market(n_bars: int, seed: int = 0) -> Market:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n_bars)))
    open_ = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.0005, n_bars))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.002, n_bars)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.002, n_bars)))
    index = pd.date_range("2000-01-01", periods=n_bars, freq="1h", tz="UTC")
    col = lambda a: np.ascontiguousarray(a[:, None])  # noqa: E731
    return Market(index, ("BTCUSDT",), col(open_), col(high), col(low), col(close), Timeframe.H1)


def best_of(repeat: int, fn, clock=time.perf_counter) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t = clock()
        value = fn()
        best = min(best, clock() - t)
    return best, value


def first_call_seconds(cache_dir: str | None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_size(n_bars: int, repeat: int, density: float, vbt) -> dict:
    m = market(n_bars)
    rng = np.random.default_rng(1)
    entries = rng.random((n_bars, 1)) < density
    exits = rng.random((n_bars, 1)) < density
    params = engine_params(CONFIG)

    def engine():
        return step(EngineState.initial(1, CONFIG.init_cash), params, m.open, m.high, m.low, m.close, entries, exits)

    engine_s, out = best_of(repeat, engine)
    engine_cpu_s, _ = best_of(repeat, engine, time.thread_time)
    timed = engine_params(CONFIG.model_copy(update={"max_hold_bars": TIME_STOP_BARS}))
    time_stop_s, _ = best_of(repeat, lambda: step(EngineState.initial(1, CONFIG.init_cash), timed, m.open, m.high,
                                                  m.low, m.close, entries, exits))
    guarded = replace(params, **PROTECTIONS)
    # one-minute bar times: hours would run past the year 2262, the end of int64 nanoseconds, at 5M bars
    bar = Timeframe.M1.nanoseconds
    times = utc_ns(m.timestamps[:1])[0] + bar * np.arange(n_bars, dtype=np.int64)
    protections_s, protected = best_of(repeat, lambda: _guarded_run(m, guarded, entries, exits, times, bar))
    tracemalloc.start()
    engine()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    library_s, result = best_of(repeat, lambda: run_backtest(m, entries, exits, CONFIG))
    row = {
        "bars": n_bars,
        "trades": int(len(result.trades)),
        "engine_s": round(engine_s, 5),
        "engine_bars_per_s": round(n_bars / engine_s),
        "engine_cpu_bars_per_s": round(n_bars / engine_cpu_s),
        "engine_time_stop_bars_per_s": round(n_bars / time_stop_s),
        "engine_protections_bars_per_s": round(n_bars / protections_s),
        "protections_trades": int(len(protected[0].trades["size"])),
        "protections_refused": dict(zip(REFUSAL_LABELS, protected[1].refused.tolist(), strict=True)),
        "run_backtest_s": round(library_s, 5),
        "run_backtest_bars_per_s": round(n_bars / library_s),
        "peak_traced_bytes_per_bar": round(peak / n_bars, 1),
    }
    if vbt is not None:
        c, o, h, lo = (a[:, 0] for a in (m.close, m.open, m.high, m.low))

        def reference():
            pf = vbt.Portfolio.from_signals(c, entries[:, 0], exits[:, 0], open=o, high=h, low=lo, fees=CONFIG.fees,
                                            slippage=CONFIG.slippage, sl_stop=CONFIG.sl_stop, tp_stop=CONFIG.tp_stop,
                                            init_cash=CONFIG.init_cash)
            return pf, pf.final_value()

        reference()  # compile outside the timing
        vbt_s, (pf, _) = best_of(repeat, reference)
        theirs = pf.value().to_numpy()
        if n_bars <= 1_000_000:  # the way most users call it: Series with a time index (slow; one run)
            series = [pd.Series(a, index=m.timestamps) for a in (c, entries[:, 0], exits[:, 0], o, h, lo)]
            t = time.perf_counter()
            vbt.Portfolio.from_signals(*series[:3], open=series[3], high=series[4], low=series[5], fees=CONFIG.fees,
                                       slippage=CONFIG.slippage, sl_stop=CONFIG.sl_stop, tp_stop=CONFIG.tp_stop,
                                       init_cash=CONFIG.init_cash, freq="1h").final_value()
            row["vectorbt_pandas_bars_per_s"] = round(n_bars / (time.perf_counter() - t))
        row.update({
            "vectorbt_s": round(vbt_s, 5),
            "vectorbt_bars_per_s": round(n_bars / vbt_s),
            "speedup_vs_vectorbt": round(vbt_s / engine_s, 1),
            # bar by bar; vectorbt's own final_value() sums cash flows and drifts from its value() by ~1e-3 here
            "equity_max_rel_diff": float(np.max(np.abs(out.equity - theirs) / np.abs(theirs))),
            "closed_trades_equal": _same_closed_trades(pf.trades.records, out.trades),
        })
    return row


def _guarded_run(m: Market, params, entries, exits, times, bar_ns):
    state = EngineState.initial(1, CONFIG.init_cash)
    return step(state, params, m.open, m.high, m.low, m.close, entries, exits, times=times, bar_ns=bar_ns), state


def _same_closed_trades(theirs, ours: dict) -> bool:
    closed = theirs[theirs["status"] == 1]
    return bool(
        len(closed) == len(ours["size"])
        and np.array_equal(closed["entry_idx"], ours["entry_bar"])
        and np.array_equal(closed["exit_idx"], ours["exit_bar"])
        and np.allclose(closed["exit_price"], ours["exit_price"], rtol=1e-9, atol=0)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", default="1000000,5000000")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--density", type=float, default=0.005, help="chance of an entry (and of an exit) per bar")
    args = parser.parse_args()
    try:
        import vectorbt as vbt
    except ImportError:  # a runtime-only install: report our numbers alone
        vbt = None
    with tempfile.TemporaryDirectory() as empty_cache:
        compile_cold = first_call_seconds(empty_cache)
    first_call_seconds(None)  # make sure the default cache is warm
    report = {
        "benchmark": "backtest",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "signals": {"density": args.density, "fill": CONFIG.fill, "sizing": CONFIG.sizing, "fees": CONFIG.fees,
                    "slippage": CONFIG.slippage, "sl_stop": CONFIG.sl_stop, "tp_stop": CONFIG.tp_stop,
                    "time_stop_bars": TIME_STOP_BARS},
        "compile": {"cold_s": round(compile_cold, 3), "cached_s": round(first_call_seconds(None), 3)},
        "sizes": [bench_size(int(n), args.repeat, args.density, vbt) for n in args.bars.split(",")],
        "vectorbt": getattr(vbt, "__version__", None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
