from __future__ import annotations

import logging

import pytest

from pricelevel.core.secrets import MASK, MissingSecretError, Secrets, install_log_redaction, redact

KEY, SECRET = "AbCdEfGh12345678", "zyxwVUTS98765432secret"


def test_secrets_come_from_the_environment_only() -> None:
    secrets = Secrets.from_env({"BYBIT_API_KEY": KEY, "BYBIT_API_SECRET": SECRET, "OTHER": "x"})
    assert secrets.require("bybit_api_key") == KEY
    assert KEY not in repr(secrets) and SECRET not in repr(secrets)


def test_missing_secret_fails_loudly_not_as_empty_string() -> None:
    secrets = Secrets.from_env({"BYBIT_API_KEY": ""})
    assert secrets.get("bybit_api_key") is None
    with pytest.raises(MissingSecretError, match="BYBIT_API_KEY is not set"):
        secrets.require("bybit_api_key")


def test_redact_masks_values_urls_and_signed_queries() -> None:
    secrets = Secrets.from_env({"BYBIT_API_KEY": KEY, "TELEGRAM_BOT_TOKEN": SECRET})
    text = f"key={KEY} token {SECRET} https://user:pw@host/x?api_key=abc&sign=def&limit=5"
    masked = redact(text, secrets)
    for leaked in (KEY, SECRET, "user:pw", "abc", "def"):
        assert leaked not in masked
    assert "limit=5" in masked and masked.count(MASK) >= 5


def test_log_records_are_redacted_for_every_logger(caplog: pytest.LogCaptureFixture) -> None:
    previous = logging.getLogRecordFactory()
    try:
        install_log_redaction(Secrets.from_env({"BYBIT_API_SECRET": SECRET}))
        install_log_redaction(Secrets.from_env({"BYBIT_API_SECRET": SECRET}))  # idempotent, no stacking
        with caplog.at_level(logging.INFO):
            logging.getLogger("prefect.some.child").info("signing with %s", SECRET)
            logging.getLogger().warning(f"raw {SECRET}")
        assert SECRET not in caplog.text and caplog.text.count(MASK) == 2
    finally:
        logging.setLogRecordFactory(previous)
