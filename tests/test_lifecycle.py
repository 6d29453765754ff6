"""The job lifecycle under injected failures: a failed database write, a failed worker spawn, a full
disk under the heartbeat, and a /delete racing a crashed job's requeue. No job is stranded and no loop
ends on one failed round (real scheduler and worker processes, devtools SleepPipeline)."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import bot.app as app_module
import bot.engine.backends.local as local_backend
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from handlers.basic import delete_user_data
from handlers.protocols import MessageRef
from tests.fixtures.fake_telegram import FakeTelegram, fake_telegram  # noqa: F401
from tests.fixtures.faults import LIFECYCLE_WRITES, StorageFaults, disk_full
from tests.fixtures.privacy import user_traces
from tests.test_scheduler import CHAT, RecordingSink, in_state, params, running, until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with Storage(tmp_path / "db.sqlite3") as db:
        yield db


def _bug(name: str) -> Any:
    return lambda: RuntimeError(f"an injected bug in {name}")


async def test_one_failure_at_each_lifecycle_write_strands_no_job(storage: Storage, tmp_path: Path) -> None:
    faults = StorageFaults(storage)
    faults.fail_first(LIFECYCLE_WRITES)  # each write's first call finds the database locked
    faults.fail_nth("finish_job", 2, disk_full)  # and the second result finds the disk full
    sink = RecordingSink(failing_deliveries=1)
    async with running(storage, tmp_path, sink, delivery_retry_s=0.05) as sched:
        ok = await sched.submit("u:a", "quick", params(tmp_path, "ok"), CHAT)
        await sched.attach_progress(ok.job_id, MessageRef(CHAT, "5"))
        once = await sched.submit("u:b", "quick", params(tmp_path, "once", crash_at=1,
                                                         crash_marker=str(tmp_path / "crashed")), CHAT)
        refused = await sched.submit("u:c", "quick", params(tmp_path, "nf", fail_code="selfie.no_face"), CHAT)
        dropped = await sched.submit("u:d", "quick", params(tmp_path, "dropped"), CHAT)
        assert await sched.cancel("u:d", dropped.job_id) == [dropped.job_id]
        await until(lambda: {ok.job_id, once.job_id} <= sink.delivered.keys() and refused.job_id in sink.failed)
        await until(in_state(storage, [ok.job_id, once.job_id], JobState.DELIVERED))
        later = await sched.submit("u:e", "quick", params(tmp_path, "later"), CHAT)  # the pump still runs
        await until(lambda: later.job_id in sink.delivered)
        slow = await sched.submit("u:f", "quick", params(tmp_path, "slow", steps=200, delay_s=0.02), CHAT)
        await until(lambda: sink.progress[slow.job_id])
        health = sched.health()
        assert (health["queued"], health["running"]) == (0, 1)
    # Stopped while `slow` ran: it is back in the queue, its attempt refunded.
    states = {s.job_id: (await storage.job(s.job_id)).state for s in (ok, once, refused, dropped, later, slow)}
    assert states == {ok.job_id: JobState.DELIVERED, once.job_id: JobState.DELIVERED,
                      refused.job_id: JobState.FAILED, dropped.job_id: JobState.CANCELLED,
                      later.job_id: JobState.DELIVERED, slow.job_id: JobState.QUEUED}
    assert (await storage.job(slow.job_id)).attempts == 0
    assert sink.failed[refused.job_id]["code"] == "selfie.no_face" and dropped.job_id in sink.cancelled
    assert sorted(read_ledger(tmp_path / "ledger")) == ["later", "ok", "once"]  # nothing generated twice
    expected = {"insert_job", "set_progress_ref", "mark_running", "requeue", "release_job", "finish_job",
                "record_duration", "end_job", "mark_job_delivered"}
    assert expected <= set(faults.injected), faults.injected


async def test_the_pump_survives_a_failed_dispatch(storage: Storage, tmp_path: Path) -> None:
    faults = StorageFaults(storage)
    faults.fail_nth("mark_running", 1, _bug("mark_running"))  # not a transient error: nothing retries it
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        first = await sched.submit("u:a", "quick", params(tmp_path, "first"), CHAT)
        second = await sched.submit("u:b", "quick", params(tmp_path, "second"), CHAT)
        await until(lambda: {first.job_id, second.job_id} <= sink.delivered.keys())
    assert faults.injected["mark_running"] == 1
    assert [(await storage.job(s.job_id)).attempts for s in (first, second)] == [1, 1]
    assert sorted(read_ledger(tmp_path / "ledger")) == ["first", "second"]


async def test_a_failure_while_settling_a_dead_workers_job_still_respawns_it(storage: Storage,
                                                                             tmp_path: Path) -> None:
    faults = StorageFaults(storage)
    faults.fail_nth("requeue", 1, _bug("requeue"))
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        victim = await sched.submit("u:a", "quick", params(tmp_path, "victim", steps=50, delay_s=0.02), CHAT)
        await until(lambda: sink.progress[victim.job_id])
        os.kill(sched.worker_pids()[0], signal.SIGKILL)
        after = await sched.submit("u:b", "quick", params(tmp_path, "after"), CHAT)
        await until(lambda: after.job_id in sink.delivered)
        assert sched.health()["workers_alive"] == 1
    # Its state could not be written: the row (running, one attempt used) decides at the next start.
    assert (await storage.job(victim.job_id)).state == JobState.RUNNING
    sink2 = RecordingSink()
    async with running(storage, tmp_path, sink2):
        await until(in_state(storage, [victim.job_id], JobState.DELIVERED))
    assert sorted(read_ledger(tmp_path / "ledger")) == ["after", "victim"]


async def test_a_failed_respawn_is_tried_again(storage: Storage, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_backend, "RESPAWN_DELAYS_S", (0.0, 0.05, 0.05, 0.05))
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        real = asyncio.create_subprocess_exec
        failures = []

        async def spawn(*args: Any, **kwargs: Any) -> Any:
            if not failures:
                failures.append(args)
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            return await real(*args, **kwargs)

        monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
        victim = await sched.submit("u:a", "quick", params(tmp_path, "victim", steps=50, delay_s=0.02), CHAT)
        await until(lambda: sink.progress[victim.job_id])
        os.kill(sched.worker_pids()[0], signal.SIGKILL)
        await until(lambda: victim.job_id in sink.delivered)
    assert len(failures) == 1
    assert (await storage.job(victim.job_id)).attempts == 2


async def test_the_heartbeat_outlives_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "HEARTBEAT_INTERVAL_S", 0.01)
    settings = app_module.Settings(data_dir=tmp_path)
    pings = []

    class Scheduler:
        def health(self) -> dict[str, Any]:
            return {"workers": 1}

        def ping_workers(self) -> None:
            pings.append(1)

    real_replace = Path.replace
    full = [3]

    def replace(self: Path, target: Any) -> Path:
        if full[0]:
            full[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    task = asyncio.create_task(app_module._heartbeat(settings, Scheduler()))
    try:
        await until(lambda: settings.heartbeat_path.exists() and len(pings) >= 5, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert full == [0]


async def test_delete_wins_over_a_crashed_jobs_requeue(storage: Storage, tmp_path: Path) -> None:
    """A worker dies while the user's /delete runs: the job is not queued again, runs never, writes nothing."""
    from handlers.services import Services

    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        services = Services(settings=None, storage=storage, jobs=sched, data_dir=tmp_path / "data",
                            check_selfie=lambda data: None, channel_for=lambda chat: None)
        await storage.ensure_user("u:gone", "test", "en")
        victim = await sched.submit("u:gone", "quick", params(tmp_path, "victim", steps=50, delay_s=0.02), CHAT)
        await until(lambda: sink.progress[victim.job_id])
        # The requeue of the crashed job is slow (a busy disk); /delete starts meanwhile.
        entered, release = asyncio.Event(), asyncio.Event()
        original = storage.requeue

        async def slow_requeue(job_id: int) -> Any:
            entered.set()
            await asyncio.wait_for(release.wait(), 5)
            return await original(job_id)

        storage.requeue = slow_requeue  # type: ignore[method-assign]
        os.kill(sched.worker_pids()[0], signal.SIGKILL)
        await asyncio.wait_for(entered.wait(), 10)
        deleting = asyncio.create_task(delete_user_data(services, "u:gone"))
        await asyncio.sleep(0)  # /delete has asked the scheduler to forget the user
        release.set()
        await asyncio.wait_for(deleting, 20)
        other = await sched.submit("u:other", "quick", params(tmp_path, "other"), CHAT)
        await until(lambda: other.job_id in sink.delivered)
        assert await sched.user_jobs("u:gone") == []
    assert read_ledger(tmp_path / "ledger") == ["other"]
    assert user_traces(tmp_path / "data", storage.path, ["u:gone"]) == []


async def test_a_stop_while_telegram_is_unreachable_ends_the_start(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM (the CLI sets `stop`) during the start's wait for an unreachable Bot API ends the service:
    the start is cancelled and what had started (storage, scheduler, worker) is closed."""
    fake_telegram.error_next("getMe", times=1000, status=502, description="Bad Gateway")
    caplog.set_level(logging.INFO)
    stop = asyncio.Event()
    service = asyncio.create_task(app_module.run_service(fake_telegram.bot_settings(data_dir=tmp_path / "data"),
                                                         stop))
    await until(lambda: any("cannot reach the Bot API" in r.getMessage() for r in caplog.records), timeout=60)
    stop.set()
    await asyncio.wait_for(service, timeout=30)
    assert any("scheduler stopped" in r.getMessage() for r in caplog.records)
