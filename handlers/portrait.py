"""Portraits in chat: /style NAME [COUNT], /styles (paged catalogue), /train, "more like this".

/style submits a "portrait" job over the user's identity (train-free IP-Adapter FaceID) and,
once /train has finished, their LoRA. Identity and training jobs report back through presenters
that record the result (storage.set_identity / set_lora) before telling the user.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.numbers import ascii_int
from facechain_core.styles import LOCAL_SOURCE, StyleCatalog, find_preview, lora_feature
from handlers import buttons, cartoon, registry, studio, style_sources
from handlers.cartoon import Source
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_staged, submit_with_progress
from handlers.protocols import Button, Event, Gallery, Media, MessageRef, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

FEATURE = "portrait"
SDXL_FEATURE = "portrait-sdxl"
DEFAULT_COUNT = 2
MAX_COUNT = 8
STYLES_PER_PAGE = 8
STYLE_BUTTONS_PER_ROW = 2
MIN_TRAIN_SELFIES = 1
POSE_FEATURES = {"sd15": "pose", "sdxl": "pose-sdxl"}  # the models pose needs, per style family
# /train's job kind, the models it needs and the weight file it writes, per base family (the names of
# facechain_core.train_lora and train_lora_sdxl, repeated: this process never imports torch).
TRAIN_KINDS = {"sd15": "train", "sdxl": "train_sdxl"}
TRAIN_FEATURES = {"sd15": FEATURE, "sdxl": "train-sdxl"}
LORA_WEIGHTS = {"sd15": "pytorch_lora_weights.safetensors", "sdxl": "pytorch_lora_weights_sdxl.safetensors"}
FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}
POSE_FOLDER = "pose"  # under the user's folder: <token>/pose.jpg, a copy of the photo whose pose a job takes;
# kept like other inputs (cartoon.SOURCE_TTL_S), so Vary and Again can reuse it meanwhile


# -- commands -----------------------------------------------------------------------------------
async def make_portrait(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Queues portraits of the user in the named style, with the studio's ``key:value`` controls; a photo
    the command carries or replies to lends its pose (no name: shows the catalogue)."""
    controls = studio.parse_controls(event.args)
    if not controls.words:
        await show_styles(services, event, channel)
        return
    words, count = _split_count(controls.words)
    catalogue = await style_sources.user_catalogue(services, event.user.key, _catalogue(services))
    style = catalogue.find(" ".join(words), event.language)
    if controls.panel and await studio.open_options(services, event, channel, style):
        return
    pose_photo = None
    if controls.pose in (None, studio.POSE_PHOTO):
        pose_photo = await cartoon.command_source_for(services, event, "pose")
        if pose_photo is None and controls.pose == studio.POSE_PHOTO:
            raise UserFacingError("pose.send_photo")
    await submit_portrait(services, event, channel, style, count, controls, pose_photo)


async def show_styles(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows the first page of the style catalogue (with its previews when rendered); tapping a style runs it."""
    await _send_page(services, channel, 0, event.language)


async def _send_page(services: Services, channel: ReplyChannel, number: int, lang: str) -> None:
    """Sends page `number` as a new message: its previews first when some are rendered (an album cannot carry
    buttons, so the page's buttons follow in a message; Discord shows one message with an embed gallery)."""
    text, keyboard = _styles_page(services, number, lang)
    previews = await asyncio.to_thread(_page_previews, services, number, lang)
    if not previews:
        await channel.send_text(text, keyboard)
    elif isinstance(channel, Gallery):
        await channel.send_gallery(previews, text, keyboard)
    else:
        await channel.send_images(previews)
        await channel.send_text(text, keyboard)


def _page_previews(services: Services, number: int, lang: str) -> list[Media]:
    """The rendered previews of a page's styles, captioned with their names (runs in a thread: file checks)."""
    page = _catalogue(services).page(number, STYLES_PER_PAGE)
    found = ((style, find_preview(services.data_dir, style)) for style in page.styles)
    return [Media(path=path, caption=style.display_name(lang)) for style, path in found if path is not None]


async def train_lora(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Queues training of the user's personal LoRA on their selfies, one job per family the operator enabled."""
    wanted = list(services.settings.training.train_families)
    families = [f for f in wanted if TRAIN_FEATURES[f] in services.features_installed]
    for family in sorted(set(wanted) - set(families)):
        log.warning("/train for %s skipped: run `facechain-bot models pull %s`", family, TRAIN_FEATURES[family])
    if not families:
        services.require_feature(TRAIN_FEATURES[wanted[0]])
    key = event.user.key
    selfies = await services.storage.selfies(key)
    if len(selfies) < MIN_TRAIN_SELFIES:
        raise UserFacingError("portrait.need_selfie")
    params = {
        "photos": [{"path": s.path, "face": s.face} for s in selfies],
        # A fixed folder: a restarted or interrupted training resumes from its checkpoint here.
        "out_dir": str((services.user_dir(key) / "lora").resolve()),
    }
    for family in families:
        await submit_with_progress(services, event, channel, TRAIN_KINDS[family], params)


async def user_lora(identity: Any, family: str) -> str | None:
    """The user's LoRA for styles of `family`, or None (train-free). The identity row records the last trained
    file; each family's weights sit side by side in /train's folder under their own name."""
    if identity is None or not identity.lora_path:
        return None
    recorded = Path(identity.lora_path)
    recorded_family = "sdxl" if recorded.name == LORA_WEIGHTS["sdxl"] else "sd15"
    if recorded_family == family:
        return str(recorded)  # a missing file is the pipeline's to report (portrait.user_lora_missing)
    sibling = recorded.parent / LORA_WEIGHTS[family]
    return str(sibling) if await asyncio.to_thread(sibling.is_file) else None


# -- the job behind /style ----------------------------------------------------------------------
async def submit_portrait(services: Services, event: Event, channel: ReplyChannel, style: Any,
                          count: int = DEFAULT_COUNT, controls: studio.Controls | None = None,
                          pose_photo: Source | None = None, extra: dict[str, Any] | None = None, *,
                          new_seed: bool = False) -> None:
    """Checks what only the request can tell, then queues the portrait job (`extra`: more params, /imagine's).

    Without a seed in `controls`, the seed is ``portrait_seed`` when the operator fixed one, unless
    `new_seed` (More like this) asks for a fresh draw: the fixed seed would only reproduce the first result."""
    services.require_feature(FEATURE)
    if style.family == "sdxl":
        services.require_feature(SDXL_FEATURE)
    controls = controls or studio.Controls()
    wants_pose = pose_photo is not None or controls.pose not in (None, studio.POSE_PHOTO)
    if wants_pose and POSE_FEATURES[style.family] not in services.features_installed:
        raise UserFacingError("pose.unavailable", style=style.display_name(event.language))
    key = event.user.key
    selfies = await services.storage.selfies(key)
    if not selfies:
        raise UserFacingError("portrait.need_selfie")
    identity = await services.storage.identity(key)
    job_controls = controls.job_controls()
    folder = None
    if pose_photo is not None:
        copies = services.user_dir(key) / POSE_FOLDER
        folder = copies / secrets.token_hex(6)
        limits = services.settings.limits
        await asyncio.to_thread(cartoon._prune, copies.glob("*/pose.jpg"), cartoon.SOURCE_TTL_S)  # as other inputs
        staged = await asyncio.to_thread(cartoon._stage, pose_photo, folder / "pose.jpg", services.max_upload_bytes,
                                         int(limits.max_pixels))
        job_controls["pose"] = {"image": str(staged.resolve())}
    elif controls.pose is not None:
        job_controls["pose"] = {"id": controls.pose}
    params = {
        "style": style.model_dump(mode="json"),
        "style_id": style.id,
        "count": count,
        "seed": controls.seed if controls.seed is not None else studio.new_seed(services, fresh=new_seed),
        "controls": job_controls,
        "identity": str((services.user_dir(key) / "identity.npz").resolve()),
        "selfies": [{"path": s.path, "face": s.face} for s in selfies],
        "user_lora": await user_lora(identity, style.family),
        **(extra or {}),
    }
    if identity is not None and identity.lora_path and params["user_lora"] is None:
        params["train_free_family"] = style.family  # the result says this style ran without the user's LoRA
    made_lora = style_sources.local_lora(services, style, key)  # a style made with /makestyle
    if made_lora is not None:
        params["style_lora"] = made_lora
    await submit_staged(services, event, channel, "portrait", params, folder)


def _split_count(args: list[str]) -> tuple[list[str], int]:
    """``["hanfu", "3"]`` -> (["hanfu"], 3); the count is optional and bounded."""
    count = ascii_int(args[-1]) if len(args) > 1 else None
    if count is not None:
        if not 1 <= count <= MAX_COUNT:
            raise UserFacingError("portrait.bad_count", max=MAX_COUNT)
        return args[:-1], count
    return args, DEFAULT_COUNT


def _catalogue(services: Services) -> Any:
    """The styles this server can run: their base family installed, and their style LoRA (if any)
    pulled (``models pull styles``), configured as ``[model_paths] style-lora-<id>`` or published from chat
    (/makestyle)."""
    families = ["sd15"] + (["sdxl"] if SDXL_FEATURE in services.features_installed else [])
    model_paths = getattr(services.settings, "model_paths", {}) or {}
    return StyleCatalog(s for s in services.styles.only(families)
                        if s.lora is None or s.lora.source == LOCAL_SOURCE or s.lora_model in model_paths
                        or lora_feature(s.id) in services.features_installed)


# -- the catalogue as buttons ---------------------------------------------------------------------
def _styles_page(services: Services, number: int, lang: str) -> tuple[str, list[list[Button]]]:
    catalogue = _catalogue(services)
    page = catalogue.page(number, STYLES_PER_PAGE)
    rows: list[list[Button]] = []
    for i in range(0, len(page.styles), STYLE_BUTTONS_PER_ROW):
        rows.append([Button(s.display_name(lang), buttons.payload("style", s.id))
                     for s in page.styles[i:i + STYLE_BUTTONS_PER_ROW]])
    nav = []
    if page.has_previous:
        nav.append(Button("◀", buttons.payload("styles", page.number - 1)))
    if page.has_next:
        nav.append(Button("▶", buttons.payload("styles", page.number + 1)))
    if nav:
        rows.append(nav)
    rows.append([Button(t("panel.button", lang), buttons.payload(studio.PANEL_LIST_ACTION, page.number))])
    text = t("portrait.catalogue", lang, page=page.number + 1, pages=page.total_pages, count=len(catalogue))
    return text, rows


async def press_style(services: Services, event: Event, channel: ReplyChannel, style_id: str) -> None:
    """Runs the tapped style for the presser."""
    style = _catalogue(services).get(style_id)
    if style is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button(t("portrait.style_chosen", event.language, style=style.display_name(event.language)))
    await submit_portrait(services, event, channel, style)


async def press_page(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Turns the catalogue message to another page."""
    number = ascii_int(argument)
    try:
        if number is None:
            raise ValueError(f"not a page number: {argument!r}")
        text, keyboard = _styles_page(services, number, event.language)
    except ValueError:
        await channel.answer_button(t("button.stale", event.language))
        return
    if event.message_id is not None and not await asyncio.to_thread(_page_previews, services, number, event.language):
        await channel.edit_text(MessageRef(event.chat, event.message_id), text, keyboard)
        return
    # A page with previews comes as a new album and message (an album cannot be edited into another).
    await _send_page(services, channel, number, event.language)


async def more_like_this(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Queues new portraits in the style of the pressed result."""
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    style = await style_sources.find_style(services, event.user.key, job.params.get("style_id", "")) if job else None
    if style is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    count = int(job.params.get("count", DEFAULT_COUNT))
    await submit_portrait(services, event, channel, style, count, new_seed=True)


# -- presenters: what finished jobs do ----------------------------------------------------------
async def present_portraits(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                            lang: str) -> None:
    """Sends the portraits as an album captioned with the style (or /imagine's scene) and each picture's seed,
    with the result buttons."""
    if job.params.get("imagine"):
        caption = t("imagine.caption", lang, scene=job.params["imagine"])
    else:
        style = services.styles.get(job.params.get("style_id", "")) if services.styles else None
        name = style.display_name(lang) if style else job.params.get("style_id", "")
        caption = t("portrait.caption", lang, style=name)
    if job.params.get("train_free_family"):
        caption += "\n" + t("portrait.train_free", lang, family=FAMILY_NAMES.get(job.params["train_free_family"], ""))
    seeds = studio.seeds_line(job, lang)
    await present_default(services, job, artifacts, channel, lang, caption=f"{caption}\n{seeds}" if seeds else caption)


async def record_identity(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                          lang: str) -> None:
    """Stores the user's new identity; the first one is announced."""
    files = [a for a in artifacts if a.path.endswith(".npz")]
    if not files:
        return
    first = await services.storage.identity(job.user_key) is None
    await services.storage.set_identity(job.user_key, files[0].path, len(job.params.get("selfies", [])))
    for artifact in artifacts:
        if artifact.delivered_at is None:
            await services.storage.mark_delivered(artifact.id, channel.chat.platform, None)
    if first:
        await channel.send_text(t("portrait.identity_ready", lang))


async def record_lora(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel, lang: str) -> None:
    """Stores the trained LoRA as the user's; /style uses it from now on."""
    weights = [a for a in artifacts if a.path.endswith(".safetensors")]
    if not weights:
        log.error("train job %d finished without a LoRA file", job.id)
        return
    if await services.storage.identity(job.user_key) is None:
        await services.storage.set_identity(job.user_key, str(services.user_dir(job.user_key) / "identity.npz"),
                                            len(job.params.get("photos", [])))
    await services.storage.set_lora(job.user_key, weights[0].path)
    for artifact in artifacts:
        if artifact.delivered_at is None:
            await services.storage.mark_delivered(artifact.id, channel.chat.platform, None)
    meta = (job.result or {}).get("meta", {})
    code = "portrait.lora_ready_sdxl" if job.kind == TRAIN_KINDS["sdxl"] else "portrait.lora_ready"
    await channel.send_text(t(code, lang, steps=meta.get("steps") or "?"))


registry.register_command("style", make_portrait, "help.style")
registry.register_command("styles", show_styles, "help.styles")
registry.register_command("train", train_lora, "help.train")
buttons.register_core_button("style", press_style)
buttons.register_core_button("styles", press_page)
buttons.register_result_button("more", "portrait.button_more", more_like_this, applies_to={"portrait"})
register_presenter("portrait", present_portraits)
register_presenter("identity", record_identity)
register_presenter("train", record_lora)
register_presenter("train_sdxl", record_lora)
