"""Rank group pictures: each detected face matched one-to-one to an identity on ArcFace similarity.

A candidate is kept when it shows exactly one face per person and, under the assignment of faces to
identities with the best total similarity (scipy's ``linear_sum_assignment`` when scipy is installed,
else every assignment tried: at most four people), everyone reaches ``min_similarity``. Kept candidates
are ordered by their mean assigned similarity.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facechain_core.ranking import Detector

log = logging.getLogger(__name__)

# (candidate RGB, face or None, person index when there is no face) -> embedding
GroupEmbedFn = Callable[[np.ndarray, Any | None, int], np.ndarray]


@dataclass(frozen=True)
class GroupRanked:
    """A kept candidate: its index, the mean similarity, each identity's similarity and matched face."""

    index: int
    score: float
    similarities: tuple[float, ...]
    faces: tuple[Any | None, ...]


def similarity_matrix(faces: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """Cosine similarity of each face embedding (rows) to each identity embedding (columns)."""
    a = faces / np.maximum(np.linalg.norm(faces, axis=1, keepdims=True), 1e-12)
    b = identities / np.maximum(np.linalg.norm(identities, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def best_assignment(similarity: np.ndarray) -> list[int]:
    """For each identity (column), the face (row) it is matched to, maximising the total similarity."""
    faces, people = similarity.shape
    if faces < people:
        raise ValueError(f"{people} identities need at least as many faces, got {faces}")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # scipy is optional: four people have at most a few thousand assignments
        best = max(itertools.permutations(range(faces), people),
                   key=lambda rows: sum(similarity[r, c] for c, r in enumerate(rows)))
        return list(best)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    matched = dict(zip(cols.tolist(), rows.tolist(), strict=True))
    return [matched[c] for c in range(people)]


def rank_group(candidates: Sequence[np.ndarray], detector: Detector | None, embed_fn: GroupEmbedFn,
               identities: np.ndarray, min_similarity: float) -> list[GroupRanked]:
    """Keep candidates with one face per identity, all recognisable; best mean similarity first.

    With ``detector=None`` (face filter off) each person's region stands in for their face: ``embed_fn``
    gets no face and the person's index, and faces are matched to identities in order.
    """
    people = len(identities)
    ranked: list[GroupRanked] = []
    for index, image in enumerate(candidates):
        if detector is None:
            faces: list[Any | None] = [None] * people
            embeddings = np.stack([embed_fn(image, None, i) for i in range(people)])
            order = list(range(people))
            sims = similarity_matrix(embeddings, identities)
        else:
            faces = list(detector.detect(image))
            if len(faces) != people:
                log.debug("group candidate %d dropped: %d faces for %d people", index, len(faces), people)
                continue
            embeddings = np.stack([embed_fn(image, face, i) for i, face in enumerate(faces)])
            sims = similarity_matrix(embeddings, identities)
            order = best_assignment(sims)
        matched = tuple(float(sims[row, person]) for person, row in enumerate(order))
        if min(matched) < min_similarity:
            log.debug("group candidate %d dropped: someone unrecognisable (%s)", index,
                      ", ".join(f"{s:.3f}" for s in matched))
            continue
        ranked.append(GroupRanked(index, float(np.mean(matched)), matched, tuple(faces[row] for row in order)))
    ranked.sort(key=lambda r: (-r.score, r.index))
    return ranked
