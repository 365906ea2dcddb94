"""One Optuna trial worker of a shared study, with a cheap objective instead of the LSTM.

    python tests/fakes/optuna_worker.py URL STUDY N_TRIALS OUT_JSON [--die-marker FILE] [--work SECONDS]

Runs :func:`pricelevel.ml.tuning.run_trials` (the code every trial worker runs) and writes how many trials
it finished. ``--die-marker``: the first trial writes FILE and then hangs, for the test to kill the process
mid-trial. ``--work``: seconds of CPU work per trial (default: 0.2 s of sleep). ``--start-at``: workers begin together.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pricelevel.ml.config import TuningConfig
from pricelevel.ml.tuning import open_study, run_trials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("study")
    parser.add_argument("n_trials", type=int)
    parser.add_argument("out")
    parser.add_argument("--die-marker")
    parser.add_argument("--work", type=float, default=0.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds: begin then (after the imports)")
    args = parser.parse_args()
    tuning = TuningConfig(storage=args.url, workers=2, n_trials=args.n_trials, heartbeat_s=1, grace_s=3, timeout_s=300)
    study = open_study(args.url, args.study, tuning)
    started: list[int] = []

    def objective(params, trial_dir, callbacks, on_epoch) -> float:
        if args.die_marker and not started:
            started.append(1)
            Path(args.die_marker).write_text("running")
            time.sleep(600)
        if args.work:
            deadline = time.process_time() + args.work
            while time.process_time() < deadline:
                sum(i * i for i in range(1000))
        else:
            time.sleep(0.2)
        return -abs(params["learning_rate"] - 1e-3)

    time.sleep(max(0.0, args.start_at - time.time()))
    done = run_trials(study, objective, tuning, Path(args.out).parent / "trials", poll_s=0.2)
    Path(args.out).write_text(json.dumps({"finished": done}))


if __name__ == "__main__":
    main()
