"""The message catalogue: every word the bot says, keyed by code, English first, Chinese next.

Each feature keeps its messages in its own TOML file beside this module::

    [selfie.no_face]
    en = "I couldn't find a face in that photo."
    zh = "这张照片里没有找到人脸。"

Placeholders use ``str.format`` names (``{count}``). A code missing in a language falls back
to English; an unknown code is a bug and raises ``KeyError``.
"""
from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"
_HERE = Path(__file__).parent


def _flatten(prefix: str, table: dict[str, Any], out: dict[str, dict[str, str]]) -> None:
    if any(lang in table and isinstance(table[lang], str) for lang in LANGUAGES):
        if prefix in out:
            raise ValueError(f"message code {prefix!r} is defined twice")
        out[prefix] = {k: v for k, v in table.items() if isinstance(v, str)}
        return
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}.{key}" if prefix else key, value, out)


@cache
def catalogue() -> dict[str, dict[str, str]]:
    """Loads every ``*.toml`` beside this module into ``{code: {lang: text}}``."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted(_HERE.glob("*.toml")):
        with path.open("rb") as f:
            _flatten("", tomllib.load(f), out)
    return out


def normalise_language(code: str | None) -> str:
    """Maps a platform language code (``zh-hans``, ``en-US``) to a catalogue language."""
    if code:
        base = code.lower().split("-")[0].split("_")[0]
        if base in LANGUAGES:
            return base
    return DEFAULT_LANGUAGE


def for_platform(code: str, platform: str | None) -> str:
    """The code of `platform`'s own wording of `code` (``discord.core.start``) where the catalogue has one,
    else `code`: texts that say how to use the bot differ between Telegram and Discord."""
    if platform:
        special = f"{platform}.{code}"
        if special in catalogue():
            return special
    return code


def t(code: str, lang: str | None = None, /, **details: Any) -> str:
    """Returns the text for `code` in `lang` with placeholders filled."""
    entry = catalogue()[code]
    text = entry.get(normalise_language(lang)) or entry[DEFAULT_LANGUAGE]
    try:
        return text.format(**details)
    except (KeyError, IndexError):
        # A missing detail must never hide the message itself.
        return text
