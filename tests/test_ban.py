"""Bans through the whole service (real PTB against the fake Bot API, a real worker): /admin ban cancels
the user's queued and running jobs at once and refuses what they send with the reason (/privacy and
/delete stay theirs); /admin unban restores them; /admin stats counts users, jobs and the queue."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from bot.app import open_service
from bot.engine.jobkinds import JobKind
from handlers import router
from handlers.messages import t
from handlers.progress import submit_with_progress
from handlers.safety import refuse_banned
from tests.fixtures.safety_world import event, make_world  # noqa: F401

pytestmark = pytest.mark.timeout(120)
USER, ADMIN = 31337, 4040
KEY = f"telegram:{USER}"
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", 1, 1, 60)


@pytest.fixture
def render_command() -> Iterator[None]:
    """/render: a slow test.sleep job through the scheduler, as a feature's command submits one."""
    async def render(services, event, channel):  # noqa: ANN001
        await submit_with_progress(services, event, channel, "test.sleep", {"steps": 40, "delay_s": 0.1})

    router.register_command("render", render, "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)


@pytest.fixture
def settings(fake_telegram, tmp_path):  # noqa: ANN001
    return fake_telegram.bot_settings(data_dir=tmp_path / "data", access={"admins": [f"telegram:{ADMIN}"]},
                                      scheduler={"progress_interval_s": 0})


async def _say(fake, user: int, text: str, timeout: float = 10.0) -> str:  # noqa: ANN001
    mark = fake.mark()
    fake.send_message(user, None, text)
    call = await fake.wait_for("sendMessage", lambda c: c.params["chat_id"] == user, since=mark, timeout=timeout)
    return call.params["text"]


async def _states(service, want: dict[str, int], timeout: float = 15.0) -> list:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs = await service.storage.user_jobs(KEY, ["queued", "running", "done", "delivered", "cancelled"])
        counts = {s: sum(j.state == s for j in jobs) for s in want}
        if counts == want or loop.time() > deadline:
            assert counts == want, [(j.id, j.state) for j in jobs]
            return jobs
        await asyncio.sleep(0.05)


async def test_ban_cancels_jobs_and_refuses_until_unban(fake_telegram, settings,  # noqa: ANN001
                                                       render_command) -> None:  # noqa: ANN001
    fake = fake_telegram
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        assert any(task.get_name() == "retention" for task in asyncio.all_tasks())
        await _say(fake, USER, "/render")
        await _say(fake, USER, "/render")
        await _states(service, {"running": 1, "queued": 1})

        # The ban answers the admin at once; both jobs end cancelled and their messages say so.
        mark = fake.mark()
        reply = await _say(fake, ADMIN, f"/admin ban {USER} spamming the queue")
        assert reply == t("admin.banned", "en", user=KEY, jobs=2)
        await _states(service, {"running": 0, "queued": 0, "cancelled": 2})
        await fake.wait_for("editMessageText", lambda c: c.params["text"] == t("progress.cancelled", "en"),
                            since=mark, timeout=15)

        # Everything the banned user sends is refused with the reason; no job is written.
        refused = await _say(fake, USER, "/render")
        assert refused == t("safety.banned", "en", reason=t("safety.banned_reason", "en", reason="spamming the queue"))
        assert refused == await _say(fake, USER, "/status")
        mark = fake.mark()
        fake.send_photo(USER, None, b"\xff\xd8not really a photo")
        photo = await fake.wait_for("sendMessage", lambda c: c.params["chat_id"] == USER, since=mark, timeout=10)
        assert photo.params["text"] == refused
        await _states(service, {"running": 0, "queued": 0, "cancelled": 2})
        # ... but what the user knows and keeps of their data stays open to them.
        assert t("privacy.banned", "en") in await _say(fake, USER, "/privacy")
        assert await _say(fake, USER, "/delete") == t("delete.confirm", "en")

        # An admin cannot be banned; the list and the stats show the ban.
        assert await _say(fake, ADMIN, f"/admin ban telegram:{ADMIN}") == t(
            "admin.cannot_ban_admin", "en", user=f"telegram:{ADMIN}")
        assert KEY in await _say(fake, ADMIN, "/admin bans")
        stats = await _say(fake, ADMIN, "/admin stats")
        assert "blocked: 1" in stats and "cancelled 2" in stats and "0 waiting, 0 running" in stats
        assert "NOT installed" in stats  # safe mode is on and this service has no safety checker

        # Unban restores the user at once.
        assert await _say(fake, ADMIN, f"/admin unban {USER}") == t("admin.unbanned", "en", user=KEY)
        queued = await _say(fake, USER, "/render")
        assert "test.sleep" in queued
        await _states(service, {"running": 1, "queued": 0, "cancelled": 2})
        assert await _say(fake, ADMIN, f"/admin unban {USER}") == t("admin.not_banned", "en", user=KEY)
        await service.scheduler.cancel(KEY)

        # Not an admin: /admin is refused like every admin command.
        assert await _say(fake, USER, "/admin stats") == t("core.admin_only", "en")


async def test_the_gate_leaves_privacy_delete_and_admins_open(make_world) -> None:  # noqa: F811
    world = await make_world(access={"admins": ["telegram:9"]})
    await world.storage.ban_user("telegram:5", "", "telegram:9")
    await world.storage.ban_user("telegram:9", "", "telegram:9")  # in the table, but an admin
    assert await refuse_banned(world.services, event(5, "/style hanfu")) == t("safety.banned", "en", reason="")
    assert await refuse_banned(world.services, event(5, button="more:abc")) is not None
    for allowed in (event(5, "/privacy"), event(5, "/delete"), event(5, button="delete:nonce"),
                    event(5, button="keep:nonce"), event(9, "/style hanfu"), event(6, "/style hanfu")):
        assert await refuse_banned(world.services, allowed) is None
    channel = await world.send(event(9, "/admin ban nobody"))
    assert channel.said[-1] == t("admin.bad_user", "en", user="nobody")
    channel = await world.send(event(9, "/admin"))
    assert channel.said[-1] == t("admin.usage", "en")
