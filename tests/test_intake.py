"""Intake against deletion and re-sent updates: a user's updates handled concurrently never write
after their /delete (intake and deletion of one user are serialised), and an update Telegram sends
again after a crash makes no second job and takes no second share of a quota."""
from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app import open_service
from bot.storage import JobState
from facechain_core.faces import Face
from facechain_core.selfie import SelfieResult
from handlers.protocols import Attachment, Event, User
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.privacy import user_traces
from tests.fixtures.render import RENDER_KIND, register_render
from tests.fixtures.safety_world import World, event, make_world, private  # noqa: F401

pytestmark = pytest.mark.timeout(60)
USER = 31
KEY = f"telegram:{USER}"


def _jpeg(size: tuple[int, int] = (96, 96)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (180, 140, 120)).save(out, "JPEG")
    return out.getvalue()


def _accepted(data: bytes) -> SelfieResult:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    face = Face((10.0, 10.0, 60.0, 60.0), [(30.0, 30.0)] * 5, 0.99)
    return SelfieResult(image=image, face=face, faces_found=1, sharpness=100.0, brightness=120.0)


def _slow_photo(data: bytes, fetching: asyncio.Event, release: asyncio.Event) -> Attachment:
    """A photo whose download waits for `release` (a slow network), saying when it started."""
    async def fetch() -> bytes:
        fetching.set()
        await release.wait()
        return data

    return Attachment("photo", len(data), "image/jpeg", None, fetch)


@pytest.mark.parametrize("intake", ["selfie", "cartoon"])
async def test_delete_wins_over_intake_still_in_flight(make_world: Any, intake: str) -> None:  # noqa: F811
    world: World = await make_world()
    world.services.check_selfie = _accepted
    world.services.features_installed = {"cartoon"}
    await world.send(event(USER, "/start"))
    await world.storage.add_selfie(KEY, str(_selfie_file(world)), {"box": [0, 0, 1, 1]})
    ask = await world.send(event(USER, "/delete"))
    nonce = next(b.payload for row in ask.texts[-1][1] for b in row if b.payload.startswith("delete:"))

    fetching, release = asyncio.Event(), asyncio.Event()
    photo = _slow_photo(_jpeg(), fetching, release)
    update = event(USER, "/cartoon anime" if intake == "cartoon" else "")
    update.attachments = [photo]
    first = asyncio.create_task(world.send(update))  # arrived first, still downloading
    await asyncio.wait_for(fetching.wait(), 5)
    delete = asyncio.create_task(world.send(event(USER, button=nonce)))
    await asyncio.wait({delete}, timeout=0.5)  # /delete must not finish under the intake's feet
    release.set()
    await asyncio.wait_for(asyncio.gather(first, delete), 10)

    assert user_traces(world.services.data_dir, world.storage.path, [KEY]) == []
    assert await world.storage.selfies(KEY) == []


def _selfie_file(world: World) -> Path:
    path = world.services.user_dir(KEY) / "selfies" / "old0selfie.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg())
    return path.resolve()


# -- re-sent updates --------------------------------------------------------------------------------
@pytest.fixture
def render() -> Iterator[None]:
    undo = register_render()
    yield
    undo()


GROUP = -100777


async def _delivered(service: Any, count: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(await service.storage.user_jobs(KEY, [JobState.DELIVERED])) < count:
        assert loop.time() < deadline, "the job was not delivered"
        await asyncio.sleep(0.02)


async def _jobs_of(service: Any, user_key: str, count: int, timeout: float = 15.0) -> list[Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs = await service.storage.user_jobs(user_key, (JobState.QUEUED, JobState.RUNNING, JobState.DONE,
                                                          *JobState.FINAL))
        if len(jobs) >= count or loop.time() > deadline:
            return jobs
        await asyncio.sleep(0.02)


async def test_a_resent_update_makes_no_second_job_nor_quota_charge(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                   render: None) -> None:
    fake = fake_telegram
    settings = fake.bot_settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models",
                                 scheduler={"progress_interval_s": 0})
    async with open_service(settings, extra_kinds=[RENDER_KIND]) as service:
        await service.storage.set_chat_settings(f"telegram:{GROUP}", {"daily_limit": 5})
        # Handled, then sent again (the bot died before confirming it).
        first = fake.send_message(USER, GROUP, "/render one")
        await _delivered(service, 1)
        await fake.wait_idle()
        mark = fake.mark()
        fake.resend(first)
        await fake.wait_idle()
        assert not [c for c in fake.calls[mark:] if c.method != "getUpdates"]  # it did nothing at all
        # Two copies at once, handled concurrently: the unique key lets one through.
        second = fake.send_message(USER, GROUP, "/render two")
        fake.resend(second)
        await fake.wait_idle()
        jobs = await _jobs_of(service, KEY, 3, timeout=2)
        usage = await service.storage.chat_jobs_today(f"telegram:{GROUP}", KEY, _today())
    assert sorted(j.params["tag"] for j in jobs) == ["one", "two"]
    assert usage == 2


def _today() -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime())


async def test_the_update_key_is_unique_in_storage(tmp_path: Path) -> None:
    from bot.storage import DuplicateKey, Storage

    async with Storage(tmp_path / "db.sqlite3") as storage:
        chat = private(USER).to_dict()
        await storage.insert_job(KEY, "x", 1, {}, chat, 1, update_key="telegram:31:7")
        results = await asyncio.gather(
            storage.insert_job(KEY, "x", 1, {}, chat, 1, update_key="telegram:31:8"),
            storage.insert_job(KEY, "x", 1, {}, chat, 1, update_key="telegram:31:8"),
            return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["DuplicateKey", "Job"]
        with pytest.raises(DuplicateKey):
            await storage.insert_job(KEY, "x", 1, {}, chat, 1, update_key="telegram:31:7")
        assert await storage.update_seen("telegram:31:7") and not await storage.update_seen("telegram:31:9")
        assert len(await storage.user_jobs(KEY, ["queued"])) == 2
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 2
