"""Lifecycle messages of the flows on Telegram (``telegram:``; off unless enabled): the promotion decision,
and a failed run through an ``on_failure`` hook. Neither ever fails or slows a flow beyond
``telegram.lifecycle_timeout_s``."""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pricelevel.config import Config, load_project_config
from pricelevel.telegram.commands import failure_text, promotion_text
from pricelevel.telegram.service import send_lifecycle


@task(name="notify-promotion", cache_policy=NO_CACHE)
def notify_promotion(config: Config, outcome: dict[str, Any]) -> bool:
    """The promote flow's outcome (promoted / rejected with its numbers, or a rollback) to the authorised chats."""
    sent = send_lifecycle(config.telegram, "promotion", promotion_text(config.tracking.registered_model, outcome),
                          os.environ)
    get_run_logger().info("telegram: promotion message %s", "sent" if sent else "not sent (disabled or unreachable)")
    return sent


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` hook: tell the authorised chats that a run failed (config from the run's own
    ``config_file`` and ``overrides`` parameters). A subflow (the ingest inside ``train``) stays silent: its
    parent fails with it and sends the one message. Never raises."""
    try:
        if getattr(flow_run, "parent_task_run_id", None) is not None:
            return
        parameters = flow_run.parameters or {}
        config = load_project_config(parameters.get("config_file"), parameters.get("overrides") or [])
        send_lifecycle(config.telegram, "pipeline", failure_text(flow.name, flow_run.name, state.message), os.environ)
    except Exception as exc:  # a hook must not turn a failed run into a crashed one
        logging.getLogger(__name__).warning("telegram: failure message not sent: %r", exc)
