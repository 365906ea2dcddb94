"""Benchmark: exchange candle close -> order sent over the public kline and private streams; prints JSON.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stream.py [--stream-bars 60] [--stream-timeframe 4h]

The ``stream`` section of ``bench/trade.py`` alone (its docstring says what is measured): a local Bybit speaking
the wire formats (public kline stream, private order/execution stream, REST), the trader wired as the service
wires it in an exchange mode, 10 symbols. Goals (issue 21): close -> order sent p50 <= 1 s, p99 <= 3 s; the
decision itself (features + prediction + risk) p99 <= 50 ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/trade.py, beside this file

from trade import main  # noqa: E402

if __name__ == "__main__":
    main(["--sections", "stream", *sys.argv[1:]])
