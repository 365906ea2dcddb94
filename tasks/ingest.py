"""Prefect tasks around the ingest and validation library calls (no logic of their own)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

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


def collect_outcomes(branches: Mapping[str, Sequence[PrefectFuture]]) -> tuple[list[dict], list[str]]:
    """Wait for every branch (its futures in order: fetch, then validate): one summary row each, and one line per
    failed dataset. The first step that did not complete names the failure: the next one never ran (it waited
    on it), and its result would only say that it is still pending."""
    rows, failures = [], []
    for dataset, steps in branches.items():
        message = next(filter(None, (_failure(future) for future in steps)), None)
        rows.append(outcome_row(dataset, None if message else steps[-1].result(), message))
        if message:
            failures.append(f"{dataset}: {message}")
    return rows, failures


def _failure(future: PrefectFuture) -> str | None:
    """None once ``future`` completed; else the first line of its error (or its state's message)."""
    future.wait()
    state = future.state
    if state.is_completed():
        return None
    error = future.result(raise_on_failure=False) if state.is_final() else None
    return str(error).splitlines()[0] if isinstance(error, BaseException) and str(error) else (state.message or state.name)


@task(name="summarize-ingest", cache_policy=NO_CACHE)
def summarize_ingest(rows: list[dict]) -> list[dict]:
    """One table artifact per run: every dataset, what came in, and where it went."""
    create_table_artifact(key="ingest-summary", table=rows, description="Ingest and validation, per dataset")
    return rows
