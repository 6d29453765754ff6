"""Placement rules, the preference for a worker holding a job's base, the memory budget reaching the
worker, and CUDA out-of-memory handling (injected by the devtools pipeline), on the local backend."""
from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import PlacementRule
from bot.engine.backends.base import SlotInfo
from bot.engine.placement import allowed
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from handlers.messages import catalogue
from tests.test_scheduler import CHAT, RecordingSink, in_state, params, running, storage, until  # noqa: F401, F811


def test_rules_match_gpu_index_memory_and_labels() -> None:
    big = SlotInfo("cuda:2", "cuda:0", gpu_index=2, gpu_memory_mb=81920, labels={"tier": "big"})
    small = SlotInfo("cuda:0", "cuda:0", gpu_index=0, gpu_memory_mb=24576)
    unknown = SlotInfo("cuda:1", "cuda:0", gpu_index=1)
    cpu = SlotInfo("cpu", "cpu")
    rules = [PlacementRule(kinds=["train"], gpus=[2, 3]), PlacementRule(kinds=["portrait"], min_memory_mb=40000),
             PlacementRule(kinds=["portrait"], labels={"tier": "big"})]
    assert [allowed("train", s, rules) for s in (big, small, unknown, cpu)] == [True, False, False, False]
    assert [allowed("portrait", s, rules) for s in (big, small, unknown, cpu)] == [True, False, False, False]
    assert all(allowed("cartoon", s, rules) for s in (big, small, unknown, cpu))  # named by no rule
    no_models = SlotInfo("ray:x/0", "cuda:0", gpu_index=0, gpu_memory_mb=81920, kinds=frozenset({"cartoon"}))
    assert not allowed("train", no_models, []) and allowed("cartoon", no_models, [])


async def test_a_pinned_kind_runs_only_on_its_gpu(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    rules = [PlacementRule(kinds=["quick"], gpus=[1])]
    async with running(storage, tmp_path, sink, devices=["cpu", "cuda:1"], placement=rules) as sched:
        subs = [await sched.submit(f"u:{i}", "quick", params(tmp_path, f"q{i}", delay_s=0.1), CHAT) for i in range(3)]
        await until(in_state(storage, [s.job_id for s in subs], JobState.DELIVERED))
    for sub in subs:
        assert (await storage.job(sub.job_id)).result["meta"]["cuda_visible_devices"] == "1"


async def test_an_idle_worker_holding_the_job_s_base_is_preferred(storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()

    def family(tag: str, name: str, **extra: object) -> dict:
        return params(tmp_path, tag, style={"family": name}, **extra)

    async with running(storage, tmp_path, sink, devices=["cpu", "cpu"]) as sched:
        first = await sched.submit("u:a", "quick", family("a", "sd15", delay_s=0.2), CHAT)
        second = await sched.submit("u:b", "quick", family("b", "sdxl", delay_s=0.2), CHAT)
        await until(in_state(storage, [first.job_id, second.job_id], JobState.DELIVERED))
        sd15_pid = (await storage.job(first.job_id)).result["meta"]["pid"]
        sdxl_pid = (await storage.job(second.job_id)).result["meta"]["pid"]
        assert sd15_pid != sdxl_pid
        for tag, name, pid in (("c", "sdxl", sdxl_pid), ("d", "sd15", sd15_pid), ("e", "sdxl", sdxl_pid)):
            sub = await sched.submit("u:c", "quick", family(tag, name), CHAT)
            await until(in_state(storage, [sub.job_id], JobState.DELIVERED))
            assert (await storage.job(sub.job_id)).result["meta"]["pid"] == pid


async def test_memory_budget_reaches_the_worker_and_oom_retries_smaller_then_fails_clearly(
        storage: Storage, tmp_path: Path) -> None:
    sink = RecordingSink()
    async with running(storage, tmp_path, sink, memory_budget_mb=1234) as sched:
        (pid,) = sched.worker_pids()
        once = await sched.submit("u:a", "quick", params(tmp_path, "once", oom_times=1), CHAT)
        await until(in_state(storage, [once.job_id], JobState.DELIVERED))
        always = await sched.submit("u:b", "quick", params(tmp_path, "always", oom_always=True), CHAT)
        await until(lambda: always.job_id in sink.failed)
        after = await sched.submit("u:c", "quick", params(tmp_path, "after"), CHAT)
        await until(lambda: after.job_id in sink.delivered)
        assert sched.worker_pids() == [pid]  # the worker stayed up throughout
    meta = (await storage.job(once.job_id)).result["meta"]
    assert meta["memory_budget_mb"] == 1234
    # Out of memory once: the resident base was evicted and built again, the retry ran with smaller batches.
    assert meta["ooms"] == 1 and meta["low_memory"] and meta["resident_builds"] == 2
    assert (await storage.job(once.job_id)).attempts == 1
    assert sink.failed[always.job_id] == {"code": "job.out_of_memory", "details": {}}
    assert (await storage.job(always.job_id)).attempts == 1  # a clear failure, not a crash retried
    assert set(catalogue()["job.out_of_memory"]) >= {"en", "zh"}
    assert read_ledger(tmp_path / "ledger") == ["once", "after"]



async def test_a_kind_no_worker_may_run_is_named_at_start(storage: Storage, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    rules = [PlacementRule(kinds=["train"], gpus=[7]), PlacementRule(kinds=["nope"])]
    async with running(storage, tmp_path, RecordingSink(), placement=rules):
        pass
    messages = [r.getMessage() for r in caplog.records]
    assert "scheduler.placement names 'nope', which is no job kind" in messages
    assert any(m.startswith("no worker may run 'train' jobs") for m in messages)
    assert not any("'quick'" in m for m in messages)
