"""Validate a raw dataset and publish it: to ``validated/`` when it passes, to ``quarantine/`` when not.

Downstream steps read only ``validated/``, so a failing batch never reaches them and the last good copy
stays in place. Every check writes a JSON and a Markdown report (paths: :mod:`pricelevel.data.catalogue`).

Safe with several processes: the raw file is read once, and exactly those bytes are validated and, if they
pass, published (an ingest that rewrites the raw file meanwhile cannot slip unchecked candles in); the
publish step holds the validated dataset's lock. A dataset whose raw bytes were already validated under
the same validation config and code is not checked again (a cheap hourly no-op); tightening the gap
policy, or a new rule, checks it again.

A dataset that keeps failing for the same rows (the same bad candle, checked again at every bar of the
live feed) is quarantined once per episode: the first failure copies the raw file to ``quarantine/``, the
repeats point at that copy (:func:`pricelevel.data.ingest.forget_bad_candles` has bad candles fetched again).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pricelevel.core.cache import code_fingerprint
from pricelevel.core.files import atomic_write, file_sha256, write_text
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.catalogue import DataCatalogue
from pricelevel.data.config import ValidationConfig
from pricelevel.data.store import DatasetKey, Layer, parse_dataset_filename
from pricelevel.data.validation import DataValidationError, ValidationReport, validate_candles


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


class DatasetQuarantined(DataValidationError):
    """A raw dataset failed validation; ``quarantine_path`` is the copy kept for inspection (made at the
    first failure of an episode: a repeat of the same failure points at the same copy)."""

    def __init__(self, report: ValidationReport, quarantine_path: Path) -> None:
        super().__init__(report)
        self.quarantine_path = quarantine_path


def failure_signature(report: ValidationReport) -> str:
    """What makes two failures "the same bad rows": each failed rule and its offending candles (their values,
    not their row positions or the row count, which move as candles are added)."""
    issues = [
        [issue.title, [{k: v for k, v in row.items() if k != "row"} for row in issue.examples]]
        for issue in report.failures
    ]
    return hashlib.sha256(json.dumps(issues, sort_keys=True, default=str).encode()).hexdigest()


def validation_fingerprint(config: ValidationConfig) -> str:
    """What a past check depends on besides the bytes: the rules' settings and the rules' code."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True) + code_fingerprint(validate_candles)
    return hashlib.sha256(text.encode()).hexdigest()


def validate_bytes(data: bytes, key: DatasetKey, config: ValidationConfig, where: Path | str) -> ValidationReport:
    """Validate the bytes of a candle file as they are (they may be broken in any way)."""
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # an unreadable file is a validation failure, not a crash
        frame = pd.DataFrame({"unreadable": [f"{type(exc).__name__}: {exc}"]})
    return validate_candles(frame, key.timeframe, config, dataset=f"{key} ({where})")


def validate_file(path: Path, key: DatasetKey, config: ValidationConfig) -> ValidationReport:
    """Validate any candle file as it is on disk."""
    return validate_bytes(Path(path).read_bytes(), key, config, path)


def validate_and_publish(catalogue: DataCatalogue, key: DatasetKey, config: ValidationConfig) -> PublishOutcome:
    """Check the raw dataset ``key``; publish it or quarantine it. Raises :class:`DatasetQuarantined` (a
    :class:`DataValidationError`).

    On failure the raw file is copied to ``quarantine/<source>/<SYMBOL>_<TF>.<sha12>.parquet`` next to its
    report (unless the last check failed for the same rows and its copy is still there: one copy per
    episode), ``validated/`` is left exactly as it was, and the error names dataset, expectation and rows.
    """
    store = catalogue.store
    raw_path = store.path(Layer.RAW, key)
    json_path, md_path = catalogue.validation_reports(key)
    validated_path = store.path(Layer.VALIDATED, key)
    if not raw_path.exists():
        raise FileNotFoundError(f"{key}: no raw candles at {raw_path}; run `pricelevel ingest` first")
    raw = raw_path.read_bytes()  # one consistent version: the store replaces files atomically
    raw_sha = hashlib.sha256(raw).hexdigest()
    checked_with = validation_fingerprint(config)

    previous = _read_json(json_path)
    if (
        previous.get("raw_sha256") == raw_sha
        and previous.get("validation_fingerprint") == checked_with
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

    report = validate_bytes(raw, key, config, raw_path)
    record = {
        "dataset": str(key), "raw_path": str(raw_path), "raw_sha256": raw_sha,
        "validation_fingerprint": checked_with, "report": report.to_dict(),
    }
    with store.lock(Layer.VALIDATED, key):
        if not report.success:
            signature = failure_signature(report)
            last = _read_json(json_path)  # read again under the lock: another process may have just failed it
            kept = last.get("quarantine_path")
            if last.get("failure_signature") == signature and kept and Path(kept).exists():
                quarantine = Path(kept)  # the same bad rows again: this episode already has its copy
            else:
                quarantine = catalogue.quarantine(key, raw_sha)
                atomic_write(quarantine, lambda tmp: Path(tmp).write_bytes(raw))
                write_text(quarantine.with_suffix(".md"), report.to_markdown())
            record["quarantine_path"] = str(quarantine)
            record["failure_signature"] = signature
            _write_reports(json_path, md_path, record, report)
            raise DatasetQuarantined(report, quarantine)
        atomic_write(validated_path, lambda tmp: Path(tmp).write_bytes(raw))
        record["validated_path"] = str(validated_path)
        record["validated_sha256"] = raw_sha
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


def publish_all(
    catalogue: DataCatalogue, config: ValidationConfig
) -> Iterator[tuple[DatasetKey, PublishOutcome | DataValidationError]]:
    """:func:`validate_and_publish` for every raw dataset of every source, yielding each outcome or failure."""
    keys = list(catalogue.store.datasets(Layer.RAW))
    if not keys:
        raise FileNotFoundError(f"no raw datasets under {catalogue.root / 'raw'}; run `pricelevel ingest` first")
    for key in keys:
        try:
            yield key, validate_and_publish(catalogue, key, config)
        except DataValidationError as exc:
            yield key, exc


def file_keys(paths: Iterable[Path], timeframe: Timeframe | None = None) -> list[tuple[Path, DatasetKey]]:
    """Dataset keys (source ``file``) of loose files named ``SYMBOL_TF.parquet``, or of any name with ``timeframe``."""
    keys = []
    for path in paths:
        parsed = parse_dataset_filename(path.name)
        if timeframe is None and parsed is None:
            raise ValueError(f"{path}: cannot tell the timeframe from the name; pass --timeframe")
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file")
        symbol = parsed[0] if parsed else Path(path).stem
        keys.append((Path(path), DatasetKey("file", symbol, Timeframe(timeframe) if timeframe else parsed[1])))
    return keys


def _write_reports(json_path: Path, md_path: Path, record: dict, report: ValidationReport) -> None:
    write_text(json_path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    write_text(md_path, report.to_markdown())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
