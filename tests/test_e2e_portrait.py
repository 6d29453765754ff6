"""Portraits through the whole service on tiny models: selfie -> /style -> album, /styles paging
and tapping, /train -> progress -> LoRA -> /style uses it."""
from __future__ import annotations


import pytest

from bot.app import open_service
from bot.ops.logsetup import configure_logging
from tests.fixtures.portrait_service import TINY_PIPELINE, portrait_settings
from tests.fixtures.privacy import user_traces
from tests.fixtures.service_waits import wait_for_latest_job
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

USER = 4242
KEY = f"telegram:{USER}"
pytestmark = pytest.mark.slow


@pytest.fixture
def settings(fake_telegram, tmp_path, tiny_models_dir, yunet_path):  # noqa: F811
    settings = portrait_settings(fake_telegram, tmp_path / "data", tiny_models_dir, yunet_path)
    configure_logging(settings)
    return settings


async def _album(fake, since: int, timeout: float = 90.0):
    return await fake.wait_for("sendMediaGroup", since=since, timeout=timeout)


async def test_selfie_style_styles_train_and_style_again(fake_telegram, settings, faces_dir, one_torch_thread):  # noqa: F811
    fake = fake_telegram
    async with open_service(settings) as service:
        assert {"portrait", "train"} <= service.services.features_installed

        # A selfie: accepted, and the identity job announces the likeness.
        mark = fake.mark()
        fake.send_photo(USER, None, (faces_dir / "obama.jpg").read_bytes())
        await fake.wait_for("sendMessage", lambda c: "learned your face" in c.params["text"], since=mark, timeout=90)
        assert (await service.storage.identity(KEY)) is not None

        # /style hanfu 2 -> queued message with Cancel, progress edits, an album of two with the caption.
        mark = fake.mark()
        fake.send_message(USER, None, "/style hanfu 2")
        queued = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert any(b.startswith("cancel:") for b in queued.buttons)
        album = await _album(fake, mark)
        assert len(album.params["media"]) == 2 and "Hanfu" in album.params["media"][0]["caption"]
        free_images = fake.uploads(album)
        edits = [c for c in fake.calls_of("editMessageText") if c.params["message_id"] == queued.result["message_id"]]
        assert any("%" in c.params["text"] for c in edits)
        more = await fake.wait_for("sendMessage", lambda c: any(b.startswith("more:") for b in c.buttons),
                                   since=mark, timeout=10)
        free_job = await wait_for_latest_job(service, KEY, "portrait", ["delivered"])
        assert free_job.result["meta"]["lora_used"] is False

        # /styles pages through the catalogue; tapping a style runs it for the presser.
        mark = fake.mark()
        fake.send_message(USER, None, "/styles")
        menu = await fake.wait_for("sendMessage", since=mark, timeout=10)
        payloads = menu.buttons
        assert "styles:1" in payloads and sum(p.startswith("style:") for p in payloads) == 8, payloads
        mark = fake.mark()
        fake.press_button(menu.result, "styles:1", user=USER)
        page2 = await fake.wait_for("editMessageText", since=mark, timeout=10)
        assert "page 2" in page2.params["text"] and "styles:0" in page2.buttons
        tapped = next(p for p in page2.buttons if p.startswith("style:"))
        mark = fake.mark()
        fake.press_button(page2.result if isinstance(page2.result, dict) else menu.result, tapped, user=USER)
        assert len((await _album(fake, mark)).params["media"]) == 2

        # "More like this" under the first album queues the same style again.
        mark = fake.mark()
        fake.press_button(more.result, next(b for b in more.buttons if b.startswith("more:")), user=USER)
        assert len((await _album(fake, mark)).params["media"]) == 2

        # /train: progress edits, then the LoRA is recorded and announced.
        mark = fake.mark()
        fake.send_message(USER, None, "/train")
        await fake.wait_for("sendMessage", lambda c: "trained" in c.params["text"], since=mark, timeout=120)
        trained = await wait_for_latest_job(service, KEY, "train", ["delivered"])
        assert trained.result["meta"]["steps"] == 4  # one selfie x steps_per_photo
        identity = await service.storage.identity(KEY)
        assert identity.lora_path and identity.lora_path.endswith(".safetensors")

        # /style again at the same seed: the user's LoRA is active and the images differ.
        mark = fake.mark()
        fake.send_message(USER, None, "/style hanfu 2")
        lora_images = fake.uploads(await _album(fake, mark))
        lora_job = max((j for j in await service.storage.user_jobs(KEY, ["delivered", "done"]) if j.kind == "portrait"),
                       key=lambda j: j.id)
        assert lora_job.params["user_lora"] == identity.lora_path
        assert lora_job.result["meta"]["lora_used"] is True
        assert lora_job.result["meta"]["seeds"] == free_job.result["meta"]["seeds"]
        assert lora_images != free_images

        # /delete removes the selfies, identity, LoRA, results and every row.
        assert (service.services.user_dir(KEY) / "lora" / "pytorch_lora_weights.safetensors").is_file()
        await fake.delete_everything(USER)
        await fake.wait_idle()
    assert user_traces(settings.data_dir, settings.db_path, [KEY, str(USER)]) == []


async def test_style_during_training_finishes_first(fake_telegram, tmp_path, tiny_models_dir, yunet_path,  # noqa: F811
                                                    faces_dir, one_torch_thread):  # noqa: F811
    """One worker: a /style sent while /train runs is served at the training's next checkpoint."""
    settings = portrait_settings(fake_telegram, tmp_path / "data", tiny_models_dir, yunet_path, pipeline={
        **TINY_PIPELINE, "train": {"steps_per_photo": 60, "max_steps": 60, "resolution": 32, "checkpoint_every": 5}})
    configure_logging(settings)
    fake = fake_telegram
    async with open_service(settings) as service:
        mark = fake.mark()
        fake.send_photo(USER, None, (faces_dir / "obama.jpg").read_bytes())
        await fake.wait_for("sendMessage", lambda c: "learned your face" in c.params["text"], since=mark, timeout=90)
        mark = fake.mark()
        fake.send_message(USER, None, "/train")
        queued = await fake.wait_for("sendMessage", since=mark, timeout=10)
        await fake.wait_for("editMessageText", lambda c: c.params["message_id"] == queued.result["message_id"]
                            and "%" in c.params["text"], since=mark, timeout=60)
        fake.send_message(USER, None, "/style hanfu 1")
        album_or_photo = await fake.wait_for("sendPhoto", since=mark, timeout=120)
        trained_msg = [c for c in fake.calls[mark:] if c.method == "sendMessage" and "trained" in c.params["text"]]
        assert album_or_photo and not trained_msg, "the portrait waited for the whole training"
        await fake.wait_for("sendMessage", lambda c: "trained" in c.params["text"], since=mark, timeout=180)
        trained = await wait_for_latest_job(service, KEY, "train", ["delivered"])
        assert trained.result["meta"]["steps"] == 60 and trained.attempts == 1


async def test_style_without_selfie_and_unknown_style(fake_telegram, settings):
    fake = fake_telegram
    async with open_service(settings):
        mark = fake.mark()
        fake.send_message(USER, None, "/style hanfu")
        reply = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert "selfie" in reply.params["text"].lower()
        mark = fake.mark()
        fake.send_message(USER, None, "/style hanfuu")
        reply = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert "hanfu" in reply.params["text"].lower()  # a suggestion
        mark = fake.mark()
        fake.send_message(USER, None, "/style hanfu 99")
        reply = await fake.wait_for("sendMessage", since=mark, timeout=10)
        assert "1 to 8" in reply.params["text"]
