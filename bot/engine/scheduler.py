"""The GPU scheduler: admission, fair ordering, worker processes, retries, delivery, shutdown.

One worker process per device (``bot.engine.worker``), kept for many jobs, in a slot of a backend
(``bot.engine.backends``: local child processes or Ray actors; the scheduler does not know which). Jobs are
picked by priority class, then round-robin over users (the user served least recently first), FIFO
within a user. The job row is written before ``submit`` returns; a job in DONE is never run again
(its artifacts are stored in the same transaction), and delivery is at-least-once: a DONE job is
re-delivered after a restart. A preemptible job (training) yields at checkpoints: the worker then
runs waiting short jobs in place. A job past its kind's timeout has its worker killed and respawned.
A job goes only to a slot that may run its kind (``bot.engine.placement``), preferring an idle slot
whose last job used the same base.

The lifecycle is written before it is acted on: each state change goes to the job's row first
(retrying a locked database or a full disk until it lands), and only then do the in-memory maps
move, so a failed write never strands a job. A finished job's outcome (its results, or why it
failed) is sent until it reaches the chat, with capped backoff kept across restarts, for as long as
retention keeps the result; a chat that refuses for good (``ChatUnreachable``) ends it at once. The
dispatch pump, the worker readers and respawns survive a failed round.

Pipelines get ``params["job_id"]`` and ``params["out_dir"]`` (``data_dir/users/<user>/jobs/<id>``
unless the handler set one). A result's files become artifacts of the job's kind, unless its meta
names ``artifact_kind``; ``meta["file_meta"]`` (a list, one dict per file) becomes each artifact's meta.

Usage::

    async with Scheduler(storage, kinds, settings.scheduler, data_dir=..., context=..., sink=sink) as queue:
        ...  # handlers call queue.submit(...)
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import mimetypes
import statistics
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bot.engine import worker_protocol as wp
from bot.config import SchedulerSettings
from bot.engine.backends.base import Backend, JobOrder, Slot
from bot.engine.backends import local_backend
from bot.engine.batching import Plan, batch_group, plan_function, safe_plan
from bot.engine.jobkinds import JobKinds
from bot.engine.placement import allowed
from bot.lifecycle import StartStop
from bot.storage import Artifact, DuplicateKey, Job, JobState, Storage, new_artifact_id, retry_transient
from facechain_core.errors import UserFacingError
from handlers.protocols import Chat, ChatUnreachable, DuplicateUpdate, JobView, MessageRef, Submitted

log = logging.getLogger(__name__)
T = TypeVar("T")

# Message codes (handlers/messages/queue.toml).
QUEUE_FULL = "queue.full"
QUEUE_USER_FULL = "queue.user_full"
QUEUE_STOPPING = "queue.stopping"
JOB_FAILED = "job.failed"  # the pipeline had a bug on every try
JOB_CRASHED = "job.crashed"  # the worker died on every try
JOB_TIMEOUT = "job.timeout"
JOB_UNAVAILABLE = "job.unavailable"  # its kind is no longer configured
JOB_UNREACHABLE = "job.unreachable"  # the chat refused its result for good (blocked, removed, gone)
JOB_EXPIRED = "job.expired"  # retention removed its result before the chat could take it

WORKER_START_TIMEOUT_S = 60.0
# How long forget_user waits for a killed worker's jobs to settle.
WORKER_EXIT_WAIT_S = 5.0
# How long a final message (result, failure) waits for an in-flight progress edit of the same job.
PROGRESS_FLUSH_S = 10.0
# How long forget_user waits for the user's running jobs to stop before killing their worker.
FORGET_WAIT_S = 10.0
# Failed tries to send a result before the user is told it will arrive late.
LATE_NOTICE_AFTER_TRIES = 3
# Pause of the dispatch pump after a round failed (a persistent error must not spin).
PUMP_ERROR_PAUSE_S = 1.0
# Weight of the newest run in the running average of a kind's duration (ETA estimates).
DURATION_ALPHA = 0.2
# Longest a dispatch waits for submits already under way to land (it ends as soon as they do: the cap only
# guards against a database that hangs them).
ARRIVAL_WAIT_S = 0.5
# How much longer than the first user's job alone its pass may take by taking partners that arrive with it
# (the pass times are learned per kind and number of samples; see Scheduler._first_pass_cap).
FIRST_PASS_SLOWDOWN = 1.2
# Latest pass times kept per kind and number of samples (their median is the estimate).
PASS_RUNS_KEPT = 5
# Users remembered for round-robin fairness beyond those with jobs queued or running (the oldest go first).
LAST_SERVED_MAX = 1000

_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
    ".mp4": "video/mp4", ".webm": "video/webm", ".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".opus": "audio/ogg", ".txt": "text/plain", ".json": "application/json",
}


# Gets every job event: queued, started, done, retried, failed, cancelled, delivered (metrics).
JobEventHook = Callable[[str, Job, dict[str, Any]], None]


class JobSink(Protocol):
    """Where job events go (the app routes them to the adapter of the job's platform).

    Every call runs as its own task: a slow network never blocks the scheduler, and an exception
    is logged, never propagated. Progress calls are not rate-limited here.
    """

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        """Shows a running job's progress (rate-limit edits here)."""

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        """Sends a DONE job's results; raises on a failure (tried again later), ChatUnreachable for good.

        `artifacts` are all of the job's; those with ``delivered_at`` set already reached the chat.
        Call ``Storage.mark_delivered`` per artifact to keep its platform file id; after this
        returns, the scheduler marks the job and any remaining artifacts delivered.
        """

    async def on_late(self, job: Job) -> None:
        """Tells the user a DONE job's result is late (sending failed a few times); raises if that failed."""

    async def on_failed(self, job: Job, error: dict[str, Any]) -> None:
        """Tells the user the job failed; `error` is ``{"code": ..., "details": {...}}``. Raises when the
        user could not be told (tried again later, as a delivery)."""

    async def on_cancelled(self, job: Job) -> None:
        """Tells the user the job was cancelled."""


def media_type(path: str | Path) -> str:
    """The media type of a result file, from its suffix."""
    suffix = Path(path).suffix.lower()
    return _MEDIA_TYPES.get(suffix) or mimetypes.guess_type(str(path))[0] or "application/octet-stream"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error(code: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "details": details}


def _base_of(job: Job) -> str:
    """What a job keeps resident in its worker: its style's model family, else its kind."""
    style = job.params.get("style")
    family = style.get("family") if isinstance(style, dict) else None
    return str(family or job.kind)


# -- ordering and estimates (pure) -------------------------------------------------------------
def pick_key(job: Job, last_served: dict[str, int]) -> tuple[int, int, int]:
    """Sort key of the pick order: priority class, the user served least recently, then FIFO."""
    return (job.priority, last_served.get(job.user_key, 0), job.id)


def pick_order(queued: Iterable[Job], last_served: dict[str, int]) -> list[Job]:
    """The order in which `queued` jobs will start, simulating the round-robin bookkeeping."""
    served = dict(last_served)
    counter = max(served.values(), default=0)
    lanes: dict[tuple[str, int], deque[Job]] = {}
    for job in sorted(queued, key=lambda j: j.id):
        lanes.setdefault((job.user_key, job.priority), deque()).append(job)
    heap = [(prio, served.get(user, 0), lane[0].id, user) for (user, prio), lane in lanes.items()]
    heapq.heapify(heap)
    order: list[Job] = []
    while heap:
        prio, seen, head, user = heapq.heappop(heap)
        if seen != served.get(user, 0):  # the user was served meanwhile: re-sort this lane
            heapq.heappush(heap, (prio, served[user], head, user))
            continue
        lane = lanes[(user, prio)]
        order.append(lane.popleft())
        counter += 1
        served[user] = counter
        if lane:
            heapq.heappush(heap, (prio, counter, lane[0].id, user))
    return order


@dataclass(frozen=True)
class Busy:
    """What a worker is running now, for estimates."""

    remaining_s: float | None  # None: unknown
    preemptible: bool = False  # short jobs can run inside it at its next checkpoint


def plan_queue(
    order: list[Job], busy: list[Busy | None], averages: dict[str, float], preemptible_kinds: frozenset[str] = frozenset()
) -> dict[int, tuple[int, float | None]]:
    """Maps each job of `order` to (position, seconds until it is done), given each worker's load.

    Durations are the running averages per kind; a job whose estimate depends on an unknown
    duration gets None. A short job may run inside a preemptible job (delaying it).
    """
    if not busy:
        return {job.id: (pos, None) for pos, job in enumerate(order, 1)}
    workers = range(len(busy))
    # Per worker: when its main slot frees, when a short job can start, and whether each is a guess.
    free = [(b.remaining_s or 0.0) if b else 0.0 for b in busy]
    short = [0.0 if b and b.preemptible else free[i] for i, b in enumerate(busy)]
    free_unknown = [bool(b and b.remaining_s is None) for b in busy]
    short_unknown = [False if b and b.preemptible else free_unknown[i] for i, b in enumerate(busy)]
    plan: dict[int, tuple[int, float | None]] = {}
    for pos, job in enumerate(order, 1):
        duration = averages.get(job.kind)
        took = duration or 0.0
        if job.kind in preemptible_kinds:
            w = min(workers, key=lambda i: free[i])
            start, unknown = free[w], free_unknown[w]
            free[w], free_unknown[w] = start + took, unknown or duration is None
            short[w], short_unknown[w] = max(short[w], start), short_unknown[w] or unknown
        else:
            w = min(workers, key=lambda i: short[i])
            start, unknown = short[w], short_unknown[w]
            short[w], short_unknown[w] = start + took, unknown or duration is None
            if free[w] > start:  # inside a preemptible job: it delays that job
                free[w], free_unknown[w] = free[w] + took, free_unknown[w] or duration is None
            else:
                free[w], free_unknown[w] = short[w], short_unknown[w]
        plan[job.id] = (pos, None if unknown or duration is None else start + duration)
    return plan


# -- runs ----------------------------------------------------------------------------------
@dataclass
class _Run:
    """A job handed to a worker."""

    job: Job
    worker: Slot
    gen: int
    nested: bool
    started: float  # monotonic
    samples: int = 0  # the samples of its pass (a batch's together); 0: a kind that does not batch
    sent: bool = False
    cancel: bool = False  # the user asked to cancel
    notify: bool = True  # tell the sink when it ends cancelled
    step: int = 0
    total: int = 0
    timer: asyncio.TimerHandle | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Lane:
    """Progress of one job: the latest unsent step and the task sending them in order."""

    pending: tuple[int, int, str | None] | None = None
    task: asyncio.Task[None] | None = None


async def _wait_ended(runs: list[_Run], timeout: float) -> bool:
    """Waits until every run ended; False on timeout."""
    if not runs:
        return True
    waiters = [asyncio.ensure_future(r.ended.wait()) for r in runs]
    _, pending = await asyncio.wait(waiters, timeout=timeout)
    for waiter in pending:
        waiter.cancel()
    return not pending


class Scheduler(StartStop):
    """The job queue and its worker slots; implements ``handlers.protocols.JobQueue`` and
    ``bot.engine.backends.base.BackendEvents``."""

    def __init__(
        self, storage: Storage, kinds: JobKinds, settings: SchedulerSettings, *, data_dir: Path,
        context: dict[str, Any], sink: JobSink, devices: list[str] | None = None,
        on_event: JobEventHook | None = None, secrets: Iterable[str] = (), results_ttl_s: float | None = None,
        backend: Backend | None = None,
    ) -> None:
        """`results_ttl_s`: how long retention keeps a result (None: forever); an older one is not sent.
        `backend`: where the workers run (default: local processes on `devices`)."""
        self._storage = storage
        self._kinds = kinds
        self._settings = settings
        self._data_dir = Path(data_dir)
        self._context = context
        self._sink = sink
        self._on_event = on_event
        if backend is None:
            if devices is None:
                devices = [f"cuda:{i}" for i in settings.gpus] or ["cpu"]
            backend = local_backend(devices, context, secrets=secrets, memory_budget_mb=settings.memory_budget_mb)
        self._backend = backend
        self.batch_max = settings.batch_max  # samples per shared pass (1: off); may change while running
        self._queued: dict[int, Job] = {}
        self._running: dict[int, _Run] = {}
        self._delivering: dict[int, tuple[Job, asyncio.Task[None]]] = {}
        self._last_served: dict[str, int] = {}
        self._arriving: set[asyncio.Future[None]] = set()  # submits under way (see _await_arrivals)
        self._served = 0
        self._averages: dict[str, float] = {}
        self._pass_s: dict[tuple[str, int], float] = {}  # (kind, samples) -> seconds of such a pass (median)
        self._pass_runs: dict[tuple[str, int], deque[float]] = {}  # the latest seconds behind each median
        self._lanes: dict[int, _Lane] = {}
        self._counters = {"done": 0, "failed": 0, "cancelled": 0, "retried": 0, "worker_deaths": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._admit_lock = asyncio.Lock()
        # One coroutine at a time on the shared connection: a transaction must not interleave.
        self._db_lock = asyncio.Lock()
        self._results_ttl_s = results_ttl_s or None
        self._pump_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._stopped = False
        self._stop_event = asyncio.Event()  # wakes deliveries waiting to try again
        self._abandon_writes = False  # set when stop gives up on writes still waiting for the database

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Resumes queued and running jobs, re-delivers DONE ones and starts the workers."""
        if self._started:
            return
        self._averages = await self._db(self._storage.kind_averages)
        for job in await self._db(self._storage.jobs_in_states, [JobState.RUNNING]):
            # Interrupted by a crash of the service: its attempt stays counted.
            await self._db(self._storage.requeue, job.id)
        for job in await self._db(self._storage.jobs_in_states, [JobState.QUEUED]):
            if job.kind in self._kinds:
                self._queued[job.id] = job
            else:
                log.error("job %d has kind %r, which is no longer configured", job.id, job.kind)
                await self._fail(job, _error(JOB_UNAVAILABLE, kind=job.kind))
        self._started = True
        try:
            await self._backend.start(self)
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(w.ready_event.wait() for w in self._slots)), WORKER_START_TIMEOUT_S
                )
            except TimeoutError:
                raise RuntimeError(
                    f"worker processes did not start within {WORKER_START_TIMEOUT_S:.0f} s (see their log above)"
                ) from None
        except BaseException:
            self._stopping = True
            self._backend.abort()
            raise
        self._check_placement()
        for job in await self._db(self._storage.unsent_outcomes):
            self._start_delivery(job)
        self._pump_task = asyncio.create_task(self._pump(), name="scheduler-pump")
        self._wake.set()
        log.info("scheduler started: %d worker(s) on %s, %d job(s) queued",
                 len(self._slots), ", ".join(w.info.name for w in self._slots), len(self._queued))

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking jobs, lets running ones finish for `grace_s`, puts the rest back, stops workers."""
        if not self._started or self._stopped:
            return
        self._stopping = True
        self._stop_event.set()
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        if self._running:
            log.info("stopping: %d running job(s) get %.1f s to finish", len(self._running), grace)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        # Killing a busy worker reports its exit, which puts unfinished jobs back (attempt refunded).
        await self._backend.stop()
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
        # Deliveries and messages in flight get what is left of the grace; DONE jobs resume at start.
        tasks = set(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
            self._abandon_writes = True  # a write still waiting for the database: its row decides at start
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._stopped = True
        log.info("scheduler stopped: %d job(s) left queued", len(self._queued))

    def job_dir(self, job: Job) -> Path:
        """Where a job's pipeline writes its files (``params["out_dir"]`` in the worker)."""
        return (self._data_dir / "users" / job.user_key / "jobs" / str(job.id)).resolve()

    def worker_pids(self) -> list[int | None]:
        """The live worker process ids, one per device (None while one restarts)."""
        return [w.pid if w.ready else None for w in self._slots]

    def ping_workers(self) -> None:
        """Asks every worker process for a pong (liveness and memory; see ``health``)."""
        self._backend.ping()

    def queue_length(self) -> int:
        """Jobs waiting for a worker now (fast mode's "auto" reads it when a job is queued)."""
        return len(self._queued)

    def health(self) -> dict[str, Any]:
        """Counters for the heartbeat file: workers alive, queue sizes, outcomes since start."""
        return {
            "queued_by_kind": dict(Counter(j.kind for j in self._queued.values())),
            "running_by_kind": dict(Counter(r.job.kind for r in self._running.values())),
            "worker_states": [
                {"index": w.index, "pid": w.pid, "alive": w.ready, "busy": bool(w.jobs), "heard": w.heard,
                 "memory": w.memory, "device": w.info.name, "node": w.info.node}
                for w in self._slots if not w.gone  # a Ray node that left the cluster is no worker of ours
            ],
            "accepting": self._started and not self._stopping,
            "workers": sum(1 for w in self._slots if not w.gone),
            "workers_alive": sum(1 for w in self._slots if w.ready),
            "queued": len(self._queued),
            "running": len(self._running),
            "delivering": len(self._delivering),
            **self._counters,
        }

    # -- JobQueue ----------------------------------------------------------------------------
    async def submit(self, user_key: str, kind: str, params: dict[str, Any], chat: Chat,
                     progress_ref: MessageRef | None = None, update_key: str | None = None) -> Submitted:
        """Writes the job row and queues it; raises UserFacingError("queue.*") when refused, and
        DuplicateUpdate when the chat update `update_key` made a job already."""
        if kind not in self._kinds:
            raise ValueError(f"unknown job kind: {kind!r}")
        if not self._started or self._stopping:
            raise UserFacingError(QUEUE_STOPPING)
        spec = self._kinds[kind]
        arrival = asyncio.get_running_loop().create_future()
        self._arriving.add(arrival)
        try:
            return await self._admit(user_key, kind, spec.priority, spec.max_tries, params, chat, progress_ref,
                                     update_key)
        finally:
            self._arriving.discard(arrival)
            arrival.set_result(None)

    async def _admit(self, user_key: str, kind: str, priority: int, max_tries: int, params: dict[str, Any],
                     chat: Chat, progress_ref: MessageRef | None, update_key: str | None) -> Submitted:
        async with self._admit_lock:
            if len(self._queued) >= self._settings.queue_max:
                raise UserFacingError(QUEUE_FULL, max=self._settings.queue_max)
            active = sum(1 for j in self._active_jobs() if j.user_key == user_key)
            if active >= self._settings.user_max_queued:
                raise UserFacingError(QUEUE_USER_FULL, max=self._settings.user_max_queued)
            try:
                job = await self._db(self._storage.insert_job, user_key, kind, priority, params, chat.to_dict(),
                                     max_tries, update_key)
            except DuplicateKey:
                log.info("update %s of %s made a job already: not queued again", update_key, user_key)
                raise DuplicateUpdate(update_key) from None
            if progress_ref is not None:
                job.progress_ref = progress_ref.to_dict()
                await self._db(self._storage.set_progress_ref, job.id, job.progress_ref)
            self._queued[job.id] = job
        self._event("queued", job)
        self._wake.set()
        position, eta = self._plan().get(job.id, (1, None))
        return Submitted(job_id=job.id, position=position, eta_s=eta)

    async def attach_progress(self, job_id: int, ref: MessageRef) -> None:
        """Records the message that shows the job's progress."""
        data = ref.to_dict()
        await self._db(self._storage.set_progress_ref, job_id, data)
        job = self._find(job_id)
        if job is not None:
            job.progress_ref = data

    async def cancel(self, user_key: str, job_id: int | None = None) -> list[int]:
        """Cancels the user's job (or all of them); a running one stops at its next progress step."""
        return await self._cancel(user_key, job_id, notify=True)

    async def user_jobs(self, user_key: str) -> list[JobView]:
        """The user's queued, running and undelivered jobs with position, ETA and progress."""
        plan = self._plan()
        now = time.monotonic()
        views: list[JobView] = []
        for job in self._queued.values():
            if job.user_key == user_key:
                position, eta = plan.get(job.id, (None, None))
                views.append(JobView(job.id, job.kind, job.state, position, eta, None))
        for run in self._running.values():
            if run.job.user_key == user_key:
                progress = run.step / run.total if run.total else None
                views.append(JobView(run.job.id, run.job.kind, JobState.RUNNING, 0, self._remaining(run, now), progress))
        for job, _ in self._delivering.values():
            if job.user_key == user_key and job.state == JobState.DONE:
                views.append(JobView(job.id, job.kind, JobState.DONE, None, None, 1.0))
        return sorted(views, key=lambda v: v.id)

    async def forget_user(self, user_key: str) -> None:
        """Cancels and drops every job of the user, silently (before /delete removes their files)."""
        await self._cancel(user_key, None, notify=False)
        runs = [r for r in self._running.values() if r.job.user_key == user_key]
        if not await _wait_ended(runs, FORGET_WAIT_S):
            for run in runs:
                if not run.ended.is_set():
                    log.warning("job %d did not stop for forget_user: killing its worker", run.job.id)
                    run.worker.doom[run.job.id] = "forget"
                    self._backend.kill(run.worker)
            await _wait_ended(runs, WORKER_EXIT_WAIT_S)
        for job_id, (job, task) in list(self._delivering.items()):
            if job.user_key == user_key:
                task.cancel()
                self._delivering.pop(job_id, None)
        self._last_served.pop(user_key, None)

    # -- internals: bookkeeping --------------------------------------------------------------
    def _event(self, name: str, job: Job, **fields: Any) -> None:
        """Logs one line per job event (id, kind, user key, durations) and tells the event hook."""
        shown = "".join(f" {k}={v:.2f}" if isinstance(v, float) else f" {k}={v}" for k, v in fields.items())
        log.info("job %d %s: kind=%s user=%s%s", job.id, name, job.kind, job.user_key, shown,
                 extra={"job_event": {"event": name, "job": job.id, "kind": job.kind, "user": job.user_key, **fields}})
        if self._on_event is not None:
            try:
                self._on_event(name, job, fields)
            except Exception:
                log.exception("the job event hook failed on %s of job %d", name, job.id)

    async def _db(self, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Runs one storage call alone on the connection, shielded from cancellation; a transient error
        (locked database, full disk) is retried until the write lands, or until stop gives up on it."""
        async with self._db_lock:
            task = asyncio.ensure_future(retry_transient(
                lambda: call(*args, **kwargs), getattr(call, "__name__", "a database call"), None,
                lambda: self._abandon_writes))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                with contextlib.suppress(BaseException):
                    await task
                raise

    def _spawn_task(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _active_jobs(self) -> Iterable[Job]:
        yield from self._queued.values()
        yield from (r.job for r in self._running.values())

    def _find(self, job_id: int) -> Job | None:
        if job_id in self._queued:
            return self._queued[job_id]
        if job_id in self._running:
            return self._running[job_id].job
        if job_id in self._delivering:
            return self._delivering[job_id][0]
        return None

    def _job_params(self, job: Job) -> dict[str, Any]:
        """The params the pipeline sees: the job id, and an ``out_dir`` unless the handler chose one."""
        return {"out_dir": str(self.job_dir(job)), **job.params, "job_id": job.id}

    def _remaining(self, run: _Run, now: float) -> float | None:
        elapsed = now - run.started
        if run.step > 0 and run.total:
            return elapsed * (run.total - run.step) / run.step
        average = self._averages.get(run.job.kind)
        return None if average is None else max(average - elapsed, 0.0)

    def _plan(self) -> dict[int, tuple[int, float | None]]:
        now = time.monotonic()
        busy: list[Busy | None] = []
        for worker in self._slots:
            host = self._running.get(worker.jobs[0]) if worker.jobs else None
            if host is None:
                busy.append(None)
            else:
                preemptible = host.job.kind in self._kinds and self._kinds[host.job.kind].preemptible
                busy.append(Busy(self._remaining(host, now), preemptible))
        preemptible_kinds = frozenset(n for n in self._kinds.names() if self._kinds[n].preemptible)
        order = pick_order(self._queued.values(), self._last_served)
        return plan_queue(order, busy, self._averages, preemptible_kinds)

    def _pick(self, short_only: bool = False, slots: list[Slot] | None = None) -> Job | None:
        """The next job in pick order (that one of `slots` may run, when given)."""
        candidates = (
            j for j in self._queued.values() if not (short_only and self._kinds[j.kind].preemptible)
            and (slots is None or any(self._fits(j, w) for w in slots))
        )
        return min(candidates, key=lambda j: pick_key(j, self._last_served), default=None)

    def _check_placement(self) -> None:
        """Logs placement rules naming unknown kinds, and kinds no worker may run (their jobs wait)."""
        for rule in self._settings.placement:
            for name in set(rule.kinds) - set(self._kinds.names()):
                log.warning("scheduler.placement names %r, which is no job kind", name)
        live = [w for w in self._slots if not w.gone]
        for name in self._kinds.names():
            if not any(allowed(name, w.info, self._settings.placement) for w in live):
                log.error("no worker may run %r jobs (placement rules, or models missing on every node): "
                          "they wait until one can", name)

    def _fits(self, job: Job, worker: Slot) -> bool:
        """Whether the slot may run the job: the placement rules, and the models its node has."""
        return allowed(job.kind, worker.info, self._settings.placement)

    def _choose_slot(self, job: Job, idle: list[Slot]) -> Slot:
        """Among idle slots that may run the job, one whose last job used the same base (still resident)."""
        fitting = [w for w in idle if self._fits(job, w)]
        base = _base_of(job)
        return next((w for w in fitting if w.last_base == base), fitting[0])

    def _group(self, head: Job, worker: Slot, arrived: Container[int] = ()) -> tuple[list[Job], int]:
        """The head and the queued jobs right behind it in the fair order that share its pass on `worker`, and the
        pass's samples (0: the head's kind does not batch). Jobs in `arrived` (they landed while the pump waited
        for submits under way) join only within ``_first_pass_cap``."""
        plans: dict[int, Plan] = {}

        def plan_of(job: Job) -> Plan:
            if job.id not in plans:
                plan = self._batch_plan(job) if self._fits(job, worker) else None
                plans[job.id] = None if plan is None else ((job.kind, plan[0]), plan[1])
            return plans[job.id]

        head_plan = plan_of(head)
        alone = ([head], head_plan[1] if head_plan else 0)
        if head_plan is None or not self._batching_on():
            return alone
        order = pick_order(self._queued.values(), self._last_served)
        if not order or order[0].id != head.id:
            return alone
        group: list[Job] = []
        samples = 0
        cap = self._first_pass_cap(head.kind, head_plan[1])
        for job in batch_group(order, plan_of, self.batch_max):
            more = plans[job.id][1]  # type: ignore[index]  # every member has a plan
            if job.id in arrived and samples + more > cap:
                break  # never skipped for a later job: the rest waits for the next pass
            group.append(job)
            samples += more
        return group, samples

    def _batching_on(self) -> bool:
        return self.batch_max > 1 and getattr(self._backend, "batches", False)

    def _batch_plan(self, job: Job) -> Plan:
        """The job's plan (its pass key and samples), or None when its kind never shares a pass."""
        spec = self._kinds[job.kind]
        if spec.batch is None or spec.preemptible:
            return None
        return safe_plan(plan_function(spec.batch), job.params, self._context.get("settings") or {}, job.id)

    def _first_pass_cap(self, kind: str, samples: int) -> int:
        """Most samples a pass of `kind` headed by a job of `samples` may hold with partners that arrived with it:
        the pass sizes seen, from the smallest up, while each took at most FIRST_PASS_SLOWDOWN times a pass of
        `samples` alone.

        Where one pass for several jobs costs about what one job costs (a GPU), jobs submitted in the same
        moment share the first pass; where the cost grows with the batch (a CPU), the first user's job runs
        alone and does not wait for the others' samples. Until both sizes were seen, nobody joins."""
        alone = self._pass_s.get((kind, samples))
        if alone is None:
            return samples
        cap = samples
        for size, seconds in sorted((size, seconds) for (name, size), seconds in self._pass_s.items()
                                    if name == kind and size > samples):
            if seconds > alone * FIRST_PASS_SLOWDOWN:
                break
            cap = size
        return cap

    def _learn_pass(self, kind: str, samples: int, seconds: float) -> None:
        """Records a pass's time: the median of the latest few, so one slow pass (a pipeline loading) is soon
        outvoted."""
        runs = self._pass_runs.setdefault((kind, samples), deque(maxlen=PASS_RUNS_KEPT))
        runs.append(seconds)
        self._pass_s[(kind, samples)] = statistics.median(runs)

    # -- internals: dispatch -------------------------------------------------------------------
    async def _pump(self) -> None:
        """Hands queued jobs to idle workers whenever something changes; a failed round is logged and
        tried again after a pause (the job it was for stays queued)."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            waited: set[int] | None = None  # what was queued before the pump waited for submits under way
            while not self._stopping:
                idle = [w for w in self._slots if w.idle]
                job = self._pick(slots=idle) if idle else None
                if job is None:
                    break
                if waited is None and self._arriving and self._may_share(job):
                    waited = set(self._queued)
                    await self._await_arrivals()
                    continue  # pick again: a job that arrived may come first in the fair order
                worker = self._choose_slot(job, idle)
                arrived = set(self._queued) - waited if waited is not None else set()
                waited = None
                try:
                    group, samples = self._group(job, worker, arrived)
                    if len(group) > 1:
                        await self._dispatch_batch(worker, group, samples)
                    else:
                        await self._dispatch(worker, job, nested=False, samples=samples)
                except Exception:
                    log.exception("dispatching job %d failed; it stays queued", job.id)
                    await self._pause(PUMP_ERROR_PAUSE_S)
                    self._wake.set()
                    break

    def _may_share(self, head: Job) -> bool:
        """Whether jobs arriving now could join the head's pass: batching is on and a bigger pass of its kind was
        seen to cost about what the head's costs alone (``_first_pass_cap``)."""
        plan = self._batch_plan(head) if self._batching_on() else None
        return plan is not None and self._first_pass_cap(head.kind, plan[1]) > plan[1]

    async def _await_arrivals(self) -> None:
        """Lets the submits already under way land before a pass is formed, so jobs that arrive together (a
        burst of users, a handler's several jobs) share the first pass instead of the first running alone.

        Only submits that started before this call are waited for, and only until they are queued (a database
        write each): a lone job waits for nothing, and a steady stream of submits cannot hold the pump."""
        if self._arriving:
            await asyncio.wait(set(self._arriving), timeout=ARRIVAL_WAIT_S)

    async def _pause(self, seconds: float) -> None:
        """Sleeps `seconds`, or less when the scheduler stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _dispatch(self, worker: Slot, job: Job, nested: bool, samples: int = 0) -> bool:
        """Marks the job running (the attempt counts now) and sends it; False if it did not go."""
        run = await self._reserve(worker, job, nested)
        if run is not None:
            run.samples = samples
        return run is not None and await self._send(worker, [run])

    async def _dispatch_batch(self, worker: Slot, jobs: list[Job], samples: int = 0) -> bool:
        """Marks each job running and sends them as one batch (one pass); False if none went."""
        gen = worker.gen
        runs: list[_Run] = []
        try:
            for job in jobs:
                run = await self._reserve(worker, job, nested=False)
                if run is not None:
                    runs.append(run)
                if worker.gen != gen:
                    break  # the worker died: its exit handler put the reserved jobs back
        except BaseException:
            for run in runs:  # not sent: they wait in the queue again
                self._unreserve(run)
            raise
        runs = [r for r in runs if self._running.get(r.job.id) is r and worker.gen == r.gen]
        for run in runs:
            run.samples = samples if len(runs) == len(jobs) else 0  # a pass that lost a job: not a size to learn
        return bool(runs) and await self._send(worker, runs)

    async def _send(self, worker: Slot, runs: list[_Run]) -> bool:
        """Hands reserved runs to the worker (several: one batch, one pass); False if they did not go."""
        for run in runs:
            run.started = time.monotonic()
            timeout = self._kinds[run.job.kind].timeout_s
            run.timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout, run)
            run.sent = True
        worker.last_base = _base_of(runs[0].job)
        orders = [JobOrder(r.job.id, r.job.kind, self._kinds[r.job.kind].pipeline, self._job_params(r.job),
                           self._kinds[r.job.kind].preemptible) for r in runs]
        try:
            await self._backend.dispatch(worker, orders)
        except Exception as exc:
            # Its inputs could not be read or sent (a remote worker lost meanwhile): a try used, as a crash.
            log.warning("jobs %s could not be handed to worker %d (%s)", [r.job.id for r in runs], worker.index,
                        _describe(exc))
            for run in runs:
                job = run.job
                if self._running.get(job.id) is run:
                    if job.attempts < job.max_tries:
                        await self._requeue(job, run)
                    else:
                        await self._fail(job, _error(JOB_CRASHED, tries=job.attempts), run)
            return False
        batch = {"batch": len(runs)} if len(runs) > 1 else {}
        for index, run in enumerate(runs):
            job = run.job
            self._event("started", job, worker=worker.index, nested=run.nested, attempt=job.attempts,
                        wait_s=(job.started_at or 0.0) - job.created_at, **batch,
                        **({"batch_index": index} if batch else {}))
        return True

    async def _reserve(self, worker: Slot, job: Job, nested: bool) -> _Run | None:
        """Takes the job off the queue and writes it running (the attempt counts now); None if it cannot go."""
        del self._queued[job.id]
        if job.attempts >= job.max_tries:
            # It was running when the service itself died, as many times as it may run.
            log.error("job %d: %d of %d tries used, giving up", job.id, job.attempts, job.max_tries)
            await self._fail(job, _error(JOB_CRASHED, tries=job.attempts))
            return None
        run = _Run(job, worker, worker.gen, nested, time.monotonic())
        self._running[job.id] = run
        worker.jobs.append(job.id)
        self._idle.clear()
        self._served += 1
        self._last_served[job.user_key] = self._served
        if len(self._last_served) > LAST_SERVED_MAX:
            self._forget_served()
        job.attempts += 1
        job.state = JobState.RUNNING
        job.started_at = time.time()
        try:
            written = await self._db(self._storage.mark_running, job.id)
        except BaseException:
            self._unreserve(run)
            raise
        if not written:  # the row is gone (its user deleted everything)
            self._end_run(run)
            return None
        if self._running.get(job.id) is not run or worker.gen != run.gen:
            return None  # the worker died meanwhile; its exit handler put the job back
        return run

    def _forget_served(self) -> None:
        """Keeps the round-robin memory bounded: drops the users served longest ago that have nothing queued or
        running, down to half of ``LAST_SERVED_MAX``. A dropped user counts as never served, which keeps them
        ahead of the users kept that wait for nothing, as their old entry did."""
        active = {job.user_key for job in self._active_jobs()}
        idle = sorted((served, user) for user, served in self._last_served.items() if user not in active)
        for _, user in idle[:len(self._last_served) - LAST_SERVED_MAX // 2]:
            del self._last_served[user]

    def _unreserve(self, run: _Run) -> None:
        """Undoes a dispatch whose row was not written: the job waits in the queue again."""
        if self._running.get(run.job.id) is not run:
            return  # the worker's exit handler settled it meanwhile
        self._end_run(run)
        job = run.job
        job.attempts = max(job.attempts - 1, 0)
        job.state, job.started_at = JobState.QUEUED, None
        if run.cancel:
            self._spawn_task(self._cancelled(job, run.notify), f"cancelled-{job.id}")
        else:
            self._queued[job.id] = job
            self._wake.set()

    def _on_timeout(self, run: _Run) -> None:
        if self._running.get(run.job.id) is not run or run.worker.gen != run.gen:
            return
        log.warning("job %d (%s) passed its timeout: killing worker %d", run.job.id, run.job.kind, run.worker.index)
        run.worker.doom[run.job.id] = "timeout"
        self._backend.kill(run.worker)

    def _end_run(self, run: _Run) -> None:
        """Forgets a run that ended (its outcome is recorded by the caller)."""
        self._running.pop(run.job.id, None)
        with contextlib.suppress(ValueError):
            run.worker.jobs.remove(run.job.id)
        if run.timer is not None:
            run.timer.cancel()
        run.ended.set()
        if not self._running:
            self._idle.set()
        if run.worker.idle:
            self._wake.set()

    # -- BackendEvents ------------------------------------------------------------------------
    @property
    def _slots(self) -> list[Slot]:
        return self._backend.slots

    def wake(self) -> None:
        """A slot became ready (or was added): look for work."""
        self._wake.set()

    async def on_message(self, worker: Slot, message: dict[str, Any]) -> None:
        """A job's message from a worker."""
        await self._on_message(worker, message)

    async def on_exit(self, worker: Slot, code: int | None, killed_by_us: bool) -> None:
        """Settles the jobs of a worker process that ended (the backend restarts it afterwards)."""
        doom = dict(worker.doom)
        if not killed_by_us:
            self._counters["worker_deaths"] += 1
        # A host is not at fault for the nested job it ran (depth > 0); jobs of one batch each are (depth 0).
        job_ids = list(worker.jobs)
        runs = [self._running.get(job_id) for job_id in job_ids]
        nested = [run is not None and run.nested for run in runs]
        for index in reversed(range(len(runs))):
            run, job_id, depth = runs[index], job_ids[index], sum(nested[index + 1:])
            if run is None or self._running.get(job_id) is not run:
                continue
            try:
                await self._settle_exit(run, doom.get(job_id), killed_by_us, depth)
            except Exception:
                # Its row keeps the state it had (running): the next start puts it back in the queue.
                log.exception("job %d: recording how it ended failed; its row decides at the next start", job_id)
                self._end_run(run)
        worker.jobs.clear()

    async def _settle_exit(self, run: _Run, doom: str | None, killed_by_us: bool, depth: int) -> None:
        """Records how a job of a worker that exited ends: failed, cancelled, back in the queue."""
        job = run.job
        if doom == "timeout":
            await self._fail(job, _error(JOB_TIMEOUT, timeout_s=self._kinds[job.kind].timeout_s), run)
        elif run.cancel:
            await self._cancelled(job, run.notify, run)
        elif killed_by_us or self._stopping or not run.sent or depth > 0:
            # Not its own fault (shutdown, a neighbour's timeout, not yet started): no attempt used.
            await self._release(job, run)
        elif job.attempts < job.max_tries:
            log.info("job %d will be retried (try %d of %d used)", job.id, job.attempts, job.max_tries)
            await self._requeue(job, run)
        else:
            await self._fail(job, _error(JOB_CRASHED, tries=job.attempts), run)

    async def _on_message(self, worker: Slot, message: dict[str, Any]) -> None:
        op = message["op"]
        run = self._running.get(int(message.get("job", -1)))
        if run is None or run.worker is not worker:
            log.warning("worker %d sent %r for job %s, which it does not run", worker.index, op, message.get("job"))
            if op == wp.YIELD:
                self._backend.resume(worker)
            return
        if op == wp.PROGRESS:
            run.step, run.total = int(message["step"]), int(message["total"])
            if not run.cancel:
                self._emit_progress(run.job, run.step, run.total, message.get("text"))
        elif op == wp.YIELD:
            await self._on_yield(worker, run)
        elif op == wp.DONE:
            await self._on_done(run, message.get("result") or {})
        elif op == wp.ERROR:
            if run.cancel:
                await self._cancelled(run.job, run.notify, run)
            else:
                await self._fail(run.job, _error(message["code"], **(message.get("details") or {})), run)
        elif op == wp.CRASH:
            job = run.job
            if run.cancel:
                await self._cancelled(job, run.notify, run)
            elif job.attempts < job.max_tries:
                log.info("job %d crashed (%s): retrying", job.id, message.get("error"))
                await self._requeue(job, run)
            else:
                await self._fail(job, _error(JOB_FAILED, tries=job.attempts), run)
        elif op == wp.CANCELLED:
            await self._cancelled(run.job, run.notify, run)
        else:
            log.warning("worker %d sent an unknown op %r", worker.index, op)

    async def _on_yield(self, worker: Slot, host: _Run) -> None:
        """A preemptible job is at a checkpoint: give its worker a waiting short job, or let it resume."""
        while not self._stopping and not host.cancel:
            job = self._pick(short_only=True, slots=[worker])
            if job is None:
                break
            try:
                if await self._dispatch(worker, job, nested=True):
                    return
            except Exception:
                log.exception("dispatching job %d inside job %d failed; it stays queued", job.id, host.job.id)
                break
            if worker.gen != host.gen:
                return
        self._backend.resume(worker)

    async def _on_done(self, run: _Run, result: dict[str, Any]) -> None:
        """Stores the result and its artifacts (DONE: never run again), then delivers."""
        job = run.job
        if run.cancel:
            await self._cancelled(job, run.notify, run)
            return
        meta = result.get("meta") or {}
        kind = str(meta.get("artifact_kind") or job.kind)
        file_meta = meta.get("file_meta") or []
        now = time.time()
        artifacts = [
            Artifact(
                id=new_artifact_id(), job_id=job.id, owner_key=job.user_key, kind=kind, path=str(path),
                media_type=media_type(path), created_at=now,
                meta=file_meta[i] if i < len(file_meta) and isinstance(file_meta[i], dict) else {},
            )
            for i, path in enumerate(result.get("files") or [])
        ]
        written = await self._db(self._storage.finish_job, job.id, result, artifacts)
        self._end_run(run)
        if not written:
            log.info("job %d finished after its user deleted their data: its result is dropped", job.id)
            await asyncio.to_thread(self._remove_orphan_result, result)
            return
        job.state, job.result, job.finished_at = JobState.DONE, result, now
        self._counters["done"] += 1
        seconds = time.monotonic() - run.started
        self._event("done", job, run_s=seconds, files=len(artifacts))
        self._start_delivery(job, artifacts)
        if run.samples and not run.nested:
            self._learn_pass(job.kind, run.samples, seconds)
        previous = self._averages.get(job.kind)
        self._averages[job.kind] = seconds if previous is None else previous * (1 - DURATION_ALPHA) + DURATION_ALPHA * seconds
        try:
            await self._db(self._storage.record_duration, job.kind, seconds, DURATION_ALPHA)
        except Exception:
            log.warning("could not record the duration of job %d (estimates only)", job.id, exc_info=True)

    def _remove_orphan_result(self, result: dict[str, Any]) -> None:
        """Removes the files a job of a deleted user wrote (only inside the users' folder)."""
        users = (self._data_dir / "users").resolve()
        for name in result.get("files") or []:
            path = Path(name).resolve()
            if path.is_relative_to(users):
                path.unlink(missing_ok=True)

    async def _requeue(self, job: Job, run: _Run | None = None) -> None:
        """Puts a job back in the queue after a crash (its attempt stays used)."""
        written = await self._db(self._storage.requeue, job.id)
        if run is not None:
            self._end_run(run)
        if not written:
            return  # the row is gone (its user deleted everything)
        if run is not None and run.cancel:  # cancelled while its row was written
            await self._cancelled(job, run.notify)
            return
        self._counters["retried"] += 1
        self._event("retried", job, attempt=job.attempts)
        job.state = JobState.QUEUED
        self._queued[job.id] = job
        self._wake.set()

    async def _release(self, job: Job, run: _Run | None = None) -> None:
        """Puts a job back without using up its attempt."""
        written = await self._db(self._storage.release_job, job.id)
        if run is not None:
            self._end_run(run)
        if not written:
            return
        if run is not None and run.cancel:
            await self._cancelled(job, run.notify)
            return
        job.state = JobState.QUEUED
        job.attempts = max(job.attempts - 1, 0)
        job.started_at = None
        self._queued[job.id] = job
        self._wake.set()

    async def _fail(self, job: Job, error: dict[str, Any], run: _Run | None = None) -> None:
        """Records the failure, then tells the user (sent as a delivery: until it reaches the chat)."""
        written = await self._db(self._storage.end_job, job.id, JobState.FAILED, error, notify=True)
        if run is not None:
            self._end_run(run)
        if not written:
            return
        self._counters["failed"] += 1
        job.state, job.error, job.finished_at = JobState.FAILED, error, time.time()
        self._event("failed", job, code=error["code"], total_s=time.time() - job.created_at)
        self._start_delivery(job)

    async def _cancelled(self, job: Job, notify: bool, run: _Run | None = None) -> None:
        written = await self._db(self._storage.end_job, job.id, JobState.CANCELLED)
        if run is not None:
            self._end_run(run)
        job.state = JobState.CANCELLED
        if not written:
            self._lanes.pop(job.id, None)
            return
        self._counters["cancelled"] += 1
        self._event("cancelled", job, total_s=time.time() - job.created_at)
        if notify:
            self._final(job, lambda: self._sink.on_cancelled(job), "cancelled")
        else:
            self._lanes.pop(job.id, None)

    async def _cancel(self, user_key: str, job_id: int | None, notify: bool) -> list[int]:
        wanted = [j for j in self._queued.values() if j.user_key == user_key and job_id in (None, j.id)]
        for job in wanted:
            del self._queued[job.id]  # before any await: the pump can no longer pick it
        ids = [j.id for j in wanted]
        for run in list(self._running.values()):
            if run.job.user_key == user_key and job_id in (None, run.job.id):
                ids.append(run.job.id)
                run.notify = run.notify and notify if run.cancel else notify
                if not run.cancel:
                    run.cancel = True
                    self._backend.cancel(run.worker, run.job.id)
                    log.info("job %d: cancel sent to worker %d", run.job.id, run.worker.index)
        for index, job in enumerate(wanted):
            try:
                await self._cancelled(job, notify)
            except BaseException:
                for rest in wanted[index:]:  # not written: they wait in the queue again
                    self._queued[rest.id] = rest
                self._wake.set()
                raise
        return sorted(ids)

    # -- internals: sink ---------------------------------------------------------------------
    async def _sink_call(self, what: str, job: Job, call: Callable[[], Awaitable[None]]) -> None:
        try:
            await call()
        except Exception:
            log.exception("sink %s for job %d failed", what, job.id)

    def _emit_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        lane = self._lanes.setdefault(job.id, _Lane())
        lane.pending = (step, total, text)
        if lane.task is None or lane.task.done():
            lane.task = self._spawn_task(self._send_progress(job, lane), f"progress-{job.id}")

    async def _send_progress(self, job: Job, lane: _Lane) -> None:
        # Only the latest step is sent: a slow sink sees fewer, never stale, updates.
        while lane.pending is not None:
            step, total, text = lane.pending
            lane.pending = None
            await self._sink_call("on_progress", job, lambda: self._sink.on_progress(job, step, total, text))

    async def _flush_progress(self, job_id: int) -> None:
        """Drops unsent progress of a finished job and waits for an edit in flight."""
        lane = self._lanes.pop(job_id, None)
        if lane is None:
            return
        lane.pending = None
        if lane.task is not None and not lane.task.done():
            await asyncio.wait({lane.task}, timeout=PROGRESS_FLUSH_S)

    def _final(self, job: Job, call: Callable[[], Awaitable[None]], what: str) -> None:
        async def run() -> None:
            await self._flush_progress(job.id)
            await self._sink_call(what, job, call)
        self._spawn_task(run(), f"{what}-{job.id}")

    def _start_delivery(self, job: Job, artifacts: list[Artifact] | None = None) -> None:
        """Starts sending a finished job's outcome: a DONE job's results, or why a FAILED job failed."""
        if job.id not in self._delivering:
            task = self._spawn_task(self._deliver(job, artifacts), f"deliver-{job.id}")
            self._delivering[job.id] = (job, task)

    def _backoff(self, tries: int) -> float:
        """Seconds before try `tries` + 1: doubling from ``delivery_retry_s``, capped."""
        first, cap = self._settings.delivery_retry_s, self._settings.delivery_max_backoff_s
        return min(first * 2 ** min(max(tries - 1, 0), 30), cap)

    def _expired(self, job: Job) -> bool:
        """Whether retention has (or is about to have) removed the job's result."""
        if self._results_ttl_s is None:
            return False
        return time.time() > (job.finished_at or job.created_at) + self._results_ttl_s

    async def _deliver(self, job: Job, artifacts: list[Artifact] | None) -> None:
        """Sends a finished job's outcome until the chat has it, trying again with capped backoff (the next
        try's time is in the row, so a restart keeps the pace); the user hears when a result runs late.
        A refusal for good, or a result retention removed, ends it."""
        try:
            await self._flush_progress(job.id)
            while True:
                wait = (job.deliver_after or 0.0) - time.time()
                if wait > 0:
                    await self._pause(wait)
                    if self._stopping:
                        return  # the row says when to try next: the next start goes on
                if self._expired(job):
                    await self._give_up(job, JOB_EXPIRED, "its result expired before the chat took it")
                    return
                try:
                    if job.state == JobState.DONE:
                        if artifacts is None:  # re-read: the sink may have marked some delivered
                            artifacts = await self._db(self._storage.job_artifacts, job.id)
                        if not artifacts and (job.result or {}).get("files"):
                            await self._give_up(job, JOB_EXPIRED, "retention removed its result")
                            return
                        if job.delivery_tries >= LATE_NOTICE_AFTER_TRIES and job.late_notice_at is None:
                            await self._sink.on_late(job)
                            await self._db(self._storage.set_late_notice, job.id)
                            job.late_notice_at = time.time()
                        await self._sink.deliver(job, artifacts)
                    else:
                        await self._sink.on_failed(job, job.error or _error(JOB_FAILED))
                except ChatUnreachable as exc:
                    await self._give_up(job, JOB_UNREACHABLE, f"the chat refused it for good ({exc})")
                    return
                except Exception as exc:
                    artifacts = None
                    delay = self._backoff(job.delivery_tries + 1)
                    retry_at = time.time() + delay
                    job.delivery_tries = await self._db(self._storage.delivery_failed, job.id, retry_at)
                    job.deliver_after = retry_at
                    # The first failure with its traceback; later ones in a line each.
                    log.warning("sending the outcome of job %d failed (try %d: %s); trying again in %.1f s", job.id,
                                job.delivery_tries, _describe(exc), delay, exc_info=job.delivery_tries == 1)
                    continue
                await self._delivered(job)
                return
        finally:
            self._delivering.pop(job.id, None)

    async def _delivered(self, job: Job) -> None:
        if job.state == JobState.DONE:
            await self._db(self._storage.mark_job_delivered, job.id)
            job.state = JobState.DELIVERED
            self._event("delivered", job, total_s=time.time() - job.created_at, tries=job.delivery_tries + 1)
        else:
            await self._db(self._storage.mark_notified, job.id)
            job.notified_at = time.time()

    async def _give_up(self, job: Job, code: str, why: str) -> None:
        """Ends the sending of a job's outcome for good: a result becomes a failure nobody is told of."""
        log.warning("job %d: %s; not sending it again", job.id, why)
        if job.state == JobState.DONE:
            error = _error(code)
            await self._db(self._storage.end_job, job.id, JobState.FAILED, error)
            job.state, job.error = JobState.FAILED, error
            self._counters["failed"] += 1
            self._event("failed", job, code=code, total_s=time.time() - job.created_at)
        else:
            await self._db(self._storage.mark_notified, job.id)
