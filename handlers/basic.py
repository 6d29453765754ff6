"""The core commands: /start, /help, /status, /cancel, /delete, and the cancel and delete buttons.

/delete asks first; its Yes button carries a one-time nonce bound to the asking user, so nobody
else can press it and an old one expires. Confirmed, it cancels and drops the user's jobs, removes
``data_dir/users/<key>/`` and then every row of the user. Retention (``bot/ops/retention.py``) deletes one
class of a user's data with the same file helpers (``delete_expired_data``), and the files no row names
(``other_files``: inputs of jobs that never delivered, checkpoints of a stopped training) by their age.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facechain_core.numbers import ascii_int
from handlers import buttons, registry, router
from handlers.consent import consent_text
from handlers.messages import for_platform, t
from handlers.progress import ACTIVE_STATES, format_duration, kind_label
from handlers.protocols import Button, Event, JobView, MessageRef, ReplyChannel, User
from handlers.services import Services

log = logging.getLogger(__name__)

DELETE_CONFIRM_TTL_S = 600.0
LORA_FOLDER = "lora"  # /train's fixed output folder under the user's folder (handlers/portrait.py)


# -- commands -----------------------------------------------------------------------------------
async def show_start(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Says what the bot does, how to begin, and how user data is kept."""
    lang = event.language
    name = event.user.name or t("core.friend", lang)
    start = for_platform("core.start", event.user.platform)
    text = t(start, lang, name=name, max_selfies=services.settings.limits.max_selfies)
    await channel.send_text(text + "\n\n" + consent_text(services, lang))


async def show_help(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Lists the commands this user may run."""
    lang, platform = event.language, event.user.platform
    admin = router.is_admin(services, event.user.key)
    lines = [t("core.help_header", lang)]
    for command in registry.commands():
        if command.admin_only and not admin:
            continue
        lines.append(f"/{command.name} — {t(for_platform(command.help_code, platform), lang)}")
    lines.append("")
    lines.append(t(for_platform("core.help_footer", platform), lang))
    await channel.send_text("\n".join(lines))


async def show_status(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows the user's jobs with position and ETA, their selfie count and their likeness."""
    lang, key = event.language, event.user.key
    jobs = await services.jobs.user_jobs(key)
    active = [j for j in jobs if j.state in (*ACTIVE_STATES, "done")]
    lines = [t("status.jobs_header", lang) if active else t("status.no_jobs", lang)]
    for job in active:
        lines.append("• " + _job_line(job, lang))
    selfies = await services.storage.selfies(key)
    lines.append(t("status.selfies", lang, count=len(selfies), max=services.settings.limits.max_selfies))
    identity = await services.storage.identity(key)
    if any(j.kind == "identity" and j.state in ACTIVE_STATES for j in active):
        lines.append(t("status.identity_building", lang))
    elif identity is not None:
        lines.append(t("status.identity_ready", lang, photos=identity.photos))
    else:
        lines.append(t("status.identity_none", lang))
    await channel.send_text("\n".join(lines))


def _job_line(job: JobView, lang: str) -> str:
    label = kind_label(job.kind, lang)
    if job.state == "done":
        return t("status.job_sending", lang, id=job.id, kind=label)
    if job.state == "running":
        percent = round((job.progress or 0.0) * 100)
        text = t("status.job_running", lang, id=job.id, kind=label, percent=percent)
    else:
        text = t("status.job_queued", lang, id=job.id, kind=label, position=job.position or "?")
    if job.eta_s:
        text += " · " + t("progress.eta", lang, eta=format_duration(job.eta_s, lang))
    return text


async def cancel_jobs(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Cancels every job of the user (and any file a command was waiting for)."""
    lang, key = event.language, event.user.key
    pending = await services.storage.take_pending(key, event.chat.key)
    cancelled = await services.jobs.cancel(key)
    if cancelled:
        await channel.send_text(t("cancel.done", lang, count=len(cancelled)))
    elif pending is not None:
        await channel.send_text(t("cancel.pending_dropped", lang))
    else:
        await channel.send_text(t("cancel.nothing", lang))


async def ask_delete(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Asks the user to confirm deleting everything about them."""
    lang = event.language
    nonce = secrets.token_urlsafe(9)
    runtime = services.runtime
    now = services.clock()
    for old, (_, expires) in list(runtime.delete_confirms.items()):
        if expires <= now:
            del runtime.delete_confirms[old]
    runtime.delete_confirms[nonce] = (event.user.key, now + DELETE_CONFIRM_TTL_S)
    keyboard = [[Button(t("delete.yes", lang), buttons.payload("delete", nonce)),
                 Button(t("delete.no", lang), buttons.payload("keep", nonce))]]
    await channel.send_text(t("delete.confirm", lang), keyboard)


# -- buttons ------------------------------------------------------------------------------------
async def press_cancel(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Cancels the job of a progress message, if the presser owns it."""
    lang = event.language
    job_id = ascii_int(argument)
    job = await services.storage.job(job_id) if job_id is not None else None
    if job is None:
        await channel.answer_button(t("button.stale", lang))
    elif job.user_key != event.user.key:
        await channel.answer_button(t("button.not_yours", lang), alert=True)
    elif job.state not in ACTIVE_STATES:
        await channel.answer_button(t("button.job_over", lang))
    else:
        await services.jobs.cancel(event.user.key, job.id)
        await channel.answer_button(t("button.cancelling", lang))


async def press_delete(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Deletes everything about the user who asked, once they confirm."""
    owner = await _take_confirm(services, event, channel, argument)
    if owner is None:
        return
    await channel.answer_button(t("delete.working", event.language))
    counts = await delete_user_data(services, owner)
    log.info("deleted user %s (%s)", owner, ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    await _replace_question(event, channel, t("delete.done", event.language))


async def press_keep(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Drops a /delete question without deleting anything."""
    if await _take_confirm(services, event, channel, argument) is None:
        return
    await channel.answer_button()
    await _replace_question(event, channel, t("delete.kept", event.language))


async def _take_confirm(services: Services, event: Event, channel: ReplyChannel, nonce: str) -> str | None:
    entry = services.runtime.delete_confirms.get(nonce)
    if entry is None or entry[1] <= services.clock():
        services.runtime.delete_confirms.pop(nonce, None)
        await channel.answer_button(t("delete.expired", event.language), alert=True)
        return None
    owner = entry[0]
    if owner != event.user.key:
        await channel.answer_button(t("button.not_yours", event.language), alert=True)
        return None
    del services.runtime.delete_confirms[nonce]
    return owner


async def _replace_question(event: Event, channel: ReplyChannel, text: str) -> None:
    if event.message_id is None:
        await channel.send_text(text)
        return
    try:
        await channel.edit_text(MessageRef(event.chat, event.message_id), text, None)
    except Exception:
        log.warning("could not edit the /delete question; sending a new message", exc_info=True)
        await channel.send_text(text)


async def delete_user_data(services: Services, user_key: str) -> dict[str, int]:
    """Removes the user's jobs, folder and rows, in that order; returns row counts per table. A duo result
    the user is in goes for everyone in it (its file lives in its requester's folder); the others are told."""
    storage: Any = services.storage
    shared = await storage.shared_results(user_key)
    await services.jobs.forget_user(user_key)
    for artifact in shared:
        if artifact.owner_key != user_key:
            await remove_user_files(services, artifact.owner_key, [Path(artifact.path)])
    await remove_user_files(services, user_key, [services.user_dir(user_key)])
    counts = await storage.delete_user(user_key)
    services.runtime.forget_user(user_key)
    await tell_co_owners(services, user_key, shared)
    return counts


async def tell_co_owners(services: Services, user_key: str, shared: list[Any]) -> None:
    """Tells everyone else in the deleted duo results, privately where the platform allows, that they are gone."""
    others = sorted({key for a in shared for key in (a.owner_key, *a.co_owners)} - {user_key})
    for key in others:
        platform, _, user_id = key.partition(":")
        lang = await services.storage.user_language(key) or services.default_language
        try:
            chat = await services.private_chat(User(platform=platform, id=user_id))
            await services.channel_for(chat).send_text(t("duo.deleted_by_other", lang))
        except Exception:
            log.info("could not tell %s that a duo result was deleted", key)


async def delete_expired_data(services: Services, user_key: str, data_class: str, cutoff: float) -> dict[str, int]:
    """Removes one class of the user's data made before `cutoff` (retention), files first, then rows;
    returns row counts per table and ``files``. The caller makes sure no job of the user is in flight."""
    storage: Any = services.storage
    paths = [Path(p) for p in await storage.expired_files(user_key, data_class, cutoff)]
    if data_class == "loras":  # the training folder keeps its checkpoints beside the weights
        paths += [p.parent for p in paths if p.parent.name == LORA_FOLDER]
    files = await remove_user_files(services, user_key, paths)
    counts = await storage.delete_expired(user_key, data_class, cutoff)
    return {**counts, "files": files} if files else counts


async def remove_user_files(services: Services, user_key: str, paths: list[Path]) -> int:
    """Removes files and folders inside the user's folder (anything else is refused and logged), and
    the folders they leave empty, up to the user's own; returns how many paths were removed."""
    root = services.user_dir(user_key).resolve()
    return await asyncio.to_thread(_remove_paths, root, paths)


@dataclass(frozen=True)
class OtherFile:
    """A file in a user's folder that is none of their data (selfies, identity, LoRA, results)."""

    path: Path
    written: float  # modification time
    needed: bool  # a job still to run or deliver, or a command waiting for a file, names it


async def other_files(services: Services, user_key: str, now: float) -> list[OtherFile]:
    """Files under the user's folder that no data row names, oldest first: inputs and work files of jobs
    (needed while the job is queued, running or delivering), inputs of jobs that failed, were cancelled
    or never got their file, a stopped training's checkpoints, photos kept for style buttons."""
    storage: Any = services.storage
    data, needed = await storage.named_paths(user_key, now)
    return await asyncio.to_thread(_other_files, services.user_dir(user_key), data, needed)


def _other_files(root: Path, data: list[str], needed: list[str]) -> list[OtherFile]:
    if not root.is_dir():
        return []
    root = root.resolve()
    data_files, data_folders = _under(root, data)
    data_folders |= {p.parent for p in data_files if p.parent.name == LORA_FOLDER}  # a LoRA keeps its checkpoints
    data_folders |= {root / name for name in registry.user_data_folders()}
    needed_files, needed_folders = _under(root, needed)
    found = []
    for path in root.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        resolved = path.resolve()
        if resolved in data_files or any(resolved.is_relative_to(f) for f in data_folders):
            continue
        is_needed = resolved in needed_files or any(resolved.is_relative_to(f) for f in needed_folders)
        found.append(OtherFile(path, path.lstat().st_mtime, is_needed))
    return sorted(found, key=lambda f: f.written)


def _under(root: Path, names: list[str]) -> tuple[set[Path], set[Path]]:
    """The files and the folders among `names` (absolute paths) that lie under `root`."""
    files: set[Path] = set()
    folders: set[Path] = set()
    for name in names:
        path = Path(name)
        if not path.is_absolute():
            continue
        path = path.resolve()
        if path.is_relative_to(root):
            (folders if path.is_dir() else files).add(path)
    return files, folders


def _remove_paths(root: Path, paths: list[Path]) -> int:
    removed = 0
    for given in paths:
        path = Path(given).resolve()
        if path != root and not path.is_relative_to(root):
            log.error("refusing to remove %s: it is outside %s", path, root)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed += 1
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed += 1
        parent = path.parent
        while parent.is_relative_to(root):  # the user's own folder too, once nothing is left in it
            try:
                parent.rmdir()  # only an empty folder goes
            except OSError:
                break
            parent = parent.parent
    return removed


registry.register_command("start", show_start, "help.start")
registry.register_command("help", show_help, "help.help")
registry.register_command("status", show_status, "help.status")
registry.register_command("cancel", cancel_jobs, "help.cancel")
registry.register_command("delete", ask_delete, "help.delete")
buttons.register_core_button("cancel", press_cancel)
buttons.register_core_button("delete", press_delete)
buttons.register_core_button("keep", press_keep)
