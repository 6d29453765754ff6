"""A tiny ONNX face restorer with the signature of facefusion's ``gfpgan_1.4.onnx``.

Input ``input``: float32 [1, 3, 512, 512], an aligned RGB face in [-1, 1]; output ``output``, the same
form (names and shapes as facefusion feeds GFPGAN, not checked against the real bytes here; the
engine reads the side from the file). The random model is one 3x3 convolution and a tanh, so its
output follows the face; ``constant`` makes it return one colour everywhere: tests see exactly where
the engine blends the model's output in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SIDE = 512
INPUT, OUTPUT = "input", "output"
CONSTANT_RGB = (0.2, 0.85, 0.3)  # in [0, 1]: a green no face has


def build_restorer(out_path: Path, *, constant: bool = False, seed: int = 0) -> Path:
    """Write the tiny restorer to out_path and return it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Mostly the identity, plus a little random mixing: a plausible "sharpened" face.
    weight = rng.normal(0.0, 0.05, (3, 3, 3, 3)).astype(np.float32)
    weight[range(3), range(3), 1, 1] += 1.0
    inits = [numpy_helper.from_array(weight, "r.weight"),
             numpy_helper.from_array(rng.normal(0.0, 0.02, 3).astype(np.float32), "r.bias")]
    nodes = [helper.make_node("Conv", [INPUT, "r.weight", "r.bias"], ["r.mixed"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["r.mixed"], ["r.restored" if constant else OUTPUT])]
    if constant:
        colour = np.array(CONSTANT_RGB, np.float32).reshape(1, 3, 1, 1) * 2.0 - 1.0
        inits += [numpy_helper.from_array(colour, "r.colour"), numpy_helper.from_array(np.array(0.0, np.float32),
                                                                                         "r.zero")]
        nodes += [helper.make_node("Mul", ["r.restored", "r.zero"], ["r.blank"]),
                  helper.make_node("Add", ["r.blank", "r.colour"], [OUTPUT])]
    graph = helper.make_graph(
        nodes, "tiny_face_restorer",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, 3, SIDE, SIDE])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path
