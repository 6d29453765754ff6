"""Safe mode and the AI label: a tiny StableDiffusionSafetyChecker of the real format that flags everything
stops every picture (the user is told), one that flags nothing lets them out; every file written carries
the label (read back from the files); reports reach the admins with the owner's key."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from facechain_core import safety
from facechain_core.cartoon import CartoonPipeline
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.pipeline import PipelineContext
from facechain_core.tiny.cartoon import build_cartoon_models
from facechain_core.tiny.safety import build_safety_checker
from handlers.messages import t
from tests.fixtures.fake_telegram import FakeTelegram, button_payloads
from tests.fixtures.safety_world import make_world  # noqa: F401
from tests.fixtures.tiny_models import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.timeout(120)
SERVICE = "Test Portraits Bot"
ANN, BOB, ADMIN = 515, 616, 717
GROUP = -100515


@pytest.fixture(scope="module")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    return {flag: build_safety_checker(root / flag, flag=flag) for flag in ("all", "none")}


@pytest.fixture(scope="module")
def cartoon_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cartoon_models(tmp_path_factory.mktemp("cartoon"))


def _pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 40, 3), dtype=np.uint8) for _ in range(n)]


def _context(tmp_path: Path, **settings: Any) -> PipelineContext:
    return PipelineContext(models_dir=tmp_path, settings=settings)


def _assert_labelled(path: Path, service: str = SERVICE) -> None:
    found = safety.read_label(path)
    assert found.get("description") == safety.label_text(service), (path, found)
    assert found.get("software") == service
    assert safety.DIGITAL_SOURCE_TYPE in found.get("xmp", ""), path


# -- the label ------------------------------------------------------------------------------------
def test_every_format_carries_the_label(tmp_path: Path) -> None:
    image = Image.fromarray(_pictures(1)[0])
    for name, options in (("a.png", {}), ("b.jpg", {"quality": 90}), ("c.webp", {"quality": 90})):
        _assert_labelled(safety.save_labelled(image, tmp_path / name, SERVICE, **options))
    assert safety.read_label(tmp_path / "a.png")["ai_generated"] == "true"
    assert not list(tmp_path.glob("*.part"))

    # An existing JPEG gets the label without re-encoding (same pixels), once, even labelled twice.
    image.save(tmp_path / "plain.jpg", quality=80)
    before = np.asarray(Image.open(tmp_path / "plain.jpg"))
    assert safety.read_label(tmp_path / "plain.jpg") == {}
    safety.label_image(tmp_path / "plain.jpg", "First")
    safety.label_image(tmp_path / "plain.jpg", SERVICE)
    _assert_labelled(tmp_path / "plain.jpg")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.jpg")), before)
    assert (tmp_path / "plain.jpg").read_bytes().count(b"Exif\x00\x00") == 1
    # A PNG is re-saved losslessly; a PIL image is labelled for its next save.
    image.save(tmp_path / "plain.png")
    safety.label_image(tmp_path / "plain.png", SERVICE)
    _assert_labelled(tmp_path / "plain.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(image))
    safety.label_image(image.copy(), SERVICE).save(tmp_path / "later.png")  # type: ignore[union-attr]
    _assert_labelled(tmp_path / "later.png")


def test_a_video_carries_the_label_in_its_comment_tag(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "talk.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert safety.read_label(path) == {}
    safety.label_video(path, SERVICE)
    assert safety.read_label(path) == {"comment": safety.label_text(SERVICE, "video")}
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5  # remuxed, every frame kept


# -- the classifier -------------------------------------------------------------------------------
def test_the_tiny_checker_flags_all_or_nothing(checkers: dict[str, Path]) -> None:
    pictures = _pictures(3)
    assert safety.SafetyChecker.open(checkers["all"]).flags(pictures) == [True, True, True]
    assert safety.SafetyChecker.open(checkers["none"]).flags(pictures) == [False, False, False]
    assert (checkers["all"] / "config.json").is_file() and (checkers["all"] / "preprocessor_config.json").is_file()


def test_screen_keeps_the_best_safe_ones_and_refuses_when_none_is_left(tmp_path: Path,
                                                                        checkers: dict[str, Path]) -> None:
    pictures = _pictures(4)
    clean = _context(tmp_path, safety_checker_path=str(checkers["none"]))
    assert safety.screen(clean, {}, pictures, 2) == safety.Screened([0, 1], 0, True)
    dirty = _context(tmp_path, safety_checker_path=str(checkers["all"]))
    with pytest.raises(UserFacingError) as refused:
        safety.screen(dirty, {}, pictures, 2)
    assert refused.value.code == "safety.flagged" and refused.value.details == {"count": 4}
    # Off globally: nothing is checked; a job's safe_mode=True (a group's choice) turns it back on.
    off = _context(tmp_path, safety_checker_path=str(checkers["all"]), safe_mode=False)
    assert safety.screen(off, {}, pictures, 2) == safety.Screened([0, 1], 0, False)
    with pytest.raises(UserFacingError):
        safety.screen(off, {"safe_mode": True}, pictures, 2)
    assert safety.screen(_context(tmp_path, safe_mode=True), {"safe_mode": False}, pictures[:1], 1).checked is False


def test_flagged_candidates_are_replaced_by_the_next_best(tmp_path: Path) -> None:
    class Bright(safety.SafetyChecker):
        """Flags bright pictures; counts how many it looked at."""

        def __init__(self) -> None:
            self.seen = 0

        def flags(self, images: Any) -> list[bool]:
            self.seen += len(images)
            return [float(np.mean(i)) > 127 for i in images]

    dark, bright = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    context = _context(tmp_path)
    context.shared[safety.SHARED_KEY] = checker = Bright()
    screened = safety.screen(context, {}, [bright, dark, bright, dark, dark], 2)
    assert screened == safety.Screened([1, 3], 2, True) and checker.seen == 4  # the fifth was not needed
    assert safety.safety_meta(screened) == {"checked": True, "dropped": 2}


def test_a_missing_checker_warns_or_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pictures = _pictures(1)
    assert safety.screen(_context(tmp_path), {}, pictures, 1) == safety.Screened([0], 0, False)
    assert "UNCHECKED" in caplog.text
    with pytest.raises(ModelNotInstalled) as missing:
        safety.screen(_context(tmp_path, safety_required=True), {}, pictures, 1)
    assert "facechain-bot models pull safety" in missing.value.details["pull_command"]
    # A group whose admins turned safe mode on never gets unchecked pictures, whatever the default.
    with pytest.raises(UserFacingError) as refused:
        safety.screen(_context(tmp_path), {"safe_mode": True}, pictures, 1)
    assert refused.value.code == "safety.checker_missing"
    assert "facechain-bot models pull safety" in refused.value.details["pull_command"]
    assert "pull safety" in t("safety.checker_missing", "en", **refused.value.details)


def test_the_cartoon_pipeline_screens_and_labels_its_output(tmp_path: Path, checkers: dict[str, Path],
                                                            cartoon_models: dict[str, Path]) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(_pictures(1)[0]).resize((96, 80)).save(photo)
    paths = {name: str(path) for name, path in cartoon_models.items()}
    for flag in ("none", "all"):
        pipeline = CartoonPipeline()
        pipeline.load(PipelineContext(models_dir=tmp_path, settings={
            "model_paths": {**paths, safety.MODEL_NAME: str(checkers[flag])}, "label_service": SERVICE}))
        out = tmp_path / flag / "cartoon.jpg"
        params = {"image": str(photo), "style": "anime", "out": str(out)}
        if flag == "none":
            result = pipeline.run(params, lambda *a, **k: None)  # type: ignore[arg-type]
            _assert_labelled(out)
            assert result.meta["safety"] == {"checked": True, "dropped": 0}
        else:
            with pytest.raises(UserFacingError, match="safety.flagged"):
                pipeline.run(params, lambda *a, **k: None)  # type: ignore[arg-type]
            assert not out.exists()  # a flagged picture is never written


def test_the_portrait_pipeline_screens_and_labels_every_png(tmp_path: Path, checkers: dict[str, Path],
                                                            tiny_models: dict[str, Path],
                                                            one_torch_thread: None) -> None:
    from facechain_core.portrait import PortraitPipeline
    from facechain_core.tiny import build_identity

    identity = build_identity(tmp_path / "identity.npz", 3)
    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, settings={
        "sd15_path": str(tiny_models["sd15"]), "ip_adapter_path": str(tiny_models["ip_adapter_faceid_sd15"]),
        "arcface_path": str(tiny_models["arcface"]), "face_filter": False, "oversample": 2,
        "safety_checker_path": str(checkers["none"]), "label_service": SERVICE}))
    style = {"id": "studio", "family": "sd15", "prompt": "{subject}, studio portrait", "identity_weight": 1.0,
             "sampler": {"scheduler": "ddim", "steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64}}
    params = {"style": style, "identity": str(identity), "count": 2, "seed": 5, "out_dir": str(tmp_path / "out")}
    result = pipeline.run(params, lambda *a, **k: None)  # type: ignore[arg-type]
    assert len(result.files) == 2 and result.meta["safety"] == {"checked": True, "dropped": 0}
    for path in result.files:
        _assert_labelled(path)
        assert safety.read_label(path)["ai_generated"] == "true"

    context = pipeline._context
    assert context is not None
    context.shared[safety.SHARED_KEY] = safety.SafetyChecker.open(checkers["all"])
    with pytest.raises(UserFacingError) as refused:
        pipeline.run({**params, "out_dir": str(tmp_path / "flagged")}, lambda *a, **k: None)  # type: ignore[arg-type]
    assert refused.value.code == "safety.flagged" and refused.value.details == {"count": 4}  # all 2 x 2 looked at
    assert not (tmp_path / "flagged").exists() or not list((tmp_path / "flagged").iterdir())


async def test_results_carry_the_note_and_a_report_button(make_world) -> None:  # noqa: F811
    from bot.storage import Artifact, new_artifact_id
    from handlers.progress import present_default
    from tests.fixtures.safety_world import private

    world = await make_world(pipeline={"label_service": SERVICE})
    key = "telegram:1"
    submitted = await world.jobs.submit(key, "demo", {}, private(1))
    arts = [Artifact(new_artifact_id(), submitted.job_id, key, "demo", f"/x/{i}.png", "image/png") for i in range(2)]
    await world.storage.finish_job(submitted.job_id, {"meta": {"safety": {"checked": True, "dropped": 3}}}, arts)
    job = await world.storage.job(submitted.job_id)
    channel = world.channel(private(1))
    await present_default(world.services, job, await world.storage.job_artifacts(job.id), channel, "en",
                          caption="Your pictures")
    (_, caption, keyboard), = channel.images
    assert caption == "\n".join(["Your pictures", t("safety.dropped", "en", count=3),
                                 t("safety.ai_note", "en", service=SERVICE)])
    reports = [b for row in keyboard for b in row if b.payload.startswith("report:")]
    assert [b.payload for b in reports] == [f"report:{a.id}" for a in arts]
    assert [b.label for b in reports] == [t("safety.report_button", "en") + f" {n}" for n in (1, 2)]


# -- through the service --------------------------------------------------------------------------
def _settings(fake: FakeTelegram, root: Path, yunet: Path, models: dict[str, Path], checker: Path) -> Any:
    return fake.bot_settings(
        data_dir=root / "data", models_dir=yunet.parent, selfie={"detector_model": yunet.name},
        scheduler={"progress_interval_s": 0}, access={"admins": [f"telegram:{ADMIN}"]},
        model_paths={**models, safety.MODEL_NAME: checker}, pipeline={"label_service": SERVICE},
    )


def _face(faces_dir: Path) -> bytes:
    image = Image.open(faces_dir / "obama.jpg").convert("RGB")
    buf = io.BytesIO()
    image.resize((image.width // 3, image.height // 3)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
async def test_flagged_results_are_not_sent_and_the_user_is_told(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                 yunet_path: Path, faces_dir: Path,
                                                                 checkers: dict[str, Path],
                                                                 cartoon_models: dict[str, Path]) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, yunet_path, cartoon_models, checkers["all"])
    async with open_service(settings) as service:
        assert "safety" in service.services.features_installed
        mark = fake.mark()
        fake.send_photo(ANN, None, _face(faces_dir), caption="/cartoon anime")
        told = await fake.wait_for("editMessageText", lambda c: c.params["text"] == t(
            "safety.flagged", "en", count=1), since=mark, timeout=60)
        assert told.params["chat_id"] == ANN
        await fake.wait_idle()
        assert not [c for c in fake.calls[mark:] if c.method in ("sendPhoto", "sendMediaGroup")]
        (job,) = await service.storage.user_jobs(f"telegram:{ANN}", ["failed"])
        assert job.error["code"] == "safety.flagged" and await service.storage.job_artifacts(job.id) == []
        assert not list((settings.data_dir / "users").rglob("cartoon_*.jpg"))


@pytest.mark.slow
async def test_clean_results_are_labelled_and_reports_reach_the_admin(fake_telegram: FakeTelegram, tmp_path: Path,
                                                                      yunet_path: Path, faces_dir: Path,
                                                                      checkers: dict[str, Path],
                                                                      cartoon_models: dict[str, Path]) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, yunet_path, cartoon_models, checkers["none"])
    async with open_service(settings) as service:
        # Ann's cartoon in a group: the caption says it is AI-generated, the file says so too.
        mark = fake.mark()
        photo = fake.send_photo(ANN, GROUP, _face(faces_dir))
        await fake.wait_for("sendMessage", since=mark, timeout=10)
        mark = fake.mark()
        fake.send_message(ANN, GROUP, "/cartoon anime", reply_to_message=photo)
        sent = await fake.wait_for("sendPhoto", since=mark, timeout=60)
        assert sent.params["caption"].endswith(t("safety.ai_note", "en", service=SERVICE))
        (upload,) = fake.uploads(sent)
        received = tmp_path / "received.jpg"
        received.write_bytes(upload)
        _assert_labelled(received)
        (job,) = await service.storage.user_jobs(f"telegram:{ANN}", ["delivered", "done"])
        (artifact,) = await service.storage.job_artifacts(job.id)
        _assert_labelled(Path(artifact.path))
        report = next(p for p in button_payloads(sent.result) if p.startswith("report:"))
        assert report == f"report:{artifact.id}"

        # Bob (not the owner) reports it: he is thanked; the admin gets the picture and Ann's key.
        mark = fake.mark()
        fake.press_button(sent.result, report, user=BOB)
        notice = await fake.wait_for("sendPhoto", lambda c: c.params["chat_id"] == ADMIN, since=mark, timeout=10)
        assert f"telegram:{ANN}" in notice.params["caption"] and f"telegram:{BOB}" in notice.params["caption"]
        thanks = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert thanks.params.get("text") == t("safety.reported", "en")
        # A second press by Bob is recorded once and tells no admin again.
        mark = fake.mark()
        fake.press_button(sent.result, report, user=BOB)
        again = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert again.params.get("text") == t("safety.already_reported", "en")
        await fake.wait_idle()
        assert not [c for c in fake.calls[mark:] if c.params.get("chat_id") == ADMIN]

        # The admin's button bans Ann at once.
        ban = next(p for p in button_payloads(notice.result) if p.startswith("rban:"))
        mark = fake.mark()
        fake.press_button(notice.result, ban, user=BOB)  # not an admin: refused
        refused = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
        assert refused.params.get("text") == t("core.admin_only", "en")
        assert await service.storage.ban(f"telegram:{ANN}") is None
        fake.press_button(notice.result, ban, user=ADMIN)
        deadline = asyncio.get_running_loop().time() + 10
        while await service.storage.ban(f"telegram:{ANN}") is None:
            assert asyncio.get_running_loop().time() < deadline, "the ban button did not ban"
            await asyncio.sleep(0.05)
        mark = fake.mark()
        fake.send_message(ANN, None, "/cartoon anime")
        answer = await fake.wait_for("sendMessage", since=mark, timeout=10)
        ban_row = await service.storage.ban(f"telegram:{ANN}")
        assert ban_row.banned_by == f"telegram:{ADMIN}"
        assert answer.params["text"] == t("safety.banned", "en", reason=t("safety.banned_reason", "en",
                                                                           reason=ban_row.reason))
