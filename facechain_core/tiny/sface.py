"""A tiny ONNX face recognizer with the signature of OpenCV's SFace (``face_recognition_sface_2021dec.onnx``).

``cv2.FaceRecognizerSF`` feeds it a 112x112 aligned face as a [1, 3, 112, 112] blob and reads a [1, 128]
feature; the tiny net (two strided convolutions, pooling, a linear layer) keeps those shapes so the likeness
benchmark runs OpenCV's own loading, alignment and matching code on it. Its features mean nothing.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SIDE = 112
FEATURES = 128


class TinySFace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(16 * 4 * 4, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.body(x), 1))


def build_sface(out_path: Path, *, seed: int = 0) -> Path:
    """Export the tiny SFace-shaped recognizer to ONNX at out_path and return it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinySFace().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(model, (torch.zeros(1, 3, SIDE, SIDE),), str(out_path), dynamo=False, opset_version=11,
                          input_names=["data"], output_names=["fc1"])
    log.info("built a tiny SFace-shaped recognizer at %s", out_path)
    return out_path
