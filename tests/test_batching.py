"""Cross-user batching in the scheduler and worker, with the devtools SleepPipeline (no models)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import SchedulerSettings
from bot.engine.batching import batch_group
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.ops.metrics import RATE_WINDOW_S, JobMetrics, PictureRate
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from tests.test_scheduler import CHAT, PIPELINE, RecordingSink, in_state, params, storage, until  # noqa: F401

BATCHED = "sample"  # a kind whose jobs share passes (devtools.sleep_batch_plan)


def make_kinds() -> JobKinds:
    kinds = JobKinds(())
    kinds.register(JobKind(BATCHED, PIPELINE, GENERATE, max_tries=2, timeout_s=30,
                           batch="facechain_core.devtools:sleep_batch_plan"))
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    return kinds


@contextlib.asynccontextmanager
async def running(storage: Storage, tmp_path: Path, sink: RecordingSink, **settings: Any) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(storage, make_kinds(), SchedulerSettings(**settings), data_dir=tmp_path / "data",
                          context={"models_dir": str(tmp_path)}, sink=sink)
    await scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace_s=0)


def job(tmp_path: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return params(tmp_path, tag, batch_key="studio", **extra)


async def blocked(sched: Scheduler, sink: RecordingSink, tmp_path: Path) -> int:
    """Starts an unbatched job and waits for its first step, so the next submits queue up behind it."""
    blocker = await sched.submit("u:x", "quick", params(tmp_path, "blocker", steps=6, delay_s=0.05), CHAT)
    await until(lambda: sink.progress[blocker.job_id])
    return blocker.job_id


async def batches(storage: Storage, ids: list[int]) -> list[list[str]]:
    return [(await storage.job(i)).result["meta"].get("batch") for i in ids]


def test_batch_group_takes_the_heads_and_never_skips() -> None:
    plans = {"a1": ("x", 2), "b1": ("x", 2), "c1": ("y", 2), "d1": ("x", 2), "e1": None, "big": ("x", 9)}
    assert batch_group(["a1", "b1", "d1"], plans.get, 8) == ["a1", "b1", "d1"]
    assert batch_group(["a1", "b1", "d1"], plans.get, 4) == ["a1", "b1"]  # samples fit batch_max
    assert batch_group(["a1", "c1", "d1"], plans.get, 8) == ["a1"]  # d1 is never taken past c1
    assert batch_group(["a1", "e1", "b1"], plans.get, 8) == ["a1"]
    assert batch_group(["e1", "a1"], plans.get, 8) == ["e1"]
    assert batch_group(["big", "a1"], plans.get, 8) == ["big"]  # too big to share: it runs alone
    assert batch_group(["a1", "b1"], plans.get, 1) == ["a1"]  # batching off
    assert batch_group([], plans.get, 8) == []


def test_planning_a_batch_keeps_torch_out_of_the_service() -> None:
    code = ("import sys; from bot.engine.batching import plan_function; from bot.engine.jobkinds import JobKinds; "
            "kinds = JobKinds(); "
            "print(plan_function(kinds['portrait'].batch)("
            "{'style': {'family': 'sd15', 'sampler': {'steps': 4}}, 'count': 1}, {})[1], "
            "plan_function(kinds['tryon'].batch)({'picture_size': [600, 800], 'count': 1}, {})[1], "
            "plan_function(kinds['template'].batch)({'picture_size': [512, 512], 'count': 2}, {'oversample': 3})[1], "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["2", "2", "6", "False"]


async def test_lone_job_starts_at_once_without_waiting_for_partners(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=8) as sched:
        lone = await sched.submit("u:a", BATCHED, job(tmp_path, "a", steps=20, delay_s=0.02), CHAT)
        await until(lambda: sink.progress[lone.job_id])  # started with room for seven more samples
        later = await sched.submit("u:b", BATCHED, job(tmp_path, "b"), CHAT)
        await until(in_state(storage, [lone.job_id, later.job_id], JobState.DELIVERED))
    assert await batches(storage, [lone.job_id, later.job_id]) == [None, None]  # each ran alone (no batch)
    assert read_ledger(tmp_path / "ledger") == ["a", "b"]


async def test_batches_are_fair_heads_of_the_round_robin(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=2) as sched:
        blocker = await blocked(sched, sink, tmp_path)
        a = [(await sched.submit("u:a", BATCHED, job(tmp_path, f"a{i}"), CHAT)).job_id for i in (1, 2, 3)]
        b = (await sched.submit("u:b", BATCHED, job(tmp_path, "b1"), CHAT)).job_id
        c = (await sched.submit("u:c", BATCHED, job(tmp_path, "c1"), CHAT)).job_id
        await until(in_state(storage, [blocker, *a, b, c], JobState.DELIVERED))
    # User a's three jobs do not crowd b and c out: each pass takes the next heads of the fair order.
    assert await batches(storage, [a[0], b, c, a[1], a[2]]) == [["a1", "b1"], ["a1", "b1"], ["c1", "a2"],
                                                                ["c1", "a2"], None]
    assert sorted(read_ledger(tmp_path / "ledger")) == sorted(["blocker", "a1", "a2", "a3", "b1", "c1"])


async def test_cancel_one_job_of_a_running_batch(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        pid = sched.worker_pids()[0]
        await blocked(sched, sink, tmp_path)
        keep = await sched.submit("u:a", BATCHED, job(tmp_path, "keep", steps=40, delay_s=0.02), CHAT)
        drop = await sched.submit("u:b", BATCHED, job(tmp_path, "drop", steps=40, delay_s=0.02), CHAT)
        await until(lambda: len(sink.progress[drop.job_id]) >= 2 and sink.progress[keep.job_id])
        assert await sched.cancel("u:b", drop.job_id) == [drop.job_id]
        await until(lambda: drop.job_id in sink.cancelled)
        assert (await sched.user_jobs("u:a"))[0].state == JobState.RUNNING  # its partner goes on
        await until(in_state(storage, [keep.job_id], JobState.DELIVERED))
        assert sched.worker_pids() == [pid]
    assert (await storage.job(drop.job_id)).state == JobState.CANCELLED
    assert max(sink.progress[drop.job_id]) < 40 and max(sink.progress[keep.job_id]) == 40
    assert await batches(storage, [keep.job_id]) == [["keep"]]
    assert "drop" not in read_ledger(tmp_path / "ledger") and drop.job_id not in sink.delivered


async def test_one_failing_job_of_a_batch_fails_alone(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        await blocked(sched, sink, tmp_path)
        good = await sched.submit("u:a", BATCHED, job(tmp_path, "good"), CHAT)
        bad = await sched.submit("u:b", BATCHED, job(tmp_path, "bad", fail_code="portrait.no_good_candidates"), CHAT)
        await until(lambda: good.job_id in sink.delivered and bad.job_id in sink.failed)
    assert sink.failed[bad.job_id]["code"] == "portrait.no_good_candidates"
    assert (await storage.job(bad.job_id)).attempts == 1  # a user-facing error: not retried
    assert (await storage.job(good.job_id)).state == JobState.DELIVERED


async def test_sigkill_during_a_batch_retries_each_job_once(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        await blocked(sched, sink, tmp_path)
        ids = [(await sched.submit(f"u:{tag}", BATCHED, job(tmp_path, tag, steps=30, delay_s=0.03), CHAT)).job_id
               for tag in ("a", "b", "c")]
        await until(lambda: all(len(sink.progress[i]) >= 2 for i in ids))
        pid = sched.worker_pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(in_state(storage, ids, JobState.DELIVERED))
        health = sched.health()
    assert health["worker_deaths"] == 1 and health["retried"] == 3
    for job_id in ids:
        row = await storage.job(job_id)
        assert row.attempts == 2 and row.result["meta"]["pid"] != pid
        assert sink.deliver_calls[job_id] == 1
    assert sorted(read_ledger(tmp_path / "ledger")) == ["a", "b", "blocker", "c"]  # nothing generated twice
    assert await batches(storage, ids) == [["a", "b", "c"]] * 3  # the retry batched them again


async def test_metrics_count_batch_sizes_and_pictures_per_second(storage: Storage, tmp_path: Path) -> None:
    metrics = JobMetrics()
    sink = RecordingSink()
    scheduler = Scheduler(storage, make_kinds(), SchedulerSettings(), data_dir=tmp_path / "data",
                          context={"models_dir": str(tmp_path)}, sink=sink, on_event=metrics.observe)
    await scheduler.start()
    try:
        await blocked(scheduler, sink, tmp_path)
        ids = [(await scheduler.submit(f"u:{tag}", BATCHED, job(tmp_path, tag), CHAT)).job_id for tag in "abc"]
        await until(in_state(storage, ids, JobState.DELIVERED))
    finally:
        await scheduler.stop(grace_s=0)
    sample = metrics.registry.get_sample_value
    assert sample("facechain_batch_size_count", {"kind": BATCHED}) == 1  # one pass of three jobs
    assert sample("facechain_batch_size_sum", {"kind": BATCHED}) == 3
    assert sample("facechain_batch_size_bucket", {"kind": BATCHED, "le": "2.0"}) == 0
    assert sample("facechain_batch_size_count", {"kind": "quick"}) == 1
    assert sample("facechain_pictures_total", {"kind": BATCHED}) == 3
    assert sample("facechain_pictures_per_second", {"kind": BATCHED}) == pytest.approx(3 / RATE_WINDOW_S)


def test_picture_rate_forgets_what_left_its_window() -> None:
    now = [1000.0]
    rate = PictureRate(clock=lambda: now[0])
    rate.add("portrait", 4)
    now[0] += RATE_WINDOW_S / 2
    rate.add("portrait", 2)
    rate.add("tryon", 1)
    assert {s.labels["kind"]: s.value for m in rate.collect() for s in m.samples} == {
        "portrait": pytest.approx(6 / RATE_WINDOW_S), "tryon": pytest.approx(1 / RATE_WINDOW_S)}
    now[0] += RATE_WINDOW_S * 0.75
    assert {s.labels["kind"]: s.value for m in rate.collect() for s in m.samples} == {
        "portrait": pytest.approx(2 / RATE_WINDOW_S), "tryon": pytest.approx(1 / RATE_WINDOW_S)}
