"""Cartoons: style data, layout/range/size handling against tiny ONNX stylisers of the real
signatures, face-aware blending on real faces, the pipeline, the CLI, and the chat handler's rules
(whose picture may be cartoonised) with a fake channel and queue over a real Storage."""
from __future__ import annotations

import io
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from PIL import Image
from skimage import data as skdata

from bot.cli import main as cli_main
from bot.config import Settings
from bot.storage import Artifact, Storage, new_artifact_id
from facechain_core.cartoon import (
    CartoonDataError,
    CartoonPipeline,
    ModelSpec,
    Styliser,
    blend_face,
    cartoonise,
    face_transform,
    feather_mask,
    load_cartoon_styles,
    parse_cartoon_styles,
    pick_faces,
)
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.faces import Face, create_detector
from facechain_core.manifest import load_manifest
from facechain_core.pipeline import PipelineContext
from facechain_core.selfie import detect_faces
from facechain_core.tiny.cartoon import (
    ANIMEGAN_V2,
    ANIMEGAN_V3,
    CARTOON_SIGNATURES,
    FACE_PAINT,
    Signature,
    build_cartoon_models,
    build_styliser,
)
from handlers import router
from handlers.messages import t
from handlers.protocols import (
    Attachment,
    Button,
    Chat,
    Event,
    Media,
    MessageRef,
    RepliedMessage,
    SentFile,
    Submitted,
    User,
    Visibility,
)
from handlers.services import Services
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = pytest.mark.timeout(120)

ALL_FEATURES = {"cartoon", "cartoon-animegan"}


def _astronaut(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC))


def _jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four cartoon models of the manifest as tiny random stylisers of their real signatures."""
    return build_cartoon_models(tmp_path_factory.mktemp("cartoon_models"))


def _context(models_dir: Path, model_paths: dict[str, Path] | None = None, **settings: Any) -> PipelineContext:
    paths = {k: str(v) for k, v in (model_paths or {}).items()}
    return PipelineContext(models_dir=models_dir, settings={"model_paths": paths, **settings})


# -- the style data ------------------------------------------------------------------------------
def test_style_data_is_valid_and_agrees_with_the_manifest() -> None:
    book = load_cartoon_styles()
    manifest = load_manifest()
    assert len(book.styles) >= 3
    kinds = {style.kind for style in book.styles.values()}
    assert kinds == {"onnx", "diffusion"}
    for style in book.styles.values():
        if style.diffusion is not None:  # repainted by the portrait models
            assert set(style.features) == {"cartoon", "portrait"}
            continue
        needed: set[str] = set()
        for name in (style.face_model, style.scene_model):
            entry = manifest.get(name)  # every model the styles use is a manifest entry
            assert entry.licence and entry.facts_from
            needed.update(entry.features)
        # A style is offered exactly when the features that pull its models are installed.
        assert set(style.features) == needed, style.id
        assert style.display_name("en") and style.display_name("zh")
    for name, spec in book.models.items():
        assert CARTOON_SIGNATURES[name].layout == spec.layout  # the tiny builders mirror the data
        assert spec.value_range == CARTOON_SIGNATURES[name].value_range
    assert book.find("Anime portrait") is book.get("anime")
    assert book.find("宫崎骏水彩") is book.get("hayao")
    assert book.available({"cartoon"}) == [book.get("anime")]


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"m": {"layout": "chw", "value_range": [-1, 1]}}}, "layout"),
    ({"model": {"m": {"layout": "nhwc", "value_range": [1, -1]}}}, "value_range"),
    ({"model": {"m": {"layout": "nhwc", "value_range": [-1, 1], "multiple": 8, "size": 500}}}, "size"),
    ({"model": {"m": {"layout": "nhwc", "value_range": [-1, 1], "colour": "bgr"}}}, "colour"),
    ({"style": {"s": {"en": "S", "features": ["cartoon"], "face_model": "m", "scene_model": "nope"}}}, "nope"),
    ({"style": {"s": {"en": "S", "features": [], "face_model": "m", "scene_model": "m"}}}, "features"),
    ({"style": {"S!": {"en": "S", "features": ["cartoon"], "face_model": "m", "scene_model": "m"}}}, "ids"),
    ({"style": {"d": {"en": "D", "features": ["cartoon", "portrait"], "kind": "diffusion", "prompt": "x"}}},
     "subject"),
    ({"style": {"d": {"en": "D", "features": ["cartoon"], "kind": "diffusion", "prompt": "{subject}"}}}, "portrait"),
    ({"style": {"d": {"en": "D", "features": ["portrait"], "kind": "gan", "prompt": "{subject}"}}}, "kind"),
])
def test_bad_style_data_names_the_table_and_key(change: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = {
        "model": {"m": {"layout": "nhwc", "value_range": [-1, 1], "multiple": 8}},
        "style": {"s": {"en": "S", "features": ["cartoon"], "face_model": "m", "scene_model": "m"}},
    }
    data.update(change)
    with pytest.raises(CartoonDataError, match=message):
        parse_cartoon_styles(data)


# -- layout, range and size ----------------------------------------------------------------------
IDENTITY_CASES = [
    ("nchw fixed 512, [-1,1]", FACE_PAINT, 4),
    ("nhwc any size, [-1,1]", ANIMEGAN_V2, 32),
    ("nhwc multiple of 8", ANIMEGAN_V3, 8),
    ("nchw any size, [0,1]", Signature("x", "y", "nchw", None, 3, (0.0, 1.0)), 8),
    ("nhwc any size, [0,255]", Signature("x", "y", "nhwc", None, 2, (0.0, 255.0)), 4),
]


@pytest.mark.parametrize(("label", "signature", "multiple"), IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_identity_models_round_trip_every_layout_and_range(tmp_path: Path, label: str, signature: Signature,
                                                           multiple: int) -> None:
    path = build_styliser(tmp_path / "identity.onnx", signature, identity=True)
    spec = ModelSpec("tiny", signature.layout, signature.value_range, multiple, signature.size)
    styliser = Styliser.open(path, spec)
    # Odd sizes; the fixed-size model also gets one larger than its input (tiles) and one smaller (padding).
    for width, height in ((301, 203), (700, 533), (97, 61)):
        rgb = _astronaut(width, height)
        out = styliser(rgb)
        assert out.shape == rgb.shape, label
        assert np.abs(out.astype(int) - rgb).max() <= 1, label


def test_odd_sizes_fail_raw_but_are_padded_and_cropped_back(tmp_path: Path) -> None:
    path = build_styliser(tmp_path / "v3.onnx", ANIMEGAN_V3, seed=3)
    rgb = _astronaut(135, 97)
    raw = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (rgb.astype(np.float32) / 127.5 - 1.0)[None]
    with pytest.raises(Exception, match="Add"):  # the real exports fail the same way off the multiple
        raw.run(None, {raw.get_inputs()[0].name: x})
    styliser = Styliser.open(path, load_cartoon_styles().models["animegan-v3-hayao"])
    out = styliser(rgb)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb).mean() > 10  # a random styliser does change the picture
    # The crop keeps the top-left: the same picture padded further stylises to the same pixels there.
    bigger = styliser(np.pad(rgb, ((0, 40), (0, 40), (0, 0)), mode="symmetric"))
    assert np.abs(bigger[:80, :120].astype(int) - out[:80, :120]).max() <= 1


def test_a_declared_layout_or_size_the_file_contradicts_is_refused(tmp_path: Path) -> None:
    nchw = build_styliser(tmp_path / "nchw.onnx", FACE_PAINT)
    with pytest.raises(ValueError, match="nchw"):
        Styliser.open(nchw, ModelSpec("m", "nhwc", (-1.0, 1.0), 4))
    with pytest.raises(ValueError, match="512"):
        Styliser.open(nchw, ModelSpec("m", "nchw", (-1.0, 1.0), 4, 256))
    assert Styliser.open(nchw, ModelSpec("m", "nchw", (-1.0, 1.0), 4, 512)).fixed_side == 512
    # An export that turns out to take any size is fed whole, whatever size the data declares.
    dynamic = build_styliser(tmp_path / "dynamic.onnx", Signature("x", "y", "nchw", None, 2))
    assert Styliser.open(dynamic, ModelSpec("m", "nchw", (-1.0, 1.0), 4, 512)).fixed_side is None


# -- faces ---------------------------------------------------------------------------------------
def test_face_transform_levels_the_eyes_and_centres_the_face() -> None:
    angle = math.radians(20)
    left, dist = (300.0, 400.0), 80.0
    right = (left[0] + dist * math.cos(angle), left[1] + dist * math.sin(angle))
    face = Face(box=(260.0, 330.0, 160.0, 200.0), landmarks=[left, right, (340, 440), (310, 480), (370, 490)],
                score=0.9)
    matrix = face_transform(face, 512, 2.0)
    (lx, ly), (rx, ry) = (matrix @ np.array([*p, 1.0]) for p in (left, right))
    assert abs(ly - ry) < 1e-6  # level eyes
    assert rx - lx == pytest.approx(dist * 512 / (2.0 * 200))  # scaled by size / (margin * longer side)
    cx, cy = matrix @ np.array([260 + 80, 330 + 100 - 20, 1.0])
    assert (cx, cy) == (pytest.approx(256), pytest.approx(256))
    mask = feather_mask(64)
    assert mask[32, 32] == 1.0 and mask[0, 0] == 0.0 and mask.min() >= 0.0


def test_faces_are_stylised_and_blended_back_over_the_scene(tmp_path: Path, yunet_path: Path,
                                                            faces_dir: Path) -> None:
    image = Image.open(faces_dir / "two_people.jpg").convert("RGB")
    faces = pick_faces(detect_faces(image, create_detector("yunet", yunet_path), 1280), 4)
    assert len(faces) == 2
    rgb = np.asarray(image)
    book = load_cartoon_styles()
    scene = Styliser.open(build_styliser(tmp_path / "id.onnx", ANIMEGAN_V3, identity=True),
                          book.models["animegan-v3-hayao"])
    face_model = Styliser.open(build_styliser(tmp_path / "fp.onnx", FACE_PAINT, seed=5),
                               book.models["animegan-face-paint-v2"])
    done: list[int] = []
    out = cartoonise(rgb, scene, face_model, faces, 512, 2.0, on_step=done.append)
    assert out.shape == rgb.shape and done == [1, 2, 3]
    diff = np.abs(out.astype(int) - rgb).max(axis=2)
    for face in faces:
        x, y, w, h = (int(v) for v in face.box)
        assert diff[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].mean() > 20  # the face is restyled
    assert diff[-60:, :].max() <= 1 and diff[:, :40].max() <= 1  # far from the faces: the scene alone
    # Without faces the identity scene returns the photo itself.
    assert np.abs(cartoonise(rgb, scene, face_model, [], 512, 2.0).astype(int) - rgb).max() <= 1
    # A crop entirely outside the picture leaves it alone.
    outside = np.array([[1.0, 0.0, 5000.0], [0.0, 1.0, 5000.0]])
    assert np.array_equal(blend_face(rgb, np.zeros((64, 64, 3), np.uint8), outside), rgb)


# -- the pipeline --------------------------------------------------------------------------------
def test_pipeline_cartoonises_a_face_photo(tmp_path: Path, tiny: dict[str, Path], yunet_path: Path,
                                           faces_dir: Path) -> None:
    pipeline = CartoonPipeline()
    pipeline.load(_context(yunet_path.parent, tiny))
    progress = StepRecorder()
    source = faces_dir / "obama.jpg"
    result = pipeline.run({"image": str(source), "style": "shinkai", "out_dir": str(tmp_path)}, progress)
    (out,) = result.files
    original = Image.open(source)
    cartoon = Image.open(out)
    assert cartoon.size == original.size and cartoon.format == "JPEG"
    assert result.meta["faces"] == 1 and result.meta["style"] == "shinkai" and result.meta["downscaled_from"] is None
    assert np.abs(np.asarray(cartoon, int) - np.asarray(original.convert("RGB"), int)).mean() > 10
    assert progress.steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    pipeline.close()


def test_pipeline_downscales_large_photos_with_a_clear_limit(tmp_path: Path, tiny: dict[str, Path]) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(_jpeg(_astronaut(3000, 2000)))
    pipeline = CartoonPipeline()
    pipeline.load(_context(tmp_path, tiny, cartoon_max_side=800, cartoon_faces=False))
    result = pipeline.run({"image": str(big), "style": "hayao", "out": str(tmp_path / "out.png")}, StepRecorder())
    assert Image.open(tmp_path / "out.png").size == (800, 533)
    assert result.meta["downscaled_from"] == [3000, 2000] and result.meta["max_side"] == 800


def test_pipeline_names_the_pull_command_and_unknown_styles(tmp_path: Path, tiny: dict[str, Path]) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(_astronaut(64, 64)))
    pipeline = CartoonPipeline()
    pipeline.load(_context(tmp_path / "empty"))
    with pytest.raises(ModelNotInstalled) as missing:
        pipeline.run({"image": str(photo), "style": "hayao", "out_dir": str(tmp_path)}, StepRecorder())
    assert "models pull cartoon-animegan --accept-license animegan-non-commercial" in \
        missing.value.details["pull_command"]
    pipeline.load(_context(tmp_path, tiny))
    with pytest.raises(UserFacingError) as unknown:
        pipeline.run({"image": str(photo), "style": "nope", "out_dir": str(tmp_path)}, StepRecorder())
    assert unknown.value.code == "cartoon.unknown_style_plain" and "anime" in unknown.value.details["styles"]
    assert "anime" in t(unknown.value.code, "en", **unknown.value.details)


@pytest.fixture
def keep_logging() -> Any:
    """The CLI configures logging for the process (httpx to WARNING): put it back for later tests."""
    root, httpx = logging.getLogger(), logging.getLogger("httpx")
    saved = (root.level, list(root.handlers), httpx.level)
    yield
    root.setLevel(saved[0])
    for handler in root.handlers[:]:
        if handler not in saved[1]:
            root.removeHandler(handler)
    httpx.setLevel(saved[2])


def test_cli_cartoon_runs_without_a_chat(tmp_path: Path, tiny: dict[str, Path], faces_dir: Path, yunet_path: Path,
                                         capsys: pytest.CaptureFixture[str], keep_logging: None) -> None:
    config = tmp_path / "config.toml"
    paths = "\n".join(f'{name} = "{path}"' for name, path in tiny.items())
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmodels_dir = "{yunet_path.parent}"\n'
                      f'[pipeline]\ncartoon_max_side = 1024\n[model_paths]\n{paths}\n')
    out = tmp_path / "cartoon.png"
    photo = faces_dir / "biden.jpg"  # 970x2204: over the limit of 1024 px
    code = cli_main(["--config", str(config), "cartoon", "--image", str(photo), "--style", "anime", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size == (451, 1024) and Image.open(out).format == "PNG"
    said = capsys.readouterr().out
    assert "anime" in said and "1 face" in said and "downscaled from 970x2204" in said
    assert cli_main(["--config", str(config), "cartoon", "--image", str(photo), "--style", "nope",
                     "--out", str(out)]) == 1
    assert cli_main(["--config", str(config), "cartoon", "--image", str(tmp_path / "missing.jpg"), "--style",
                     "anime", "--out", str(out)]) == 1


# -- the chat handler with fakes -----------------------------------------------------------------
@dataclass
class FakeChannel:
    chat: Chat
    texts: list[tuple[str, list[list[Button]] | None]] = field(default_factory=list)
    answers: list[tuple[str | None, bool]] = field(default_factory=list)
    albums: list[tuple[list[Media], str | None]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(700))

    async def send_text(self, text: str, buttons: list[list[Button]] | None = None,
                        visibility: Visibility = Visibility.CHAT) -> MessageRef:
        self.texts.append((text, buttons))
        return MessageRef(self.chat, str(next(self._ids)))

    async def edit_text(self, ref: MessageRef, text: str, buttons: list[list[Button]] | None = None) -> None:
        pass

    async def send_images(self, images: list[Media], caption: str | None = None,
                          buttons: list[list[Button]] | None = None,
                          visibility: Visibility = Visibility.CHAT) -> list[SentFile]:
        self.albums.append((images, caption))
        return [SentFile(MessageRef(self.chat, str(next(self._ids))), f"file-{len(self.albums)}-{i}")
                for i in range(len(images))]

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        self.answers.append((text, alert))

    def payloads(self) -> list[str]:
        return [b.payload for _, rows in self.texts for row in rows or [] for b in row]


class FakeQueue:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, str, dict[str, Any]]] = []

    async def submit(self, user_key: str, kind: str, params: dict[str, Any], chat: Chat,
                     progress_ref: MessageRef | None = None) -> Submitted:
        self.submitted.append((user_key, kind, params))
        return Submitted(len(self.submitted), 1, None)

    async def attach_progress(self, job_id: int, ref: MessageRef) -> None:
        pass


@dataclass
class World:
    services: Services
    storage: Storage
    jobs: FakeQueue
    channels: dict[str, FakeChannel]

    async def send(self, event: Event) -> FakeChannel:
        channel = self.channels.setdefault(event.chat.key, FakeChannel(event.chat))
        await router.handle_event(self.services, event, channel)
        return channel


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    settings = Settings.model_validate({"data_dir": str(tmp_path / "data")})
    storage = Storage(tmp_path / "data" / "db.sqlite3")
    await storage.open()
    jobs = FakeQueue()
    channels: dict[str, FakeChannel] = {}
    services = Services(settings=settings, storage=storage, jobs=jobs, data_dir=settings.data_dir,
                        check_selfie=lambda data: pytest.fail("no selfie check here"),
                        channel_for=lambda chat: channels.setdefault(chat.key, FakeChannel(chat)),
                        features_installed=set(ALL_FEATURES))
    yield World(services, storage, jobs, channels)
    await storage.close()


def _image(data: bytes, kind: str = "photo") -> Attachment:
    async def fetch() -> bytes:
        return data

    return Attachment(kind, len(data), "image/jpeg", None, fetch)


def _event(user: int, chat: Chat, text: str = "", reply: RepliedMessage | None = None, button: str | None = None,
           attachments: list[Attachment] | None = None) -> Event:
    command, args = None, []
    if text.startswith("/"):
        head, *args = text.split()
        command = head[1:]
    return Event(user=User("telegram", str(user)), chat=chat, text=text, command=command, args=args,
                 attachments=attachments or [], button_payload=button, reply_to=reply, message_id="1")


async def _result(world: World, owner: str, rgb: np.ndarray, file_id: str) -> Artifact:
    """A delivered portrait of `owner`, as the scheduler and presenter leave it."""
    job = await world.storage.insert_job(owner, "portrait", 1, {}, {"platform": "telegram", "id": "1",
                                                                     "is_private": True}, 1)
    folder = world.services.user_dir(owner) / "jobs" / str(job.id)
    folder.mkdir(parents=True)
    path = folder / "portrait.png"
    Image.fromarray(rgb).save(path)
    artifact = Artifact(id=new_artifact_id(), job_id=job.id, owner_key=owner, kind="portrait", path=str(path),
                        media_type="image/png")
    await world.storage.finish_job(job.id, {"files": [str(path)]}, [artifact])
    await world.storage.mark_delivered(artifact.id, "telegram", file_id)
    return artifact


ANN, BOB = 1, 2
GROUP = Chat("telegram", "-100", False, "Friends")


async def test_reply_to_own_photo_queues_a_copy_in_the_users_folder(world: World) -> None:
    stale = world.services.user_dir("telegram:1") / "cartoon" / "jobs" / "old" / "input.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a failed job")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    photo = _jpeg(_astronaut(320, 240))
    reply = RepliedMessage("50", "telegram:1", _image(photo), "F1")
    channel = await world.send(_event(ANN, GROUP, "/cartoon hayao", reply))
    ((user, kind, params),) = world.jobs.submitted
    assert (user, kind, params["style"]) == ("telegram:1", "cartoon", "hayao")
    image = Path(params["image"])
    assert image.is_relative_to(world.services.user_dir("telegram:1").resolve())
    assert Path(params["out_dir"]) == image.parent
    assert Image.open(image).size == (320, 240)
    assert "cartoon" in channel.texts[-1][0].lower()  # the queued notice names the job
    assert not stale.exists()  # inputs of jobs that never delivered go after a day


async def test_the_result_caption_says_when_the_photo_was_downscaled(world: World, tmp_path: Path) -> None:
    from handlers.cartoon import present_cartoon

    folder = world.services.user_dir("telegram:1") / "cartoon" / "jobs" / "abc"
    folder.mkdir(parents=True)
    (folder / "input.jpg").write_bytes(b"x")
    out = folder / "cartoon_hayao.jpg"
    out.write_bytes(_jpeg(_astronaut(64, 48)))
    params = {"style": "hayao", "image": str(folder / "input.jpg")}
    job = await world.storage.insert_job("telegram:1", "cartoon", 0, params, GROUP.to_dict(), 2)
    artifact = Artifact(new_artifact_id(), job.id, "telegram:1", "cartoon", str(out), "image/jpeg")
    result = {"files": [str(out)], "meta": {"downscaled_from": [4000, 3000], "max_side": 1536}}
    await world.storage.finish_job(job.id, result, [artifact])
    job = await world.storage.job(job.id)
    channel = FakeChannel(GROUP)
    await present_cartoon(world.services, job, [artifact], channel, "en")
    ((media, caption),) = channel.albums
    assert caption.startswith(t("cartoon.caption_downscaled", "en", style="Hayao watercolour", max_side=1536))
    assert "AI-generated" in caption
    assert media[0].path == out and not (folder / "input.jpg").exists() and out.exists()
    assert (await world.storage.artifact(artifact.id)).file_ids == {"telegram": "file-1-0"}


async def test_someone_elses_photo_or_result_is_refused(world: World) -> None:
    photo = _jpeg(_astronaut(320, 240))
    channel = await world.send(_event(BOB, GROUP, "/cartoon anime", RepliedMessage("50", "telegram:1", _image(photo))))
    assert channel.texts[-1][0] == t("cartoon.not_yours", "en")
    ann_result = await _result(world, "telegram:1", _astronaut(200, 260), "RESULT-ANN")
    sent = _jpeg(np.asarray(Image.open(ann_result.path)))
    await world.send(_event(BOB, GROUP, "/cartoon anime", RepliedMessage("51", "bot", _image(sent), "RESULT-ANN")))
    assert channel.texts[-1][0] == t("cartoon.not_yours", "en")
    await world.send(_event(BOB, GROUP, "/cartoon anime", RepliedMessage("52", "telegram:1", None)))
    assert channel.texts[-1][0] == t("cartoon.reply_no_photo", "en")
    assert world.jobs.submitted == []


@pytest.mark.parametrize("feature", ["pose", "template", "talk", "tryon"])
async def test_another_features_photo_refusals_are_worded_by_that_feature(world: World, feature: str) -> None:
    from handlers.cartoon import command_source_for
    from handlers.messages import catalogue

    photo = _jpeg(_astronaut(320, 240))
    for replied, code in ((RepliedMessage("50", "telegram:1", _image(photo)), "not_yours"),
                          (RepliedMessage("52", "telegram:1", None), "reply_no_photo")):
        with pytest.raises(UserFacingError) as refused:
            await command_source_for(world.services, _event(BOB, GROUP, f"/{feature}", replied), feature)
        assert refused.value.code == f"{feature}.{code}"
        assert {"en", "zh"} <= catalogue()[refused.value.code].keys()  # each feature words it in both languages
    assert await command_source_for(world.services, _event(BOB, GROUP, f"/{feature}"), feature) is None


async def test_own_result_is_found_by_file_id_or_by_picture(world: World) -> None:
    rgb = _astronaut(200, 260)
    mine = await _result(world, "telegram:1", rgb, "RESULT-1")
    await _result(world, "telegram:1", _astronaut(260, 200)[::-1].copy(), "RESULT-2")  # another of Ann's
    await _result(world, "telegram:2", rgb, "RESULT-BOB")  # the same picture, but Bob's: never Ann's source
    sent = _jpeg(rgb, quality=80)
    await world.send(_event(ANN, GROUP, "/cartoon anime", RepliedMessage("60", "bot", _image(sent), "RESULT-1")))
    # Telegram may show one file under another id: the picture itself then identifies Ann's result.
    await world.send(_event(ANN, GROUP, "/cartoon anime", RepliedMessage("61", "bot", _image(sent), "OTHER-ID")))
    assert len(world.jobs.submitted) == 2
    for _, _, params in world.jobs.submitted:
        assert Path(params["image"]).read_bytes() == Path(mine.path).read_bytes()
    # Without a style the buttons name the result itself: no copy is kept.
    channel = await world.send(_event(ANN, GROUP, "/cartoon", RepliedMessage("62", "bot", _image(sent), "RESULT-1")))
    assert f"toon:anime.a{mine.id}" in channel.payloads()
    assert not (world.services.user_dir("telegram:1") / "cartoon" / "sources").exists()


async def test_without_a_reply_the_latest_selfie_or_a_pending_photo(world: World) -> None:
    ann = "telegram:1"
    await world.storage.ensure_user(ann, "telegram", "en")
    selfie = world.services.user_dir(ann) / "selfies" / "s.jpg"
    selfie.parent.mkdir(parents=True)
    selfie.write_bytes(_jpeg(_astronaut(128, 128)))
    await world.storage.add_selfie(ann, str(selfie), {})
    await world.send(_event(ANN, Chat("telegram", "1", True), "/cartoon anime"))
    assert Path(world.jobs.submitted[-1][2]["image"]).read_bytes() == selfie.read_bytes()
    # In a group the selfie stays private: the bot asks for a photo and takes the next one.
    channel = await world.send(_event(ANN, GROUP, "/cartoon sketch"))
    assert channel.texts[-1][0] == t("cartoon.send_photo", "en", style="Pencil sketch", style_id="sketch")
    assert len(world.jobs.submitted) == 1
    await world.send(_event(ANN, GROUP, attachments=[_image(_jpeg(_astronaut(90, 70)))]))
    assert world.jobs.submitted[-1][2]["style"] == "sketch"
    assert Image.open(world.jobs.submitted[-1][2]["image"]).size == (90, 70)


async def test_unknown_style_lists_buttons_bound_to_the_photo(world: World) -> None:
    photo = _jpeg(_astronaut(160, 120))
    channel = await world.send(_event(ANN, GROUP, "/cartoon vaporwave",
                                      RepliedMessage("70", "telegram:1", _image(photo))))
    text, rows = channel.texts[-1]
    assert text == t("cartoon.unknown_style", "en", style="vaporwave")
    payloads = channel.payloads()
    assert {p.split(":")[1].split(".")[0] for p in payloads} == {"anime", "shinkai", "hayao", "sketch"}
    assert all(len(p.encode()) <= 64 for p in payloads)
    hayao = next(p for p in payloads if p.startswith("toon:hayao."))
    # Bob pressing Ann's button is told it is not his; Ann's press queues her photo.
    await world.send(_event(BOB, GROUP, button=hayao))
    assert channel.answers[-1] == (t("button.not_yours", "en")[:200], True)
    assert world.jobs.submitted == []
    await world.send(_event(ANN, GROUP, button=hayao))
    ((_, _, params),) = world.jobs.submitted
    assert params["style"] == "hayao" and Image.open(params["image"]).size == (160, 120)
    # /cartoon alone in private without a photo or selfie: the list, then a tap asks for a photo.
    private = await world.send(_event(ANN, Chat("telegram", "1", True), "/cartoon"))
    assert private.texts[-1][0] == t("cartoon.pick_style", "en")
    assert "toon:anime" in private.payloads()


async def test_result_button_offers_the_styles_for_that_result(world: World) -> None:
    artifact = await _result(world, "telegram:1", _astronaut(100, 100), "R")
    channel = await world.send(_event(ANN, GROUP, button=f"cartoon:{artifact.id}"))
    assert channel.texts[-1][0] == t("cartoon.pick_style", "en")
    anime = f"toon:anime.a{artifact.id}"
    assert anime in channel.payloads()
    await world.send(_event(BOB, GROUP, button=anime))
    assert channel.answers[-1][1] is True and world.jobs.submitted == []
    await world.send(_event(ANN, GROUP, button=anime))
    assert Path(world.jobs.submitted[-1][2]["image"]).read_bytes() == Path(artifact.path).read_bytes()


async def test_not_installed_feature_and_base_only_styles(world: World) -> None:
    world.services.features_installed = {"cartoon"}
    channel = await world.send(_event(ANN, GROUP, "/cartoon"))
    assert [p.split(":")[1] for p in channel.payloads()] == ["anime"]  # non-commercial styles not pulled
    world.services.features_installed = set()
    await world.send(_event(ANN, GROUP, "/cartoon anime"))
    assert channel.texts[-1][0] == t("feature.not_installed", "en", feature="cartoon")


# -- diffusion styles (tiny SD1.5 + IP-Adapter FaceID + ArcFace) ----------------------------------
DIFFUSION_STYLES = """
[style.likeness]
en = "Likeness"
features = ["cartoon", "portrait"]
kind = "diffusion"
prompt = "a 3D cartoon of {subject}"
strength = 0.8
identity_weight = 1.0
[style.nolikeness]
en = "No likeness"
features = ["cartoon", "portrait"]
kind = "diffusion"
prompt = "a 3D cartoon of {subject}"
strength = 0.8
identity_weight = 0.0
"""


@pytest.mark.slow
def test_diffusion_styles_repaint_keeping_the_face_and_share_the_portrait_base(
        tmp_path: Path, tiny_models: dict[str, Path], one_torch_thread: None, yunet_path: Path,  # noqa: F811
        faces_dir: Path) -> None:
    styles = tmp_path / "styles.toml"
    styles.write_text(DIFFUSION_STYLES)
    context = PipelineContext(models_dir=yunet_path.parent, settings={
        "sd15_path": str(tiny_models["sd15"]), "ip_adapter_path": str(tiny_models["ip_adapter_faceid_sd15"]),
        "arcface_path": str(tiny_models["arcface"]), "face_filter": False,
        "cartoon_diffusion_size": 64, "cartoon_diffusion_steps": 4,
    })
    pipeline = CartoonPipeline(styles_path=styles)
    pipeline.load(context)
    photo = tmp_path / "face.jpg"
    original = Image.open(faces_dir / "obama.jpg").convert("RGB").resize((228, 284))
    original.save(photo)

    def run(style: str, seed: int, name: str) -> np.ndarray:
        progress = StepRecorder()
        result = pipeline.run({"image": str(photo), "style": style, "seed": seed, "out": str(tmp_path / name)},
                              progress)
        assert result.meta["faces"] == 1 and progress.steps[-1][0] == progress.steps[-1][1] > 1
        return np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=np.int16)

    first, again = run("likeness", 7, "a.png"), run("likeness", 7, "b.png")
    assert first.shape == (284, 228, 3) and np.array_equal(first, again)  # same photo, style, seed: same cartoon
    assert np.abs(first - np.asarray(original, dtype=np.int16)).mean() > 5  # repainted
    assert np.abs(first - run("nolikeness", 7, "c.png")).max() > 2  # the face's identity conditions it
    resident = context.shared["resident"]
    assert resident.peek("cartoon:img2img").unet is resident.peek("portrait:sd15").pipe.unet
    faceless = tmp_path / "plain.jpg"
    faceless.write_bytes(_jpeg(np.full((96, 128, 3), 120, np.uint8)))
    with pytest.raises(UserFacingError) as err:
        pipeline.run({"image": str(faceless), "style": "likeness", "out_dir": str(tmp_path)}, StepRecorder())
    assert err.value.code == "cartoon.needs_face"
    pipeline.close()
