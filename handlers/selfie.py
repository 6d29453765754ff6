"""Selfie intake: a photo in a private chat that no command waited for becomes a selfie.

In a group the photo is neither downloaded nor kept; the user is asked to send selfies privately.
In private: the size is checked before downloading, the selfie check runs in a thread, and an
accepted photo is stored upright as JPEG under ``data_dir/users/<key>/selfies/`` with its face
record; the oldest beyond ``limits.max_selfies`` is removed. With the portrait feature installed,
an "identity" job is (re)submitted so the likeness follows the newest set of selfies.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.images import encode_jpeg
from facechain_core.selfie import SelfieResult, face_record
from handlers import registry
from handlers.consent import consent_text
from handlers.messages import t
from handlers.progress import submit_job
from handlers.protocols import Attachment, Event, ReplyChannel, User
from handlers.router import message_for
from handlers.selfie_check import build_selfie_checker, lazy_selfie_checker  # noqa: F401  (their old home)
from handlers.services import MB, Services

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"})
# How often a user is reminded, in a group, to send selfies privately.
GROUP_HINT_INTERVAL_S = 600.0
JPEG_QUALITY = 95
IDENTITY_KIND = "identity"
PORTRAIT_FEATURE = "portrait"


def is_image(attachment: Attachment) -> bool:
    """A photo, or a file that says it is a picture (by MIME type or name)."""
    if attachment.kind == "photo":
        return True
    if attachment.kind != "document":
        return False
    if attachment.mime_type:
        return attachment.mime_type.lower().startswith("image/")
    return Path(attachment.filename or "").suffix.lower() in IMAGE_EXTENSIONS


async def receive_attachments(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Takes the files of an event that no command waited for: pictures are selfies."""
    lang = event.language
    images = [a for a in event.attachments if is_image(a)]
    if not event.chat.is_private:
        if images:
            await _hint_private(services, event, channel)
        return
    if not images:
        documents = any(a.kind == "document" for a in event.attachments)
        await channel.send_text(t("image.not_image" if documents else "core.unexpected_file", lang))
        return
    for attachment in images:
        try:
            await receive_selfie(services, event, channel, attachment)
        except UserFacingError as exc:
            if len(images) == 1:
                raise
            await channel.send_text(message_for(exc, lang))


async def receive_selfie(services: Services, event: Event, channel: ReplyChannel, attachment: Attachment) -> None:
    """Checks one picture, stores it if it is a usable selfie and says what happens next."""
    limit = services.max_upload_bytes
    if attachment.size is not None and attachment.size > limit:
        raise UserFacingError("image.too_large", size_mb=_mb(attachment.size), max_mb=_mb(limit))
    data = await attachment.fetch()
    result = await asyncio.to_thread(services.check_selfie, data)
    face = face_record(result)
    user = event.user
    async with services.runtime.user_lock(user.key):
        selfies = await _store_selfie(services, user, result, face)
        count = len(selfies)
        log.info("selfie accepted from %s (%d kept)", user.key, count)
        # The first selfie says plainly whose face may be sent and how it is kept.
        consent = "\n\n" + consent_text(services, event.language) if count == 1 else ""
        if PORTRAIT_FEATURE not in services.features_installed:
            await channel.send_text(t("intake.accepted", event.language, count=count,
                                      max=services.settings.limits.max_selfies) + consent)
            return
        text = t("intake.learning", event.language, count=count) + consent
        try:
            await _submit_identity(services, event, selfies)
        except UserFacingError as exc:
            text += "\n" + message_for(exc, event.language)
    await channel.send_text(text)


async def _store_selfie(services: Services, user: User, result: SelfieResult, face: dict[str, Any]) -> list[Any]:
    """Writes the JPEG and its row, drops the oldest beyond the limit; returns the kept selfies."""
    folder = services.user_dir(user.key) / "selfies"
    path = (folder / f"{secrets.token_hex(8)}.jpg").resolve()
    jpeg = await asyncio.to_thread(encode_jpeg, result.image, JPEG_QUALITY)
    await asyncio.to_thread(_write_atomically, path, jpeg)
    try:
        await services.storage.add_selfie(user.key, str(path), face)
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    selfies = await services.storage.selfies(user.key)
    keep = services.settings.limits.max_selfies
    for old in selfies[:-keep]:
        await asyncio.to_thread(Path(old.path).unlink, missing_ok=True)
        await services.storage.remove_selfie(old.id)
    return selfies[-keep:]


async def _submit_identity(services: Services, event: Event, selfies: list[Any]) -> None:
    """Replaces a still-queued identity job of the user with one over the current selfies."""
    key = event.user.key
    for job in await services.jobs.user_jobs(key):
        if job.kind == IDENTITY_KIND and job.state == "queued":
            await services.jobs.cancel(key, job.id)
    params = {
        "selfies": [{"path": s.path, "face": s.face} for s in selfies],
        "out": str((services.user_dir(key) / "identity.npz").resolve()),
    }
    submitted = await submit_job(services, event, IDENTITY_KIND, params)
    log.info("identity job %d queued for %s over %d selfies", submitted.job_id, key, len(selfies))


async def _hint_private(services: Services, event: Event, channel: ReplyChannel) -> None:
    now = services.clock()
    last = services.runtime.group_hints.get(event.user.key)
    if last is not None and now - last < GROUP_HINT_INTERVAL_S:
        return
    services.runtime.group_hints[event.user.key] = now
    await channel.send_text(t("intake.group", event.language, name=event.user.name or t("core.friend", event.language)))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mb(n: int) -> str:
    return f"{n / MB:.1f}"


registry.register_file_intake(receive_attachments)
