"""The Ray backend on a two-node cluster (tests/fixtures/ray_cluster.py), with the devtools SleepPipeline.

Jobs run in the named worker actors and come back as bytes written under data_dir; placement rules and
missing models keep kinds off a node; cancel reaches a remote job; a node removed mid-job has its job
retried on the other node, resumed from the checkpoint that came back, and delivered once.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import PlacementRule, SchedulerSettings
from bot.engine.backends import create_backend
from bot.engine.backends import ray_backend
from bot.engine.backends.ray_backend import RayBackend
from bot.engine.backends.ray_host import HOST_PROTOCOL
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.engine.scheduler import Scheduler
from bot.storage import JobState, Storage
from facechain_core.devtools import read_ledger
from tests.fixtures.ray_cluster import GPU, MODEL_FILE, NAMESPACE, NODE_SECRET, RayWorld
from tests.test_scheduler import CHAT, PIPELINE, RecordingSink, in_state, make_kinds, params, storage, until  # noqa: F401, F811

TIMEOUT_S = 90.0


def ray_kinds() -> JobKinds:
    kinds = make_kinds()
    kinds.register(JobKind("big_only", PIPELINE, GENERATE, max_tries=2, timeout_s=60))
    kinds.register(JobKind("pinned_small", PIPELINE, GENERATE, max_tries=2, timeout_s=60))
    kinds.register(JobKind("needs_model", PIPELINE, GENERATE, max_tries=2, timeout_s=60, needs=(("yunet", "selfie"),)))
    return kinds


RULES = [PlacementRule(kinds=["big_only"], labels={"tier": "big"}),
         PlacementRule(kinds=["pinned_small"], labels={"tier": "small"})]


@contextlib.asynccontextmanager
async def ray_running(storage: Storage, tmp_path: Path, sink: RecordingSink, secrets: tuple[str, ...] = (),
                      **settings: Any) -> AsyncIterator[tuple[Scheduler, RayBackend]]:
    """A scheduler on the Ray backend; jobs' files live under tmp_path/data, which no node is told of."""
    config = SchedulerSettings(backend="ray", ray_gpu_resource=GPU, ray_namespace=NAMESPACE,
                               placement=settings.pop("placement", RULES), **settings)
    kinds = ray_kinds()
    context = {"models_dir": str(tmp_path / "no-models"), "settings": {"model_paths": {"yunet": MODEL_FILE}}}
    backend = create_backend(config, context, data_dir=tmp_path / "data", devices=["cpu"], kind_needs=kinds.needs(),
                             secrets=secrets)
    assert isinstance(backend, RayBackend)
    scheduler = Scheduler(storage, kinds, config, data_dir=tmp_path / "data", context=context, sink=sink,
                          backend=backend)
    await scheduler.start()
    try:
        yield scheduler, backend
    finally:
        await scheduler.stop(grace_s=0)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


async def test_jobs_run_in_actors_on_both_nodes_with_inputs_as_bytes(
        storage: Storage, tmp_path: Path, ray_world: RayWorld) -> None:
    data = (tmp_path / "data").resolve()
    selfie = data / "users" / "u:0" / "selfie.txt"
    selfie.parent.mkdir(parents=True)
    selfie.write_text("face bytes")
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, backend):
        assert {s.info.node for s in backend.slots} == {ray_world.head_id, ray_world.big_id}
        identity = data / "users" / "u:1" / "identity.npz"  # an output outside out_dir, not there yet
        subs = [await sched.submit(f"u:{i}", "quick", params(tmp_path, f"p{i}", steps=4, delay_s=0.3,
                                                             copy_from=str(selfie), echo_params=True,
                                                             **({"out": str(identity)} if i else {})), CHAT)
                for i in range(2)]
        await until(in_state(storage, [s.job_id for s in subs], JobState.DELIVERED), TIMEOUT_S)
        again = await sched.submit("u:0", "quick", params(tmp_path, "again", copy_from=str(selfie)), CHAT)
        await until(in_state(storage, [again.job_id], JobState.DELIVERED), TIMEOUT_S)
    one, two = [await storage.job(s.job_id) for s in subs]
    assert {one.result["meta"]["node"], two.result["meta"]["node"]} == {ray_world.head_id, ray_world.big_id}
    assert all(j.result["meta"]["actor"].startswith("facechain-worker-") for j in (one, two))
    assert two.started_at < one.finished_at and one.started_at < two.finished_at  # in parallel
    assert identity.read_text() == "p1" and sink.delivered[two.id][1].path == str(identity)
    for job in (one, two):
        artifact = sink.delivered[job.id][0]
        expected = data / "users" / job.user_key / "jobs" / str(job.id) / f"{job.params['tag']}.txt"
        assert Path(artifact.path) == expected and expected.read_text() == f"{job.params['tag']}\nface bytes"
        seen = _strings(job.result["meta"]["params"])
        assert seen and not [s for s in seen if s.startswith(str(data))]  # nothing points into data_dir
    # The selfie went once to each node; the third job found it in its node's cache.
    assert backend.counters["inputs_sent"] == 2 and backend.counters["inputs_cached"] == 1
    assert read_ledger(tmp_path / "ledger").count("p0") == 1


async def test_placement_rules_and_missing_models_keep_kinds_off_a_node(
        storage: Storage, tmp_path: Path, ray_world: RayWorld) -> None:
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, backend):
        kinds_by_node = {s.info.node: s.info.kinds for s in backend.slots}
        assert "needs_model" in kinds_by_node[ray_world.head_id]
        assert "needs_model" not in kinds_by_node[ray_world.big_id]  # its models_dir lacks the model
        subs = [await sched.submit(f"u:{kind}{i}", kind, params(tmp_path, f"{kind}{i}", steps=2, delay_s=0.1), CHAT)
                for kind in ("big_only", "needs_model") for i in range(2)]
        await until(in_state(storage, [s.job_id for s in subs], JobState.DELIVERED), TIMEOUT_S)
    jobs = [await storage.job(s.job_id) for s in subs]
    assert {j.kind: set() for j in jobs}.keys() == {"big_only", "needs_model"}
    for job in jobs:
        assert job.result["meta"]["node"] == (ray_world.big_id if job.kind == "big_only" else ray_world.head_id)


async def test_a_remote_worker_has_no_secret_of_its_node_s_environment(
        storage: Storage, tmp_path: Path, ray_world: RayWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_TOKEN_COPY", NODE_SECRET)  # a configured secret under a name no rule guesses
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink, secrets=(NODE_SECRET,)) as (sched, backend):
        (head,) = [s for s in backend.slots if s.info.node == ray_world.head_id]
        environ = Path(f"/proc/{head.pid}/environ").read_bytes()  # the nodes run on this machine
    assert b"PYTHONUNBUFFERED=1" in environ and b"FACECHAIN_MODELS_DIR=" in environ  # the worker's own
    for leaked in (NODE_SECRET, "FACECHAIN_TELEGRAM_TOKEN", "BOT_TOKEN_COPY"):
        assert leaked.encode() not in environ


async def test_cancel_reaches_a_remote_job(storage: Storage, tmp_path: Path, ray_world: RayWorld) -> None:
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, _):
        long = await sched.submit("u:a", "big_only", params(tmp_path, "long", steps=300, delay_s=0.02), CHAT)
        await until(lambda: len(sink.progress[long.job_id]) >= 2, TIMEOUT_S)
        assert await sched.cancel("u:a", long.job_id) == [long.job_id]
        await until(lambda: long.job_id in sink.cancelled, TIMEOUT_S)
        after = await sched.submit("u:a", "big_only", params(tmp_path, "after"), CHAT)
        await until(lambda: after.job_id in sink.delivered, TIMEOUT_S)
    assert max(sink.progress[long.job_id]) < 300
    assert (await storage.job(long.job_id)).state == JobState.CANCELLED
    assert read_ledger(tmp_path / "ledger") == ["after"]


async def test_a_killed_actor_is_recreated_and_a_restarted_bot_reattaches(
        storage: Storage, tmp_path: Path, ray_world: RayWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, backend):
        (big,) = [s for s in backend.slots if s.info.node == ray_world.big_id]
        name = backend.actor_name(big)
        victim = await sched.submit("u:a", "big_only", params(tmp_path, "victim", steps=40, delay_s=0.05), CHAT)
        await until(lambda: len(sink.progress[victim.job_id]) >= 2, TIMEOUT_S)
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        await until(in_state(storage, [victim.job_id], JobState.DELIVERED), TIMEOUT_S)
        assert sched.health()["worker_deaths"] == 1 and not big.gone
        recreated = ray.get_actor(name, namespace=NAMESPACE)._actor_id.hex()
    job = await storage.job(victim.job_id)
    assert job.attempts == 2 and job.result["meta"]["actor"] == name and job.result["meta"]["node"] == ray_world.big_id
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, backend):  # the bot restarted
        after = await sched.submit("u:a", "big_only", params(tmp_path, "after"), CHAT)
        await until(in_state(storage, [after.job_id], JobState.DELIVERED), TIMEOUT_S)
        assert ray.get_actor(name, namespace=NAMESPACE)._actor_id.hex() == recreated  # the same actor, found again
    assert (await storage.job(after.job_id)).result["meta"]["actor"] == name
    assert read_ledger(tmp_path / "ledger") == ["victim", "after"]
    monkeypatch.setattr(ray_backend, "HOST_PROTOCOL", HOST_PROTOCOL + 1)  # the bot was upgraded, its actors were not
    sink = RecordingSink()
    async with ray_running(storage, tmp_path, sink) as (sched, backend):
        upgraded = await sched.submit("u:a", "big_only", params(tmp_path, "upgraded"), CHAT)
        await until(in_state(storage, [upgraded.job_id], JobState.DELIVERED), TIMEOUT_S)
        assert ray.get_actor(name, namespace=NAMESPACE)._actor_id.hex() != recreated  # replaced, not reattached
    assert read_ledger(tmp_path / "ledger") == ["victim", "after", "upgraded"]


async def test_a_removed_node_s_job_resumes_from_its_checkpoint_on_the_other_node_once(
        storage: Storage, tmp_path: Path, ray_world: RayWorld) -> None:
    sink = RecordingSink()
    try:
        async with ray_running(storage, tmp_path, sink) as (sched, _):
            blocker = await sched.submit("u:b", "pinned_small", params(tmp_path, "blocker", steps=40, delay_s=0.1), CHAT)
            await until(lambda: sink.progress[blocker.job_id], TIMEOUT_S)
            train = await sched.submit("u:a", "train", params(tmp_path, "long", steps=40, delay_s=0.05, yield_every=5,
                                                              checkpoint=True), CHAT)
            job = await storage.job(train.job_id)
            checkpoint = sched.job_dir(job) / "checkpoint" / "step.txt"
            await until(lambda: checkpoint.exists() and int(checkpoint.read_text()) >= 10, TIMEOUT_S)
            ray_world.cluster.remove_node(ray_world.big)
            await until(in_state(storage, [train.job_id, blocker.job_id], JobState.DELIVERED), TIMEOUT_S)
            assert any(s.gone for s in sched._backend.slots)
    finally:
        ray_world.add_big()
    job = await storage.job(train.job_id)
    assert job.attempts == 2 and job.result["meta"]["node"] == ray_world.head_id
    assert job.result["meta"]["resumed_from"] >= 10 and job.result["meta"]["steps_done"] == 40
    assert sink.deliver_calls[train.job_id] == 1
    assert sorted(read_ledger(tmp_path / "ledger")) == ["blocker", "long"]
