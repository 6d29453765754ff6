"""The portrait studio through the whole service (storage, scheduler, worker process, handlers) and the real
python-telegram-bot and discord.py clients against their fakes, on tiny models of the real formats:
controls (aspect, likeness, pose, seed, Vary, Again), the options panel, /template and /imagine's prompt
filter with its text classifier.

One service with both adapters serves the whole module (one worker, each pipeline loaded once); each test
has users of its own, so none depends on another having run."""
from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from bot.app import open_service
from facechain_core.identity import Identity, load_identity, normalise, save_identity
from facechain_core.prompt_filter import PromptFilter
from facechain_core.tiny.tryon import build_tryon_models
from facechain_core.tryon import working_image
from handlers.messages import t
from tests.conftest import SHARED, find_asset
from tests.fixtures.fake_discord import APP_ID, FakeDiscord
from tests.fixtures.fake_platforms import fake_platforms
from tests.fixtures.fake_telegram import FakeTelegram
from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths
from tests.fixtures.service_waits import delivered_job_ids, wait_for_delivered_job, wait_for_identity
from tests.fixtures.tiny_models import one_torch_thread, prompt_classifier_dir, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

ANN, BOB, CAT, DAN = 424242, 515151, 616161, 717171
DISCORD_USER = 412345678901234567
GROUP = -100900
TEMPLATE_SIDE = 64
DAY_S = 86_400


@dataclass
class Studio:
    service: Any
    telegram: FakeTelegram
    discord: FakeDiscord
    faces: Path
    template: Path  # the picture standing in for the library's Mona Lisa


@pytest.fixture(scope="module")
def studio_models(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None,  # noqa: F811
                  prompt_classifier_dir: Path) -> dict[str, Path]:  # noqa: F811
    """The try-on's tiny models (inpainting, ControlNets, DWPose), the tiny text classifier and a template
    picture: scikit-image's astronaut (NASA, public domain) standing in for the library's Mona Lisa."""
    skimage_data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("tiny_studio")
    models = build_tryon_models(folder)
    picture = folder / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(picture)
    return {**models, "template-mona_lisa": picture, "text-moderation": prompt_classifier_dir}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path,  # noqa: F811
                 studio_models: dict[str, Path]) -> AsyncIterator[Studio]:
    """The service with Telegram and Discord adapters against their fakes; its worker on one torch thread."""
    faces = SHARED / "faces"
    if not faces.is_dir():
        pytest.skip(f"{faces} not present (a fresh clone has no ../shared/)")
    yunet = find_asset("models/yunet_s_640_640.onnx")
    async with fake_platforms() as (telegram, discord):
        settings = telegram.bot_settings(
            discord=discord.discord_settings(), data_dir=tmp_path_factory.mktemp("studio_data"),
            models_dir=tiny_models_dir,
            model_paths={**tiny_model_paths(tiny_models_dir, yunet), **studio_models},
            selfie={"detector_model": str(yunet)}, scheduler={"progress_interval_s": 0},
            limits={"commands_per_minute": 0},  # one user presses many buttons across the module's tests
            pipeline={**TINY_PIPELINE, "oversample": 1, "template": {"side": TEMPLATE_SIDE, "steps": 2}},
            portrait_seed=1234)
        async with open_service(settings) as service:
            yield Studio(service, telegram, discord, faces, studio_models["template-mona_lisa"])


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


async def _identity(studio: Studio, user: int, photo: str) -> None:
    """Gives the user an identity from a selfie (once: a user another test made keeps theirs)."""
    service, fake = studio.service, studio.telegram
    if await service.storage.identity(f"telegram:{user}") is not None:
        return
    fake.send_photo(user, None, (studio.faces / photo).read_bytes())
    await wait_for_identity(service, f"telegram:{user}")


async def _result(studio: Studio, user: int, command: str, method: str = "sendPhoto", **send: Any) -> tuple[Any, Any]:
    """Sends `command`, waits for the picture(s); returns the send call and the delivered job."""
    service, fake = studio.service, studio.telegram
    mark = fake.mark()
    before = await delivered_job_ids(service, f"telegram:{user}")
    fake.send_message(user, send.pop("chat", None), command, **send)
    sent = await fake.wait_for(method, since=mark, timeout=90)
    return sent, await wait_for_delivered_job(service, f"telegram:{user}", before)


async def _pressed(studio: Studio, user: int, message: dict[str, Any], payload: str,
                   method: str = "sendPhoto") -> tuple[Any, Any]:
    """Presses a result button, waits for the new picture(s); returns the send call and the delivered job."""
    service, fake = studio.service, studio.telegram
    mark = fake.mark()
    before = await delivered_job_ids(service, f"telegram:{user}")
    fake.press_button(message, payload, user=user)
    sent = await fake.wait_for(method, since=mark, timeout=90)
    return sent, await wait_for_delivered_job(service, f"telegram:{user}", before)


def _distinct_identity(path: Path, seed: int) -> None:
    """Rewrites a stored identity with a random embedding of its own (crop kept)."""
    stored = load_identity(path)
    vectors = np.random.default_rng(seed).normal(size=stored.photo_embeddings.shape).astype(np.float32)
    save_identity(Identity(normalise(vectors.mean(axis=0)), vectors, stored.crop), path)


async def _picture(studio: Studio, user: int, command: str) -> tuple[np.ndarray, Any, Any]:
    sent, job = await _result(studio, user, command)
    (data,) = studio.telegram.uploads(sent)
    return _pixels(data), job, sent


async def _active_jobs(service: Any, user: int) -> int:
    return len(await service.storage.user_jobs(f"telegram:{user}", ["queued", "running", "done", "delivered"]))


async def test_controls_change_one_thing_each_at_the_same_seed(studio: Studio) -> None:
    service, fake = studio.service, studio.telegram
    assert {"portrait", "pose", "template", "imagine-classifier"} <= service.services.features_installed
    await _identity(studio, ANN, "obama.jpg")

    plain, job, sent = await _picture(studio, ANN, "/style hanfu 1 seed:77")
    again, _, _ = await _picture(studio, ANN, "/style hanfu 1 seed:77")
    assert np.array_equal(plain, again)  # seed: reproducible
    assert t("studio.seed", "en", seed=77) in sent.params["caption"]  # shown under the result
    meta = job.result["meta"]
    assert meta["seeds"] == [77] and meta["pose"] is None

    tall, tall_job, _ = await _picture(studio, ANN, "/style hanfu 1 seed:77 aspect:2:3")
    assert tall.shape[0] > tall.shape[1] and tall.shape != plain.shape  # aspect: the size, a multiple of 8
    assert tall_job.result["meta"]["size"] == [tall.shape[1], tall.shape[0]]
    assert tall.shape[0] % 8 == 0 and tall.shape[1] % 8 == 0

    close, close_job, _ = await _picture(studio, ANN, "/style hanfu 1 seed:77 likeness:high")
    assert close.shape == plain.shape and not np.array_equal(close, plain)  # likeness: the weight
    assert meta["identity_weight"] == 0.85 and close_job.result["meta"]["identity_weight"] == pytest.approx(1.105)

    seated, seated_job, _ = await _picture(studio, ANN, "/style hanfu 1 seed:77 pose:seated")
    walking, _, _ = await _picture(studio, ANN, "/style hanfu 1 seed:77 姿势:行走")
    assert seated.shape == plain.shape and seated_job.result["meta"]["pose"] == "seated"
    assert not np.array_equal(seated, walking) and not np.array_equal(seated, plain)  # pose: the control map
    assert seated_job.result["meta"]["identity_weight"] == 0.85

    # Vary: the same job around the picture's seed; Again: new seeds, controls kept.
    (artifact,) = await service.storage.job_artifacts(seated_job.id)
    assert artifact.meta == {"seed": 77}
    message = fake.calls_of("sendPhoto")[-1].result
    _, varied = await _pressed(studio, ANN, message, f"vary:{artifact.id}")
    _, repeated = await _pressed(studio, ANN, message, f"again:{artifact.id}")
    assert varied.params["controls"] == {"pose": {"id": "seated"}, "vary": {"seed": 77}}
    assert varied.result["meta"]["vary_of"] == 77
    assert repeated.params["controls"] == {"pose": {"id": "seated"}} and repeated.params["seed"] == 1234

    # The pose of the user's own photo; its copy is kept like other inputs: an expired copy goes.
    pose_dir = service.services.user_dir(f"telegram:{ANN}") / "pose"
    old_copy = pose_dir / "0123456789ab" / "pose.jpg"
    old_copy.parent.mkdir(parents=True)
    old_copy.write_bytes(b"an expired copy")
    os.utime(old_copy, (time.time() - 2 * DAY_S, time.time() - 2 * DAY_S))
    mark = fake.mark()
    before = await delivered_job_ids(service, f"telegram:{ANN}")
    fake.send_photo(ANN, None, (studio.faces / "obama2.jpg").read_bytes(), caption="/style hanfu 1 seed:77 pose:photo")
    await fake.wait_for("sendPhoto", since=mark, timeout=90)
    posed = await wait_for_delivered_job(service, f"telegram:{ANN}", before)
    copy = Path(posed.params["controls"]["pose"]["image"])
    assert copy.is_file() and copy.is_relative_to(pose_dir.resolve()) and posed.result["meta"]["pose"] == "photo"
    assert not old_copy.exists() and not old_copy.parent.exists()

    # Bad values get a reason; nothing is queued.
    count = await _active_jobs(service, ANN)
    mark = fake.mark()
    fake.send_message(ANN, None, "/style hanfu aspect:5:4")
    await fake.wait_for_text(t("studio.bad_aspect", "en", value="5:4", choices="2:3, 3:2, 9:16, square"), since=mark)
    mark = fake.mark()
    fake.send_message(ANN, None, "/style hanfu pose:handstand")
    await fake.wait_for_text("handstand", since=mark)
    assert count == await _active_jobs(service, ANN)


async def test_options_panel_buttons_reach_the_job_and_only_its_owner_presses_them(studio: Studio) -> None:
    service, fake = studio.service, studio.telegram
    await _identity(studio, ANN, "obama.jpg")
    await _identity(studio, BOB, "biden.jpg")
    ann = f"telegram:{ANN}"
    # "⚙ Options" under a page of /styles lists the styles again; a tap opens that style's panel.
    mark = fake.mark()
    fake.send_message(ANN, GROUP, "/styles")
    catalogue = await fake.wait_for("sendMessage", lambda c: "optlist:0" in c.buttons, 10, since=mark)
    mark = fake.mark()
    fake.press_button(catalogue.result, "optlist:0", user=ANN)
    listing = await fake.wait_for("sendMessage", lambda c: "optstyle:hanfu" in c.buttons, 10, since=mark)
    mark = fake.mark()
    fake.press_button(listing.result, "optstyle:hanfu", user=ANN)
    panel = await fake.wait_for_text(t("panel.title", "en", style="Hanfu"), since=mark, timeout=10)
    message = panel.result
    panel_id = next(p for p in panel.buttons if p.startswith("optgo:")).partition(":")[2]
    assert all(len(p.encode()) <= 64 for p in panel.buttons)
    assert f"opt:{panel_id}.pose.seated" in panel.buttons  # pose is installed for SD1.5

    # Another member's press changes nothing and is told so.
    mark = fake.mark()
    fake.press_button(message, f"opt:{panel_id}.aspect.9:16", user=BOB)
    refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
    assert refusal.params.get("text") == t("button.not_yours", "en") and refusal.params.get("show_alert")
    assert (await service.storage.panel(panel_id)).state.get("aspect") is None

    # The owner's presses change the panel (kept in its row, shown ticked)...
    edit = None
    for choice in ("aspect.9:16", "likeness.low", "pose.seated", "count.1"):
        mark = fake.mark()
        fake.press_button(message, f"opt:{panel_id}.{choice}", user=ANN)
        edit = await fake.wait_for("editMessageText", since=mark, timeout=10)
    assert edit is not None
    text = edit.params["text"]
    for line in (t("panel.aspect", "en", value="9:16"), t("panel.likeness", "en", value="Low"),
                 t("panel.pose", "en", value="Seated"), t("panel.count", "en", value="1")):
        assert line in text
    assert f"opt:{panel_id}.aspect.9:16" in edit.buttons
    ticked = [b["text"] for row in edit.params["reply_markup"]["inline_keyboard"] for b in row
              if b["text"].startswith("✓")]
    assert ticked == ["✓ 9:16", "✓ Low", "✓ Seated", "✓ 1", "✓ " + t("panel.fast_default", "en")]  # Speed: untouched

    # ... and "Go" queues exactly them; the panel is gone after, so another press of Go queues nothing.
    mark = fake.mark()
    before = await delivered_job_ids(service, ann)
    fake.press_button(message, f"optgo:{panel_id}", user=ANN)
    sent = await fake.wait_for("sendPhoto", since=mark, timeout=90)
    job = await wait_for_delivered_job(service, ann, before)
    assert job.kind == "portrait" and job.params["style_id"] == "hanfu" and job.params["count"] == 1
    assert job.params["controls"] == {"aspect": "9:16", "likeness": "low", "pose": {"id": "seated"}}
    meta = job.result["meta"]
    assert meta["pose"] == "seated" and meta["identity_weight"] == pytest.approx(0.595)
    width, height = meta["size"]
    assert height > width
    count = await _active_jobs(service, ANN)
    mark = fake.mark()
    fake.press_button(message, f"optgo:{panel_id}", user=ANN)
    stale = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
    assert stale.params.get("text") == t("button.stale", "en")
    assert await _active_jobs(service, ANN) == count

    # "⚙ Options" under the result opens a panel with that job's choices; only its owner may open it.
    (artifact,) = await service.storage.job_artifacts(job.id)
    assert f"optres:{artifact.id}" in sent.buttons
    mark = fake.mark()
    fake.press_button(sent.result, f"optres:{artifact.id}", user=BOB)
    refusal = await fake.wait_for("answerCallbackQuery", since=mark, timeout=10)
    assert refusal.params.get("text") == t("button.not_yours", "en")
    mark = fake.mark()
    fake.press_button(sent.result, f"optres:{artifact.id}", user=ANN)
    prefilled = await fake.wait_for_text(t("panel.title", "en", style="Hanfu"), since=mark, timeout=10)
    assert t("panel.aspect", "en", value="9:16") in prefilled.params["text"]
    assert t("panel.pose", "en", value="Seated") in prefilled.params["text"]
    again_id = next(p for p in prefilled.buttons if p.startswith("optx:")).partition(":")[2]
    mark = fake.mark()
    fake.press_button(prefilled.result, f"optx:{again_id}", user=ANN)
    closed = await fake.wait_for("editMessageText", since=mark, timeout=10)
    assert closed.params["text"] == t("panel.closed", "en") and await service.storage.panel(again_id) is None
    await fake.wait_idle()
    assert await _active_jobs(service, ANN) == count


async def test_template_keeps_the_picture_outside_the_face_and_refuses_what_it_must(studio: Studio) -> None:
    service, fake = studio.service, studio.telegram
    await _identity(studio, CAT, "obama.jpg")
    await _identity(studio, BOB, "biden.jpg")
    for user, seed in ((CAT, 1), (BOB, 2)):  # the tiny ArcFace barely tells faces apart: make them differ
        _distinct_identity(service.services.user_dir(f"telegram:{user}") / "identity.npz", seed)
    template = working_image(studio.template, TEMPLATE_SIDE).astype(np.int16)

    cat, cat_job, sent = await _picture(studio, CAT, "/template mona_lisa seed:5")
    bob, _, _ = await _picture(studio, BOB, "/template Mona Lisa seed:5")
    assert sent.params["caption"].startswith(t("template.caption", "en", name="Mona Lisa"))
    assert cat.shape == template.shape
    with Image.open(studio.template) as picture:
        assert cat_job.params["picture_size"] == list(picture.size)  # planned into a shared pass by it
    x0, y0, x1, y1 = cat_job.result["meta"]["mask_box"]
    outside = np.ones(template.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert outside.mean() > 0.5
    # Two identities, same seed: two different faces (the tiny FaceID adapter moves pixels only a little).
    assert not np.array_equal(cat[~outside], bob[~outside]) and np.abs(cat - bob)[~outside].mean() > 0.2
    assert np.abs(cat - template)[~outside].mean() > 2  # not returned untouched

    # Vary: the same template around the picture's seed, nearer to it than Again's new seed.
    (artifact,) = await service.storage.job_artifacts(cat_job.id)
    varied_sent, varied_job = await _pressed(studio, CAT, sent.result, f"vary:{artifact.id}")
    again_sent, again_job = await _pressed(studio, CAT, sent.result, f"again:{artifact.id}")
    assert varied_job.params["controls"] == {"vary": {"seed": 5}} and varied_job.result["meta"]["vary_of"] == 5
    assert again_job.params["controls"] == {} and again_job.result["meta"]["vary_of"] is None
    (varied_data,), (again_data,) = fake.uploads(varied_sent), fake.uploads(again_sent)
    varied, again = _pixels(varied_data), _pixels(again_data)
    for picture in (cat, bob, varied, again):
        assert np.abs(picture - template)[outside].mean() <= 2  # the template kept outside the face
    assert not np.array_equal(varied[~outside], cat[~outside])
    assert np.abs(varied - cat)[~outside].mean() < np.abs(again - cat)[~outside].mean()

    jobs_before = len(await service.storage.user_jobs(f"telegram:{CAT}", ["queued", "done", "delivered"]))
    mark = fake.mark()
    fake.send_message(CAT, None, "/template arnolfini")  # a library template of two faces
    await fake.wait_for_text(t("template.many_faces", "en", faces=2), since=mark)
    assert len(await service.storage.user_jobs(f"telegram:{CAT}", ["queued", "done", "delivered"])) == jobs_before
    # The user's own photo of two people: the job says the same.
    mark = fake.mark()
    fake.send_photo(CAT, None, (studio.faces / "two_people.jpg").read_bytes(), caption="/template")
    await fake.wait_for_text(t("template.many_faces", "en", faces=2), since=mark, timeout=90)

    # Someone else's photo can lend neither a template nor a pose.
    mark = fake.mark()
    cat_photo = fake.send_photo(CAT, GROUP, _jpeg(Image.open(studio.faces / "obama2.jpg")))
    await fake.wait_for("sendMessage", since=mark, timeout=10)
    for command, code in (("/template", "template.not_yours"), ("/style hanfu pose:photo", "pose.not_yours")):
        mark = fake.mark()
        fake.send_message(BOB, GROUP, command, reply_to_message=cat_photo)
        await fake.wait_for_text(t(code, "en"), since=mark)
    await fake.wait_idle()
    bob_jobs = await service.storage.user_jobs(f"telegram:{BOB}", ["queued", "running", "done", "delivered"])
    assert [j.kind for j in bob_jobs] == ["identity", "template"]


async def test_imagine_refuses_with_a_reason_and_no_job_row(studio: Studio) -> None:
    service, fake = studio.service, studio.telegram
    await _identity(studio, DAN, "obama.jpg")
    key = f"telegram:{DAN}"
    # Ids only: the selfie's identity job may still move from done to delivered meanwhile.
    jobs = {j.id for j in await service.storage.user_jobs(key, ["queued", "running", "done", "delivered", "failed"])}
    lists = PromptFilter.load()
    assert lists.check("me at a gorefest") is None  # only the classifier refuses this one
    for prompt, reason, lang in (("/imagine me n.a.k.e.d on a beach", "sexual", "en"),
                                 ("/imagine me at a gorefest", "violence", "en"),
                                 ("/imagine 我的屍體躺在路邊", "violence", "zh")):
        if lang == "zh":
            fake.send_message(DAN, None, "/language zh")
            await fake.wait_idle()
        mark = fake.mark()
        fake.send_message(DAN, None, prompt)
        reply = await fake.wait_for_text(t(f"imagine.reason.{reason}", lang), since=mark)
        assert reply.params["text"] == t("imagine.refused", lang, reason=t(f"imagine.reason.{reason}", lang))
    await fake.wait_idle()
    after = {j.id for j in await service.storage.user_jobs(key, ["queued", "running", "done", "delivered", "failed"])}
    assert after == jobs
    sent, job = await _result(studio, DAN, "/imagine 我在西湖边划船 比例:3:2", "sendMediaGroup")
    assert job.params["imagine"] == "我在西湖边划船" and job.params["controls"] == {"aspect": "3:2"}
    assert t("imagine.caption", "zh", scene="我在西湖边划船") in json.dumps(sent.params["media"], ensure_ascii=False)


async def test_discord_options_reach_the_jobs(studio: Studio) -> None:
    service, fake = studio.service, studio.discord
    user = DISCORD_USER
    fake.slash(user, "selfie", photo1=(studio.faces / "obama.jpg").read_bytes())
    await wait_for_identity(service, f"discord:{user}")
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
