"""Keep secrets (bot tokens) out of every log line.

Telegram puts the bot token in every request URL, and httpx logs URLs at INFO; exception texts
can carry them too. ``install_redaction(secrets)`` puts one ``RedactingFilter`` on the root
logger's handlers and wraps the log record factory, so a record is cleaned when it is created:
handlers added later (pytest's caplog, a file handler) never see the secret either.
``redacted_output(secrets)`` does the same for everything a command line writes to stdout and stderr
(tracebacks and library warnings included).
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import TextIO

MASK = "***"
# A secret shorter than this is not masked on its own (masking "a" would mangle every line).
MIN_SECRET_LENGTH = 6
# Discord interaction tokens (valid 15 minutes) sit in webhook and callback URLs.
INTERACTION_TOKEN = re.compile(r"((?:webhooks|interactions)/\d+/)[A-Za-z0-9_.-]{20,}")
# ... and in the gateway's INTERACTION_CREATE payloads, which discord.py logs at DEBUG as a dict or JSON.
TOKEN_FIELD = re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]{20,}""")


def secret_variants(secret: str) -> list[str]:
    """Returns the forms a secret takes in text: raw, URL-quoted, and a token's secret half."""
    variants = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}
    # A Telegram token is "<bot id>:<secret>"; the bot id alone is public, the secret half is not.
    _, sep, tail = secret.partition(":")
    if sep and len(tail) >= MIN_SECRET_LENGTH:
        variants.add(tail)
    return sorted((v for v in variants if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


class RedactingFilter(logging.Filter):
    """Replaces every secret in a record's message, arguments, exception and stack text with ***."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._variants: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if s)
        variants = {v for secret in self._secrets for v in secret_variants(secret)}
        self._variants = sorted(variants, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for variant in self._variants:
            if variant in text:
                text = text.replace(variant, MASK)
        return TOKEN_FIELD.sub(rf"\1{MASK}", INTERACTION_TOKEN.sub(rf"\1{MASK}", text))

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", None) is self:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not hide the record, nor leak through repr
            message = f"{record.msg!s} {record.args!s}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        record._redacted = self  # type: ignore[attr-defined]
        return True


_installed: RedactingFilter | None = None


def install_redaction(secrets: Iterable[str], root: logging.Logger | None = None) -> RedactingFilter:
    """Installs (or extends) the process-wide redaction; returns the filter. Idempotent."""
    global _installed
    root = root or logging.getLogger()
    if _installed is None:
        _installed = RedactingFilter(secrets)
        previous = logging.getLogRecordFactory()
        active = _installed

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            active.filter(record)
            return record

        logging.setLogRecordFactory(factory)
    else:
        _installed.add_secrets(secrets)
    for handler in root.handlers:
        if _installed not in handler.filters:
            handler.addFilter(_installed)
    return _installed


class RedactingStream:
    """A text stream that writes whole lines to `inner` with every secret masked (partial lines on flush)."""

    def __init__(self, inner: TextIO, redactor: RedactingFilter) -> None:
        self._inner = inner
        self._redactor = redactor
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        head, newline, self._pending = self._pending.rpartition("\n")
        if newline:
            self._inner.write(self._redactor.redact(head + newline))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._inner.write(self._redactor.redact(self._pending))
            self._pending = ""
        self._inner.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@contextlib.contextmanager
def redacted_output(secrets: Iterable[str]) -> Iterator[RedactingFilter]:
    """Masks `secrets` (and Discord interaction tokens) in all that is written to stdout and stderr
    meanwhile, and in log records (``install_redaction``)."""
    redactor = install_redaction(secrets)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout, redactor), RedactingStream(sys.stderr, redactor)
    try:
        yield redactor
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = streams
