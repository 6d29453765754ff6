"""Configures logging once, with every secret redacted from every record.

``log_format = "json"`` writes one JSON object per line (``time``, ``level``, ``logger``,
``message``, ``exc`` when there is a traceback); a job event's fields (``event``, ``job``,
``kind``, ``user``, durations) are keys of that object too.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from bot.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The LogRecord attribute that carries a job event's fields (see bot.engine.scheduler.Scheduler._event).
JOB_EVENT_ATTR = "job_event"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; `static` fields (e.g. a worker's device) go in every line."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
        }
        event = getattr(record, JOB_EVENT_ATTR, None)
        if isinstance(event, dict):
            line.update({k: v for k, v in event.items() if k not in ("time", "level", "logger", "message")})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(settings: Settings) -> None:
    """Sets the root level and format and installs the secret redaction filter on every root handler."""
    from bot.ops.logredact import install_redaction

    logging.basicConfig(level=settings.log_level, format=FORMAT)
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(FORMAT)
    for handler in root.handlers:
        # Only plain console handlers: capture handlers (pytest's) keep their own format.
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(formatter)
    # httpx logs every request URL (which holds the bot token) at INFO; keep it at WARNING
    # unless the operator asked for DEBUG. Redaction protects both cases.
    if settings.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    install_redaction(settings.secrets())
