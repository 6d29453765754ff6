"""Per-group rules chosen by the group's admins: /settings in a group.

A group's admins (as the platform says: Telegram's administrators, Discord's "Manage Server")
choose which commands work there, safe mode (every job from the group runs with the safety
checker: ``safe_mode=True`` in its params) and a daily limit of jobs per member. /settings shows
the rules with buttons; every press is checked against the presser's admin rights again.
Handlers read the rules with ``chat_settings(services, chat)``; the router runs ``check_command``
before every command, and ``admit_job`` is an admission check (``handlers.hooks``) run before every job.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.numbers import ascii_int
from facechain_core.safety import FEATURE as SAFETY_FEATURE
from handlers import buttons, hooks, registry
from handlers.messages import catalogue, t
from handlers.protocols import Button, Chat, Event, MessageRef, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

ACTION = "cset"  # cset:<what>[.<value>]
LIMIT_CHOICES = (0, 1, 3, 5, 10, 20)  # jobs per member per day; 0: no limit
# Commands a group cannot switch off: these settings themselves, and what every user needs to
# learn about the bot and control their own data.
ALWAYS_ALLOWED = frozenset({"settings", "start", "help", "status", "cancel", "delete", "language"})
# Job kinds started under another command's name (buttons start them too).
KIND_COMMANDS = {"portrait": "style", "duo_template": "duo"}
COMMANDS_PER_ROW = 3
ON, OFF = "✅", "▫️"


@dataclass(frozen=True)
class ChatSettings:
    """A group's rules; the defaults apply until its admins change them."""

    allowed_commands: tuple[str, ...] | None = None  # None: every command
    safe_mode: bool = False
    daily_limit: int = 0  # jobs per member per day; 0: no limit

    def allows(self, command: str) -> bool:
        return self.allowed_commands is None or command in ALWAYS_ALLOWED or command in self.allowed_commands

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.allowed_commands is not None:
            data["allowed_commands"] = list(self.allowed_commands)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatSettings:
        allowed = data.get("allowed_commands")
        return cls(allowed_commands=tuple(str(c) for c in allowed) if isinstance(allowed, list) else None,
                   safe_mode=bool(data.get("safe_mode", False)),
                   daily_limit=max(0, int(data.get("daily_limit") or 0)))


# -- reading the rules ----------------------------------------------------------------------------
async def load_settings(services: Services, chat: Chat) -> ChatSettings:
    """The chat's rules (a private chat has the defaults)."""
    if chat.is_private:
        return ChatSettings()
    storage: Any = services.storage
    return ChatSettings.from_dict(await storage.chat_settings(chat.key))


async def chat_settings(services: Services, chat: Chat) -> dict[str, Any]:
    """The chat's rules as a dict: ``allowed_commands`` (None: all), ``safe_mode``, ``daily_limit``."""
    return (await load_settings(services, chat)).to_dict()


async def check_command(services: Services, event: Event, command: registry.Command) -> None:
    """Refuses a command the group's admins switched off (a router gate)."""
    if event.chat.is_private or command.name not in switchable_commands():
        return
    if not (await load_settings(services, event.chat)).allows(command.name):
        raise UserFacingError(command_off_code(command.name), command=command.name)


def command_off_code(command: str) -> str:
    """The refusal of a switched-off command: group-only ones (``duo.off_here``) have their own, without
    the hint to use them in a private chat."""
    own = f"{command}.off_here"
    return own if own in catalogue() else "groups.command_off"


async def admit_job(services: Services, event: Event, kind: str, params: dict[str, Any]) -> hooks.Admission | None:
    """Applies the group's rules to a job about to be submitted: refuses it when its command is off
    or the member's jobs for today are used up; adds ``safe_mode``. The admission's undo gives the
    member's share of the daily limit back when the submission fails after all."""
    if event.chat.is_private:
        return None
    settings = await load_settings(services, event.chat)
    command = KIND_COMMANDS.get(kind, kind)
    if command in switchable_commands() and not settings.allows(command):
        raise UserFacingError(command_off_code(command), command=command)
    refund: hooks.Undo | None = None
    if settings.daily_limit:
        storage: Any = services.storage
        chat_key, user_key, day = event.chat.key, event.user.key, _today()
        if not await storage.take_chat_quota(chat_key, user_key, day, settings.daily_limit):
            log.info("%s reached the daily limit of %s (%d)", user_key, chat_key, settings.daily_limit)
            raise UserFacingError("groups.daily_limit", limit=settings.daily_limit)

        async def give_back() -> None:
            await storage.refund_chat_quota(chat_key, user_key, day)

        refund = give_back
    if settings.safe_mode:
        params = {**params, "safe_mode": True}
    return hooks.Admission(params, refund)


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


# -- /settings ------------------------------------------------------------------------------------
async def show_settings(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows the group's rules with buttons to change them (its admins only)."""
    if event.chat.is_private:
        raise UserFacingError("groups.settings_private")
    if not await is_chat_admin(event):
        raise UserFacingError("groups.admins_only")
    text, keyboard = render_home(await load_settings(services, event.chat), event.language,
                                 checker_installed=SAFETY_FEATURE in services.features_installed)
    await channel.send_text(text, keyboard)


async def is_chat_admin(event: Event) -> bool:
    """Whether the platform says the user administers the event's group."""
    if event.chat.is_private or event.chat_admin is None:
        return False
    try:
        return await event.chat_admin()
    except Exception:
        log.warning("could not ask whether %s administers %s", event.user.key, event.chat.key, exc_info=True)
        return False


async def press_setting(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Changes one rule (or turns the panel's page) for a group admin; refuses everyone else."""
    lang = event.language
    if event.chat.is_private:
        await channel.answer_button(t("button.stale", lang))
        return
    if not await is_chat_admin(event):
        await channel.answer_button(t("groups.admins_only", lang), alert=True)
        return
    current = await load_settings(services, event.chat)
    changed = _changed(current, argument)
    if changed is None:
        await channel.answer_button(t("button.stale", lang))
        return
    settings, page = changed
    if settings != current:
        storage: Any = services.storage
        await storage.set_chat_settings(event.chat.key, settings.to_dict())
        log.info("%s changed the settings of %s: %s", event.user.key, event.chat.key, settings.to_dict())
        await channel.answer_button(t("groups.saved", lang))
    else:
        await channel.answer_button()
    text, keyboard = render_commands(settings, lang) if page == "commands" else \
        render_home(settings, lang, checker_installed=SAFETY_FEATURE in services.features_installed)
    if event.message_id is None:
        await channel.send_text(text, keyboard)
    else:
        await channel.edit_text(MessageRef(event.chat, event.message_id), text, keyboard)


def _changed(settings: ChatSettings, argument: str) -> tuple[ChatSettings, str] | None:
    """The rules after a press of ``cset:<argument>``, and the page to show; None for a stale press."""
    what, _, value = argument.partition(".")
    if what == "home":
        return settings, "home"
    if what == "safe":
        return replace(settings, safe_mode=not settings.safe_mode), "home"
    if what == "limit" and ascii_int(value) in LIMIT_CHOICES:
        return replace(settings, daily_limit=int(value)), "home"
    if what == "cmds":
        return settings, "commands"
    if what == "all":
        return replace(settings, allowed_commands=None), "commands"
    switchable = switchable_commands()
    if what == "cmd" and value in switchable:
        allowed = set(switchable if settings.allowed_commands is None else settings.allowed_commands)
        allowed ^= {value}
        # Everything on is stored as "all", so commands added later are on too.
        kept = None if allowed >= set(switchable) else tuple(c for c in switchable if c in allowed)
        return replace(settings, allowed_commands=kept), "commands"
    return None


def switchable_commands() -> list[str]:
    """The commands a group's admins may switch off, in menu order."""
    return [c.name for c in registry.commands() if not c.admin_only and c.in_menu and c.name not in ALWAYS_ALLOWED]


# -- the panel ------------------------------------------------------------------------------------
def render_home(settings: ChatSettings, lang: str, checker_installed: bool = True) -> tuple[str, list[list[Button]]]:
    """The rules in words, with buttons for safe mode, the daily limit and the commands page; safe mode
    without an installed checker says that pictures are refused here until the operator installs it."""
    state = t("groups.on" if settings.safe_mode else "groups.off", lang)
    limit = t("groups.limit_n", lang, n=settings.daily_limit) if settings.daily_limit else t("groups.limit_none", lang)
    if settings.allowed_commands is None:
        commands = t("groups.commands_all", lang)
    else:
        commands = ", ".join(f"/{c}" for c in settings.allowed_commands) or t("groups.commands_none", lang)
    lines = [t("groups.title", lang), t("groups.safe_line", lang, state=state)]
    if settings.safe_mode and not checker_installed:
        lines.append(t("groups.safe_no_checker", lang))
    text = "\n".join(lines + [t("groups.limit_line", lang, limit=limit),
                              t("groups.commands_line", lang, commands=commands)])
    safe_label = t("groups.button_safe", lang, state=state)
    limits = [Button(("✓ " if n == settings.daily_limit else "") +
                     (t("groups.button_limit", lang, n=n) if n else t("groups.button_no_limit", lang)),
                     buttons.payload(ACTION, f"limit.{n}")) for n in LIMIT_CHOICES]
    keyboard = [[Button(safe_label, buttons.payload(ACTION, "safe"))], limits[:3], limits[3:],
                [Button(t("groups.button_commands", lang), buttons.payload(ACTION, "cmds"))]]
    return text, keyboard


def render_commands(settings: ChatSettings, lang: str) -> tuple[str, list[list[Button]]]:
    """One on/off button per switchable command, then "all on" and "back"."""
    row = [Button(f"{ON if settings.allows(name) else OFF} /{name}", buttons.payload(ACTION, f"cmd.{name}"))
           for name in switchable_commands()]
    keyboard = [row[i:i + COMMANDS_PER_ROW] for i in range(0, len(row), COMMANDS_PER_ROW)]
    keyboard.append([Button(t("groups.button_all", lang), buttons.payload(ACTION, "all")),
                     Button(t("groups.button_back", lang), buttons.payload(ACTION, "home"))])
    return t("groups.commands_title", lang), keyboard


registry.register_command("settings", show_settings, "help.settings")
registry.register_gate(check_command)
hooks.register_admission_check(admit_job, hooks.AdmissionStage.CHAT)
buttons.register_core_button(ACTION, press_setting)
