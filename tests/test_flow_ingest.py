"""The ingest flow end to end under a temporary Prefect API, on a small slice of the real sample."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.ingest import IngestFailed, ingest
from pricelevel.core.files import file_sha256

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]
SLICE = dict(symbols=["BTCUSDT", "ETHUSDT"], timeframes=["1d", "4h"], start="2024-01-01", end="2024-07-01")


def _store_digests(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (file_sha256(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "sample" not in p.parts[len(root.parts):][:1]
    }


def test_flow_ingests_validates_and_is_a_no_op_the_second_time(project: Path) -> None:
    rows = ingest(**SLICE)
    assert {r["dataset"] for r in rows} == {f"sample {s} {t}" for s in SLICE["symbols"] for t in SLICE["timeframes"]}
    assert {r["status"] for r in rows} == {"published"}
    validated = pd.read_parquet(project / "data" / "validated" / "sample" / "ETHUSDT_4h.parquet")
    assert len(validated) == 182 * 6 and validated.timestamp.min() == pd.Timestamp("2024-01-01", tz="UTC")
    assert (project / "data" / "reports" / "validation" / "sample" / "ETHUSDT_4h.md").exists()

    before = _store_digests(project / "data")
    again = ingest(**SLICE)
    assert {r["status"] for r in again} == {"unchanged"}
    assert _store_digests(project / "data") == before


def test_bad_data_stops_its_branch_quarantines_and_fails_the_run(project: Path, corrupt_sample: Path) -> None:
    overrides = [f"data.sample_dir={corrupt_sample}"]
    # First a good run of ETH, so there is a validated layer that must stay untouched.
    ingest(symbols=["BTCUSDT"], timeframes=["1d"], start="2024-01-01", end="2024-06-01", overrides=overrides)
    validated = project / "data" / "validated" / "sample" / "BTCUSDT_1d.parquet"
    digest = file_sha256(validated)

    with pytest.raises(IngestFailed) as info:
        ingest(symbols=["BTCUSDT", "ETHUSDT"], timeframes=["1d"], start="2024-01-01", end="2024-07-01", overrides=overrides)
    message = str(info.value)
    assert "1 of 2 datasets failed" in message
    assert "sample BTCUSDT 1d" in message and "high" in message
    assert file_sha256(validated) == digest
    assert len(pd.read_parquet(validated)) == 152  # still the good Jan-May copy
    assert (project / "data" / "validated" / "sample" / "ETHUSDT_1d.parquet").exists()
    quarantined = list((project / "data" / "quarantine" / "sample").glob("BTCUSDT_1d.*.parquet"))
    assert len(quarantined) == 1 and len(pd.read_parquet(quarantined[0])) == 182

    # The failure's report is attached to the run as a Prefect artifact, with the offending row.
    artifacts = _artifacts("validation-sample-btcusdt-1d")
    assert any("2024-06-10" in str(a.data) and "high" in str(a.data) for a in artifacts)
    assert any(a.type == "table" for a in _artifacts("ingest-summary"))


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_one_clock_reading_per_run_and_the_configured_worker_count(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``data.end: null`` every dataset of a run ends at the same candle even while the clock moves on
    (here: a clock that jumps a day at every reading), and the fan-out runs ``flow.max_workers`` at a time."""
    import pricelevel.data.ingest as ingest_module

    readings = iter(pd.date_range("2024-03-01 10:30", periods=50, freq="1D", tz="UTC"))

    class Clock(pd.Timestamp):
        @classmethod
        def now(cls, tz=None):
            return next(readings)

    monkeypatch.setattr(ingest_module.pd, "Timestamp", Clock)
    state = ingest(symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"], timeframes=["1h"], start="2024-02-20",
                   overrides=["data.end=null", "flow.max_workers=1"], return_state=True)
    assert state.is_completed()
    ends = {pd.read_parquet(p).timestamp.max() for p in (project / "data" / "raw" / "sample").glob("*_1h.parquet")}
    assert ends == {pd.Timestamp("2024-03-01 10:00", tz="UTC")}  # the one reading, for all three datasets

    runs = _task_runs(state.state_details.flow_run_id, "ingest-candles")
    assert len(runs) == 3
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert all(later_start >= end for (_, end), (later_start, _) in zip(spans, spans[1:], strict=False))  # one at a time


def _task_runs(flow_run_id, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith(name.replace("-candles", ""))]


def test_flows_bootstrap_the_runtime_themselves_so_deployments_redact_secrets(project: Path, monkeypatch, caplog) -> None:
    """A deployment runs a flow without the CLI: the flow's first task installs the same log redaction."""
    import logging

    from prefect import flow, get_run_logger

    from tasks.runtime import load_run_config

    secret = "PLKEY-deployment-0123456789"
    monkeypatch.setenv("BYBIT_API_KEY", secret)
    factory = logging.getLogRecordFactory()

    @flow
    def like_a_deployment() -> None:
        load_run_config(None, [])
        get_run_logger().info("connecting with %s", secret)

    try:
        with caplog.at_level(logging.INFO):
            like_a_deployment()
    finally:
        logging.setLogRecordFactory(factory)
    messages = [r.getMessage() for r in caplog.records if "connecting with" in r.getMessage()]
    assert messages == ["connecting with ***"]


def test_a_dataset_whose_fetch_fails_is_named_with_the_fetch_error(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its validation never runs (it waits on the fetch): the run's message carries the fetch's own error, not
    Prefect's note that an upstream task did not complete."""
    import tasks.ingest as ingest_tasks

    real = ingest_tasks.ingest_dataset

    def exchange_down_for_eth(source, store, symbol, *args, **kwargs):
        if symbol == "ETHUSDT":
            raise ConnectionError("bybit: the kline of ETHUSDT at https://api.bybit.com: HTTP 503 after 5 attempts")
        return real(source, store, symbol, *args, **kwargs)

    monkeypatch.setattr(ingest_tasks, "ingest_dataset", exchange_down_for_eth)
    with pytest.raises(IngestFailed) as info:
        ingest(symbols=["BTCUSDT", "ETHUSDT"], timeframes=["1d"], start="2024-01-01", end="2024-03-01",
               overrides=["flow.task_retries=0"])
    message = str(info.value)
    assert "1 of 2 datasets failed" in message
    assert "sample ETHUSDT 1d: " in message and "HTTP 503 after 5 attempts" in message, message
