"""Slash commands: one per command of the router's table, typed where the command takes input.

Every router command becomes a slash command with its /help line as description (Chinese for
Chinese clients, through ``CatalogueTranslator``). Commands with input get typed options:
/style (a style with autocomplete from the catalogue, a count of 1 to 8) and /selfie (up to five
photo attachments; it is no router command: its photos go where any photo goes). A later feature
with input adds its typed builder to ``TYPED_COMMANDS``. Every callback only turns the options into
arguments for ``DiscordAdapter.run_command``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import discord
from discord import app_commands
from discord.app_commands import locale_str

from handlers import router
from handlers.messages import normalise_language, t

log = logging.getLogger(__name__)

DESCRIPTION_MAX = 100  # characters, Discord's limit for descriptions and choice names
CHOICES_MAX = 25  # autocomplete suggestions Discord shows
MAX_PORTRAITS = 8
CHINESE_LOCALES = frozenset({discord.Locale.chinese, discord.Locale.taiwan_chinese})
# Commands whose every answer only the requester sees (ephemeral in a server).
PRIVATE_COMMANDS = frozenset({"status", "delete"})
SDXL_FEATURE = "portrait-sdxl"


def described(code: str) -> locale_str:
    """A description from the catalogue (English; the translator supplies Chinese)."""
    return locale_str(_cut(t(code, "en")), code=code)


def _cut(text: str) -> str:
    return text if len(text) <= DESCRIPTION_MAX else text[:DESCRIPTION_MAX - 1] + "…"


class CatalogueTranslator(app_commands.Translator):
    """Translates descriptions that name a catalogue code into Chinese for Chinese clients."""

    async def translate(self, string: locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContext) -> str | None:
        code = string.extras.get("code")
        if not code or locale not in CHINESE_LOCALES:
            return None
        return _cut(t(code, "zh"))


def _adapter(interaction: discord.Interaction) -> Any:
    return interaction.client.adapter  # type: ignore[attr-defined]


# -- callbacks ----------------------------------------------------------------------------------
async def run_plain(interaction: discord.Interaction) -> None:
    """Runs a command without options."""
    assert interaction.command is not None
    await _adapter(interaction).run_command(interaction, interaction.command.name, [], [])


@app_commands.describe(style=described("discord.option_style"), count=described("discord.option_count"))
async def run_style(interaction: discord.Interaction, style: str,
                    count: app_commands.Range[int, 1, MAX_PORTRAITS] | None = None) -> None:
    """Runs /style with the chosen style and count."""
    args = style.split() + ([str(count)] if count is not None else [])
    await _adapter(interaction).run_command(interaction, "style", args, [])


@app_commands.describe(photo1=described("discord.option_photo"), photo2=described("discord.option_more_photo"),
                       photo3=described("discord.option_more_photo"), photo4=described("discord.option_more_photo"),
                       photo5=described("discord.option_more_photo"))
async def run_selfie(interaction: discord.Interaction, photo1: discord.Attachment,
                     photo2: discord.Attachment | None = None,
                     photo3: discord.Attachment | None = None,
                     photo4: discord.Attachment | None = None,
                     photo5: discord.Attachment | None = None) -> None:
    """Hands the photos to selfie intake (or to a command waiting for a file)."""
    photos = [p for p in (photo1, photo2, photo3, photo4, photo5) if p is not None]
    await _adapter(interaction).run_command(interaction, None, [], photos)


async def complete_style(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Suggests styles whose id or name matches what the user typed so far."""
    adapter = _adapter(interaction)
    if adapter.refuses(interaction):
        return []
    lang = normalise_language(interaction.locale.value)
    return [app_commands.Choice(name=name, value=value)
            for name, value in style_choices(adapter.styles, adapter.features, current, lang)]


def style_choices(catalog: Any, features: set[str], current: str, lang: str) -> list[tuple[str, str]]:
    """``(label, style id)`` pairs for the autocomplete: the catalogue's first styles, or its matches."""
    if catalog is None:
        return []
    families = ["sd15"] + (["sdxl"] if SDXL_FEATURE in features else [])
    catalog = catalog.only(families)
    found = catalog.suggest(current, CHOICES_MAX) if current.strip() else list(catalog)[:CHOICES_MAX]
    choices = []
    for style in found:
        name = style.display_name(lang)
        label = name if name.casefold() == style.id.casefold() else f"{name} ({style.id})"
        choices.append((_cut(label), style.id))
    return choices


# -- building -----------------------------------------------------------------------------------
def _style_command(command: router.Command) -> app_commands.Command:
    slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=run_style)
    slash.autocomplete("style")(complete_style)
    return slash


TYPED_COMMANDS: dict[str, Callable[[router.Command], app_commands.Command]] = {"style": _style_command}


def build_commands() -> list[app_commands.Command]:
    """The slash commands for every registered router command, plus /selfie."""
    commands = []
    for command in router.commands():
        builder = TYPED_COMMANDS.get(command.name)
        if builder is not None:
            commands.append(builder(command))
        else:
            commands.append(app_commands.Command(name=command.name, description=described(command.help_code),
                                                 callback=run_plain))
    if "selfie" not in {c.name for c in commands}:
        commands.append(app_commands.Command(name="selfie", description=described("discord.help_selfie"),
                                             callback=run_selfie))
    return commands
