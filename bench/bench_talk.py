"""A 10-second talking-head clip, end to end through ``TalkPipeline.run`` (decode, face, frames, MP4).

Always: the fast mode on the CPU (the tiny Wav2Lip-signature model, the real YuNet detector, 640 px).
Then the animated mode: SadTalker's audio-to-pose network at full size with random weights (so the
timing is real and the motion is noise), on CUDA when there is a GPU, else on the CPU for reference.
Target (issue #22): under 30 s for a 10-second clip on a GPU.

Run: ``.venv/bin/python bench/bench_talk.py [--seconds 10] [--side 640]``.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from facechain_core.pipeline import PipelineContext
from facechain_core.talk import TalkPipeline
from facechain_core.tiny.head_motion import build_audio2pose
from facechain_core.tiny.talk import build_lipsync

SHARED = Path(__file__).resolve().parents[2] / "shared"


def voice_file(path: Path, seconds: float, rate: int = 16_000) -> Path:
    """Speech-like noise bursts as a WAV file."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    samples = np.clip(np.sin(2 * np.pi * 2.7 * t), 0, None) ** 2 * np.random.default_rng(0).normal(0, 0.3, len(t))
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def run(label: str, settings: dict, device: str, image: Path, audio: Path, out: Path) -> None:
    pipeline = TalkPipeline()
    started = time.perf_counter()
    pipeline.load(PipelineContext(models_dir=out.parent, device=device, settings=settings))
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    result = pipeline.run({"image": str(image), "audio": str(audio), "out": str(out)}, lambda *a, **k: None)
    took = time.perf_counter() - started
    meta = result.meta
    print(f"{label:<44} {took:6.2f} s for {meta['duration_s']:.1f} s of video ({meta['frames']} frames, "
          f"{meta['frames'] / took:5.1f} fps, {meta['size'][0]}x{meta['size'][1]}, mode {meta['mode']}; "
          f"load {loaded:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--side", type=int, default=640)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        audio = voice_file(folder / "voice.wav", args.seconds)
        paths = {"yunet": str(SHARED / "models" / "yunet_s_640_640.onnx"),
                 "wav2lip-gan-onnx": str(build_lipsync(folder / "wav2lip.onnx")),
                 "sadtalker-audio2pose": str(build_audio2pose(folder / "a2p.pth", full_size=True))}
        image = SHARED / "faces" / "obama.jpg"
        base = {"model_paths": paths, "talk_max_side": args.side}
        print(f"talk, {args.seconds:.0f}-second clip, {'CUDA: ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
        run("fast mode, CPU (talk_mode auto on a CPU)", base, "cpu", image, audio, folder / "fast.mp4")
        device = "cuda" if cuda else "cpu"
        run(f"animated mode, full-size audio2pose, {device}", {**base, "talk_mode": "animated"}, device, image,
            audio, folder / "animated.mp4")


if __name__ == "__main__":
    main()
