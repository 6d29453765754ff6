"""The Ray backend: one named, detached ``WorkerHost`` actor per GPU of a Ray cluster.

Every node that offers the GPU resource (``[scheduler] ray_gpu_resource``, "GPU" on a real cluster)
gets one actor per unit of it, pinned to that node and named after it, so a restarted bot finds and
reuses its actors. Each actor runs the unchanged worker process and relays its protocol
(``ray_host``). No shared filesystem is assumed: inputs under ``data_dir`` travel as content-addressed
bytes (sent once per node), results and checkpoints come back as bytes and are written here. Jobs that
share a pass (cross-user batching) go to an actor in one call, as one ``batch`` message for its worker.

A lost actor (its node left, it crashed) is reported as a worker exit, so the scheduler retries its
jobs elsewhere within ``max_tries``; the actor is created again while its node is alive, and nodes
that join later get actors of their own. A lost head (``ray_head``) ends every slot of that cluster
with its jobs put back in the queue (no try used: no job's fault); the bot leaves the cluster, waits
for the head, joins it again and creates actors on the nodes that joined the restarted head.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.config import ConfigError
from bot.engine import worker_protocol as wp
from bot.engine.backends.base import BackendEvents, JobOrder, Slot, SlotInfo, batch_message, init_message
from bot.engine.backends.ray_head import HeadLink, HeadLost
from bot.engine.backends.ray_host import EXITED, HOST_PROTOCOL, WorkerHost
from bot.engine.backends.shipping import Blob, Packer, read_blob, read_tree, write_tree
from bot.engine.worker_env import worker_environment

log = logging.getLogger(__name__)

POLL_WAIT_S = 1.0  # how long one long-poll of an actor waits for the worker's messages
POLL_GRACE_S = 30.0  # a poll unanswered this long after POLL_WAIT_S: the actor counts as lost
RECOVER_WAIT_S = POLL_WAIT_S + POLL_GRACE_S + 5.0  # for the slots of a lost head to report their jobs
DISCOVER_EVERY_S = 5.0  # how often new nodes are looked for
RECREATE_DELAYS_S = (0.5, 2.0, 5.0, 15.0)
EXIT_WAIT_S = 5.0
REPLACE_WAIT_S = 30.0
ACTOR_PREFIX = "facechain-worker"


def require_ray() -> Any:
    """Imports ray, or explains how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("scheduler.backend = \"ray\" needs Ray: pip install '.[ray]'") from exc
    return ray


class _Actor:
    """A slot's actor handle and its poll task."""

    def __init__(self, name: str, node: str) -> None:
        self.name = name
        self.node = node
        self.handle: Any = None
        self.poller: asyncio.Task[None] | None = None


class RayBackend:
    """Worker processes in Ray actors, one per GPU resource unit of each alive node."""

    batches = True  # dispatch sends several orders as one batch (one call, one pass)

    def __init__(self, context: Mapping[str, Any], *, data_dir: Path, address: str = "", namespace: str = "facechain",
                 gpu_resource: str = "GPU", node_labels: Mapping[str, str] | None = None, cache_mb: int = 2048, secrets: Iterable[str] = (),
                 kind_needs: Mapping[str, list[list[str]]] | None = None, memory_budget_mb: int = 0) -> None:
        self._ray = require_ray()
        self._context = dict(context)
        self._namespace = namespace
        self._link = HeadLink(self._ray, address, namespace)
        self._recovery: asyncio.Task[None] | None = None
        self._resource = gpu_resource
        self._node_labels = dict(node_labels or {})
        self._cache_bytes = cache_mb * 2**20
        self._budget = memory_budget_mb
        self._kind_needs = {k: [list(p) for p in v] for k, v in (kind_needs or {}).items()}
        self._packer = Packer(data_dir)
        # Names of the variables holding secrets here: a node started from this shell must not pass them on.
        self._drop_env = sorted(set(os.environ) - set(worker_environment(os.environ, list(secrets))))
        self._root = str(Path(__file__).resolve().parents[3])
        self._events: BackendEvents | None = None
        self._actors: list[_Actor] = []
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._discoverer: asyncio.Task[None] | None = None
        self._out_dirs: dict[int, Path] = {}  # job id -> where the service wants its files
        self._outputs: dict[int, dict[str, Path]] = {}  # job id -> output files named outside out_dir
        self.slots: list[Slot] = []
        self.counters: Counter[str] = Counter()  # inputs_sent, inputs_cached (already on the node)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, events: BackendEvents) -> None:
        self._events = events
        await self._link.connect()
        await self._discover()
        if not self.slots:
            raise RuntimeError(f"the Ray cluster offers no {self._resource!r} resource: no worker can start")
        self._discoverer = asyncio.ensure_future(self._discover_loop())
        self._discoverer.set_name("ray-discover")

    async def stop(self) -> None:
        self._stopping = True
        self._stop_event.set()
        for task in (self._discoverer, self._recovery):
            if task is not None:
                task.cancel()
        await self._link.settle()
        for slot, actor in zip(self.slots, self._actors):
            slot.stopping = True
            if actor.handle is None or self._link.down:
                continue
            call = actor.handle.kill if slot.jobs else actor.handle.close
            with contextlib.suppress(Exception):
                call.remote()
        pollers = [a.poller for a in self._actors if a.poller is not None and not a.poller.done()]
        if pollers:
            _, late = await asyncio.wait(pollers, timeout=EXIT_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def abort(self) -> None:
        self._stopping = True
        self._stop_event.set()
        if self._recovery is not None:
            self._recovery.cancel()
        for slot, actor in zip(self.slots, self._actors):
            slot.stopping = True
            if actor.handle is not None and not self._link.down:
                with contextlib.suppress(Exception):
                    actor.handle.kill.remote()
            if actor.poller is not None:
                actor.poller.cancel()

    def destroy_actors(self) -> None:
        """Ends the detached actors themselves (they outlive the bot otherwise, to be reattached)."""
        for actor in self._actors:
            if actor.handle is not None:
                with contextlib.suppress(Exception):
                    self._ray.kill(actor.handle, no_restart=True)

    def actor_name(self, slot: Slot) -> str:
        """The named actor that hosts the slot's worker (``ray.get_actor(name, namespace=...)``)."""
        return self._actors[slot.index].name

    @property
    def head_losses(self) -> int:
        """How often the Ray head was lost (and reconnected to) since the start."""
        return self._link.lost_count

    # -- the scheduler's calls ---------------------------------------------------------------
    async def dispatch(self, slot: Slot, orders: list[JobOrder]) -> None:
        # Several orders are one batch: one call, the node's worker runs them in one pass (bot.engine.batching).
        actor = self._actors[slot.index]
        packed = [await asyncio.to_thread(self._packer.pack_params, order.params) for order in orders]
        found = {digest: path for _, inputs, _ in packed for digest, path in inputs.items()}
        missing = await actor.handle.missing.remote(list(found))  # once for the whole batch
        self.counters["inputs_sent"] += len(missing)
        self.counters["inputs_cached"] += len(found) - len(missing)
        inputs = {d: await asyncio.to_thread(read_blob, found[d]) for d in missing}
        seeds: list[Blob] = []
        for order, (_, _, outputs) in zip(orders, packed):
            out_dir = Path(order.params["out_dir"])
            self._out_dirs[order.job_id] = out_dir
            self._outputs[order.job_id] = outputs
            seeds.append(await asyncio.to_thread(read_tree, out_dir))  # an earlier try's checkpoint
        shipped = [replace(order, params=params) for order, (params, _, _) in zip(orders, packed)]
        if len(shipped) == 1:
            await actor.handle.run.remote(shipped[0].message(), inputs, seeds[0])
        else:
            await actor.handle.run_batch.remote(batch_message(shipped), inputs, seeds)

    def cancel(self, slot: Slot, job_id: int) -> None:
        self._send(slot, {"op": wp.CANCEL, "job": job_id})

    def resume(self, slot: Slot) -> None:
        self._send(slot, {"op": wp.RESUME})

    def kill(self, slot: Slot) -> None:
        actor = self._actors[slot.index]
        if actor.handle is not None and not self._link.down:
            with contextlib.suppress(Exception):
                actor.handle.kill.remote()

    def ping(self) -> None:
        for slot in self.slots:
            self._send(slot, {"op": wp.PING})

    def _send(self, slot: Slot, message: dict[str, Any]) -> None:
        actor = self._actors[slot.index]
        if actor.handle is not None and not self._link.down:
            with contextlib.suppress(Exception):
                actor.handle.send.remote(message)

    # -- actors ------------------------------------------------------------------------------
    def _nodes(self) -> list[dict[str, Any]]:
        return [n for n in self._link.nodes() if n.get("Alive") and n.get("Resources", {}).get(self._resource, 0) >= 1
                and all((n.get("Labels") or {}).get(k) == v for k, v in self._node_labels.items())]

    async def _discover(self) -> None:
        """Adds a slot for each GPU resource unit of every alive node not seen yet, and starts it."""
        # A retired slot's actor comes back only if its node does (a head that kept its cluster: GCS fault tolerance).
        known = {a.name for a, s in zip(self._actors, self.slots) if not s.gone}
        for node in await asyncio.to_thread(self._nodes):
            node_id = node["NodeID"]
            labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
            for unit in range(int(node["Resources"][self._resource])):
                name = f"{ACTOR_PREFIX}-{node_id[:16]}-{unit}"
                if name in known:
                    continue
                memory = labels.get("gpu_memory_mb")
                info = SlotInfo(name=f"ray:{node_id[:8]}/{unit}", device="cuda:0" if self._resource == "GPU" else "cpu",
                                gpu_index=unit, gpu_memory_mb=int(memory) if memory and memory.isdigit() else None,
                                labels=labels, node=node_id, kinds=frozenset())  # no kind until it answered
                slot = Slot(len(self.slots), info)
                actor = _Actor(name, node_id)
                self.slots.append(slot)
                self._actors.append(actor)
                actor.poller = asyncio.ensure_future(self._run_slot(slot, actor))
                actor.poller.set_name(f"ray-{name}")

    async def _discover_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), DISCOVER_EVERY_S)
            if self._stopping or self._link.down:
                continue
            try:
                await self._discover()
            except HeadLost as exc:
                self._head_lost(str(exc))
            except Exception:
                log.warning("looking for new Ray nodes failed", exc_info=True)

    def _actor_class(self) -> Any:
        return self._ray.remote(WorkerHost)

    async def _create(self, slot: Slot, actor: _Actor) -> None:
        """Gets (or creates) the slot's actor on its node and learns what that node can run."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources = {} if self._resource == "GPU" else {self._resource: 1}
        options: dict[str, Any] = dict(
            name=actor.name, namespace=self._namespace, lifetime="detached", get_if_exists=True, max_restarts=0,
            num_cpus=0, resources=resources, max_concurrency=64,
            scheduling_strategy=NodeAffinitySchedulingStrategy(actor.node, soft=False),
        )
        if self._resource == "GPU":
            options["num_gpus"] = 1
        cls = self._actor_class().options(**options)
        actor.handle = cls.remote(actor.name, self._cache_bytes, self._root)
        described = await self._describe(actor)
        if described.get("protocol") != HOST_PROTOCOL:  # an actor of an older release, reattached: replace it
            log.warning("Ray actor %s runs another version of the worker host (%s, here %s): replacing it",
                        actor.name, described.get("protocol", 1), HOST_PROTOCOL)
            await self._replace(actor)
            actor.handle = cls.remote(actor.name, self._cache_bytes, self._root)
            described = await self._describe(actor)
        memory = slot.info.gpu_memory_mb or described.get("gpu_memory_mb")
        kinds = frozenset(described["kinds"]) if self._kind_needs else None
        slot.info = SlotInfo(name=slot.info.name, device=slot.info.device, gpu_index=slot.info.gpu_index,
                             gpu_memory_mb=memory, labels=slot.info.labels, node=slot.info.node, kinds=kinds)
        missing = sorted(set(self._kind_needs) - set(kinds or ()))
        if kinds is not None and missing:
            log.warning("Ray node %s lacks the models of %s: those kinds never run there", actor.node[:8],
                        ", ".join(missing))

    async def _describe(self, actor: _Actor) -> dict[str, Any]:
        settings = self._context.get("settings") or {}
        return await actor.handle.describe.remote(
            self._kind_needs, str(self._context.get("models_dir", "models")), settings.get("model_paths"))

    async def _replace(self, actor: _Actor) -> None:
        """Kills the actor and waits until its name is free (Ray releases it once the actor has died)."""
        self._ray.kill(actor.handle, no_restart=True)
        deadline = time.monotonic() + REPLACE_WAIT_S
        while time.monotonic() < deadline:
            try:
                await asyncio.to_thread(self._ray.get_actor, actor.name, namespace=self._namespace)
            except ValueError:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the old Ray actor {actor.name} did not end within {REPLACE_WAIT_S:.0f} s")

    def _node_alive(self, node_id: str) -> bool:
        return any(n["NodeID"] == node_id for n in self._nodes())

    async def _run_slot(self, slot: Slot, actor: _Actor) -> None:
        """Keeps the slot's actor and worker process alive, relaying the worker's messages, until stopped."""
        assert self._events is not None
        failures = 0
        while not (self._stopping or slot.stopping):
            if self._link.down:  # the cluster this actor lived in is gone with its head
                self._retire(slot, actor)
                return
            try:
                if actor.handle is None:
                    await self._create(slot, actor)
                slot.gen += 1
                slot.ready = slot.was_ready = False
                slot.ready_event.clear()
                slot.doom = {}
                await actor.handle.spawn.remote(init_message(self._context, slot.device, self._budget), self._drop_env,
                                                self._cache_bytes)
                code = await self._relay(slot, actor)
                lost = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, lost = None, True
                log.warning("Ray worker %s lost (%s)", actor.name, type(exc).__name__)
            slot.ready = False
            slot.pid = None
            head_lost = lost and await self._head_gone()
            # A lost head is no job's fault: its jobs go back to the queue without a try used.
            killed_by_us = bool(slot.doom) or slot.stopping or head_lost
            if not killed_by_us:
                log.warning("Ray worker %s ended (exit %s) while running %s", actor.name, code, slot.jobs or "nothing")
            ended = list(slot.jobs)
            await self._events.on_exit(slot, code, killed_by_us)
            self._forget(ended)
            slot.doom = {}
            if self._stopping or slot.stopping:
                return
            if head_lost:
                if actor.handle is not None:  # a node that outlives its head for a while: stop the work there
                    with contextlib.suppress(Exception):
                        actor.handle.kill.remote()
                self._retire(slot, actor)
                return
            if lost:
                actor.handle = None
                try:
                    alive = await asyncio.to_thread(self._node_alive, actor.node)
                except Exception:  # the head itself is unreachable: try again after the backoff
                    log.warning("Ray head unreachable while recreating %s", actor.name, exc_info=True)
                    alive = True
                if not alive:
                    log.warning("Ray node %s left: its worker %s is gone", actor.node[:8], actor.name)
                    self._retire(slot, actor)
                    return
            if lost or not (slot.was_ready or killed_by_us):  # lost, or died before ready: back off
                failures += 1
                delay = RECREATE_DELAYS_S[min(failures - 1, len(RECREATE_DELAYS_S) - 1)]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
            else:
                failures = 0

    def _retire(self, slot: Slot, actor: _Actor) -> None:
        """The slot's node (or its whole cluster) is gone: the slot is never used again."""
        assert self._events is not None
        actor.handle = None
        slot.ready = False
        slot.gone = True
        slot.ready_event.set()  # nobody waits for it any more
        self._events.wake()

    # -- the head ----------------------------------------------------------------------------
    async def _head_gone(self) -> bool:
        """After an actor was lost: whether its head was lost too (then a reconnect is under way)."""
        if not self._link.down:
            why = await self._link.lost()
            if why is None:
                return False
            self._head_lost(why)
        return True

    def _head_lost(self, why: str) -> None:
        """Starts leaving the lost cluster (once): every slot stops, reports its jobs and retires."""
        if self._link.down or self._stopping:
            return
        self._link.down = True
        self._link.lost_count += 1
        log.warning("Ray head lost (%s): the jobs of its %d worker(s) go back to the queue; reconnecting",
                    why, sum(1 for s in self.slots if not s.gone))
        for slot in self.slots:
            slot.ready = False
        self._recovery = asyncio.ensure_future(self._recover())
        self._recovery.set_name("ray-recover")

    async def _recover(self) -> None:
        """Waits for the old slots to report their jobs, reconnects, and puts actors on the new nodes."""
        assert self._events is not None
        pollers = [a.poller for a in self._actors if a.poller is not None and not a.poller.done()]
        if pollers:
            await asyncio.wait(pollers, timeout=RECOVER_WAIT_S)
        while not self._stopping:
            self._link.down = True
            await self._link.reconnect()
            try:
                await self._discover()
                break
            except Exception as exc:  # the head went again, or answers too slowly yet: leave and join again
                log.warning("looking for the Ray nodes after a reconnect failed (%s: %s)", type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), RECREATE_DELAYS_S[1])
        log.warning("Ray head back: %d worker(s) on its nodes so far (nodes joining later get theirs)",
                    sum(1 for s in self.slots if not s.gone))
        self._events.wake()

    async def _relay(self, slot: Slot, actor: _Actor) -> int | None:
        """Handles the worker's messages until its process ends; returns its exit code."""
        assert self._events is not None
        while True:
            poll = _awaited(actor.handle.next.remote(POLL_WAIT_S))
            messages = await asyncio.wait_for(poll, POLL_WAIT_S + POLL_GRACE_S)
            for message in messages:
                op = message["op"]
                if op == EXITED:
                    return message.get("code")
                slot.heard = time.time()
                if op == wp.PONG:
                    slot.memory = {k: int(v) for k, v in (message.get("memory") or {}).items()}
                elif op == wp.READY:
                    slot.pid = message.get("pid")
                    slot.ready = slot.was_ready = True
                    slot.ready_event.set()
                    self._events.wake()
                else:
                    try:
                        await self._take_files(slot, message)
                        await self._events.on_message(slot, message)
                    except Exception:
                        log.exception("handling %r from %s failed", op, actor.name)
                    if op in (wp.DONE, wp.ERROR, wp.CRASH, wp.CANCELLED):
                        self._forget([int(message["job"])])
            if self._link.down:  # a result that came back before is kept; the rest go back to the queue
                raise HeadLost("reconnecting")

    async def _take_files(self, slot: Slot, message: dict[str, Any]) -> None:
        """Writes the files a message brought under the job's out_dir; a result then names them there."""
        back = message.pop("files_back", None)
        if back is None:
            return
        out_dir = self._out_dir(slot, int(message["job"]))
        if out_dir is None:
            return
        outputs = self._outputs.get(int(message["job"]), {})
        elsewhere = {rel: back.pop(rel) for rel in list(back) if rel in outputs}
        await asyncio.to_thread(write_tree, out_dir, back)
        for rel, data in elsewhere.items():
            await asyncio.to_thread(write_tree, outputs[rel].parent, {outputs[rel].name: data})
        if message["op"] == wp.DONE:
            result = message.get("result") or {}
            result["files"] = [str(outputs.get(rel) or out_dir / rel) for rel in result.get("files") or []]

    def _out_dir(self, slot: Slot, job_id: int) -> Path | None:
        return self._out_dirs.get(job_id)

    def _forget(self, job_ids: Iterable[int]) -> None:
        for job_id in job_ids:
            self._out_dirs.pop(job_id, None)
            self._outputs.pop(job_id, None)


async def _awaited(ref: Any) -> Any:
    return await ref
