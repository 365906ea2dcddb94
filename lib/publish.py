"""Validate a raw dataset and publish it: to ``validated/`` when it passes, to ``quarantine/`` when not.

Downstream steps read only ``validated/``, so a failing batch never reaches them and the last good copy
stays in place. Every check writes a JSON and a Markdown report under ``<root>/reports/validation``.
A dataset whose raw bytes were already validated is not checked again (cheap hourly no-op).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pricelevel.config import ValidationConfig
from pricelevel.store import (
    CandleStore,
    DatasetKey,
    Layer,
    atomic_write,
    copy_file_atomic,
    file_sha256,
    read_candles,
)
from pricelevel.validation import DataValidationError, ValidationReport, validate_candles


@dataclass(frozen=True)
class PublishOutcome:
    key: DatasetKey
    status: str  # "published", "unchanged" (already validated) or "quarantined"
    rows: int
    warnings: tuple[str, ...]
    validated_path: Path | None
    report_json: Path
    report_markdown: Path
    quarantine_path: Path | None = None
    message: str = ""


def reports_dir(store: CandleStore) -> Path:
    return store.root / "reports" / "validation"


def report_paths(store: CandleStore, key: DatasetKey) -> tuple[Path, Path]:
    stem = reports_dir(store) / key.source / key.filename.removesuffix(".parquet")
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def validate_file(path: Path, key: DatasetKey, config: ValidationConfig) -> ValidationReport:
    """Validate any candle file as it is on disk (it may be broken in any way)."""
    try:
        frame = read_candles(path)
    except Exception as exc:  # an unreadable file is a validation failure, not a crash
        frame = pd.DataFrame({"unreadable": [f"{type(exc).__name__}: {exc}"]})
    return validate_candles(frame, key.timeframe, config, dataset=f"{key} ({path})")


def validate_and_publish(store: CandleStore, key: DatasetKey, config: ValidationConfig) -> PublishOutcome:
    """Check the raw dataset ``key``; publish it or quarantine it. Raises :class:`DataValidationError`.

    On failure the raw file is copied to ``quarantine/<source>/<SYMBOL>_<TF>.<sha12>.parquet`` next to its
    report, ``validated/`` is left exactly as it was, and the error names dataset, expectation and rows.
    """
    raw_path = store.path(Layer.RAW, key)
    json_path, md_path = report_paths(store, key)
    validated_path = store.path(Layer.VALIDATED, key)
    if not raw_path.exists():
        raise FileNotFoundError(f"{key}: no raw candles at {raw_path}; run `pricelevel ingest` first")
    raw_sha = file_sha256(raw_path)

    previous = _read_json(json_path)
    if (
        previous.get("raw_sha256") == raw_sha
        and previous.get("report", {}).get("success")
        and validated_path.exists()
        and previous.get("validated_sha256") == file_sha256(validated_path)
    ):
        return PublishOutcome(
            key=key,
            status="unchanged",
            rows=previous["report"].get("rows", 0),
            warnings=tuple(w.get("summary", "") for w in previous["report"].get("warnings", [])),
            validated_path=validated_path,
            report_json=json_path,
            report_markdown=md_path,
        )

    report = validate_file(raw_path, key, config)
    record = {"dataset": str(key), "raw_path": str(raw_path), "raw_sha256": raw_sha, "report": report.to_dict()}
    if not report.success:
        quarantine = store.layer_dir(Layer.QUARANTINE, key.source) / f"{key.filename[:-8]}.{raw_sha[:12]}.parquet"
        copy_file_atomic(raw_path, quarantine)
        record["quarantine_path"] = str(quarantine)
        _write_text(quarantine.with_suffix(".md"), report.to_markdown())
        _write_reports(json_path, md_path, record, report)
        raise DataValidationError(report)

    copy_file_atomic(raw_path, validated_path)
    record["validated_path"] = str(validated_path)
    record["validated_sha256"] = file_sha256(validated_path)
    _write_reports(json_path, md_path, record, report)
    return PublishOutcome(
        key=key,
        status="published",
        rows=report.rows,
        warnings=tuple(w.summary for w in report.warnings),
        validated_path=validated_path,
        report_json=json_path,
        report_markdown=md_path,
    )


def _write_reports(json_path: Path, md_path: Path, record: dict, report: ValidationReport) -> None:
    _write_text(json_path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    _write_text(md_path, report.to_markdown())


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
