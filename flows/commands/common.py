"""What every command shares: the session (``--config``/``--set``/``--debug``, taken once by the root callback),
console output, and small parsers that turn bad input into usage errors (exit code 2)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pricelevel.config import Config, load_project_config
from pricelevel.core.runtime import project_root


class UsageError(Exception):
    """Bad command-line input; exit code 2."""


@dataclass(frozen=True)
class Session:
    """The global options, as the root callback received them."""

    config_file: Path | None = None
    overrides: tuple[str, ...] = ()
    debug: bool = False
    _loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def config(self, *extra: str) -> Config:
        """The effective configuration (base, ``--config``, ``PRICELEVEL_*``, ``--set``, then ``extra``)."""
        key = tuple(extra)
        if key not in self._loaded:
            self._loaded[key] = load_project_config(self.config_file, [*self.overrides, *extra])
        return self._loaded[key]

    def flow_arguments(self) -> dict[str, object]:
        """How a flow is handed the same layers (flows load the config themselves, as deployments do)."""
        return {"config_file": str(self.config_file) if self.config_file else None, "overrides": list(self.overrides)}


def session(ctx: typer.Context) -> Session:
    return ctx.find_root().obj or Session()


def console() -> Console:
    """Stdout console; when piped (CI, logs) it is 140 columns wide rather than rich's 80."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=140)


def table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[object]], justify: str = "left", wrap: bool = False
) -> Table:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify=justify, no_wrap=justify == "left" and not wrap)
    for row in rows:
        out.add_row(*(str(value) for value in row))
    return out


def split(values: list[str] | None) -> list[str] | None:
    """Accept both ``--symbols A --symbols B`` and ``--symbols A,B``."""
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def short(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def relative(path: object) -> str:
    try:
        return str(Path(str(path)).relative_to(project_root()))
    except ValueError:
        return str(path)


def number(value: object, pct: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:+.2%}" if pct else f"{value:.4f}"


def timestamp(text: str | None):
    """A UTC timestamp from the command line (naive times are UTC)."""
    import pandas as pd

    if text is None:
        return None
    try:
        value = pd.Timestamp(text)
    except ValueError:
        raise UsageError(f"not a time: {text!r} (e.g. 2024-06-01 or 2024-06-01T12:00)") from None
    return value.tz_localize("UTC") if value.tzinfo is None else value.tz_convert("UTC")


def timeframe(text: str):
    from pricelevel.core.timeframes import Timeframe

    try:
        return Timeframe(text)
    except ValueError:
        raise UsageError(f"unknown timeframe {text!r}; use one of {', '.join(t.value for t in Timeframe)}") from None


class _NoTracebackFormatter(logging.Formatter):
    """Formats like ``inner`` without the traceback: the console gets one line, the Prefect UI the rest."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def run_flow(ctx: typer.Context, flow, **arguments: object):
    """Run a Prefect flow with the session's config layers; without ``--debug`` Prefect's console handlers
    print one line per failure instead of every task's traceback."""
    if not session(ctx).debug:
        loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("prefect")]
        for logger in [logging.getLogger(), *loggers]:
            for handler in logger.handlers:
                if type(handler).__name__.endswith("ConsoleHandler") and not isinstance(handler.formatter, _NoTracebackFormatter):
                    handler.setFormatter(_NoTracebackFormatter(handler.formatter))
    return flow(**session(ctx).flow_arguments(), **arguments)
