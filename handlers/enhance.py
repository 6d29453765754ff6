"""Enhance / Upscale: a button under every portrait, template and try-on result.

"✨ Enhance" asks how much larger (×2 or ×4); the choice queues an "enhance" job (``facechain_core.enhance``:
faces restored, then Real-ESRGAN) on the pressed picture. Both presses are checked against the picture's
owner. The result goes out as a file, since chats recompress photos and drop their metadata: a PNG when it
fits the platform's upload limit, else a JPEG at quality 95, else the job says why it was refused.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from handlers import buttons, hooks
from handlers.messages import t
from handlers.progress import register_presenter, submit_with_progress
from handlers.protocols import Button, Event, Media, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

FEATURE = "enhance"
ENHANCE_ACTION = "enhance"  # enhance:<artifact id>, under each picture result: asks for the scale
SCALE_ACTION = "enhx"  # enhx:<artifact id>.<scale>, the scale picked
ENHANCED_KINDS = frozenset({"portrait", "template", "tryon"})
SCALES = (2, 4)
DEFAULT_UPLOAD_LIMIT = 10 * 2**20  # bytes, for a platform without its own setting


async def press_enhance(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Asks the picture's owner how much to enlarge it."""
    lang = event.language
    _require(services)
    await channel.answer_button()
    keyboard = [[Button(t("enhance.scale_button", lang, scale=scale),
                        buttons.payload(SCALE_ACTION, f"{artifact.id}.{scale}")) for scale in SCALES]]
    await channel.send_text(t("enhance.pick", lang), keyboard)


async def press_scale(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Queues the enhance job for the presser's own picture at the picked scale."""
    artifact_id, _, scale_text = argument.rpartition(".")
    if not artifact_id or scale_text not in {str(s) for s in SCALES}:
        await channel.answer_button(t("button.stale", event.language))
        return
    artifact = await buttons.owned_artifact(services, event, channel, artifact_id, ENHANCED_KINDS)
    if artifact is None:
        return
    _require(services)
    if not await asyncio.to_thread(Path(artifact.path).is_file):
        raise UserFacingError("enhance.source_gone")
    scale = int(scale_text)
    await channel.answer_button(t("enhance.queued", event.language, scale=scale))
    params = {"image": artifact.path, "scale": scale, "source_artifact": artifact.id,
              "max_bytes": upload_limit(services, event.chat.platform)}
    await submit_with_progress(services, event, channel, "enhance", params)


async def present_enhanced(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                           lang: str) -> None:
    """Sends the enhanced picture as a file, captioned (with every decoration) with its size and format."""
    meta = (job.result or {}).get("meta") or {}
    platform = channel.chat.platform
    for artifact in (a for a in artifacts if a.delivered_at is None):
        width, height = (meta.get("size") or ["?", "?"])[:2]
        fmt = str(meta.get("format") or Path(artifact.path).suffix.lstrip(".")).upper()
        caption = t("enhance.caption", lang, scale=meta.get("scale", "?"), width=width, height=height, format=fmt)
        if fmt == "JPEG":
            caption += "\n" + t("enhance.caption_jpeg", lang)
        text, keyboard = hooks.decorate_result(services, job, caption, [artifact], lang)
        sent = await channel.send_document(Media(path=Path(artifact.path)), caption=text)
        if keyboard:  # a document carries no buttons here: they follow it
            await channel.send_text(t("core.more_actions", lang), keyboard)
        await services.storage.mark_delivered(artifact.id, platform, sent.file_id)


def upload_limit(services: Services, platform: str) -> int:
    """The largest file the bot may send on `platform`, in bytes (``[telegram] upload_limit_mb``,
    ``[discord] upload_limit_mib``)."""
    settings = services.settings
    if platform == "telegram":
        return int(settings.telegram.upload_limit_mb * 1_000_000)
    if platform == "discord":
        return int(settings.discord.upload_limit_mib * 2**20)
    return DEFAULT_UPLOAD_LIMIT


def _require(services: Services) -> None:
    if FEATURE not in services.features_installed:
        log.warning("Enhance pressed but its models are not installed: run `facechain-bot models pull %s`", FEATURE)
        raise UserFacingError("feature.not_installed", feature=FEATURE)


buttons.register_result_button(ENHANCE_ACTION, "enhance.button", press_enhance, applies_to=ENHANCED_KINDS)
buttons.register_core_button(SCALE_ACTION, press_scale)
register_presenter("enhance", present_enhanced)
