"""The whole service (storage, scheduler, worker process, handlers, real PTB Application)
against the fake Bot API: a user's conversation from /start to /delete."""
from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pytest
from PIL import Image

from bot.app import open_service
from bot.engine.jobkinds import JobKind
from bot.ops.logsetup import configure_logging
from handlers import router
from handlers.progress import submit_with_progress
from tests.fixtures.fake_telegram import TOKEN
from tests.fixtures.privacy import user_traces

USER = 987654321
SLEEP_KIND = JobKind("test.sleep", "facechain_core.devtools:SleepPipeline", 1, 2, 60)
EXPECTED = {
    "obama.jpg": "accepted", "obama2.jpg": "accepted", "obama3.jpg": "accepted", "biden.jpg": "accepted",
    "32bit.png": "accepted", "two_people.jpg": "several",
}


def _texts(fake, since: int = 0) -> list[str]:
    return [c.params.get("text", "") for c in fake.calls[since:] if c.method in ("sendMessage", "editMessageText")]


async def _say(fake, text: str, user: int = USER, chat=None) -> str:
    mark = fake.mark()
    fake.send_message(user, chat, text)
    call = await fake.wait_for("sendMessage", since=mark, timeout=10)
    return call.params["text"]


async def _send_photo(fake, data: bytes, **kw) -> str:
    mark = fake.mark()
    fake.send_photo(USER, None, data, **kw)
    call = await fake.wait_for("sendMessage", since=mark, timeout=15)
    return call.params["text"]


def _plain_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (120, 160, 200)).save(buf, "JPEG")
    return buf.getvalue()


async def _wait_jobs(service, state: str, count: int = 1, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        jobs = await service.storage.user_jobs(f"telegram:{USER}", [state])
        if len(jobs) >= count or loop.time() > deadline:
            return jobs
        await asyncio.sleep(0.05)


@pytest.fixture
def settings(fake_telegram, tmp_path, yunet_path):
    return fake_telegram.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, log_level="DEBUG",
        selfie={"detector_model": yunet_path.name}, scheduler={"progress_interval_s": 0},
    )


@pytest.fixture
def render_command():
    """A test-only /render command that runs the test.sleep job kind through the scheduler."""
    async def render(services, event, channel):
        await submit_with_progress(services, event, channel, "test.sleep",
                                   {"steps": 3, "delay_s": 0.05, "suffix": ".png"})
    router.register_command("render", render, "help.help", in_menu=False)
    yield
    router._commands.pop("render", None)


async def test_conversation_start_to_delete(fake_telegram, settings, faces_dir, caplog, render_command):
    caplog.set_level(logging.DEBUG)
    configure_logging(settings)
    fake = fake_telegram
    async with open_service(settings, extra_kinds=[SLEEP_KIND]) as service:
        start = await _say(fake, "/start")
        assert "/style" in start or "selfie" in start.lower()
        assert "privacy" in start.lower() or "delete" in start.lower()

        # A real face is accepted; a no-face photo, two faces and a text file are refused with reasons.
        reply = await _send_photo(fake, (faces_dir / "obama.jpg").read_bytes())
        assert "1" in reply, reply
        selfies = await service.storage.selfies(f"telegram:{USER}")
        assert len(selfies) == 1 and Path(selfies[0].path).exists()
        assert "no face" in (await _send_photo(fake, _plain_jpeg())).lower() or "find a face" in _texts(fake)[-1]
        assert "2 faces" in await _send_photo(fake, (faces_dir / "two_people.jpg").read_bytes())
        mark = fake.mark()
        fake.send_document(USER, None, b"just some notes\n", "notes.txt", "text/plain")
        reply = (await fake.wait_for("sendMessage", since=mark, timeout=10)).params["text"]
        assert "image" in reply.lower() or "photo" in reply.lower()
        assert len(await service.storage.selfies(f"telegram:{USER}")) == 1

        # A job through the scheduler: queued message, progress edits in place, result as a photo.
        mark = fake.mark()
        fake.send_message(USER, None, "/render")
        queued = await fake.wait_for("sendMessage", since=mark, timeout=10)
        await fake.wait_for("sendPhoto", since=mark, timeout=30)
        edits = [c for c in fake.calls_of("editMessageText")
                 if c.params.get("message_id") == queued.result["message_id"]]
        assert edits and "100%" in edits[-1].params["text"]
        (job,) = await _wait_jobs(service, "delivered")
        (art,) = await service.storage.job_artifacts(job.id)
        assert art.delivered_at is not None and art.file_ids.get("telegram")

        status = await _say(fake, "/status")
        assert "1" in status

        # /delete asks first; the confirm button removes every row and file of the user.
        await fake.delete_everything(USER)
        await fake.wait_idle()

    traces = user_traces(settings.data_dir, settings.db_path, [f"telegram:{USER}", str(USER)])
    assert traces == []
    # The bot token reached no log line, and no database file.
    assert caplog.records, "DEBUG logging captured nothing"
    leaked = [r.getMessage() for r in caplog.records if TOKEN in r.getMessage() or TOKEN in str(r.exc_text or "")]
    assert leaked == []
    assert caplog.text.count(TOKEN) == 0
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


async def test_every_shared_photo_gets_its_verdict(fake_telegram, settings, faces_dir):
    configure_logging(settings)
    async with open_service(settings) as service:
        for name, verdict in EXPECTED.items():
            reply = await _send_photo(fake_telegram, (faces_dir / name).read_bytes())
            if verdict == "accepted":
                assert "face" not in reply.lower() or "got" in reply.lower(), (name, reply)
            else:
                assert "2 faces" in reply, (name, reply)
        stored = await service.storage.selfies(f"telegram:{USER}")
        assert len(stored) == sum(v == "accepted" for v in EXPECTED.values())
