"""`facechain-bot health`: 0 while the heartbeat is fresh and every worker answers (also while busy),
1 with a one-line reason otherwise; checked against a running service whose worker is frozen."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

import bot.app
from bot import cli
from bot.app import open_service
from bot.config import Settings
from bot.engine.jobkinds import JobKind
from handlers.protocols import Chat

SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", 1, 1, 60)
NOW = 1_000_000.0


def beat(**overrides) -> dict:
    worker = {"index": 0, "device": "cpu", "pid": 123, "alive": True, "busy": False, "heard": NOW - 5, "memory": {}}
    state = {"time": NOW - 3, "accepting": True, "workers": 1, "workers_alive": 1, "queued": 0, "running": 0,
             "worker_states": [worker]}
    state.update(overrides)
    return state


def worker(**fields) -> dict:
    return {**beat()["worker_states"][0], **fields}


@pytest.mark.parametrize(("state", "reason"), [
    (beat(), None),
    (beat(time=NOW - 95), "heartbeat 95 s old (the service is stopped or stuck)"),
    (beat(accepting=False), "the service is shutting down"),
    (beat(worker_states=[worker(), worker(index=1, device="cuda:1", heard=NOW - 95)]),
     "worker 1 (cuda:1) silent for 95 s"),
    (beat(worker_states=[worker(alive=False)]), "worker 0 (cpu) is not running (it is being restarted)"),
    (beat(worker_states=[worker(busy=True, heard=NOW - 20)]), None),
    ({"time": NOW, "workers_alive": 0}, "no worker process is running"),  # an older heartbeat format
])
def test_health_problem(state: dict, reason: str | None) -> None:
    assert cli.health_problem(state, NOW, max_age_s=60, max_silence_s=60) == reason


def _config(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'data_dir = "{data_dir}"\nmodels_dir = "{tmp_path / "models"}"\n')
    return path


def _health(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli.main(["--config", str(config), "health", *extra])
    out = capsys.readouterr().out.strip()
    assert "\n" not in out  # one line
    return code, out


def test_no_heartbeat_is_unhealthy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _health(_config(tmp_path, tmp_path / "data"), capsys)
    assert code == 1 and out.startswith("unhealthy: no heartbeat at ")


async def _heartbeat_after(path: Path, since: float, timeout: float = 10.0) -> dict:
    """The first heartbeat written after `since` in which every worker has answered a ping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("time", 0) > since and all(w["heard"] > since and w["memory"] for w in state["worker_states"]):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError("no fresh heartbeat")


async def test_running_service_is_healthy_until_a_worker_goes_silent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.app, "HEARTBEAT_INTERVAL_S", 0.1)
    data_dir = tmp_path / "data"
    config = _config(tmp_path, data_dir)
    settings = Settings(data_dir=data_dir, models_dir=tmp_path / "models", scheduler={"shutdown_grace_s": 0})
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        state = await _heartbeat_after(settings.heartbeat_path, time.time())
        assert state["worker_states"][0]["memory"]["rss"] > 0
        code, out = _health(config, capsys)
        assert (code, out.split(",")[0].split(":")[0]) == (0, "healthy")

        # A busy worker (a job sleeping in its pipeline, no progress) still answers pings.
        await service.scheduler.submit("test:1", "test.sleep", {"steps": 1, "hang_at": 1}, Chat("test", "1", True))
        await asyncio.sleep(1.0)
        assert service.scheduler.health()["running"] == 1
        code, out = _health(config, capsys, "--max-silence", "0.6")
        assert code == 0, out

        # A frozen worker process stops answering: health names it.
        pid = service.scheduler.worker_pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.0)
            code, out = _health(config, capsys, "--max-silence", "0.6")
            assert code == 1
            assert out.startswith("unhealthy: worker 0 (cpu) silent for ") and out.endswith(" s"), out
        finally:
            os.kill(pid, signal.SIGCONT)
        await _heartbeat_after(settings.heartbeat_path, time.time())
        assert _health(config, capsys, "--max-silence", "0.6")[0] == 0

    # The service stopped: its heartbeat goes stale.
    await asyncio.sleep(0.3)
    code, out = _health(config, capsys, "--max-age", "0.2")
    assert code == 1 and out.startswith("unhealthy: heartbeat ") and "s old" in out
