"""Delivery of finished jobs through the whole service against the fake Bot API: a result outlives a
chat-API outage longer than any fixed budget (capped backoff, the user told it is late), a blocked
user ends delivery at the first refusal, an expired result is dropped; the Discord adapter tells
refusals apart from passing failures."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from bot.config import SchedulerSettings
from bot.engine.scheduler import Scheduler
from bot.ops.retention import DAY_S, sweep
from bot.platforms.discord_adapter import DiscordAdapter
from bot.platforms.telegram_adapter import TelegramAdapter
from bot.storage import JobState, Storage
from handlers.messages import t
from handlers.protocols import Chat, ChatUnreachable, Media, MessageRef
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.recorder import Recorder
from tests.fixtures.render import RENDER_KIND, register_render
from tests.test_scheduler import CHAT, RecordingSink, in_state, make_kinds, params, running, until

pytestmark = pytest.mark.timeout(90)
USER = 555001


@pytest.fixture
def render() -> Iterator[None]:
    undo = register_render()
    yield
    undo()


def _settings(fake: FakeTelegram, tmp_path: Path, **scheduler: Any) -> Any:
    return fake.bot_settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                             scheduler={"progress_interval_s": 0, **scheduler})


async def _job(service: Any, states: tuple[str, ...], timeout: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs = await service.storage.user_jobs(f"telegram:{USER}", states)
        if jobs:
            return jobs[0]
        assert loop.time() < deadline, f"no job of telegram:{USER} in {states}"
        await asyncio.sleep(0.02)


def _texts_to(fake: FakeTelegram, chat: int) -> list[str]:
    return [c.params["text"] for c in fake.calls if c.ok and c.method in ("sendMessage", "editMessageText")
            and int(c.params.get("chat_id", 0)) == chat]


async def test_a_result_outlives_an_outage_longer_than_the_old_budget(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                     render: None) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, delivery_retry_s=0.02, delivery_max_backoff_s=0.1)
    async with open_service(settings, extra_kinds=[RENDER_KIND]) as service:
        fake.error_next("sendPhoto", times=10_000, status=502, description="Bad Gateway")
        fake.send_message(USER, None, "/render late")
        # Twenty failed tries used to end in "could not be delivered"; the outage outlasts them.
        await fake.wait_for_count("sendPhoto", 0)
        deadline = time.monotonic() + 30
        while len(fake.calls_of("sendPhoto", ok_only=False)) < 30:
            assert time.monotonic() < deadline, "delivery stopped trying during the outage"
            await asyncio.sleep(0.05)
        job = await _job(service, ("done",))
        assert job.delivery_tries >= 25
        fake.clear_errors()
        await fake.wait_for("sendPhoto", timeout=10)
        job = await _job(service, ("delivered",))
        await fake.wait_idle()
    photos = fake.calls_of("sendPhoto")
    assert len(photos) == 1 and fake.uploads(photos[0]) == [b"late\n"]
    told = _texts_to(fake, USER)
    assert t("job.late", "en") in told, told
    assert told[-1] == t("progress.done", "en")


async def test_a_blocked_user_ends_delivery_at_the_first_refusal(fake_telegram: FakeTelegram, tmp_path: Path,
                                                               render: None) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, delivery_retry_s=0.02, delivery_max_backoff_s=0.1)
    async with open_service(settings, extra_kinds=[RENDER_KIND]) as service:
        fake.block(USER)
        fake.send_message(USER, None, "/render blocked")
        job = await _job(service, ("failed",))
        await fake.wait_idle()
        assert await service.scheduler.user_jobs(f"telegram:{USER}") == []
    assert len(fake.calls_of("sendPhoto", ok_only=False)) == 1
    assert job.error["code"] == "job.unreachable"
    assert not [c for c in fake.calls if c.ok and c.method.startswith("send")]


async def test_discord_refusals_for_good_are_told_apart_from_passing_failures(fake_discord: Any,
                                                                              tmp_path: Path) -> None:
    picture = tmp_path / "result.png"
    picture.write_bytes(b"\x89PNG not really")
    room = fake_discord.guild_channel()
    dm = fake_discord.dm_channel(USER)
    async with DiscordAdapter(fake_discord.bot_settings(), None, dispatch=Recorder()) as adapter:
        refusals = [(dm, 403, 50007, "Cannot send messages to this user"), (room, 403, 50001, "Missing Access"),
                    (room, 404, 10003, "Unknown Channel")]
        for channel, status, code, message in refusals:
            fake_discord.fail("POST", rf"/channels/{channel['id']}/messages", status, code, message, times=1)
            chat = Chat("discord", channel["id"], channel is dm)
            with pytest.raises(ChatUnreachable):
                await adapter.channel_for(chat).send_images([Media(path=picture)])
        # Other errors are no refusal of the chat (a 5xx is retried by discord.py itself first).
        fake_discord.fail("POST", rf"/channels/{room['id']}/messages", 400, 50035, "Invalid Form Body", times=1)
        with pytest.raises(Exception) as other:
            await adapter.channel_for(Chat("discord", room["id"], False)).send_text("hello")
        assert not isinstance(other.value, ChatUnreachable)
        fake_discord.fail("PATCH", rf"/channels/{room['id']}/messages/\d+", 404, 10003, "Unknown Channel", times=1)
        with pytest.raises(ChatUnreachable):
            await adapter.channel_for(Chat("discord", room["id"], False)).edit_text(
                MessageRef(Chat("discord", room["id"], False), "123"), "done")


async def test_telegram_refusals_for_good_are_told_apart(fake_telegram: FakeTelegram) -> None:
    async with TelegramAdapter(fake_telegram.bot_settings(), dispatch=Recorder()) as adapter:
        channel = adapter.channel_for(Chat("telegram", str(USER), True))
        fake_telegram.error_next("sendMessage", status=400, description="Bad Request: chat not found")
        with pytest.raises(ChatUnreachable):
            await channel.send_text("hello")
        fake_telegram.error_next("sendMessage", status=502, description="Bad Gateway")
        with pytest.raises(Exception) as passing:
            await channel.send_text("hello")
        assert not isinstance(passing.value, ChatUnreachable)
        fake_telegram.block(USER)
        with pytest.raises(ChatUnreachable):
            await channel.edit_text(MessageRef(channel.chat, "100"), "done")


async def test_a_pending_delivery_does_not_hold_up_retention_and_its_expired_result_is_dropped(
        fake_telegram: FakeTelegram, tmp_path: Path, render: None) -> None:
    fake = fake_telegram
    settings = fake.bot_settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                                 scheduler={"progress_interval_s": 0, "delivery_retry_s": 0.02,
                                            "delivery_max_backoff_s": 0.05},
                                 retention={"results_days": 30})
    async with open_service(settings, extra_kinds=[RENDER_KIND]) as service:
        fake.error_next("sendPhoto", times=10_000, status=502, description="Bad Gateway")
        fake.send_message(USER, None, "/render stale")
        await fake.wait_for("sendPhoto", lambda c: len(fake.calls_of("sendPhoto", ok_only=False)) >= 3,
                            ok_only=False, timeout=20)
        (artifact,) = await service.storage.job_artifacts((await _job(service, ("done",))).id)
        counts = await sweep(service.services, settings.retention, time.time() + 31 * DAY_S)
        assert counts["artifacts"] == 1 and not Path(artifact.path).exists()
        job = await _job(service, ("failed",))
        await fake.wait_idle()  # no more tries
        assert await service.scheduler.user_jobs(f"telegram:{USER}") == []
    assert job.error["code"] == "job.expired"
    assert not fake.calls_of("sendPhoto")


async def test_backoff_is_kept_across_a_restart_and_an_expired_result_is_not_tried(tmp_path: Path) -> None:
    async with Storage(tmp_path / "db.sqlite3") as storage:
        sink = RecordingSink(failing_deliveries=1000)
        async with running(storage, tmp_path, sink, delivery_retry_s=0.2, delivery_max_backoff_s=0.4) as sched:
            sub = await sched.submit("u:a", "quick", params(tmp_path, "kept"), CHAT)
            await until(lambda: sink.deliver_calls[sub.job_id] >= 4)
            assert sink.late == [sub.job_id]  # told once, after three failed tries
        job = await storage.job(sub.job_id)
        assert job.state == JobState.DONE and job.delivery_tries >= 4 and job.deliver_after is not None
        sink2 = RecordingSink()
        async with running(storage, tmp_path, sink2):
            await until(in_state(storage, [sub.job_id], JobState.DELIVERED))
            delivered_at = time.time()
        assert delivered_at >= job.deliver_after  # the restart kept the pace
        assert sink2.late == [] and sink2.deliver_calls[sub.job_id] == 1

        sink3 = RecordingSink(failing_deliveries=1000)
        async with running(storage, tmp_path, sink3, delivery_retry_s=0.05) as sched:
            old = await sched.submit("u:b", "quick", params(tmp_path, "old"), CHAT)
            await until(lambda: sink3.deliver_calls[old.job_id] >= 1)
        sink4 = RecordingSink()
        expired = Scheduler(storage, make_kinds(), SchedulerSettings(), data_dir=tmp_path / "data",
                            context={"models_dir": str(tmp_path)}, sink=sink4, results_ttl_s=0.01)
        async with expired:
            await until(in_state(storage, [old.job_id], JobState.FAILED))
        assert sink4.deliver_calls[old.job_id] == 0 and not sink4.failed
        assert (await storage.job(old.job_id)).error["code"] == "job.expired"


async def test_a_result_left_by_the_last_run_goes_out_as_soon_as_the_chat_is_up(
        fake_telegram: FakeTelegram, tmp_path: Path, render: None) -> None:
    fake = fake_telegram
    first = _settings(fake, tmp_path, delivery_retry_s=0.01, delivery_max_backoff_s=0.01)
    async with open_service(first, extra_kinds=[RENDER_KIND]) as service:
        fake.error_next("sendPhoto", times=10_000, status=502, description="Bad Gateway")
        fake.send_message(USER, None, "/render left")
        await _job(service, ("done",))
    fake.clear_errors()
    async with Storage(first.db_path) as storage:
        (left,) = await storage.user_jobs(f"telegram:{USER}", ["done"])
    # The next run waits a minute between failed tries: the result must not need one.
    second = _settings(fake, tmp_path, delivery_retry_s=60)
    async with open_service(second, extra_kinds=[RENDER_KIND]) as service:
        await fake.wait_for("sendPhoto", timeout=15)
        after = await _job(service, ("delivered",))
    assert after.id == left.id and after.delivery_tries == left.delivery_tries
