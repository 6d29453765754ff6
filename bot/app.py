"""Builds the service: config -> storage -> scheduler -> adapters, nested on one event loop.

``run_service(settings, stop)`` runs until `stop` is set (SIGINT/SIGTERM in the CLI), then
stops taking jobs, gives running jobs the grace period, and closes everything in reverse order.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from bot.config import Settings
from bot.engine.jobkinds import JobKind, JobKinds
from bot.ops.metrics import JobMetrics, serve_metrics
from bot.ops.retention import DAY_S, run_retention
from bot.engine.backends import create_backend
from bot.engine.scheduler import Scheduler
from bot.storage import Artifact, Job, Storage
from facechain_core.manifest import installed_features
from facechain_core.styles import load_styles
from handlers import features as _features  # noqa: F401  (registers every command)
from handlers import duo
from handlers import progress as job_views
from handlers.protocols import Chat, ReplyChannel
from handlers.style_sources import published_dir
from handlers.services import Services

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 10.0


class HandlerSink:
    """The scheduler's JobSink: hands job events to the platform-neutral handlers.

    Every call waits until the chat adapters run (`ready`): results left undelivered by the last run
    go out as soon as the platforms are up, not one failed try later."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.ready = asyncio.Event()

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        await self.ready.wait()
        await job_views.show_progress(self.services, job, step, total, text)

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        await self.ready.wait()
        await job_views.deliver_result(self.services, job, artifacts)

    async def on_late(self, job: Job) -> None:
        await self.ready.wait()
        await job_views.report_late(self.services, job)

    async def on_failed(self, job: Job, error: dict[str, Any]) -> None:
        await self.ready.wait()
        await job_views.report_failure(self.services, job, error)

    async def on_cancelled(self, job: Job) -> None:
        await self.ready.wait()
        await job_views.report_cancelled(self.services, job)


@dataclass
class Service:
    """The running service, for tests and the CLI."""

    settings: Settings
    storage: Storage
    scheduler: Scheduler
    services: Services
    adapters: dict[str, Any] = field(default_factory=dict)
    metrics_url: str | None = None  # where /metrics is served, when [metrics] is enabled


def pipeline_context(settings: Settings) -> dict[str, Any]:
    """What every worker gets to build its PipelineContext."""
    return {
        "models_dir": str(settings.models_dir.resolve()),
        "styles_dir": str(settings.styles_dir),
        "log_format": settings.log_format,
        "settings": {**settings.pipeline, "model_paths": {k: str(v) for k, v in settings.model_paths.items()}},
    }


def _devices(settings: Settings) -> list[str]:
    return [f"cuda:{index}" for index in settings.scheduler.gpus] or ["cpu"]


async def _heartbeat(settings: Settings, scheduler: Scheduler) -> None:
    """Writes a small JSON heartbeat that `facechain-bot health` (and Docker's HEALTHCHECK) reads.

    Each beat also pings the workers: the next beat shows when each last answered, and its memory.
    A beat that fails (a full disk) is logged; the next one tries again.
    """
    while True:
        try:
            state = {"time": time.time(), **scheduler.health()}
            tmp = settings.heartbeat_path.with_suffix(".tmp")
            await asyncio.to_thread(tmp.write_text, json.dumps(state))
            await asyncio.to_thread(tmp.replace, settings.heartbeat_path)
        except Exception:
            log.warning("could not write the heartbeat %s", settings.heartbeat_path, exc_info=True)
        try:
            scheduler.ping_workers()
        except Exception:
            log.warning("could not ping the workers", exc_info=True)
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


async def _stop_task(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _stop_tasks(tasks: set[asyncio.Task[Any]]) -> None:
    for task in list(tasks):
        await _stop_task(task)


def _build_adapters(settings: Settings, services: Services) -> dict[str, Any]:
    adapters: dict[str, Any] = {}
    if settings.telegram.enabled:
        from bot.platforms.telegram_adapter import TelegramAdapter

        adapters["telegram"] = TelegramAdapter(settings, services)
    if settings.discord.enabled:
        from bot.platforms.discord_adapter import DiscordAdapter

        adapters["discord"] = DiscordAdapter(settings, services)
    return adapters


@asynccontextmanager
async def open_service(settings: Settings, extra_kinds: Iterable[JobKind] = ()) -> AsyncIterator[Service]:
    """Opens storage, starts the workers and the adapters; closes them in reverse order."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        storage = await stack.enter_async_context(Storage(settings.db_path))
        kinds = JobKinds(overrides=settings.scheduler.kinds)
        for kind in extra_kinds:
            kinds.register(kind)
        adapters: dict[str, Any] = {}

        def channel_for(chat: Chat) -> ReplyChannel:
            return adapters[chat.platform].channel_for(chat)

        async def private_chat(user: User) -> Chat:
            return await adapters[user.platform].private_chat(user)

        features = await asyncio.to_thread(
            installed_features, settings.models_dir, {k: str(v) for k, v in settings.model_paths.items()})
        log.info("features installed: %s", ", ".join(sorted(features)) or "none")
        if settings.pipeline.get("safe_mode", True) and "safety" not in features:
            log.warning("safe mode is on but the safety checker is not installed: generated pictures go out "
                        "unchecked until `facechain-bot models pull safety` (or [pipeline] safety_required = true)")
        services = Services.build(settings, storage, channel_for=channel_for, private_chat=private_chat,
                                  features_installed=features,
                                  styles=load_styles(settings.styles_dir, published_dir(settings.data_dir)))
        metrics = JobMetrics() if settings.metrics.enabled else None
        sink = HandlerSink(services)
        context = pipeline_context(settings)
        backend = create_backend(settings.scheduler, context, data_dir=settings.data_dir, devices=_devices(settings),
                                 secrets=settings.secrets(), kind_needs=kinds.needs())
        scheduler = Scheduler(
            storage, kinds, settings.scheduler, data_dir=settings.data_dir,
            context=context, sink=sink, backend=backend,
            on_event=metrics.observe if metrics is not None else None, secrets=settings.secrets(),
            results_ttl_s=settings.retention.results_days * DAY_S or None,
        )
        services.jobs = scheduler
        await stack.enter_async_context(scheduler)
        metrics_url = None
        if metrics is not None:
            metrics.watch(scheduler.health, kinds.names)
            metrics_url = await stack.enter_async_context(serve_metrics(metrics.registry, settings.metrics.address))
        adapters.update(_build_adapters(settings, services))
        for name, adapter in adapters.items():
            log.info("starting the %s adapter", name)
            await stack.enter_async_context(adapter)
        sink.ready.set()
        heartbeat = asyncio.create_task(_heartbeat(settings, scheduler), name="heartbeat")
        stack.callback(heartbeat.cancel)
        retention = asyncio.create_task(run_retention(services, settings.retention), name="retention")
        stack.push_async_callback(_stop_task, retention)  # before storage closes: a sweep writes rows
        await duo.resume_timers(services)  # duo requests waiting for consent when the service last stopped
        stack.push_async_callback(_stop_tasks, services.runtime.tasks)
        try:
            yield Service(settings, storage, scheduler, services, adapters, metrics_url)
        finally:
            log.info("shutting down: no new jobs; running jobs get %.0f s", settings.scheduler.shutdown_grace_s)
            await scheduler.stop(settings.scheduler.shutdown_grace_s)


async def run_service(settings: Settings, stop: asyncio.Event) -> None:
    """Runs the service until `stop` is set. A stop while it is still starting (a chat API not reachable
    yet) cancels the start, which closes what had started."""
    started = asyncio.Event()
    serving = asyncio.create_task(_serve(settings, stop, started), name="service")
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done() and not started.is_set():
            log.info("stop asked while starting: cancelling the start")
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            return
        await serving
    finally:
        stopping.cancel()


async def _serve(settings: Settings, stop: asyncio.Event, started: asyncio.Event) -> None:
    async with open_service(settings) as service:
        started.set()
        log.info("FaceChain Bot running: %s; workers on %s", ", ".join(service.adapters) or "no chat platform",
                 ", ".join(_devices(settings)))
        await stop.wait()
