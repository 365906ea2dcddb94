"""Where the project lives and the quiet, offline-safe environment it runs in.

These are applied by the edges (the CLI, the Makefile, the test suite) before Prefect, MLflow or
great-expectations are imported; the library itself never reads or sets them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

from pricelevel.config import Config, load_config

BASE_CONFIG = Path("conf") / "base.yaml"


def project_root(env: MutableMapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """``$PRICELEVEL_HOME``, else the checkout this package was installed from, else a parent of ``cwd``."""
    env = os.environ if env is None else env
    if env.get("PRICELEVEL_HOME"):
        return Path(env["PRICELEVEL_HOME"]).resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / BASE_CONFIG).exists():
        return checkout
    here = (cwd or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / BASE_CONFIG).exists():
            return candidate
    raise FileNotFoundError(f"cannot find {BASE_CONFIG}; run from the project folder or set PRICELEVEL_HOME")


def quiet_environment(root: Path) -> dict[str, str]:
    """Environment defaults that keep every run local, quiet and free of telemetry."""
    return {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GX_ANALYTICS_ENABLED": "false",
    }


def apply_quiet_environment(root: Path, env: MutableMapping[str, str] | None = None) -> None:
    """Set the defaults of :func:`quiet_environment` where the user has not set them."""
    env = os.environ if env is None else env
    for name, value in quiet_environment(root).items():
        env.setdefault(name, value)


def load_project_config(
    config_file: Path | str | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """The project's configuration (``conf/base.yaml`` + overlays), with data paths resolved to the root."""
    env = os.environ if env is None else env
    root = project_root(dict(env))
    return load_config(root / BASE_CONFIG, Path(config_file) if config_file else None, overrides, env).with_root(root)
