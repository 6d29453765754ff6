"""Multi-face templates filled face by face on tiny models: each face repainted, the rest of the template kept."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from facechain_core.duo_template import DuoTemplatePipeline
from facechain_core.errors import UserFacingError
from facechain_core.pipeline import PipelineContext
from facechain_core.tiny import build_identity
from facechain_core.tiny.pose import build_pose
from facechain_core.tiny.tryon import TRYON_LAYOUT, build_controlnet, build_sd15_inpaint
from facechain_core.tryon import working_image
from tests.conftest import SHARED, find_asset
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
SIDE = 96


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> DuoTemplatePipeline:  # noqa: F811
    root = tmp_path_factory.mktemp("duo_template_models")
    at = {name: root / rel for name, rel in TRYON_LAYOUT.items()}
    build_sd15_inpaint(at["sd15-inpainting"])
    build_controlnet(at["controlnet-openpose-sd15"], at["sd15-inpainting"], seed=1)
    build_controlnet(at["controlnet-depth-sd15"], at["sd15-inpainting"])
    build_pose(at["dwpose-wholebody"])
    paths = {name: str(at[name]) for name in ("sd15-inpainting", "controlnet-openpose-sd15", "controlnet-depth-sd15",
                                              "dwpose-wholebody")}
    paths.update({"ip-adapter-faceid-sd15": str(tiny_models["ip_adapter_faceid_sd15"]),
                  "arcface": str(tiny_models["arcface"]), "yunet": str(find_asset("models/yunet_s_640_640.onnx"))})
    settings = {"model_paths": paths, "face_filter": False, "oversample": 1, "duo_min_similarity": -1.0,
                "template": {"side": SIDE, "steps": 2}}
    duo = DuoTemplatePipeline()
    duo.load(PipelineContext(models_dir=root, settings=settings))
    return duo


def _run(pipeline: DuoTemplatePipeline, template: Path, identities: list[Path], out: Path) -> Any:
    return pipeline.run({"template": str(template), "template_id": "two", "identities": [str(p) for p in identities],
                         "count": 1, "seed": 5, "out_dir": str(out)}, StepRecorder())


def test_each_face_is_repainted_and_the_rest_kept(pipeline: DuoTemplatePipeline, tmp_path: Path) -> None:
    template = SHARED / "faces" / "two_people.jpg"
    if not template.is_file():
        pytest.skip(f"{template} not present")
    people = [build_identity(tmp_path / f"{n}.npz", s) for s, n in enumerate("ab", start=1)]
    result = _run(pipeline, template, people, tmp_path / "out")
    assert result.meta["people"] == 2 and result.meta["lora_used"] is False
    boxes = result.meta["face_boxes"]
    assert len(boxes) == 2 and boxes[0][0] < boxes[1][0]  # left to right
    with Image.open(result.files[0]) as img:
        made = np.asarray(img.convert("RGB"), dtype=np.int16)
    original = working_image(template, SIDE).astype(np.int16)
    assert made.shape == original.shape
    changed = np.abs(made - original).max(axis=2) > 0
    for x, y, w, h in boxes:  # each face was repainted
        assert changed[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].mean() > 0.5
    inside = np.zeros(changed.shape, bool)
    for x, y, w, h in boxes:
        inside[max(0, y - 2 * h):y + 2 * h, max(0, x - w):x + 2 * w] = True
    assert not changed[~inside].any()  # everything away from the faces is the template's own


def test_a_template_must_show_one_face_per_person(pipeline: DuoTemplatePipeline, tmp_path: Path) -> None:
    single = SHARED / "faces" / "obama.jpg"
    if not single.is_file():
        pytest.skip(f"{single} not present")
    people = [build_identity(tmp_path / f"{n}.npz", s) for s, n in enumerate("ab", start=1)]
    with pytest.raises(UserFacingError) as refused:
        _run(pipeline, single, people, tmp_path / "out")
    assert refused.value.code == "duo.template_faces" and refused.value.details == {"faces": 1, "people": 2}
