"""Promotion flow: moves ``champion`` to the ``challenger`` only if it earned it (rule: docs/concepts/promotion.md "Promotion").

    load-contenders -> score (challenger and champion: same newest window, same rows, same target) -> decide
        (and the champion judged again by the same hurdle; retired after ``promotion.retire_after`` failures)
        -> notify-promotion (Telegram, when enabled; a failed run is told by the on_failure hook)

When the challenger already is the champion, the champion alone is judged again (rejudge-champion); a failure
is told on Telegram too.

``rollback=True`` instead puts ``champion`` back on the previous champion. Promotions and rollbacks are
serialised: one at a time per store (an inter-process lock; the deployment also has a concurrency limit of 1).
A challenger that does not pass stays ``@challenger`` with the reason tagged: a correct result, not an error.
"""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from prefect import flow, get_run_logger

from tasks.notify import notify_failure, notify_promotion
from tasks.promote import decide_and_record, decision_dict, load_contenders, rejudge, rollback, score
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
        now = pd.Timestamp.now(tz="UTC").isoformat()
        if champion is not None and champion.version == challenger.version:
            verdict = rejudge(config, score(config, champion, None), now)
            outcome = {"promote": False, "reason": f"version {challenger.version} is already champion\n{verdict.reason}",
                       "champion_verdict": asdict(verdict), "challenger": challenger.version, "champion": champion.version}
        else:
            recorded = decide_and_record(config, score(config, challenger, champion), now)
            outcome = decision_dict(recorded) | {"challenger": challenger.version,
                                                 "champion": champion.version if champion else None}
            verdict = recorded.champion
    if "details" in outcome or (verdict is not None and not verdict.passed):  # a decision, or a champion that failed
        notify_promotion(config, outcome)
    return outcome
