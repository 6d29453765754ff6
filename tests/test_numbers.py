"""One rule for numbers in text: ASCII digits only, for counts, ids in button payloads and limits."""
from __future__ import annotations

import logging

import pytest

from facechain_core.numbers import ascii_int
from facechain_core.styles import load_styles
from handlers.messages import t
from tests.fixtures.safety_world import event, make_world  # noqa: F401

ADMIN = 99


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("7", 7), ("0042", 42), ("123456789012345678", 123456789012345678),
    ("²", None), ("٣", None), ("１", None), ("3.0", None), (" 3", None), ("+3", None), ("-3", None),
    ("1_000", None), ("", None), (None, None), ("1234567890123456789", None), ("3\n", None),
])
def test_ascii_int_takes_ascii_digits_only(text: str | None, value: int | None) -> None:
    assert ascii_int(text) == value


async def test_numbers_from_users_and_buttons_never_crash_a_handler(make_world, caplog) -> None:  # noqa: F811
    world = await make_world(access={"admins": [f"telegram:{ADMIN}"]})
    world.services.styles = load_styles()
    world.services.features_installed = {"portrait"}
    caplog.set_level(logging.ERROR)

    reply = (await world.send(event(5, "/style hanfu ²"))).said[-1]
    assert reply != t("core.error", "en") and "hanfu ²" in reply  # not a count: part of an unknown style's name
    reply = (await world.send(event(ADMIN, "/admin ban ²"))).said[-1]
    assert reply == t("admin.bad_user", "en", user="²")
    for payload in ("cancel:²", "cancel:٣", "rban:²", "styles:１", "styles:-1"):
        channel = await world.send(event(ADMIN, button=payload))
        assert channel.answers[-1] == (t("button.stale", "en"), False), payload
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
