"""/makestyle through the whole service on tiny models (fake Telegram): pictures in and checked, the
style LoRA trained with its loss going down, previews, private to the maker, published by an admin and
run at once by another user, a one-person set refused, /delete, backup and restore of the published style."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from bot.ops.backup import backup, restore
from bot.ops.logsetup import configure_logging
from facechain_core.styles import load_styles
from handlers.messages import t
from tests.fixtures.portrait_service import TINY_PIPELINE, portrait_settings
from tests.fixtures.privacy import user_traces
from tests.fixtures.service_waits import wait_for_latest_job
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

MAKER, OTHER, ADMIN = 5101, 5102, 5103
MAKER_KEY, OTHER_KEY, ADMIN_KEY = (f"telegram:{u}" for u in (MAKER, OTHER, ADMIN))
pytestmark = pytest.mark.slow
STYLE_TRAIN = {"steps_per_photo": 8, "max_steps": 40, "resolution": 32, "checkpoint_every": 20, "lr": 3e-2}


def look(seed: int, size: int = 96) -> bytes:
    """A picture of a "look" with no face: a mosaic of bold random colours."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST).save(out, "PNG")
    return out.getvalue()


def same_face_on(face_photo: Path, seed: int) -> bytes:
    """The same photo of one person pasted at different places on different mosaics (no near-duplicates)."""
    face = Image.open(face_photo).convert("RGB")
    rng = np.random.default_rng(100 + seed)
    blocks = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    canvas = Image.fromarray(blocks).resize((face.width * 2, face.height * 2), Image.Resampling.NEAREST)
    canvas.paste(face, (int(rng.integers(0, face.width)), int(rng.integers(0, face.height))))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=92)
    return out.getvalue()


async def _say(fake, user: int, text: str, timeout: float = 15.0) -> str:
    mark = fake.mark()
    fake.send_message(user, None, text)
    return (await fake.wait_for("sendMessage", since=mark, timeout=timeout)).params["text"]


async def _selfie(fake, user: int, photo: Path) -> None:
    mark = fake.mark()
    fake.send_photo(user, None, photo.read_bytes())
    await fake.wait_for("sendMessage", lambda c: "learned your face" in c.params["text"], since=mark, timeout=120)


@pytest.fixture
def settings(fake_telegram, tmp_path, tiny_models_dir, yunet_path, faces_dir):  # noqa: F811
    settings = portrait_settings(
        fake_telegram, tmp_path / "data", tiny_models_dir, yunet_path,
        access={"admins": [ADMIN_KEY]},
        styles={"makestyle": "everyone", "min_examples": 5, "max_examples": 8, "min_side": 64,
                "reference_photo": str(faces_dir / "biden.jpg")},
        pipeline={**TINY_PIPELINE, "style_train": STYLE_TRAIN})
    configure_logging(settings)
    return settings


async def test_make_train_preview_publish_use_delete(fake_telegram, settings, faces_dir, tmp_path,
                                                     one_torch_thread):  # noqa: F811
    fake = fake_telegram
    async with open_service(settings) as service:
        await _selfie(fake, MAKER, faces_dir / "obama.jpg")

        # The set opens; a picture too small and a near-duplicate are refused with their reasons.
        assert "send me 5 to 8 example pictures" in await _say(fake, MAKER, "/makestyle stripes bold colour stripes")
        mark = fake.mark()
        fake.send_photo(MAKER, None, look(0))
        first = await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert "1 example(s) kept" in first.params["text"] and first.buttons == []
        mark = fake.mark()
        fake.send_photo(MAKER, None, look(0))
        dup = await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert t("makestyle.duplicate", "en", number=1) in dup.params["text"] and "1 example(s)" in dup.params["text"]
        mark = fake.mark()
        fake.send_photo(MAKER, None, look(50, size=40))
        small = await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert t("makestyle.too_small", "en", width=40, height=40, side=64) in small.params["text"]
        # Training before enough pictures is refused.
        assert t("makestyle.too_few", "en", count=1, low=5) == await _say(fake, MAKER, "/makestyle done")
        got = None
        for seed in range(1, 5):
            mark = fake.mark()
            fake.send_photo(MAKER, None, look(seed))
            got = await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert "5 example(s) kept" in got.params["text"]
        train = next(b for b in got.buttons if b.startswith("mkstyle_train:"))

        # Train: progress, then previews (the reference identity and the maker's own) with the loss.
        mark = fake.mark()
        fake.press_button(got.result, train, user=MAKER)
        queued = await fake.wait_for("sendMessage", lambda c: any(b.startswith("cancel:") for b in c.buttons),
                                     since=mark, timeout=15)
        album = await fake.wait_for("sendMediaGroup", since=mark, timeout=300)
        assert len(album.params["media"]) == 2 and "Style \"stripes\" is trained" in album.params["media"][0]["caption"]
        edits = [c for c in fake.calls_of("editMessageText") if c.params["message_id"] == queued.result["message_id"]]
        assert any("%" in c.params["text"] for c in edits)
        job = await wait_for_latest_job(service, MAKER_KEY, "style_train", ["delivered"], timeout=240)
        curve = job.result["meta"]["loss_curve"]
        assert job.result["meta"]["steps"] == 40 and curve[-1] < curve[0], curve
        assert job.result["meta"]["previews"] == ["reference", "maker"]
        await fake.wait_for("sendMessage", lambda c: "/style stripes" in c.params["text"], since=mark, timeout=15)

        # Private: the maker runs it with its LoRA; another user does not even see it.
        mark = fake.mark()
        fake.send_message(MAKER, None, "/style stripes 1")
        await fake.wait_for("sendPhoto", since=mark, timeout=120)
        mine = await wait_for_latest_job(service, MAKER_KEY, "portrait", ["delivered"], timeout=240)
        assert mine.params["style_id"] == "stripes" and Path(mine.params["style_lora"]).is_file()
        # "More like this" under it runs the private style again.
        result = next(c for c in fake.calls[mark:] if any(b.startswith("more:") for b in c.buttons))
        mark = fake.mark()
        fake.press_button(result.result, next(b for b in result.buttons if b.startswith("more:")), user=MAKER)
        await fake.wait_for("sendPhoto", since=mark, timeout=120)
        await _selfie(fake, OTHER, faces_dir / "obama2.jpg")
        assert "stripes" in await _say(fake, OTHER, "/style stripes 1")
        assert [j for j in await service.storage.user_jobs(OTHER_KEY, ["queued", "running", "delivered", "done"])
                if j.kind == "portrait"] == []

        # Publishing is for admins; then the style runs for anyone at once, from data_dir/styles.
        assert t("core.admin_only", "en") == await _say(fake, MAKER, "/makestyle publish stripes en:Stripes zh:条纹")
        assert t("makestyle.publish_usage", "en") == await _say(fake, ADMIN, "/makestyle publish stripes en:Stripes")
        published = await _say(fake, ADMIN, "/makestyle publish stripes en:Bold stripes zh:条纹")
        assert published == t("makestyle.published", "en", name="stripes", title="Bold stripes")
        mark = fake.mark()
        fake.send_message(OTHER, None, "/style Bold stripes 1")
        photo = await fake.wait_for("sendPhoto", since=mark, timeout=120)
        assert "Bold stripes" in photo.params["caption"]
        theirs = await wait_for_latest_job(service, OTHER_KEY, "portrait", ["delivered"], timeout=240)
        assert Path(theirs.params["style_lora"]) == (settings.data_dir / "styles" / "stripes.safetensors").resolve()

        # A set that is really one person is refused by the training job. (The admin has no face of their
        # own here: the tiny random ArcFace takes everyone for the same person, so a maker's own face would
        # hide any other; tests/test_makestyle.py checks that the maker's own face is let through.)
        await _say(fake, ADMIN, "/makestyle faces portrait look")
        for seed in range(5):
            mark = fake.mark()
            fake.send_photo(ADMIN, None, same_face_on(faces_dir / "biden.jpg", seed))
            got = await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert "5 example(s) kept" in got.params["text"], got.params["text"]
        mark = fake.mark()
        fake.send_message(ADMIN, None, "/makestyle done")
        refused = await fake.wait_for("editMessageText", lambda c: "one person's face" in c.params["text"],
                                      since=mark, timeout=120)
        assert t("makestyle.one_person", "en", count=5, limit=3) in refused.params["text"]

        # /delete: the maker's examples, private styles and rows go; the published style stays everyone's.
        await _say(fake, MAKER, "/makestyle second another look")
        mark = fake.mark()
        fake.send_photo(MAKER, None, look(7))
        await fake.wait_for("sendMessage", since=mark, timeout=15)
        assert list((settings.data_dir / "users" / MAKER_KEY / "makestyle" / "second" / "examples").glob("*.jpg"))
        await fake.delete_everything(MAKER)
        await fake.wait_idle()
        archive = tmp_path / "backup.tar.gz"
        await backup(settings.data_dir, settings.db_path, archive)
    assert user_traces(settings.data_dir, settings.db_path, [MAKER_KEY, str(MAKER)]) == []
    assert (settings.data_dir / "styles" / "stripes.toml").is_file()

    # The published style survives a backup and a restore into a fresh data dir.
    fresh = tmp_path / "restored"
    await restore(archive, fresh, fresh / "facechain.sqlite3")
    restored = load_styles(settings.styles_dir, fresh / "styles")
    assert restored["stripes"].name.zh == "条纹" and restored["stripes"].lora.source == "local"
    assert (fresh / "styles" / "stripes.safetensors").read_bytes() == \
        (settings.data_dir / "styles" / "stripes.safetensors").read_bytes()
