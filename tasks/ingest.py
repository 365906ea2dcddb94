"""Prefect tasks around the ingest and validation library calls (no logic of their own)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from pricelevel.config import Config
from pricelevel.core.secrets import Secrets
from pricelevel.core.timeframes import Timeframe
from pricelevel.data.ingest import IngestResult, ingest_dataset, outcome_row
from pricelevel.data.publish import PublishOutcome, validate_and_publish
from pricelevel.data.sources.factory import open_source
from pricelevel.data.store import DatasetKey
from pricelevel.data.validation import DataValidationError


class IngestFailed(RuntimeError):
    """At least one dataset could not be ingested or did not pass validation."""


@task(name="ingest-candles", task_run_name="ingest {symbol} {timeframe}", cache_policy=NO_CACHE)
def ingest_candles(config: Config, symbol: str, timeframe: str, window: tuple[pd.Timestamp, pd.Timestamp]) -> IngestResult:
    """Fetch what the raw store lacks for one dataset up to the run's end (network-facing: the flow retries it)."""
    source = open_source(config.data, config.bybit, Secrets.from_env(os.environ))
    result = ingest_dataset(source, config.catalogue.store, symbol, Timeframe(timeframe), *window)
    get_run_logger().info("%s", result.describe())
    return result


@task(name="validate-candles", task_run_name="validate {ingested.key}", cache_policy=NO_CACHE)
def validate_candles(config: Config, ingested: IngestResult) -> PublishOutcome:
    """Validate one raw dataset; publish it, or quarantine it and fail this branch with a clear message."""
    catalogue = config.catalogue
    logger = get_run_logger()
    try:
        outcome = validate_and_publish(catalogue, ingested.key, config.validation)
    except DataValidationError as exc:
        _link_report(ingested.key, exc.report.to_markdown(), *catalogue.validation_reports(ingested.key))
        logger.error("%s", exc)
        raise
    for warning in outcome.warnings:
        logger.warning("%s: %s", ingested.key, warning)
    if outcome.status == "published":
        _link_report(ingested.key, outcome.report_markdown.read_text(), outcome.report_json, outcome.report_markdown)
    logger.info("%s: %s (%d rows) -> %s", ingested.key, outcome.status, outcome.rows, outcome.validated_path)
    return outcome


def _link_report(key: DatasetKey, markdown: str, json_path, md_path) -> None:
    artifact = "-".join(("validation", key.source, key.symbol, str(key.timeframe))).lower().replace("_", "-")
    create_markdown_artifact(
        key=artifact, markdown=f"{markdown}\n\nReport files: `{md_path}` · `{json_path}`\n", description=f"Validation of {key}"
    )
    create_link_artifact(key=f"{artifact}-file", link=md_path.resolve().as_uri(), link_text=str(md_path))


def collect_outcomes(branches: Mapping[str, PrefectFuture]) -> tuple[list[dict], list[str]]:
    """Wait for every branch: one summary row each, and one line per failed dataset."""
    rows, failures = [], []
    for dataset, future in branches.items():
        future.wait()
        ok = future.state.is_completed()
        error = None if ok else future.result(raise_on_failure=False)
        message = None if ok else (str(error).splitlines()[0] if error else future.state.message)
        rows.append(outcome_row(dataset, future.result() if ok else None, message))
        if not ok:
            failures.append(f"{dataset}: {message}")
    return rows, failures


@task(name="summarize-ingest", cache_policy=NO_CACHE)
def summarize_ingest(rows: list[dict]) -> list[dict]:
    """One table artifact per run: every dataset, what came in, and where it went."""
    create_table_artifact(key="ingest-summary", table=rows, description="Ingest and validation, per dataset")
    return rows
