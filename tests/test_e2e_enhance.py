"""Enhance through the whole service and the real PTB Application against the fake Bot API: the button under a
portrait in a group, refused to another member, the scale picked by its owner, the enhance job run in the worker on
tiny ONNX upscalers, and the result sent as a labelled PNG file twice the size."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app import open_service
from facechain_core import safety
from facechain_core.tiny.restore import build_restorer
from facechain_core.tiny.upscale import build_upscaler
from handlers.messages import t
from tests.fixtures.fake_telegram import BOT_USERNAME, FakeTelegram, button_payloads
from tests.test_groups_telegram import (
    ANN,
    BOB,
    FEATURES,
    GROUP,
    IDENTITY,
    PORTRAIT,
    in_chat,
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
        enhance = next(p for p in button_payloads(result.result) if p.startswith("enhance:"))
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
        assert button_payloads(pick.result) == [f"enhx:{artifact_id}.2", f"enhx:{artifact_id}.4"]
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
        (job,) = [j for j in await service.storage.user_jobs(f"telegram:{ANN.id}", ["done", "delivered"])
                  if j.kind == "enhance"]
        assert job.params["max_bytes"] == 50_000_000  # Telegram's Bot API upload limit ([telegram] upload_limit_mb)
        caption = sent.params["caption"]
        assert t("enhance.caption", "en", scale=2, width=2 * width, height=2 * height, format="PNG") in caption
        assert "AI-generated" in caption
        await fake.wait_idle()


async def test_enhance_on_discord(fake_discord: Any, tmp_path: Path, yunet_path: Path, faces_dir: Path,  # noqa: F811
                                  enhance_models: dict[str, str]) -> None:
    from tests.test_e2e_discord import FAKE_IDENTITY, FAKE_PORTRAIT, OTHER, USER, send_selfie

    fake = fake_discord
    settings = fake.bot_settings(data_dir=tmp_path / "data", models_dir=yunet_path.parent,
                                 selfie={"detector_model": yunet_path.name}, scheduler={"progress_interval_s": 0},
                                 model_paths=enhance_models, pipeline={"enhance_tile": 32, "enhance_tile_pad": 4})
    async with open_service(settings, extra_kinds=[FAKE_PORTRAIT, FAKE_IDENTITY]) as service:
        assert (await send_selfie(fake, (faces_dir / "obama.jpg").read_bytes())).startswith("Got it")
        room = fake.guild_channel()
        mark = fake.mark()
        fake.slash(USER, "style", channel=room, style="hanfu", count=1)
        result = await fake.wait_for_files(rf"/channels/{room['id']}/messages", since=mark)
        await fake.wait_idle()
        enhance = next(c for c in result.custom_ids() if c.startswith("fc:enhance:"))
        artifact_id = enhance.rpartition(":")[2]
        with Image.open((await service.storage.artifact(artifact_id)).path) as image:
            width, height = image.size

        # Someone else's press is refused privately; the owner's asks for the scale.
        mark = fake.mark()
        fake.press(OTHER, result.response, enhance)
        note = await fake.wait_for("POST", r".*", lambda r: r.content == t("button.not_yours", "en"), since=mark)
        assert note.flags & 64  # ephemeral
        mark = fake.mark()
        fake.press(USER, result.response, enhance)
        pick = await fake.wait_for("*", r".*", lambda r: f"fc:enhx:{artifact_id}.2" in r.custom_ids(), since=mark)
        mark = fake.mark()
        fake.press(USER, pick.response, f"fc:enhx:{artifact_id}.2")
        sent = await fake.wait_for_files(r"/.*", lambda r: any(n.endswith(".png") and "enhanced" in n
                                                                for n, _ in r.files), since=mark, timeout=60)
        ((_, data),) = [(n, d) for n, d in sent.files if "enhanced" in n]
        with Image.open(io.BytesIO(data)) as enhanced:
            assert enhanced.size == (2 * width, 2 * height) and enhanced.format == "PNG"
        assert "AI-generated" in (sent.content or "")
        await fake.wait_idle()
