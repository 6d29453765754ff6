"""Cuts long text into messages a platform accepts."""
from __future__ import annotations


def split_text(text: str, limit: int) -> list[str]:
    """Cuts `text` into parts of at most `limit` characters, at line ends where possible."""
    parts: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        cut = cut if cut > 0 else limit
        parts.append(text[:cut])
        text = text[cut:].lstrip("\n")
    parts.append(text)
    return parts
