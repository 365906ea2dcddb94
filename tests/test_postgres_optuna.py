"""Optuna across processes on PostgreSQL: one study, ``n_trials`` in total, a dead worker's trial retried."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pricelevel.core.config import ConfigError
from pricelevel.ml.config import TuningConfig
from pricelevel.ml.tuning import SURPLUS, open_study
from tests.postgres import Postgres, postgres_fixture  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKER = Path(__file__).parent / "fakes" / "optuna_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _worker(url: str, study: str, n_trials: int, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(WORKER), url, study, str(n_trials), str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _study(postgres: Postgres, name: str, n_trials: int) -> tuple[str, optuna.Study]:
    url = postgres.url(postgres.database("optuna"))
    tuning = TuningConfig(storage=url, workers=2, n_trials=n_trials, heartbeat_s=1, grace_s=3)
    return url, open_study(url, name, tuning)


def _finish(*workers: subprocess.Popen, timeout_s: float = 240) -> list[str]:
    outputs = []
    for worker in workers:
        out, _ = worker.communicate(timeout=timeout_s)
        assert worker.returncode == 0, out[-3000:]
        outputs.append(out)
    return outputs


def test_two_workers_share_one_study_and_stop_at_n_trials_in_total(postgres: Postgres, tmp_path: Path) -> None:
    url, study = _study(postgres, "shared", n_trials=8)
    outs = [tmp_path / "a" / "out.json", tmp_path / "b" / "out.json"]
    for out in outs:
        out.parent.mkdir()
    _finish(*(_worker(url, "shared", 8, out) for out in outs))
    trials = study.get_trials(deepcopy=False)
    real = [t for t in trials if not t.user_attrs.get(SURPLUS)]
    finished = [t for t in real if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 8 and len(real) == 8, [(t.number, t.state.name) for t in trials]
    assert len({t.number for t in trials}) == len(trials)
    per_worker = [json.loads(out.read_text())["finished"] for out in outs]
    assert sum(per_worker) == 8 and min(per_worker) >= 1, per_worker  # both took part, none overshot


def test_a_worker_killed_mid_trial_has_its_trial_failed_and_retried_by_the_other(postgres: Postgres, tmp_path: Path) -> None:
    url, study = _study(postgres, "killed", n_trials=4)
    marker = tmp_path / "victim.running"
    (tmp_path / "v").mkdir()
    (tmp_path / "s").mkdir()
    victim = _worker(url, "killed", 4, tmp_path / "v" / "out.json", "--die-marker", str(marker))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert victim.poll() is None, victim.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the victim never started its trial"
            time.sleep(0.1)
        survivor = _worker(url, "killed", 4, tmp_path / "s" / "out.json")
        time.sleep(0.5)
        victim.kill()  # SIGKILL mid-trial: no chance to tell the study anything
        victim.communicate()
        _finish(survivor)
    finally:
        with contextlib.suppress(ProcessLookupError):
            victim.kill()
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(SURPLUS)]
    assert len(failed) == 1, [(t.number, t.state.name) for t in trials]
    dead = failed[0]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == dead.params  # the same point of the space, tried again
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert json.loads((tmp_path / "s" / "out.json").read_text())["finished"] == 4


def test_sqlite_is_refused_for_more_than_one_worker_with_one_line() -> None:
    for storage in (None, "sqlite:////tmp/x.db"):
        with pytest.raises(ValueError, match="workers=2 needs a PostgreSQL URL") as error:
            TuningConfig(storage=storage, workers=2)
        assert "database is locked" in str(error.value)
    assert TuningConfig(storage="postgresql+psycopg2://u@h/db", workers=2).server_storage
    assert issubclass(ConfigError, ValueError)
