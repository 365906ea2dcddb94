"""The bundled sample is the shared real data, unchanged: every file matches PROVENANCE.md's sha256."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from pricelevel.core.files import file_sha256
from tests.conftest import SAMPLE

PROVENANCE = (SAMPLE / "PROVENANCE.md").read_text()
RECORDED = dict(re.findall(r"### (\w+_\w+\.parquet).*?sha256 ([0-9a-f]{64})", PROVENANCE, flags=re.S))


def test_every_bundled_file_is_documented() -> None:
    files = sorted(p.name for p in SAMPLE.glob("*.parquet"))
    assert len(files) == 31
    assert sorted(RECORDED) == files


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_bundled_file_matches_its_recorded_checksum(name: str) -> None:
    assert file_sha256(SAMPLE / name) == RECORDED[name]


def test_sample_schema() -> None:
    frame = pd.read_parquet(SAMPLE / "BTCUSDT_1d.parquet")
    assert list(frame.columns) == ["timestamp", "open", "high", "low", "close", "volume"]
    assert str(frame["timestamp"].dtype).startswith("datetime64") and str(frame["timestamp"].dt.tz) == "UTC"
    assert frame["timestamp"].iloc[-1] == pd.Timestamp("2024-06-30", tz="UTC")
