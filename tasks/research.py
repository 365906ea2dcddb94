"""Prefect task of the research flow: the rolling backtest (one library call) and its files, logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config
from pricelevel.data.folder import CandleFolder
from pricelevel.research.report import rolling_markdown, write_rolling
from pricelevel.research.rolling import RollingConfig, rolling_backtest


@task(name="rolling-backtest", cache_policy=NO_CACHE)
def rolling(config: Config, data: str, rolling_config: RollingConfig, out: str) -> dict[str, Any]:
    """Retrain, promote and trade at every step on the candles closed by then; ``rolling.json`` and
    ``rolling.html`` in ``out``."""
    logger = get_run_logger()
    folder = Path(out)
    result = rolling_backtest(config, CandleFolder.open(Path(data)), rolling_config, folder, log=logger.info)
    json_path, html_path = write_rolling(result, folder, config.tuning.metric, config.selection.metric)
    markdown = rolling_markdown(result)
    create_markdown_artifact(key="rolling-backtest", markdown=markdown, description="The whole loop, backtested")
    logger.info("%s", markdown)
    return {"json": str(json_path), "html": str(html_path), "markdown": markdown,
            "scores": {name: score.to_dict() for name, score in result.scores.items()},
            "steps": [{"at": str(s.at), "decision": "promoted" if s.decision.promote else "rejected",
                       "champion": s.champion_after, "reason": s.decision.reason} for s in result.steps]}
