"""Ranking candidates: drop those without exactly one face (real photos, YuNet), order by similarity."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import skimage.data

from facechain_core.identity import load_rgb
from facechain_core.ranking import Ranked, cosine, filter_and_rank


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _with_similarity(identity: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector whose cosine with the unit vector `identity` is exactly `target`."""
    noise = rng.standard_normal(identity.shape)
    orthogonal = _unit(noise - (noise @ identity) * identity)
    return target * identity + np.sqrt(1.0 - target**2) * orthogonal


class _Embeddings:
    """A deterministic embed_fn: each known picture maps to a vector with a chosen similarity."""

    def __init__(self, identity: np.ndarray, wanted: dict[str, tuple[np.ndarray, float]]) -> None:
        rng = np.random.default_rng(7)
        self.by_digest = {_digest(img): (name, _with_similarity(identity, sim, rng))
                          for name, (img, sim) in wanted.items()}
        self.calls: list[tuple[str, object]] = []

    def __call__(self, image: np.ndarray, face: object) -> np.ndarray:
        name, vector = self.by_digest[_digest(image)]
        self.calls.append((name, face))
        return vector


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture
def pictures(faces_dir) -> dict[str, np.ndarray]:
    names = ("obama.jpg", "obama2.jpg", "biden.jpg", "two_people.jpg")
    out = {name: load_rgb(faces_dir / name) for name in names}
    out["coffee"] = skimage.data.coffee()  # a real photo with no face
    return out


def test_drops_no_face_and_multi_face_candidates_and_orders_by_similarity(pictures, yunet_path):
    from facechain_core.faces import YuNetDetector

    identity = _unit(np.random.default_rng(0).standard_normal(512))
    # The two pictures that must go get the highest similarity, so only the filter can drop them.
    similarities = {"obama.jpg": 0.6, "obama2.jpg": 0.8, "biden.jpg": 0.1, "two_people.jpg": 0.95, "coffee": 0.99}
    embed = _Embeddings(identity, {n: (pictures[n], s) for n, s in similarities.items()})
    candidates = list(pictures.values())
    order = list(pictures)

    ranked = filter_and_rank(candidates, YuNetDetector(yunet_path), embed, identity, keep=10)

    assert [order[r.index] for r in ranked] == ["obama2.jpg", "obama.jpg", "biden.jpg"]
    np.testing.assert_allclose([r.similarity for r in ranked], [0.8, 0.6, 0.1], atol=1e-9)
    # embed_fn only sees candidates with one face, and gets that face.
    assert sorted(name for name, _ in embed.calls) == ["biden.jpg", "obama.jpg", "obama2.jpg"]
    for name, face in embed.calls:
        height, width = pictures[name].shape[:2]
        x, y, w, h = face.box
        assert 0 <= x < width and 0 <= y < height and w > 0 and h > 0 and len(face.landmarks) == 5
    assert [order[r.index] for r in filter_and_rank(candidates, YuNetDetector(yunet_path), embed, identity,
                                                    keep=2)] == ["obama2.jpg", "obama.jpg"]


def test_without_a_detector_every_candidate_is_ranked(pictures):
    identity = _unit(np.random.default_rng(0).standard_normal(512))
    similarities = {"obama.jpg": 0.6, "obama2.jpg": 0.8, "biden.jpg": 0.1, "two_people.jpg": 0.95, "coffee": 0.99}
    embed = _Embeddings(identity, {n: (pictures[n], s) for n, s in similarities.items()})
    ranked = filter_and_rank(list(pictures.values()), None, embed, identity, keep=5)
    order = list(pictures)
    assert [order[r.index] for r in ranked] == ["coffee", "two_people.jpg", "obama2.jpg", "obama.jpg", "biden.jpg"]
    assert all(face is None for _, face in embed.calls)


def test_everything_dropped_gives_an_empty_list():
    class NoFaces:
        def detect(self, rgb):
            return []

    blank = [np.zeros((8, 8, 3), np.uint8)] * 3
    assert filter_and_rank(blank, NoFaces(), lambda img, face: np.ones(4), np.ones(4), keep=2) == []


def test_ties_keep_input_order_and_keep_must_be_positive():
    same = [np.zeros((4, 4, 3), np.uint8)] * 3
    ranked = filter_and_rank(same, None, lambda img, face: np.ones(3), np.ones(3), keep=3)
    assert ranked == [Ranked(0, pytest.approx(1.0), None), Ranked(1, pytest.approx(1.0), None),
                      Ranked(2, pytest.approx(1.0), None)]
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        filter_and_rank(same, None, lambda img, face: np.ones(3), np.ones(3), keep=0)


def test_cosine():
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(0.0)
    assert cosine(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([-3.0, 0.0])) == pytest.approx(-1.0)
