"""Tiny ONNX image-to-image stylisers with the signatures of the real cartoon exports.

Each builder writes a few-kilobyte graph with the real export's input/output names, layout, value
range and size behaviour, so tests run the production pre- and post-processing against it:

* ``face_paint`` - bryandlee's FacePortraitV2 (``face_paint_512_v2_0.onnx``) as exported from PyTorch:
  ``input_image`` -> ``output_image``, NCHW float32 in [-1, 1] (Tanh), a fixed [1, 3, 512, 512] input.
* ``animegan_v2`` - TachibanaYoshino's AnimeGANv2 TensorFlow exports (Hayao, Shinkai, Paprika):
  ``generator_input:0`` -> ``generator/G_MODEL/out_layer/Tanh:0``, NHWC [1, H, W, 3] in [-1, 1].
* ``animegan_v3`` - AnimeGANv3 exports (Hayao_36, PortraitSketch): NHWC [1, H, W, 3] in [-1, 1];
  input ``AnimeGANv3_input:0`` (``animeganv3_input:0`` for PortraitSketch). Its output name is not
  known here; the engine never relies on names.

Names, layouts and ranges come from published inference code of those files (not checked against
the real bytes here). The graph is a residual: ``act(x + up(down(x)))`` with ``levels`` stride-2
convolutions, so a height or width that is not a multiple of ``2**levels`` fails inside onnxruntime
exactly as the real exports fail on such sizes. ``identity=True`` zeroes the residual and clips to
the value range instead of Tanh: the model returns its input, for layout and range round-trip tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # old enough for every onnxruntime of the last years
WIDTH = 4  # channels inside the tiny network


@dataclass(frozen=True)
class Signature:
    """What a real export looks like from outside."""

    input_name: str
    output_name: str
    layout: str  # "nchw" or "nhwc"
    size: int | None  # fixed square input side; None: any height and width
    levels: int  # stride-2 levels: height and width must be multiples of 2**levels
    value_range: tuple[float, float] = (-1.0, 1.0)


FACE_PAINT = Signature("input_image", "output_image", "nchw", 512, 2)
ANIMEGAN_V2 = Signature("generator_input:0", "generator/G_MODEL/out_layer/Tanh:0", "nhwc", None, 2)
ANIMEGAN_V3 = Signature("AnimeGANv3_input:0", "AnimeGANv3_output:0", "nhwc", None, 3)
ANIMEGAN_V3_SKETCH = Signature("animeganv3_input:0", "animeganv3_output:0", "nhwc", None, 3)

# Manifest model name -> the signature of its export.
CARTOON_SIGNATURES: dict[str, Signature] = {
    "animegan-face-paint-v2": FACE_PAINT,
    "animegan-v2-shinkai": ANIMEGAN_V2,
    "animegan-v3-hayao": ANIMEGAN_V3,
    "animegan-v3-portrait-sketch": ANIMEGAN_V3_SKETCH,
}


def build_styliser(out_path: Path, signature: Signature, *, identity: bool = False, seed: int = 0,
                   strength: float = 0.6) -> Path:
    """Write a tiny styliser with `signature` to out_path and return it.

    ``identity``: the output equals the input (clipped to the value range). Otherwise random
    weights of about ``strength`` make a visible, deterministic change (per seed).
    """
    if signature.layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {signature.layout!r}")
    if signature.levels < 1:
        raise ValueError(f"levels must be at least 1, got {signature.levels}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = _graph(signature, identity, np.random.default_rng(seed), strength)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    log.debug("built tiny %s styliser at %s", signature.input_name, out_path)
    return out_path


def build_cartoon_models(out_dir: Path, *, identity: bool = False) -> dict[str, Path]:
    """Write one tiny styliser per cartoon model of the manifest; returns {model name: path}."""
    out_dir = Path(out_dir)
    return {name: build_styliser(out_dir / f"{name}.onnx", signature, identity=identity, seed=index)
            for index, (name, signature) in enumerate(CARTOON_SIGNATURES.items())}


def _graph(sig: Signature, identity: bool, rng: np.random.Generator, strength: float) -> onnx.ModelProto:
    side: int | str = sig.size if sig.size is not None else "height"
    width: int | str = sig.size if sig.size is not None else "width"
    shape = [1, 3, side, width] if sig.layout == "nchw" else [1, side, width, 3]
    inputs = [helper.make_tensor_value_info(sig.input_name, TensorProto.FLOAT, shape)]
    outputs = [helper.make_tensor_value_info(sig.output_name, TensorProto.FLOAT, shape)]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = sig.input_name  # internal names start with "t." so they never meet the I/O names
    if sig.layout == "nhwc":
        # TensorFlow exports carry their NHWC input through Transposes around NCHW convolutions.
        nodes.append(helper.make_node("Transpose", [x], ["t.x_nchw"], perm=[0, 3, 1, 2]))
        x = "t.x_nchw"
    lo, hi = sig.value_range
    # Work in [-1, 1] whatever the range, so random weights act the same on every range.
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    inits += [_const("t.centre", centre), _const("t.half", half)]
    nodes += [helper.make_node("Sub", [x, "t.centre"], ["t.x_c"]),
              helper.make_node("Div", ["t.x_c", "t.half"], ["t.x_n"])]
    h, channels = "t.x_n", 3
    for level in range(sig.levels):
        weight = rng.normal(0.0, 0.5, (WIDTH, channels, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"t.down{level}.weight"))
        nodes.append(helper.make_node("Conv", [h, f"t.down{level}.weight"], [f"t.down{level}"], kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"t.down{level}"], [f"t.down{level}.act"]))
        h, channels = f"t.down{level}.act", WIDTH
    scale = float(2 ** sig.levels)
    inits.append(numpy_helper.from_array(np.array([1.0, 1.0, scale, scale], np.float32), "t.up.scales"))
    nodes.append(helper.make_node("Resize", [h, "", "t.up.scales"], ["t.up"], mode="nearest"))
    out_weight = np.zeros((3, WIDTH, 1, 1), np.float32) if identity else \
        rng.normal(0.0, strength, (3, WIDTH, 1, 1)).astype(np.float32)
    inits.append(numpy_helper.from_array(out_weight, "t.out.weight"))
    nodes.append(helper.make_node("Conv", ["t.up", "t.out.weight"], ["t.residual"], kernel_shape=[1, 1]))
    # The residual Add is where a size off the multiple fails, as in the real generators.
    nodes.append(helper.make_node("Add", ["t.x_n", "t.residual"], ["t.mixed"]))
    if identity:
        nodes.append(helper.make_node("Clip", ["t.mixed", "t.minus_one", "t.one"], ["t.y_n"]))
        inits += [_const("t.minus_one", -1.0), _const("t.one", 1.0)]
    else:
        nodes.append(helper.make_node("Tanh", ["t.mixed"], ["t.y_n"]))
    nodes += [helper.make_node("Mul", ["t.y_n", "t.half"], ["t.y_s"]),
              helper.make_node("Add", ["t.y_s", "t.centre"], ["t.y"])]
    if sig.layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["t.y"], [sig.output_name], perm=[0, 2, 3, 1]))
    else:
        nodes.append(helper.make_node("Identity", ["t.y"], [sig.output_name]))
    graph = helper.make_graph(nodes, "tiny_styliser", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="facechain-tiny")
    model.ir_version = IR_VERSION
    return model


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)
