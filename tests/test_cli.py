"""The command line as a user meets it: exit codes, one-line errors, files it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pricelevel.core.files import file_sha256
from tests.conftest import real_candles


def _copy(frame: pd.DataFrame, folder: Path, name: str = "BTCUSDT_1h.parquet") -> Path:
    path = folder / name
    frame.to_parquet(path)
    return path


def test_validate_accepts_a_real_file(cli, sample_dir: Path, project: Path) -> None:
    code, out, _ = cli("validate", str(sample_dir / "BTCUSDT_1h.parquet"), str(sample_dir / "ETHUSDT_4h.parquet"))
    assert code == 0
    assert "ok" in out and "30362 rows" in out and "gap" in out.lower()  # 14 outage hours: a warning


CORRUPTIONS = {
    "nan": (lambda f: f.assign(close=f.close.where(f.index != 7)), "not_be_null"),
    "high_below_low": (lambda f: f.assign(high=f.high.where(f.index != 7, f.low * 0.5)), "high"),
    "negative_volume": (lambda f: f.assign(volume=f.volume.where(f.index != 7, -1.0)), "volume"),
    "duplicate": (lambda f: pd.concat([f, f.iloc[[7]]]).sort_values("timestamp"), "unique"),
    "missing_column": (lambda f: f.drop(columns=["volume"]), "volume"),
    "empty": (lambda f: f.iloc[:0], "row_count"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_validate_rejects_a_corrupted_copy_and_leaves_the_store_alone(cli, tmp_path: Path, project: Path, kind: str) -> None:
    validated = project / "data" / "validated" / "sample" / "BTCUSDT_1h.parquet"
    validated.parent.mkdir(parents=True)
    real_candles(rows=300).to_parquet(validated)
    digest = file_sha256(validated)
    corrupt, needle = CORRUPTIONS[kind]
    path = _copy(corrupt(real_candles(rows=300)), tmp_path)
    code, out, err = cli("validate", str(path))
    assert code == 1
    assert "FAILED" in out and str(path) in out and needle in out
    assert file_sha256(validated) == digest


def test_validate_needs_a_timeframe_it_can_tell(cli, tmp_path: Path, project: Path) -> None:
    path = _copy(real_candles(rows=10), tmp_path, "candles.parquet")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "pass --timeframe" in err
    code, out, _ = cli("validate", str(path), "--timeframe", "1h")
    assert code == 0 and "ok" in out


def test_config_errors_are_one_line_with_a_hint(cli, project: Path) -> None:
    code, out, err = cli("data", "status", "--set", "data.source=ftp")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: config error: data.source") and lines[1].startswith("hint:")
    assert "Traceback" not in err


def test_debug_shows_the_traceback(cli, project: Path) -> None:
    from pricelevel.core.config import ConfigError

    with pytest.raises(ConfigError):
        cli("data", "status", "--set", "data.source=ftp", "--debug")


def test_data_status_reports_rows_ranges_and_gaps(cli, project: Path) -> None:
    code, _, _ = cli("validate")
    assert code == 2  # nothing ingested yet: a usage error with a hint
    raw = project / "data" / "raw" / "sample"
    raw.mkdir(parents=True)
    frame = real_candles(rows=1000)
    frame.drop(index=[10, 11, 12]).to_parquet(raw / "BTCUSDT_1h.parquet")
    code, out, _ = cli("validate")  # whole store: publishes what passes
    assert code == 0 and "published" in out
    code, out, _ = cli("data", "status", "--json")
    assert code == 0
    status = {(s["layer"], s["symbol"]): s for s in json.loads(out)}
    assert status[("raw", "BTCUSDT")]["rows"] == 997
    # Our 3-hour hole plus the real 2021-02-11 04:00 outage hour of the bundled data.
    assert status[("validated", "BTCUSDT")]["gaps"] == 2 and status[("validated", "BTCUSDT")]["missing_bars"] == 4
    assert status[("validated", "BTCUSDT")]["largest_gap_bars"] == 3
    assert status[("validated", "BTCUSDT")]["first"] == frame.timestamp.iloc[0].isoformat()
