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
