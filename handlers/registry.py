"""What features register at import time, read by the router: commands, pending input, gates.

This module imports no feature (nor the router), so any feature may register here without an
import circle; ``handlers.router`` dispatches from these tables::

    register_command("style", make_portrait, "help.style")
    register_pending("tryon", receive_outfit)
    register_file_intake(receive_attachments)   # files nobody waited for (selfie intake)

The command menu keeps registration order, i.e. the import order of ``handlers.features``.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from handlers.messages import t
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services

CommandHandler = Callable[[Services, Event, ReplyChannel], Awaitable[None]]
# Gets the pending input row (``command``, ``payload``, ``expires_at``) it was waiting for.
PendingHandler = Callable[[Services, Event, ReplyChannel, Any], Awaitable[None]]
# Runs before a command's handler; refuses it by raising UserFacingError (e.g. a group's rules).
CommandGate = Callable[[Services, Event, "Command"], Awaitable[None]]
# Refuses everything a user sends (a ban): returns the refusal in the event's language, or None.
UserGate = Callable[[Services, Event], Awaitable[str | None]]
# Answers a typed inline query; `allowed` is False when access control refuses the user.
InlineHandler = Callable[[Services, Event, ReplyChannel, bool], Awaitable[None]]
# Takes files that no command waited for (selfie intake).
FileIntake = Callable[[Services, Event, ReplyChannel], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    name: str
    handler: CommandHandler
    help_code: str  # a short description: the /help line and the platform's command menu
    admin_only: bool = False
    in_menu: bool = True


_commands: dict[str, Command] = {}
_pending_handlers: dict[str, PendingHandler] = {}
_gates: list[CommandGate] = []
_inline_handlers: list[InlineHandler] = []
_user_gates: list[UserGate] = []
_file_intakes: list[FileIntake] = []
_user_data_folders: set[str] = set()


def register_command(name: str, handler: CommandHandler, help_code: str, *,
                     admin_only: bool = False, in_menu: bool = True) -> None:
    """Adds a command to the dispatch table (names are lowercase, as platforms require)."""
    if not name.isascii() or not name.replace("_", "").isalnum() or name != name.lower() or len(name) > 32:
        raise ValueError(f"command names are 1-32 lowercase letters, digits or _, got {name!r}")
    existing = _commands.get(name)
    if existing is not None and existing.handler is not handler:
        raise ValueError(f"command /{name} is already registered")
    _commands[name] = Command(name, handler, help_code, admin_only, in_menu)


def register_pending(command: str, handler: PendingHandler) -> None:
    """Routes the next file a user sends after `command` asked for one (see ``router.expect_input``)."""
    _pending_handlers[command] = handler


def register_gate(gate: CommandGate) -> None:
    """Adds a check every command passes before its handler runs (in registration order)."""
    if gate not in _gates:
        _gates.append(gate)


def register_user_gate(gate: UserGate) -> None:
    """Adds a check every event of a user passes, after access control and the rate limit."""
    if gate not in _user_gates:
        _user_gates.append(gate)


def register_inline(handler: InlineHandler) -> None:
    """Sets the handler of typed inline queries (one: the last registered wins)."""
    _inline_handlers[:] = [handler]


def register_file_intake(handler: FileIntake) -> None:
    """Sets what takes files no command waited for (one: the last registered wins)."""
    _file_intakes[:] = [handler]


def register_user_data_folder(name: str) -> None:
    """Marks a folder under each user's folder as data kept until /delete (retention's leftover sweep
    leaves it alone), e.g. /makestyle's private styles."""
    _user_data_folders.add(name)


def user_data_folders() -> frozenset[str]:
    return frozenset(_user_data_folders)


def command(name: str) -> Command | None:
    return _commands.get(name)


def commands() -> list[Command]:
    """Every registered command, in registration order."""
    return list(_commands.values())


def command_menu(lang: str) -> list[tuple[str, str]]:
    """``(name, description)`` for the platform's command menu (admin commands left out)."""
    return [(c.name, t(c.help_code, lang)) for c in _commands.values() if c.in_menu and not c.admin_only]


def pending_handler(command: str) -> PendingHandler | None:
    return _pending_handlers.get(command)


def gates() -> list[CommandGate]:
    return list(_gates)


def user_gates() -> list[UserGate]:
    return list(_user_gates)


def inline_handler() -> InlineHandler | None:
    return _inline_handlers[0] if _inline_handlers else None


def file_intake() -> FileIntake | None:
    return _file_intakes[0] if _file_intakes else None
