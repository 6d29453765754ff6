"""Cartoons through the whole service (storage, scheduler, worker process, handlers, the real PTB
Application) against the fake Bot API, with tiny ONNX stylisers of the real signatures; and the
Telegram adapter's conversion of replies."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from bot.engine.jobkinds import LONG, JobKind
from bot.platforms.telegram_adapter import TelegramAdapter
from facechain_core.tiny.cartoon import build_cartoon_models
from handlers.messages import t
from handlers.protocols import Chat, Event, Media, ReplyChannel
from tests.fixtures.fake_telegram import FakeTelegram, button_payloads

pytestmark = pytest.mark.timeout(120)

ANN, BOB = 424242, 515151
GROUP = -100900
TRAIN_KIND = JobKind("test.train", "facechain_core.devtools:SleepPipeline", LONG, 1, 120, preemptible=True)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cartoon_models(tmp_path_factory.mktemp("tiny_cartoon"))


@pytest.fixture
def settings(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path, tiny_models: dict[str, Path]) -> Any:
    return fake_telegram.bot_settings(
        data_dir=tmp_path / "data", models_dir=yunet_path.parent, selfie={"detector_model": yunet_path.name},
        scheduler={"progress_interval_s": 0}, model_paths=tiny_models,
    )


@pytest.fixture
def face_jpeg(faces_dir: Path) -> bytes:
    """A real face photo at a modest size (455x568) so each tiny job takes a fraction of a second."""
    image = Image.open(faces_dir / "obama.jpg").convert("RGB")
    image = image.resize((image.width // 2, image.height // 2))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def _reply(fake: FakeTelegram, user: int, chat: int | None, text: str, to: dict[str, Any],
                 method: str = "sendPhoto", timeout: float = 30.0) -> Any:
    mark = fake.mark()
    fake.send_message(user, chat, text, reply_to_message=to)
    return await fake.wait_for(method, since=mark, timeout=timeout)


async def test_reply_cartoon_to_a_photo_gets_a_stylised_image(fake_telegram: FakeTelegram, settings: Any,
                                                              face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        assert {"cartoon", "cartoon-animegan"} <= service.services.features_installed
        mark = fake.mark()
        photo = fake.send_photo(ANN, None, face_jpeg)  # becomes a selfie too, as any private photo does
        await fake.wait_for("sendMessage", since=mark, timeout=15)

        # Reply /cartoon STYLE to the photo: queued notice, then the cartoon with its result buttons.
        mark = fake.mark()
        sent = await _reply(fake, ANN, None, "/cartoon anime", photo)
        queued = await fake.wait_for("sendMessage", since=mark)
        assert t("job.kind.cartoon", "en") in queued.params["text"]
        assert sent.params["caption"].startswith(t("cartoon.caption", "en", style="Anime portrait"))
        assert "AI-generated" in sent.params["caption"]
        (picture,) = fake.uploads(sent)
        cartoon, original = _decode(picture), _decode(face_jpeg)
        assert cartoon.shape == original.shape
        assert np.abs(cartoon - original).mean() > 10  # stylised, not the photo sent back
        cartoon_button = next(p for p in button_payloads(sent.result) if p.startswith("cartoon:"))

        # An unknown style answers with the styles as buttons bound to that photo; a tap runs one.
        listing = await _reply(fake, ANN, None, "/cartoon vaporwave", photo, method="sendMessage")
        assert listing.params["text"] == t("cartoon.unknown_style", "en", style="vaporwave")
        styles = {p.split(":")[1].split(".")[0] for p in button_payloads(listing.result)}
        assert styles == {"anime", "shinkai", "hayao", "sketch"}
        mark = fake.mark()
        fake.press_button(listing.result, next(p for p in button_payloads(listing.result) if p.startswith("toon:hayao.")))
        hayao = await fake.wait_for("sendPhoto", since=mark, timeout=30)
        assert "Hayao" in hayao.params["caption"]

        # The user's own result can be cartoonised again, by reply or by its Cartoon button.
        again = await _reply(fake, ANN, None, "/cartoon sketch", sent.result)
        assert "sketch" in again.params["caption"].lower()
        mark = fake.mark()
        fake.press_button(sent.result, cartoon_button)
        offer = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert any(p.startswith("toon:anime.a") for p in button_payloads(offer.result))
        await fake.wait_idle()

        jobs = await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"])
        cartoons = [j for j in jobs if j.kind == "cartoon"]
        assert len(cartoons) == 3
        for job in cartoons:  # the input copies are gone once delivered; the results stay
            assert not Path(job.params["image"]).exists()
            (artifact,) = await service.storage.job_artifacts(job.id)
            assert Path(artifact.path).is_file() and artifact.kind == "cartoon"


async def test_only_the_requesters_own_photo_or_result(fake_telegram: FakeTelegram, settings: Any,
                                                       face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        mark = fake.mark()
        ann_photo = fake.send_photo(ANN, GROUP, face_jpeg)  # not kept: the bot hints at a private chat
        await fake.wait_for("sendMessage", since=mark, timeout=10)
        refused = await _reply(fake, BOB, GROUP, "/cartoon anime", ann_photo, method="sendMessage")
        assert refused.params["text"] == t("cartoon.not_yours", "en")
        ann_cartoon = await _reply(fake, ANN, GROUP, "/cartoon anime", ann_photo)
        assert ann_cartoon.params["chat_id"] == GROUP
        refused = await _reply(fake, BOB, GROUP, "/cartoon hayao", ann_cartoon.result, method="sendMessage")
        assert refused.params["text"] == t("cartoon.not_yours", "en")
        mark = fake.mark()
        fake.press_button(ann_cartoon.result, next(p for p in button_payloads(ann_cartoon.result)
                                                   if p.startswith("cartoon:")), user=BOB)
        await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        await fake.wait_idle()
        bob_jobs = await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"])
        assert bob_jobs == []
    assert not (settings.data_dir / "users" / f"telegram:{BOB}" / "cartoon").exists()


async def test_a_cartoon_does_not_wait_behind_a_training(fake_telegram: FakeTelegram, settings: Any,
                                                         face_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings, extra_kinds=[TRAIN_KIND]) as service:
        key, chat = f"telegram:{ANN}", Chat("telegram", str(ANN), True)
        training = await service.scheduler.submit(key, "test.train", {"steps": 150, "delay_s": 0.1,
                                                                      "yield_every": 1}, chat)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (await service.storage.job(training.job_id)).state != "running":
            assert loop.time() < deadline, "the training never started"
            await asyncio.sleep(0.05)
        mark = fake.mark()
        photo = fake.send_photo(ANN, None, face_jpeg)
        await fake.wait_for("sendMessage", since=mark, timeout=15)
        sent = await _reply(fake, ANN, None, "/cartoon anime", photo)
        assert sent.params["caption"].startswith(t("cartoon.caption", "en", style="Anime portrait"))
        assert "AI-generated" in sent.params["caption"]
        assert (await service.storage.job(training.job_id)).state == "running"  # delivered within the training
        await service.scheduler.cancel(key, training.job_id)


async def test_telegram_replies_become_replied_messages(fake_telegram: FakeTelegram, tmp_path: Path,
                                                        face_jpeg: bytes) -> None:
    fake = fake_telegram
    events: list[Event] = []
    fetched: list[bytes] = []

    async def record(event: Event, channel: ReplyChannel) -> None:
        events.append(event)
        if event.reply_to is not None and event.reply_to.image is not None:
            fetched.append(await event.reply_to.image.fetch())

    picture = tmp_path / "result.jpg"
    picture.write_bytes(face_jpeg)
    async with TelegramAdapter(fake.bot_settings(data_dir=tmp_path / "data"), dispatch=record) as adapter:
        own = fake.send_photo(ANN, GROUP, face_jpeg)
        (ours,) = await adapter.channel_for(Chat("telegram", str(GROUP), False)).send_images([Media(path=picture)])
        bot_message = fake.messages[(GROUP, int(ours.message.message_id))]
        other = fake.send_message(BOB, GROUP, "hello")
        for target in (own, bot_message, other):
            fake.send_message(ANN, GROUP, "/cartoon", reply_to_message=target)
        fake.send_message(ANN, GROUP, "/cartoon")
        deadline = asyncio.get_running_loop().time() + 10
        while len(events) < 6:
            assert asyncio.get_running_loop().time() < deadline, f"{len(events)} events"
            await asyncio.sleep(0.05)
        await fake.wait_idle()
    replies = [e.reply_to for e in events if e.command == "cartoon"]
    to_own, to_bot, to_other, none = replies
    assert to_own is not None and to_own.sender == f"telegram:{ANN}" and to_own.message_id == str(own["message_id"])
    assert to_own.file_id == own["photo"][-1]["file_id"]  # the largest size
    assert to_bot is not None and to_bot.from_bot and to_bot.file_id == ours.file_id
    assert to_other is not None and to_other.sender == f"telegram:{BOB}" and to_other.image is None
    assert none is None
    assert fetched == [face_jpeg, face_jpeg]
