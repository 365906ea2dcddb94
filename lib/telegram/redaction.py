"""Keeping the bot token out of every log line and message. python-telegram-bot puts the token in each request
URL (``.../bot<TOKEN>/getUpdates``), httpx logs request URLs at INFO, and the library's ``InvalidToken`` names
the token; so while the bot runs, every log record (its traceback included) is masked, in addition to the
process-wide redaction that :func:`pricelevel.core.runtime.bootstrap` installs."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pricelevel.core.secrets import MASK, Secrets, redact

#: A bot token in a Bot API path, whatever token it is (``bot123456:AAE...``).
_BOT_PATH = re.compile(r"bot\d+:[A-Za-z0-9_-]+")
_FORMATTER = logging.Formatter()

Mask = Callable[[str], str]


def masker(secrets: Secrets) -> Mask:
    """``text`` with every secret of ``secrets`` and any bot token in a URL path replaced by ``***``."""

    def mask(text: str) -> str:
        return _BOT_PATH.sub(f"bot{MASK}", redact(text, secrets))

    return mask


@contextmanager
def masked_logs(mask: Mask) -> Iterator[None]:
    """While inside, every log record of the process is created already masked (message and traceback).

    A record factory wraps the current one (nothing is replaced); on exit it is removed if still on top,
    otherwise it only stops masking, so nesting with other wrappers in any order is safe."""
    previous = logging.getLogRecordFactory()
    active = [True]

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not active[0]:
            return record
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left for logging to report
            return record
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask(_FORMATTER.formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        active[0] = False
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)
