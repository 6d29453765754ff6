"""Tests for the scheduler and its worker processes, with the devtools SleepPipeline (no models)."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import bot.engine.scheduler as scheduler_module
from bot.config import SchedulerSettings
from bot.engine.backends import create_backend
from bot.engine.jobkinds import GENERATE, INTERACTIVE, LONG, JobKind, JobKinds
from bot.engine.scheduler import Busy, Scheduler, pick_order, plan_queue
from bot.storage import Artifact, Job, JobState, Storage
from facechain_core.devtools import read_ledger
from facechain_core.errors import UserFacingError
from handlers.messages import catalogue, t
from handlers.protocols import Chat, MessageRef

PIPELINE = "facechain_core.devtools:SleepPipeline"
CHAT = Chat("test", "1", True)
ALL_STATES = (JobState.QUEUED, JobState.RUNNING, *JobState.FINAL, JobState.DONE)


def make_kinds() -> JobKinds:
    kinds = JobKinds(())
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    kinds.register(JobKind("urgent", PIPELINE, INTERACTIVE, max_tries=2, timeout_s=30))
    kinds.register(JobKind("train", PIPELINE, LONG, max_tries=2, timeout_s=60, preemptible=True))
    kinds.register(JobKind("brief", PIPELINE, GENERATE, max_tries=2, timeout_s=0.6))
    return kinds


class RecordingSink:
    """Records every sink call; can fail deliveries or progress on demand."""

    def __init__(self, failing_deliveries: int = 0, failing_progress: bool = False) -> None:
        self.progress: dict[int, list[int]] = defaultdict(list)
        self.delivered: dict[int, list[Artifact]] = {}
        self.deliver_calls: dict[int, int] = defaultdict(int)
        self.failed: dict[int, dict[str, Any]] = {}
        self.cancelled: list[int] = []
        self.late: list[int] = []
        self.failing_deliveries = failing_deliveries
        self.failing_progress = failing_progress

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        self.progress[job.id].append(step)
        if self.failing_progress:
            raise RuntimeError("the chat is gone")

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        self.deliver_calls[job.id] += 1
        if self.failing_deliveries:
            self.failing_deliveries -= 1
            raise ConnectionError("network down")
        self.delivered[job.id] = artifacts

    async def on_late(self, job: Job) -> None:
        self.late.append(job.id)

    async def on_failed(self, job: Job, error: dict[str, Any]) -> None:
        self.failed[job.id] = error

    async def on_cancelled(self, job: Job) -> None:
        self.cancelled.append(job.id)


async def until(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    """Polls `predicate` (sync or async) until it holds; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def in_state(storage: Storage, job_ids: list[int], state: str) -> Callable[[], Any]:
    """A predicate for `until`: every job's row is in `state`."""
    async def check() -> bool:
        return [(await storage.job(i)).state for i in job_ids] == [state] * len(job_ids)
    return check


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    async with Storage(tmp_path / "db.sqlite3") as db:
        yield db


@pytest.fixture(params=["local", "ray"])
def backend(request: pytest.FixtureRequest) -> str:
    """Runs a test on each backend; Ray's is one worker actor on the head of tests/fixtures/ray_cluster.py."""
    if request.param == "ray":
        request.getfixturevalue("ray_world")
    return request.param


@contextlib.asynccontextmanager
async def running(storage: Storage, tmp_path: Path, sink: RecordingSink, devices: list[str] | None = None,
                  backend: str = "local", kinds: JobKinds | None = None, on_event: Callable[..., None] | None = None,
                  **settings: Any) -> AsyncIterator[Scheduler]:
    kinds, context = kinds or make_kinds(), {"models_dir": str(tmp_path)}
    engine = None
    if backend == "ray":
        from tests.fixtures.ray_cluster import GPU, NAMESPACE

        settings = {"backend": "ray", "ray_gpu_resource": GPU, "ray_namespace": NAMESPACE,
                    "ray_node_labels": {"tier": "small"}, **settings}
        engine = create_backend(SchedulerSettings(**settings), context, data_dir=tmp_path / "data", devices=["cpu"],
                                kind_needs=kinds.needs())
    scheduler = Scheduler(storage, kinds, SchedulerSettings(**settings), data_dir=tmp_path / "data",
                          context=context, sink=sink, devices=devices, backend=engine, on_event=on_event)
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace_s=0)


def params(tmp_path: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return {"tag": tag, "ledger": str(tmp_path / "ledger"), "steps": 2, **extra}


async def test_round_robin_across_users_and_resident_pipeline(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        ids = [(await sched.submit("u:a", "quick", params(tmp_path, tag, delay_s=0.05, chatter=True), CHAT)).job_id
               for tag in ("a1", "a2", "a3")]
        ids.append((await sched.submit("u:b", "quick", params(tmp_path, "b1", chatter=True), CHAT)).job_id)
        await until(in_state(storage, ids, JobState.DELIVERED))
    # B waited behind one job of A, not three; stdout chatter did not corrupt the protocol.
    assert read_ledger(tmp_path / "ledger") == ["a1", "b1", "a2", "a3"]
    jobs = [await storage.job(i) for i in ids]
    assert {j.state for j in jobs} == {JobState.DELIVERED}
    metas = [j.result["meta"] for j in jobs]
    assert len({m["pid"] for m in metas}) == 1
    assert [m["loads"] for m in metas] == [1, 1, 1, 1]  # loaded once, resident
    for job in jobs:
        (artifact,) = sink.delivered[job.id]
        assert artifact.owner_key == job.user_key and artifact.kind == "quick" and artifact.media_type == "text/plain"
        assert Path(artifact.path) == tmp_path / "data" / "users" / job.user_key / "jobs" / str(job.id) / f"{job.params['tag']}.txt"
        assert Path(artifact.path).read_text() == f"{job.params['tag']}\n"
        assert sink.progress[job.id][-1] == 2
        assert (await storage.job_artifacts(job.id))[0].delivered_at is not None


async def test_priority_class_overtakes_and_estimates(storage: Storage, tmp_path: Path) -> None:
    await storage.record_duration("quick", 0.4)
    await storage.record_duration("urgent", 0.1)
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        blocker = await sched.submit("u:x", "quick", params(tmp_path, "blocker", steps=8, delay_s=0.05), CHAT)
        await until(lambda: sink.progress[blocker.job_id])
        q1 = await sched.submit("u:a", "quick", params(tmp_path, "q1"), CHAT)
        q2 = await sched.submit("u:b", "quick", params(tmp_path, "q2"), CHAT)
        long = await sched.submit("u:d", "train", params(tmp_path, "long"), CHAT)
        urgent = await sched.submit("u:c", "urgent", params(tmp_path, "urgent"), CHAT)
        assert (q1.position, q2.position, long.position, urgent.position) == (1, 2, 3, 1)
        views = {v.id: v for u in ("u:a", "u:b", "u:c", "u:x") for v in await sched.user_jobs(u)}
        assert [views[i].position for i in (urgent.job_id, q1.job_id, q2.job_id)] == [1, 2, 3]
        assert views[blocker.job_id].state == JobState.RUNNING and views[blocker.job_id].position == 0
        assert 0 < views[blocker.job_id].progress < 1
        # ETA: the blocker's remaining time, then 0.1 s for the urgent job, then 0.4 s per quick job.
        eta_u, eta_1, eta_2 = (views[i].eta_s for i in (urgent.job_id, q1.job_id, q2.job_id))
        assert eta_u is not None and eta_u > 0.1
        # (each user_jobs call estimates at its own moment: allow for the time between them)
        assert eta_1 == pytest.approx(eta_u + 0.4, abs=0.05) and eta_2 == pytest.approx(eta_u + 0.8, abs=0.05)
        await until(lambda: len(sink.delivered) == 5)
    assert read_ledger(tmp_path / "ledger") == ["blocker", "urgent", "q1", "q2", "long"]


async def test_caps_refuse_with_codes_and_write_no_row(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, user_max_queued=2, queue_max=3) as sched:
        first = await sched.submit("u:a", "quick", params(tmp_path, "a1", steps=100, delay_s=0.05), CHAT)
        await until(lambda: sink.progress[first.job_id])
        await sched.submit("u:a", "quick", params(tmp_path, "a2"), CHAT)
        with pytest.raises(UserFacingError) as refused:
            await sched.submit("u:a", "quick", params(tmp_path, "a3"), CHAT)
        assert refused.value.code == "queue.user_full" and refused.value.details == {"max": 2}
        await sched.submit("u:b", "quick", params(tmp_path, "b1"), CHAT)
        await sched.submit("u:c", "quick", params(tmp_path, "c1"), CHAT)
        with pytest.raises(UserFacingError) as full:
            await sched.submit("u:d", "quick", params(tmp_path, "d1"), CHAT)
        assert full.value.code == "queue.full"
        with pytest.raises(ValueError, match="nope"):
            await sched.submit("u:e", "nope", {}, CHAT)
        rows = await storage.jobs_in_states(ALL_STATES)
        assert sorted(j.params["tag"] for j in rows) == ["a1", "a2", "b1", "c1"]
    with pytest.raises(UserFacingError) as stopping:
        await sched.submit("u:f", "quick", params(tmp_path, "f1"), CHAT)
    assert stopping.value.code == "queue.stopping"
    for code in ("queue.full", "queue.user_full", "queue.stopping", "job.failed", "job.crashed", "job.timeout",
                 "job.unavailable", "job.late", "job.unreachable", "job.expired"):
        assert set(catalogue()[code]) >= {"en", "zh"}
    assert "2" in t("queue.user_full", "zh", max=2)


async def test_cancel_queued_and_running(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        pid = sched.worker_pids()[0]
        long = await sched.submit("u:a", "quick", params(tmp_path, "long", steps=100, delay_s=0.02), CHAT)
        queued = await sched.submit("u:a", "quick", params(tmp_path, "queued"), CHAT)
        await until(lambda: len(sink.progress[long.job_id]) >= 2)
        assert await sched.cancel("u:a", queued.job_id) == [queued.job_id]
        assert (await storage.job(queued.job_id)).state == JobState.CANCELLED
        assert await sched.cancel("u:b", long.job_id) == []  # not theirs
        await sched.attach_progress(long.job_id, MessageRef(CHAT, "77"))
        assert (await storage.job(long.job_id)).progress_ref == {"chat": CHAT.to_dict(), "message_id": "77"}
        assert await sched.cancel("u:a") == [long.job_id]
        await until(lambda: long.job_id in sink.cancelled and queued.job_id in sink.cancelled)
        job = await storage.job(long.job_id)
        assert job.state == JobState.CANCELLED and job.attempts == 1
        assert max(sink.progress[long.job_id]) < 100
        assert await sched.user_jobs("u:a") == []
        # The worker survived the cancel and takes the next job.
        after = await sched.submit("u:a", "quick", params(tmp_path, "after"), CHAT)
        await until(lambda: after.job_id in sink.delivered)
        assert sched.worker_pids() == [pid]
    assert read_ledger(tmp_path / "ledger") == ["after"]
    assert not sink.delivered.keys() & {long.job_id, queued.job_id}


async def test_killed_worker_is_respawned_and_job_retried(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        pid = sched.worker_pids()[0]
        sub = await sched.submit("u:a", "quick", params(tmp_path, "victim", steps=20, delay_s=0.03), CHAT)
        await until(lambda: len(sink.progress[sub.job_id]) >= 2)
        os.kill(pid, signal.SIGKILL)
        await until(in_state(storage, [sub.job_id], JobState.DELIVERED))
        new_pid = sched.worker_pids()[0]
        health = sched.health()
    assert health["worker_deaths"] == 1 and health["retried"] == 1 and health["done"] == 1
    assert health["workers_alive"] == 1 and health["accepting"]
    job = await storage.job(sub.job_id)
    assert job.state == JobState.DELIVERED and job.attempts == 2
    assert new_pid not in (None, pid) and job.result["meta"]["pid"] == new_pid
    assert read_ledger(tmp_path / "ledger") == ["victim"]


async def test_failures_retry_bugs_and_crashes_but_not_user_errors(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        pid = sched.worker_pids()[0]
        bug = await sched.submit("u:a", "quick", params(tmp_path, "bug", bug=True), CHAT)
        await until(lambda: bug.job_id in sink.failed)
        assert sched.worker_pids() == [pid]  # an exception does not cost the worker
        expected = await sched.submit(
            "u:b", "quick", params(tmp_path, "nf", fail_code="selfie.no_face", fail_details={"n": 1}), CHAT)
        crash = await sched.submit("u:c", "quick", params(tmp_path, "crash", crash_at=1), CHAT)
        marker = tmp_path / "crashed-once"
        once = await sched.submit("u:d", "quick", params(tmp_path, "once", crash_at=2, crash_marker=str(marker)), CHAT)
        await until(lambda: crash.job_id in sink.failed and once.job_id in sink.delivered and expected.job_id in sink.failed)
    outcomes = {s.job_id: await storage.job(s.job_id) for s in (bug, expected, crash, once)}
    assert sink.failed[bug.job_id] == {"code": "job.failed", "details": {"tries": 2}}
    assert outcomes[bug.job_id].attempts == 2
    assert sink.failed[expected.job_id] == {"code": "selfie.no_face", "details": {"n": 1}}
    assert outcomes[expected.job_id].attempts == 1 and outcomes[expected.job_id].error["code"] == "selfie.no_face"
    assert sink.failed[crash.job_id] == {"code": "job.crashed", "details": {"tries": 2}}
    assert outcomes[crash.job_id].state == JobState.FAILED and outcomes[crash.job_id].attempts == 2
    assert outcomes[once.job_id].state == JobState.DELIVERED and outcomes[once.job_id].attempts == 2
    assert read_ledger(tmp_path / "ledger") == ["once"]


async def test_timeout_kills_worker_and_later_jobs_run(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        pid = sched.worker_pids()[0]
        hung = await sched.submit("u:a", "brief", params(tmp_path, "hung", hang_at=2), CHAT)
        later = await sched.submit("u:b", "quick", params(tmp_path, "later"), CHAT)
        await until(lambda: hung.job_id in sink.failed and later.job_id in sink.delivered)
        new_pid = sched.worker_pids()[0]
    assert sink.failed[hung.job_id]["code"] == "job.timeout"
    job = await storage.job(hung.job_id)
    assert job.state == JobState.FAILED and job.attempts == 1  # a timeout is not retried
    assert new_pid not in (None, pid)
    assert (await storage.job(later.job_id)).result["meta"]["pid"] == new_pid
    assert read_ledger(tmp_path / "ledger") == ["later"]


async def test_restart_resumes_queued_and_running_jobs_once(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    tags = ("a1", "a2", "b1")
    async with running(storage, tmp_path, sink) as sched:
        subs = [await sched.submit(f"u:{tag[0]}", "quick", params(tmp_path, tag, steps=5, delay_s=0.05), CHAT)
                for tag in tags]
        await until(lambda: sink.progress[subs[0].job_id])
        await sched.stop(grace_s=0)
    jobs = [await storage.job(s.job_id) for s in subs]
    assert [j.state for j in jobs] == [JobState.QUEUED] * 3
    assert [j.attempts for j in jobs] == [0, 0, 0]  # the interrupted attempt was refunded
    assert read_ledger(tmp_path / "ledger") == []
    # A crash of the service itself leaves a row running, its attempt counted.
    await storage.mark_running(subs[2].job_id)
    sink2 = RecordingSink()
    async with running(storage, tmp_path, sink2):
        await until(in_state(storage, [s.job_id for s in subs], JobState.DELIVERED))
    assert sorted(read_ledger(tmp_path / "ledger")) == sorted(tags)
    jobs = [await storage.job(s.job_id) for s in subs]
    assert [j.state for j in jobs] == [JobState.DELIVERED] * 3
    assert [j.attempts for j in jobs] == [1, 1, 2]


async def test_done_job_is_redelivered_not_regenerated(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink(failing_deliveries=1000)
    async with running(storage, tmp_path, sink, delivery_retry_s=0.05) as sched:
        sub = await sched.submit("u:a", "quick", params(tmp_path, "once"), CHAT)
        await until(lambda: sink.deliver_calls[sub.job_id] >= 2)  # retried after a failure
        views = await sched.user_jobs("u:a")
        assert [(v.id, v.state) for v in views] == [(sub.job_id, JobState.DONE)]
    assert (await storage.job(sub.job_id)).state == JobState.DONE
    stored = await storage.job_artifacts(sub.job_id)
    assert len(stored) == 1 and stored[0].delivered_at is None
    sink2 = RecordingSink()
    async with running(storage, tmp_path, sink2):
        await until(in_state(storage, [sub.job_id], JobState.DELIVERED))
    assert [a.id for a in sink2.delivered[sub.job_id]] == [stored[0].id]
    assert read_ledger(tmp_path / "ledger") == ["once"]
    job = await storage.job(sub.job_id)
    assert job.state == JobState.DELIVERED and job.attempts == 1
    assert (await storage.job_artifacts(sub.job_id))[0].delivered_at is not None


async def test_sink_errors_do_not_stop_jobs_and_out_dir_may_be_chosen(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink(failing_progress=True)
    async with running(storage, tmp_path, sink) as sched:
        chosen = tmp_path / "identity" / "lora"
        sub = await sched.submit("u:a", "quick", params(tmp_path, "x", steps=3, out_dir=str(chosen)), CHAT)
        await until(lambda: sub.job_id in sink.delivered)
    assert sink.progress[sub.job_id]
    assert [a.path for a in sink.delivered[sub.job_id]] == [str(chosen / "x.txt")]


async def test_short_job_runs_inside_a_preemptible_one(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend=backend) as sched:
        long = await sched.submit("u:a", "train", params(tmp_path, "long", steps=12, delay_s=0.05, yield_every=2), CHAT)
        await until(lambda: sink.progress[long.job_id])
        short = await sched.submit("u:b", "quick", params(tmp_path, "short"), CHAT)
        await until(in_state(storage, [long.job_id, short.job_id], JobState.DELIVERED))
    assert read_ledger(tmp_path / "ledger") == ["short", "long"]
    long_job, short_job = await storage.job(long.job_id), await storage.job(short.job_id)
    assert long_job.result["meta"]["steps_done"] == 12 and max(sink.progress[long.job_id]) == 12
    assert long_job.result["meta"]["pid"] == short_job.result["meta"]["pid"]
    assert long_job.attempts == 1 and short_job.attempts == 1
    assert short_job.finished_at < long_job.finished_at


async def test_two_workers_run_jobs_in_parallel_each_on_its_device(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, devices=["cuda:1", "cpu"]) as sched:
        assert len(set(sched.worker_pids())) == 2
        subs = [await sched.submit(f"u:{i}", "quick", params(tmp_path, f"p{i}", steps=3, delay_s=0.2), CHAT)
                for i in range(2)]
        await until(lambda: len(sink.delivered) == 2)
    one, two = [await storage.job(s.job_id) for s in subs]
    assert two.started_at < one.finished_at and one.started_at < two.finished_at  # they overlapped
    seen = {(m["device"], m["cuda_visible_devices"], m["dtype"]) for m in (one.result["meta"], two.result["meta"])}
    assert seen == {("cuda:0", "1", "float16"), ("cpu", "", "float32")}


async def test_queued_job_of_a_removed_kind_fails_at_start(storage: Storage, tmp_path: Path) -> None:
    gone = await storage.insert_job("u:a", "gone", GENERATE, {}, CHAT.to_dict(), 2)
    kept = await storage.insert_job("u:a", "quick", GENERATE, params(tmp_path, "kept"), CHAT.to_dict(), 2)
    sink = RecordingSink()
    async with running(storage, tmp_path, sink):
        await until(in_state(storage, [kept.id], JobState.DELIVERED))
        await until(lambda: gone.id in sink.failed)
    assert sink.failed[gone.id] == {"code": "job.unavailable", "details": {"kind": "gone"}}
    assert (await storage.job(gone.id)).state == JobState.FAILED


async def test_forget_user_stops_everything_silently(storage: Storage, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "FORGET_WAIT_S", 0.3)
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, devices=["cpu", "cpu"]) as sched:
        pids = sched.worker_pids()
        stuck = await sched.submit("u:a", "quick", params(tmp_path, "stuck", steps=3, hang_at=2), CHAT)
        polite = await sched.submit("u:a", "quick", params(tmp_path, "polite", steps=200, delay_s=0.02), CHAT)
        waiting = await sched.submit("u:a", "quick", params(tmp_path, "waiting"), CHAT)
        await until(lambda: sink.progress[stuck.job_id] and sink.progress[polite.job_id])
        other = await sched.submit("u:b", "quick", params(tmp_path, "other", steps=3, delay_s=0.05), CHAT)
        await sched.forget_user("u:a")
        states = [(await storage.job(s.job_id)).state for s in (stuck, polite, waiting)]
        assert states == [JobState.CANCELLED] * 3
        assert await sched.user_jobs("u:a") == []
        await until(lambda: other.job_id in sink.delivered)
        new_pids = sched.worker_pids()
    assert sink.cancelled == [] and not sink.failed
    assert read_ledger(tmp_path / "ledger") == ["other"]
    assert len(set(new_pids) - set(pids)) == 1  # only the stuck job's worker was killed


@pytest.mark.parametrize(("grace", "state", "ledger"), [(20.0, JobState.DELIVERED, ["slow"]), (0.0, JobState.QUEUED, [])])
async def test_sigterm_finishes_or_requeues_and_exits_cleanly(tmp_path: Path, grace: float, state: str,
                                                              ledger: list[str]) -> None:
    driver = Path(__file__).with_name("scheduler_driver.py")
    db, ledger_path = tmp_path / "db.sqlite3", tmp_path / "ledger"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(driver), str(db), str(tmp_path / "data"), str(ledger_path), str(grace),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        assert line[0] == "RUNNING"
        job_id, worker_pid = int(line[1]), int(line[2])
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 30)
        assert await proc.wait() == 0
        assert rest.decode().split() == ["STOPPED"]
    finally:
        if proc.returncode is None:
            proc.kill()
    assert not Path(f"/proc/{worker_pid}").exists()  # the worker went with it
    async with Storage(db) as storage:
        job = await storage.job(job_id)
    assert job.state == state and job.attempts == (1 if ledger else 0)
    assert read_ledger(ledger_path) == ledger


def _job(job_id: int, user: str, kind: str = "quick", priority: int = GENERATE) -> Job:
    return Job(id=job_id, user_key=user, kind=kind, state=JobState.QUEUED, priority=priority, params={}, chat={},
               progress_ref=None, result=None, error=None, attempts=0, max_tries=2, created_at=0.0)


def test_pick_order_and_plan_estimates() -> None:
    queued = [_job(1, "a"), _job(2, "a"), _job(3, "b"), _job(4, "c", "urgent", INTERACTIVE), _job(5, "b")]
    order = pick_order(queued, last_served={"a": 5, "b": 2})
    assert [j.id for j in order] == [4, 3, 1, 5, 2]
    averages = {"quick": 10.0, "urgent": 2.0, "train": 100.0}
    plan = plan_queue(order, [Busy(4.0), None], averages)
    assert plan == {4: (1, 2.0), 3: (2, 12.0), 1: (3, 14.0), 5: (4, 22.0), 2: (5, 24.0)}
    # Unknown durations make the estimate unknown, for that job and those after it on that worker.
    assert plan_queue(order[:2], [Busy(None)], averages) == {4: (1, None), 3: (2, None)}
    assert plan_queue(order[:2], [None], {"quick": 10.0}) == {4: (1, None), 3: (2, None)}
    # A short job runs at the next checkpoint of a preemptible job and delays it.
    train = _job(6, "d", "train", LONG)
    plan = plan_queue([_job(7, "e"), train], [Busy(50.0, preemptible=True)], averages, frozenset({"train"}))
    assert plan == {7: (1, 10.0), 6: (2, 160.0)}


async def test_workers_exit_when_the_service_is_killed(tmp_path: Path) -> None:
    driver = Path(__file__).with_name("scheduler_driver.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(driver), str(tmp_path / "db.sqlite3"), str(tmp_path / "data"), str(tmp_path / "ledger"),
        "0", json.dumps({"steps": 3, "hang_at": 2}), stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        worker_pid = int(line[2])
        proc.kill()
        await proc.wait()
        # Its stdin closes with the service: the worker, busy with a hung job, exits instead of lingering.
        await until(lambda: not _alive(worker_pid), timeout=5)
    finally:
        if proc.returncode is None:
            proc.kill()


def _alive(pid: int) -> bool:
    """True while `pid` runs (an orphan is reaped by init, so a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def test_round_robin_memory_is_bounded_and_stays_fair(storage: Storage, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "LAST_SERVED_MAX", 4)
    sink = RecordingSink()
    pause = tmp_path / "pause"
    pause.mkdir()

    async def blocked_round(jobs: list[tuple[str, str]], gate: str) -> list[int]:
        """Holds the worker with a paused job of u:x while `jobs` queue up, then lets everything run."""
        blocker = await sched.submit("u:x", "quick", params(tmp_path, gate, pause_at=1, pause_dir=str(pause)), CHAT)
        await until(lambda: (pause / f"{gate}.paused").exists())
        ids = [(await sched.submit(user, "quick", params(tmp_path, tag), CHAT)).job_id for user, tag in jobs]
        (pause / f"{gate}.go").touch()
        await until(in_state(storage, [blocker.job_id, *ids], JobState.DELIVERED))
        return ids

    async with running(storage, tmp_path, sink) as sched:
        await blocked_round([("u:a", "a1"), ("u:a", "a2"), ("u:a", "a3"),
                             *((f"u:{user}", f"{user}1") for user in "bcdef")], "gate1")
        # Users with nothing waiting were forgotten, oldest first; a user with jobs queued never is.
        assert len(sched._last_served) <= 4 and "u:x" not in sched._last_served
        # u:b, forgotten, counts as never served: it still goes before u:a, served after it.
        await blocked_round([("u:a", "a4"), ("u:b", "b2")], "gate2")
    assert read_ledger(tmp_path / "ledger") == ["gate1", "a1", "b1", "c1", "d1", "e1", "f1", "a2", "a3",
                                                "gate2", "b2", "a4"]
