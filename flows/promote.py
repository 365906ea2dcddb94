"""Promotion flow: moves ``champion`` to the ``challenger`` only if it earned it (rule: README "Promotion").

    load-contenders -> score (challenger and champion: same newest window, same rows, same target) -> decide
        -> notify-promotion (Telegram, when enabled; a failed run is told by the on_failure hook)

``rollback=True`` instead puts ``champion`` back on the previous champion. Promotions and rollbacks are
serialised: one at a time per store (an inter-process lock; the deployment also has a concurrency limit of 1).
A challenger that does not pass stays ``@challenger`` with the reason tagged: a correct result, not an error.
"""

from __future__ import annotations

import pandas as pd
from prefect import flow, get_run_logger

from tasks.notify import notify_failure, notify_promotion
from tasks.promote import decide_and_record, decision_dict, load_contenders, rollback, score
from tasks.runtime import load_run_config


@flow(name="promote", on_failure=[notify_failure])
def promote(config_file: str | None = None, overrides: list[str] | None = None, rollback_champion: bool = False) -> dict:
    config = load_run_config(config_file, overrides)
    if rollback_champion:
        with config.catalogue.lock("registry", config.tracking.registered_model):
            rolled = rollback(config)
        notify_promotion(config, rolled)  # after the lock: Telegram never holds up another promotion
        return rolled
    with config.catalogue.lock("registry", config.tracking.registered_model):
        challenger, champion = load_contenders(config)
        if challenger is None:
            get_run_logger().warning("no @challenger version: run `pricelevel train` first")
            return {"promote": False, "reason": "no challenger"}
        if champion is not None and champion.version == challenger.version:
            return {"promote": False, "reason": f"version {challenger.version} is already champion"}
        contest = score(config, challenger, champion)
        decision = decide_and_record(config, contest, pd.Timestamp.now(tz="UTC").isoformat())
    outcome = decision_dict(decision) | {"challenger": challenger.version, "champion": champion.version if champion else None}
    notify_promotion(config, outcome)
    return outcome
