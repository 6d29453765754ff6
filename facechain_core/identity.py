"""Face identity from accepted selfies: aligned crops, ArcFace embeddings, a saved identity file.

An identity is what train-free portraits condition on: the mean of the per-photo ArcFace embeddings
(each L2-normalised, as insightface's ``normed_embedding``), renormalised, plus one aligned face crop
for the IP-Adapter FaceID Plus image encoder. It holds nothing but the user's own data.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.sessions import providers_for

log = logging.getLogger(__name__)

ARCFACE_SIZE = 112
PLUS_CROP_SIZE = 224  # IP-Adapter FaceID Plus encodes a 224 px aligned crop
EMBEDDING_DIM = 512
# insightface's arcface_dst: where the eyes, nose tip and mouth corners sit in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def template_for(size: int) -> np.ndarray:
    """Return the five-point template scaled to a square crop of `size` pixels (insightface's rule)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0], dtype=np.float32)
    raise ValueError(f"size must be a multiple of 112 or 128, got {size}")


def alignment_matrix(landmarks5: Any, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Return the 2x3 similarity transform that maps the five landmarks onto the template."""
    src = np.asarray(landmarks5, dtype=np.float32).reshape(-1, 2)
    if src.shape != (5, 2) or not np.all(np.isfinite(src)):
        raise ValueError(f"expected five (x, y) landmarks, got shape {src.shape}")
    # A huge reprojection threshold keeps all five points as inliers, so the LM refinement is a
    # least-squares fit over all of them, as insightface's SimilarityTransform.estimate is.
    matrix, _ = cv2.estimateAffinePartial2D(src, template_for(size), method=cv2.RANSAC,
                                            ransacReprojThreshold=1e6, refineIters=50)
    if matrix is None:
        raise ValueError("landmarks are degenerate; no similarity transform fits them")
    return matrix


def align_face(rgb: np.ndarray, landmarks5: Any, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Warp the face to the ArcFace template and return a size x size RGB crop."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return cv2.warpAffine(rgb, alignment_matrix(landmarks5, size), (size, size), borderValue=0.0)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Return the rows of `vectors` scaled to unit length."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class ArcFace:
    """An insightface ArcFace ONNX (w600k_r50 layout) run with onnxruntime."""

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None) -> None:
        import onnx
        import onnxruntime

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"ArcFace model not found: {path}")
        # insightface's rule: a graph that normalises inside (Sub/Mul first) takes raw pixels.
        first_nodes = [node.name for node in onnx.load(str(path), load_external_data=False).graph.node[:8]]
        inside = any(n.startswith(("Sub", "_minus")) for n in first_nodes) and any(
            n.startswith(("Mul", "_mul")) for n in first_nodes)
        self.input_mean, self.input_std = (0.0, 1.0) if inside else (127.5, 127.5)
        self._session = onnxruntime.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        model_input = self._session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self._session.get_outputs()[0].name
        self.input_size = ARCFACE_SIZE

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Return L2-normalised embeddings [N, 512] of aligned 112x112 RGB crops."""
        if not crops:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        for crop in crops:
            if crop.shape != (self.input_size, self.input_size, 3):
                raise ValueError(f"expected aligned {self.input_size}x{self.input_size} RGB crops, got {crop.shape}")
        # insightface feeds BGR frames through blobFromImages(swapRB=True): the network sees RGB,
        # which is what our crops already are.
        batch = np.stack(crops).astype(np.float32)
        batch = ((batch - self.input_mean) / self.input_std).transpose(0, 3, 1, 2)
        out = self._session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch)})[0]
        return normalise(out.astype(np.float32))

    def embed_face(self, rgb: np.ndarray, landmarks5: Any) -> np.ndarray:
        """Return the normalised embedding [512] of the face at `landmarks5` in `rgb`."""
        return self.embed([align_face(rgb, landmarks5)])[0]


@dataclass
class Identity:
    """A user's face identity: per-photo embeddings, their normalised mean, one aligned crop."""

    embedding: np.ndarray  # [512], unit length
    photo_embeddings: np.ndarray  # [n, 512], each unit length
    crop: np.ndarray  # PLUS_CROP_SIZE square RGB uint8, for FaceID Plus

    @property
    def photos(self) -> int:
        return int(self.photo_embeddings.shape[0])


def landmarks_of(face: Any) -> list[tuple[float, float]] | None:
    """Return the five landmarks of a face record (dict from storage or a detector Face)."""
    points = face.get("landmarks") if isinstance(face, dict) else getattr(face, "landmarks", None)
    if points is None or len(points) != 5:
        return None
    return [(float(p[0]), float(p[1])) for p in points]


def _score_of(face: Any) -> float:
    score = face.get("score") if isinstance(face, dict) else getattr(face, "score", None)
    return float(score) if score is not None else 0.0


def load_rgb(path: Path) -> np.ndarray:
    """Read an image file upright (EXIF) as an RGB uint8 array."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def build_identity(selfies: Sequence[tuple[str | Path, Any]], arcface: ArcFace) -> Identity:
    """Embed each selfie's face and return the identity; the best-scored face gives the crop."""
    if not selfies:
        raise UserFacingError("identity.no_selfies")
    crops, plus_crops, scores = [], [], []
    for index, (path, face) in enumerate(selfies):
        landmarks = landmarks_of(face) if face is not None else None
        if landmarks is None:
            raise UserFacingError("identity.no_face", index=index + 1)
        try:
            rgb = load_rgb(Path(path))
        except (OSError, UnidentifiedImageError) as exc:
            log.warning("selfie %d unreadable: %s", index + 1, exc)
            raise UserFacingError("identity.bad_photo", index=index + 1) from exc
        crops.append(align_face(rgb, landmarks))
        plus_crops.append(align_face(rgb, landmarks, PLUS_CROP_SIZE))
        scores.append(_score_of(face))
    photo_embeddings = arcface.embed(crops)
    mean = normalise(photo_embeddings.mean(axis=0))
    return Identity(embedding=mean.astype(np.float32), photo_embeddings=photo_embeddings,
                    crop=plus_crops[int(np.argmax(scores))])


def crop_path_for(path: Path) -> Path:
    """Return where the face crop of the identity file `path` is stored."""
    return path.with_name(f"{path.stem}_face.png")


def save_identity(identity: Identity, path: str | Path) -> Path:
    """Write the identity as ``path`` (.npz embeddings) plus ``<stem>_face.png``; return path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"identity path must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, embedding=identity.embedding, photo_embeddings=identity.photo_embeddings)
    Image.fromarray(identity.crop).save(crop_path_for(path))
    return path


def load_identity(path: str | Path) -> Identity:
    """Read an identity written by save_identity."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        embedding = data["embedding"].astype(np.float32)
        photo_embeddings = data["photo_embeddings"].astype(np.float32)
    if embedding.shape != (EMBEDDING_DIM,):
        raise ValueError(f"{path}: embedding must have shape ({EMBEDDING_DIM},), got {embedding.shape}")
    with Image.open(crop_path_for(path)) as img:
        crop = np.asarray(img.convert("RGB"))
    return Identity(embedding=embedding, photo_embeddings=photo_embeddings, crop=crop)


class IdentityPipeline:
    """Job "identity": selfies -> identity file. Params {"selfies": [{"path", "face"}], "out": path}."""

    kind = "identity"

    def __init__(self) -> None:
        self._arcface: ArcFace | None = None

    def load(self, context: PipelineContext) -> None:
        """Open the ArcFace model named by settings["arcface_path"]."""
        self._arcface = open_arcface(context)

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Embed every selfie and write the identity file."""
        if self._arcface is None:
            raise RuntimeError("IdentityPipeline.run called before load")
        # 1. Check the inputs.
        selfies = params.get("selfies")
        if not isinstance(selfies, list):
            raise ValueError(f"params['selfies'] must be a list, got {type(selfies).__name__}")
        out = Path(params["out"])
        progress(0, 2)
        # 2. Embed and average.
        identity = build_identity([(s["path"], s.get("face")) for s in selfies], self._arcface)
        progress(1, 2)
        # 3. Save.
        save_identity(identity, out)
        progress(2, 2)
        log.info("identity from %d photos written to %s", identity.photos, out)
        return JobResult(files=[out], meta={"photos": identity.photos})

    def close(self) -> None:
        """Drop the ONNX session."""
        self._arcface = None


def open_arcface(context: PipelineContext) -> ArcFace:
    """Open ArcFace from the context's settings or raise ModelNotInstalled."""
    path = context.settings.get("arcface_path") or context.model_path("arcface", "portrait")
    if not Path(path).is_file():
        raise ModelNotInstalled("arcface", "portrait", pull_command("arcface"))
    return ArcFace(path, providers=providers_for(context.device))


def pull_command(model: str) -> str:
    """Return the operator's command that installs `model`."""
    return f"facechain-bot models pull {model}"
