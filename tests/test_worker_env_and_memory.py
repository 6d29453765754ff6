"""Workers start without the bot's secrets; what the service keeps in memory per user or job stays bounded."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from bot.config import SchedulerSettings
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.engine.worker_env import worker_environment
from bot.platforms.discord_channel import Recent
from bot.storage import Storage
from handlers import progress
from handlers.protocols import Chat
from handlers.services import STALE_AFTER_S
from tests.fixtures.safety_world import event, make_world  # noqa: F401

TELEGRAM = "5550001111:AAF-telegram-secret-for-the-env-test"
DISCORD = "MTAwMDAwMDAwMDAwMDAwMDAy.Gx.discord-secret-for-the-env-test"


class _Sink:
    async def on_progress(self, *args: Any) -> None: ...
    async def deliver(self, *args: Any) -> None: ...
    async def on_failed(self, *args: Any) -> None: ...
    async def on_cancelled(self, *args: Any) -> None: ...


def test_the_environment_loses_secret_names_and_values() -> None:
    base = {"PATH": "/usr/bin", "FACECHAIN_TELEGRAM_TOKEN": TELEGRAM, "FACECHAIN_DISCORD_TOKEN": DISCORD,
            "FACECHAIN_MODELS_DIR": "/models", "HTTPS_PROXY": f"http://bot:{TELEGRAM}@proxy:3128"}
    assert worker_environment(base, [TELEGRAM]) == {"PATH": "/usr/bin", "FACECHAIN_MODELS_DIR": "/models"}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads a process's environment from /proc")
async def test_a_worker_process_has_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACECHAIN_TELEGRAM_TOKEN", TELEGRAM)
    monkeypatch.setenv("FACECHAIN_DISCORD_TOKEN", DISCORD)
    monkeypatch.setenv("BOT_TOKEN_COPY", DISCORD)  # a configured secret under a name we cannot guess
    kinds = JobKinds(())
    kinds.register(JobKind("slow", "facechain_core.devtools:SleepPipeline", GENERATE, 2, 60))
    async with Storage(tmp_path / "db.sqlite3") as storage:
        scheduler = Scheduler(storage, kinds, SchedulerSettings(), data_dir=tmp_path / "data",
                              context={"models_dir": str(tmp_path)}, sink=_Sink(), secrets=[TELEGRAM, DISCORD])
        await scheduler.start()
        try:
            (pid,) = scheduler.worker_pids()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        finally:
            await scheduler.stop(grace_s=0)
    assert b"PYTHONUNBUFFERED=1" in environ  # it is the worker's environment
    for secret in (TELEGRAM, DISCORD, "FACECHAIN_TELEGRAM_TOKEN", "FACECHAIN_DISCORD_TOKEN", "BOT_TOKEN_COPY"):
        assert secret.encode() not in environ


async def test_per_user_and_per_job_memory_is_swept(make_world) -> None:  # noqa: F811
    world = await make_world()
    now = [1000.0]
    world.services.clock = lambda: now[0]
    runtime = world.services.runtime
    group = Chat("telegram", "-100", False)
    for user in range(200):
        photo_event = event(user, "/status")
        await world.send(photo_event)
        runtime.group_hints[f"telegram:{user}"] = now[0]  # as a photo posted in a group leaves
    job = await world.storage.insert_job("telegram:1", "demo", 1, {}, group.to_dict(), 2)
    await progress.show_progress(world.services, job, 1, 10)  # a job that then never reports again
    assert len(runtime.rate_windows) == 200 and job.id in runtime.progress

    now[0] += STALE_AFTER_S + 1
    await world.send(event(7, "/status"))
    assert list(runtime.rate_windows) == ["telegram:7"] and not runtime.group_hints and not runtime.progress
    gc.collect()
    assert len(runtime.user_locks) == 0  # nobody holds a lock: none is kept


def test_adapter_memory_keeps_the_most_recent_entries() -> None:
    recent = Recent(limit=3)
    for n in range(10):
        recent[str(n)] = n
    recent["7"] = 7  # written again: newest
    assert list(recent) == ["8", "9", "7"]
