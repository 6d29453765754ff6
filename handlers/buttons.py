"""The button registry: result buttons under delivered artifacts, and the core buttons.

A button's payload is ``action:argument``. Result buttons carry an artifact id; pressing one
loads the artifact and checks its owner against the presser before the feature's handler runs.
Core buttons (``cancel:<job id>``, ``delete:<nonce>``) check ownership themselves.
Features register at import time::

    register_result_button("more", "buttons.more", more_like_this, applies_to={"portrait"})
"""
from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from handlers.messages import t
from handlers.protocols import Button, Event, MessageRef, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

ResultButtonHandler = Callable[[Services, Event, ReplyChannel, Any], Awaitable[None]]
CoreButtonHandler = Callable[[Services, Event, ReplyChannel, str], Awaitable[None]]

ACTION_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
BUTTONS_PER_ROW = 3


@dataclass(frozen=True)
class ResultButton:
    action: str
    label_code: str
    handler: ResultButtonHandler
    applies_to: frozenset[str] | None  # artifact kinds; None: every kind


_result_buttons: dict[str, ResultButton] = {}
_core_buttons: dict[str, CoreButtonHandler] = {}


def _check_action(action: str) -> None:
    if not ACTION_PATTERN.match(action):
        raise ValueError(f"button action must match {ACTION_PATTERN.pattern}, got {action!r}")
    if action in _result_buttons or action in _core_buttons:
        raise ValueError(f"button action {action!r} is already registered")


def register_result_button(action: str, label_code: str, handler: ResultButtonHandler,
                           applies_to: Iterable[str] | None = None) -> None:
    """Adds a button shown under delivered artifacts (of `applies_to` kinds, or every kind)."""
    _check_action(action)
    kinds = frozenset(applies_to) if applies_to is not None else None
    _result_buttons[action] = ResultButton(action, label_code, handler, kinds)


def register_core_button(action: str, handler: CoreButtonHandler) -> None:
    """Adds a button whose handler gets the raw argument and checks ownership itself."""
    _check_action(action)
    _core_buttons[action] = handler


def unregister_button(action: str) -> None:
    """Removes a button (tests, or a feature switched off)."""
    _result_buttons.pop(action, None)
    _core_buttons.pop(action, None)


def payload(action: str, argument: str | int) -> str:
    return f"{action}:{argument}"


def parse_payload(data: str | None) -> tuple[str, str] | None:
    """Splits ``action:argument``; None for anything malformed."""
    if not data or ":" not in data:
        return None
    action, _, argument = data.partition(":")
    if not ACTION_PATTERN.match(action) or not argument:
        return None
    return action, argument


def result_buttons(artifact_kind: str, artifact_id: str, lang: str, suffix: str = "") -> list[Button]:
    """The registered result buttons that apply to an artifact of this kind."""
    return [
        Button(t(spec.label_code, lang) + suffix, payload(spec.action, artifact_id))
        for spec in _result_buttons.values()
        if spec.applies_to is None or artifact_kind in spec.applies_to
    ]


def result_keyboard(artifacts: list[Any], lang: str) -> list[list[Button]] | None:
    """Rows of result buttons: one set for a single artifact, numbered sets for several."""
    rows: list[list[Button]] = []
    numbered = len(artifacts) > 1
    for number, artifact in enumerate(artifacts, start=1):
        row = result_buttons(artifact.kind, artifact.id, lang, f" {number}" if numbered else "")
        rows.extend(row[i:i + BUTTONS_PER_ROW] for i in range(0, len(row), BUTTONS_PER_ROW))
    return rows or None


async def handle_button(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Resolves a pressed button and runs its handler, checking the presser owns the target."""
    parsed = parse_payload(event.button_payload)
    lang = event.language
    if parsed is None:
        await channel.answer_button(t("button.stale", lang))
        return
    action, argument = parsed
    if action in _core_buttons:
        await _core_buttons[action](services, event, channel, argument)
    elif action in _result_buttons:
        await _press_result_button(services, event, channel, _result_buttons[action], argument)
    else:
        log.info("unknown button action %r from %s", action, event.user.key)
        await channel.answer_button(t("button.stale", lang))
    await channel.answer_button()


async def _press_result_button(services: Services, event: Event, channel: ReplyChannel,
                               spec: ResultButton, artifact_id: str) -> None:
    artifact = await owned_artifact(services, event, channel, artifact_id, spec.applies_to)
    if artifact is not None:
        await spec.handler(services, event, channel, artifact)


async def answer_choice(event: Event, channel: ReplyChannel, text: str, question: str) -> None:
    """Answers a settings press with `text`; in a private chat the question becomes the answer as well (in a
    group it stays for the others to press). `question` (e.g. "/voice") names it in the log if that edit fails."""
    await channel.answer_button(text)
    if event.chat.is_private and event.message_id is not None:
        try:
            await channel.edit_text(MessageRef(event.chat, event.message_id), text, None)
        except Exception:
            log.warning("could not edit the %s question of %s", question, event.user.key, exc_info=True)


async def owned_artifact(services: Services, event: Event, channel: ReplyChannel, artifact_id: str,
                         kinds: Iterable[str] | None = None) -> Any | None:
    """The pressed artifact when it exists, is of one of `kinds` (None: any) and the presser owns it;
    otherwise answers the press (stale, or not yours) and returns None."""
    artifact = await services.storage.artifact(artifact_id)
    if artifact is None or (kinds is not None and artifact.kind not in kinds):
        await channel.answer_button(t("button.stale", event.language))
        return None
    if not artifact.owned_by(event.user.key):
        log.info("%s pressed %s on an artifact of someone else", event.user.key, event.button_payload)
        await channel.answer_button(t("button.not_yours", event.language), alert=True)
        return None
    return artifact
