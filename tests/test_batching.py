"""Cross-user batching in the scheduler and worker, with the devtools SleepPipeline (no models)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from bot.engine.batching import batch_group
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
import bot.engine.scheduler as scheduler_module
from bot.engine.scheduler import Scheduler
from bot.ops.metrics import RATE_WINDOW_S, JobMetrics, PictureRate
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from tests.test_scheduler import CHAT, PIPELINE, RecordingSink, backend, in_state, params, storage, until  # noqa: F401
from tests.test_scheduler import running as scheduler_running

BATCHED = "sample"  # a kind whose jobs share passes (devtools.sleep_batch_plan)
WAIT_S = 30.0  # Ray messages take a few hops more than a local worker's


def make_kinds() -> JobKinds:
    kinds = JobKinds(())
    kinds.register(JobKind(BATCHED, PIPELINE, GENERATE, max_tries=2, timeout_s=30,
                           batch="facechain_core.devtools:sleep_batch_plan"))
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    return kinds


def running(storage: Storage, tmp_path: Path, sink: RecordingSink, backend: str = "local",
            on_event: Callable[..., None] | None = None, **settings: Any) -> AbstractAsyncContextManager[Scheduler]:
    """tests/test_scheduler.py's running scheduler, with this file's kinds."""
    return scheduler_running(storage, tmp_path, sink, backend=backend, kinds=make_kinds(), on_event=on_event,
                             **settings)


def job(tmp_path: Path, tag: str, **extra: Any) -> dict[str, Any]:
    return params(tmp_path, tag, batch_key="studio", **extra)


@contextlib.asynccontextmanager
async def blocked(sched: Scheduler, tmp_path: Path) -> AsyncIterator[int]:
    """Holds the worker with an unbatched job (paused at its first step) until the block ends, so the jobs
    submitted inside queue up behind it and the next pass takes them together."""
    pause = tmp_path / "pause"
    pause.mkdir(exist_ok=True)
    blocker = await sched.submit("u:x", "quick", params(tmp_path, "blocker", pause_at=1, pause_dir=str(pause)), CHAT)
    await until(lambda: (pause / "blocker.paused").exists(), WAIT_S)
    try:
        yield blocker.job_id
    finally:
        (pause / "blocker.go").touch()


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


async def test_jobs_submitted_together_share_the_first_pass_where_a_pass_costs_no_more(
        storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=8) as sched:
        # One sleep per step for the whole batch, as a GPU's pass: the scheduler learns a pass of three
        # samples costs what one does.
        slow = {"steps": 4, "delay_s": 0.1}
        async with blocked(sched, tmp_path):
            learn = [(await sched.submit(f"u:{t}", BATCHED, job(tmp_path, t, **slow), CHAT)).job_id
                     for t in ("l1", "l2", "l3")]
        await until(in_state(storage, learn, JobState.DELIVERED))
        lone = await sched.submit("u:l", BATCHED, job(tmp_path, "l4", **slow), CHAT)
        await until(in_state(storage, [lone.job_id], JobState.DELIVERED))
        # Submitted in one moment (a burst of users): the first does not start alone ahead of its partners.
        submitted = await asyncio.gather(*(sched.submit(f"u:{tag}", BATCHED, job(tmp_path, tag, **slow), CHAT)
                                           for tag in "abc"))
        ids = [s.job_id for s in submitted]
        await until(in_state(storage, ids, JobState.DELIVERED))
    assert await batches(storage, [*learn, lone.job_id]) == [["l1", "l2", "l3"]] * 3 + [None]
    assert await batches(storage, ids) == [["a", "b", "c"]] * 3
    assert sorted(read_ledger(tmp_path / "ledger")) == ["a", "b", "blocker", "c", "l1", "l2", "l3", "l4"]


async def test_where_a_bigger_pass_costs_more_the_first_job_does_not_wait_for_partners(
        storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=8) as sched:
        # As a CPU: a pass's time grows with its samples (three take 2.4 times one; two would be within 1.2).
        sched._pass_s.update({(BATCHED, 1): 1.0, (BATCHED, 2): 1.1, (BATCHED, 3): 2.4, (BATCHED, 4): 1.15})
        assert sched._first_pass_cap(BATCHED, 1) == 2 and sched._first_pass_cap(BATCHED, 5) == 5
        for seconds in (60.0, 2.3, 2.5):  # the first pass loaded the pipeline: soon outvoted
            sched._learn_pass(BATCHED, 3, seconds)
        assert sched._pass_s[(BATCHED, 3)] == 2.5
        del sched._pass_s[(BATCHED, 2)]
        submitted = await asyncio.gather(*(sched.submit(f"u:{tag}", BATCHED, job(tmp_path, tag), CHAT)
                                           for tag in "abc"))
        ids = [s.job_id for s in submitted]
        await until(in_state(storage, ids, JobState.DELIVERED))
    # The first user's job ran at once by itself; the partners that arrived with it shared the next pass.
    assert await batches(storage, ids) == [None, ["b", "c"], ["b", "c"]]


async def test_a_lone_job_is_picked_without_waiting_and_a_hung_submit_is_not_waited_out(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "ARRIVAL_WAIT_S", 0.2)
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=8) as sched:
        # Nothing under way: the pump forms the pass at once, without giving the event loop a turn.
        waiting = sched._await_arrivals()
        with pytest.raises(StopIteration):
            waiting.send(None)
        # A submit that never lands (a hung database) holds a lone job back only for the cap, where a pass
        # of two would cost what one does (so the pump waits for arrivals at all).
        sched._pass_s.update({(BATCHED, 1): 1.0, (BATCHED, 2): 1.0})
        hung = asyncio.get_running_loop().create_future()
        sched._arriving.add(hung)
        lone = await sched.submit("u:a", BATCHED, job(tmp_path, "a"), CHAT)
        await until(in_state(storage, [lone.job_id], JobState.DELIVERED), timeout=5)
        sched._arriving.discard(hung)
    assert await batches(storage, [lone.job_id]) == [None]


async def test_batches_are_fair_heads_of_the_round_robin(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, batch_max=2) as sched:
        async with blocked(sched, tmp_path) as blocker:
            a = [(await sched.submit("u:a", BATCHED, job(tmp_path, f"a{i}"), CHAT)).job_id for i in (1, 2, 3)]
            b = (await sched.submit("u:b", BATCHED, job(tmp_path, "b1"), CHAT)).job_id
            c = (await sched.submit("u:c", BATCHED, job(tmp_path, "c1"), CHAT)).job_id
        await until(in_state(storage, [blocker, *a, b, c], JobState.DELIVERED))
    # User a's three jobs do not crowd b and c out: each pass takes the next heads of the fair order.
    assert await batches(storage, [a[0], b, c, a[1], a[2]]) == [["a1", "b1"], ["a1", "b1"], ["c1", "a2"],
                                                                ["c1", "a2"], None]
    assert sorted(read_ledger(tmp_path / "ledger")) == sorted(["blocker", "a1", "a2", "a3", "b1", "c1"])


async def test_several_users_share_one_pass_each_with_its_own_inputs_and_pictures(
        storage: Storage, tmp_path: Path, backend: str) -> None:
    data = (tmp_path / "data").resolve()
    selfies = {}
    for user in "ab":
        selfies[user] = data / "users" / f"u:{user}" / "selfie.txt"
        selfies[user].parent.mkdir(parents=True)
        selfies[user].write_text(f"face of {user}")
    metrics = JobMetrics()
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend, on_event=metrics.observe) as sched:
        async with blocked(sched, tmp_path):
            ids = [(await sched.submit(f"u:{tag[0]}", BATCHED, job(tmp_path, tag, copy_from=str(selfies[tag[0]])),
                                       CHAT)).job_id for tag in ("a1", "b1", "a2")]
        await until(in_state(storage, ids, JobState.DELIVERED), WAIT_S)
        counters = dict(getattr(sched._backend, "counters", {}))
    sample = metrics.registry.get_sample_value
    assert sample("facechain_batch_size_count", {"kind": BATCHED}) == 1  # one pass of three jobs
    assert sample("facechain_batch_size_sum", {"kind": BATCHED}) == 3
    for job_id in ids:
        row = await storage.job(job_id)
        tag = row.params["tag"]
        assert row.result["meta"]["batch"] == ["a1", "b1", "a2"] and row.attempts == 1
        (artifact,) = sink.delivered[job_id]
        assert artifact.owner_key == row.user_key
        expected = data / "users" / row.user_key / "jobs" / str(job_id) / f"{tag}.txt"
        assert Path(artifact.path) == expected and expected.read_text() == f"{tag}\nface of {tag[0]}"
        if backend == "ray":
            assert row.result["meta"]["actor"].startswith("facechain-worker-") and row.result["meta"]["node"]
    if backend == "ray":  # a's selfie went once for her two jobs: one call (one look-up) for the batch
        assert counters["inputs_sent"] == 2 and counters["inputs_cached"] == 0
    assert sorted(read_ledger(tmp_path / "ledger")) == ["a1", "a2", "b1", "blocker"]


async def test_cancel_one_job_of_a_running_batch(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend) as sched:
        pid = sched.worker_pids()[0]
        async with blocked(sched, tmp_path):
            keep = await sched.submit("u:a", BATCHED, job(tmp_path, "keep", steps=40, delay_s=0.05), CHAT)
            drop = await sched.submit("u:b", BATCHED, job(tmp_path, "drop", steps=40, delay_s=0.05), CHAT)
        await until(lambda: len(sink.progress[drop.job_id]) >= 2 and sink.progress[keep.job_id], WAIT_S)
        assert await sched.cancel("u:b", drop.job_id) == [drop.job_id]
        await until(lambda: drop.job_id in sink.cancelled, WAIT_S)
        assert (await sched.user_jobs("u:a"))[0].state == JobState.RUNNING  # its partner goes on
        await until(in_state(storage, [keep.job_id], JobState.DELIVERED), WAIT_S)
        assert sched.worker_pids() == [pid]
    assert (await storage.job(drop.job_id)).state == JobState.CANCELLED
    assert max(sink.progress[drop.job_id]) < 40 and max(sink.progress[keep.job_id]) == 40
    assert await batches(storage, [keep.job_id]) == [["keep"]]
    assert "drop" not in read_ledger(tmp_path / "ledger") and drop.job_id not in sink.delivered


async def test_one_failing_job_of_a_batch_fails_alone(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink) as sched:
        async with blocked(sched, tmp_path):
            good = await sched.submit("u:a", BATCHED, job(tmp_path, "good"), CHAT)
            bad = await sched.submit("u:b", BATCHED, job(tmp_path, "bad", fail_code="portrait.no_good_candidates"),
                                     CHAT)
        await until(lambda: good.job_id in sink.delivered and bad.job_id in sink.failed)
    assert sink.failed[bad.job_id]["code"] == "portrait.no_good_candidates"
    assert (await storage.job(bad.job_id)).attempts == 1  # a user-facing error: not retried
    assert (await storage.job(good.job_id)).state == JobState.DELIVERED


async def test_sigkill_during_a_batch_retries_each_job_once(storage: Storage, tmp_path: Path, backend: str) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, backend) as sched:
        async with blocked(sched, tmp_path):
            ids = [(await sched.submit(f"u:{tag}", BATCHED, job(tmp_path, tag, steps=30, delay_s=0.05), CHAT)).job_id
                   for tag in ("a", "b", "c")]
        await until(lambda: all(len(sink.progress[i]) >= 2 for i in ids), WAIT_S)
        pid = sched.worker_pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # a Ray node's worker runs on this machine too
        await until(in_state(storage, ids, JobState.DELIVERED), WAIT_S)
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
    async with running(storage, tmp_path, sink, on_event=metrics.observe) as scheduler:
        async with blocked(scheduler, tmp_path):
            ids = [(await scheduler.submit(f"u:{tag}", BATCHED, job(tmp_path, tag), CHAT)).job_id for tag in "abc"]
        await until(in_state(storage, ids, JobState.DELIVERED))
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
