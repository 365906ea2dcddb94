"""Worker processes for tests/test_concurrency.py: each role is what one of several processes does at once.

    python -m tests.workers.concurrent ingest ROOT URL SEED ROUNDS OUT.json
    python -m tests.workers.concurrent build ROOT KEY TAG OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def ingest(root: str, url: str, seed: str, rounds: str, out: str) -> None:
    """``rounds`` incremental ingests of random overlapping ranges of one dataset; records what was fetched."""
    from pricelevel.core.timeframes import Timeframe
    from pricelevel.data.config import BybitConfig
    from pricelevel.data.ingest import ingest_dataset
    from pricelevel.data.sources.bybit import BybitSource
    from pricelevel.data.store import CandleStore

    rng = np.random.default_rng(int(seed))
    source = BybitSource(BybitConfig(endpoint=url, page_limit=50, backoff_s=0.01, max_attempts=20))
    fetched: set[str] = set()
    real_fetch = source.fetch

    def recording_fetch(*args, **kwargs):
        for page in real_fetch(*args, **kwargs):
            fetched.update(page["timestamp"].map(pd.Timestamp.isoformat))
            yield page

    source.fetch = recording_fetch
    middle, left, right = pd.Timestamp("2024-04-15", tz="UTC"), 0, 0
    for _ in range(int(rounds)):  # each round reaches further out on both sides: there is always something to fetch
        left, right = left + int(rng.integers(12, 48)), right + int(rng.integers(12, 48))
        start, end = middle - pd.Timedelta(hours=left), middle + pd.Timedelta(hours=right)
        ingest_dataset(source, CandleStore(Path(root)), "BTCUSDT", Timeframe.H1, start, end)
    Path(out).write_text(json.dumps(sorted(fetched)))


def build(root: str, key: str, tag: str, out: str) -> None:
    """Build one derived key that another process builds at the same moment."""
    from pricelevel.core.cache import DerivedStore

    def write(folder: Path) -> None:
        time.sleep(0.5)  # both writers are inside their build at once
        (folder / "who.txt").write_text(tag)
        (folder / "data.bin").write_bytes(os.urandom(1 << 16))

    folder, built = DerivedStore(Path(root)).build("demo", key, write)
    Path(out).write_text(json.dumps({"built": built, "folder": str(folder), "who": (folder / "who.txt").read_text()}))


if __name__ == "__main__":
    {"ingest": ingest, "build": build}[sys.argv[1]](*sys.argv[2:])
