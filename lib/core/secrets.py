"""Secrets: read only from the environment, fail loudly when required and missing, never printed.

Every string the project emits (log records, Prefect parameters and artifacts, MLflow params, files) goes
through :func:`redact` or through the log-record factory installed by :func:`install_log_redaction`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import SecretStr

MASK = "***"

#: Environment variable of each secret the project knows about.
SECRET_ENV_VARS = {
    "bybit_api_key": "BYBIT_API_KEY",
    "bybit_api_secret": "BYBIT_API_SECRET",
    "telegram_bot_token": "TELEGRAM_BOT_TOKEN",
}


class MissingSecretError(RuntimeError):
    """A step needs a secret that is not set in the environment."""


@dataclass(frozen=True)
class Secrets:
    """The secrets present in the environment; values are :class:`SecretStr` so ``repr`` never leaks."""

    values: Mapping[str, SecretStr] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Secrets:
        return cls({name: SecretStr(env[var]) for name, var in SECRET_ENV_VARS.items() if env.get(var)})

    def get(self, name: str) -> str | None:
        value = self.values.get(name)
        return value.get_secret_value() if value is not None else None

    def require(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise MissingSecretError(f"{SECRET_ENV_VARS[name]} is not set; export it in the environment")
        return value

    def plain_values(self) -> list[str]:
        return [v.get_secret_value() for v in self.values.values()]


_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+(?::[^/\s@]*)?@", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"(?P<key>(?:api_?key|api_?secret|token|sign|signature)=)[^&\s]+", re.IGNORECASE)


def redact(text: str, secrets: Secrets | None = None) -> str:
    """Mask known secret values, credentials in URLs and signed query parameters in ``text``."""
    for value in sorted((secrets.plain_values() if secrets else []), key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    return _QUERY_SECRET.sub(rf"\g<key>{MASK}", text)


def install_log_redaction(secrets: Secrets) -> None:
    """Make every log record created from now on carry an already-redacted message.

    A record factory (rather than a filter) covers records of every logger and handler, including
    Prefect's API log handler, because the message is masked before any handler sees it.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_pricelevel_redacting", False):
        previous = previous._pricelevel_previous  # type: ignore[attr-defined]

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left for logging to report
            return record
        masked = redact(message, secrets)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        return record

    factory._pricelevel_redacting = True  # type: ignore[attr-defined]
    factory._pricelevel_previous = previous  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
