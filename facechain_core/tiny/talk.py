"""A tiny ONNX lip-sync model with the signature of the Wav2Lip exports (facefusion's ``wav2lip_gan_96.onnx``).

Inputs ``source``: mel windows float32 [N, 1, 80, 16] (values in [-4, 4]) and ``target``: faces
float32 [N, 6, 96, 96] (the BGR crop with its lower half blacked out, then the reference crop, in
[0, 1]); output [N, 3, 96, 96] BGR in [0, 1]. Names and shapes as facefusion's lip syncer feeds
them (not checked against the real bytes here); the engine finds the inputs by shape anyway.

The tiny graph darkens an ellipse in the lower half of the reference, the more the louder the
window (the mean of its mel values), so a silent clip and speech give different mouths.
``constant`` makes it return one colour everywhere instead: tests see exactly where the engine
pastes the model's output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SIDE = 96
MEL_INPUT, FACE_INPUT, OUTPUT = "source", "target", "output"
CONSTANT_BGR = (0.1, 0.9, 0.2)  # a green no face has, easy to find in a frame


def build_lipsync(out_path: Path, *, constant: bool = False) -> Path:
    """Write the tiny lip-sync model to out_path and return it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    inputs = [helper.make_tensor_value_info(MEL_INPUT, TensorProto.FLOAT, ["batch", 1, 80, 16]),
              helper.make_tensor_value_info(FACE_INPUT, TensorProto.FLOAT, ["batch", 6, SIDE, SIDE])]
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])]
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    mouth = np.clip(1.0 - ((xs - 48) / 22) ** 2 - ((ys - 72) / 10) ** 2, 0.0, 1.0)[None, None]
    inits = [numpy_helper.from_array(np.array([3], np.int64), "t.ref_range"),
             numpy_helper.from_array(np.array([6], np.int64), "t.ref_range_end"),
             numpy_helper.from_array(np.array([1], np.int64), "t.axis"),
             numpy_helper.from_array(mouth.astype(np.float32), "t.mouth"),
             numpy_helper.from_array(np.array(0.9, np.float32), "t.depth"),
             numpy_helper.from_array(np.array(2.0, np.float32), "t.gain"),
             numpy_helper.from_array(np.array(2.0, np.float32), "t.bias"),
             numpy_helper.from_array(np.array(1.0, np.float32), "t.one"),
             numpy_helper.from_array(np.array(0.0, np.float32), "t.zero")]
    nodes = [
        helper.make_node("Slice", [FACE_INPUT, "t.ref_range", "t.ref_range_end", "t.axis"], ["t.reference"]),
        # Loudness of the window: its mean mel value, through a sigmoid to (0, 1).
        helper.make_node("ReduceMean", [MEL_INPUT], ["t.level"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["t.level", "t.gain"], ["t.scaled"]),
        helper.make_node("Add", ["t.scaled", "t.bias"], ["t.shifted"]),
        helper.make_node("Sigmoid", ["t.shifted"], ["t.open"]),
        helper.make_node("Mul", ["t.open", "t.mouth"], ["t.shade"]),
        helper.make_node("Mul", ["t.shade", "t.depth"], ["t.darken"]),
        helper.make_node("Sub", ["t.one", "t.darken"], ["t.keep"]),
        helper.make_node("Mul", ["t.reference", "t.keep"], ["t.mouthed"]),
    ]
    if constant:
        inits.append(numpy_helper.from_array(np.array(CONSTANT_BGR, np.float32).reshape(1, 3, 1, 1), "t.colour"))
        nodes += [helper.make_node("Mul", ["t.mouthed", "t.zero"], ["t.blank"]),
                  helper.make_node("Add", ["t.blank", "t.colour"], ["t.result"])]
    else:
        nodes.append(helper.make_node("Identity", ["t.mouthed"], ["t.result"]))
    nodes.append(helper.make_node("Clip", ["t.result", "t.zero", "t.one"], [OUTPUT]))
    graph = helper.make_graph(nodes, "tiny_wav2lip", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="facechain-tiny")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def build_talk_models(out_dir: Path, *, constant: bool = False) -> dict[str, Path]:
    """Write the tiny lip-sync model under its manifest name; returns {model name: path}."""
    return {"wav2lip-gan-onnx": build_lipsync(Path(out_dir) / "wav2lip_gan_96.onnx", constant=constant)}
