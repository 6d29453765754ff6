"""One rule for reading a number from text a user, a button or a server gave: ASCII digits only.

``str.isdigit`` accepts "²" and "٣", and ``int`` accepts " 3", "+3", "1_000" and other scripts'
digits; neither is what a count, an id in a button payload or a port should be. ``ascii_int`` takes
1 to ``MAX_DIGITS`` of 0-9 and nothing else.
"""
from __future__ import annotations

import re

MAX_DIGITS = 18  # fits SQLite's INTEGER; more is never a count or an id of ours
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")


def ascii_int(text: str | None) -> int | None:
    """The number `text` spells in ASCII digits, or None for anything else (signs, spaces, "²", "٣")."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    return int(text)
