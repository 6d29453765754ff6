"""Prometheus metrics: a real scheduler runs devtools jobs (done, failed, retried), then the HTTP
endpoint is scraped and its numbers checked; the service serves it only when enabled."""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import open_service
from bot.config import SchedulerSettings, Settings
from bot.engine.jobkinds import GENERATE, JobKind, JobKinds
from bot.ops.logsetup import JsonFormatter
from bot.ops.metrics import JobMetrics, serve_metrics
from bot.engine.scheduler import Scheduler
from bot.storage import Artifact, Job, Storage
from handlers.protocols import Chat

PIPELINE = "facechain_core.devtools:SleepPipeline"
CHAT = Chat("test", "1", True)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Sink:
    """Accepts every delivery at once."""

    async def on_progress(self, job: Job, step: int, total: int, text: str | None) -> None:
        pass

    async def deliver(self, job: Job, artifacts: list[Artifact]) -> None:
        pass

    async def on_late(self, job: Job) -> None:
        pass

    async def on_failed(self, job: Job, error: dict[str, Any]) -> None:
        pass

    async def on_cancelled(self, job: Job) -> None:
        pass


async def scrape(url: str) -> Samples:
    """Every sample of the endpoint, keyed by (sample name, labels)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_scrape_after_jobs_counts_what_happened(tmp_path: Path) -> None:
    kinds = JobKinds(())
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    kinds.register(JobKind("slow", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    metrics = JobMetrics()
    async with Storage(tmp_path / "db.sqlite3") as storage:
        scheduler = Scheduler(storage, kinds, SchedulerSettings(), data_dir=tmp_path / "data",
                              context={"models_dir": str(tmp_path)}, sink=Sink(), devices=["cpu"],
                              on_event=metrics.observe)
        metrics.watch(scheduler.health, kinds.names)
        await scheduler.start()
        try:
            async with serve_metrics(metrics.registry, "127.0.0.1:0") as url:
                # A slow job holds the only worker: two quick ones wait behind it.
                slow = await scheduler.submit("u:a", "slow", {"steps": 8, "delay_s": 0.1}, CHAT)
                await until(lambda: _running(scheduler, "slow"))
                quick = [await scheduler.submit(f"u:{i}", "quick", {"steps": 2, "delay_s": 0.05}, CHAT)
                         for i in range(2)]
                busy = await scrape(url)
                assert value(busy, "facechain_queue_length", kind="quick") == 2
                assert value(busy, "facechain_queue_length", kind="slow") == 0
                assert value(busy, "facechain_jobs_running", kind="slow") == 1
                assert value(busy, "facechain_worker_busy", worker="0", device="cpu") == 1

                # One job fails with a user-facing code; one crashes once and succeeds on its retry.
                failing = await scheduler.submit("u:c", "quick", {"fail_code": "selfie.no_face"}, CHAT)
                crashing = await scheduler.submit(
                    "u:d", "quick", {"steps": 2, "crash_at": 1, "crash_marker": str(tmp_path / "crashed")}, CHAT)
                ids = [slow.job_id, *(q.job_id for q in quick), failing.job_id, crashing.job_id]

                async def settled() -> bool:
                    states = [(await storage.job(i)).state for i in ids]
                    return states == ["delivered", "delivered", "delivered", "failed", "delivered"]
                await until(settled)
                scheduler.ping_workers()
                await until(lambda: _has_memory(scheduler))
                samples = await scrape(url)
        finally:
            await scheduler.stop(grace_s=0)

    assert value(samples, "facechain_jobs_submitted_total", kind="quick") == 4
    assert value(samples, "facechain_jobs_submitted_total", kind="slow") == 1
    assert value(samples, "facechain_deliveries_total", kind="quick") == 3
    assert value(samples, "facechain_deliveries_total", kind="slow") == 1
    assert value(samples, "facechain_job_failures_total", kind="quick", code="selfie.no_face") == 1
    assert value(samples, "facechain_job_retries_total", kind="quick") == 1
    assert value(samples, "facechain_job_retries_total", kind="slow") == 0
    # Durations: one observation per successful run; the slow one slept 0.8 s.
    assert value(samples, "facechain_job_duration_seconds_count", kind="quick") == 3
    assert value(samples, "facechain_job_duration_seconds_count", kind="slow") == 1
    assert 0.8 <= value(samples, "facechain_job_duration_seconds_sum", kind="slow") < 10
    assert value(samples, "facechain_job_duration_seconds_bucket", kind="slow", le="0.5") == 0
    assert value(samples, "facechain_job_duration_seconds_bucket", kind="slow", le="+Inf") == 1
    assert value(samples, "facechain_job_queue_wait_seconds_count", kind="quick") == 5  # 4 jobs, one started twice
    assert value(samples, "facechain_job_latency_seconds_count", kind="quick") == 3
    # The queue drained; the worker answered a ping with its memory.
    assert value(samples, "facechain_queue_length", kind="quick") == 0
    assert value(samples, "facechain_jobs_running", kind="slow") == 0
    assert value(samples, "facechain_worker_up", worker="0", device="cpu") == 1
    assert value(samples, "facechain_worker_memory_bytes", worker="0", device="cpu", type="rss") > 10_000_000
    assert 0 <= value(samples, "facechain_worker_silence_seconds", worker="0", device="cpu") < 5
    assert value(samples, "facechain_process_resident_memory_bytes") > 0


async def _running(scheduler: Scheduler, kind: str) -> bool:
    return scheduler.health()["running_by_kind"].get(kind, 0) == 1


async def _has_memory(scheduler: Scheduler) -> bool:
    return all(w["memory"].get("rss") for w in scheduler.health()["worker_states"])


@pytest.mark.parametrize("enabled", [True, False])
async def test_the_service_serves_metrics_only_when_enabled(tmp_path: Path, enabled: bool) -> None:
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                        metrics={"enabled": enabled, "address": "127.0.0.1:0"})
    async with open_service(settings) as service:
        if not enabled:
            assert service.metrics_url is None
            return
        assert service.metrics_url is not None and service.metrics_url.startswith("http://127.0.0.1:")
        samples = await scrape(service.metrics_url)
    for kind in ("identity", "portrait", "train"):  # every configured kind shows, also at zero
        assert ("facechain_queue_length", frozenset({("kind", kind)})) in samples
    assert value(samples, "facechain_worker_up", worker="0", device="cpu") == 1


def test_address_is_validated(tmp_path: Path) -> None:
    from bot.config import ConfigError, load_config

    path = tmp_path / "config.toml"
    path.write_text('[metrics]\nenabled = true\naddress = "localhost"\n')
    with pytest.raises(ConfigError, match="metrics.address"):
        load_config(path)
    path.write_text('[metrics]\nenabled = true\naddress = "[::1]:9464"\n')
    assert load_config(path).metrics.address == "[::1]:9464"


# -- job event log lines ------------------------------------------------------------------------
async def test_one_log_line_per_job_event_as_text_and_json(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="bot.engine.scheduler")
    kinds = JobKinds(())
    kinds.register(JobKind("quick", PIPELINE, GENERATE, max_tries=2, timeout_s=30))
    async with Storage(tmp_path / "db.sqlite3") as storage:
        scheduler = Scheduler(storage, kinds, SchedulerSettings(), data_dir=tmp_path / "data",
                              context={"models_dir": str(tmp_path), "log_format": "json", "log_level": "INFO"},
                              sink=Sink(), devices=["cpu"])
        await scheduler.start()
        try:
            ok = await scheduler.submit("telegram:7", "quick", {"steps": 2, "delay_s": 0.05}, CHAT)
            bad = await scheduler.submit("telegram:8", "quick", {"fail_code": "selfie.no_face"}, CHAT)

            async def settled() -> bool:
                return [(await storage.job(i)).state for i in (ok.job_id, bad.job_id)] == ["delivered", "failed"]
            await until(settled)
        finally:
            await scheduler.stop(grace_s=0)

    events = [r for r in caplog.records if hasattr(r, "job_event")]
    by_job = {job_id: [r for r in events if r.job_event["job"] == job_id] for job_id in (ok.job_id, bad.job_id)}
    assert [r.job_event["event"] for r in by_job[ok.job_id]] == ["queued", "started", "done", "delivered"]
    assert [r.job_event["event"] for r in by_job[bad.job_id]] == ["queued", "started", "failed"]
    for record in by_job[ok.job_id]:
        assert record.getMessage().startswith(f"job {ok.job_id} {record.job_event['event']}: kind=quick user=telegram:7")
    done = by_job[ok.job_id][2]
    assert 0.1 <= done.job_event["run_s"] < 10 and f"run_s={done.job_event['run_s']:.2f}" in done.getMessage()
    assert "code=selfie.no_face" in by_job[bad.job_id][2].getMessage()

    line = json.loads(JsonFormatter().format(done))
    assert {k: line[k] for k in ("event", "job", "kind", "user", "level", "logger")} == {
        "event": "done", "job": ok.job_id, "kind": "quick", "user": "telegram:7", "level": "INFO",
        "logger": "bot.engine.scheduler"}
    assert line["message"] == done.getMessage() and line["run_s"] == done.job_event["run_s"]

    # The worker process wrote JSON lines too (log_format travels in its init message).
    worker_lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    assert any(x["logger"] == "bot.engine.worker" and x["worker"] == "cpu" for x in worker_lines)


def test_configure_logging_writes_json_lines(tmp_path: Path) -> None:
    code = ("import logging; from bot.config import Settings; from bot.ops.logsetup import configure_logging; "
            "configure_logging(Settings(log_format='json', telegram={'token': '123456:SECRETSECRET'})); "
            "logging.getLogger('demo').info('token %s here', '123456:SECRETSECRET')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    (line,) = [json.loads(x) for x in done.stderr.splitlines()]
    assert (line["logger"], line["level"]) == ("demo", "INFO")
    assert "SECRETSECRET" not in done.stderr and line["message"].startswith("token ")
