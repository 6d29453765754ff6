"""Discord through the real router and discord.py against the fake Discord: nothing a user typed pings anyone,
a server's job messages name their requester and the result replaces the progress message, interaction
tokens stay out of DEBUG logs, and the help speaks Discord."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.ops.logredact import install_redaction
from bot.platforms.discord_adapter import DiscordAdapter
from bot.storage import Artifact, Storage
from facechain_core.styles import load_styles
from handlers import progress
from handlers.messages import t
from handlers.services import Services
from tests.fixtures.fake_discord import APP_ID, FakeDiscord, FakeUser, fake_discord  # noqa: F401
from tests.fixtures.safety_world import Jobs

pytestmark = pytest.mark.timeout(60)

USER = 412345678901234567
PING = "@everyone @here <@&300000000000000777> <@498765432109876543>"
NOBODY = {"parse": []}


@dataclass
class DiscordWorld:
    fake: FakeDiscord
    services: Services
    storage: Storage
    adapter: DiscordAdapter


@asynccontextmanager
async def discord_world(fake: FakeDiscord, tmp_path: Path, **discord: Any) -> AsyncIterator[DiscordWorld]:
    """The router with real storage, a job queue that only writes rows, and the real Discord adapter."""
    settings = fake.bot_settings(data_dir=tmp_path / "data", discord=discord)
    async with Storage(tmp_path / "db.sqlite3") as storage:
        adapters: dict[str, DiscordAdapter] = {}
        services = Services.build(settings, storage, channel_for=lambda chat: adapters["discord"].channel_for(chat),
                                  private_chat=lambda user: adapters["discord"].private_chat(user),
                                  jobs=Jobs(storage), check_selfie=lambda data: None,
                                  features_installed={"portrait"}, styles=load_styles())
        adapters["discord"] = DiscordAdapter(settings, services)
        async with adapters["discord"]:
            yield DiscordWorld(fake, services, storage, adapters["discord"])


def mentions(request: Any) -> dict[str, Any] | None:
    body = request.json if isinstance(request.json, dict) else {}
    data = body.get("data") if isinstance(body.get("data"), dict) else body
    return data.get("allowed_mentions")


async def test_text_users_typed_pings_nobody(fake_discord: FakeDiscord, tmp_path: Path) -> None:  # noqa: F811
    fake = fake_discord
    async with discord_world(fake, tmp_path):
        room = fake.guild_channel()
        mark = fake.mark()
        fake.slash(USER, "style", channel=room, style=f"hanfu {PING}")
        answer = await fake.wait_for("PATCH", rf"/webhooks/{APP_ID}/.+/messages/@original",
                                     lambda r: r.content is not None, since=mark)
        await fake.wait_idle(0.2)
    assert PING in answer.content  # the unknown style's name is echoed...
    sent = [r for r in fake.requests[mark:] if r.content is not None]
    assert sent and all(mentions(r) == NOBODY for r in sent), [(r.path, mentions(r)) for r in sent]  # ...pings nobody


async def test_a_servers_job_names_its_requester_and_ends_in_its_progress_message(
        fake_discord: FakeDiscord, tmp_path: Path) -> None:  # noqa: F811
    fake = fake_discord
    key = f"discord:{USER}"
    async with discord_world(fake, tmp_path) as world:
        await world.storage.ensure_user(key, "discord", "en")
        await world.storage.add_selfie(key, str(tmp_path / "s.jpg"), {"box": [0, 0, 1, 1]})
        room = fake.guild_channel()
        posts = rf"/channels/{room['id']}/messages"
        mark = fake.mark()
        fake.slash(USER, "style", channel=room, style="hanfu", count=1)
        queued = await fake.wait_for("POST", posts, since=mark)
        await fake.wait_idle(0.2)  # the handler stores the progress message's reference after posting it
        (job,) = await world.storage.user_jobs(key, ["queued"])
        # What the scheduler's sink does for this job: progress, then the result.
        await progress.show_progress(world.services, job, 1, 2)
        picture = tmp_path / "portrait.png"
        Image.new("RGB", (32, 32), (200, 40, 40)).save(picture)
        artifact = Artifact("art1", job.id, key, "portrait", str(picture), "image/png")
        await world.storage.finish_job(job.id, {"files": [str(picture)]}, [artifact])
        job = await world.storage.job(job.id)
        await progress.deliver_result(world.services, job, [artifact])
        await fake.wait_idle(0.2)
        delivered = await world.storage.artifact("art1")

    me = {"parse": [], "users": [USER]}
    assert queued.content.startswith(f"<@{USER}> ") and mentions(queued) == me
    edits = fake.find("PATCH", rf"{posts}/{queued.response['id']}", since=mark)
    assert [e.content.startswith(f"<@{USER}> ") for e in edits] == [True, True] and all(mentions(e) == me for e in edits)
    result = edits[-1]  # the progress message became the result: the picture, its caption and its buttons
    assert [name for name, _ in result.files] == ["portrait.png"]
    assert t("portrait.caption", "en", style="Hanfu") in result.content and "AI-generated" in result.content
    assert {"fc:more:art1", "fc:report:art1"} <= set(result.custom_ids())
    assert fake.find("POST", posts, since=mark) == [queued]  # no separate "Done" nor result message
    assert delivered is not None and delivered.delivered_at is not None


async def test_dm_jobs_mention_nobody(fake_discord: FakeDiscord, tmp_path: Path) -> None:  # noqa: F811
    fake = fake_discord
    key = f"discord:{USER}"
    async with discord_world(fake, tmp_path) as world:
        await world.storage.ensure_user(key, "discord", "en")
        await world.storage.add_selfie(key, str(tmp_path / "s.jpg"), {"box": [0, 0, 1, 1]})
        mark = fake.mark()
        fake.slash(USER, "style", style="hanfu", count=1)
        queued = await fake.wait_for("POST", rf"/channels/{fake.dm_channel(USER)['id']}/messages", since=mark)
    assert not queued.content.startswith("<@") and mentions(queued) == NOBODY


async def test_interaction_tokens_stay_out_of_debug_logs(fake_discord: FakeDiscord, tmp_path: Path,  # noqa: F811
                                                         caplog: pytest.LogCaptureFixture) -> None:
    install_redaction([fake_discord.token])
    caplog.set_level(logging.DEBUG)
    async with discord_world(fake_discord, tmp_path):
        mark = fake_discord.mark()
        interaction = fake_discord.slash(USER, "help")
        await fake_discord.wait_for("PATCH", rf"/webhooks/{APP_ID}/.+/messages/@original", since=mark)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "WebSocket Event" in logged and "INTERACTION_CREATE" in logged  # discord.py logged the payload
    assert interaction.token not in logged and interaction.token not in caplog.text


async def test_start_help_and_descriptions_speak_discord(fake_discord: FakeDiscord, tmp_path: Path) -> None:  # noqa: F811
    fake = fake_discord
    async with discord_world(fake, tmp_path) as world:
        texts = []
        for command in ("start", "help"):
            mark = fake.mark()
            fake.slash(FakeUser(USER), command)
            answer = await fake.wait_for("PATCH", rf"/webhooks/{APP_ID}/.+/messages/@original",
                                         lambda r: r.content is not None, since=mark)
            texts.append(answer.content)
        synced = {c["name"]: c for c in fake.commands[None]}
    start, help_text = texts
    assert "private chat" not in start and "direct message" in start
    assert "reply to it" not in help_text and "private chat" not in help_text
    assert f"/cartoon — {t('discord.help.cartoon', 'en')}" in help_text
    assert synced["cartoon"]["description"] == t("discord.help.cartoon", "en")
    assert synced["cartoon"]["description_localizations"]["zh-CN"] == t("discord.help.cartoon", "zh")
    assert world.services.styles is not None


async def test_guild_ids_are_said_to_leave_dms_without_commands(fake_discord: FakeDiscord, tmp_path: Path,  # noqa: F811
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bot.platforms.discord_adapter")
    async with discord_world(fake_discord, tmp_path, guild_ids=[300000000000000001]):
        pass
    assert any("direct messages" in r.getMessage() and "guild_ids" in r.getMessage() for r in caplog.records)
