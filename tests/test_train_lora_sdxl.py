"""Identity LoRA training on a tiny SDXL (two text encoders, added time ids; random weights, 32 px, CPU): the
loss goes down, a SIGKILL resumes from the last checkpoint, and the LoRA loads into SDXL portraits."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from facechain_core.errors import ModelNotInstalled
from facechain_core.pipeline import PipelineContext
from facechain_core.portrait import PortraitPipeline
from facechain_core.tiny import build_identity
from facechain_core.train_lora import CHECKPOINT_DIR, WEIGHT_NAME, adapter_names, checkpoint_path
from facechain_core.train_lora_sdxl import CHECKPOINT_DIR as SDXL_CHECKPOINT_DIR
from facechain_core.train_lora_sdxl import WEIGHT_NAME as SDXL_WEIGHT_NAME
from facechain_core.train_lora_sdxl import SdxlTrainLoraPipeline, add_time_ids
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401
from tests.fixtures.training_child import kill_at_first_checkpoint
from tests.test_portrait import _settings, _style
from tests.test_train_lora import RES, TRIGGER, RecordingProgress, job, synthetic_photo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("photos_sdxl")
    return [synthetic_photo(folder / f"p{i}.png", i) for i in range(2)]


@pytest.fixture(scope="module")
def pipeline(tiny_models: dict[str, Path]) -> SdxlTrainLoraPipeline:  # noqa: F811
    pipe = SdxlTrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=tiny_models["sdxl"].parent,
                              settings={"model_paths": {"sdxl": str(tiny_models["sdxl"])}}))
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def trained(pipeline: SdxlTrainLoraPipeline, photos: list[dict[str, Any]],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("trained_sdxl")
    progress = RecordingProgress()
    result = pipeline.run(job(photos, out, steps_per_photo=30, max_steps=60, lr=3e-2, checkpoint_every=20, seed=0),
                          progress)
    return {"result": result, "out": out, "progress": progress}


def test_sdxl_training_loss_goes_down(trained: dict[str, Any]) -> None:
    meta = trained["result"].meta
    curve = meta["loss_curve"]
    assert meta["steps"] == 60 and meta["family"] == "sdxl" and meta["weight_name"] == SDXL_WEIGHT_NAME
    assert curve[-1] < curve[0] - 0.02, curve
    assert min(curve[-3:]) < max(curve[:3]) - 0.02, curve
    assert trained["progress"].yields == 2  # checkpoints at 20 and 40 let short jobs through
    out = trained["out"]
    assert trained["result"].files == [out / SDXL_WEIGHT_NAME] and not (out / SDXL_CHECKPOINT_DIR).exists()
    keys = load_file(out / SDXL_WEIGHT_NAME)
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)


def test_sdxl_conditioning_carries_both_encoders_and_the_time_ids(pipeline: SdxlTrainLoraPipeline) -> None:
    sd = pipeline.base()
    text, _, pooled, _ = sd.encode_prompt(TRIGGER, device=sd.unet.device, do_classifier_free_guidance=False)
    hidden = sd.text_encoder.config.hidden_size + sd.text_encoder_2.config.hidden_size
    assert text.shape[-1] == hidden == sd.unet.config.cross_attention_dim
    assert pooled.shape == (1, sd.text_encoder_2.config.projection_dim)
    assert add_time_ids(RES).tolist() == [[RES, RES, 0, 0, RES, RES]]
    assert adapter_names(sd.unet) == []  # training left the resident base clean


def test_sdxl_lora_changes_sdxl_portraits_at_the_same_seed(trained: dict[str, Any],
                                                           tiny_models: dict[str, Path],  # noqa: F811
                                                           tmp_path: Path) -> None:
    portraits = PortraitPipeline()
    portraits.load(PipelineContext(models_dir=tmp_path, settings=_settings(tiny_models)))
    identity = build_identity(tmp_path / "identity.npz", 1)

    def picture(lora: Path | None, name: str) -> np.ndarray:
        params = {"style": _style(family="sdxl"), "identity": str(identity), "count": 1, "seed": 42,
                  "out_dir": str(tmp_path / name), "user_lora": str(lora) if lora else None}
        result = portraits.run(params, RecordingProgress())
        assert result.meta["lora_used"] is (lora is not None)
        with Image.open(result.files[0]) as image:
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    plain, again = picture(None, "a"), picture(None, "b")
    assert np.array_equal(plain, again)  # the same seed makes the same picture...
    with_lora = picture(trained["out"] / SDXL_WEIGHT_NAME, "c")
    assert np.abs(with_lora - plain).max() > 2  # ...and the user's SDXL LoRA changes it


def test_sdxl_needs_its_base_installed(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalled) as info:
        SdxlTrainLoraPipeline().load(PipelineContext(models_dir=tmp_path))
    assert info.value.details["model"] == "sdxl" and info.value.details["feature"] == "train-sdxl"


def test_sdxl_refuses_uncached_inputs(pipeline: SdxlTrainLoraPipeline, photos: list[dict[str, Any]],
                                      tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="caches latents"):
        pipeline.run(job(photos, tmp_path, cache_latents=False), RecordingProgress())


def test_sigkill_mid_sdxl_training_resumes_from_last_checkpoint(pipeline: SdxlTrainLoraPipeline,
                                                                tiny_models: dict[str, Path],  # noqa: F811
                                                                photos: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "out"
    params = job(photos, out, steps_per_photo=20, max_steps=40, checkpoint_every=3)
    ckpt = checkpoint_path(out, SDXL_CHECKPOINT_DIR)
    saved_step = kill_at_first_checkpoint("facechain_core.train_lora_sdxl:SdxlTrainLoraPipeline", "sdxl",
                                          tiny_models["sdxl"], params, ckpt)
    assert not (out / SDXL_WEIGHT_NAME).exists()
    assert saved_step % 3 == 0 and 3 <= saved_step < 40
    # An SD1.5 LoRA trained into the same folder keeps its own checkpoint and weights apart.
    assert not (out / CHECKPOINT_DIR).exists() and not (out / WEIGHT_NAME).exists()

    result = pipeline.run(params, RecordingProgress())
    assert result.meta["resumed_from"] == saved_step and result.meta["steps"] == 40
    assert (out / SDXL_WEIGHT_NAME).is_file() and not ckpt.exists()
