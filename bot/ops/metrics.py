"""Prometheus metrics of the job queue, served at ``http://<[metrics] address>/metrics`` when enabled.

``JobMetrics.observe`` is the scheduler's job event hook: it counts submissions, retries,
failures (by code), cancellations and deliveries, and observes run times, queue waits and
end-to-end latency per kind, the jobs per pass (cross-user batching) and the pictures (result
files) made per second by kind over the last ``RATE_WINDOW_S``. Gauges (queue length and running
jobs by kind, worker liveness and memory) are read from ``Scheduler.health()`` at each scrape.
``serve_metrics`` serves the registry on the service's own event loop (aiohttp), so a scrape never
races the scheduler from a thread.

Usage::

    metrics = JobMetrics()
    scheduler = Scheduler(..., on_event=metrics.observe)
    metrics.watch(scheduler.health)
    async with serve_metrics(metrics.registry, "127.0.0.1:9464") as url:
        ...
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.config import parse_address
from bot.storage import Job

log = logging.getLogger(__name__)

PREFIX = "facechain"
# Seconds: from a one-second cartoon to an hour of LoRA training.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# Jobs sharing one pass of a worker (scheduler.batch_max caps their samples).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
RATE_WINDOW_S = 300.0  # pictures per second are averaged over this window
HealthSource = Callable[[], dict[str, Any]]


class _SchedulerCollector(Collector):
    """Reads the scheduler's health() at scrape time: queue, running jobs, workers."""

    def __init__(self, health: HealthSource, kinds: Callable[[], list[str]]) -> None:
        self._health = health
        self._kinds = kinds

    def collect(self) -> Iterator[Metric]:
        state = self._health()
        by_queued, by_running = state.get("queued_by_kind", {}), state.get("running_by_kind", {})
        kinds = sorted(set(self._kinds()) | set(by_queued) | set(by_running))
        queued = GaugeMetricFamily(f"{PREFIX}_queue_length", "Jobs waiting for a worker, by kind.", labels=["kind"])
        running = GaugeMetricFamily(f"{PREFIX}_jobs_running", "Jobs running on a worker, by kind.", labels=["kind"])
        for kind in kinds:
            queued.add_metric([kind], by_queued.get(kind, 0))
            running.add_metric([kind], by_running.get(kind, 0))
        yield queued
        yield running
        delivering = GaugeMetricFamily(f"{PREFIX}_jobs_delivering", "Finished jobs whose results are being sent.")
        delivering.add_metric([], state.get("delivering", 0))
        yield delivering
        labels = ["worker", "device"]
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the worker process is ready for jobs.", labels=labels)
        busy = GaugeMetricFamily(f"{PREFIX}_worker_busy", "1 while the worker runs a job.", labels=labels)
        silent = GaugeMetricFamily(f"{PREFIX}_worker_silence_seconds",
                                   "Seconds since the worker process last answered.", labels=labels)
        memory = GaugeMetricFamily(f"{PREFIX}_worker_memory_bytes",
                                   "Worker memory from its last pong: rss, cuda_allocated, cuda_reserved, "
                                   "cuda_free, cuda_total (CUDA once a pipeline used the device).",
                                   labels=[*labels, "type"])
        now = time.time()
        for worker in state.get("worker_states", []):
            values = [str(worker["index"]), str(worker["device"])]
            up.add_metric(values, 1 if worker.get("alive") else 0)
            busy.add_metric(values, 1 if worker.get("busy") else 0)
            if worker.get("heard"):
                silent.add_metric(values, max(now - worker["heard"], 0.0))
            for kind, value in sorted((worker.get("memory") or {}).items()):
                memory.add_metric([*values, kind], value)
        yield from (up, busy, silent, memory)


class PictureRate(Collector):
    """Pictures (result files) per second by kind over the last RATE_WINDOW_S, from done events."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._done: dict[str, deque[tuple[float, int]]] = {}

    def add(self, kind: str, files: int) -> None:
        self._done.setdefault(kind, deque()).append((self._clock(), files))

    def collect(self) -> Iterator[Metric]:
        rate = GaugeMetricFamily(f"{PREFIX}_pictures_per_second",
                                 f"Result files (pictures) per second over the last {RATE_WINDOW_S:.0f} s, by kind.",
                                 labels=["kind"])
        since = self._clock() - RATE_WINDOW_S
        for kind, done in sorted(self._done.items()):
            while done and done[0][0] < since:
                done.popleft()
            rate.add_metric([kind], sum(files for _, files in done) / RATE_WINDOW_S)
        yield rate


class JobMetrics:
    """The service's metrics in their own registry; ``observe`` is the scheduler's event hook."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.submitted = Counter(f"{PREFIX}_jobs_submitted", "Jobs accepted into the queue.", ["kind"], registry=r)
        self.retried = Counter(f"{PREFIX}_job_retries", "Jobs put back after a crash or a worker death.", ["kind"],
                               registry=r)
        self.failed = Counter(f"{PREFIX}_job_failures", "Jobs that ended failed, by message code.", ["kind", "code"],
                              registry=r)
        self.cancelled = Counter(f"{PREFIX}_jobs_cancelled", "Jobs cancelled by their user.", ["kind"], registry=r)
        self.delivered = Counter(f"{PREFIX}_deliveries", "Jobs whose results reached the chat.", ["kind"], registry=r)
        self.run_seconds = Histogram(f"{PREFIX}_job_duration_seconds", "Run time of a successful job on its worker.",
                                     ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self.wait_seconds = Histogram(f"{PREFIX}_job_queue_wait_seconds", "Time from submission to a worker start.",
                                      ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self.latency_seconds = Histogram(f"{PREFIX}_job_latency_seconds", "Time from submission to delivery.",
                                         ["kind"], buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Jobs sharing one pass of a worker (1: alone).", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.pictures = Counter(f"{PREFIX}_pictures", "Result files (pictures) of finished jobs.", ["kind"], registry=r)
        self.picture_rate = PictureRate()
        r.register(self.picture_rate)
        ProcessCollector(namespace=PREFIX, registry=r)
        self._watching = False

    def watch(self, health: HealthSource, kinds: Callable[[], list[str]] = list) -> None:
        """Adds the gauges read from `health` (``Scheduler.health``) at each scrape; `kinds` lists every kind."""
        if self._watching:
            raise RuntimeError("JobMetrics already watches a scheduler")
        self.registry.register(_SchedulerCollector(health, kinds))
        self._watching = True

    def observe(self, event: str, job: Job, fields: dict[str, Any]) -> None:
        """Counts one job event (see ``bot.engine.scheduler.JobEventHook``)."""
        kind = job.kind
        if event == "queued":
            self.submitted.labels(kind).inc()
        elif event == "started":
            if "wait_s" in fields:
                self.wait_seconds.labels(kind).observe(max(float(fields["wait_s"]), 0.0))
            if not fields.get("batch_index"):  # once per pass
                self.batch_size.labels(kind).observe(int(fields.get("batch", 1)))
        elif event == "done":
            self.run_seconds.labels(kind).observe(float(fields["run_s"]))
            files = int(fields.get("files", 0))
            self.pictures.labels(kind).inc(files)
            self.picture_rate.add(kind, files)
        elif event == "retried":
            self.retried.labels(kind).inc()
        elif event == "failed":
            self.failed.labels(kind, str(fields.get("code", "unknown"))).inc()
        elif event == "cancelled":
            self.cancelled.labels(kind).inc()
        elif event == "delivered":
            self.delivered.labels(kind).inc()
            if "total_s" in fields:
                self.latency_seconds.labels(kind).observe(max(float(fields["total_s"]), 0.0))


@asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, address: str) -> AsyncIterator[str]:
    """Serves ``/metrics`` at `address` (``host:port``, port 0: any free one); yields the URL."""
    host, port = parse_address(address)

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{shown_host}:{bound_port}/metrics"
        log.info("metrics: serving %s", url)
        yield url
    finally:
        await runner.cleanup()
