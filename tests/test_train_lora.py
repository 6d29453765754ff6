"""Identity LoRA training on a tiny SD1.5 (random weights, 32-64 px, CPU): crops, learning, resume, yield."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from facechain_core.errors import JobCancelled, ModelNotInstalled, UserFacingError
from facechain_core.pipeline import PipelineContext
from facechain_core.tiny import build_sd15
from facechain_core.train_data import FaceBox, crop_face, prepare_crops
from facechain_core.train_lora import (
    CHECKPOINT_DIR,
    STAGE_PREPARING,
    STAGE_SAVING,
    STAGE_TRAINING,
    TRAIN_ADAPTER,
    WEIGHT_NAME,
    TrainLoraPipeline,
    TrainParams,
    adapter_names,
    checkpoint_path,
    weights_variant,
)
from tests.fixtures.training_child import kill_at_first_checkpoint

TRIGGER = "a photo of sks person"
RES = 32  # the tiny VAE halves it: 16x16 latents keep every step a few tens of ms


class RecordingProgress:
    """A progress fake: records steps, cancels at a chosen step, runs a hook at yield points."""

    def __init__(self, cancel_at: int | None = None, on_yield: Callable[[], None] | None = None) -> None:
        self.steps: list[tuple[int, int, str | None]] = []
        self.cancel_at = cancel_at
        self.on_yield = on_yield
        self.yields = 0

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        self.steps.append((step, total, text))
        if self.cancel_at is not None and step == self.cancel_at:
            raise JobCancelled()

    def yield_point(self) -> None:
        self.yields += 1
        if self.on_yield is not None:
            self.on_yield()


def synthetic_photo(path: Path, seed: int, size: tuple[int, int] = (160, 200)) -> dict[str, Any]:
    """Write a noisy photo with a drawn face and return its training record."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    box = [40 + seed * 3, 50, 64, 80]
    x, y, w, h = box
    draw.ellipse([x, y, x + w, y + h], fill=(225, 180, 150))
    draw.ellipse([x + 14, y + 28, x + 22, y + 36], fill=(20, 20, 20))
    draw.ellipse([x + 42, y + 28, x + 50, y + 36], fill=(20, 20, 20))
    img.save(path)
    return {"path": str(path), "face": {"box": box, "landmarks": [[x + 18, y + 32], [x + 46, y + 32]]}}


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sd15(tmp_path_factory.mktemp("sd15") / "sd15")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("photos")
    return [synthetic_photo(folder / f"p{i}.png", i) for i in range(2)]


@pytest.fixture(scope="module")
def pipeline(sd15_dir: Path) -> TrainLoraPipeline:
    pipe = TrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=sd15_dir.parent, settings={"model_paths": {"sd15": str(sd15_dir)}}))
    yield pipe
    pipe.close()


def job(photos: list[dict[str, Any]], out_dir: Path, **overrides: Any) -> dict[str, Any]:
    params = {"photos": photos, "out_dir": str(out_dir), "trigger": TRIGGER, "steps_per_photo": 6,
              "max_steps": 12, "resolution": RES, "checkpoint_every": 4, "lr": 1e-2, "seed": 7}
    return {**params, **overrides}


def probe(unet: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    """Return the UNet's prediction on a fixed input (to tell LoRA-on from base)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, 4, RES // 2, RES // 2), generator=g)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), text).sample


def fixed_eval_loss(unet: torch.nn.Module, sd: StableDiffusionPipeline, photos: list[dict[str, Any]]) -> float:
    """Return the denoising loss on the training crops for fixed noise and timesteps."""
    from facechain_core.train_data import to_pixels, with_flips
    from facechain_core.train_lora import cache_inputs

    inputs = cache_inputs(sd.vae, sd.text_encoder, sd.tokenizer, with_flips(to_pixels(prepare_crops(photos, RES))),
                          TRIGGER)
    latents = (inputs.latent_mean * inputs.scaling_factor).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(1000, (latents.shape[0],), generator=g)
    scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    with torch.no_grad():
        pred = unet(scheduler.add_noise(latents, noise, t), t, inputs.text_embeds.expand(len(t), -1, -1)).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def has_peft_layers(unet: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


# --- crops ---------------------------------------------------------------------------------------


def test_crop_levels_tilted_eyes_and_centres_face() -> None:
    img = Image.new("RGB", (300, 300), "white")
    draw = ImageDraw.Draw(img)
    # Eyes 60 px apart on a line tilted by 20 degrees around (150, 140).
    angle = np.radians(20)
    dx, dy = 30 * np.cos(angle), 30 * np.sin(angle)
    eyes = [(150 - dx, 140 - dy), (150 + dx, 140 + dy)]
    for ex, ey in eyes:
        draw.ellipse([ex - 5, ey - 5, ex + 5, ey + 5], fill="black")
    face = FaceBox(110, 100, 80, 80, eyes=(eyes[1], eyes[0]))  # landmark order must not matter

    crop = np.asarray(crop_face(img, face, 128, expand=2.0).convert("L"))
    assert crop.shape == (128, 128)
    ys, xs = np.nonzero(crop < 80)
    left, right = xs < 64, xs >= 64
    assert left.any() and right.any()
    assert abs(ys[left].mean() - ys[right].mean()) < 2.0  # level after the turn
    assert abs((xs[left].mean() + xs[right].mean()) / 2 - 64) < 2.0  # face centred
    # 60 px eye distance in a 160 px crop side scales to 48 px at 128.
    assert abs((xs[right].mean() - xs[left].mean()) - 48) < 3.0


def test_crop_stays_square_inside_image_at_borders() -> None:
    img = Image.fromarray(np.arange(200 * 120 * 3, dtype=np.uint32).reshape(200, 120, 3).astype(np.uint8))
    corner = crop_face(img, FaceBox(0, 0, 40, 40), 64, expand=2.0)
    huge = crop_face(img, FaceBox(10, 50, 100, 130), 64, expand=2.0)
    assert corner.size == huge.size == (64, 64)
    # The corner crop is the image's top-left 80x80 square, not padded.
    expected = img.crop((0, 0, 80, 80)).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(corner), np.asarray(expected))


def test_crops_of_real_selfies_centre_the_detected_face(faces_dir: Path, yunet_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")

    def detect(rgb: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        detector = cv2.FaceDetectorYN.create(str(yunet_path), "", (bgr.shape[1], bgr.shape[0]))
        detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = detector.detect(bgr)
        assert found is not None and len(found) == 1
        return found[0]

    photos = []
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        found = detect(np.asarray(Image.open(faces_dir / name).convert("RGB")))
        landmarks = found[4:14].reshape(5, 2).tolist()
        photos.append({"path": str(faces_dir / name), "face": {"box": found[:4].tolist(), "landmarks": landmarks}})

    for photo, crop in zip(photos, prepare_crops(photos, 256)):
        assert crop.size == (256, 256)
        again = detect(np.asarray(crop))
        x, y, w, h = again[:4]
        assert abs(x + w / 2 - 128) < 32 and abs(y + h / 2 - 128) < 40, photo["path"]
        assert 0.25 < w / 256 < 0.7  # head with some margin, not a tight face nor a far shot
        (lx, ly), (rx, ry) = again[4:6], again[6:8]
        assert abs(ly - ry) < 0.1 * abs(rx - lx) + 2, photo["path"]


def test_bad_photos_raise_user_facing_codes(tmp_path: Path) -> None:
    with pytest.raises(UserFacingError) as none:
        prepare_crops([], 64)
    assert none.value.code == "train.no_photos"

    good = synthetic_photo(tmp_path / "good.png", 0)
    with pytest.raises(UserFacingError) as no_face:
        prepare_crops([good, {"path": good["path"], "face": {"box": [1, 2, 0, 5]}}], 64)
    assert no_face.value.code == "train.no_face" and no_face.value.details == {"index": 2}

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(UserFacingError) as unreadable:
        prepare_crops([{"path": str(tmp_path / "broken.jpg"), "face": good["face"]}], 64)
    assert unreadable.value.code == "train.photo_unreadable"


def test_params_are_checked_with_the_bad_value_quoted(tmp_path: Path) -> None:
    base = job([{"path": "x", "face": {}}], tmp_path)
    assert TrainParams.from_dict(base).total_steps == 6
    assert TrainParams.from_dict({**base, "steps_per_photo": 200, "max_steps": 50}).total_steps == 50
    with pytest.raises(ValueError, match="100"):
        TrainParams.from_dict({**base, "resolution": 100})
    with pytest.raises(ValueError, match="rnak"):
        TrainParams.from_dict({**base, "rnak": 4})
    assert TrainParams.from_dict(base).fingerprint() != TrainParams.from_dict({**base, "seed": 8}).fingerprint()


def test_params_without_photos_ask_for_selfies(tmp_path: Path) -> None:
    with pytest.raises(UserFacingError) as err:
        TrainParams.from_dict(job([], tmp_path))
    assert err.value.code == "train.no_photos"


def test_every_code_the_pipeline_reports_has_words() -> None:
    from handlers.messages import t

    codes = [STAGE_PREPARING, STAGE_TRAINING, STAGE_SAVING, "train.no_photos", "train.no_face",
             "train.photo_unreadable"]
    for code in codes:
        english, chinese = t(code, "en", index=2, step=3, total=9), t(code, "zh", index=2, step=3, total=9)
        assert english and chinese and english != chinese and "{" not in english + chinese


def test_missing_base_model_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalled) as err:
        TrainLoraPipeline().load(PipelineContext(models_dir=tmp_path))
    assert err.value.code == "model.not_installed" and err.value.details["model"] == "sd15"
    assert err.value.details["pull_command"].startswith("facechain-bot models pull ")


def test_fp16_variant_folder_loads(sd15_dir: Path, tmp_path: Path) -> None:
    """The manifest pulls SD1.5 with fp16-variant file names only; loading must find them."""
    folder = shutil.copytree(sd15_dir, tmp_path / "sd15")
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert weights_variant(folder) == "fp16" and weights_variant(sd15_dir) is None
    pipe = TrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=tmp_path, settings={"model_paths": {"sd15": "sd15"}}))
    assert pipe.unet.dtype == torch.float32 and not any(p.requires_grad for p in pipe.unet.parameters())
    pipe.close()


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(pipeline: TrainLoraPipeline, photos: list[dict[str, Any]],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train once at a test-sized learning rate; tests read the result."""
    base_probe = probe(pipeline.unet)
    base_eval = fixed_eval_loss(pipeline.unet, pipeline.base(), photos)
    out = tmp_path_factory.mktemp("trained")
    progress = RecordingProgress()
    result = pipeline.run(job(photos, out, steps_per_photo=30, max_steps=60, lr=3e-2, checkpoint_every=20, seed=0),
                          progress)
    return {"result": result, "out": out, "progress": progress, "base_probe": base_probe, "base_eval": base_eval}


@pytest.mark.slow
def test_training_loss_goes_down(trained: dict[str, Any]) -> None:
    meta = trained["result"].meta
    curve = meta["loss_curve"]
    assert meta["steps"] == 60 and meta["resumed_from"] == 0 and len(curve) == 8
    # Each point is the mean over ~8 steps; random timesteps make single steps noisy.
    assert curve[-1] < curve[0] - 0.02, curve
    assert min(curve[-3:]) < max(curve[:3]) - 0.02, curve
    progress = trained["progress"]
    assert [s for s, _, text in progress.steps if text == "train.stage.training"] == list(range(1, 61))
    assert progress.yields == 2  # at 20 and 40; none at the end


@pytest.mark.slow
def test_saved_lora_loads_and_changes_the_unet(trained: dict[str, Any], sd15_dir: Path,
                                               photos: list[dict[str, Any]]) -> None:
    out = trained["out"]
    assert trained["result"].files == [out / WEIGHT_NAME]
    assert not (out / CHECKPOINT_DIR).exists()
    keys = load_file(out / WEIGHT_NAME)
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)

    fresh = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None, requires_safety_checker=False)
    before = probe(fresh.unet)
    assert torch.allclose(before, trained["base_probe"], atol=1e-6)
    fresh.load_lora_weights(out)
    after = probe(fresh.unet)
    assert (after - before).abs().max() > 1e-3
    # The loaded LoRA denoises the training faces better than the base does.
    assert fixed_eval_loss(fresh.unet, fresh, photos) < trained["base_eval"] - 0.02
    # And a pipeline runs with it end to end.
    image = fresh(TRIGGER, num_inference_steps=2, height=RES, width=RES, output_type="np").images[0]
    assert image.shape == (RES, RES, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_training_leaves_the_resident_base_clean(pipeline: TrainLoraPipeline, trained: dict[str, Any]) -> None:
    unet = pipeline.unet
    assert not has_peft_layers(unet) and adapter_names(unet) == []
    assert not any(p.requires_grad for p in unet.parameters())
    assert not unet.training and not unet.is_gradient_checkpointing
    assert torch.allclose(probe(unet), trained["base_probe"], atol=1e-6)


@pytest.mark.slow
def test_cached_and_live_inputs_give_the_same_training(pipeline: TrainLoraPipeline, photos: list[dict[str, Any]],
                                                       tmp_path: Path) -> None:
    runs = {}
    for cached in (True, False):
        out = tmp_path / str(cached)
        pipeline.run(job(photos, out, max_steps=4, cache_latents=cached), RecordingProgress())
        runs[cached] = load_file(out / WEIGHT_NAME)
    assert runs[True].keys() == runs[False].keys()
    for key in runs[True]:
        torch.testing.assert_close(runs[True][key], runs[False][key], atol=1e-4, rtol=1e-3)


@pytest.fixture(scope="module")
def reference_weights(pipeline: TrainLoraPipeline, photos: list[dict[str, Any]],
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The LoRA of an uninterrupted 12-step run of `job`."""
    out = tmp_path_factory.mktemp("reference")
    pipeline.run(job(photos, out), RecordingProgress())
    return load_file(out / WEIGHT_NAME)


def assert_same_weights(out: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(out / WEIGHT_NAME)
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_cancel_keeps_checkpoint_and_rerun_resumes_exactly(pipeline: TrainLoraPipeline, photos: list[dict[str, Any]],
                                                           reference_weights: dict[str, torch.Tensor],
                                                           trained: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(JobCancelled):
        pipeline.run(job(photos, tmp_path), RecordingProgress(cancel_at=10))
    assert checkpoint_path(tmp_path).is_file() and not (tmp_path / WEIGHT_NAME).exists()
    assert not has_peft_layers(pipeline.unet)  # a cancelled job leaves the base clean too
    assert torch.allclose(probe(pipeline.unet), trained["base_probe"], atol=1e-6)

    progress = RecordingProgress()
    result = pipeline.run(job(photos, tmp_path), progress)
    assert result.meta["resumed_from"] == 8 and result.meta["steps"] == 12
    assert progress.steps[1] == (8, 12, "train.stage.training")
    assert [s for s, _, t in progress.steps[2:] if t == "train.stage.training"] == [9, 10, 11, 12]
    assert_same_weights(tmp_path, reference_weights)  # optimizer and RNG state came back too
    assert not checkpoint_path(tmp_path).exists()


@pytest.mark.slow
def test_checkpoint_of_another_run_is_not_resumed(pipeline: TrainLoraPipeline, photos: list[dict[str, Any]],
                                                  reference_weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(JobCancelled):
        pipeline.run(job(photos, tmp_path, seed=99), RecordingProgress(cancel_at=5))
    assert checkpoint_path(tmp_path).is_file()
    result = pipeline.run(job(photos, tmp_path), RecordingProgress())
    assert result.meta["resumed_from"] == 0
    assert_same_weights(tmp_path, reference_weights)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_yield_point_sees_the_base_unet_and_training_continues(
        pipeline: TrainLoraPipeline, photos: list[dict[str, Any]], trained: dict[str, Any],
        reference_weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    unet = pipeline.unet
    seen: list[dict[str, Any]] = []

    def short_job() -> None:
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        seen.append({
            "inactive": bool(layers) and all(TRAIN_ADAPTER not in m.active_adapters for m in layers),
            "training": unet.training,
            "grads": any(p.requires_grad for p in unet.parameters()),
            "checkpoint_on_disk": checkpoint_path(tmp_path).is_file(),
            "same_as_base": torch.allclose(probe(unet), trained["base_probe"], atol=1e-6),
        })
        # A short job that loads a user LoRA (it must take effect) and unloads everything after itself.
        pipeline.base().load_lora_weights(trained["out"], adapter_name="user")
        seen[-1]["user_lora_acts"] = not torch.allclose(probe(unet), trained["base_probe"], atol=1e-4)
        pipeline.base().unload_lora_weights()

    progress = RecordingProgress(on_yield=short_job)
    result = pipeline.run(job(photos, tmp_path), progress)
    assert progress.yields == 2 and len(seen) == 2  # checkpoints at 4 and 8; 12 is the end
    assert all(s == {"inactive": True, "training": False, "grads": False, "checkpoint_on_disk": True,
                     "same_as_base": True, "user_lora_acts": True} for s in seen), seen
    assert result.meta["steps"] == 12
    # The adapter came back with its weights and optimizer state: same result as without short jobs.
    assert_same_weights(tmp_path, reference_weights)
    assert not has_peft_layers(unet)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_last_checkpoint(pipeline: TrainLoraPipeline, sd15_dir: Path,
                                                           photos: list[dict[str, Any]], tmp_path: Path) -> None:
    params = job(photos, tmp_path / "out", steps_per_photo=20, max_steps=40, checkpoint_every=3)
    ckpt = checkpoint_path(tmp_path / "out")
    saved_step = kill_at_first_checkpoint("facechain_core.train_lora:TrainLoraPipeline", "sd15", sd15_dir, params,
                                          ckpt)
    assert not (tmp_path / "out" / WEIGHT_NAME).exists()
    assert saved_step % 3 == 0 and 3 <= saved_step < 40

    result = pipeline.run(params, RecordingProgress())
    assert result.meta["resumed_from"] == saved_step and result.meta["steps"] == 40
    assert (tmp_path / "out" / WEIGHT_NAME).is_file() and not ckpt.exists()
