"""Keep the generated portraits that show exactly one face, best identity match first."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Detector(Protocol):
    """Finds faces in an RGB uint8 array; returns a list of faces."""

    def detect(self, rgb: np.ndarray) -> list[Any]: ...


# (candidate RGB, its one face or None when the face filter is off) -> embedding
EmbedFn = Callable[[np.ndarray, Any | None], np.ndarray]


@dataclass(frozen=True)
class Ranked:
    """A kept candidate: its index in the input, cosine similarity to the identity, its face."""

    index: int
    similarity: float
    face: Any | None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Return the cosine similarity of two vectors."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def filter_and_rank(candidates: Sequence[np.ndarray], detector: Detector | None, embed_fn: EmbedFn,
                    identity_embedding: np.ndarray, keep: int) -> list[Ranked]:
    """Drop candidates without exactly one face, rank the rest by similarity, return the best `keep`.

    With ``detector=None`` (face filter off) every candidate passes and ``embed_fn`` gets no face.
    Ties keep the candidates' order.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    ranked: list[Ranked] = []
    for index, image in enumerate(candidates):
        face = None
        if detector is not None:
            faces = detector.detect(image)
            if len(faces) != 1:
                log.debug("candidate %d dropped: %d faces", index, len(faces))
                continue
            face = faces[0]
        ranked.append(Ranked(index, cosine(embed_fn(image, face), identity_embedding), face))
    ranked.sort(key=lambda r: (-r.similarity, r.index))
    log.debug("kept %d of %d candidates with one face", len(ranked), len(candidates))
    return ranked[:keep]
