"""Style LoRA training on a tiny SD1.5: whole-picture crops, one caption per picture, the loss going down."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facechain_core.pipeline import PipelineContext
from facechain_core.tiny import build_sd15
from facechain_core.train_data import crop_whole, prepare_whole_crops
from facechain_core.train_lora import WEIGHT_NAME, TrainLoraPipeline, TrainParams
from tests.fixtures.tiny_models import one_torch_thread  # noqa: F401

RES = 32


class Steps:
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, str | None]] = []

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        self.steps.append((step, total, text))

    def yield_point(self) -> None:
        pass


def striped(path: Path, seed: int, size: tuple[int, int] = (120, 80)) -> dict[str, Any]:
    """A picture with no face: coloured stripes (a "look"), wider than tall."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for x in range(0, size[0], 8):
        pixels[:, x:x + 4] = rng.integers(0, 255, 3)
    Image.fromarray(pixels).save(path)
    return {"path": str(path)}


def test_whole_crop_keeps_the_centre_square(tmp_path: Path) -> None:
    image = Image.new("RGB", (120, 80), (0, 0, 255))
    image.paste((255, 0, 0), (20, 0, 100, 80))  # the centre 80 wide is red, the sides blue
    crop = crop_whole(image, 16)
    assert crop.size == (16, 16)
    assert np.asarray(crop)[:, 2:-2, 0].min() > 200  # only the red centre made it in
    photos = [striped(tmp_path / f"s{i}.png", i) for i in range(3)]
    assert [c.size for c in prepare_whole_crops(photos, RES)] == [(RES, RES)] * 3


def test_captions_must_be_one_per_photo(tmp_path: Path) -> None:
    base = {"photos": [{"path": "a"}, {"path": "b"}], "out_dir": str(tmp_path), "trigger": "x", "crop": "whole"}
    with pytest.raises(ValueError, match="one per photo"):
        TrainParams.from_dict({**base, "captions": ["only one"]})
    with pytest.raises(ValueError, match="crop"):
        TrainParams.from_dict({**base, "crop": "torso"})
    with_captions = TrainParams.from_dict({**base, "captions": ["a", "b"]})
    assert with_captions.prompts() == ["a", "b"]
    assert with_captions.fingerprint() != TrainParams.from_dict({**base, "captions": ["a", "c"]}).fingerprint()


@pytest.mark.slow
def test_style_lora_trains_on_whole_pictures_with_captions(tmp_path: Path, one_torch_thread) -> None:  # noqa: F811
    sd15 = build_sd15(tmp_path / "sd15")
    pipe = TrainLoraPipeline()
    pipe.load(PipelineContext(models_dir=tmp_path, settings={"model_paths": {"sd15": str(sd15)}}))
    try:
        photos = [striped(tmp_path / f"s{i}.png", i) for i in range(3)]  # no "face" key: whole crops need none
        captions = [f"zqx style, stripes {i}" for i in range(3)]
        steps = Steps()
        result = pipe.run({"photos": photos, "captions": captions, "crop": "whole", "out_dir": str(tmp_path / "out"),
                           "trigger": "zqx style", "steps_per_photo": 16, "max_steps": 48, "resolution": RES,
                           "checkpoint_every": 16, "lr": 3e-2, "seed": 1}, steps)
    finally:
        pipe.close()
    curve = result.meta["loss_curve"]
    assert result.files == [tmp_path / "out" / WEIGHT_NAME] and result.files[0].is_file()
    assert result.meta["steps"] == 48 and curve[-1] < curve[0], curve
