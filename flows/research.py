"""Research flow: the whole retrain -> promote -> trade loop replayed over history (docs/concepts/promotion.md "Research: the
whole loop, backtested").

    load-config -> rolling-backtest (per step: cut the candles at the step, retrain, the promotion gate against
        the champion, trade the champion until the next step) -> rolling.json + rolling.html

Nothing is registered: the models live in a throwaway work area under the output folder.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from pricelevel.research.rolling import RollingConfig
from tasks.notify import notify_failure
from tasks.research import rolling
from tasks.runtime import load_run_config

DEFAULT_START, DEFAULT_EVERY, DEFAULT_OUT = "2023-07-01", "60d", "data/research/rolling"


@flow(name="research-rolling", on_failure=[notify_failure])
def research_rolling(
    config_file: str | None = None, overrides: list[str] | None = None, start: str = DEFAULT_START,
    every: str = DEFAULT_EVERY, end: str | None = None, data: str | None = None, out: str = DEFAULT_OUT,
    keep_candles: bool = False,
) -> dict:
    """``data``: a candle folder (default: the validated store, else the bundled sample)."""
    import pandas as pd

    from pricelevel.core.runtime import project_root
    from pricelevel.data.store import Layer

    config = load_run_config(config_file, overrides)
    if data is None:
        validated = config.catalogue.layer_dir(Layer.VALIDATED)
        data = str(validated if any(validated.glob("*.parquet")) else config.data.sample_dir)
    settings = RollingConfig(start=pd.Timestamp(start, tz="UTC"), every=pd.Timedelta(every),
                             end=pd.Timestamp(end, tz="UTC") if end else None, keep_candles=keep_candles)
    folder = Path(out) if Path(out).is_absolute() else project_root() / out
    return rolling(config, data, settings, str(folder))
