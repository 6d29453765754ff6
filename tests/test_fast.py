"""Fast mode on tiny models: the accelerator LoRA in its own slot, its scheduler and steps from the data."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facechain_core import portrait as portrait_module
from facechain_core.accelerators import Accelerators, accelerators
from facechain_core.pipeline import PipelineContext
from facechain_core.portrait import PortraitPipeline
from facechain_core.tiny import build_identity, build_lora
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401
from tests.test_portrait import _pixels, _settings, _style

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STYLE_STEPS = 5  # the style's own steps; every accelerator's differ


@pytest.fixture(scope="module")
def accelerator_lora(tiny_models, tmp_path_factory) -> Path:
    """An accelerator LoRA of the real format (peft adapter saved by diffusers) for the tiny SD1.5."""
    return build_lora(tiny_models["sd15"], tmp_path_factory.mktemp("fast") / "accelerator.safetensors", seed=31)


def _load(models: dict[str, Path], tmp: Path, lora: Path, **changes: Any) -> PortraitPipeline:
    paths = {entry.models["sd15"]: str(lora) for entry in accelerators().by_id.values()}
    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=tmp, settings=_settings(models, model_paths=paths, **changes)))
    return pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_models, accelerator_lora, tmp_path_factory) -> PortraitPipeline:
    return _load(tiny_models, tmp_path_factory.mktemp("models"), accelerator_lora)


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> Path:
    return build_identity(tmp_path_factory.mktemp("user") / "identity.npz", 1)


def _run(pipeline: PortraitPipeline, out: Path, identity: Path, progress: StepRecorder | None = None,
         style: dict[str, Any] | None = None, **params: Any) -> Any:
    job = {"style": style or _style(sampler={"scheduler": "ddim", "steps": STYLE_STEPS, "guidance_scale": 5.0,
                                             "width": 64, "height": 64}),
           "identity": str(identity), "count": 1, "seed": 42, "out_dir": str(out)}
    job.update(params)
    return pipeline.run(job, progress or StepRecorder())


def _styled(weight: float) -> dict[str, Any]:
    return _style(lora={"source": "hf:o/r", "file": "s.safetensors", "weight": weight},
                  sampler={"scheduler": "ddim", "steps": STYLE_STEPS, "guidance_scale": 5.0, "width": 64, "height": 64})


def _changed(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether many pixels differ (a few steps at light guidance dampen a tiny LoRA's effect)."""
    return int((np.abs(a - b) > 0).sum()) > a.size // 20


def test_accelerator_lora_loads_into_its_slot_and_composes_with_user_and_style_loras(
        pipeline, identity, tiny_models, tmp_path, monkeypatch):
    user, style_lora = str(tiny_models["lora_sd15_a"]), str(tiny_models["lora_sd15_style"])

    def image(name: str, *, user_lora: str | None = user, style_weight: float = 1.0) -> np.ndarray:
        result = _run(pipeline, tmp_path / name, identity, style=_styled(style_weight), user_lora=user_lora,
                      style_lora=style_lora, fast=True)
        assert result.meta["fast"] == "lcm"
        return _pixels(result.files[0])

    everything = image("all")
    base = pipeline.base("sd15")
    adapters = base.pipe.get_list_adapters()["unet"]
    assert {"faceid_0", "user", "style", "fast"} <= set(adapters) and adapters.count("fast") == 1
    assert [name for name, _ in base.active] == ["faceid_0", "user", "style", "fast"]
    # Same seed, same picture to the bit: any difference below comes from the LoRA taken away.
    assert np.array_equal(image("again"), everything)
    assert _changed(image("no-user", user_lora=None), everything)
    assert _changed(image("no-style", style_weight=0.0), everything)
    # The accelerator's own LoRA at weight 0 (scheduler and steps unchanged): the picture changes too.
    packaged = accelerators()
    silent = packaged.by_id["lcm"].model_copy(update={"weight": 0.0})
    monkeypatch.setattr(portrait_module, "accelerators",
                        lambda: Accelerators({**packaged.by_id, "lcm": silent}, packaged.default))
    assert _changed(image("no-fast-lora"), everything)


@pytest.mark.parametrize("accelerator_id", ["lcm", "tcd", "hyper"])
def test_fast_mode_takes_scheduler_steps_and_guidance_from_the_data(
        accelerator_id, tiny_models, accelerator_lora, identity, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", accelerator_lora, fast_accelerator=accelerator_id)
    accelerator = accelerators().get(accelerator_id)
    assert accelerator.steps != STYLE_STEPS
    fast_steps = StepRecorder()
    fast = _run(pipeline, tmp_path / "fast", identity, fast_steps, count=2, fast=True)
    scheduler = pipeline.base("sd15").pipe.scheduler
    assert type(scheduler).__name__ == accelerator.scheduler
    for key, value in accelerator.scheduler_config.items():
        assert scheduler.config[key] == value
    # Progress counts the steps that ran: two candidates in one batch, the accelerator's steps, then ranking.
    total = accelerator.steps + 1
    assert fast_steps.steps == [(step, total) for step in range(1, total + 1)]
    assert fast.meta["fast"] == accelerator_id and fast.meta["steps"] == accelerator.steps

    normal_steps = StepRecorder()
    normal = _run(pipeline, tmp_path / "normal", identity, normal_steps, count=2)
    assert type(pipeline.base("sd15").pipe.scheduler).__name__ == "DDIMScheduler"
    assert normal_steps.steps[-1] == (STYLE_STEPS + 1, STYLE_STEPS + 1) and len(normal_steps.steps) == STYLE_STEPS + 1
    assert normal.meta["fast"] is None and normal.meta["steps"] == STYLE_STEPS


def test_a_style_that_opts_out_runs_normally(pipeline, identity, tmp_path):
    style = {**_style(sampler={"scheduler": "ddim", "steps": STYLE_STEPS, "guidance_scale": 5.0, "width": 64,
                               "height": 64}), "fast": False}
    _run(pipeline, tmp_path / "warm", identity, fast=True)  # the fast slot is loaded, then left inactive
    progress = StepRecorder()
    opted_out = _run(pipeline, tmp_path / "out", identity, progress, style=style, fast=True)
    normal = _run(pipeline, tmp_path / "normal", identity, style=style)
    assert opted_out.meta["fast"] is None and opted_out.meta["steps"] == STYLE_STEPS
    assert progress.steps[-1] == (STYLE_STEPS + 1, STYLE_STEPS + 1)
    assert type(pipeline.base("sd15").pipe.scheduler).__name__ == "DDIMScheduler"
    assert np.abs(_pixels(opted_out.files[0]) - _pixels(normal.files[0])).max() <= 1


def test_fast_mode_composes_with_faceid_plus(tiny_models, accelerator_lora, identity, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", accelerator_lora,
                     ip_adapter_path=str(tiny_models["ip_adapter_faceid_plus_sd15"]))
    assert pipeline.base("sd15").plus
    fast = _run(pipeline, tmp_path / "fast", identity, fast=True)
    normal = _run(pipeline, tmp_path / "normal", identity)
    assert fast.meta["fast"] == "lcm" and normal.meta["fast"] is None
    assert "fast" in pipeline.base("sd15").pipe.get_list_adapters()["unet"]
    assert np.abs(_pixels(fast.files[0]) - _pixels(normal.files[0])).max() > 2


def test_merged_loras_give_the_unmerged_picture_with_the_fast_slot(tiny_models, accelerator_lora, identity, tmp_path):
    """fuse_loras merges the fast slot with the user's and FaceID's for each batch and restores the base after."""
    pictures = []
    for fuse in (False, True):
        pipeline = _load(tiny_models, tmp_path / f"m{fuse}", accelerator_lora, fuse_loras=fuse)
        result = _run(pipeline, tmp_path / f"out{fuse}", identity, user_lora=str(tiny_models["lora_sd15_a"]),
                      fast=True)
        assert result.meta["fast"] == "lcm"
        pictures.append(_pixels(result.files[0]))
    assert np.abs(pictures[0] - pictures[1]).max() <= 1


@pytest.fixture(scope="module")
def tryon(tiny_models, accelerator_lora, tmp_path_factory) -> Any:
    from facechain_core.tiny.tryon import build_tryon_models
    from facechain_core.tryon import TryOnPipeline

    tryon_models = build_tryon_models(tmp_path_factory.mktemp("tiny_tryon"))
    paths = {**tryon_models, "ip-adapter-faceid-sd15": tiny_models["ip_adapter_faceid_sd15"],
             "arcface": tiny_models["arcface"],
             **{entry.models["sd15"]: accelerator_lora for entry in accelerators().by_id.values()}}
    pipeline = TryOnPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path_factory.mktemp("m"), settings={
        "face_filter": False, "oversample": 1, "model_paths": paths, "tryon": {"side": 64, "steps": STYLE_STEPS}}))
    yield pipeline
    pipeline.close()


@pytest.mark.parametrize("accelerator_id", ["lcm", "hyper"])
def test_tryon_runs_fast_only_where_the_accelerator_supports_inpainting(
        tryon, accelerator_id, identity, tmp_path, monkeypatch):
    from PIL import Image

    from facechain_core.tiny.tryon import draw_outfit

    packaged = accelerators()
    monkeypatch.setattr(portrait_module, "accelerators", lambda: Accelerators(packaged.by_id, accelerator_id))
    accelerator = packaged.get(accelerator_id)
    outfit = tmp_path / "outfit.png"
    Image.fromarray(draw_outfit(128, seed=8)).save(outfit)
    progress = StepRecorder()
    result = tryon.run({"outfit": str(outfit), "identity": str(identity), "seed": 7, "out_dir": str(tmp_path / "o"),
                        "fast": True}, progress)
    if accelerator.inpainting:
        assert result.meta["fast"] == accelerator_id and result.meta["steps"] == accelerator.steps
        assert type(tryon.base().pipe.scheduler).__name__ == accelerator.scheduler
    else:
        assert result.meta["fast"] is None and result.meta["steps"] == STYLE_STEPS
    assert progress.steps[-1][0] == progress.steps[-1][1] == result.meta["steps"] + 1


def test_sdxl_styles_run_fast_with_the_sdxl_accelerator(tiny_models, identity, tmp_path):
    accelerator = accelerators().get(None)
    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, settings=_settings(
        tiny_models, model_paths={accelerator.models["sdxl"]: str(tiny_models["lora_sdxl"])})))
    style = _style(family="sdxl", sampler={"scheduler": "euler", "steps": STYLE_STEPS, "guidance_scale": 5.0,
                                           "width": 64, "height": 64})
    progress = StepRecorder()
    result = _run(pipeline, tmp_path / "out", identity, progress, style=style, fast=True)
    assert result.meta["fast"] == accelerator.id and result.meta["steps"] == accelerator.steps
    assert type(pipeline.base("sdxl").pipe.scheduler).__name__ == accelerator.scheduler
    assert "fast" in pipeline.base("sdxl").pipe.get_list_adapters()["unet"]
    assert progress.steps[-1] == (accelerator.steps + 1, accelerator.steps + 1)
