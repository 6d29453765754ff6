"""/language: choose the language the bot replies in, over the one the chat app reports.

``/language`` shows the choices as buttons; ``/language zh`` (or ``中文``, ``english``) sets it at
once. The choice is stored with the user (``set_language``): the router replies in the stored
language from then on, and job messages use it too. A new user's stored language is the one
their app reported at first contact.
"""
from __future__ import annotations

import logging

from handlers import buttons, registry
from handlers.messages import LANGUAGES, t
from handlers.protocols import Button, Event, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

ACTION = "lang"
# Words users type for a language, besides its code and platform codes (zh-CN, en_US).
ALIASES = {
    "english": "en", "英文": "en", "英语": "en",
    "chinese": "zh", "cn": "zh", "中文": "zh", "简体中文": "zh", "简体": "zh", "汉语": "zh", "普通话": "zh",
}
SHOWN_ARGUMENT_MAX = 40


def parse_language(text: str) -> str | None:
    """The catalogue language a user means by `text` (``zh``, ``zh-Hans``, ``中文``), or None."""
    word = text.strip().lower()
    if word in ALIASES:
        return ALIASES[word]
    base = word.replace("_", "-").split("-")[0]
    return base if base in LANGUAGES else None


def language_name(code: str) -> str:
    """A language's own name (``English``, ``简体中文``)."""
    return t(f"language.name_{code}", code)


def language_keyboard() -> list[list[Button]]:
    """One button per language, labelled with its own name."""
    return [[Button(language_name(code), buttons.payload(ACTION, code)) for code in LANGUAGES]]


async def choose_language(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Sets the reply language named in the arguments, or shows the choices as buttons."""
    if not event.args:
        await channel.send_text(t("language.current", event.language), language_keyboard())
        return
    wanted = " ".join(event.args)
    code = parse_language(wanted)
    if code is None:
        choices = ", ".join(f"{language_name(c)} ({c})" for c in LANGUAGES)
        await channel.send_text(t("language.unknown", event.language, wanted=wanted[:SHOWN_ARGUMENT_MAX],
                                  choices=choices), language_keyboard())
        return
    await _store(services, event, code)
    await channel.send_text(t("language.set", code))


async def press_language(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Sets the presser's reply language from a /language button (anyone may press: it sets their own)."""
    code = argument if argument in LANGUAGES else None
    if code is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await _store(services, event, code)
    await buttons.answer_choice(event, channel, t("language.set", code), "/language")


async def _store(services: Services, event: Event, code: str) -> None:
    await services.storage.set_language(event.user.key, code)  # type: ignore[attr-defined]
    log.info("%s chose the language %s", event.user.key, code)
    event.language = code


registry.register_command("language", choose_language, "help.language")
buttons.register_core_button(ACTION, press_language)
