"""A face identity file of the real format (``facechain_core.identity``) with random contents, for tests and
benches that need a person without photographing one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from facechain_core.identity import Identity, normalise, save_identity


def build_identity(path: Path, seed: int) -> Path:
    """Two random unit photo embeddings, their normalised mean and a random 224 px crop, saved at `path`."""
    rng = np.random.default_rng(seed)
    vectors = normalise(rng.standard_normal((2, 512))).astype(np.float32)
    crop = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return save_identity(Identity(normalise(vectors.mean(axis=0)), vectors, crop), path)
