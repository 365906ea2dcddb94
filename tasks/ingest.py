"""Prefect tasks around the ingest and validation library calls (no logic of their own)."""

from __future__ import annotations

import os

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.ingest import IngestResult, ingest_dataset
from pricelevel.publish import PublishOutcome, report_paths, validate_and_publish
from pricelevel.secrets import Secrets
from pricelevel.sources.factory import open_source
from pricelevel.store import CandleStore, DatasetKey
from pricelevel.timeframes import Timeframe
from pricelevel.validation import DataValidationError


def _artifact_key(*parts: str) -> str:
    return "-".join(parts).lower().replace("_", "-")


@task(name="ingest-candles", task_run_name="ingest {symbol} {timeframe}", cache_policy=NO_CACHE)
def ingest_candles(config: Config, symbol: str, timeframe: str) -> IngestResult:
    """Fetch what the raw store lacks for one dataset (network-facing: the flow gives it retries)."""
    source = open_source(config.data, config.bybit, Secrets.from_env(os.environ))
    end = pd.Timestamp(config.data.end) if config.data.end else pd.Timestamp.now(tz="UTC")
    result = ingest_dataset(
        source, CandleStore(config.data.root), symbol, Timeframe(timeframe), pd.Timestamp(config.data.start), end
    )
    get_run_logger().info(
        "%s: %d new candles (%d -> %d) in %s", result.key, result.rows_added, result.rows_before, result.rows_after, result.path
    )
    return result


@task(name="validate-candles", task_run_name="validate {ingested.key}", cache_policy=NO_CACHE)
def validate_candles(config: Config, ingested: IngestResult) -> PublishOutcome:
    """Validate one raw dataset; publish it, or quarantine it and fail this branch with a clear message."""
    store = CandleStore(config.data.root)
    logger = get_run_logger()
    try:
        outcome = validate_and_publish(store, ingested.key, config.validation)
    except DataValidationError as exc:
        json_path, md_path = report_paths(store, ingested.key)
        _link_report(ingested.key, exc.report.to_markdown(), json_path, md_path)
        logger.error("%s", exc)
        raise
    for warning in outcome.warnings:
        logger.warning("%s: %s", ingested.key, warning)
    if outcome.status == "published":
        _link_report(ingested.key, outcome.report_markdown.read_text(), outcome.report_json, outcome.report_markdown)
    logger.info("%s: %s (%d rows) -> %s", ingested.key, outcome.status, outcome.rows, outcome.validated_path)
    return outcome


def _link_report(key: DatasetKey, markdown: str, json_path, md_path) -> None:
    artifact = _artifact_key("validation", key.source, key.symbol, str(key.timeframe))
    create_markdown_artifact(
        key=artifact,
        markdown=f"{markdown}\n\nReport files: `{md_path}` · `{json_path}`\n",
        description=f"Validation of {key}",
    )
    create_link_artifact(key=f"{artifact}-file", link=md_path.resolve().as_uri(), link_text=str(md_path))


@task(name="summarize-ingest", cache_policy=NO_CACHE)
def summarize_ingest(rows: list[dict]) -> list[dict]:
    """One table artifact per run: every dataset, what came in, and where it went."""
    create_table_artifact(key="ingest-summary", table=rows, description="Ingest and validation, per dataset")
    return rows
