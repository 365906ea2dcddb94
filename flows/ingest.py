"""Ingest flow: for every symbol x timeframe, ingest then validate; fails if any dataset failed.

    ingest-candles(S, TF) --> validate-candles(S, TF)     (fanned out over all datasets)
                                      \\-> summarize-ingest

A failing dataset stops only its own branch; the others are still published, then the run fails with a
message naming every failed dataset.
"""

from __future__ import annotations

from prefect import flow
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.config import load_run_config
from tasks.ingest import ingest_candles, summarize_ingest, validate_candles


class IngestFailed(RuntimeError):
    """At least one dataset could not be ingested or did not pass validation."""


@flow(name="ingest", task_runner=ThreadPoolTaskRunner(max_workers=4))
def ingest(
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> list[dict]:
    config = load_run_config(config_file, overrides, symbols=symbols, timeframes=timeframes, start=start, end=end)
    fetch = ingest_candles.with_options(
        retries=config.flow.task_retries, retry_delay_seconds=config.flow.task_retry_delay_s
    )
    branches: dict[str, PrefectFuture] = {}
    for symbol in config.data.symbols:
        for timeframe in config.data.timeframes:
            ingested = fetch.submit(config, symbol, str(timeframe))
            branches[f"{config.data.source} {symbol} {timeframe}"] = validate_candles.submit(config, ingested)

    rows, failures = [], []
    for dataset, future in branches.items():
        future.wait()
        if future.state.is_completed():
            outcome = future.result()
            rows.append(
                {"dataset": dataset, "status": outcome.status, "rows": outcome.rows,
                 "warnings": len(outcome.warnings), "validated": str(outcome.validated_path),
                 "report": str(outcome.report_markdown)}
            )
        else:
            error = future.result(raise_on_failure=False)
            message = str(error).splitlines()[0] if error else future.state.message
            failures.append(f"{dataset}: {message}")
            rows.append({"dataset": dataset, "status": "failed", "rows": None, "warnings": None,
                         "validated": None, "report": message})
    summarize_ingest(rows)
    if failures:
        raise IngestFailed(f"{len(failures)} of {len(branches)} datasets failed:\n" + "\n".join(failures))
    return rows
