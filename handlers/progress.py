"""What a job shows in its chat: the queued notice, one progress message edited in place, the result.

The scheduler's job sink calls ``show_progress``, ``deliver_result``, ``report_failure`` and
``report_cancelled`` with the job row (``bot.storage.Job``, duck-typed). Progress edits are
throttled to ``settings.scheduler.progress_interval_s``; the final state is always shown.
Delivery dispatches on the job kind to a registered presenter; the default one sends images as
an album with the registered result buttons and records each delivered artifact. What features add
to every job (quota and group checks, the AI note, Report buttons) comes through ``handlers.hooks``.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from facechain_core.errors import UserFacingError
from handlers import buttons, hooks
from handlers.messages import catalogue, t
from handlers.protocols import (
    Addressing,
    Button,
    Chat,
    Event,
    Media,
    MessageRef,
    ReplyChannel,
    ResultInPlace,
    Submitted,
    User,
)
from handlers.services import ProgressMemo, Services

log = logging.getLogger(__name__)

BAR_WIDTH = 10
BAR_FULL, BAR_EMPTY = "▰", "▱"
# Job states a user can still cancel (the strings of bot.storage.JobState).
ACTIVE_STATES = ("queued", "running")


class JobLike(Protocol):
    id: int
    user_key: str
    kind: str
    state: str
    params: dict[str, Any]
    chat: dict[str, Any]
    progress_ref: dict[str, Any] | None


class ArtifactLike(Protocol):
    id: str
    owner_key: str
    kind: str
    path: str
    media_type: str
    file_ids: dict[str, str]
    delivered_at: float | None


Presenter = Callable[[Services, JobLike, list[Any], ReplyChannel, str], Awaitable[None]]
_presenters: dict[str, Presenter] = {}


def register_presenter(kind: str, presenter: Presenter) -> None:
    """Sets how results of a job kind reach the chat: ``presenter(services, job, artifacts, channel, lang)``."""
    _presenters[kind] = presenter


# -- formatting ---------------------------------------------------------------------------------
def render_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return BAR_FULL * filled + BAR_EMPTY * (width - filled)


def format_duration(seconds: float, lang: str) -> str:
    """``45 s``, ``3 min``, ``2 h 5 min`` in the user's language."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return t("time.seconds", lang, n=max(seconds, 1))
    minutes = round(seconds / 60)
    if minutes < 60:
        return t("time.minutes", lang, n=minutes)
    return t("time.hours", lang, h=minutes // 60, m=minutes % 60)


def kind_label(kind: str, lang: str) -> str:
    code = f"job.kind.{kind}"
    return t(code, lang) if code in catalogue() else kind


def cancel_button(job_id: int, lang: str) -> list[list[Button]]:
    return [[Button(t("cancel.button", lang), buttons.payload("cancel", job_id))]]


def error_text(error: Any, lang: str) -> str:
    """The user's words for a job failure: a UserFacingError, its stored dict, or anything else."""
    if isinstance(error, UserFacingError):
        code, details = error.code, error.details
    elif isinstance(error, dict) and isinstance(error.get("code"), str):
        code, details = error["code"], dict(error.get("details") or {})
    else:
        return t("job.failed", lang)
    if code not in catalogue():
        log.error("no catalogue message for job error code %r", code)
        return t("job.failed", lang)
    return t(code, lang, **details)


# -- submitting ---------------------------------------------------------------------------------
async def submit_with_progress(services: Services, event: Event, channel: ReplyChannel, kind: str,
                               params: dict[str, Any]) -> Submitted:
    """Admits and submits a job, then answers with its queue position and a Cancel button (its progress message)."""
    # Checks and the job row they count are one step per user: concurrent commands cannot pass a quota.
    async with services.runtime.user_lock(event.user.key):
        params, undo = await hooks.admit(services, event, kind, params)  # quotas, a group's rules...
        try:
            submitted = await submit_job(services, event, kind, params)
        except BaseException:
            await undo()
            raise
    text = queued_text(kind, submitted.position, submitted.eta_s, event.language)
    try:
        ref = await addressed(channel, event.user).send_text(text, cancel_button(submitted.job_id, event.language))
    except Exception:
        # The job is queued all the same: its progress (or result) will be the user's first word of it.
        log.warning("job %d: could not say it is queued", submitted.job_id, exc_info=True)
        return submitted
    await services.jobs.attach_progress(submitted.job_id, ref)
    return submitted


async def submit_staged(services: Services, event: Event, channel: ReplyChannel, kind: str, params: dict[str, Any],
                        folder: Path | None) -> Submitted:
    """``submit_with_progress`` for a job whose inputs were copied into its own `folder` (None: it has none);
    when submitting fails, the folder goes too, so a refused job leaves nothing behind."""
    try:
        return await submit_with_progress(services, event, channel, kind, params)
    except BaseException:
        if folder is not None:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        raise


async def submit_job(services: Services, event: Event, kind: str, params: dict[str, Any]) -> Submitted:
    """Submits a job for the event's user and chat, keyed by the update that asked for it (a re-sent
    update then raises DuplicateUpdate instead of making a second job)."""
    key = event.submission_key()
    extra = {"update_key": key} if key is not None else {}
    return await services.jobs.submit(event.user.key, kind, params, event.chat, **extra)


def queued_text(kind: str, position: int, eta_s: float | None, lang: str) -> str:
    label = kind_label(kind, lang)
    text = t("progress.starting", lang, kind=label) if position <= 0 else t(
        "progress.queued", lang, kind=label, position=position)
    if eta_s:
        text += " · " + t("progress.eta", lang, eta=format_duration(eta_s, lang))
    return text


# -- the job sink's calls -----------------------------------------------------------------------
async def show_progress(services: Services, job: JobLike, step: int, total: int, text: str | None = None) -> None:
    """Edits the job's progress message (bar, percent, ETA), at most once per interval but always the last step."""
    now = services.clock()
    services.runtime.maybe_sweep(now)
    memo = services.runtime.progress.get(job.id)
    if memo is None:
        memo = services.runtime.progress[job.id] = ProgressMemo(started=now, first_step=step)
    final = total > 0 and step >= total
    interval = float(services.settings.scheduler.progress_interval_s)
    if not final and memo.last_edit is not None and now - memo.last_edit < interval:
        return
    lang = await _memo_language(services, job, memo)
    fraction = step / total if total > 0 else 0.0
    body = _progress_body(job.kind, text, lang)
    line = f"{render_bar(fraction)} {round(fraction * 100)}%"
    if not final and step > memo.first_step and now > memo.started:
        eta = (now - memo.started) / (step - memo.first_step) * (total - step)
        line += " · " + t("progress.eta", lang, eta=format_duration(eta, lang))
    message = f"{body}\n{line}"
    if message == memo.last_text:
        return
    try:
        await _put_progress(services, job, memo, message, None if final else cancel_button(job.id, lang))
    except Exception:
        log.warning("job %d: progress update failed", job.id, exc_info=True)
        return
    memo.last_edit, memo.last_text = now, message


async def deliver_result(services: Services, job: JobLike, artifacts: list[Any]) -> None:
    """Sends the job's undelivered artifacts through its kind's presenter; raises if sending failed.

    Where the platform can (Discord), the result replaces the progress message; elsewhere that message
    says the job is done."""
    channel = _job_channel(services, job)
    lang = await _job_language(services, job)
    ref = _stored_ref(services, job)
    in_place = ref is not None and isinstance(channel, ResultInPlace)
    if in_place:
        channel.result_in_place(ref)  # type: ignore[union-attr]
    presenter = _presenters.get(job.kind, present_default)
    await presenter(services, job, artifacts, channel, lang)
    if in_place and channel.replaced:  # type: ignore[union-attr]
        services.runtime.progress.pop(job.id, None)
        return
    await _finish_progress(services, job, channel, t("progress.done", lang))


async def report_failure(services: Services, job: JobLike, error: Any) -> None:
    """Tells the user why the job failed, in its progress message when there is one, else in a new
    message; raises when neither reached the chat (the scheduler tries again later)."""
    lang = await _job_language(services, job)
    channel = _job_channel(services, job)
    text = error_text(error, lang)
    if not await _finish_progress(services, job, channel, text):
        await channel.send_text(text)


async def report_late(services: Services, job: JobLike) -> None:
    """Tells the user their result is ready but sending it keeps failing: it will arrive late. Raises when
    that did not reach the chat either."""
    lang = await _job_language(services, job)
    await _job_channel(services, job).send_text(t("job.late", lang))


async def report_cancelled(services: Services, job: JobLike) -> None:
    """Marks the job's progress message as cancelled (a job without one needs no word: /cancel answered)."""
    lang = await _job_language(services, job)
    await _finish_progress(services, job, _job_channel(services, job), t("progress.cancelled", lang))


# -- presenting ---------------------------------------------------------------------------------
async def present_default(services: Services, job: JobLike, artifacts: list[Any], channel: ReplyChannel,
                          lang: str, caption: str | None = None) -> None:
    """Sends images as one album (caption and result buttons), videos and audio one by one; every
    caption and keyboard gets the registered decorations (the AI-generated note, a Report button)."""
    platform = channel.chat.platform
    todo = [a for a in artifacts if a.delivered_at is None]
    images = [a for a in todo if a.media_type.startswith("image/")]
    if images:
        text, keyboard = hooks.decorate_result(services, job, caption or t("result.caption", lang), images, lang)
        sent = await channel.send_images([_media(a, platform) for a in images], caption=text, buttons=keyboard)
        for artifact, file in zip(images, sent, strict=False):
            await services.storage.mark_delivered(artifact.id, platform, file.file_id)
    image_ids = {a.id for a in images}
    for artifact in todo:
        if artifact.id in image_ids:
            continue
        text, keyboard = hooks.decorate_result(services, job, caption, [artifact], lang)
        if artifact.media_type.startswith("video/"):
            file = await channel.send_video(_media(artifact, platform), caption=text, buttons=keyboard)
        elif artifact.media_type.startswith("audio/"):
            file = await channel.send_audio(_media(artifact, platform), caption=text)
            if keyboard:  # an audio message carries no buttons: they follow it
                await channel.send_text(t("core.more_actions", lang), keyboard)
        else:
            # Other files (embeddings, LoRA weights) are the bot's own, not for the chat.
            await services.storage.mark_delivered(artifact.id, platform, None)
            continue
        await services.storage.mark_delivered(artifact.id, platform, file.file_id)


def _media(artifact: Any, platform: str) -> Media:
    file_id = (artifact.file_ids or {}).get(platform)
    return Media(file_id=file_id) if file_id else Media(path=Path(artifact.path))


# -- helpers ------------------------------------------------------------------------------------
def _job_chat(job: JobLike) -> Chat:
    return Chat.from_dict(job.chat)


def addressed(channel: ReplyChannel, user: User) -> ReplyChannel:
    """`channel`, naming `user` in its public messages where the platform does (a Discord server)."""
    if isinstance(channel, Addressing):
        channel.address(user)
    return channel


def _job_channel(services: Services, job: JobLike) -> ReplyChannel:
    """The channel of the job's chat, naming its requester (who asked is not otherwise clear on Discord)."""
    platform, _, user_id = job.user_key.partition(":")
    return addressed(services.channel_for(_job_chat(job)), User(platform, user_id))


def _progress_body(kind: str, text: str | None, lang: str) -> str:
    if text and text in catalogue():
        return t(text, lang)
    return text or t("progress.working", lang, kind=kind_label(kind, lang))


async def _job_language(services: Services, job: JobLike) -> str:
    return await services.storage.user_language(job.user_key) or services.default_language


async def _memo_language(services: Services, job: JobLike, memo: ProgressMemo) -> str:
    if memo.language is None:
        memo.language = await _job_language(services, job)
    return memo.language


def _stored_ref(services: Services, job: JobLike) -> MessageRef | None:
    memo = services.runtime.progress.get(job.id)
    if memo is not None and memo.ref is not None:
        return memo.ref
    return MessageRef.from_dict(job.progress_ref) if job.progress_ref else None


async def _put_progress(services: Services, job: JobLike, memo: ProgressMemo, text: str,
                        keyboard: list[list[Button]] | None) -> None:
    channel = _job_channel(services, job)
    ref = _stored_ref(services, job)
    if ref is not None:
        await channel.edit_text(ref, text, keyboard)
        memo.ref = ref
        return
    memo.ref = await channel.send_text(text, keyboard)
    await services.jobs.attach_progress(job.id, memo.ref)


async def _finish_progress(services: Services, job: JobLike, channel: ReplyChannel, text: str) -> bool:
    """Puts the final words in the progress message without buttons; False when there is none."""
    ref = _stored_ref(services, job)
    services.runtime.progress.pop(job.id, None)
    if ref is None:
        return False
    try:
        await channel.edit_text(ref, text, None)
    except Exception:
        log.warning("job %d: could not update its progress message", job.id, exc_info=True)
        return False
    return True
