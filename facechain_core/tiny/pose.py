"""A tiny ONNX pose model with the signature of DWPose's ``dw-ll_ucoco_384.onnx``.

Input ``input``: float32 [N, 3, 384, 288] (a normalised RGB crop); outputs ``simcc_x`` [N, 133, 576]
and ``simcc_y`` [N, 133, 768]: SimCC scores of the 133 COCO-WholeBody keypoints, two bins per pixel.
Names and shapes as mmdeploy exports RTMPose (not checked against the real bytes here); the engine
reads the input size from the file and tells the outputs apart by length anyway.

The random model scores each bin through a rank-8 product of features of the crop, so different
pictures give different keypoints. ``planted`` keypoints (crop pixels) make it ignore the picture and
peak exactly there: tests check where the engine maps them back to.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUTS = "input", ("simcc_x", "simcc_y")
HEIGHT, WIDTH, KEYPOINTS, SPLIT = 384, 288, 133, 2
RANK = 8
PEAK, FLOOR = 0.9, 0.05  # planted scores at and away from the keypoint


class TinySimCC(nn.Module):
    """Strided convolutions -> a small feature vector -> rank-8 SimCC scores along x and y."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4), nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 3)), nn.Flatten(), nn.Linear(16 * 12, RANK))
        self.per_keypoint = nn.Parameter(torch.randn(RANK, KEYPOINTS))
        self.along_x = nn.Parameter(torch.randn(RANK, WIDTH * SPLIT))
        self.along_y = nn.Parameter(torch.randn(RANK, HEIGHT * SPLIT))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(image)  # (N, R)
        mixed = (z[:, :, None] * self.per_keypoint[None]).transpose(1, 2)  # (N, K, R)
        return torch.sigmoid(mixed @ self.along_x), torch.sigmoid(mixed @ self.along_y)


class PlantedSimCC(nn.Module):
    """Scores that peak at fixed crop pixels whatever the picture (0 x the picture keeps the input used)."""

    def __init__(self, keypoints: np.ndarray, scores: np.ndarray) -> None:
        super().__init__()
        x = np.full((KEYPOINTS, WIDTH * SPLIT), FLOOR, np.float32)
        y = np.full((KEYPOINTS, HEIGHT * SPLIT), FLOOR, np.float32)
        for k, ((px, py), score) in enumerate(zip(keypoints, scores)):
            x[k, int(round(px * SPLIT))] = y[k, int(round(py * SPLIT))] = score
        self.register_buffer("x", torch.from_numpy(x)[None])
        self.register_buffer("y", torch.from_numpy(y)[None])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = image.mean(dim=(1, 2, 3))[:, None, None] * 0.0
        return self.x + zero, self.y + zero


def build_pose(out_path: Path, *, seed: int = 0, planted: np.ndarray | None = None,
               planted_scores: np.ndarray | None = None) -> Path:
    """Export the tiny pose model (random, or `planted` (K, 2) crop pixels with their scores) to out_path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if planted is None:
        model: nn.Module = TinySimCC()
    else:
        planted = np.asarray(planted, np.float32)
        if planted.shape != (KEYPOINTS, 2):
            raise ValueError(f"planted keypoints must be ({KEYPOINTS}, 2), got {planted.shape}")
        scores = np.full(KEYPOINTS, PEAK, np.float32) if planted_scores is None else planted_scores
        model = PlantedSimCC(planted, scores)
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript, which we don't ship.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, HEIGHT, WIDTH),), str(out_path), dynamo=False, input_names=[INPUT_NAME],
            output_names=list(OUTPUTS), dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUTS)},
            opset_version=17)
    log.info("built DWPose-shaped ONNX at %s", out_path)
    return out_path
