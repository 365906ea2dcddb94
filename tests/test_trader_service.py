"""The trading service as a user runs it (`pricelevel trade --mode testnet`, a process of its own) against the fake
Bybit v5 exchange on 127.0.0.1:

- a first start during an exchange outage waits for the exchange instead of exiting (it used to die with
  ``CandleFolderError ... no such folder``), says so, and starts trading when it answers;
- SIGTERM mid-bar (the step stuck in an exchange call that hangs) ends it within 5 s with exit code 0, nothing
  half-committed (it used to wait for the bar in progress: 10-13 s, past ``docker stop``'s 10 s);
- a revoked key stops it at once with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pricelevel.trading.state import EQUITY, StateStore
from tests.fakes.bybit_trading import FakeBybitExchange, TradeFault
from tests.fakes.trading_model import SYMBOLS, TinyModel, register_tiny_model

ROOT = Path(__file__).resolve().parents[1]
PRICELEVEL = ROOT / ".venv" / "bin" / "pricelevel"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        return register_tiny_model(tmp_path_factory.mktemp("service"))


@pytest.fixture
def fake(httpserver) -> FakeBybitExchange:
    fake = FakeBybitExchange(balances={"USDT": 10_000.0})
    for symbol in SYMBOLS[1:]:
        fake.add_instrument(symbol, symbol.removesuffix("USDT"), "USDT", base_precision="0.0001", min_order_qty="0.0001")
    fake.install(httpserver)
    return fake


def _start(tiny: TinyModel, fake: FakeBybitExchange, url: str, tmp_path: Path) -> subprocess.Popen:
    sets = {"trader.endpoint": url, "bybit.endpoint": url, "data.source": "bybit", "data.root": str(tmp_path / "data"),
            "trader.state_url": f"sqlite:///{tmp_path}/state.db", "tracking.tracking_uri": tiny.tracking.tracking_uri,
            "tracking.artifact_location": tiny.tracking.artifact_location, "trader.poll_delay_s": 0,
            "bybit.timeout_s": 20, "bybit.max_attempts": 3, "bybit.backoff_s": 0.5, "bybit.backoff_max_s": 1,
            # offline like every test: the streams find nothing listening here (else pybit dials Bybit's testnet)
            "trader.stream_endpoint": "ws://127.0.0.1:9"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM", "BYBIT", "PRICELEVEL_"))}
    env |= {"BYBIT_API_KEY": fake.api_key, "BYBIT_API_SECRET": fake.api_secret, "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}
    command = [str(PRICELEVEL), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "trade", "--mode", "testnet"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(predicate, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"the service exited ({process.returncode}): {process.stdout.read()[-3000:]}"
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"timed out; the service said: {process.communicate()[0][-3000:]}")


def _stop(process: subprocess.Popen) -> tuple[float, int, str]:
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    return time.monotonic() - sent, process.returncode, out


@pytest.mark.slow
def test_a_first_start_during_an_outage_waits_and_sigterm_mid_bar_stops_within_5_s(tiny, fake, httpserver, tmp_path) -> None:
    url = httpserver.url_for("").rstrip("/")
    fake.set_outage(503)
    process = _start(tiny, fake, url, tmp_path)
    _wait(lambda: sum(fake.outage_answers.values()) >= 6, 120, process)  # it keeps asking; it did not exit
    time.sleep(2)
    assert process.poll() is None, "a first start during an outage must wait for the exchange"
    # The exchange answers again, but its answers hang: SIGTERM lands while the service's step (reconciling on
    # the exchange's return) waits on one.
    asked = len(fake.requests)
    fake.fail_next(*[TradeFault("slow", seconds=25)] * 4)
    fake.set_outage(None)
    _wait(lambda: len(fake.requests) > asked, 90, process)
    time.sleep(0.5)
    seconds, code, out = _stop(process)
    assert code == 0, out[-3000:]
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert seconds < 5, f"stopped {seconds:.1f} s after SIGTERM"
    assert "unavailable" in out and "Traceback" not in out, out[-3000:]
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    assert len(store.frame(EQUITY)) <= 1, "the bar in progress was not committed half-done"


@pytest.mark.slow
def test_a_revoked_key_stops_the_service_with_one_line(tiny, fake, httpserver, tmp_path) -> None:
    fake.revoke_key()
    process = _start(tiny, fake, httpserver.url_for("").rstrip("/"), tmp_path)
    try:
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and "10003" in out and "Traceback" not in out, out[-3000:]
