"""Group portraits on tiny models: layouts and regions, one identity per region, one-to-one ranking."""
from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from facechain_core.duo import DuoPipeline
from facechain_core.errors import UserFacingError
from facechain_core.group_poses import column_bounds, load_groups, region_masks
from facechain_core.group_ranking import best_assignment, rank_group
from facechain_core.identity import Identity, load_identity, save_identity
from facechain_core.pipeline import PipelineContext
from facechain_core.safety import read_label
from facechain_core.tiny import build_arcface, build_identity, build_lora
from facechain_core.tiny.duo import build_duo_models
from tests.fixtures.progress import StepRecorder
from tests.fixtures.tiny_models import one_torch_thread  # noqa: F401

SIDE = 96  # the tiny picture's area is SIDE x SIDE; the pair layout makes it 104 x 88


def _style(**changes: Any) -> dict[str, Any]:
    style = {"id": "studio", "family": "sd15", "prompt": "{subject}, studio portrait", "negative_prompt": "blurry",
             "identity_weight": 1.0,
             "sampler": {"scheduler": "ddim", "steps": 2, "guidance_scale": 5.0, "width": SIDE, "height": SIDE}}
    style.update(changes)
    return style


@pytest.fixture(scope="module")
def duo(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[DuoPipeline, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("duo_models")
    models = build_duo_models(root)
    arcface = build_arcface(root / "arcface.onnx")
    settings = {"sd15_path": str(models["sd15"]), "ip_adapter_path": str(models["ip-adapter-faceid-sd15"]),
                "arcface_path": str(arcface), "face_filter": False, "oversample": 1, "duo_min_similarity": -1.0,
                "model_paths": {"controlnet-openpose-sd15": str(models["controlnet-openpose-sd15"])}}
    pipeline = DuoPipeline()
    pipeline.load(PipelineContext(models_dir=root, settings=settings))
    return pipeline, models["sd15"]


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("people")
    return [build_identity(root / f"{name}.npz", seed) for seed, name in enumerate("abcd", start=1)]


def _run(pipeline: DuoPipeline, out: Path, identities: list[Path], **params: Any) -> Any:
    job = {"style": _style(), "identities": [str(p) for p in identities], "count": 1, "seed": 42,
           "out_dir": str(out), **params}
    return pipeline.run(job, StepRecorder())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32)


# -- layouts and regions --------------------------------------------------------------------------

def test_layouts_cover_two_to_four_people() -> None:
    library = load_groups()
    assert {layout.people for layout in library} == {2, 3, 4}
    for layout in library:
        bodies, _ = layout.skeletons()
        assert len(bodies) == layout.people
        picture = layout.pose_map((128, 96))
        # Every person's skeleton is drawn: OpenPose's nose colour appears once per person.
        nose = np.all(picture == (255, 0, 0), axis=2)
        assert cv2.connectedComponents(nose.astype(np.uint8))[0] - 1 == layout.people


def test_regions_partition_the_picture_on_the_coarsest_grid() -> None:
    for layout in load_groups():
        masks = region_masks(layout, (512, 384), latent_factor=8, levels=4)
        assert masks.shape == (layout.people, 192, 256)
        assert (masks.sum(axis=0) == 1).all()  # one person per pixel, nobody left out
        cell = 4 * 2 ** 3
        for mask in masks:
            cols = np.nonzero(mask.any(axis=0))[0]
            assert cols.min() % cell == 0 and (cols.max() + 1) % cell == 0
        # Left to right: person i's band holds their skeleton's centre.
        for index, centre in enumerate(layout.centres((512, 384))):
            assert masks[index, 0, int(centre * 256 / 512)]


def test_column_bounds_keep_a_cell_each() -> None:
    assert column_bounds([10.0, 11.0, 12.0], 32, 8) == [0, 8, 16, 32]
    with pytest.raises(ValueError, match="need at least"):
        column_bounds([1.0, 2.0, 3.0], 16, 8)


# -- one-to-one ranking ---------------------------------------------------------------------------

def test_assignment_picks_the_best_total_similarity() -> None:
    # Greedy would give identity 0 face 0 (0.9) and leave identity 1 with face 1 (0.1): total 1.0.
    # The best total matches identity 0 to face 1 and identity 1 to face 0: 0.8 + 0.85 = 1.65.
    similarity = np.array([[0.9, 0.85], [0.8, 0.1], [0.0, 0.0]])
    assert best_assignment(similarity) == [1, 0]


def test_assignment_without_scipy_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    similarity = rng.uniform(-1, 1, (5, 4))
    with_scipy = best_assignment(similarity)
    real_import = builtins.__import__

    def no_scipy(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert best_assignment(similarity) == with_scipy
    assert len(set(with_scipy)) == 4


class _Faces:
    """A detector returning fixed faces per candidate index (the candidate's first pixel holds it)."""

    def __init__(self, faces: dict[int, list[int]]) -> None:
        self.faces = faces

    def detect(self, rgb: np.ndarray) -> list[int]:
        return self.faces[int(rgb[0, 0, 0])]


def test_rank_group_matches_faces_and_drops_the_unrecognisable() -> None:
    identities = np.eye(3)[:2] * 1.0  # two identities along axes 0 and 1
    face_vectors = {1: [0.0, 1.0, 0.0], 2: [1.0, 0.0, 0.0], 3: [0.0, 0.0, 1.0], 4: [0.7, 0.7, 0.0]}
    candidates = [np.full((4, 4, 3), i, np.uint8) for i in range(4)]
    detector = _Faces({0: [1, 2], 1: [2, 3], 2: [1], 3: [4, 1]})

    def embed(image: np.ndarray, face: Any, person: int) -> np.ndarray:
        return np.array(face_vectors[face])

    ranked = rank_group(candidates, detector, embed, identities, min_similarity=0.5)
    # 0: both found (faces swapped in the picture); 1: identity 1 unrecognisable; 2: one face only;
    # 3: identity 0 matched to the 0.7 face, identity 1 to its own.
    assert [r.index for r in ranked] == [0, 3]
    assert ranked[0].faces == (2, 1) and ranked[0].similarities == (1.0, 1.0)
    assert ranked[1].faces == (4, 1)


# -- the pipeline on tiny models ------------------------------------------------------------------

@pytest.mark.slow
def test_partner_identity_changes_their_region_most(duo: tuple[DuoPipeline, Path], people: list[Path],
                                                    tmp_path: Path) -> None:
    pipeline, _ = duo
    a, b, c = people[:3]
    with_b = _run(pipeline, tmp_path / "ab", [a, b])
    with_c = _run(pipeline, tmp_path / "ac", [a, c])
    first, second = _pixels(with_b.files[0]), _pixels(with_c.files[0])
    height, width = first.shape[:2]
    masks = pipeline.masks(pipeline.base("sd15"), pipeline.layout(2, None), (width, height))
    region_a, region_b = (cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
                          for m in masks)
    change = np.abs(first - second).mean(axis=2)
    assert change[region_b].mean() >= 5 * change[region_a].mean() > 0
    assert with_b.meta["layout"] == "pair" and with_b.meta["people"] == 2


class _ContributionProbe:
    """Wraps an IP-Adapter attention processor; records the change of its output when `person`'s image tokens
    are zeroed, i.e. that person's IP-Adapter contribution (zero tokens give zero keys and values)."""

    def __init__(self, inner: Any, person: int, records: list[Any]) -> None:
        self.inner, self.person, self.records = inner, person, records

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, attention_mask: Any = None,
                 temb: Any = None, scale: float = 1.0, ip_adapter_masks: Any = None) -> Any:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                         ip_adapter_masks=ip_adapter_masks)
        text, (tokens,) = encoder_hidden_states
        without = tokens.clone()
        without[:, self.person] = 0
        alone = self.inner(attn, hidden_states, (text, [without]), attention_mask, temb,
                           ip_adapter_masks=ip_adapter_masks)
        self.records.append((out - alone).abs().amax(dim=(0, 2)))  # per position
        return out


@pytest.mark.slow
def test_each_identity_acts_only_inside_its_region(duo: tuple[DuoPipeline, Path], people: list[Path],
                                                   tmp_path: Path) -> None:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipeline, _ = duo
    unet = pipeline.base("sd15").pipe.unet
    originals = dict(unet.attn_processors)
    records: list[Any] = []
    probed = {name: _ContributionProbe(p, 0, records) if isinstance(p, IPAdapterAttnProcessor2_0) else p
              for name, p in originals.items()}
    unet.set_attn_processor(probed)
    try:
        result = _run(pipeline, tmp_path / "probe", people[:2])
    finally:
        unet.set_attn_processor(originals)
    width, height = result.meta["size"]
    mask_a = pipeline.masks(pipeline.base("sd15"), pipeline.layout(2, None), (width, height))[0]
    assert records
    seen_inside = 0.0
    for contribution in records:
        positions = contribution.numel()
        # This attention level's grid: the mask is MASK_LATENT_FACTOR x the latent; read each block's centre.
        step = int(round((mask_a.size / positions) ** 0.5))
        grid = mask_a[step // 2::step, step // 2::step]
        assert grid.size == positions
        contribution = contribution.reshape(grid.shape).numpy()
        assert np.abs(contribution[~grid]).max() == 0.0
        seen_inside = max(seen_inside, float(contribution[grid].max()))
    assert seen_inside > 1e-3  # A did act, inside A's region


@pytest.mark.slow
def test_personal_loras_are_not_applied(duo: tuple[DuoPipeline, Path], people: list[Path], tmp_path: Path) -> None:
    pipeline, sd15 = duo
    lora = build_lora(sd15, tmp_path / "user.safetensors", seed=5)
    plain = _run(pipeline, tmp_path / "plain", people[:3])
    asked = _run(pipeline, tmp_path / "asked", people[:3], user_lora=str(lora), user_lora_scale=1.0)
    assert np.array_equal(_pixels(plain.files[0]), _pixels(asked.files[0]))
    assert asked.meta["lora_used"] is False and asked.meta["personal_loras"] == "not applied"
    assert asked.meta["people"] == 3 and asked.meta["layout"] == "trio"
    assert read_label(asked.files[0]).get("ai_generated")


@pytest.mark.slow
def test_bad_requests_are_refused(duo: tuple[DuoPipeline, Path], people: list[Path], tmp_path: Path) -> None:
    pipeline, _ = duo
    with pytest.raises(UserFacingError) as missing:
        _run(pipeline, tmp_path / "x", [people[0], tmp_path / "nobody.npz"])
    assert missing.value.code == "duo.no_identity"
    with pytest.raises(UserFacingError) as layout:
        _run(pipeline, tmp_path / "y", people[:2], layout="trio")
    assert layout.value.code == "duo.unknown_layout"
    with pytest.raises(ValueError, match="2..4 identities"):
        _run(pipeline, tmp_path / "z", people[:1])


@pytest.mark.slow
def test_faceid_plus_gives_each_person_their_own_face_crop(tmp_path: Path, people: list[Path],
                                                           duo: tuple[DuoPipeline, Path]) -> None:
    from facechain_core.tiny import CLIP_VISION_HIDDEN, build_clip_vision, build_ip_adapter_faceid

    _, sd15 = duo
    plus = build_ip_adapter_faceid(tmp_path / "plus.bin", sd15, plus=True, clip_dim=CLIP_VISION_HIDDEN, seed=7,
                                   lora_rank=0, ip_std=0.6)
    encoder = build_clip_vision(tmp_path / "clip", hidden_size=CLIP_VISION_HIDDEN)
    pipeline = DuoPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, settings={
        "sd15_path": str(sd15), "ip_adapter_path": str(plus), "image_encoder_path": str(encoder),
        "arcface_path": str(duo[0]._settings["arcface_path"]), "face_filter": False, "oversample": 1,
        "duo_min_similarity": -1.0, "model_paths": duo[0]._settings["model_paths"]}))
    try:
        assert pipeline.base("sd15").plus
        # B keeps the embedding but gets another face crop: only the crop differs between the two runs.
        a, b = people[:2]
        kept = load_identity(b)
        other_crop = save_identity(Identity(kept.embedding, kept.photo_embeddings, 255 - kept.crop),
                                   tmp_path / "b_crop.npz")
        first = _pixels(_run(pipeline, tmp_path / "1", [a, b]).files[0])
        second = _pixels(_run(pipeline, tmp_path / "2", [a, other_crop]).files[0])
        height, width = first.shape[:2]
        masks = pipeline.masks(pipeline.base("sd15"), pipeline.layout(2, None), (width, height))
        region_a, region_b = (cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
                              for m in masks)
        change = np.abs(first - second).mean(axis=2)
        assert change[region_b].mean() > 2 * change[region_a].mean()
    finally:
        pipeline.close()
