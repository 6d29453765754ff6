"""Every way a result leaves the bot carries the AI-generated note and a Report button: the album, a
Share post in a Discord channel, and a Telegram inline result (whose photo keeps no metadata)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from bot.storage import Artifact
from handlers.messages import t
from handlers.protocols import Chat, MessageRef
from handlers.safety import REPORT_ACTION, service_name
from handlers.sharing import InlinePhoto
from tests.fixtures.safety_world import Channel, event, make_world  # noqa: F401

ANN = 5
ROOM = Chat("discord", "900", False, title="#portraits")


class PostingChannel(Channel):
    """A Discord-like channel: Share offers ROOM, where Ann may post."""

    async def post_targets(self) -> list[Chat]:
        return [ROOM]

    async def edit_text(self, ref: MessageRef, text: str, buttons: Any = None) -> None:
        self.texts.append((text, buttons))


class InlineChannel(Channel):
    """A Telegram-like inline query: records the results offered."""

    offered: list[InlinePhoto]

    async def answer_inline(self, results: list[InlinePhoto], start_label: str | None = None) -> None:
        self.offered = results


async def _delivered_result(world: Any, tmp_path: Path, platform: str) -> Artifact:
    key = f"{platform}:{ANN}"
    await world.storage.ensure_user(key, platform, "en")
    picture = tmp_path / "portrait.png"
    Image.new("RGB", (16, 16), (10, 120, 30)).save(picture)
    job = await world.storage.insert_job(key, "portrait", 1, {}, Chat(platform, str(ANN), True).to_dict(), 2)
    artifact = Artifact("art1", job.id, key, "portrait", str(picture), "image/png")
    await world.storage.finish_job(job.id, {"meta": {"safety": {"dropped": 1}}}, [artifact])
    await world.storage.mark_delivered("art1", platform, "file-art1")
    return artifact


def _labelled(caption: str | None, keyboard: Any, world: Any) -> bool:
    note = t("safety.ai_note", "en", service=service_name(world.services))
    payloads = [b.payload for row in keyboard or [] for b in row]
    return bool(caption) and note in caption and payloads == [f"{REPORT_ACTION}:art1"]


async def test_a_result_posted_to_a_channel_keeps_its_label_and_report_button(make_world, tmp_path) -> None:  # noqa: F811
    world = await make_world()
    await _delivered_result(world, tmp_path, "discord")
    ann = event(ANN, button=f"post:art1.{ROOM.id}")
    ann.user = type(ann.user)("discord", str(ANN), "Ann", "en")
    ann.chat = Chat("discord", "77", True)
    world.channels[ann.chat.key] = PostingChannel(ann.chat)
    await world.send(ann)
    ((_, caption, keyboard),) = world.channels[ROOM.key].images
    assert caption.startswith(t("sharing.caption", "en", name="Ann")) and _labelled(caption, keyboard, world)
    assert t("safety.dropped", "en", count=1) in caption  # the same decorations as the album


async def test_inline_results_carry_the_label_in_their_caption(make_world, tmp_path) -> None:  # noqa: F811
    world = await make_world()
    await _delivered_result(world, tmp_path, "telegram")
    query = event(ANN)
    query.inline_query = ""
    channel = world.channels[query.chat.key] = InlineChannel(query.chat)
    await world.send(query)
    (photo,) = channel.offered
    assert (photo.id, photo.file_id) == ("art1", "file-art1") and _labelled(photo.caption, photo.buttons, world)
