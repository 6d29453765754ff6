"""Train-free portraits on tiny models: conditioning wired, adapters swapped, cancel, filters, residency."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from facechain_core.errors import JobCancelled, ModelNotInstalled, UserFacingError
from facechain_core.identity import Identity, normalise, save_identity
from facechain_core.pipeline import PipelineContext
from facechain_core.portrait import PortraitPipeline
from facechain_core.resident import ResidentPipelines
from facechain_core.tiny import build_identity, build_lora
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _style(**changes: Any) -> dict[str, Any]:
    style = {
        "id": "studio", "family": "sd15", "prompt": "{subject}, studio portrait", "negative_prompt": "blurry",
        "identity_weight": 1.0,
        "sampler": {"scheduler": "ddim", "steps": 2, "guidance_scale": 5.0, "width": 64, "height": 64},
    }
    style.update(changes)
    return style


def _settings(models: dict[str, Path], **changes: Any) -> dict[str, Any]:
    settings = {
        "sd15_path": str(models["sd15"]), "ip_adapter_path": str(models["ip_adapter_faceid_sd15"]),
        "sdxl_path": str(models["sdxl"]), "sdxl_ip_adapter_path": str(models["ip_adapter_faceid_sdxl"]),
        "image_encoder_path": str(models["image_encoder"]), "arcface_path": str(models["arcface"]),
        "face_filter": False, "oversample": 1,
    }
    settings.update(changes)
    return settings


def _load(models: dict[str, Path], tmp: Path, budget_mb: int = 0, **changes: Any) -> PortraitPipeline:
    pipeline = PortraitPipeline()
    pipeline.load(PipelineContext(models_dir=tmp, memory_budget_mb=budget_mb, settings=_settings(models, **changes)))
    return pipeline


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory, one_torch_thread) -> PortraitPipeline:
    return _load(tiny_models, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("users")
    return build_identity(root / "a" / "identity.npz", 1), build_identity(root / "b" / "identity.npz", 2)


def _run(pipeline: PortraitPipeline, out: Path, identity: Path, progress: StepRecorder | None = None,
         **params: Any) -> Any:
    job = {"style": _style(), "identity": str(identity), "count": 1, "seed": 42, "out_dir": str(out),
           "user_lora": None, "user_lora_scale": 1.0, "style_lora": None}
    job.update(params)
    return pipeline.run(job, progress or StepRecorder())


def test_count_two_writes_two_pngs(pipeline, identities, tmp_path):
    progress = StepRecorder()
    result = _run(pipeline, tmp_path, identities[0], progress, count=2, seed=7)
    assert len(result.files) == 2
    for path in result.files:
        assert path.parent == tmp_path.resolve() and path.suffix == ".png"
        with Image.open(path) as img:
            assert img.size == (64, 64)
    meta = result.meta
    assert sorted(meta["seeds"]) == [7, 8] and meta["style"] == "studio" and meta["lora_used"] is False
    assert meta["similarity"] == sorted(meta["similarity"], reverse=True)
    assert progress.steps[-1][0] == progress.steps[-1][1]
    assert [s for s, _ in progress.steps] == sorted(s for s, _ in progress.steps)


def test_identity_embedding_conditions_the_image(pipeline, identities, tmp_path):
    first = _pixels(_run(pipeline, tmp_path / "1", identities[0]).files[0])
    again = _pixels(_run(pipeline, tmp_path / "2", identities[0]).files[0])
    other = _pixels(_run(pipeline, tmp_path / "3", identities[1]).files[0])
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 2


def test_identity_weight_zero_ignores_the_identity(pipeline, identities, tmp_path):
    style = _style(identity_weight=0.0)
    a = _pixels(_run(pipeline, tmp_path / "a", identities[0], style=style).files[0])
    b = _pixels(_run(pipeline, tmp_path / "b", identities[1], style=style).files[0])
    assert np.abs(a - b).max() <= 1


def test_style_lora_weight_changes_the_image(pipeline, identities, tiny_models, tmp_path):
    lora = str(tiny_models["lora_sd15_style"])

    def image(weight: float | None, name: str) -> np.ndarray:
        style = _style() if weight is None else _style(lora={"source": "hf:o/r", "file": "s.safetensors",
                                                             "weight": weight})
        return _pixels(_run(pipeline, tmp_path / name, identities[0], style=style, style_lora=lora).files[0])

    without, zero, one = image(None, "none"), image(0.0, "zero"), image(1.0, "one")
    assert np.abs(zero - without).max() <= 1  # weight 0: the adapter is loaded but adds nothing
    assert np.abs(one - zero).max() > 2


def test_switching_user_lora_swaps_adapters_not_the_base(pipeline, identities, tiny_models, tmp_path):
    resident: ResidentPipelines = pipeline._resident
    base = pipeline.base("sd15")
    unet, loads = base.pipe.unet, resident.loads["portrait:sd15"]
    a = _run(pipeline, tmp_path / "a", identities[0], user_lora=str(tiny_models["lora_sd15_a"]), user_lora_scale=0.8)
    b = _run(pipeline, tmp_path / "b", identities[1], user_lora=str(tiny_models["lora_sd15_b"]), user_lora_scale=0.8)
    b_without = _run(pipeline, tmp_path / "c", identities[1])
    assert pipeline.base("sd15").pipe.unet is unet and resident.loads["portrait:sd15"] == loads == 1
    assert a.meta["lora_used"] and b.meta["lora_used"] and not b_without.meta["lora_used"]
    # One adapter per slot: user b's weights replaced user a's in place.
    adapters = base.pipe.get_list_adapters()["unet"]
    assert adapters.count("user") == 1 and set(adapters) <= {"faceid_0", "user", "style"}
    assert str(tiny_models["lora_sd15_b"].resolve()) in base.slots["user"]
    assert np.abs(_pixels(b.files[0]) - _pixels(b_without.files[0])).max() > 2


@pytest.mark.parametrize("rank", [4, 8], ids=["same-rank-copied", "other-rank-replaced"])
def test_swapped_in_lora_gives_the_same_image_as_a_fresh_load(identities, tiny_models, tmp_path, rank):
    lora_b = build_lora(tiny_models["sd15"], tmp_path / f"b{rank}.safetensors", rank=rank, seed=5)
    swapped = _load(tiny_models, tmp_path / "m1")
    _run(swapped, tmp_path / "a", identities[0], user_lora=str(tiny_models["lora_sd15_a"]), user_lora_scale=0.7)
    via_swap = _pixels(_run(swapped, tmp_path / "b", identities[0], user_lora=str(lora_b),
                            user_lora_scale=0.7).files[0])
    assert swapped.base("sd15").pipe.unet.peft_config["user"].r == rank
    swapped.close()
    fresh = _load(tiny_models, tmp_path / "m2")
    direct = _pixels(_run(fresh, tmp_path / "c", identities[0], user_lora=str(lora_b), user_lora_scale=0.7).files[0])
    assert np.abs(via_swap - direct).max() <= 1
    plain = _pixels(_run(fresh, tmp_path / "d", identities[0]).files[0])
    assert np.abs(plain - direct).max() > 2  # the LoRA matters, so equality above means something


def test_lora_of_another_family_is_refused_and_the_base_recovers(pipeline, identities, tiny_models, tmp_path):
    with pytest.raises(UserFacingError) as info:
        _run(pipeline, tmp_path / "x", identities[0], user_lora=str(tiny_models["lora_sdxl"]))
    assert (info.value.code, info.value.details) == ("portrait.lora_incompatible", {"family": "sd15"})
    result = _run(pipeline, tmp_path / "y", identities[0], user_lora=str(tiny_models["lora_sd15_a"]))
    assert result.meta["lora_used"] and len(result.files) == 1


def test_cancel_from_progress_stops_the_job(pipeline, identities, tmp_path):
    progress = StepRecorder(cancel_at=1)
    with pytest.raises(JobCancelled):
        _run(pipeline, tmp_path, identities[0], progress, count=2)
    assert len(progress.steps) == 1
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_batches_offer_yield_points(identities, tiny_models, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", batch_size=1, oversample=2)
    progress = StepRecorder()
    result = _run(pipeline, tmp_path / "out", identities[0], progress, count=2)
    assert len(result.files) == 2 and progress.yields == 3  # four candidates, one per batch
    assert progress.steps[-1] == (9, 9)  # 2 steps x 4 batches + ranking


def test_face_filter_drops_faceless_candidates(identities, tiny_models, yunet_path, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", face_filter=True, detector_path=str(yunet_path))
    with pytest.raises(UserFacingError) as info:
        _run(pipeline, tmp_path / "out", identities[0], count=1)  # random weights paint noise, not faces
    assert info.value.code == "portrait.no_good_candidates" and info.value.details == {"candidates": 1}


def test_face_filter_keeps_only_one_face_candidates(identities, tiny_models, tmp_path):
    calls: list[tuple[int, int]] = []

    class OneFaceInEveryOther:
        def detect(self, rgb):
            calls.append(rgb.shape)
            return [{"box": [0, 0, 10, 10], "landmarks": None}] if len(calls) % 2 else []

    pipeline = PortraitPipeline(detector_factory=lambda kind, path: OneFaceInEveryOther())
    pipeline.load(PipelineContext(models_dir=tmp_path, settings=_settings(
        tiny_models, face_filter=True, detector_path=str(tiny_models["arcface"]), oversample=2)))
    result = _run(pipeline, tmp_path / "out", identities[0], count=2, seed=100)
    # Candidates 0 and 2 (seeds 100 and 102) show one face; 1 and 3 show none and are dropped.
    assert calls == [(64, 64, 3)] * 4
    assert sorted(result.meta["seeds"]) == [100, 102] and len(result.files) == 2


def test_style_lora_comes_from_the_configured_model_path_of_the_style(identities, tiny_models, tmp_path):
    lora_style = _style(id="pixel_art", lora={"source": "hf:o/r", "file": "s.safetensors", "weight": 1.0})
    pipeline = _load(tiny_models, tmp_path, model_paths={"style-lora-pixel_art": str(tiny_models["lora_sd15_style"])})
    styled = _pixels(_run(pipeline, tmp_path / "styled", identities[0], style=lora_style).files[0])
    plain = _pixels(_run(pipeline, tmp_path / "plain", identities[0], style=_style(id="pixel_art")).files[0])
    assert np.abs(styled - plain).max() > 2
    bare = _load(tiny_models, tmp_path)
    with pytest.raises(ModelNotInstalled) as info:
        _run(bare, tmp_path / "out", identities[0], style=lora_style)
    assert info.value.details["model"] == "style-lora-pixel_art"


def test_missing_weights_raise_model_not_installed(identities, tiny_models, tmp_path):
    with pytest.raises(ModelNotInstalled) as info:
        _load(tiny_models, tmp_path, ip_adapter_path=str(tmp_path / "missing.bin"))
    assert info.value.details["model"] == "ip-adapter-faceid-sd15"
    pipeline = _load(tiny_models, tmp_path, sdxl_path=str(tmp_path / "no-sdxl"))
    with pytest.raises(ModelNotInstalled) as info:
        _run(pipeline, tmp_path / "out", identities[0], style=_style(family="sdxl"))
    assert info.value.details["model"] == "sdxl"
    with pytest.raises(ModelNotInstalled):
        _run(pipeline, tmp_path / "out", identities[0],
             style=_style(lora={"source": "hf:o/r", "file": "s.safetensors", "weight": 1.0}), style_lora=None)


def test_user_facing_errors_for_missing_user_data(pipeline, identities, tmp_path):
    with pytest.raises(UserFacingError) as info:
        _run(pipeline, tmp_path, tmp_path / "none.npz")
    assert info.value.code == "portrait.no_identity"
    with pytest.raises(UserFacingError) as info:
        _run(pipeline, tmp_path, identities[0], user_lora=str(tmp_path / "gone.safetensors"))
    assert info.value.code == "portrait.user_lora_missing"


def test_sdxl_family_and_memory_budget_evicts_the_least_recent_base(identities, tiny_models, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", budget_mb=1)  # room for one tiny base at a time
    resident = pipeline._resident
    assert resident.keys() == ["portrait:sd15"]
    result = _run(pipeline, tmp_path / "x", identities[0], style=_style(family="sdxl"),
                  user_lora=str(tiny_models["lora_sdxl"]))
    assert len(result.files) == 1 and result.meta["lora_used"]
    assert resident.keys() == ["portrait:sdxl"]
    _run(pipeline, tmp_path / "y", identities[0])
    assert resident.keys() == ["portrait:sd15"] and resident.loads["portrait:sd15"] == 2


def test_faceid_plus_uses_the_face_crop(tiny_models, tmp_path):
    pipeline = _load(tiny_models, tmp_path / "m", ip_adapter_path=str(tiny_models["ip_adapter_faceid_plus_sd15"]))
    assert pipeline.base("sd15").plus
    rng = np.random.default_rng(3)
    vectors = normalise(rng.standard_normal((1, 512))).astype(np.float32)
    paths = []
    for name in ("a", "b"):  # same embedding, different face crops
        crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        paths.append(save_identity(Identity(vectors[0], vectors, crop), tmp_path / name / "identity.npz"))
    a = _pixels(_run(pipeline, tmp_path / "oa", paths[0]).files[0])
    b = _pixels(_run(pipeline, tmp_path / "ob", paths[1]).files[0])
    assert np.abs(a - b).max() > 2


def test_resident_derive_shares_modules_and_counts_them_once(tiny_models):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    resident = ResidentPipelines()
    base = resident.get("sd15", lambda: StableDiffusionPipeline.from_pretrained(tiny_models["sd15"]))
    alone = resident.resident_bytes()
    img2img = resident.derive("sd15:img2img", "sd15", StableDiffusionImg2ImgPipeline.from_pipe)
    assert img2img.unet is base.unet and resident.resident_bytes() == alone > 0
    assert resident.get("sd15", lambda: pytest.fail("rebuilt")) is base and resident.loads["sd15"] == 1
    resident.evict("sd15")
    assert resident.keys() == []  # the derived pipeline goes with its base
    with pytest.raises(KeyError, match="not resident"):
        resident.derive("sd15:img2img", "sd15", StableDiffusionImg2ImgPipeline.from_pipe)


def test_resident_lru_evicts_least_recently_used_over_budget():
    resident = ResidentPipelines(budget_bytes=3 * 4096)

    def block() -> torch.nn.Module:
        return torch.nn.Linear(32, 32, bias=False)  # 4096 bytes

    for key in ("a", "b", "c"):
        resident.get(key, block)
    resident.get("a", block)  # a is now the most recent
    resident.get("d", block)
    assert resident.keys() == ["c", "a", "d"] and resident.resident_bytes() <= 3 * 4096
    assert resident.loads == {"a": 1, "b": 1, "c": 1, "d": 1}


def test_a_style_runs_on_its_named_base_and_on_the_default_one_while_that_is_missing(identities, tiny_models,
                                                                                     tmp_path):
    from facechain_core.tiny import build_sd15

    other_base = build_sd15(tmp_path / "photo-base", seed=5)
    pipeline = _load(tiny_models, tmp_path, model_paths={"photo-base": str(other_base)})
    on_base = _run(pipeline, tmp_path / "on", identities[0], style=_style(base="photo-base"))
    default = _run(pipeline, tmp_path / "default", identities[0])
    missing = _run(pipeline, tmp_path / "missing", identities[0], style=_style(base="not-pulled"))
    assert on_base.meta["base"] == "photo-base" and default.meta["base"] == missing.meta["base"] == "sd15"
    assert np.abs(_pixels(on_base.files[0]) - _pixels(default.files[0])).max() > 2
    assert np.array_equal(_pixels(missing.files[0]), _pixels(default.files[0]))
    resident = pipeline._resident
    assert {"portrait:sd15", "portrait:sd15:photo-base"} <= set(resident.keys())
    assert pipeline.base("sd15", "photo-base").name == "photo-base"
    pipeline.close()
    assert not {"portrait:sd15", "portrait:sd15:photo-base"} & set(resident.keys())


def test_a_style_base_shares_the_plain_bases_faceid_plus_image_encoder(identities, tiny_models, tmp_path):
    from facechain_core.tiny import build_sd15

    other_base = build_sd15(tmp_path / "photo-base", seed=6)
    pipeline = _load(tiny_models, tmp_path / "m", ip_adapter_path=str(tiny_models["ip_adapter_faceid_plus_sd15"]),
                     model_paths={"photo-base": str(other_base)})
    result = _run(pipeline, tmp_path / "on", identities[0], style=_style(base="photo-base"))
    plain, styled = pipeline.base("sd15"), pipeline.base("sd15", "photo-base")
    assert result.meta["base"] == "photo-base" and styled.plus
    assert styled.pipe.image_encoder is plain.pipe.image_encoder and styled.pipe.unet is not plain.pipe.unet


def _without_ip_adapter_paths(models: dict[str, Path], **changes: Any) -> dict[str, Any]:
    settings = _settings(models, **changes)
    for key in ("ip_adapter_path", "image_encoder_path"):
        settings.pop(key)
    return settings


@pytest.mark.parametrize(("present", "choice", "plus"), [
    ({"ip_adapter_faceid_sd15", "ip_adapter_faceid_plus_sd15", "image_encoder"}, "auto", True),
    ({"ip_adapter_faceid_sd15", "ip_adapter_faceid_plus_sd15"}, "auto", False),  # Plus v2 without its encoder
    ({"ip_adapter_faceid_sd15"}, "auto", False),
    ({"ip_adapter_faceid_sd15", "ip_adapter_faceid_plus_sd15", "image_encoder"}, "faceid", False)])
def test_faceid_plus_v2_is_chosen_when_its_files_are_installed(tiny_models, tmp_path, present, choice, plus):
    from facechain_core.tiny import TINY_LAYOUT

    models_dir = tmp_path / "models"  # a models_dir holding only the `present` adapters, in the manifest's places
    for name in present:
        (models_dir / TINY_LAYOUT[name]).parent.mkdir(parents=True, exist_ok=True)
        (models_dir / TINY_LAYOUT[name]).symlink_to(tiny_models[name])
    pipeline = PortraitPipeline()
    # The manifest checks sizes of files in their places; tiny files are named through model_paths instead.
    names = {"ip_adapter_faceid_sd15": "ip-adapter-faceid-sd15",
             "ip_adapter_faceid_plus_sd15": "ip-adapter-faceid-plusv2-sd15", "image_encoder": "ip-adapter-image-encoder"}
    model_paths = {names[n]: str(models_dir / TINY_LAYOUT[n]) for n in present}
    pipeline.load(PipelineContext(models_dir=models_dir, settings=_without_ip_adapter_paths(
        tiny_models, identity_adapter=choice, model_paths=model_paths)))
    expected = "ip-adapter-faceid-plusv2-sd15" if plus else "ip-adapter-faceid-sd15"
    assert pipeline.identity_adapter() == expected
    assert pipeline.base("sd15").plus is plus


def test_auto_restore_restores_each_kept_portrait(identities, tiny_models, tmp_path):
    from facechain_core.faces import Face
    from facechain_core.restore import FFHQ_TEMPLATE_512
    from facechain_core.tiny.restore import CONSTANT_RGB, build_restorer

    landmarks = [tuple(p) for p in (FFHQ_TEMPLATE_512 * (64 / 512)).tolist()]  # a face filling the 64 px picture

    class FaceEverywhere:
        def detect(self, rgb):
            return [Face(box=(8.0, 8.0, 48.0, 48.0), landmarks=landmarks, score=0.9)]

    restorer = str(build_restorer(tmp_path / "gfpgan.onnx", constant=True))
    images = {}
    for mode in ("off", "on"):
        pipeline = PortraitPipeline(detector_factory=lambda kind, path: FaceEverywhere())
        pipeline.load(PipelineContext(models_dir=tmp_path, settings=_settings(
            tiny_models, auto_restore=mode, detector_path=str(tiny_models["arcface"]),
            model_paths={"gfpgan-1.4-onnx": restorer})))
        result = _run(pipeline, tmp_path / mode, identities[0])
        assert result.meta["restored"] is (mode == "on")
        images[mode] = _pixels(result.files[0])
    nose = tuple(int(v) for v in landmarks[2])[::-1]
    green = np.array(CONSTANT_RGB) * 255
    assert np.abs(images["on"][nose] - green).max() <= 2 and np.abs(images["off"][nose] - green).max() > 10
    assert np.array_equal(images["on"][0, 0], images["off"][0, 0])  # the corner is no face: untouched
