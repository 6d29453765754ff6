"""The studio's pure parts: aspect sizes, likeness, Vary noise, the pose and template libraries."""
from __future__ import annotations

import hashlib
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from facechain_core.manifest import load_manifest
from facechain_core.poses import fit_skeleton, load_poses, pose_map
from facechain_core.studio import aspect_size, identity_weight, variation_noise
from facechain_core.templates import LICENCES, load_templates
from handlers import studio
from handlers.studio import ControlWord, parse_controls


def test_aspect_sizes_keep_the_area_on_the_unets_multiple() -> None:
    assert aspect_size(512, 768, "square", 64) == (640, 640)
    assert aspect_size(512, 768, "2:3", 64) == (512, 768)
    assert aspect_size(512, 768, "9:16", 64) == (448, 832)
    assert aspect_size(1024, 1024, "3:2", 32) == (1248, 832)
    assert aspect_size(512, 768, None, 64) == (512, 768)
    with pytest.raises(ValueError):
        aspect_size(512, 512, "4:5", 64)


def test_likeness_scales_the_identity_weight_within_the_styles_bound() -> None:
    assert identity_weight(0.85, None) == 0.85
    assert identity_weight(0.85, "low") == pytest.approx(0.595)
    assert identity_weight(1.3, "high") == 1.5


def test_vary_noise_stays_near_the_seed() -> None:
    shape = (4, 8, 8)
    base = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(7))
    varied = variation_noise(7, [100, 101], shape)
    other = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(8))
    near = torch.nn.functional.cosine_similarity(varied[0].flatten(), base.flatten(), dim=0)
    far = torch.nn.functional.cosine_similarity(other.flatten(), base.flatten(), dim=0)
    assert near > 0.8 > far and not torch.equal(varied[0], varied[1])


def test_poses_fit_without_stretching() -> None:
    library = load_poses()
    assert {"standing", "seated", "over_shoulder", "arms_crossed", "walking", "closeup"} <= {p.id for p in library}
    assert library.find("坐姿").id == "seated" and library.find("Over the shoulder").id == "over_shoulder"
    body, frame = library.get("standing").skeleton()
    for size in ((300, 200), (200, 300), (256, 256)):
        fitted = fit_skeleton(body, frame, size)
        seen = body.scores > 0
        span = np.ptp(body.keypoints[seen], axis=0)
        fitted_span = np.ptp(fitted.keypoints[seen], axis=0)
        assert fitted_span[0] / fitted_span[1] == pytest.approx(span[0] / span[1], rel=1e-4)  # proportions kept
        assert (fitted.keypoints[seen] >= 0).all() and (fitted.keypoints[seen] <= np.array(size)).all()
    picture = pose_map(body, frame, (96, 64))
    assert picture.shape == (64, 96, 3) and picture.any()


def test_template_library_is_redistributable_and_pulled_like_models() -> None:
    library = load_templates()
    single = library.with_faces(1)
    assert len(single) >= 12 and len(library.with_faces(2)) >= 1
    assert all(e.licence in LICENCES and e.source.startswith("https://") for e in library)
    assert library.find("蒙娜丽莎").id == "mona_lisa" and library.find("Mona Lisa").id == "mona_lisa"
    manifest = load_manifest()
    pictures = manifest.for_features(["templates"])
    assert {e.name for e in pictures} == {f"template-{e.id}" for e in library}
    assert all(e.path.startswith("templates/") and not e.non_commercial for e in pictures)
    assert "controlnet-openpose-sdxl" in {e.name for e in manifest.for_features(["pose-sdxl"])}


def test_template_sources_are_the_commons_files_their_pages_name() -> None:
    """A Commons upload URL is /<md5[0]>/<md5[:2]>/<file name>, the MD5 taken of the name (UTF-8, underscores):
    a typo in either the name or the folders would fetch nothing (or another picture)."""
    for entry in load_templates():
        host, _, path = entry.source.partition("/wikipedia/commons/")
        first, pair, name = path.split("/")
        digest = hashlib.md5(unquote(name).encode()).hexdigest()
        assert host == "https://upload.wikimedia.org" and (first, pair) == (digest[0], digest[:2]), entry.id
        assert unquote(entry.page.partition("/wiki/File:")[2]) == unquote(name), entry.id


def test_controls_parse_english_and_chinese_words() -> None:
    controls = parse_controls(["hanfu", "2", "aspect:2:3", "相似度:高", "姿势:坐姿", "seed:42"])
    assert controls.words == ["hanfu", "2"]
    assert (controls.aspect, controls.likeness, controls.pose, controls.seed) == ("2:3", "high", "seated", 42)
    assert parse_controls(["比例：9:16"]).aspect == "9:16"
    assert parse_controls(["hanfu", "options"]).panel and parse_controls(["hanfu", "选项"]).words == ["hanfu"]
    assert parse_controls(["ratio:2:3", "sundown:1"]).words == ["sundown:1"]  # an unknown key is the command's


def test_a_feature_adds_its_control_words_to_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studio, "CONTROL_WORDS", dict(studio.CONTROL_WORDS))
    monkeypatch.setattr(studio, "_BARE_CONTROLS", list(studio._BARE_CONTROLS))
    studio.register_control_word(ControlWord("seed", ("lucky", "幸运"), lambda v: int(v) * 7, bare=(("lucky7", 7),)))
    assert parse_controls(["hanfu", "幸运:6"]).seed == 42 and parse_controls(["lucky7", "hanfu"]).seed == 7
    assert parse_controls(["hanfu", "lucky7"]).words == ["hanfu"]


def test_the_service_side_of_the_studio_loads_no_model_library() -> None:
    import subprocess
    import sys

    code = ("import sys, handlers.features, bot.platforms.discord_commands; "
            "print(sorted(m for m in ('torch', 'diffusers', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
