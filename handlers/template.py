"""Fixed templates in chat: /template [NAME] [likeness:...] with a library picture or the user's own photo.

The template is, in this order: a photo sent with the command or the one it replies to (only the requester's
own photo or a result the bot made for them: try-on's rules), else the library template NAME. Without either
the bot shows the installed library as buttons and takes the next photo sent as the template (pending input).
A library template of more than one face is refused with a pointer to duo portraits; the job refuses a photo
of several faces the same way. Each job gets a copy of the user's photo in their own folder
(``data_dir/users/<key>/template/<token>/template.jpg``), so /delete removes it with the rest.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.images import picture_size
from facechain_core.templates import TemplateEntry, TemplateLibrary, load_templates
from handlers import buttons, cartoon, registry, router, studio
from handlers.portrait import user_lora
from handlers.cartoon import Source
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_staged
from handlers.protocols import Button, Event, ReplyChannel
from handlers.selfie import is_image
from handlers.services import Services

log = logging.getLogger(__name__)

FEATURE = "template"
KIND = "template"
FOLDER = "template"
PRESS_ACTION = "tpl"  # tpl:<template id>
BUTTONS_PER_ROW = 2
COUNT = 1


@cache
def library() -> TemplateLibrary:
    """Every template of the data folder (loaded once)."""
    return load_templates()


def installed(services: Services) -> TemplateLibrary:
    """The one-face templates whose picture this server has."""
    overrides = {k: str(v) for k, v in (getattr(services.settings, "model_paths", {}) or {}).items()}
    return library().with_faces(1).installed(Path(services.settings.models_dir), overrides)


# -- the command --------------------------------------------------------------------------------
async def make_template(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Paints the user into a library template or their own photo (neither: shows the library, waits for a photo)."""
    services.require_feature(FEATURE)
    await _require_identity(services, event)
    controls = studio.parse_controls(event.args)
    source = await cartoon.command_source_for(services, event, "template")
    if source is not None:
        await submit_template(services, event, channel, controls, photo=source)
        return
    name = " ".join(controls.words).strip()
    if name:
        entry = library().find(name)
        if entry is None:
            raise UserFacingError("template.unknown", name=name)
        await submit_template(services, event, channel, controls, entry=entry)
        return
    await router.expect_input(services, event, KIND, {"likeness": controls.likeness})
    await channel.send_text(t("template.pick", event.language), _keyboard(services, event.language))


async def submit_template(services: Services, event: Event, channel: ReplyChannel, controls: studio.Controls, *,
                          entry: TemplateEntry | None = None, photo: Source | None = None) -> None:
    """Queues the "template" job on a library template or a copy of the user's photo."""
    key = event.user.key
    folder = None
    if entry is not None:
        if entry.faces > 1:
            raise UserFacingError("template.many_faces", faces=entry.faces)
        overrides = {k: str(v) for k, v in (getattr(services.settings, "model_paths", {}) or {}).items()}
        picture = TemplateLibrary.picture(entry, Path(services.settings.models_dir), overrides)
        if picture is None:
            log.warning("template %s requested but its picture is missing: run `facechain-bot models pull %s`",
                        entry.id, entry.model_name)
            raise UserFacingError("template.not_installed", name=entry.display_name(event.language))
        template, template_id, hints = str(picture.resolve()), entry.id, entry.prompt
    else:
        assert photo is not None
        jobs = services.user_dir(key) / FOLDER / "jobs"
        folder = jobs / secrets.token_hex(6)
        limits = services.settings.limits
        await asyncio.to_thread(cartoon._prune, jobs.glob("*/template.jpg"), cartoon.SOURCE_TTL_S)
        staged = await asyncio.to_thread(cartoon._stage, photo, folder / "template.jpg", services.max_upload_bytes,
                                         int(limits.max_pixels))
        template, template_id, hints = str(staged.resolve()), None, ""
    selfies = await services.storage.selfies(key)
    identity = await services.storage.identity(key)
    params = {
        "template": template, "template_id": template_id, "hints": hints,
        "picture_size": await asyncio.to_thread(picture_size, template),  # jobs of one working size share a pass
        "controls": controls.job_controls(),
        "identity": str((services.user_dir(key) / "identity.npz").resolve()),
        "selfies": [{"path": s.path, "face": s.face} for s in selfies],
        "user_lora": await user_lora(identity, "sd15"),
        "count": COUNT,
        "seed": controls.seed if controls.seed is not None else studio.new_seed(services),
    }
    await submit_staged(services, event, channel, KIND, params, folder)


def _keyboard(services: Services, lang: str) -> list[list[Button]]:
    row = [Button(e.display_name(lang), buttons.payload(PRESS_ACTION, e.id)) for e in installed(services)]
    return [row[i:i + BUTTONS_PER_ROW] for i in range(0, len(row), BUTTONS_PER_ROW)]


# -- buttons and pending input -------------------------------------------------------------------
async def press_template(services: Services, event: Event, channel: ReplyChannel, template_id: str) -> None:
    """Runs the tapped library template for the presser."""
    entry = library().get(template_id)
    if entry is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    services.require_feature(FEATURE)
    await _require_identity(services, event)
    await channel.answer_button(t("template.chosen", event.language, name=entry.display_name(event.language)))
    await submit_template(services, event, channel, studio.Controls(), entry=entry)


async def receive_photo(services: Services, event: Event, channel: ReplyChannel, pending: Any) -> None:
    """Takes the photo the user sent after /template asked for one as the template."""
    images = [a for a in event.attachments if is_image(a)]
    if not images:
        raise UserFacingError("template.not_a_photo")
    services.require_feature(FEATURE)
    await _require_identity(services, event)
    controls = studio.Controls(likeness=(pending.payload or {}).get("likeness"))
    await submit_template(services, event, channel, controls,
                          photo=Source(data=await cartoon.fetch_image(services, images[0])))


async def present_template(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                           lang: str) -> None:
    """Sends the picture captioned with the template's name and its seed."""
    entry = library().get(str(job.params.get("template_id") or ""))
    caption = t("template.caption", lang, name=entry.display_name(lang)) if entry else t("template.caption_photo", lang)
    seeds = studio.seeds_line(job, lang)
    await present_default(services, job, artifacts, channel, lang, caption=f"{caption}\n{seeds}" if seeds else caption)


async def _require_identity(services: Services, event: Event) -> None:
    if not await services.storage.selfies(event.user.key):
        raise UserFacingError("portrait.need_selfie")


registry.register_command("template", make_template, "help.template")
registry.register_pending(KIND, receive_photo)
buttons.register_core_button(PRESS_ACTION, press_template)
register_presenter(KIND, present_template)
