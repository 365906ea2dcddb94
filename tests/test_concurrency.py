"""Writes stay correct with several processes at once (the nightly train's ingest and the hourly ingest
overlap; workers on other machines share the store): real processes, real files, the fake Bybit server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.locks import FileLock, LockTimeout
from pricelevel.data.store import CandleStore, DatasetKey, Layer
from tests.fakes.bybit_server import FakeBybit, random_candles

ROOT = Path(__file__).resolve().parents[1]


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.workers.concurrent", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(processes: list[subprocess.Popen], timeout: float = 300) -> None:
    for process in processes:
        _, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err


@pytest.mark.slow
def test_two_processes_ingesting_overlapping_ranges_keep_exactly_the_union(tmp_path: Path, httpserver) -> None:
    served = random_candles("2024-03-01", 24 * 90, "1h", seed=3)
    fake = FakeBybit(now=lambda: pd.Timestamp("2024-06-01", tz="UTC"))
    fake.add("BTCUSDT", "1h", served)
    httpserver.expect_request("/v5/market/kline").respond_with_handler(fake.handle)
    url = httpserver.url_for("").rstrip("/")
    outs = [tmp_path / f"fetched-{i}.json" for i in range(2)]
    _finish([_spawn("ingest", str(tmp_path / "data"), url, str(seed), "20", str(out)) for seed, out in enumerate(outs)])

    fetched = set().union(*(json.loads(out.read_text()) for out in outs))
    stored = CandleStore(tmp_path / "data").read(Layer.RAW, DatasetKey("bybit", "BTCUSDT", "1h"))
    assert stored["timestamp"].is_unique and stored["timestamp"].is_monotonic_increasing
    assert set(stored["timestamp"].map(pd.Timestamp.isoformat)) == fetched  # nothing lost, nothing invented
    expected = served[served["timestamp"].isin(stored["timestamp"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(stored, expected)
    assert len(fake.requests) > 40 and len(fetched) > 500  # both processes really fetched, many times


def test_two_processes_building_one_key_one_wins_and_the_other_reuses_it(tmp_path: Path) -> None:
    outs = [tmp_path / f"build-{tag}.json" for tag in "ab"]
    _finish([_spawn("build", str(tmp_path), "k1", tag, str(out)) for tag, out in zip("ab", outs, strict=True)])
    results = [json.loads(out.read_text()) for out in outs]
    assert sorted(r["built"] for r in results) == [False, True]
    winner = next(r for r in results if r["built"])
    assert {r["who"] for r in results} == {winner["who"]}  # the loser returned the winner's folder
    step = tmp_path / "derived" / "demo"
    assert sorted(p.name for p in step.iterdir()) == ["k1"]  # no temporary folder left behind
    assert (step / "k1" / "who.txt").read_text() == winner["who"]


def test_a_finished_folder_is_never_replaced(tmp_path: Path) -> None:
    from pricelevel.core.cache import COMPLETE, DerivedStore

    store = DerivedStore(tmp_path)
    first, built = store.build("demo", "k", lambda out: (out / "v").write_text("1"))
    before = (first / "v").stat().st_ino
    again, rebuilt = store.build("demo", "k", lambda out: (out / "v").write_text("2"))
    assert (built, rebuilt) == (True, False) and (again / "v").read_text() == "1" and (again / "v").stat().st_ino == before
    # A folder without the completion marker (an interrupted run of older code) is set aside and rebuilt.
    (tmp_path / "derived" / "demo" / "half").mkdir()
    (tmp_path / "derived" / "demo" / "half" / "v").write_text("torn")
    fixed, built = store.build("demo", "half", lambda out: (out / "v").write_text("whole"))
    assert built and (fixed / "v").read_text() == "whole" and (fixed / COMPLETE).exists()


def test_the_file_lock_excludes_other_processes_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pricelevel.core.locks import FileLock\n"
         f"with FileLock({str(path)!r}):\n    print('held', flush=True); time.sleep(2)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="x.lock"):
            FileLock(path, timeout_s=0.3).acquire()
        started = time.monotonic()
        with FileLock(path, timeout_s=10):
            waited = time.monotonic() - started
        assert waited > 0.5  # it waited for the other process to let go
    finally:
        holder.wait(10)
    failures: list[BaseException] = []

    def contend() -> None:
        try:
            FileLock(path, timeout_s=0.2).acquire()
        except LockTimeout as exc:
            failures.append(exc)

    with FileLock(path):  # another thread of this process is excluded too (each lock has its own descriptor)
        thread = threading.Thread(target=contend)
        thread.start()
        thread.join()
    assert len(failures) == 1
