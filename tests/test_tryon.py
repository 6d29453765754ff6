"""Try-on engine on tiny models of the real formats: SegFormer clothes parser -> feathered garment
mask, DWPose skeleton, SD1.5 inpainting + openpose and depth ControlNets + IP-Adapter FaceID, garment
pasted back, candidates ranked."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.garment import ClothesParser, feather_mask
from facechain_core.identity import Identity, save_identity
from facechain_core.pipeline import PipelineContext
from facechain_core.pose import Pose, PoseEstimator, draw_openpose, openpose_body
from facechain_core.tiny.tryon import PALETTE, build_tryon_models, draw_outfit
from facechain_core.tryon import TryOnPipeline, check_parsing, working_image

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]

SIDE = 64
GARMENT_LABELS = {PALETTE["upper"][1], PALETTE["pants"][1]}


@pytest.fixture(scope="module")
def tryon_models(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict[str, Path]:
    return build_tryon_models(tmp_path_factory.mktemp("tiny_tryon"))


def _model_paths(tiny_models: dict[str, Path], tryon_models: dict[str, Path]) -> dict[str, Path]:
    return {**tryon_models, "ip-adapter-faceid-sd15": tiny_models["ip_adapter_faceid_sd15"],
            "arcface": tiny_models["arcface"]}


@pytest.fixture(scope="module")
def pipeline(tiny_models: dict[str, Path], tryon_models: dict[str, Path]) -> Any:
    context = PipelineContext(models_dir=tiny_models["arcface"].parent.parent, settings={
        "face_filter": False, "oversample": 1, "model_paths": _model_paths(tiny_models, tryon_models),
        "tryon": {"side": SIDE, "steps": 2}})
    pipe = TryOnPipeline()
    pipe.load(context)
    yield pipe
    pipe.close()


def _identity(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    embedding = rng.normal(size=512).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    save_identity(Identity(embedding, embedding[None], np.zeros((224, 224, 3), np.uint8)), path)
    return path


def _save(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


def _no_progress(step: int, total: int, text: str | None = None) -> None:
    pass


def _run(pipeline: Any, tmp: Path, outfit: Path, identity: Path, name: str, **params: Any) -> np.ndarray:
    result = pipeline.run({"outfit": str(outfit), "identity": str(identity), "seed": 7,
                           "out_dir": str(tmp / name), **params}, _no_progress)
    (path,) = result.files
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_parser_finds_the_garment_of_an_outfit_photo(tryon_models: dict[str, Path]) -> None:
    parser = ClothesParser(tryon_models["segformer-clothes"])
    picture = draw_outfit(128, arm_angle=0.5, shift=-4, seed=21)
    parsing = parser.parse(picture)
    colours = {label: np.array(colour) for colour, label in PALETTE.values()}
    truth = np.zeros(picture.shape[:2], bool)
    for label in GARMENT_LABELS:
        truth |= np.abs(picture.astype(int) - colours[label]).sum(-1) < 40
    iou = (parsing.garment & truth).sum() / (parsing.garment | truth).sum()
    assert iou > 0.7
    assert parsing.person_fraction > parsing.garment_fraction + 0.03  # face, hair and arms are person too
    check_parsing(parsing)


def test_pictures_without_a_person_or_a_garment_are_refused(tryon_models: dict[str, Path]) -> None:
    parser = ClothesParser(tryon_models["segformer-clothes"])
    empty = np.full((96, 96, 3), PALETTE["background"][0], np.uint8)
    with pytest.raises(UserFacingError) as info:
        check_parsing(parser.parse(empty))
    assert info.value.code == "tryon.no_person"
    bare = empty.copy()
    bare[20:80, 25:70] = PALETTE["face"][0]  # a person's skin, nothing worn
    with pytest.raises(UserFacingError) as info:
        check_parsing(parser.parse(bare))
    assert info.value.code == "tryon.no_garment"


def test_feather_keeps_the_mask_and_fades_outside() -> None:
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    soft = feather_mask(mask, dilate_px=2, feather_px=4)
    assert soft.dtype == np.float32 and np.all(soft[mask] == 1.0)
    assert np.all(soft[13:27, 15:25] == 1.0) and np.all(soft[15:25, 13:27] == 1.0)  # dilated by 2
    assert 0.0 < soft[20, 28] < 1.0  # the feather, just outside
    assert soft[20, 34] == 0.0 and soft[0, 0] == 0.0
    assert np.all(np.diff(soft[20, 26:36]) <= 0)  # fades monotonically


def test_garment_is_kept_and_the_rest_regenerated(pipeline: Any, tryon_models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    outfit = _save(draw_outfit(128, arm_angle=0.3, seed=5), tmp_path / "outfit.png")
    identity = _identity(tmp_path / "id.npz", 1)
    output = _run(pipeline, tmp_path, outfit, identity, "a")
    original = working_image(outfit, SIDE).astype(np.int16)
    assert output.shape == original.shape
    # The mask of the real parsing path on the same picture: garment exact, the rest repainted.
    garment = ClothesParser(tryon_models["segformer-clothes"]).parse(original.astype(np.uint8)).garment
    assert garment.mean() > 0.05
    assert np.abs(output - original)[garment].max() <= 1
    repainted = feather_mask(garment, 1, 1) == 0.0
    assert np.abs(output - original)[repainted].mean() > 15
    # Same seed, same inputs: the same picture.
    assert np.array_equal(_run(pipeline, tmp_path, outfit, identity, "b"), output)


def test_identity_and_pose_steer_the_repainted_region(pipeline: Any, tmp_path: Path) -> None:
    outfit = _save(draw_outfit(128, seed=6), tmp_path / "outfit.png")
    identity = _identity(tmp_path / "id.npz", 1)
    base = _run(pipeline, tmp_path, outfit, identity, "base")
    other_id = _run(pipeline, tmp_path, outfit, _identity(tmp_path / "id2.npz", 2), "id2")
    # Same seed and pose: the embedding alone moves the repainted pixels (exactly 0 for one identity).
    assert np.abs(other_id - base).mean() > 0.2
    # Same seed, a different pose picture for the openpose ControlNet: a different result.
    body = openpose_body(PoseEstimator(pipeline._model("pose_path")).estimate(
        working_image(outfit, SIDE), (16.0, 0.0, 48.0, 64.0)))
    moved = Pose(body.keypoints + np.float32(9.0), body.scores)
    pose_a = _save(draw_openpose(body, (SIDE, SIDE)), tmp_path / "pose_a.png")
    pose_b = _save(draw_openpose(moved, (SIDE, SIDE)), tmp_path / "pose_b.png")
    with_a = _run(pipeline, tmp_path, outfit, identity, "pa", pose_image=str(pose_a))
    with_b = _run(pipeline, tmp_path, outfit, identity, "pb", pose_image=str(pose_b))
    assert np.abs(with_a - with_b).mean() > 0.2
    assert np.abs(with_a - base).mean() > 0.2  # the given picture replaces the estimated skeleton


def test_run_refuses_an_outfit_photo_without_a_person(pipeline: Any, tmp_path: Path) -> None:
    empty = _save(np.full((96, 96, 3), PALETTE["background"][0], np.uint8), tmp_path / "empty.png")
    with pytest.raises(UserFacingError) as info:
        pipeline.run({"outfit": str(empty), "identity": str(_identity(tmp_path / "id.npz", 1)), "seed": 1,
                      "out_dir": str(tmp_path / "o")}, _no_progress)
    assert info.value.code == "tryon.no_person"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("missing", ["segformer-clothes", "dwpose-wholebody", "controlnet-openpose-sd15"])
def test_missing_model_is_not_installed(tiny_models: dict[str, Path], tryon_models: dict[str, Path],
                                        tmp_path: Path, missing: str) -> None:
    paths = _model_paths(tiny_models, tryon_models)
    del paths[missing]
    context = PipelineContext(models_dir=tmp_path, settings={"face_filter": False, "model_paths": paths})
    with pytest.raises(ModelNotInstalled) as info:
        TryOnPipeline().load(context)
    assert info.value.details["model"] == missing


def test_the_users_lora_joins_the_identity(pipeline: Any, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    outfit = _save(draw_outfit(128, seed=8), tmp_path / "outfit.png")
    identity = _identity(tmp_path / "id.npz", 1)
    plain = _run(pipeline, tmp_path, outfit, identity, "plain")
    # The tiny LoRA's random weights are weak at scale 1: a high scale makes its effect plain.
    with_lora = _run(pipeline, tmp_path, outfit, identity, "lora", user_lora=str(tiny_models["lora_sd15_a"]),
                     user_lora_scale=10.0)
    # The same call without the LoRA reproduces `plain` exactly, so any difference is the LoRA's.
    assert np.abs(with_lora - plain).mean() > 0.2
    assert np.array_equal(_run(pipeline, tmp_path, outfit, identity, "again"), plain)  # LoRA off again


def test_cli_tryon_writes_the_picture(tmp_path: Path, faces_dir: Path, yunet_path: Path, tiny_models_dir: Path,
                                      tryon_models: dict[str, Path]) -> None:
    from bot import offline
    from bot.cli import build_parser
    from bot.config import Settings
    from tests.fixtures.portrait_service import TINY_PIPELINE, tiny_model_paths

    settings = Settings(models_dir=tiny_models_dir,
                        model_paths={**tiny_model_paths(tiny_models_dir, yunet_path), **tryon_models},
                        selfie={"detector_model": str(yunet_path)},
                        pipeline={**TINY_PIPELINE, "tryon": {"side": SIDE, "steps": 2}})
    outfit = _save(draw_outfit(128, seed=9), tmp_path / "outfit.png")
    out = tmp_path / "out"
    args = build_parser().parse_args(["tryon", "--photo", str(faces_dir / "obama.jpg"), "--outfit", str(outfit),
                                      "--seed", "3", "--out", str(out)])
    assert offline.tryon(args, settings) == 0
    (png,) = sorted(out.glob("tryon_*.png"))
    assert Image.open(png).size == (SIDE, SIDE)
    bare = Settings(models_dir=tmp_path / "none", selfie={"detector_model": str(yunet_path)})
    with pytest.raises(ModelNotInstalled):
        offline.tryon(build_parser().parse_args(["tryon", "--photo", str(faces_dir / "obama.jpg"), "--outfit",
                                                 str(outfit), "--out", str(tmp_path / "bare")]), bare)


def test_faceid_plus_reads_the_users_face_crop(tiny_models: dict[str, Path], tryon_models: dict[str, Path],
                                               tmp_path: Path) -> None:
    paths = {**_model_paths(tiny_models, tryon_models),
             "ip-adapter-faceid-sd15": tiny_models["ip_adapter_faceid_plus_sd15"]}
    plus = TryOnPipeline()
    plus.load(PipelineContext(models_dir=tmp_path, settings={
        "face_filter": False, "oversample": 1, "model_paths": paths,
        "image_encoder_path": str(tiny_models["image_encoder"]),
        "tryon": {"side": SIDE, "steps": 2, "identity_weight": 10.0}}))  # the tiny CLIP path is faint at 1.0
    try:
        assert plus.base().plus
        outfit = _save(draw_outfit(128, seed=10), tmp_path / "outfit.png")
        embedding = np.random.default_rng(4).normal(size=512).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        crops = [np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8) for seed in (1, 2, 1)]
        outputs = []
        for n, crop in enumerate(crops):
            identity = save_identity(Identity(embedding, embedding[None], crop), tmp_path / f"id{n}.npz")
            outputs.append(_run(plus, tmp_path, outfit, identity, f"plus{n}"))
        # Same embedding and seed: only the face crop differs, and the repainted region follows it.
        assert np.array_equal(outputs[0], outputs[2])
        assert np.abs(outputs[0] - outputs[1]).max() > 2
    finally:
        plus.close()
