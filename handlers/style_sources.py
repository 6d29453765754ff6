"""Where styles made with /makestyle live, and the catalogue one user sees.

Published styles: ``data_dir/styles/<id>.toml`` beside ``<id>.safetensors`` (the second folder
``facechain_core.styles.load_styles`` reads). A maker's private style: ``data_dir/users/<key>/makestyle/<id>/``
holding ``<id>.toml``, ``<id>.safetensors``, the examples and the training folder, so /delete removes it
with the rest of the maker's data. Registers nothing and imports no feature (portraits and /makestyle
both read it).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from facechain_core.styles import LOCAL_SOURCE, Style, StyleCatalog, StyleError, load_style, load_styles
from handlers.services import Services

log = logging.getLogger(__name__)

PUBLISHED_FOLDER = "styles"  # under data_dir
PRIVATE_FOLDER = "makestyle"  # under the maker's folder: one folder per style


def published_dir(data_dir: Path) -> Path:
    return Path(data_dir) / PUBLISHED_FOLDER


def private_dir(services: Services, user_key: str, style_id: str | None = None) -> Path:
    folder = services.user_dir(user_key) / PRIVATE_FOLDER
    return folder / style_id if style_id else folder


def private_styles_of(folder: Path) -> list[Style]:
    """The trained private styles under a maker's ``makestyle`` folder (a broken one is logged and left out)."""
    styles = []
    for path in sorted(folder.glob("*/*.toml")) if folder.is_dir() else []:
        if path.stem != path.parent.name:
            continue
        try:
            styles.append(load_style(path, path.parent))
        except StyleError as exc:
            log.warning("private style %s is invalid: %s", path, exc)
    return styles


async def private_styles(services: Services, user_key: str) -> list[Style]:
    """The user's own private styles not (yet) published."""
    found = await asyncio.to_thread(private_styles_of, private_dir(services, user_key))
    return [s for s in found if services.styles is None or s.id not in services.styles]


async def user_catalogue(services: Services, user_key: str, base: StyleCatalog) -> StyleCatalog:
    """`base` (what the server runs) plus the user's own private styles."""
    mine = await private_styles(services, user_key)
    return StyleCatalog([*base, *mine]) if mine else base


async def find_style(services: Services, user_key: str, style_id: str) -> Style | None:
    """The style with this id the user may run: the server's, else one of their private styles."""
    style = services.styles.get(style_id) if services.styles is not None else None
    if style is None:
        style = next((s for s in await private_styles(services, user_key) if s.id == style_id), None)
    return style


def local_lora(services: Services, style: Any, user_key: str) -> str | None:
    """The LoRA file of a style made in chat: published (data_dir/styles) or the user's private one."""
    lora = getattr(style, "lora", None)
    if lora is None or lora.source != LOCAL_SOURCE:
        return None
    if services.styles is not None and style.id in services.styles:
        return str((published_dir(services.data_dir) / lora.file).resolve())
    return str((private_dir(services, user_key, style.id) / lora.file).resolve())


def reload_catalogue(services: Services) -> StyleCatalog:
    """Loads the shipped styles and the published ones again (blocking: run it in a thread)."""
    return load_styles(services.settings.styles_dir, published_dir(services.data_dir))
