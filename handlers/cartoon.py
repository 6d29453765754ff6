"""Cartoons in chat: reply to a photo with /cartoon [STYLE], or tap "Cartoon" under a result.

The picture is, in this order: one sent with the command (a captioned photo, a Discord option),
the one the command replies to, or the user's latest selfie (private chats only); without any,
the bot asks for a photo (pending input). A reply works only on the requester's own photo or on a
result the bot made for them: the result is found among the requester's own artifacts by the
platform's file id, else by its picture (file ids of one file may differ between messages), and
its stored file is used. Anything else is refused.

/cartoon alone, or with an unknown style, lists the installed styles as buttons bound to that
picture (``toon:<style>.<ref>``; ``s<token>``: a copy kept for a day, ``a<artifact id>``: a result).
Every job gets a copy of its input in the user's own folder (``data_dir/users/<key>/cartoon/``), so
/delete removes it with the rest; the copy goes once the cartoon is delivered.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facechain_core.cartoon import CartoonBook, CartoonStyle, load_cartoon_styles
from facechain_core.errors import UserFacingError
from facechain_core.images import decode_image, encode_jpeg
from handlers import buttons, registry, router
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_staged
from handlers.protocols import Attachment, Button, Event, ReplyChannel
from handlers.selfie import is_image
from handlers.services import MB, Services

log = logging.getLogger(__name__)

FEATURE = "cartoon"
KIND = "cartoon"
PRESS_ACTION = "toon"  # toon:<style id>[.<source ref>]
RESULT_ACTION = "cartoon"
FOLDER = "cartoon"  # under the user's folder: jobs/<token>/ and sources/<token>.jpg
SOURCE_TTL_S = 24 * 3600.0
JPEG_QUALITY = 95
STYLE_BUTTONS_PER_ROW = 2
RECENT_RESULTS = 30  # own results compared by picture when the file id does not match
FINGERPRINT_SIDE = 24
FINGERPRINT_MAX_DIFF = 6.0  # mean absolute grey difference (0..255) of two fingerprints of one picture
DONE_STATES = ("delivered", "done")
_TOKEN_RE = re.compile(r"[0-9a-f]{12}")
_OWNER_MARK_LEN = 4


@dataclass(frozen=True)
class Source:
    """A picture to cartoonise: bytes the user just sent, or a file the bot keeps for them."""

    data: bytes | None = None
    path: Path | None = None
    artifact_id: str | None = None  # set when the file is one of the user's results


# -- the command --------------------------------------------------------------------------------
async def make_cartoon(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Cartoonises the photo the command carries or replies to (no style: shows the styles)."""
    book, styles = offered_styles(services)
    wanted = " ".join(event.args)
    style = book.find(wanted, styles) if wanted else None
    source = await command_source(services, event)
    if style is None:
        ref = await keep_source(services, event.user.key, source) if source is not None else ""
        text = t("cartoon.unknown_style", event.language, style=wanted) if wanted else \
            t("cartoon.pick_style", event.language)
        await channel.send_text(text, style_keyboard(styles, ref, event.language))
        return
    await cartoon_or_ask(services, event, channel, style, source)


async def cartoon_or_ask(services: Services, event: Event, channel: ReplyChannel, style: CartoonStyle,
                         source: Source | None) -> None:
    """Queues the cartoon of `source` (else the latest selfie); without a picture, asks for one."""
    if source is None:
        source = await latest_selfie(services, event)
    if source is None:
        await router.expect_input(services, event, KIND, {"style": style.id})
        await channel.send_text(t("cartoon.send_photo", event.language, style=style.display_name(event.language),
                                  style_id=style.id))
        return
    await submit_cartoon(services, event, channel, style, source)


async def submit_cartoon(services: Services, event: Event, channel: ReplyChannel, style: CartoonStyle,
                         source: Source) -> None:
    """Copies the picture into a job folder of the user's own, then queues the "cartoon" job."""
    jobs = services.user_dir(event.user.key) / FOLDER / "jobs"
    folder = jobs / secrets.token_hex(6)
    limits = services.settings.limits
    # Inputs of jobs that never delivered (failed, cancelled) go after a day.
    await asyncio.to_thread(_prune, jobs.glob("*/input.jpg"), SOURCE_TTL_S)
    image = await asyncio.to_thread(_stage, source, folder / "input.jpg", services.max_upload_bytes,
                                    int(limits.max_pixels))
    params = {"image": str(image.resolve()), "style": style.id, "out_dir": str(folder.resolve())}
    await submit_staged(services, event, channel, KIND, params, folder)
    log.info("cartoon %s queued for %s", style.id, event.user.key)


def offered_styles(services: Services) -> tuple[CartoonBook, list[CartoonStyle]]:
    """The style data and the styles whose models are installed; refuses when none is."""
    services.require_feature(FEATURE)
    book = load_cartoon_styles()
    styles = book.available(services.features_installed)
    if not styles:
        raise UserFacingError("cartoon.no_styles")
    return book, styles


def style_keyboard(styles: list[CartoonStyle], ref: str, lang: str) -> list[list[Button]]:
    """One button per style, bound to the picture `ref` names (empty: the presser's latest selfie)."""
    row = [Button(s.display_name(lang), buttons.payload(PRESS_ACTION, f"{s.id}.{ref}" if ref else s.id))
           for s in styles]
    return [row[i:i + STYLE_BUTTONS_PER_ROW] for i in range(0, len(row), STYLE_BUTTONS_PER_ROW)]


# -- where the picture comes from ---------------------------------------------------------------
# What command_source refuses; a feature using it has its own wording of each ("<feature>.not_yours").
SOURCE_REFUSALS = ("not_yours", "reply_no_photo", "photo_gone")


async def command_source(services: Services, event: Event) -> Source | None:
    """The picture sent with the command, else the one it replies to (checked to be the user's)."""
    own = [a for a in event.attachments if is_image(a)]
    if own:
        return Source(data=await fetch_image(services, own[0]))
    return await reply_source(services, event)


async def command_source_for(services: Services, event: Event, feature: str) -> Source | None:
    """``command_source`` for another feature: its refusals come worded by that feature ("tryon.not_yours")."""
    try:
        return await command_source(services, event)
    except UserFacingError as exc:
        kind, _, refusal = exc.code.partition(".")
        if kind == "cartoon" and refusal in SOURCE_REFUSALS:
            raise UserFacingError(f"{feature}.{refusal}", **exc.details) from None
        raise


async def reply_source(services: Services, event: Event) -> Source | None:
    """The replied-to picture when it is the requester's photo or result; None without a reply."""
    replied = event.reply_to
    if replied is None:
        return None
    if replied.image is None:
        raise UserFacingError("cartoon.reply_no_photo")
    key = event.user.key
    if replied.sender == key:
        return Source(data=await fetch_image(services, replied.image))
    if replied.from_bot:
        artifact = await own_result(services, key, event.chat.platform, replied.file_id, replied.image)
        if artifact is not None:
            path = Path(artifact.path)
            if not await asyncio.to_thread(path.is_file):
                raise UserFacingError("cartoon.photo_gone")
            return Source(path=path, artifact_id=artifact.id)
    log.info("%s asked for a cartoon of a picture that is not theirs (sent by %r)", key, replied.sender or "?")
    raise UserFacingError("cartoon.not_yours")


async def own_result(services: Services, user_key: str, platform: str, file_id: str | None,
                     image: Attachment) -> Any | None:
    """The requester's own image artifact the bot's message shows: by file id, else by picture."""
    storage: Any = services.storage
    recent: list[Any] = []
    for job in sorted(await storage.user_jobs(user_key, DONE_STATES), key=lambda j: j.id, reverse=True):
        for artifact in await storage.job_artifacts(job.id):
            if not artifact.media_type.startswith("image/") or artifact.owner_key != user_key:
                continue
            if file_id and (artifact.file_ids or {}).get(platform) == file_id:
                return artifact
            if len(recent) < RECENT_RESULTS:
                recent.append(artifact)
    if not recent:
        return None
    data = await fetch_image(services, image)
    index = await asyncio.to_thread(_match_picture, data, [Path(a.path) for a in recent])
    return recent[index] if index is not None else None


async def latest_selfie(services: Services, event: Event) -> Source | None:
    """The user's newest selfie, in a private chat only (a group never sees it)."""
    if not event.chat.is_private:
        return None
    selfies = await services.storage.selfies(event.user.key)
    return Source(path=Path(selfies[-1].path)) if selfies else None


async def fetch_image(services: Services, attachment: Attachment) -> bytes:
    """Downloads a picture within the upload limit."""
    limit = services.max_upload_bytes
    if attachment.size is not None and attachment.size > limit:
        raise UserFacingError("image.too_large", size_mb=f"{attachment.size / MB:.1f}", max_mb=f"{limit / MB:.1f}")
    return await attachment.fetch()


async def keep_source(services: Services, user_key: str, source: Source) -> str:
    """The ref style buttons carry: ``a<id>`` of a result, else ``s<token>`` of a copy kept for a day."""
    if source.artifact_id is not None:
        return f"a{source.artifact_id}"
    folder = services.user_dir(user_key) / FOLDER / "sources"
    token = _owner_mark(user_key) + secrets.token_hex(4)
    limits = services.settings.limits
    await asyncio.to_thread(_prune, folder.glob("*"), SOURCE_TTL_S)
    await asyncio.to_thread(_stage, source, folder / f"{token}.jpg", services.max_upload_bytes,
                            int(limits.max_pixels))
    return f"s{token}"


async def pressed_source(services: Services, event: Event, ref: str) -> Source | None:
    """The picture a style button is bound to, checked against the presser."""
    key = event.user.key
    if not ref:
        return None
    kind, value = ref[0], ref[1:]
    if kind == "s" and _TOKEN_RE.fullmatch(value):
        if not value.startswith(_owner_mark(key)):
            raise UserFacingError("button.not_yours")
        path = services.user_dir(key) / FOLDER / "sources" / f"{value}.jpg"
        if not await asyncio.to_thread(path.is_file):
            raise UserFacingError("cartoon.photo_gone")
        return Source(path=path)
    if kind == "a" and value:
        artifact = await services.storage.artifact(value)
        if artifact is None:
            raise UserFacingError("cartoon.photo_gone")
        if artifact.owner_key != key:
            raise UserFacingError("button.not_yours")
        path = Path(artifact.path)
        if not await asyncio.to_thread(path.is_file):
            raise UserFacingError("cartoon.photo_gone")
        return Source(path=path, artifact_id=artifact.id)
    raise UserFacingError("button.stale")


# -- buttons and pending input -------------------------------------------------------------------
async def press_style(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Runs the tapped style on the picture its button is bound to."""
    style_id, _, ref = argument.partition(".")
    _, styles = offered_styles(services)
    style = next((s for s in styles if s.id == style_id), None)
    if style is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    source = await pressed_source(services, event, ref)
    await channel.answer_button(t("cartoon.style_chosen", event.language, style=style.display_name(event.language)))
    await cartoon_or_ask(services, event, channel, style, source)


async def press_result(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Shows the styles for a result of the presser (ownership was checked by the registry)."""
    _, styles = offered_styles(services)
    await channel.answer_button()
    await channel.send_text(t("cartoon.pick_style", event.language),
                            style_keyboard(styles, f"a{artifact.id}", event.language))


async def receive_photo(services: Services, event: Event, channel: ReplyChannel, pending: Any) -> None:
    """Cartoonises the photo the user sent after /cartoon asked for one."""
    images = [a for a in event.attachments if is_image(a)]
    if not images:
        raise UserFacingError("cartoon.not_a_photo")
    source = Source(data=await fetch_image(services, images[0]))
    _, styles = offered_styles(services)
    style = next((s for s in styles if s.id == (pending.payload or {}).get("style")), None)
    if style is None:
        ref = await keep_source(services, event.user.key, source)
        await channel.send_text(t("cartoon.pick_style", event.language), style_keyboard(styles, ref, event.language))
        return
    await submit_cartoon(services, event, channel, style, source)


# -- the finished job ---------------------------------------------------------------------------
async def present_cartoon(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                          lang: str) -> None:
    """Sends the cartoon with its style (and any downscaling) in the caption, then drops the input copy."""
    style = load_cartoon_styles().get(str(job.params.get("style", "")))
    name = style.display_name(lang) if style else str(job.params.get("style", ""))
    meta = (job.result or {}).get("meta") or {}
    if meta.get("downscaled_from"):
        caption = t("cartoon.caption_downscaled", lang, style=name, max_side=meta.get("max_side"))
    else:
        caption = t("cartoon.caption", lang, style=name)
    await present_default(services, job, artifacts, channel, lang, caption=caption)
    image = job.params.get("image")
    if image and Path(image).name == "input.jpg" and FOLDER in Path(image).parts:
        await asyncio.to_thread(Path(image).unlink, True)


# -- file work (blocking: run in threads) --------------------------------------------------------
def _stage(source: Source, target: Path, max_bytes: int, max_pixels: int) -> Path:
    """Writes the picture to `target`: sent bytes decoded and re-encoded (no metadata), files copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    if source.data is not None:
        image = decode_image(source.data, max_bytes=max_bytes, max_pixels=max_pixels)
        tmp.write_bytes(encode_jpeg(image, JPEG_QUALITY))
    elif source.path is not None:
        shutil.copyfile(source.path, tmp)
    else:
        raise ValueError("a Source needs data or a path")
    tmp.replace(target)
    return target


def _prune(paths: Iterable[Path], max_age_s: float) -> None:
    """Removes the files older than `max_age_s`, and the folders they leave empty."""
    cutoff = time.time() - max_age_s
    for path in list(paths):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                path.parent.rmdir()  # only an empty folder goes
        except OSError:
            continue


def _owner_mark(user_key: str) -> str:
    """A short mark of the user in source tokens: a button of someone else is told apart from an expired one."""
    return hashlib.sha256(user_key.encode()).hexdigest()[:_OWNER_MARK_LEN]


def _fingerprint(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(grey, (FINGERPRINT_SIDE, FINGERPRINT_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)


def _match_picture(data: bytes, candidates: list[Path]) -> int | None:
    """The index of the candidate file showing the same picture as `data` (re-encoded, resized), if any."""
    try:
        target = np.asarray(decode_image(data, max_bytes=len(data) + 1, max_pixels=100_000_000))
    except UserFacingError:
        return None
    aspect = target.shape[1] / target.shape[0]
    wanted = _fingerprint(target)
    best, best_diff = None, FINGERPRINT_MAX_DIFF
    for index, path in enumerate(candidates):
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if picture is None or abs(picture.shape[1] / picture.shape[0] - aspect) > 0.02 * aspect:
            continue
        diff = float(np.abs(_fingerprint(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)) - wanted).mean())
        if diff < best_diff:
            best, best_diff = index, diff
    return best


registry.register_command("cartoon", make_cartoon, "help.cartoon")
registry.register_pending(KIND, receive_photo)
buttons.register_core_button(PRESS_ACTION, press_style)
buttons.register_result_button(RESULT_ACTION, "cartoon.button", press_result, applies_to={"portrait", "cartoon"})
register_presenter(KIND, present_cartoon)
