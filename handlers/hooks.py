"""What features add to every job: admission checks before it is submitted, decorations on its result.

``progress.submit_with_progress`` runs the admission checks; every way a result leaves the bot
(``progress.present_default``, a Share post, an inline result) runs the decorations through
``decorate_result``. Features register at import time::

    register_admission_check(check_quota, AdmissionStage.USER)
    register_caption_decorator(result_caption)
    register_keyboard_decorator(add_report_buttons)
    register_keyboard_decorator(add_options_button, owner_only=True)   # never on a Share post

With nothing registered a job is admitted as asked and its result shown as presented.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from handlers import buttons
from handlers.protocols import Button, Event
from handlers.services import Services

log = logging.getLogger(__name__)

Keyboard = list[list[Button]]
Undo = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Admission:
    """What a check lets through: the job's params (maybe amended) and how to give back what it took."""

    params: dict[str, Any]
    undo: Undo | None = None


class AdmissionStage(IntEnum):
    """When a check runs (checks of one stage run in registration order)."""

    USER = 10  # the user's own limits: they only read, so refusing here takes nothing from a group
    CHAT = 20  # the chat's rules, which may take a share of a group's daily limit


# Refuses a job by raising UserFacingError; returns None to admit it unchanged, taking nothing.
AdmissionCheck = Callable[[Services, Event, str, dict[str, Any]], Awaitable[Admission | None]]
# (services, job, caption or None, lang) -> the caption with the feature's note.
CaptionDecorator = Callable[[Services, Any, str | None, str], str | None]
# (services, job, keyboard or None, artifacts, lang) -> the keyboard with the feature's buttons.
KeyboardDecorator = Callable[[Services, Any, Keyboard | None, list[Any], str], Keyboard | None]

_admission_checks: list[tuple[AdmissionStage, AdmissionCheck]] = []
_caption_decorators: list[CaptionDecorator] = []
_keyboard_decorators: list[tuple[KeyboardDecorator, bool]] = []  # (decorator, only where the owner sees it)


def register_admission_check(check: AdmissionCheck, stage: AdmissionStage) -> None:
    """Adds a check every job passes before it is submitted (by stage, then registration order)."""
    if any(existing is check for _, existing in _admission_checks):
        return
    _admission_checks.append((stage, check))
    _admission_checks.sort(key=lambda entry: entry[0])  # stable: registration order within a stage


def register_caption_decorator(decorator: CaptionDecorator) -> None:
    """Adds a note to every result's caption (in registration order)."""
    if decorator not in _caption_decorators:
        _caption_decorators.append(decorator)


def register_keyboard_decorator(decorator: KeyboardDecorator, *, owner_only: bool = False) -> None:
    """Adds buttons under every result (in registration order); `owner_only` buttons are left out where the
    result is shown to others (a Share post, an inline result)."""
    if all(existing is not decorator for existing, _ in _keyboard_decorators):
        _keyboard_decorators.append((decorator, owner_only))


async def admit(services: Services, event: Event, kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], Undo]:
    """Runs every admission check; returns the params they let through and one undo for all they took.

    A refusal gives back what the checks before it took, then propagates."""
    undos: list[Undo] = []
    try:
        for _, check in _admission_checks:
            admission = await check(services, event, kind, params)
            if admission is not None:
                params = admission.params
                if admission.undo is not None:
                    undos.append(admission.undo)
    except BaseException:
        await _undo_all(undos)
        raise

    async def undo() -> None:
        await _undo_all(undos)

    return params, undo


async def _undo_all(undos: list[Undo]) -> None:
    for undo in reversed(undos):
        try:
            await undo()
        except Exception:
            log.warning("could not give back what an admission check took", exc_info=True)


def decorate_caption(services: Services, job: Any, caption: str | None, lang: str) -> str | None:
    """`caption` with every registered note (None stays None when nothing is registered)."""
    for decorator in _caption_decorators:
        caption = decorator(services, job, caption, lang)
    return caption


def decorate_keyboard(services: Services, job: Any, keyboard: Keyboard | None, artifacts: list[Any],
                      lang: str, *, owner: bool = True) -> Keyboard | None:
    """`keyboard` with every registered decoration's buttons for `artifacts` (without the owner-only ones
    unless `owner`)."""
    for decorator, owner_only in _keyboard_decorators:
        if owner or not owner_only:
            keyboard = decorator(services, job, keyboard, artifacts, lang)
    return keyboard


def result_keyboard(services: Services, job: Any, artifacts: list[Any], lang: str) -> Keyboard | None:
    """The registered result buttons for `artifacts`, then every decoration's (e.g. Report)."""
    return decorate_keyboard(services, job, buttons.result_keyboard(artifacts, lang), artifacts, lang)


def decorate_result(services: Services, job: Any, caption: str | None, artifacts: list[Any], lang: str, *,
                    owner_buttons: bool = True) -> tuple[str | None, Keyboard | None]:
    """The caption and keyboard a result leaves the bot with, whatever the way (album, video, a post in a
    channel, an inline result): every registered note on the caption, every decoration's buttons (Report).

    `owner_buttons` adds the result buttons only its owner may press (More like this, Share...) first;
    leave them out where the result is shown to others."""
    keyboard = buttons.result_keyboard(artifacts, lang) if owner_buttons else None
    return (decorate_caption(services, job, caption, lang),
            decorate_keyboard(services, job, keyboard, artifacts, lang, owner=owner_buttons))
