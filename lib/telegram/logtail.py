"""``/logs``: the process's last log lines, kept in memory while the bot runs. Records reach the handler already
masked (:func:`pricelevel.telegram.redaction.masked_logs`), and each line is masked again before it is kept."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pricelevel.trading.reports import Report

#: Lines kept; ``/logs`` shows at most :data:`MAX_SHOWN`.
KEPT = 200
MAX_SHOWN = 50
#: Loggers whose INFO lines are not kept: one line per HTTP request would push out everything else.
QUIET = ("httpx", "httpcore")
#: A line longer than this is cut (a traceback's first line is the one that matters).
MAX_LINE = 300


class LogTail(logging.Handler):
    """The newest :data:`KEPT` log lines of level ``level`` and above, one line per record, masked."""

    def __init__(self, mask: Callable[[str], str] = lambda text: text, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._mask = mask
        self._lines: deque[str] = deque(maxlen=KEPT)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(QUIET) and record.levelno < logging.WARNING:
            return
        try:
            line = self._mask(self.format(record).splitlines()[0])
        except Exception:  # logging must never fail the caller
            return
        self._lines.append(line if len(line) <= MAX_LINE else line[:MAX_LINE] + "...")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # one line per record: no traceback
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    def report(self, n: int) -> Report:
        lines = list(self._lines)[-min(n, MAX_SHOWN):]
        if not lines:
            return Report("log", notes=("no log lines yet",))
        return Report(f"last {len(lines)} log lines", rows=tuple((line,) for line in lines))


@contextmanager
def log_tail(mask: Callable[[str], str], logger: logging.Logger | None = None) -> Iterator[LogTail]:
    """A :class:`LogTail` on the root logger (or ``logger``) while inside."""
    target = logger or logging.getLogger()
    handler = LogTail(mask)
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
