"""Project-level promises: the library stays free of Prefect, and the quiet defaults never override a user."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pricelevel.config import load_project_config
from pricelevel.core.runtime import apply_quiet_environment, project_root, quiet_environment

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_prefect() -> None:
    modules = sorted(
        "pricelevel." + ".".join(p.relative_to(ROOT / "lib").with_suffix("").parts)
        for p in (ROOT / "lib").rglob("*.py")
        if p.name != "__init__.py"
    )
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", f"lib/ imported Prefect: {out}"
    assert len(modules) >= 10


def test_quiet_defaults_fill_gaps_but_never_override(tmp_path: Path) -> None:
    env = {"DO_NOT_TRACK": "false", "PREFECT_HOME": "/mine"}
    apply_quiet_environment(tmp_path, env)
    assert env["DO_NOT_TRACK"] == "false" and env["PREFECT_HOME"] == "/mine"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert quiet_environment(tmp_path)["PREFECT_HOME"] == str(tmp_path / ".prefect")


def test_project_root_and_config_resolution(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert project_root() == project
    config = load_project_config(overrides=["data.root=elsewhere"])
    assert config.data.root == project / "elsewhere" and config.data.sample_dir == project / "data" / "sample"
    monkeypatch.delenv("PRICELEVEL_HOME")
    assert project_root() == ROOT


@pytest.mark.flow
def test_deployments_point_at_flows_and_limit_concurrency() -> None:
    """prefect.yaml: every entrypoint is a Prefect flow; training and promotion never run twice at once."""
    import importlib

    import yaml
    from prefect import Flow

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    for deployment in deployments.values():
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow), deployment["entrypoint"]
    for name in ("train-nightly", "promote"):
        assert deployments[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    # The trader: one per account, on its own pool so training never delays a decision.
    assert deployments["trade"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert deployments["trade"]["work_pool"]["name"] == "pricelevel-trader"
