"""Enhance through the whole service and the real PTB Application against the fake Bot API: the button under a
portrait in a group, refused to another member, the scale picked by its owner, the enhance job run in the worker on
tiny ONNX upscalers, and the result sent as a labelled PNG file twice the size."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.app import open_service
from facechain_core import safety
from facechain_core.tiny.restore import build_restorer
from facechain_core.tiny.upscale import build_upscaler
from handlers.messages import t
from tests.fixtures.fake_telegram import BOT_USERNAME, FakeTelegram
from tests.test_groups_telegram import (
    ANN,
    BOB,
    FEATURES,
    GROUP,
    IDENTITY,
    PORTRAIT,
    in_chat,
    payloads,
    private_selfie,
    settings_for,
)

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def enhance_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Tiny x2 and x4 upscalers and a face restorer; the service believes portrait and enhance are installed."""
    monkeypatch.setattr("bot.app.installed_features", lambda *args, **kwargs: set(FEATURES) | {"enhance"})
    folder = tmp_path / "enhance_models"
    return {"real-esrgan-x2-onnx": str(build_upscaler(folder / "x2.onnx", 2)),
            "real-esrgan-x4-onnx": str(build_upscaler(folder / "x4.onnx", 4)),
            "gfpgan-1.4-onnx": str(build_restorer(folder / "gfpgan.onnx"))}


async def test_enhance_under_a_group_portrait(fake_telegram: FakeTelegram, tmp_path: Path, yunet_path: Path,
                                              faces_dir: Path, enhance_models: dict[str, str]) -> None:
    fake = fake_telegram
    settings = settings_for(fake, tmp_path, yunet_path, scheduler={"progress_interval_s": 0},
                            model_paths=enhance_models, pipeline={"enhance_tile": 32, "enhance_tile_pad": 4})
    async with open_service(settings, extra_kinds=[PORTRAIT, IDENTITY]) as service:
        await private_selfie(fake, ANN, (faces_dir / "obama.jpg").read_bytes())
        mark = fake.mark()
        fake.send_message(ANN, GROUP, f"/style@{BOT_USERNAME} hanfu 1")
        result = await fake.wait_for("sendPhoto", in_chat(GROUP), since=mark, timeout=30)
        await fake.wait_idle()
        enhance = next(p for p in payloads(result.result) if p.startswith("enhance:"))
        artifact_id = enhance.partition(":")[2]
        portrait = await service.storage.artifact(artifact_id)
        with Image.open(portrait.path) as image:
            width, height = image.size

        # Bob pressing Ann's Enhance is refused; so is his press of the scale she was offered.
        mark = fake.mark()
        fake.press_button(result.result, enhance, user=BOB)
        refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert refusal.params["text"] == t("button.not_yours", "en") and refusal.params["show_alert"] is True
        mark = fake.mark()
        fake.press_button(result.result, enhance, user=ANN)
        pick = await fake.wait_for("sendMessage", lambda c: c.params.get("text") == t("enhance.pick", "en"),
                                   since=mark, timeout=10)
        assert payloads(pick.result) == [f"enhx:{artifact_id}.2", f"enhx:{artifact_id}.4"]
        mark = fake.mark()
        fake.press_button(pick.result, f"enhx:{artifact_id}.2", user=BOB)
        refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert refusal.params["text"] == t("button.not_yours", "en")
        await fake.wait_idle()
        assert [j for j in await service.storage.user_jobs(f"telegram:{BOB.id}", ["queued", "running", "done",
                                                                                  "delivered"])] == []

        # Ann picks x2: a PNG file twice as wide and tall, labelled as AI-generated, captioned with its size.
        mark = fake.mark()
        fake.press_button(pick.result, f"enhx:{artifact_id}.2", user=ANN)
        sent = await fake.wait_for("sendDocument", in_chat(GROUP), since=mark, timeout=60)
        (data,) = fake.uploads(sent)
        with Image.open(io.BytesIO(data)) as enhanced:
            assert enhanced.format == "PNG" and enhanced.size == (2 * width, 2 * height)
        path = tmp_path / "enhanced.png"
        path.write_bytes(data)
        assert "AI-generated" in safety.read_label(path)["description"]
        caption = sent.params["caption"]
        assert t("enhance.caption", "en", scale=2, width=2 * width, height=2 * height, format="PNG") in caption
        assert "AI-generated" in caption
        await fake.wait_idle()
