"""Virtual try-on in chat: /tryon with an outfit photo, as a reply to one, or the photo sent next.

The outfit photo is, in this order: one sent with the command (a captioned photo, a Discord
option) or the one the command replies to - only the requester's own photo or a result the bot
made for them (cartoon.reply_source's checks); without either, the bot asks for the photo
(pending input). The user needs an identity first (a selfie). Each job gets a copy of the outfit
in the user's own folder (``data_dir/users/<key>/tryon/jobs/<token>/``), removed once the
result is delivered, so /delete removes everything with the rest.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.images import picture_size
from handlers import cartoon, registry, router
from handlers.portrait import user_lora
from handlers.cartoon import Source
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_staged
from handlers.protocols import Event, ReplyChannel
from handlers.selfie import is_image
from handlers.services import Services

log = logging.getLogger(__name__)

FEATURE = "tryon"
KIND = "tryon"
FOLDER = "tryon"  # under the user's folder: jobs/<token>/outfit.jpg and the results
OUTFIT_NAME = "outfit.jpg"
COUNT = 1


# -- the command --------------------------------------------------------------------------------
async def make_tryon(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Dresses the user in the outfit photo the command carries or replies to (else asks for it)."""
    services.require_feature(FEATURE)
    await _require_identity(services, event)
    source = await cartoon.command_source_for(services, event, "tryon")
    if source is None:
        await router.expect_input(services, event, KIND)
        await channel.send_text(t("tryon.send_photo", event.language))
        return
    await submit_tryon(services, event, channel, source)


async def receive_photo(services: Services, event: Event, channel: ReplyChannel, pending: Any) -> None:
    """Takes the outfit photo the user sent after /tryon asked for one."""
    images = [a for a in event.attachments if is_image(a)]
    if not images:
        raise UserFacingError("tryon.not_a_photo")
    services.require_feature(FEATURE)
    await _require_identity(services, event)
    await submit_tryon(services, event, channel, Source(data=await cartoon.fetch_image(services, images[0])))


async def submit_tryon(services: Services, event: Event, channel: ReplyChannel, source: Source) -> None:
    """Copies the outfit photo into a job folder of the user's own, then queues the "tryon" job."""
    key = event.user.key
    jobs = services.user_dir(key) / FOLDER / "jobs"
    folder = jobs / secrets.token_hex(6)
    limits = services.settings.limits
    await asyncio.to_thread(cartoon._prune, jobs.glob(f"*/{OUTFIT_NAME}"), cartoon.SOURCE_TTL_S)
    outfit = await asyncio.to_thread(cartoon._stage, source, folder / OUTFIT_NAME, services.max_upload_bytes,
                                     int(limits.max_pixels))
    selfies = await services.storage.selfies(key)
    identity = await services.storage.identity(key)
    seed = services.settings.portrait_seed
    params = {
        "outfit": str(outfit.resolve()),
        "picture_size": await asyncio.to_thread(picture_size, outfit),  # jobs of one working size share a pass
        "identity": str((services.user_dir(key) / "identity.npz").resolve()),
        "selfies": [{"path": s.path, "face": s.face} for s in selfies],
        "user_lora": await user_lora(identity, "sd15"),
        "count": COUNT,
        "seed": seed if seed is not None else secrets.randbelow(2**31),
        "out_dir": str(folder.resolve()),
    }
    await submit_staged(services, event, channel, KIND, params, folder)
    log.info("tryon queued for %s", key)


# -- the finished job ---------------------------------------------------------------------------
async def present_tryon(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                        lang: str) -> None:
    """Sends the try-on picture, then drops the outfit copy."""
    await present_default(services, job, artifacts, channel, lang, caption=t("tryon.caption", lang))
    outfit = job.params.get("outfit")
    if outfit and Path(outfit).name == OUTFIT_NAME and FOLDER in Path(outfit).parts:
        await asyncio.to_thread(Path(outfit).unlink, True)


async def _require_identity(services: Services, event: Event) -> None:
    if not await services.storage.selfies(event.user.key):
        raise UserFacingError("tryon.no_identity")


registry.register_command("tryon", make_tryon, "help.tryon")
registry.register_pending(KIND, receive_photo)
register_presenter(KIND, present_tryon)
