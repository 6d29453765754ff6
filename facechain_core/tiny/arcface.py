"""An ArcFace-shaped ONNX model: [N, 3, 112, 112] -> [N, 512], named like insightface's w600k_r50."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "input.1"  # the input name of insightface's w600k_r50.onnx
OUTPUT_NAME = "683"  # its output name
EMBEDDING_DIM = 512
INPUT_SIZE = 112


class TinyArcFace(nn.Module):
    """A small residual conv net ending like iresnet: BN, dropout-free FC, feature BN."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
        )
        self.block = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.PReLU(2 * width), nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
        )
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 7 * 7, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block(self.stem(x)))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def build_arcface(out_path: Path, *, seed: int = 0) -> Path:
    """Export a randomly initialised ArcFace-shaped network to ONNX and return the file path."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinyArcFace()
    with torch.no_grad():
        # Non-trivial running statistics so the exported BatchNorms are not identities.
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but needs no onnxscript, which we don't ship.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(out_path), dynamo=False, input_names=[INPUT_NAME], output_names=["embedding"],
            dynamic_axes={INPUT_NAME: {0: "None"}, "embedding": {0: "None"}}, opset_version=17,
        )
    _rename_output(out_path, "embedding", OUTPUT_NAME)
    log.info("built ArcFace-shaped ONNX at %s", out_path)
    return out_path


def _rename_output(path: Path, old: str, new: str) -> None:
    # TorchScript refuses numeric value names such as insightface's "683"; rename in the graph.
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for output in model.graph.output:
        if output.name == old:
            output.name = new
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
