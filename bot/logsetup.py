"""Configures logging once, with every secret redacted from every record."""
from __future__ import annotations

import logging

from bot.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    """Sets the root level and installs the secret redaction filter on every root handler."""
    from bot.logredact import install_redaction

    logging.basicConfig(level=settings.log_level, format=FORMAT)
    logging.getLogger().setLevel(settings.log_level)
    # httpx logs every request URL (which holds the bot token) at INFO; keep it at WARNING
    # unless the operator asked for DEBUG. Redaction protects both cases.
    if settings.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    install_redaction(settings.secrets())
