"""The Ray backend against a head of its own (tests/fixtures/ray_head.py) that is down at the start, killed
while a job runs and others wait, and started again at the same address: the bot waits for it, leaves
the lost cluster, joins the restarted one, puts a worker on its new node, and every job is delivered
once, the interrupted one without a try used. The same through Ray Client (``ray://``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import SchedulerSettings
from bot.engine.backends import create_backend, ray_backend, ray_head
from bot.engine.backends.ray_backend import RayBackend
from bot.engine.backends.ray_head import HeadLink
from bot.engine.scheduler import Scheduler
from bot.storage import JobState, Storage
from tests.fixtures.ray_cluster import GPU, NAMESPACE, ray_or_skip
from tests.fixtures.ray_head import RayHead, own_driver  # noqa: F401
from tests.test_scheduler import CHAT, RecordingSink, in_state, make_kinds, params, storage, until  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150), pytest.mark.usefixtures("own_driver")]
WAIT_S = 60.0


@contextlib.asynccontextmanager
async def bot_on(head: RayHead, storage: Storage, tmp_path: Path, sink: RecordingSink,
                 started: bool = True) -> AsyncIterator[tuple[Scheduler, RayBackend, asyncio.Future[None]]]:
    """A scheduler on the Ray backend joined to `head`; its start is awaited only when `started`."""
    config = SchedulerSettings(backend="ray", ray_address=head.address, ray_gpu_resource=GPU, ray_namespace=NAMESPACE)
    kinds = make_kinds()
    context: dict[str, Any] = {"models_dir": str(tmp_path / "no-models"), "settings": {}}
    backend = create_backend(config, context, data_dir=tmp_path / "data", devices=["cpu"], kind_needs=kinds.needs())
    assert isinstance(backend, RayBackend)
    scheduler = Scheduler(storage, kinds, config, data_dir=tmp_path / "data", context=context, sink=sink,
                          backend=backend)
    starting = asyncio.ensure_future(scheduler.start())
    try:
        if started:
            await asyncio.wait_for(asyncio.shield(starting), WAIT_S)
        yield scheduler, backend, starting
    finally:
        if not starting.done():
            starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await scheduler.stop(grace_s=0)
        backend.destroy_actors()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tries to reach the head every second (the service backs off to 30 s)."""
    monkeypatch.setattr(ray_head, "CONNECT_RETRY_S", (1,))


@pytest.fixture
def head(tmp_path: Path) -> Any:
    head = RayHead(tmp_path / "models")
    yield head
    ray_or_skip().shutdown()  # while the head is up: later it waits for it (5 s)
    head.close()


async def test_a_restarted_head_s_running_and_queued_jobs_go_on_and_are_delivered_once(
        storage: Storage, tmp_path: Path, head: RayHead, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bot.engine.backends")
    sink = RecordingSink()
    async with bot_on(head, storage, tmp_path, sink, started=False) as (sched, backend, starting):
        # The head is not up yet: the start waits for it, one line a try, instead of failing.
        await until(lambda: "cannot be reached" in caplog.text, WAIT_S)
        assert not starting.done()
        head.start()
        await asyncio.wait_for(asyncio.shield(starting), WAIT_S)
        (first,) = backend.slots
        running = await sched.submit("u:a", "quick", params(tmp_path, "running", steps=100, delay_s=0.05), CHAT)
        queued = [await sched.submit(f"u:{tag}", "quick", params(tmp_path, tag), CHAT) for tag in ("b", "c")]
        await until(lambda: len(sink.progress[running.job_id]) >= 2, WAIT_S)

        head.kill()
        await until(lambda: backend.head_losses == 1, WAIT_S)
        await until(in_state(storage, [running.job_id], JobState.QUEUED), WAIT_S)  # back in the queue
        assert first.gone and not first.ready
        head.start()  # the same address, a new cluster: a new node id, no actor of the old one
        ids = [running.job_id] + [q.job_id for q in queued]
        await until(in_state(storage, ids, JobState.DELIVERED), 2 * WAIT_S)
        (second,) = [s for s in backend.slots if not s.gone]
        actor = backend.actor_name(second)
    assert second.info.node != first.info.node
    for job_id in ids:
        job = await storage.job(job_id)
        assert sink.deliver_calls[job_id] == 1
        assert job.result["meta"]["node"] == second.info.node and job.result["meta"]["actor"] == actor
    assert (await storage.job(running.job_id)).attempts == 1  # the head's loss used no try of the job
    assert caplog.text.count("Ray head lost") == 1 and "Ray head back" in caplog.text


async def test_a_head_restarted_before_the_bot_noticed_is_told_by_its_cluster_id_and_joined_again(
        head: RayHead) -> None:
    head.start()
    link = HeadLink(ray_or_skip(), head.address, NAMESPACE)
    await asyncio.wait_for(link.connect(), WAIT_S)
    (before,) = await asyncio.to_thread(link.nodes)
    assert await link.lost() is None
    head.kill()
    head.start()  # back at the same address before anything asked: a new cluster
    await until(lambda: _at_least(head, 1), WAIT_S)
    why = await link.lost()
    assert why is not None and "WrongClusterID" in why  # an error, not an abort of this process
    await asyncio.wait_for(link.reconnect(), WAIT_S)
    (after,) = await asyncio.to_thread(link.nodes)
    assert after["NodeID"] != before["NodeID"] and after["Alive"] and after["Resources"][GPU] == 1
    assert await link.lost() is None


async def test_a_bot_stopped_while_its_head_is_down_stops_at_once_and_its_jobs_go_on_after_a_restart(
        storage: Storage, tmp_path: Path, head: RayHead) -> None:
    head.start()
    sink = RecordingSink()
    async with bot_on(head, storage, tmp_path, sink) as (sched, backend, _):
        running = await sched.submit("u:a", "quick", params(tmp_path, "running", steps=120, delay_s=0.05), CHAT)
        queued = await sched.submit("u:b", "quick", params(tmp_path, "queued"), CHAT)
        await until(lambda: len(sink.progress[running.job_id]) >= 2, WAIT_S)
        head.kill()
        await until(lambda: backend.head_losses == 1, WAIT_S)
        stopping = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - stopping < 15  # no wait for a head that is not there
    ids = [running.job_id, queued.job_id]
    assert [(await storage.job(i)).state for i in ids] == [JobState.QUEUED] * 2
    head.start()
    sink = RecordingSink()
    async with bot_on(head, storage, tmp_path, sink) as (sched, backend, _):  # the bot started again
        await until(in_state(storage, ids, JobState.DELIVERED), 2 * WAIT_S)
    assert all(sink.deliver_calls[i] == 1 for i in ids)
    assert (await storage.job(running.job_id)).attempts == 1


async def test_a_gpu_machine_outliving_its_head_stops_its_job_and_serves_the_restarted_head(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing fails on the node: the head's loss is seen when looking for nodes (every 5 s).
    monkeypatch.setattr(ray_backend, "DISCOVER_EVERY_S", 1.0)
    head = RayHead(tmp_path / "models", gpus=0)  # the GPU is on the other "machine"
    head.start()
    head.start_node()
    sink = RecordingSink()
    try:
        await until(lambda: _at_least(head, 2), WAIT_S)  # the bot starts once a GPU is there
        async with bot_on(head, storage, tmp_path, sink) as (sched, backend, _):
            (first,) = backend.slots
            running = await sched.submit("u:a", "quick", params(tmp_path, "running", steps=120, delay_s=0.05), CHAT)
            queued = await sched.submit("u:b", "quick", params(tmp_path, "queued"), CHAT)
            await until(lambda: len(sink.progress[running.job_id]) >= 2, WAIT_S)
            worker_pid = first.pid
            assert worker_pid is not None and _alive(worker_pid)
            head.kill()  # the node's raylet lives on for a while, its worker too, unless the bot stops it
            await until(lambda: backend.head_losses == 1, WAIT_S)
            await until(lambda: not _alive(worker_pid), WAIT_S)
            await until(in_state(storage, [running.job_id], JobState.QUEUED), WAIT_S)
            head.kill_node()  # what a restart policy does with a node whose head went
            head.start()
            head.start_node()
            ids = [running.job_id, queued.job_id]
            await until(in_state(storage, ids, JobState.DELIVERED), 2 * WAIT_S)
            (second,) = [s for s in backend.slots if not s.gone]
    finally:
        ray_or_skip().shutdown()  # while the head is up: later it waits for it (5 s)
        head.close()
    assert second.info.node != first.info.node
    for job_id in ids:
        assert sink.deliver_calls[job_id] == 1
        assert (await storage.job(job_id)).result["meta"]["node"] == second.info.node
    assert (await storage.job(running.job_id)).attempts == 1


async def _at_least(head: RayHead, nodes: int) -> bool:
    return await asyncio.to_thread(head.node_count) >= nodes


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def test_the_backend_works_through_ray_client(storage: Storage, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import grpc  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray Client needs grpcio but CI=true: install the extra (pip install '.[ray]')")
        pytest.skip("Ray Client (ray://) needs grpcio, which the ray extra installs (pip install '.[ray]')")
    monkeypatch.setenv("RAY_CLIENT_RECONNECT_GRACE_PERIOD", "3")  # Ray's 30 s, shortened: the head is killed
    head = RayHead(tmp_path / "models", client=True)
    head.start()
    sink = RecordingSink()
    try:
        async with bot_on(head, storage, tmp_path, sink) as (sched, backend, _):
            assert head.address.startswith("ray://")
            (first,) = backend.slots
            long = await sched.submit("u:a", "quick", params(tmp_path, "long", steps=300, delay_s=0.02), CHAT)
            await until(lambda: len(sink.progress[long.job_id]) >= 2, WAIT_S)
            assert await sched.cancel("u:a", long.job_id) == [long.job_id]  # cancel reaches it through the client
            await until(lambda: long.job_id in sink.cancelled, WAIT_S)
            one = await sched.submit("u:a", "quick", params(tmp_path, "one", steps=40, delay_s=0.05), CHAT)
            await until(lambda: len(sink.progress[one.job_id]) >= 2, WAIT_S)
            head.kill()
            await until(lambda: backend.head_losses == 1, WAIT_S)
            head.start()
            selfie = (tmp_path / "data").resolve() / "users" / "u:b" / "selfie.txt"  # an input, sent as bytes
            selfie.parent.mkdir(parents=True)
            selfie.write_text("face bytes")
            two = await sched.submit("u:b", "quick", params(tmp_path, "two", copy_from=str(selfie)), CHAT)
            await until(in_state(storage, [one.job_id, two.job_id], JobState.DELIVERED), 2 * WAIT_S)
            (second,) = [s for s in backend.slots if not s.gone]
    finally:
        ray_or_skip().shutdown()  # while the head is up: later it waits for it (5 s)
        head.close()
    assert max(sink.progress[long.job_id]) < 300
    assert second.info.node != first.info.node
    for job_id in (one.job_id, two.job_id):
        assert sink.deliver_calls[job_id] == 1
        assert (await storage.job(job_id)).result["meta"]["node"] == second.info.node
    assert Path(sink.delivered[two.job_id][0].path).read_text() == "two\nface bytes"
    assert backend.counters["inputs_sent"] == 1
