"""Daily quotas per user and job kind: the (N+1)th job of a day is refused with the reset time, the
next day it is accepted; admins are exempt; a job cancelled before it started is given back."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from handlers import router
from handlers.messages import t
from handlers.progress import format_duration, submit_with_progress
from handlers.safety import DAY_S, day_start
from tests.fixtures.safety_world import event, make_world  # noqa: F401

pytestmark = pytest.mark.timeout(60)
USER, OTHER, ADMIN = 11, 12, 99


@pytest.fixture(autouse=True)
def demo_command() -> Iterator[None]:
    """/demo submits a "demo" job through the same path as every feature's command."""
    async def demo(services, event, channel):  # noqa: ANN001
        await submit_with_progress(services, event, channel, "demo", {})

    router.register_command("demo", demo, "help.help", in_menu=False)
    yield
    router._commands.pop("demo", None)


def _queued(text: str) -> bool:
    return text.startswith("demo:") and ("queue" in text or "starting" in text.lower())


async def _jobs(world, user: int) -> list:  # noqa: ANN001
    return await world.storage.user_jobs(f"telegram:{user}", ["queued", "running", "done", "delivered",
                                                               "failed", "cancelled"])


async def test_the_extra_job_is_refused_until_the_next_day(make_world) -> None:  # noqa: F811
    world = await make_world(quotas={"demo": 2}, access={"admins": [f"telegram:{ADMIN}"]})
    for _ in range(2):
        channel = await world.send(event(USER, "/demo"))
        assert _queued(channel.said[-1]), channel.said[-1]
    # Finished jobs still count: the quota is about work started today.
    for job in await _jobs(world, USER):
        await world.storage.end_job(job.id, "delivered")

    channel = await world.send(event(USER, "/demo"))
    wait = format_duration(day_start(world.start) + DAY_S - world.start, "en")
    assert channel.said[-1] == t("quota.exceeded", "en", kind="demo", limit=2, reset="00:00 UTC", wait=wait)
    assert "00:00 UTC" in channel.said[-1] and len(await _jobs(world, USER)) == 2  # refused before any row

    channel = await world.send(event(USER, "/quota"))
    assert t("quota.line", "en", kind="demo", used=2, limit=2, left=0) in channel.said[-1]
    assert "00:00 UTC" in channel.said[-1]

    # Just before midnight UTC it is still refused; just after, accepted.
    world.advance(day_start(world.start) + DAY_S - world.start - 1)
    channel = await world.send(event(USER, "/demo"))
    assert channel.said[-1].startswith("You've used all 2")
    world.advance(2)
    channel = await world.send(event(USER, "/demo"))
    assert _queued(channel.said[-1]), channel.said[-1]
    assert len(await _jobs(world, USER)) == 3


async def test_admins_are_exempt_and_unlisted_kinds_are_free(make_world) -> None:  # noqa: F811
    world = await make_world(quotas={"demo": 1}, access={"admins": [f"telegram:{ADMIN}"]})
    for _ in range(3):
        await world.send(event(ADMIN, "/demo"))
    assert len(await _jobs(world, ADMIN)) == 3
    channel = await world.send(event(ADMIN, "/quota"))
    assert channel.said[-1] == t("quota.admin", "en")

    world = await make_world(quotas={"demo": 0})  # 0: no limit
    for _ in range(4):
        await world.send(event(USER, "/demo"))
    assert len(await _jobs(world, USER)) == 4
    channel = await world.send(event(USER, "/quota"))
    assert t("quota.line_unlimited", "en", kind="demo", used=4) in channel.said[-1]


async def test_a_job_cancelled_before_it_started_is_given_back(make_world) -> None:  # noqa: F811
    world = await make_world(quotas={"demo": 2})
    await world.send(event(OTHER, "/demo"))
    await world.send(event(OTHER, "/demo"))
    first, second = await _jobs(world, OTHER)
    await world.storage.mark_running(first.id)
    await world.jobs.cancel(f"telegram:{OTHER}")  # the running one was started: it still counts
    assert (await world.storage.jobs_per_kind(f"telegram:{OTHER}", day_start(world.start))) == {"demo": 1}
    channel = await world.send(event(OTHER, "/demo"))
    assert _queued(channel.said[-1]), channel.said[-1]
    channel = await world.send(event(OTHER, "/demo"))
    assert channel.said[-1].startswith("You've used all 2")


async def test_concurrent_commands_of_one_user_never_pass_the_quota(make_world) -> None:  # noqa: F811
    """Six /demo at once with two left: the check and the job row it counts happen in one step."""
    world = await make_world(quotas={"demo": 2})
    channels = await asyncio.gather(*(world.send(event(USER, "/demo")) for _ in range(6)))
    assert len(await _jobs(world, USER)) == 2
    said = channels[0].said  # one chat, one channel
    assert sum(map(_queued, said)) == 2 and sum(s.startswith("You've used all 2") for s in said) == 4


def test_config_merges_quotas_over_the_defaults(tmp_path) -> None:  # noqa: ANN001
    from bot.config import DEFAULT_QUOTAS, ConfigError, Settings, load_config

    settings = Settings.model_validate({"quotas": {"cartoon": 5, "tryon": 3}})
    assert settings.quotas == {**DEFAULT_QUOTAS, "cartoon": 5, "tryon": 3}
    assert Settings().quotas == DEFAULT_QUOTAS
    path = tmp_path / "c.toml"
    path.write_text("[quotas]\nportrait = -1\n")
    with pytest.raises(ConfigError, match="quotas"):
        load_config(path, environ={})
