"""The process runtime every entry point starts with: where the project lives, a quiet offline environment,
log redaction, the numba cache and thread counts.

:func:`bootstrap` is called first by the CLI, by every flow (deployments run flows without the CLI) and by
the trader; it is idempotent. The library never reads or sets these otherwise.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from pricelevel.core.secrets import Secrets, install_log_redaction

#: The file that marks a project folder.
PROJECT_MARKER = Path("conf") / "base.yaml"
HOME_VARIABLE = "PRICELEVEL_HOME"


class ProjectNotFoundError(FileNotFoundError):
    """Neither ``$PRICELEVEL_HOME`` nor the working directory or a parent holds ``conf/base.yaml``."""


def project_root(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The project folder. One rule: ``$PRICELEVEL_HOME`` when set, else the nearest folder at or above the
    working directory that holds ``conf/base.yaml``. (Deployments set their working directory to the
    checkout, and tests set ``PRICELEVEL_HOME``; an installed package never looks in site-packages.)"""
    env = os.environ if env is None else env
    if env.get(HOME_VARIABLE):
        return Path(env[HOME_VARIABLE]).resolve()
    here = (cwd or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / PROJECT_MARKER).exists():
            return candidate
    raise ProjectNotFoundError(
        f"cannot find {PROJECT_MARKER} in {here} or its parents; run from the project folder or set {HOME_VARIABLE}"
    )


def quiet_environment(root: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment defaults that keep every run local, quiet and free of telemetry."""
    env = os.environ if env is None else env
    cache_home = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar per model download floods logs
        "GX_ANALYTICS_ENABLED": "false",
        # One compiled-kernel cache per user, shared by every process and project (compiling costs ~10 s).
        "NUMBA_CACHE_DIR": str(cache_home / "pricelevel" / "numba"),
    }


def apply_quiet_environment(root: Path, env: MutableMapping[str, str] | None = None) -> None:
    """Set the defaults of :func:`quiet_environment` where the user has not set them."""
    env = os.environ if env is None else env
    for name, value in quiet_environment(root, env).items():
        env.setdefault(name, value)


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (``model.num_threads``); ``None`` leaves torch's default."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def bootstrap(env: MutableMapping[str, str] | None = None, threads: int | None = None) -> Secrets:
    """Prepare this process: quiet environment (outside a project: none), redaction of every secret in the
    environment from every log record, thread count. Returns the secrets found, for error messages."""
    env = os.environ if env is None else env
    with contextlib.suppress(ProjectNotFoundError):  # outside a project: no project defaults to apply
        apply_quiet_environment(project_root(env), env)
    secrets = Secrets.from_env(env)
    install_log_redaction(secrets)
    set_threads(threads)
    return secrets
