"""Face restoration for talking heads: a GFPGAN-family ONNX sharpens the lip-synced lower face.

Wav2Lip makes the mouth at 96x96, so pasted into a 300 px face it is soft. Each frame's face is
aligned to the FFHQ 512 template by the detector's five landmarks (one similarity transform: the
portrait does not move while the mouth does), restored by the model, warped back and blended in
through the same lower-face mask the lip-sync used, at ``weight``; the eyes and the rest of the frame
stay the portrait's own pixels. The model's input is [1, 3, S, S] RGB in [-1, 1] with S read from
the file (512 for GFPGAN 1.4); its output has the same form.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facechain_core.sessions import open_session

log = logging.getLogger(__name__)

# Where the five landmarks (eye, eye, nose tip, mouth corner, mouth corner; image-left first, the
# order YuNet gives) sit in the 512 px FFHQ crops GFPGAN was trained on.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)


class FaceRestorer:
    """A GFPGAN-family ONNX model: an aligned RGB face in, the restored face out."""

    name = "gfpgan"

    def __init__(self, session: Any, fidelity: float = 0.7) -> None:
        self._session = session
        inputs = session.get_inputs()
        face_input = next((i for i in inputs if len(i.shape) == 4), inputs[0])
        # CodeFormer's exports take a second input, its fidelity "weight" (0: sharpest, 1: most faithful).
        self._extra = {i.name: np.array([fidelity], np.float64 if "double" in i.type else np.float32)
                       for i in inputs if i is not face_input}
        shape = list(face_input.shape)
        side = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else 512
        if len(shape) != 4 or shape[1] != 3 or (isinstance(shape[3], int) and shape[3] != side):
            raise ValueError(f"not a face restorer's signature: input {face_input.name} {shape}")
        self.side = int(side)
        self._input = face_input.name
        self._output = session.get_outputs()[0].name

    @classmethod
    def open(cls, path: Path, device: str = "cpu", threads: int = 0) -> FaceRestorer:
        return cls(open_session(path, device, threads))

    def __call__(self, face_rgb: np.ndarray) -> np.ndarray:
        """Restore one aligned S x S RGB uint8 face."""
        tensor = (face_rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
        feeds = {self._input: np.ascontiguousarray(tensor), **self._extra}
        out = self._session.run([self._output], feeds)[0][0]
        return np.clip(np.rint((out.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def alignment(landmarks: np.ndarray, side: int) -> np.ndarray:
    """The similarity transform (2x3) taking the five landmarks onto the FFHQ template at `side` px."""
    template = FFHQ_TEMPLATE_512 * (side / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32)[:5], template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("the face's landmarks give no alignment")
    return matrix


def restore_frames(frames: list[np.ndarray], landmarks: np.ndarray, restorer: FaceRestorer, mask: np.ndarray,
                   weight: float) -> list[np.ndarray]:
    """Frames (RGB uint8) with the restored face blended in through `mask` (float HxW in [0, 1]) at `weight`."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if not frames or weight == 0.0:
        return frames
    height, width = frames[0].shape[:2]
    matrix = alignment(landmarks, restorer.side)
    inverse = cv2.invertAffineTransform(matrix)
    # Only the warped square carries restored pixels: outside it the blend keeps the frame.
    inside = cv2.warpAffine(np.ones((restorer.side, restorer.side), np.float32), inverse, (width, height))
    alpha = (mask * inside * weight)[..., None]
    out = []
    for frame in frames:
        aligned = cv2.warpAffine(frame, matrix, (restorer.side, restorer.side), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)
        back = cv2.warpAffine(restorer(aligned), inverse, (width, height), flags=cv2.INTER_LINEAR)
        base = frame.astype(np.float32)
        out.append(np.clip(np.rint(base + (back.astype(np.float32) - base) * alpha), 0, 255).astype(np.uint8))
    return out
