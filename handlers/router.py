"""The router: one entry point for every platform event.

``handle_event(services, event, channel)`` applies access control, the per-user rate limit and the
user gates (a ban), then dispatches: button presses to the button registry, commands to the command table, files to
the command waiting for one (pending input) or else to selfie intake. It never raises: an
expected failure becomes its catalogue message, anything else is logged and answered plainly.
Features register into ``handlers.registry`` (which imports no feature) at import time; the names
are re-exported here for features that still call ``router.register_command``.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any

from facechain_core.errors import UserFacingError
from handlers import buttons, registry
from handlers.messages import catalogue, t
from handlers.protocols import DuplicateUpdate, Event, ReplyChannel
from handlers.registry import (  # noqa: F401  (re-exported: features and tests used the router's names before)
    Command,
    _commands,
    _pending_handlers,
    command_menu,
    commands,
    register_command,
    register_gate,
    register_inline,
    register_pending,
    register_user_gate,
)
from handlers.services import Services

log = logging.getLogger(__name__)

RATE_WINDOW_S = 60.0
# Telegram shows at most 200 characters in a button alert.
ALERT_MAX_CHARS = 200


def is_admin(services: Services, user_key: str) -> bool:
    return user_key in services.settings.access.admins


async def expect_input(services: Services, event: Event, command: str, payload: dict[str, Any] | None = None) -> None:
    """Stores that `command` waits for the user's next file in this chat (expires per settings)."""
    if registry.pending_handler(command) is None:
        raise ValueError(f"no pending handler registered for {command!r}")
    await services.storage.set_pending(event.user.key, event.chat.key, command, payload or {},
                                       services.settings.limits.pending_input_ttl_s)


def message_for(error: UserFacingError, lang: str) -> str:
    """The catalogue text of an expected failure (a generic line for an unknown code)."""
    if error.code in catalogue():
        return t(error.code, lang, **error.details)
    log.error("no catalogue message for error code %r", error.code)
    return t("core.error", lang)


async def handle_event(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Handles one event; never raises (except cancellation).

    A user's events run one at a time (inline queries, which only read, excepted), so their /delete
    waits for intake already under way and nothing they sent is written after it. An update the
    platform sent again after it made a job (a crash before the platform heard it was handled) does nothing."""
    services.runtime.maybe_sweep(services.clock())
    await _use_stored_language(services, event, channel)
    if event.button_payload is not None:
        channel = _AnswerOnce(channel)
    try:
        if event.inline_query is not None:
            await _route(services, event, channel)
        else:
            async with services.runtime.intake_lock(event.user.key):
                if event.update_key is not None and await services.storage.update_seen(event.update_key):
                    log.info("%s from %s was handled before (sent again): ignored", _describe(event), event.user.key)
                    return
                await _route(services, event, channel)
    except DuplicateUpdate:
        log.info("%s from %s made its job before (sent again): ignored", _describe(event), event.user.key)
    except UserFacingError as exc:
        await _reply_safely(event, channel, message_for(exc, event.language))
    except Exception:
        log.exception("handling %s from %s in %s failed", _describe(event), event.user.key, event.chat.key)
        await _reply_safely(event, channel, t("core.error", event.language))


async def _route(services: Services, event: Event, channel: ReplyChannel) -> None:
    if event.inline_query is not None:
        await _route_inline(services, event, channel)
        return
    if not _addressed_to_us(event):
        return
    lang = event.language
    refusal = _access_refusal(services, event)
    if refusal is not None:
        log.info("refused %s from %s in %s (%s)", _describe(event), event.user.key, event.chat.key, refusal)
        if event.button_payload is not None:
            await channel.answer_button(t(refusal, lang), alert=True)
        elif event.command or event.chat.is_private:
            await channel.send_text(t(refusal, lang))
        return
    allowed, warn = _within_rate(services, event.user.key)
    if not allowed:
        if event.button_payload is not None:
            await channel.answer_button(t("core.rate_limited", lang), alert=True)
        elif warn:
            await channel.send_text(t("core.rate_limited", lang))
        return
    gate_refusal = await _user_gate_refusal(services, event)
    if gate_refusal is not None:
        log.info("refused %s from %s in %s (user gate)", _describe(event), event.user.key, event.chat.key)
        if event.button_payload is not None:
            await channel.answer_button(gate_refusal[:ALERT_MAX_CHARS], alert=True)
        elif event.command or event.chat.is_private:
            await channel.send_text(gate_refusal)
        return
    if event.chat.is_private or event.command or event.button_payload is not None:
        # A photo posted in a group is not kept, and neither is a row about its sender.
        await services.storage.ensure_user(event.user.key, event.user.platform, lang)
    if event.button_payload is not None:
        await buttons.handle_button(services, event, channel)
    elif event.command:
        await _run_command(services, event, channel)
    elif event.attachments:
        await _route_attachments(services, event, channel)
    else:
        await channel.send_text(t("core.text_hint", lang))


async def _use_stored_language(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Picks the reply language: the user's /language choice, else what their app reports now, else
    (a Discord DM says nothing) the last one stored. A changed app language is stored for job messages."""
    try:
        stored = await services.storage.language_choice(event.user.key)  # type: ignore[attr-defined]
        if stored is None:
            return  # a new user: ensure_user stores the app's language
        language, chosen = stored
        if not chosen and event.user.language:
            if language != event.language:
                await services.storage.set_language(event.user.key, event.language, False)  # type: ignore[attr-defined]
            return
    except Exception:
        log.warning("could not read or store the language of %s", event.user.key, exc_info=True)
        return
    if language != event.language:
        event.language = language
        if hasattr(channel, "language"):  # the adapters' channels word their own extras in it
            channel.language = language  # type: ignore[attr-defined]


def _addressed_to_us(event: Event) -> bool:
    """Group chatter without a command, file or button is not for the bot: stay silent."""
    if event.chat.is_private or event.button_payload is not None or event.command:
        return True
    return bool(event.attachments)


def _access_refusal(services: Services, event: Event) -> str | None:
    access = services.settings.access
    if access.allowed_users and event.user.key not in access.allowed_users and not is_admin(services, event.user.key):
        return "core.access_denied"
    if access.allowed_chats and event.chat.key not in access.allowed_chats:
        return "core.chat_denied"
    return None


def _within_rate(services: Services, user_key: str) -> tuple[bool, bool]:
    """Counts one action; returns (allowed, warn): warn once per window, not per message."""
    limit = services.settings.limits.commands_per_minute
    if not limit:
        return True, False
    now = services.clock()
    runtime = services.runtime
    window = runtime.rate_windows.setdefault(user_key, deque())
    while window and window[0] <= now - RATE_WINDOW_S:
        window.popleft()
    if len(window) >= limit:
        warned_until = runtime.rate_warned_until.get(user_key, float("-inf"))
        warn = now >= warned_until
        if warn:
            runtime.rate_warned_until[user_key] = window[0] + RATE_WINDOW_S
        return False, warn
    window.append(now)
    return True, False


async def _run_command(services: Services, event: Event, channel: ReplyChannel) -> None:
    name = (event.command or "").lower()
    command = registry.command(name)
    if command is None:
        # In a group an unknown command is likely another bot's: stay quiet there.
        if event.chat.is_private:
            await channel.send_text(t("core.unknown_command", event.language, command=name))
        return
    if command.admin_only and not is_admin(services, event.user.key):
        await channel.send_text(t("core.admin_only", event.language))
        return
    for gate in registry.gates():
        await gate(services, event, command)
    log.info("/%s from %s in %s", name, event.user.key, event.chat.key)
    await command.handler(services, event, channel)


async def _route_inline(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Answers an inline query; they come per keystroke, so they are not counted as commands."""
    handler = registry.inline_handler()
    if handler is None:
        return
    refusal = _access_refusal(services, event) or await _user_gate_refusal(services, event)
    await handler(services, event, channel, refusal is None)


async def _user_gate_refusal(services: Services, event: Event) -> str | None:
    for gate in registry.user_gates():
        refusal = await gate(services, event)
        if refusal is not None:
            return refusal
    return None


async def _route_attachments(services: Services, event: Event, channel: ReplyChannel) -> None:
    pending = await services.storage.take_pending(event.user.key, event.chat.key)
    if pending is not None:
        handler = registry.pending_handler(pending.command)
        if handler is not None:
            log.info("file from %s goes to pending /%s", event.user.key, pending.command)
            await handler(services, event, channel, pending)
            return
        log.warning("pending input for unregistered command %r dropped", pending.command)
    intake = registry.file_intake()
    if intake is None:
        log.warning("no file intake registered: files from %s dropped", event.user.key)
        return
    await intake(services, event, channel)


async def _reply_safely(event: Event, channel: ReplyChannel, text: str) -> None:
    if event.inline_query is not None:
        return  # nowhere to say it: the query just shows no results
    try:
        if event.button_payload is not None and not getattr(channel, "answered", False):
            await channel.answer_button(text[:ALERT_MAX_CHARS], alert=True)
        else:
            await channel.send_text(text)
    except Exception:
        log.warning("could not tell %s in %s about a failure", event.user.key, event.chat.key, exc_info=True)


def _describe(event: Event) -> str:
    if event.button_payload is not None:
        return f"button {event.button_payload.partition(':')[0]}"
    if event.inline_query is not None:
        return "inline query"
    if event.command:
        return f"/{event.command}"
    if event.attachments:
        return "+".join(a.kind for a in event.attachments)
    return "text"


class _AnswerOnce:
    """Wraps a channel so a button press is answered at most once, whoever answers first."""

    def __init__(self, inner: ReplyChannel) -> None:
        self._inner = inner
        self.answered = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        if self.answered:
            return
        self.answered = True
        await self._inner.answer_button(text, alert)
