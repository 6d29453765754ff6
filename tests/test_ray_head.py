"""HeadLink without a cluster: a head that cannot be reached is waited out with one log line a try and a
capped backoff (no token in the lines), a closed port is not even tried with ray.init, and a Ray Client
that gave up counts as a lost head. The real head restarts are in tests/test_ray_head_restart.py."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.engine.backends import ray_head
from bot.engine.backends.ray_head import HeadLink, host_port

TOKEN = "rtok-0123456789abcdef"


class FakeRay:
    """ray.init fails `failures` times (naming the token, as a careless error might), then joins."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.inits: list[str | None] = []
        self.shutdowns = 0
        self.connected = False

    def is_initialized(self) -> bool:
        return self.connected

    def init(self, address: str | None, namespace: str, log_to_driver: bool) -> None:
        self.inits.append(address)
        if len(self.inits) <= self.failures:
            raise ConnectionError(f"token {TOKEN} refused by the head\nsecond line")
        self.connected = True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.connected = False


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []

    async def pause(delay: float) -> None:
        waited.append(delay)
        await asyncio.sleep(0)

    monkeypatch.setattr(ray_head, "_pause", pause)
    return waited


@pytest.fixture
async def listening() -> AsyncIterator[int]:
    """A port that accepts connections (a Ray Client server, as far as the probe can tell)."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


def test_host_port_of_each_address_form() -> None:
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("10.0.0.7:6379") == ("10.0.0.7", 6379)
    assert host_port("[::1]:6379") == ("::1", 6379)
    assert host_port("auto") is None and host_port("") is None and host_port("ray://head") is None


async def test_an_unreachable_head_is_waited_out_with_a_capped_backoff_and_one_line_a_try(
        listening: int, pauses: list[float], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    caplog.set_level(logging.WARNING, logger="bot.engine.backends.ray_head")
    fake = FakeRay(failures=7)
    link = HeadLink(fake, f"ray://127.0.0.1:{listening}", "ns")
    await link.connect()
    assert fake.connected and len(fake.inits) == 8 and fake.shutdowns == 7  # each failed try left cleanly
    assert pauses == [1, 2, 5, 10, 30, 30, 30]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7 and all("cannot be reached (ConnectionError: token *** refused" in line for line in lines)
    assert TOKEN not in caplog.text and "second line" not in caplog.text


async def test_a_closed_port_is_probed_without_calling_ray_init(pauses: list[float],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bot.engine.backends.ray_head")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    fake = FakeRay()
    link = HeadLink(fake, f"ray://127.0.0.1:{port}", "ns")
    connecting = asyncio.ensure_future(link.connect())
    await asyncio.sleep(0.2)
    assert not connecting.done() and fake.inits == [] and "ConnectionRefusedError" in caplog.text
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)  # the head is back
    try:
        await asyncio.wait_for(connecting, 10)
    finally:
        server.close()
    assert fake.inits == [f"ray://127.0.0.1:{port}"]


async def test_a_ray_client_that_gave_up_is_a_lost_head(listening: int) -> None:
    fake: Any = FakeRay()
    link = HeadLink(fake, f"ray://127.0.0.1:{listening}", "ns")
    await link.connect()
    fake.nodes = lambda: [{"NodeID": "n1", "Alive": True}]
    assert await link.lost() is None
    fake.connected = False  # what Ray Client does after its reconnection grace
    assert await link.lost() == "Ray Client disconnected"
