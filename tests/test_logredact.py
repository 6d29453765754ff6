"""Secrets and Discord interaction tokens never reach a log line."""
from __future__ import annotations

import logging

from bot.ops.logredact import RedactingFilter

TOKEN = "1234567890:AAH-secret-part-of-the-token"
INTERACTION = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OTA6c2VjcmV0"


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("x", logging.DEBUG, __file__, 1, msg, args, None)


def test_bot_token_its_secret_half_and_quoted_form_are_masked() -> None:
    f = RedactingFilter([TOKEN])
    record = _record("GET https://api.telegram.org/bot%s/getMe and %s and %s", TOKEN,
                     "AAH-secret-part-of-the-token", "1234567890%3AAAH-secret-part-of-the-token")
    assert f.filter(record)
    assert "secret-part" not in record.getMessage() and record.getMessage().count("***") == 3


def test_discord_interaction_tokens_in_urls_are_masked() -> None:
    f = RedactingFilter([])
    for url in (f"webhooks/111/{INTERACTION}/messages/@original", f"interactions/222/{INTERACTION}/callback"):
        record = _record("POST https://discord.com/api/v10/%s", url)
        f.filter(record)
        assert INTERACTION not in record.getMessage() and "***" in record.getMessage()
    plain = _record("webhooks/111/short")
    f.filter(plain)
    assert plain.getMessage() == "webhooks/111/short"
