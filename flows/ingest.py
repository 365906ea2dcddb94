"""Ingest flow: for every symbol x timeframe, ingest then validate; fails if any dataset failed.

    ingest-candles(S, TF) --> validate-candles(S, TF)     (fanned out over all datasets, flow.max_workers at once)
                                      \\-> summarize-ingest

One clock reading per run: every dataset of a run is fetched up to the same candle. A failing dataset stops
only its own branch; the others are still published, then the run fails with a message naming every failed
dataset.
"""

from __future__ import annotations

from prefect import flow

from pricelevel.data.ingest import ingest_window
from tasks.ingest import IngestFailed, collect_outcomes, ingest_candles, summarize_ingest, validate_candles
from tasks.notify import notify_failure
from tasks.runtime import fan_out, load_run_config

__all__ = ["IngestFailed", "ingest"]


@flow(name="ingest", on_failure=[notify_failure])
def ingest(
    symbols: list[str] | None = None,
    timeframes: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> list[dict]:
    config = load_run_config(config_file, overrides, symbols=symbols, timeframes=timeframes, start=start, end=end)
    window = ingest_window(config.data)
    fetch = ingest_candles.with_options(retries=config.flow.task_retries, retry_delay_seconds=config.flow.task_retry_delay_s)
    with fan_out(config.flow) as runner:
        branches = {}
        for symbol in config.data.symbols:
            for timeframe in config.data.timeframes:
                fetched = runner.submit(fetch, {"config": config, "symbol": symbol, "timeframe": str(timeframe),
                                                "window": window})
                validated = runner.submit(validate_candles, {"config": config, "ingested": fetched})
                branches[f"{config.data.source} {symbol} {timeframe}"] = (fetched, validated)
        rows, failures = collect_outcomes(branches)
    summarize_ingest(rows)
    if failures:
        raise IngestFailed(f"{len(failures)} of {len(branches)} datasets failed:\n" + "\n".join(failures))
    return rows
