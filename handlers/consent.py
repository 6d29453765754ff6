"""The consent notice: whose face may be sent, how photos are used, and how long each part is kept.

Shown by /start, /privacy and with a user's first selfie; it registers nothing, so any of them may
import it at the top.
"""
from __future__ import annotations

from facechain_core.tts import edge_enabled
from handlers.messages import t
from handlers.services import Services


def _kept_for(days: float, lang: str) -> str:
    return t("safety.keep_days", lang, days=f"{days:g}") if days > 0 else t("safety.keep_forever", lang)


def consent_text(services: Services, lang: str) -> str:
    """Whose face may be sent and how photos are used and kept (/start and the first selfie)."""
    retention = services.settings.retention
    text = t("safety.consent", lang, selfies=_kept_for(retention.selfies_days, lang),
             identities=_kept_for(retention.identities_days, lang), results=_kept_for(retention.results_days, lang))
    if edge_enabled(getattr(services.settings, "pipeline", None) or {}):  # the operator turned online TTS on
        text += " " + t("talk.privacy_online", lang)
    return text
