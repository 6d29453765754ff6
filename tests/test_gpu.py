"""The engine's GPU paths on tiny models of the real formats: portraits, LoRA training, try-on, cartoons.

Every test runs on ``FACECHAIN_TEST_DEVICE`` (default: "cuda" when torch sees a GPU; without one they
are all skipped, as in CI) in ``FACECHAIN_TEST_DTYPE`` (default: float16 on cuda, float32 elsewhere).
To run the same code on the CPU before spending GPU time::

    FACECHAIN_TEST_DEVICE=cpu .venv/bin/python -m pytest -q tests/test_gpu.py

On the GPU machine ``bench/gpu_check.sh`` runs this module with ``--noconftest -o filterwarnings=``:
the chat libraries that tests/conftest.py and pyproject's warning filters import are not there.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from facechain_core.errors import JobCancelled, UserFacingError
from facechain_core.pipeline import PipelineContext
from facechain_core.tiny import build_identity
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import tiny_models, tiny_models_dir  # noqa: F401
from tests.test_portrait import _settings as portrait_settings


def _device() -> tuple[str | None, str]:
    """Return the device to test on (None: skip) and why not."""
    wanted = os.environ.get("FACECHAIN_TEST_DEVICE", "").strip()
    if not wanted:
        if torch.cuda.is_available():
            return "cuda", ""
        return None, "no CUDA device (FACECHAIN_TEST_DEVICE=cpu runs these GPU-path tests on the CPU)"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        return None, f"FACECHAIN_TEST_DEVICE={wanted} but torch sees no CUDA device"
    return wanted, ""


DEVICE, SKIP_REASON = _device()
ON_GPU = bool(DEVICE and DEVICE.startswith("cuda"))
DTYPE = os.environ.get("FACECHAIN_TEST_DTYPE") or ("float16" if ON_GPU else "float32")
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[DTYPE]
SIDE = 64
STEPS = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Iterator[None]:
    """On the CPU, one torch thread: tiny models are per-op overhead, and threads spin against each other."""
    before = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class _FloatImages:
    """Wraps a module's ``_to_uint8`` to keep the pipeline's float outputs (NaN shows only there)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        self.batches: list[np.ndarray] = []
        original = module._to_uint8

        def keep(images: np.ndarray) -> list[np.ndarray]:
            self.batches.append(np.asarray(images, dtype=np.float32).copy())
            return original(images)

        monkeypatch.setattr(module, "_to_uint8", keep)

    def check(self) -> None:
        assert self.batches, "the pipeline produced no images"
        for batch in self.batches:
            assert np.isfinite(batch).all(), f"non-finite pixels on {DEVICE} in {DTYPE}"
        self.batches.clear()


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _assert_picture(pixels: np.ndarray, shape: tuple[int, ...]) -> None:
    assert pixels.shape == shape
    assert pixels.std() > 1.0, "a picture of one colour (what NaN latents decode to)"


@pytest.fixture(scope="module")
def safety_checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from facechain_core.tiny.safety import build_safety_checker

    root = tmp_path_factory.mktemp("safety")
    return {flag: build_safety_checker(root / flag, flag=flag) for flag in ("none", "all")}


def _portrait(models: dict[str, Path], tmp: Path, **changes: Any) -> Any:
    from facechain_core.portrait import PortraitPipeline

    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=tmp, device=DEVICE, dtype=DTYPE,
                                  settings=portrait_settings(models, **changes)))
    return pipeline


def _style(family: str = "sd15") -> dict[str, Any]:
    return {"id": "gpu", "family": family, "prompt": "{subject}, studio portrait", "negative_prompt": "blurry",
            "identity_weight": 1.0,
            "sampler": {"scheduler": "ddim", "steps": STEPS, "guidance_scale": 5.0, "width": SIDE, "height": SIDE}}


def _portrait_job(pipeline: Any, out: Path, identity: Path, family: str = "sd15", **params: Any) -> Any:
    job = {"style": _style(family), "identity": str(identity), "count": 1, "seed": 42, "out_dir": str(out),
           "user_lora": None, "user_lora_scale": 1.0}
    job.update(params)
    return pipeline.run(job, StepRecorder())


# family, IP-Adapter file, user LoRA, FaceID Plus
VARIANTS = {
    "sd15": ("sd15", "ip_adapter_faceid_sd15", "lora_sd15_a", False),
    "sd15-plus": ("sd15", "ip_adapter_faceid_plus_sd15", "lora_sd15_a", True),
    "sdxl": ("sdxl", "ip_adapter_faceid_sdxl", "lora_sdxl", False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_portraits_on_the_device_with_faceid_a_user_lora_and_safe_mode(
        variant: str, tiny_models: dict[str, Path], safety_checkers: dict[str, Path],  # noqa: F811
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import facechain_core.portrait

    family, adapter, lora, plus = VARIANTS[variant]
    setting = "sdxl_ip_adapter_path" if family == "sdxl" else "ip_adapter_path"
    pipeline = _portrait(tiny_models, tmp_path, default_family=family, safety_checker_path=str(safety_checkers["none"]),
                         **{setting: str(tiny_models[adapter])})
    floats = _FloatImages(monkeypatch, facechain_core.portrait)
    try:
        base = pipeline.base(family)
        assert base.plus is plus
        assert base.pipe.device.type == torch.device(DEVICE).type and base.pipe.unet.dtype == TORCH_DTYPE
        ids = build_identity(tmp_path / "a.npz", 1), build_identity(tmp_path / "b.npz", 2)
        result = _portrait_job(pipeline, tmp_path / "lora", ids[0], family, count=2,
                               user_lora=str(tiny_models[lora]), user_lora_scale=0.8)
        floats.check()
        assert len(result.files) == 2 and result.meta["lora_used"] is True
        assert result.meta["safety"]["checked"] is True and result.meta["safety"]["dropped"] == 0
        assert all(math.isfinite(s) for s in result.meta["similarity"])
        with_lora = [_pixels(path) for path in result.files]
        for pixels in with_lora:
            _assert_picture(pixels, (SIDE, SIDE, 3))
        by_seed = dict(zip(result.meta["seeds"], with_lora, strict=True))
        # Same seed without the LoRA, then with another identity: the adapters act on the device.
        without = _pixels(_portrait_job(pipeline, tmp_path / "plain", ids[0], family).files[0])
        other = _pixels(_portrait_job(pipeline, tmp_path / "other", ids[1], family).files[0])
        floats.check()
        assert np.abs(by_seed[42] - without).max() > 2
        assert np.abs(other - without).max() > 2
        if ON_GPU:
            assert torch.cuda.memory_allocated() > 0
    finally:
        pipeline.close()
        _free()


def test_safe_mode_flags_on_the_device(tiny_models: dict[str, Path], safety_checkers: dict[str, Path],  # noqa: F811
                                       tmp_path: Path) -> None:
    pipeline = _portrait(tiny_models, tmp_path, safety_checker_path=str(safety_checkers["all"]))
    try:
        with pytest.raises(UserFacingError) as info:
            _portrait_job(pipeline, tmp_path / "out", build_identity(tmp_path / "a.npz", 1))
        assert info.value.code == "safety.flagged"
        checker = pipeline._context.shared["safety"]
        assert next(checker.model.parameters()).device.type == torch.device(DEVICE).type
    finally:
        pipeline.close()
        _free()


# -- LoRA training -------------------------------------------------------------------------------


def _photo(path: Path, seed: int) -> dict[str, Any]:
    """Write a noisy photo with a drawn face; return its training record."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (200, 160, 3), dtype=np.uint8))
    x, y, w, h = 40 + seed * 3, 50, 64, 80
    draw = ImageDraw.Draw(img)
    draw.ellipse([x, y, x + w, y + h], fill=(225, 180, 150))
    draw.ellipse([x + 14, y + 28, x + 22, y + 36], fill=(20, 20, 20))
    draw.ellipse([x + 42, y + 28, x + 50, y + 36], fill=(20, 20, 20))
    img.save(path)
    return {"path": str(path), "face": {"box": [x, y, w, h], "landmarks": [[x + 18, y + 32], [x + 46, y + 32]]}}


@pytest.fixture(scope="module")
def trained(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    """Train a LoRA on the device, cancelled once after its first checkpoint and resumed."""
    from facechain_core.train_lora import TrainLoraPipeline, adapter_names

    root = tmp_path_factory.mktemp("train")
    photos = [_photo(root / f"p{i}.png", i) for i in range(2)]
    pipe = TrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=root, device=DEVICE, dtype=DTYPE,
                              settings={"model_paths": {"sd15": str(tiny_models["sd15"])}}))
    job = {"photos": photos, "out_dir": str(root / "lora"), "trigger": "a photo of sks person", "steps_per_photo": 8,
           "max_steps": 16, "resolution": SIDE, "checkpoint_every": 4, "lr": 1e-2, "seed": 7}
    try:
        with pytest.raises(JobCancelled):
            pipe.run(job, StepRecorder(cancel_at=6))
        result = pipe.run(job, StepRecorder())
        unet = pipe.unet
        return {"result": result, "mixed_precision": pipe.mixed_precision,
                "checkpointing": pipe.gradient_checkpointing, "adapters_after": adapter_names(unet),
                "checkpointing_after": unet.is_gradient_checkpointing, "dtype_after": unet.dtype,
                "device_after": unet.device, "trainable_after": sum(p.requires_grad for p in unet.parameters())}
    finally:
        pipe.close()
        _free()


def test_lora_training_on_the_device_resumes_learns_and_restores_the_base(trained: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    result = trained["result"]
    if ON_GPU:  # the trainer's GPU path: half-precision frozen weights, autocast, gradient checkpointing
        assert trained["mixed_precision"] == TORCH_DTYPE and trained["checkpointing"] is True
    assert result.meta["resumed_from"] == 4 and result.meta["steps"] == 16
    assert math.isfinite(result.meta["final_loss"]) and all(math.isfinite(v) for v in result.meta["loss_curve"])
    state = load_file(result.files[0])
    assert state and all(torch.isfinite(t).all() for t in state.values())
    ups = [t for key, t in state.items() if "lora_B" in key or "lora.up" in key]
    # lora_B starts at zero: non-zero means optimizer steps went through (not all skipped by the scaler).
    assert ups and any(t.abs().max() > 0 for t in ups)
    assert trained["adapters_after"] == [] and trained["checkpointing_after"] is False
    trainer_dtype = TORCH_DTYPE if ON_GPU else torch.float32  # half precision is slow on the CPU: not used there
    assert trained["dtype_after"] == trainer_dtype and trained["device_after"].type == torch.device(DEVICE).type
    assert trained["trainable_after"] == 0


def test_trained_lora_loads_into_the_portrait_pipeline_and_acts(
        trained: dict[str, Any], tiny_models: dict[str, Path], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    import facechain_core.portrait

    pipeline = _portrait(tiny_models, tmp_path)
    floats = _FloatImages(monkeypatch, facechain_core.portrait)
    try:
        identity = build_identity(tmp_path / "a.npz", 1)
        plain = _pixels(_portrait_job(pipeline, tmp_path / "plain", identity).files[0])
        result = _portrait_job(pipeline, tmp_path / "lora", identity, user_lora=str(trained["result"].files[0]))
        floats.check()
        with_lora = _pixels(result.files[0])
        _assert_picture(with_lora, (SIDE, SIDE, 3))
        assert result.meta["lora_used"] is True
        assert np.abs(with_lora - plain).max() > 2
    finally:
        pipeline.close()
        _free()


# -- try-on and cartoons ---------------------------------------------------------------------------


def test_tryon_on_the_device_keeps_the_garment_and_repaints_the_rest(
        tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import facechain_core.portrait
    from facechain_core.garment import ClothesParser
    from facechain_core.tiny.tryon import build_tryon_models, draw_outfit
    from facechain_core.tryon import TryOnPipeline, working_image

    models = {**build_tryon_models(tmp_path / "tryon"), "ip-adapter-faceid-sd15": tiny_models["ip_adapter_faceid_sd15"],
              "arcface": tiny_models["arcface"]}
    context = PipelineContext(models_dir=tmp_path, device=DEVICE, dtype=DTYPE, settings={
        "face_filter": False, "oversample": 1, "model_paths": models, "tryon": {"side": SIDE, "steps": STEPS}})
    pipeline = TryOnPipeline()
    floats = _FloatImages(monkeypatch, facechain_core.portrait)  # try-on denoises through portrait.denoise_chunks
    pipeline.load(context)
    try:
        assert pipeline.base().pipe.unet.dtype == TORCH_DTYPE
        outfit = tmp_path / "outfit.png"
        Image.fromarray(draw_outfit(128, arm_angle=0.3, seed=5)).save(outfit)
        identity = build_identity(tmp_path / "id.npz", 1)
        result = pipeline.run({"outfit": str(outfit), "identity": str(identity), "seed": 7,
                               "out_dir": str(tmp_path / "out")}, StepRecorder())
        floats.check()
        output = _pixels(result.files[0])
        original = working_image(outfit, SIDE).astype(np.int16)
        _assert_picture(output, original.shape)
        garment = ClothesParser(models["segformer-clothes"], DEVICE).parse(original.astype(np.uint8)).garment
        assert garment.mean() > 0.05
        assert np.abs(output - original)[garment].max() <= 1
        assert np.abs(output - original)[~garment].mean() > 5
    finally:
        pipeline.close()
        _free()


def test_diffusion_cartoon_on_the_device_shares_the_portrait_base(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    from facechain_core.cartoon_diffusion import DiffusionSpec, DiffusionStyler
    from facechain_core.faces import Face

    context = PipelineContext(models_dir=tmp_path, device=DEVICE, dtype=DTYPE, settings={
        **portrait_settings(tiny_models), "cartoon_diffusion_size": SIDE, "cartoon_diffusion_steps": STEPS})
    styler = DiffusionStyler(context)
    rng = np.random.default_rng(3)
    photo = np.clip(rng.normal(128, 40, (96, 80, 3)), 0, 255).astype(np.uint8)
    face = Face(box=(20.0, 24.0, 40.0, 48.0), landmarks=[(32.0, 40.0), (48.0, 40.0), (40.0, 50.0), (33.0, 60.0),
                                                            (47.0, 60.0)], score=0.9)
    spec = DiffusionSpec(prompt="{subject}, 3d cartoon", strength=0.75, steps=STEPS, guidance=5.0, size=SIDE)
    steps: list[tuple[int, int]] = []
    try:
        cartoon = styler(photo, face, spec, seed=5, on_step=lambda done, total: steps.append((done, total)))
        _assert_picture(cartoon.astype(np.int16), photo.shape)
        assert np.abs(cartoon.astype(np.int16) - photo).mean() > 5
        # Each denoising step reported once, in order (the total itself is the caller's estimate).
        assert [done for done, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= STEPS - 1
        resident = context.shared["resident"]
        img2img = resident.peek("cartoon:img2img")
        assert img2img.unet is resident.peek("portrait:sd15").pipe.unet
        assert img2img.unet.device.type == torch.device(DEVICE).type
        # The img2img shares the resident portrait base's modules: it must leave them in the worker's dtype.
        assert img2img.unet.dtype == TORCH_DTYPE and img2img.vae.dtype == TORCH_DTYPE, "the shared base was recast"
    finally:
        styler.close()
        context.shared["resident"].clear()
        _free()


def test_sdxl_lora_training_on_the_device_learns_and_restores_the_base(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file

    from facechain_core.train_lora import adapter_names
    from facechain_core.train_lora_sdxl import SdxlTrainLoraPipeline

    photos = [_photo(tmp_path / f"p{i}.png", i) for i in range(2)]
    pipe = SdxlTrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=tmp_path, device=DEVICE, dtype=DTYPE,
                              settings={"model_paths": {"sdxl": str(tiny_models["sdxl"])}}))
    job = {"photos": photos, "out_dir": str(tmp_path / "lora"), "trigger": "a photo of sks person",
           "steps_per_photo": 6, "max_steps": 12, "resolution": SIDE, "checkpoint_every": 4, "lr": 1e-2, "seed": 7}
    try:
        with pytest.raises(JobCancelled):
            pipe.run(job, StepRecorder(cancel_at=6))
        result = pipe.run(job, StepRecorder())
        sd = pipe.base()
        if ON_GPU:  # half-precision frozen weights under autocast, gradient checkpointing; the VAE kept in float32
            assert pipe.mixed_precision == TORCH_DTYPE and pipe.gradient_checkpointing is True
            assert sd.unet.dtype == TORCH_DTYPE and sd.vae.dtype == torch.float32
        assert result.meta["resumed_from"] == 4 and result.meta["steps"] == 12
        assert math.isfinite(result.meta["final_loss"])
        state = load_file(result.files[0])
        assert state and all(torch.isfinite(t).all() for t in state.values())
        assert any(t.abs().max() > 0 for key, t in state.items() if "lora_B" in key or "lora.up" in key)
        assert adapter_names(sd.unet) == [] and not sd.unet.is_gradient_checkpointing
    finally:
        pipe.close()
        _free()


def test_enhance_on_the_device_doubles_the_picture(tmp_path: Path) -> None:
    from facechain_core.enhance import EnhancePipeline
    from facechain_core.tiny.restore import build_restorer
    from facechain_core.tiny.upscale import build_upscaler
    from tests.conftest import find_asset

    models = {"real-esrgan-x2-onnx": str(build_upscaler(tmp_path / "x2.onnx", 2)),
              "real-esrgan-x4-onnx": str(build_upscaler(tmp_path / "x4.onnx", 4)),
              "gfpgan-1.4-onnx": str(build_restorer(tmp_path / "gfpgan.onnx")),
              "yunet": str(find_asset("models/yunet_s_640_640.onnx"))}
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), np.uint8)).save(source)
    pipeline = EnhancePipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, device=DEVICE, settings={"model_paths": models}))
    try:
        result = pipeline.run({"image": str(source), "scale": 2, "max_bytes": 50_000_000, "out_dir": str(tmp_path)},
                              StepRecorder())
        with Image.open(result.files[0]) as image:
            assert image.size == (400, 600)
    finally:
        pipeline.close()
