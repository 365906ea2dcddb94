"""Publishing: a raw dataset that passed is published byte for byte; a check is skipped only when the bytes,
the validation settings and the validation code are all the same as last time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pricelevel.core.files import file_sha256
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import GapPolicy, ValidationConfig
from pricelevel.data.publish import validate_and_publish
from pricelevel.data.store import DatasetKey, Layer
from pricelevel.data.validation import DataValidationError
from tests.conftest import real_candles

KEY = DatasetKey("sample", "BTCUSDT", "1h")


@pytest.fixture
def catalogue(tmp_path: Path) -> DataCatalogue:
    catalogue = DataCatalogue(tmp_path, "sample")
    catalogue.store.upsert(Layer.RAW, KEY, real_candles(rows=2000))  # holds the 2021-02-11 04:00 outage hour
    return catalogue


def test_published_bytes_are_the_raw_bytes_that_were_checked(catalogue: DataCatalogue) -> None:
    outcome = validate_and_publish(catalogue, KEY, ValidationConfig())
    raw, validated = catalogue.store.path(Layer.RAW, KEY), catalogue.store.path(Layer.VALIDATED, KEY)
    assert outcome.status == "published" and validated.read_bytes() == raw.read_bytes()
    record = json.loads(outcome.report_json.read_text())
    assert record["raw_sha256"] == record["validated_sha256"] == file_sha256(validated)
    assert validate_and_publish(catalogue, KEY, ValidationConfig()).status == "unchanged"


def test_tightening_the_gap_policy_checks_data_that_passed_before(catalogue: DataCatalogue) -> None:
    assert validate_and_publish(catalogue, KEY, ValidationConfig()).status == "published"
    validated = catalogue.store.path(Layer.VALIDATED, KEY)
    digest = file_sha256(validated)
    strict = ValidationConfig(gaps=GapPolicy(max_gap_bars=0))  # the one-hour outage is now a failure
    with pytest.raises(DataValidationError, match="max_gap_bars=0"):
        validate_and_publish(catalogue, KEY, strict)
    assert file_sha256(validated) == digest  # the last good copy stays
    assert list(catalogue.layer_dir(Layer.QUARANTINE).glob("BTCUSDT_1h.*.parquet"))
    # Back to the old policy: checked again (the last check failed), published, then a no-op.
    assert validate_and_publish(catalogue, KEY, ValidationConfig()).status == "published"
    assert validate_and_publish(catalogue, KEY, ValidationConfig()).status == "unchanged"
