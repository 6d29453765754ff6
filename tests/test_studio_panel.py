"""The options panel's handlers without models (the fake Telegram e2e is in test_e2e_studio.py): what the buttons
carry, who may press them, Go and a refused Go, both languages."""
from __future__ import annotations

from typing import Any

from facechain_core.styles import load_styles
from handlers.messages import t
from tests.test_handlers import World, group, make_event, make_world, world  # noqa: F401

ANN, BOB = 1, 2


def _payloads(keyboard: Any) -> list[str]:
    return [b.payload for row in keyboard for b in row]


async def _open(world: World, lang: str = "en") -> tuple[str, list[list[Any]]]:  # noqa: F811
    world.services.features_installed = {"portrait", "pose"}
    world.services.styles = load_styles()
    channel = await world.send(make_event(ANN, group(), text="/style hanfu options", lang=lang))
    text, keyboard, _ = channel.texts[-1]
    return text, keyboard


async def test_style_options_opens_a_panel_whose_buttons_carry_only_a_choice(world: World) -> None:  # noqa: F811
    text, keyboard = await _open(world)
    assert text.startswith(t("panel.title", "en", style="Hanfu")) and world.jobs.submitted == []
    payloads = _payloads(keyboard)
    panel_id = payloads[-1].partition(":")[2]
    assert payloads[-2:] == [f"optgo:{panel_id}", f"optx:{panel_id}"]
    assert f"opt:{panel_id}.pose.over_shoulder" in payloads and f"opt:{panel_id}.aspect.9:16" in payloads
    assert all(len(p.encode()) <= 64 for p in payloads)
    panel = await world.storage.panel(panel_id)
    assert panel.user_key == f"telegram:{ANN}" and panel.state["style_id"] == "hanfu"

    zh_text, zh_keyboard = await _open(world, "zh")
    assert t("panel.title", "zh", style="汉服") in zh_text and t("panel.likeness", "zh", value="中") in zh_text
    assert any(b.label == t("panel.go", "zh") for row in zh_keyboard for b in row)


async def test_only_the_owner_changes_the_panel_and_go_queues_its_choices(world: World) -> None:  # noqa: F811
    _, keyboard = await _open(world)
    panel_id = _payloads(keyboard)[-1].partition(":")[2]
    chat = group()
    channel = await world.send(make_event(BOB, chat, button=f"opt:{panel_id}.likeness.high", message_id="9"))
    assert channel.answers[-1] == (t("button.not_yours", "en"), True) and channel.edits == []
    for forged in (f"opt:{panel_id}.likeness.huge", f"opt:{panel_id}.seed.7", "opt:nosuchpanel.aspect.2:3"):
        await world.send(make_event(ANN, chat, button=forged, message_id="9"))
        assert channel.answers[-1] == (t("button.stale", "en"), False)
    for choice in ("aspect.2:3", "likeness.high", "pose.walking", "count.4"):
        await world.send(make_event(ANN, chat, button=f"opt:{panel_id}.{choice}", message_id="9"))
    _, text, buttons = channel.edits[-1]
    assert t("panel.pose", "en", value="Walking") in text and t("panel.count", "en", value="4") in text
    # The Speed row (handlers.fast) stays at the server's choice.
    assert [b.label for row in buttons for b in row if b.label.startswith("✓")] == [
        "✓ 2:3", "✓ High", "✓ Walking", "✓ 4", "✓ " + t("panel.fast_default", "en")]
    # Go without a selfie is refused; the panel stays, so Go works once the user has one.
    await world.send(make_event(ANN, chat, button=f"optgo:{panel_id}", message_id="9"))
    assert channel.said[-1] == t("portrait.need_selfie", "en") and world.jobs.submitted == []
    assert await world.storage.panel(panel_id) is not None
    folder = world.services.user_dir(f"telegram:{ANN}") / "selfies"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"jpeg")
    await world.storage.ensure_user(f"telegram:{ANN}", "telegram", "en")
    await world.storage.add_selfie(f"telegram:{ANN}", str(folder / "a.jpg"), {})
    await world.send(make_event(ANN, chat, button=f"optgo:{panel_id}", message_id="9"))
    ((user, kind, params, _),) = world.jobs.submitted
    assert (user, kind, params["style_id"], params["count"]) == (f"telegram:{ANN}", "portrait", "hanfu", 4)
    assert params["controls"] == {"aspect": "2:3", "likeness": "high", "pose": {"id": "walking"}}
    assert await world.storage.panel(panel_id) is None
    assert channel.edits[-1][1].startswith(t("panel.queued", "en", style="Hanfu", choices="2:3 · High"))
    await world.send(make_event(ANN, chat, button=f"optgo:{panel_id}", message_id="9"))
    assert channel.answers[-1] == (t("button.stale", "en"), False) and len(world.jobs.submitted) == 1


async def test_pose_is_no_choice_where_its_models_are_missing(world: World) -> None:  # noqa: F811
    _, keyboard = await _open(world)
    world.services.features_installed = {"portrait"}
    channel = await world.send(make_event(ANN, group(), text="/style hanfu 选项"))
    text, keyboard, _ = channel.texts[-1]
    assert t("panel.pose_unavailable", "en") in text and not any(".pose." in p for p in _payloads(keyboard))
