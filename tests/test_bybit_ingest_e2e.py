"""`pricelevel ingest` against a fake Bybit v5 server on 127.0.0.1, as in the issue's acceptance check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.fakes.bybit_server import FakeBybit, Fault, random_candles

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

API_KEY, API_SECRET = "PLKEYabcdef123456", "PLSECRETzyxw987654321"


@pytest.fixture
def fake_bybit(httpserver) -> tuple[FakeBybit, str]:
    fake = FakeBybit()
    httpserver.expect_request("/v5/market/kline").respond_with_handler(fake.handle)
    return fake, httpserver.url_for("").rstrip("/")


def test_ingest_from_bybit_stores_exactly_what_was_served_despite_faults(
    cli, project: Path, fake_bybit, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = fake_bybit
    served = random_candles("2024-06-25", 24 * 75, "1h", seed=7)  # more than asked for, on both sides
    fake.add("BTCUSDT", "1h", served)
    fake.fail_next(Fault.rate_limit(), Fault.http(429), Fault.http(502), Fault.http(403))
    monkeypatch.setenv("PRICELEVEL_DATA__SOURCE", "bybit")
    monkeypatch.setenv("PRICELEVEL_BYBIT__ENDPOINT", url)
    monkeypatch.setenv("BYBIT_API_KEY", API_KEY)
    monkeypatch.setenv("BYBIT_API_SECRET", API_SECRET)

    args = ("ingest", "--symbols", "BTCUSDT", "--timeframes", "1h", "--start", "2024-07-01", "--end", "2024-09-01",
            "--set", "bybit.backoff_s=0.01")
    code, out, err = cli(*args)
    assert code == 0, err
    stored = pd.read_parquet(project / "data" / "raw" / "bybit" / "BTCUSDT_1h.parquet")
    expected = served[(served.timestamp >= "2024-07-01") & (served.timestamp < "2024-09-01")].reset_index(drop=True)
    assert len(stored) == 62 * 24
    pd.testing.assert_frame_equal(stored, expected)
    validated = pd.read_parquet(project / "data" / "validated" / "bybit" / "BTCUSDT_1h.parquet")
    pd.testing.assert_frame_equal(validated, expected)
    assert not fake.faults  # every injected fault was met and survived

    # Run again: nothing new, so only the empty tail is asked for and every file stays byte-identical.
    files = {p: p.read_bytes() for p in (project / "data").rglob("*") if p.is_file() and "sample" not in p.parts}
    requests_before = len(fake.requests)
    code, out2, err2 = cli(*args)
    assert code == 0, err2
    assert {p: p.read_bytes() for p in files} == files
    assert len(fake.requests) - requests_before <= 1

    # Secrets never appear in what the run printed or wrote.
    written = b"".join(files.values())
    for secret in (API_KEY, API_SECRET):
        assert secret not in out + err + out2 + err2
        assert secret.encode() not in written
