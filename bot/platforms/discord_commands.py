"""Slash commands: one per command of the router's table, typed where the command takes input.

Every router command becomes a slash command with its /help line as description (Chinese for
Chinese clients, through ``CatalogueTranslator``). Commands with input get typed options:
/style (a style with autocomplete from the catalogue, a count of 1 to 8) and /selfie (up to five
photo attachments; it is no router command: its photos go where any photo goes), /cartoon (an
installed cartoon style with autocomplete, a photo), /talk (text, a round-video switch, a photo),
/tryon (an outfit photo), /makestyle (words and up to five example pictures) and /admin (an action, a user, a reason; shown to administrators only).
A later feature with input adds its typed builder to ``TYPED_COMMANDS``. Every callback only turns the options into
arguments for ``DiscordAdapter.run_command``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import discord
from discord import app_commands
from discord.app_commands import locale_str

from facechain_core.cartoon import load_cartoon_styles
from handlers import router
from handlers.messages import for_platform, normalise_language, t
from handlers.imagine import MAX_CHARS as MAX_SCENE_CHARS
from handlers.studio import SEED_MAX, poses
from handlers.talk import MAX_TEXT_CHARS
from handlers.template import installed as installed_templates

log = logging.getLogger(__name__)

DESCRIPTION_MAX = 100  # characters, Discord's limit for descriptions and choice names
CHOICES_MAX = 25  # autocomplete suggestions Discord shows
MAX_PORTRAITS = 8
MAX_TALK_CHARS = MAX_TEXT_CHARS  # /talk text option: what the handler accepts
CHINESE_LOCALES = frozenset({discord.Locale.chinese, discord.Locale.taiwan_chinese})
# Commands whose every answer only the requester sees (ephemeral in a server).
PRIVATE_COMMANDS = frozenset({"status", "delete"})
SDXL_FEATURE = "portrait-sdxl"


def described(code: str) -> locale_str:
    """A description from the catalogue in Discord's wording (English; the translator supplies Chinese)."""
    code = for_platform(code, "discord")
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


Aspect = Literal["square", "2:3", "9:16", "3:2"]
Likeness = Literal["low", "normal", "high"]
Fast = Literal["on", "off"]


def studio_words(aspect: str | None = None, likeness: str | None = None, pose: str | None = None,
                 seed: int | None = None, fast: str | None = None) -> list[str]:
    """The studio's ``key:value`` words (handlers.studio, handlers.fast) for the options given."""
    return [f"{key}:{value}" for key, value in (("aspect", aspect), ("likeness", likeness), ("pose", pose),
                                                ("seed", seed), ("fast", fast)) if value is not None and value != ""]


@app_commands.describe(style=described("discord.option_style"), count=described("discord.option_count"),
                       aspect=described("discord.option_aspect"), likeness=described("discord.option_likeness"),
                       pose=described("discord.option_pose"), pose_photo=described("discord.option_pose_photo"),
                       seed=described("discord.option_seed"), fast=described("discord.option_fast"))
async def run_style(interaction: discord.Interaction, style: str,
                    count: app_commands.Range[int, 1, MAX_PORTRAITS] | None = None, aspect: Aspect | None = None,
                    likeness: Likeness | None = None, pose: str | None = None,
                    pose_photo: discord.Attachment | None = None,
                    seed: app_commands.Range[int, 0, SEED_MAX] | None = None, fast: Fast | None = None) -> None:
    """Runs /style with the chosen style, count and studio controls (a photo lends its pose)."""
    args = (style.split() + ([str(count)] if count is not None else [])
            + studio_words(aspect, likeness, pose, seed, fast))
    await _adapter(interaction).run_command(interaction, "style", args, [pose_photo] if pose_photo else [])


@app_commands.describe(style=described("discord.option_duo_style"), partner=described("discord.option_partner"))
async def run_duo(interaction: discord.Interaction, style: str, partner: discord.User) -> None:
    """Runs /duo: asks the partner's consent to a portrait of the two in the style ("block": block them)."""
    await _adapter(interaction).run_command(interaction, "duo", style.split(), [], mentions=[partner])


@app_commands.describe(style=described("discord.option_style"), partner1=described("discord.option_partner"),
                       partner2=described("discord.option_partner"), partner3=described("discord.option_partner"))
async def run_group(interaction: discord.Interaction, style: str, partner1: discord.User,
                    partner2: discord.User | None = None, partner3: discord.User | None = None) -> None:
    """Runs /group: asks up to three partners' consent to a portrait of everyone in the style."""
    partners = [p for p in (partner1, partner2, partner3) if p is not None]
    await _adapter(interaction).run_command(interaction, "group", style.split(), [], mentions=partners)


@app_commands.describe(template=described("discord.option_template"),
                       photo=described("discord.option_template_photo"), likeness=described("discord.option_likeness"))
async def run_template(interaction: discord.Interaction, template: str | None = None,
                       photo: discord.Attachment | None = None, likeness: Likeness | None = None) -> None:
    """Runs /template with a library template or the user's own photo."""
    args = (template.split() if template else []) + studio_words(likeness=likeness)
    await _adapter(interaction).run_command(interaction, "template", args, [photo] if photo else [])


@app_commands.describe(scene=described("discord.option_scene"), aspect=described("discord.option_aspect"),
                       likeness=described("discord.option_likeness"), pose=described("discord.option_pose"),
                       seed=described("discord.option_seed"))
async def run_imagine(interaction: discord.Interaction, scene: app_commands.Range[str, 1, MAX_SCENE_CHARS],
                      aspect: Aspect | None = None, likeness: Likeness | None = None, pose: str | None = None,
                      seed: app_commands.Range[int, 0, SEED_MAX] | None = None) -> None:
    """Runs /imagine with the scene and the studio controls."""
    args = scene.split() + studio_words(aspect, likeness, pose, seed)
    await _adapter(interaction).run_command(interaction, "imagine", args, [])


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


@app_commands.describe(style=described("discord.option_cartoon_style"),
                       photo=described("discord.option_cartoon_photo"))
async def run_cartoon(interaction: discord.Interaction, style: str | None = None,
                      photo: discord.Attachment | None = None) -> None:
    """Runs /cartoon with the chosen style and photo (either may be left out: the bot asks)."""
    args = style.split() if style else []
    await _adapter(interaction).run_command(interaction, "cartoon", args, [photo] if photo else [])


@app_commands.rename(round_video="round")
@app_commands.describe(text=described("discord.option_talk_text"), round_video=described("discord.option_talk_round"),
                       photo=described("discord.option_talk_photo"))
async def run_talk(interaction: discord.Interaction, text: app_commands.Range[str, 1, MAX_TALK_CHARS] | None = None,
                   round_video: bool | None = None, photo: discord.Attachment | None = None) -> None:
    """Runs /talk with the text, the round-video switch and the photo to animate."""
    args = (["round"] if round_video else []) + (text.split() if text else [])
    await _adapter(interaction).run_command(interaction, "talk", args, [photo] if photo else [])


@app_commands.describe(outfit=described("discord.option_outfit"))
async def run_tryon(interaction: discord.Interaction, outfit: discord.Attachment | None = None) -> None:
    """Runs /tryon with the outfit photo."""
    await _adapter(interaction).run_command(interaction, "tryon", [], [outfit] if outfit else [])


@app_commands.describe(text=described("discord.option_makestyle_text"),
                       photo1=described("discord.option_makestyle_photo"), photo2=described("discord.option_makestyle_photo"),
                       photo3=described("discord.option_makestyle_photo"), photo4=described("discord.option_makestyle_photo"),
                       photo5=described("discord.option_makestyle_photo"))
async def run_makestyle(interaction: discord.Interaction, text: str | None = None,
                        photo1: discord.Attachment | None = None, photo2: discord.Attachment | None = None,
                        photo3: discord.Attachment | None = None, photo4: discord.Attachment | None = None,
                        photo5: discord.Attachment | None = None) -> None:
    """Runs /makestyle with its words (a name and description, done, publish ...) and example pictures."""
    photos = [p for p in (photo1, photo2, photo3, photo4, photo5) if p is not None]
    await _adapter(interaction).run_command(interaction, "makestyle", text.split() if text else [], photos)


@app_commands.describe(action=described("discord.option_admin_action"), user=described("discord.option_admin_user"),
                       reason=described("discord.option_admin_reason"))
async def run_admin(interaction: discord.Interaction, action: Literal["stats", "ban", "unban", "bans"],
                    user: str | None = None, reason: str | None = None) -> None:
    """Runs /admin; the reason only follows a user, as the router's arguments expect."""
    args = [action]
    if user and user.strip():
        args += [user.strip()] + (reason.split() if reason else [])
    await _adapter(interaction).run_command(interaction, "admin", args, [])


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


async def complete_cartoon(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Suggests the installed cartoon styles whose id or name matches what the user typed so far."""
    adapter = _adapter(interaction)
    if adapter.refuses(interaction):
        return []
    lang = normalise_language(interaction.locale.value)
    return [app_commands.Choice(name=name, value=value)
            for name, value in cartoon_choices(adapter.features, current, lang)]


def cartoon_choices(features: set[str], current: str, lang: str) -> list[tuple[str, str]]:
    """``(label, style id)`` pairs of the cartoon styles installed, those matching `current` first-come."""
    wanted = current.strip().casefold()
    choices = []
    for style in load_cartoon_styles().available(features):
        name = style.display_name(lang)
        names = [style.id, name, *style.names.values()]
        if wanted and not any(wanted in n.casefold() for n in names):
            continue
        label = name if name.casefold() == style.id.casefold() else f"{name} ({style.id})"
        choices.append((_cut(label), style.id))
    return choices[:CHOICES_MAX]


async def complete_pose(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Suggests the library's poses whose id or name matches what the user typed so far."""
    lang = normalise_language(interaction.locale.value)
    wanted = current.strip().casefold()
    return [app_commands.Choice(name=_cut(p.display_name(lang)), value=p.id) for p in poses()
            if not wanted or any(wanted in n.casefold() for n in (p.id, p.name.en, p.name.zh))][:CHOICES_MAX]


async def complete_template(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Suggests the installed one-face templates whose id or name matches what the user typed so far."""
    adapter = _adapter(interaction)
    if adapter.refuses(interaction) or adapter.services is None:
        return []
    lang = normalise_language(interaction.locale.value)
    wanted = current.strip().casefold()
    return [app_commands.Choice(name=_cut(e.display_name(lang)), value=e.id)
            for e in installed_templates(adapter.services)
            if not wanted or any(wanted in n.casefold() for n in (e.id, e.name.en, e.name.zh))][:CHOICES_MAX]


# -- building -----------------------------------------------------------------------------------
def _style_command(command: router.Command) -> app_commands.Command:
    slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=run_style)
    slash.autocomplete("style")(complete_style)
    slash.autocomplete("pose")(complete_pose)
    return slash


def _styled(callback: Callable[..., Any]) -> Callable[[router.Command], app_commands.Command]:
    def build(command: router.Command) -> app_commands.Command:
        slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=callback)
        slash.autocomplete("style")(complete_style)
        return slash
    return build


def _template_command(command: router.Command) -> app_commands.Command:
    slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=run_template)
    slash.autocomplete("template")(complete_template)
    return slash


def _imagine_command(command: router.Command) -> app_commands.Command:
    slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=run_imagine)
    slash.autocomplete("pose")(complete_pose)
    return slash


def _cartoon_command(command: router.Command) -> app_commands.Command:
    slash = app_commands.Command(name=command.name, description=described(command.help_code), callback=run_cartoon)
    slash.autocomplete("style")(complete_cartoon)
    return slash


def _typed(callback: Callable[..., Any]) -> Callable[[router.Command], app_commands.Command]:
    def build(command: router.Command) -> app_commands.Command:
        return app_commands.Command(name=command.name, description=described(command.help_code), callback=callback)
    return build


def _admin_command(command: router.Command) -> app_commands.Command:
    slash = _typed(run_admin)(command)
    # Discord hides it from non-administrators; the router still checks who may run it.
    slash.default_permissions = discord.Permissions(administrator=True)
    return slash


TYPED_COMMANDS: dict[str, Callable[[router.Command], app_commands.Command]] = {
    "style": _style_command,
    "cartoon": _cartoon_command,
    "talk": _typed(run_talk),
    "tryon": _typed(run_tryon),
    "template": _template_command,
    "imagine": _imagine_command,
    "admin": _admin_command,
    "duo": _styled(run_duo),
    "group": _styled(run_group),
    "makestyle": _typed(run_makestyle),
}


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
