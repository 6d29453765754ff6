"""Enhance / Upscale: a button under every portrait, template and try-on result.

"✨ Enhance" (one per result message, in its last row when there is room: Discord allows five rows under a
message) asks which picture and how much larger (×2 or ×4); the choice queues an "enhance" job
(``facechain_core.enhance``: faces restored, then Real-ESRGAN) on that picture. Both presses are checked
against the pictures' owner. The result goes out as a file, since chats recompress photos and drop their
metadata: a PNG when it fits the platform's upload limit, else a JPEG at quality 95, else the job says why it was refused.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from handlers import buttons, hooks
from handlers.messages import t
from handlers.progress import register_presenter, submit_with_progress
from handlers.protocols import Button, Event, Media, ReplyChannel
from handlers.services import Services

FEATURE = "enhance"
ENHANCE_ACTION = "enhance"  # enhance:<artifact id>, under each picture result: asks for the scale
SCALE_ACTION = "enhx"  # enhx:<artifact id>.<scale>, the scale picked
ENHANCED_KINDS = frozenset({"portrait", "template", "tryon", "duo", "duo_template"})
SCALES = (2, 4)
DEFAULT_UPLOAD_LIMIT = 10 * 2**20  # bytes, for a platform without its own setting


PICTURES_PER_ROW = 2  # in the picker: ×2 and ×4 of two pictures per row


def enhance_keyboard(services: Services, job: Any, keyboard: list[list[Button]] | None, artifacts: list[Any],
                     lang: str) -> list[list[Button]] | None:
    """Adds "✨ Enhance" (one per result message) under pictures of ENHANCED_KINDS, in the last row if it has room."""
    pictures = [a for a in artifacts if a.kind in ENHANCED_KINDS and a.media_type.startswith("image/")]
    if not pictures:
        return keyboard
    button = Button(t("enhance.button", lang), buttons.payload(ENHANCE_ACTION, pictures[0].id))
    rows = list(keyboard or [])
    if rows and len(rows[-1]) < buttons.BUTTONS_PER_ROW:
        rows[-1] = [*rows[-1], button]
    else:
        rows.append([button])
    return rows


async def press_enhance(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Asks the owner which picture of the result to enlarge, and how much."""
    artifact = await buttons.owned_artifact(services, event, channel, argument, ENHANCED_KINDS)
    if artifact is None:
        return
    lang = event.language
    services.require_feature(FEATURE)
    siblings = await services.storage.job_artifacts(artifact.job_id) if artifact.job_id is not None else []
    pictures = [a for a in siblings if a.kind in ENHANCED_KINDS and a.media_type.startswith("image/")
                and a.owned_by(event.user.key)] or [artifact]
    await channel.answer_button()
    numbered = len(pictures) > 1
    choices = [Button((f"{n} " if numbered else "") + t("enhance.scale_button", lang, scale=scale),
                      buttons.payload(SCALE_ACTION, f"{picture.id}.{scale}"))
               for n, picture in enumerate(pictures, start=1) for scale in SCALES]
    step = PICTURES_PER_ROW * len(SCALES)
    keyboard = [choices[i:i + step] for i in range(0, len(choices), step)]
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
    services.require_feature(FEATURE)
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


buttons.register_core_button(ENHANCE_ACTION, press_enhance)
buttons.register_core_button(SCALE_ACTION, press_scale)
# After the Report buttons (handlers.safety, imported before this module): the button joins their row.
hooks.register_keyboard_decorator(enhance_keyboard, owner_only=True)
register_presenter("enhance", present_enhanced)
