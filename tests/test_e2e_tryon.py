"""Try-on through the whole service (storage, scheduler, worker process, handlers, the real PTB
Application) against the fake Bot API, on tiny models of the real formats."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from facechain_core.tiny.tryon import PALETTE, build_tryon_models, draw_outfit
from handlers.messages import t
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.service_waits import wait_for_identity
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = pytest.mark.timeout(180)

ANN, BOB = 424242, 515151
GROUP = -100900


@pytest.fixture(scope="module")
def tryon_models(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, Path]:  # noqa: F811
    return build_tryon_models(tmp_path_factory.mktemp("tiny_tryon"))


@pytest.fixture
def settings(fake_telegram: FakeTelegram, tmp_path: Path, tiny_models_dir: Path, yunet_path: Path,  # noqa: F811
             tryon_models: dict[str, Path]) -> Any:
    return fake_telegram.bot_settings(
        data_dir=tmp_path / "data", models_dir=tiny_models_dir,
        model_paths={**tiny_model_paths(tiny_models_dir, yunet_path), **tryon_models},
        selfie={"detector_model": str(yunet_path)}, scheduler={"progress_interval_s": 0},
        pipeline={**TINY_PIPELINE, "oversample": 1, "tryon": {"side": 64, "steps": 2}}, portrait_seed=1234)


def _jpeg(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def selfie_jpeg(faces_dir: Path) -> bytes:
    image = Image.open(faces_dir / "obama.jpg").convert("RGB")
    return _jpeg(image.resize((image.width // 2, image.height // 2)))


async def _selfie(fake: FakeTelegram, service: Any, user: int, data: bytes) -> None:
    mark = fake.mark()
    fake.send_photo(user, None, data)
    await fake.wait_for("sendMessage", since=mark, timeout=15)
    await wait_for_identity(service, f"telegram:{user}")


async def test_tryon_asks_for_the_outfit_and_returns_one_picture(fake_telegram: FakeTelegram, settings: Any,
                                                                 selfie_jpeg: bytes) -> None:
    fake = fake_telegram
    outfit = draw_outfit(128, arm_angle=0.4, seed=3)
    async with open_service(settings) as service:
        assert "tryon" in service.services.features_installed
        mark = fake.mark()
        fake.send_message(ANN, None, "/tryon")
        await fake.wait_for_text(t("tryon.no_identity", "en"), since=mark, timeout=10)
        await _selfie(fake, service, ANN, selfie_jpeg)

        # /tryon alone asks for the outfit; the next photo is the outfit, not a selfie.
        mark = fake.mark()
        fake.send_message(ANN, None, "/tryon")
        await fake.wait_for_text(t("tryon.send_photo", "en"), since=mark, timeout=10)
        selfies_before = len(await service.storage.selfies(f"telegram:{ANN}"))
        mark = fake.mark()
        fake.send_photo(ANN, None, _jpeg(outfit))
        await fake.wait_for_text(t("job.kind.tryon", "en"), since=mark, timeout=10)
        sent = await fake.wait_for("sendPhoto", since=mark, timeout=90)
        assert sent.params["caption"].startswith(t("tryon.caption", "en"))
        (picture,) = fake.uploads(sent)
        result = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")).astype(np.int16)
        assert result.shape == (64, 64, 3)
        # The garment (red shirt, blue trousers at the working size) survives; the rest was repainted.
        small = np.asarray(Image.fromarray(outfit).resize((64, 64), Image.LANCZOS)).astype(np.int16)
        shirt = np.abs(small - np.array(PALETTE["upper"][0])).sum(-1) < 60
        background = np.abs(small - np.array(PALETTE["background"][0])).sum(-1) < 30
        assert np.abs(result - small)[shirt].mean() < 12  # JPEG round trips, both ways
        assert np.abs(result - small)[background].mean() > 15
        await fake.wait_idle()
        assert len(await service.storage.selfies(f"telegram:{ANN}")) == selfies_before
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]) if j.kind == "tryon"]
        assert not Path(job.params["outfit"]).exists()  # the outfit copy goes once delivered
        assert job.params["picture_size"] == [outfit.shape[1], outfit.shape[0]]  # planned into a shared pass by it
        (artifact,) = await service.storage.job_artifacts(job.id)
        assert Path(artifact.path).is_file() and artifact.kind == "tryon"


async def test_tryon_errors_and_other_peoples_photos(fake_telegram: FakeTelegram, settings: Any,
                                                     selfie_jpeg: bytes) -> None:
    fake = fake_telegram
    async with open_service(settings) as service:
        await _selfie(fake, service, ANN, selfie_jpeg)
        await _selfie(fake, service, BOB, selfie_jpeg)
        # A photo without a person: the job says so.
        empty = np.full((96, 96, 3), PALETTE["background"][0], np.uint8)
        mark = fake.mark()
        fake.send_photo(ANN, None, _jpeg(empty), caption="/tryon")
        await fake.wait_for_text(t("tryon.no_person", "en"), since=mark, timeout=60)

        # In a group, Bob cannot dress up Ann's photo; Ann can.
        mark = fake.mark()
        ann_photo = fake.send_photo(ANN, GROUP, _jpeg(draw_outfit(128, seed=4)))
        await fake.wait_for("sendMessage", since=mark, timeout=10)
        mark = fake.mark()
        fake.send_message(BOB, GROUP, "/tryon", reply_to_message=ann_photo)
        await fake.wait_for_text(t("tryon.not_yours", "en"), since=mark, timeout=10)
        mark = fake.mark()
        fake.send_message(ANN, GROUP, "/tryon", reply_to_message=ann_photo)
        sent = await fake.wait_for("sendPhoto", since=mark, timeout=90)
        assert sent.params["chat_id"] == GROUP
        await fake.wait_idle()
        bob_jobs = await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"])
        assert [j for j in bob_jobs if j.kind == "tryon"] == []
