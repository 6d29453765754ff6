"""The portrait studio through the whole service (storage, scheduler, worker process, handlers) and the real
python-telegram-bot and discord.py clients against their fakes, on tiny models of the real formats:
controls (aspect, likeness, pose, seed, Vary, Again), /template and /imagine's prompt filter."""
from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app import open_service
from facechain_core.identity import Identity, load_identity, normalise, save_identity
from facechain_core.tiny.tryon import build_tryon_models
from facechain_core.tryon import working_image
from handlers.messages import t
from tests.fixtures.fake_discord import APP_ID, FakeDiscord
from tests.fixtures.fake_discord import fake_discord  # noqa: F401
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = pytest.mark.timeout(240)

ANN, BOB = 424242, 515151
GROUP = -100900
TEMPLATE_SIDE = 64


@pytest.fixture(scope="module")
def studio_models(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, Path]:  # noqa: F811
    """The try-on's tiny models (inpainting, ControlNets, DWPose) and a template picture: scikit-image's
    astronaut (NASA, public domain) standing in for the library's Mona Lisa."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("tiny_studio")
    models = build_tryon_models(folder)
    picture = folder / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(picture)
    return {**models, "template-mona_lisa": picture}


def _settings(fake: Any, tmp_path: Path, tiny_models_dir: Path, yunet_path: Path,  # noqa: F811
              studio_models: dict[str, Path]) -> Any:
    return fake.bot_settings(
        data_dir=tmp_path / "data", models_dir=tiny_models_dir,
        model_paths={**tiny_model_paths(tiny_models_dir, yunet_path), **studio_models},
        selfie={"detector_model": str(yunet_path)}, scheduler={"progress_interval_s": 0},
        pipeline={**TINY_PIPELINE, "oversample": 1, "template": {"side": TEMPLATE_SIDE, "steps": 2}},
        portrait_seed=1234)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


async def _said(fake: FakeTelegram, text: str, since: int, timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for call in fake.calls[since:]:
            if call.method in ("sendMessage", "editMessageText") and text in str(call.params.get("text", "")):
                return call
        await asyncio.sleep(0.05)
    raise AssertionError(f"the bot never said {text!r}")


async def _selfie(fake: FakeTelegram, service: Any, user: int, data: bytes) -> None:
    fake.send_photo(user, None, data)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while await service.storage.identity(f"telegram:{user}") is None:
        assert loop.time() < deadline, "no identity"
        await asyncio.sleep(0.1)


async def _result(fake: FakeTelegram, service: Any, user: int, command: str, method: str = "sendPhoto",
                  **send: Any) -> tuple[Any, Any]:
    """Sends `command`, waits for the picture(s); returns the send call and the delivered job."""
    mark = fake.mark()
    before = {j.id for j in await service.storage.user_jobs(f"telegram:{user}", ["delivered"])}
    fake.send_message(user, send.pop("chat", None), command, **send)
    sent = await fake.wait_for(method, since=mark, timeout=90)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        jobs = [j for j in await service.storage.user_jobs(f"telegram:{user}", ["delivered"]) if j.id not in before]
        if jobs:
            return sent, jobs[0]
        assert loop.time() < deadline, "the job was never marked delivered"
        await asyncio.sleep(0.05)


def _distinct_identity(path: Path, seed: int) -> None:
    """Rewrites a stored identity with a random embedding of its own (crop kept)."""
    stored = load_identity(path)
    vectors = np.random.default_rng(seed).normal(size=stored.photo_embeddings.shape).astype(np.float32)
    save_identity(Identity(normalise(vectors.mean(axis=0)), vectors, stored.crop), path)


async def _picture(fake: FakeTelegram, service: Any, user: int, command: str) -> tuple[np.ndarray, Any, Any]:
    sent, job = await _result(fake, service, user, command)
    (data,) = fake.uploads(sent)
    return _pixels(data), job, sent


async def test_controls_change_one_thing_each_at_the_same_seed(
        fake_telegram: FakeTelegram, tmp_path: Path, tiny_models_dir: Path, yunet_path: Path,  # noqa: F811
        studio_models: dict[str, Path], faces_dir: Path) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, tiny_models_dir, yunet_path, studio_models)
    async with open_service(settings) as service:
        assert {"portrait", "pose", "template"} <= service.services.features_installed
        await _selfie(fake, service, ANN, (faces_dir / "obama.jpg").read_bytes())

        plain, job, sent = await _picture(fake, service, ANN, "/style hanfu 1 seed:77")
        again, _, _ = await _picture(fake, service, ANN, "/style hanfu 1 seed:77")
        assert np.array_equal(plain, again)  # seed: reproducible
        assert t("studio.seed", "en", seed=77) in sent.params["caption"]  # shown under the result
        meta = job.result["meta"]
        assert meta["seeds"] == [77] and meta["pose"] is None

        tall, tall_job, _ = await _picture(fake, service, ANN, "/style hanfu 1 seed:77 aspect:2:3")
        assert tall.shape[0] > tall.shape[1] and tall.shape != plain.shape  # aspect: the size, a multiple of 8
        assert tall_job.result["meta"]["size"] == [tall.shape[1], tall.shape[0]]
        assert tall.shape[0] % 8 == 0 and tall.shape[1] % 8 == 0

        close, close_job, _ = await _picture(fake, service, ANN, "/style hanfu 1 seed:77 likeness:high")
        assert close.shape == plain.shape and not np.array_equal(close, plain)  # likeness: the weight
        assert meta["identity_weight"] == 0.85 and close_job.result["meta"]["identity_weight"] == pytest.approx(1.105)

        seated, seated_job, _ = await _picture(fake, service, ANN, "/style hanfu 1 seed:77 pose:seated")
        walking, _, _ = await _picture(fake, service, ANN, "/style hanfu 1 seed:77 姿势:行走")
        assert seated.shape == plain.shape and seated_job.result["meta"]["pose"] == "seated"
        assert not np.array_equal(seated, walking) and not np.array_equal(seated, plain)  # pose: the control map
        assert seated_job.result["meta"]["identity_weight"] == 0.85

        # Vary: the same job around the picture's seed; Again: new seeds, controls kept.
        (artifact,) = await service.storage.job_artifacts(seated_job.id)
        assert artifact.meta == {"seed": 77}
        message = fake.calls_of("sendPhoto")[-1].result
        mark = fake.mark()
        fake.press_button(message, f"vary:{artifact.id}")
        await fake.wait_for("sendPhoto", since=mark, timeout=90)
        mark = fake.mark()
        fake.press_button(message, f"again:{artifact.id}")
        await fake.wait_for("sendPhoto", since=mark, timeout=90)
        await fake.wait_idle()
        jobs = sorted(await service.storage.user_jobs(f"telegram:{ANN}", ["delivered"]), key=lambda j: j.id)
        varied, repeated = jobs[-2], jobs[-1]
        assert varied.params["controls"] == {"pose": {"id": "seated"}, "vary": {"seed": 77}}
        assert varied.result["meta"]["vary_of"] == 77
        assert repeated.params["controls"] == {"pose": {"id": "seated"}} and repeated.params["seed"] == 1234

        # Bad values get a reason; nothing is queued.
        count = len(await service.storage.user_jobs(f"telegram:{ANN}", ["queued", "running", "done", "delivered"]))
        mark = fake.mark()
        fake.send_message(ANN, None, "/style hanfu aspect:5:4")
        await _said(fake, t("studio.bad_aspect", "en", value="5:4", choices="2:3, 3:2, 9:16, square"), mark)
        mark = fake.mark()
        fake.send_message(ANN, None, "/style hanfu pose:handstand")
        await _said(fake, "handstand", mark)
        assert count == len(await service.storage.user_jobs(f"telegram:{ANN}",
                                                            ["queued", "running", "done", "delivered"]))


async def test_template_keeps_the_picture_outside_the_face_and_refuses_what_it_must(
        fake_telegram: FakeTelegram, tmp_path: Path, tiny_models_dir: Path, yunet_path: Path,  # noqa: F811
        studio_models: dict[str, Path], faces_dir: Path) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, tiny_models_dir, yunet_path, studio_models)
    async with open_service(settings) as service:
        await _selfie(fake, service, ANN, (faces_dir / "obama.jpg").read_bytes())
        await _selfie(fake, service, BOB, (faces_dir / "biden.jpg").read_bytes())
        for user, seed in ((ANN, 1), (BOB, 2)):  # the tiny ArcFace barely tells faces apart: make them differ
            _distinct_identity(service.services.user_dir(f"telegram:{user}") / "identity.npz", seed)
        template = working_image(studio_models["template-mona_lisa"], TEMPLATE_SIDE).astype(np.int16)

        ann, ann_job, sent = await _picture(fake, service, ANN, "/template mona_lisa seed:5")
        bob, _, _ = await _picture(fake, service, BOB, "/template Mona Lisa seed:5")
        assert sent.params["caption"].startswith(t("template.caption", "en", name="Mona Lisa"))
        assert ann.shape == template.shape
        x0, y0, x1, y1 = ann_job.result["meta"]["mask_box"]
        outside = np.ones(template.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert outside.mean() > 0.5
        for picture in (ann, bob):
            assert np.abs(picture - template)[outside].mean() <= 2  # the template kept outside the face
        # Two identities, same seed: two different faces (the tiny FaceID adapter moves pixels only a little).
        assert not np.array_equal(ann[~outside], bob[~outside]) and np.abs(ann - bob)[~outside].mean() > 0.2
        assert np.abs(ann - template)[~outside].mean() > 2  # not returned untouched

        jobs_before = len(await service.storage.user_jobs(f"telegram:{ANN}", ["queued", "done", "delivered"]))
        mark = fake.mark()
        fake.send_message(ANN, None, "/template arnolfini")  # a library template of two faces
        await _said(fake, t("template.many_faces", "en", faces=2), mark)
        assert len(await service.storage.user_jobs(f"telegram:{ANN}", ["queued", "done", "delivered"])) == jobs_before
        # The user's own photo of two people: the job says the same.
        mark = fake.mark()
        fake.send_photo(ANN, None, (faces_dir / "two_people.jpg").read_bytes(), caption="/template")
        await _said(fake, t("template.many_faces", "en", faces=2), mark, timeout=90)

        # Someone else's photo can lend neither a template nor a pose.
        mark = fake.mark()
        ann_photo = fake.send_photo(ANN, GROUP, _jpeg(Image.open(faces_dir / "obama2.jpg")))
        await fake.wait_for("sendMessage", since=mark, timeout=10)
        for command, code in (("/template", "template.not_yours"), ("/style hanfu pose:photo", "pose.not_yours")):
            mark = fake.mark()
            fake.send_message(BOB, GROUP, command, reply_to_message=ann_photo)
            await _said(fake, t(code, "en"), mark)
        await fake.wait_idle()
        bob_jobs = await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"])
        assert [j.kind for j in bob_jobs] == ["identity", "template"]


async def test_imagine_refuses_with_a_reason_and_no_job_row(
        fake_telegram: FakeTelegram, tmp_path: Path, tiny_models_dir: Path, yunet_path: Path,  # noqa: F811
        studio_models: dict[str, Path], faces_dir: Path) -> None:
    fake = fake_telegram
    settings = _settings(fake, tmp_path, tiny_models_dir, yunet_path, studio_models)
    async with open_service(settings) as service:
        await _selfie(fake, service, ANN, (faces_dir / "obama.jpg").read_bytes())
        key = f"telegram:{ANN}"
        jobs = await service.storage.user_jobs(key, ["queued", "running", "done", "delivered", "failed"])
        for prompt, reason, lang in (("/imagine me n.a.k.e.d on a beach", "sexual", "en"),
                                     ("/imagine 我的屍體躺在路邊", "violence", "zh")):
            if lang == "zh":
                fake.send_message(ANN, None, "/language zh")
                await fake.wait_idle()
            mark = fake.mark()
            fake.send_message(ANN, None, prompt)
            reply = await _said(fake, t(f"imagine.reason.{reason}", lang), mark)
            assert reply.params["text"] == t("imagine.refused", lang, reason=t(f"imagine.reason.{reason}", lang))
        await fake.wait_idle()
        assert await service.storage.user_jobs(key, ["queued", "running", "done", "delivered", "failed"]) == jobs
        sent, job = await _result(fake, service, ANN, "/imagine 我在西湖边划船 比例:3:2", "sendMediaGroup")
        assert job.params["imagine"] == "我在西湖边划船" and job.params["controls"] == {"aspect": "3:2"}
        assert t("imagine.caption", "zh", scene="我在西湖边划船") in json.dumps(sent.params["media"], ensure_ascii=False)


@pytest.fixture
def discord_settings(fake_discord: FakeDiscord, tmp_path: Path, tiny_models_dir: Path,  # noqa: F811
                     yunet_path: Path, studio_models: dict[str, Path]) -> Any:
    return _settings(fake_discord, tmp_path, tiny_models_dir, yunet_path, studio_models)


async def test_discord_options_reach_the_jobs(fake_discord: FakeDiscord, discord_settings: Any,  # noqa: F811
                                              faces_dir: Path) -> None:
    fake = fake_discord
    user = 412345678901234567
    async with open_service(discord_settings) as service:
        fake.slash(user, "selfie", photo1=(faces_dir / "obama.jpg").read_bytes())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await service.storage.identity(f"discord:{user}") is None:
            assert loop.time() < deadline
            await asyncio.sleep(0.1)
        posts = rf"/channels/{fake.dm_channel(user)['id']}/messages"
        mark = fake.mark()
        fake.slash(user, "style", style="hanfu", count=1, aspect="9:16", likeness="low", pose="closeup", seed=9)
        result = await fake.wait_for_files(posts, timeout=90, since=mark)
        assert t("studio.seed", "en", seed=9) in result.content
        ((_, picture),) = result.files
        assert Image.open(io.BytesIO(picture)).height > Image.open(io.BytesIO(picture)).width
        mark = fake.mark()
        fake.slash(user, "template", template="mona_lisa", likeness="high")
        result = await fake.wait_for_files(posts, timeout=90, since=mark)
        assert result.content.startswith(t("template.caption", "en", name="Mona Lisa"))
        mark = fake.mark()
        refused = fake.slash(user, "imagine", scene="me as a nazi officer")
        answer = await fake.wait_for("PATCH", rf"/webhooks/{APP_ID}/[^/]+/messages/@original",
                                     lambda r: refused.token in r.path and r.content is not None, since=mark)
        assert answer.content == t("imagine.refused", "en", reason=t("imagine.reason.hate", "en"))
        await fake.wait_idle()
        jobs = sorted(await service.storage.user_jobs(f"discord:{user}", ["delivered"]), key=lambda j: j.id)
    style_job, template_job = [j for j in jobs if j.kind in ("portrait", "template")]
    assert style_job.params["controls"] == {"aspect": "9:16", "likeness": "low", "pose": {"id": "closeup"}}
    assert style_job.params["seed"] == 9 and style_job.result["meta"]["identity_weight"] == pytest.approx(0.595)
    assert template_job.params["controls"] == {"likeness": "high"} and template_job.params["template_id"] == "mona_lisa"
