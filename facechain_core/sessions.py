"""onnxruntime sessions for the engine's ONNX models: one place that picks providers and threads."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def providers_for(device: str) -> list[Any]:
    """CUDA first (on the device's index) for a cuda device when this onnxruntime has it; the CPU always."""
    import onnxruntime

    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path | str, device: str = "cpu", threads: int = 0) -> Any:
    """An InferenceSession for the model at `path` on `device`; `threads` caps its CPU threads (0: its default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=providers_for(device))
