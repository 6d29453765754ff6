"""A tiny ONNX super-resolution model with the signature of the Real-ESRGAN exports Enhance runs.

Input ``input``: float32 [1, 3, H, W], RGB in [0, 1], height and width dynamic; output ``output``:
float32 [1, 3, s*H, s*W] in the same range (as facefusion feeds ``real_esrgan_x2/x4.onnx``; names are
read from the file by the engine, not assumed). The network enlarges with its own layers as the real
RRDB net does: convolutions, then PixelShuffle(2) once for x2 or twice for x4, so the engine never
resizes the picture itself. Its weights start near "the picture, enlarged" with a little random mixing.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "input", "output"
CHANNELS = 8
OPSET = 17


class TinyUpscaler(nn.Module):
    """conv -> (conv -> PixelShuffle(2)) x log2(scale) -> conv, like RRDBNet's tail, in miniature."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {scale}")
        self.head = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.ups = nn.ModuleList(nn.Conv2d(CHANNELS, CHANNELS * 4, 3, padding=1) for _ in range(scale.bit_length() - 1))
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(CHANNELS, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x)
        for up in self.ups:
            features = self.shuffle(up(features))
        return self.tail(features)


def _near_identity(model: TinyUpscaler, generator: torch.Generator) -> None:
    """Weights that carry the picture through (each channel to its copy) plus small random mixing."""
    with torch.no_grad():
        for conv in (model.head, *model.ups, model.tail):
            conv.weight.normal_(0.0, 0.01, generator=generator)
            conv.bias.zero_()
        for c in range(3):
            model.head.weight[c, c, 1, 1] += 1.0
            model.tail.weight[c, c, 1, 1] += 1.0
        for up in model.ups:  # every sub-pixel of channel c repeats channel c
            for c in range(CHANNELS):
                for sub in range(4):
                    up.weight[c * 4 + sub, c, 1, 1] += 1.0


def build_upscaler(out_path: Path, scale: int = 2, *, seed: int = 0) -> Path:
    """Export the tiny x`scale` upscaler to ONNX at out_path and return it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model = TinyUpscaler(scale).eval()
    _near_identity(model, generator)
    dummy = torch.rand(1, 3, 16, 16, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter needs no onnxscript
        torch.onnx.export(model, (dummy,), str(out_path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {2: "height", 3: "width"},
                                        OUTPUT_NAME: {2: "out_height", 3: "out_width"}})
    log.info("built a tiny x%d upscaler at %s", scale, out_path)
    return out_path
