"""Talking head (FaceChain V2's SadTalker feature): a portrait and speech become a lip-synced video.

The mouth is driven by a Wav2Lip-family ONNX model when installed (manifest ``wav2lip-gan-onnx``),
else by a warp that needs only the detector's landmarks and follows the audio's loudness; the
result says which ran (``meta["animator"]``). Features are computed here as Wav2Lip's own code
does: 16 kHz audio, an 80-band mel spectrogram at 80 columns a second, and for each video frame
at 25 fps the 16 columns starting at its time.

One job:

1. speech: the text spoken by the offline TTS (espeak-ng), or the user's audio decoded (PyAV);
   longer than ``talk_max_seconds`` is refused;
2. the portrait decoded upright, scaled for chat (a square around the face for a round video);
   its largest face found (YuNet; none is refused);
3. frames: the mouth per frame (lip-sync crops pasted back through a feathered lower-face mask, or
   the landmark warp); the lip-synced lower face sharpened by a GFPGAN-family restorer when one is
   installed (manifest ``gfpgan-1.4-onnx``, ``facechain_core.restore``); blinks and a slight head sway
   so the photo does not look frozen;
4. the MP4: H.264 + AAC at 25 fps, its comment tag the project's AI label
   (``facechain_core.safety.label_text``: "AI-generated video made by FaceChain Bot").

Job params: ``image``, ``text`` or ``audio`` (a path), ``language`` ("en"), ``voice`` (a /voice
choice: an edge-tts voice, or "espeak" for offline only), ``round`` (False),
``out`` (a file path) or ``out_dir``. Settings: ``talk_max_seconds`` (30), ``talk_max_side`` (640),
``talk_round_side`` (384), ``talk_motion`` (True), ``talk_threads`` (0), ``talk_tts`` (["espeak"]; add
"edge" first for Microsoft's online voices: the text leaves the server), ``talk_edge_proxy`` (""),
``talk_restore`` ("auto": on a GPU when the restorer is installed; "on"; "off") and
``talk_restore_weight`` (0.8).
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.faces import Face, FaceDetector
from facechain_core.head_motion import (
    FEATURE as MOTION_FEATURE, MODEL as MOTION_MODEL, MOTION_LEVELS, HeadMotion, blink_track, head_warp, head_weight,
    pose_matrix,
)
from facechain_core.images import decode_image
from facechain_core.kokoro import FEATURE as VOICES_FEATURE
from facechain_core.kokoro import KokoroTTS, installed_files
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.restore import FaceRestorer, restore_frames
from facechain_core.safety import label_text, service_name
from facechain_core.sessions import open_session, providers_for
from facechain_core.tts import (
    SAMPLE_RATE, Speech, TextToSpeech, decode_audio, engines_from_settings, resample, speak,
)

log = logging.getLogger(__name__)

FEATURE = "talk"
LIPSYNC_MODEL = "wav2lip-gan-onnx"
RESTORE_MODEL, RESTORE_FEATURE = "gfpgan-1.4-onnx", "talk-restore"
RESTORE_MODES = ("auto", "on", "off")
FPS = 25
DEFAULTS: dict[str, Any] = {
    "talk_max_seconds": 30.0,
    "talk_max_side": 640,
    "talk_round_side": 384,
    "talk_motion": True,
    "talk_threads": 0,
    "talk_tts": ["kokoro", "espeak"],  # Kokoro where pulled, espeak-ng last; "edge" (online) only if listed
    "talk_edge_proxy": "",
    "talk_restore": "auto",
    "talk_restore_weight": 0.8,
    "talk_mode": "auto",  # "fast": Wav2Lip + procedural sway; "animated": head pose from the audio; auto: animated on a GPU
    "talk_motion_level": "natural",  # animated mode: "still", "natural" or "lively"
    "talk_pose_style": 0,  # animated mode: SadTalker's pose style, 0..45
}
ROUND_MAX_SECONDS = 60.0  # Telegram's limit for video notes
MAX_IMAGE_BYTES = 50_000_000
MAX_IMAGE_PIXELS = 60_000_000
TRACK_RATE = 44_100  # the audio track keeps more than the 16 kHz the features need
# Wav2Lip's hparams: 16 kHz, n_fft = win = 800, hop 200 (80 columns/s), 80 mels in 55..7600 Hz.
N_FFT, HOP, N_MELS, FMIN, FMAX = 800, 200, 80, 55.0, 7600.0
MEL_PER_SECOND = SAMPLE_RATE / HOP
MEL_STEP = 16  # mel columns per video frame window
FACE_SIDE = 96
BATCH = 32
WINDOW = 64  # frames made, restored and encoded at a time
TALK_MODES = ("auto", "fast", "animated")


# -- audio features (pure) ----------------------------------------------------------------------
def mel_spectrogram(samples: np.ndarray) -> np.ndarray:
    """Wav2Lip's normalised mel spectrogram of 16 kHz audio: (80, T) in [-4, 4], 80 columns a second."""
    x = np.asarray(samples, np.float32)
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1])  # pre-emphasis
    x = np.pad(x, N_FFT // 2, mode="reflect" if len(x) > N_FFT // 2 else "constant")
    count = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:count]
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(N_FFT + 1)[:-1].astype(np.float32), axis=1))
    mel = _mel_basis() @ spectrum.T
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - 20.0  # ref_level_db 20
    return np.clip(8.0 * ((db + 100.0) / 100.0) - 4.0, -4.0, 4.0).astype(np.float32)


@cache
def _mel_basis() -> np.ndarray:
    """librosa's default (Slaney) mel filterbank for Wav2Lip's settings: (80, n_fft // 2 + 1)."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        hz = np.asarray(hz, np.float64)
        linear = hz / (200.0 / 3)
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27), linear)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (mel - 15.0)), mel * (200.0 / 3))

    bins = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    edges = to_hz(np.linspace(to_mel(np.array(FMIN)), to_mel(np.array(FMAX)), N_MELS + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def mel_windows(mel: np.ndarray, frames: int, fps: int = FPS) -> np.ndarray:
    """The 16-column window of each video frame, as Wav2Lip feeds them: (frames, 1, 80, 16)."""
    if mel.ndim != 2 or mel.shape[0] != N_MELS:
        raise ValueError(f"expected a mel spectrogram of shape (80, T), got {mel.shape}")
    if mel.shape[1] < MEL_STEP:
        mel = np.pad(mel, ((0, 0), (0, MEL_STEP - mel.shape[1])), constant_values=-4.0)
    out = np.empty((frames, 1, N_MELS, MEL_STEP), np.float32)
    for i in range(frames):
        start = min(int(MEL_PER_SECOND * i / fps), mel.shape[1] - MEL_STEP)
        out[i, 0] = mel[:, start:start + MEL_STEP]
    return out


def frame_count(duration_s: float, fps: int = FPS) -> int:
    return max(1, round(duration_s * fps))


def loudness(samples: np.ndarray, rate: int, frames: int, fps: int = FPS) -> np.ndarray:
    """Each frame's mouth opening in [0, 1] from the audio's RMS (smoothed, normalised by its peak)."""
    per = rate / fps
    values = np.zeros(frames, np.float64)
    for i in range(frames):
        chunk = samples[int(i * per):int((i + 1) * per)]
        values[i] = np.sqrt(np.mean(np.square(chunk, dtype=np.float64))) if len(chunk) else 0.0
    values = np.convolve(values, [0.25, 0.5, 0.25], mode="same")
    peak = float(np.percentile(values, 95)) if len(values) else 0.0
    if peak < 1e-3:
        return np.zeros(frames, np.float32)
    return np.clip(values / peak, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class FaceGeometry:
    """Where the parts of the portrait's face are, in frame pixels."""

    crop: tuple[int, int, int, int]  # x0, y0, x1, y1: the lip-sync model's face crop
    mouth: tuple[float, float]  # centre
    mouth_width: float
    eyes: tuple[tuple[float, float], tuple[float, float]]

    @classmethod
    def of(cls, face: Face, shape: tuple[int, ...]) -> FaceGeometry:
        x, y, w, h = face.box
        height, width = shape[:2]
        # Wav2Lip pads the detector's box downwards (10 px at its scale) to keep the chin.
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(width, int(math.ceil(x + w))), min(height, int(math.ceil(y + h * 1.08)))
        right_eye, left_eye, _, right_mouth, left_mouth = face.landmarks[:5]
        mouth = ((right_mouth[0] + left_mouth[0]) / 2, (right_mouth[1] + left_mouth[1]) / 2)
        mouth_width = max(4.0, math.dist(right_mouth, left_mouth))
        return cls((x0, y0, x1, y1), mouth, mouth_width, (right_eye, left_eye))


def lower_face_mask(shape: tuple[int, ...], geometry: FaceGeometry) -> np.ndarray:
    """A float mask in [0, 1] over the frame: the lower half of the face crop, feathered inwards."""
    height, width = shape[:2]
    x0, y0, x1, y1 = geometry.crop
    cw, ch = x1 - x0, y1 - y0
    mask = np.zeros((height, width), np.float32)
    inner = (x0 + int(cw * 0.12), y0 + int(ch * 0.5), x1 - int(cw * 0.12), y1 - int(ch * 0.04))
    mask[inner[1]:inner[3], inner[0]:inner[2]] = 1.0
    feather = max(3, int(min(cw, ch) * 0.08)) | 1
    mask = cv2.GaussianBlur(mask, (feather * 2 + 1, feather * 2 + 1), 0)
    # Blurring spreads outwards; keep the feather inside the crop's lower half.
    clip = np.zeros_like(mask)
    clip[y0 + int(ch * 0.45):y1, x0:x1] = 1.0
    return mask * clip


# -- mouth animators ----------------------------------------------------------------------------
class LipSync:
    """A Wav2Lip-family ONNX model: mel (N, 1, 80, 16) and face (N, 6, 96, 96) -> face (N, 3, 96, 96) in [0, 1].

    The face input is the BGR crop with its lower half blacked out, then the reference crop, scaled
    to [0, 1]; inputs are told apart by their shapes, never by names (exports name them differently).
    """

    name = "wav2lip"

    def __init__(self, session: Any) -> None:
        self._session = session
        self._mel_name = self._face_name = ""
        for item in session.get_inputs():
            shape = list(item.shape)
            if len(shape) != 4:
                continue
            if shape[1] == 1:
                self._mel_name = item.name
            elif shape[1] == 6:
                self._face_name = item.name
        if not (self._mel_name and self._face_name):
            raise ValueError(f"not a Wav2Lip signature: inputs {[(i.name, i.shape) for i in session.get_inputs()]}")
        self._output = session.get_outputs()[0].name

    @classmethod
    def open(cls, path: Path, device: str = "cpu", threads: int = 0) -> LipSync:
        return cls(open_session(path, device, threads))

    def __call__(self, mels: np.ndarray, face_bgr: np.ndarray) -> np.ndarray:
        """Mouths for each mel window on one 96x96 BGR uint8 face: (N, 96, 96, 3) BGR uint8."""
        reference = face_bgr.astype(np.float32) / 255.0
        masked = reference.copy()
        masked[FACE_SIDE // 2:] = 0.0
        face = np.concatenate([masked, reference], axis=2).transpose(2, 0, 1)[None]
        outputs = []
        for start in range(0, len(mels), BATCH):
            batch = mels[start:start + BATCH]
            faces = np.ascontiguousarray(np.repeat(face, len(batch), axis=0))
            out = self._session.run([self._output], {self._mel_name: batch, self._face_name: faces})[0]
            outputs.append(out)
        pred = np.concatenate(outputs).transpose(0, 2, 3, 1)
        return np.clip(np.rint(pred * 255.0), 0, 255).astype(np.uint8)


def lipsync_frames(portrait: np.ndarray, geometry: FaceGeometry, model: LipSync, mels: np.ndarray,
                   mask: np.ndarray) -> list[np.ndarray]:
    """The portrait with the model's lower face pasted in for each mel window (RGB uint8 frames)."""
    x0, y0, x1, y1 = geometry.crop
    crop = cv2.cvtColor(portrait[y0:y1, x0:x1], cv2.COLOR_RGB2BGR)
    mouths = model(mels, cv2.resize(crop, (FACE_SIDE, FACE_SIDE), interpolation=cv2.INTER_AREA))
    alpha = mask[..., None]
    base = portrait.astype(np.float32)
    frames = []
    for mouth in mouths:
        layer = base.copy()
        patch = cv2.resize(mouth, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
        layer[y0:y1, x0:x1] = cv2.cvtColor(patch, cv2.COLOR_BGR2RGB)
        frames.append(np.clip(np.rint(base + (layer - base) * alpha), 0, 255).astype(np.uint8))
    return frames


def warp_mouth(portrait: np.ndarray, geometry: FaceGeometry, opening: float) -> np.ndarray:
    """Opens the mouth by `opening` (0..1): lips pushed apart around the landmarks, the gap darkened."""
    if opening <= 0.01:
        return portrait.copy()
    cx, cy = geometry.mouth
    mw = geometry.mouth_width
    rx, ry = mw * 0.8, mw * 0.65
    x0, x1 = max(0, int(cx - rx)), min(portrait.shape[1], int(cx + rx) + 1)
    y0, y1 = max(0, int(cy - ry)), min(portrait.shape[0], int(cy + ry) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = (xs - cx) / rx, (ys - cy) / ry
    falloff = np.clip(1.0 - (dx * dx + dy * dy), 0.0, 1.0) ** 2
    gap = opening * mw * 0.22
    # Below the mouth line the jaw drops (more), above it the upper lip lifts (less).
    shift = np.where(ys >= cy, gap, -0.35 * gap) * falloff
    src_y = (ys - shift).astype(np.float32)
    region = cv2.remap(portrait, xs, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = np.clip(1.0 - ((xs - cx) / (mw * 0.45)) ** 2 - ((ys - cy - 0.3 * gap) / max(gap * 0.6, 1.0)) ** 2,
                     0.0, 1.0)
    dark = (region.astype(np.float32) * (1.0 - 0.8 * inside[..., None])).astype(np.uint8)
    out = portrait.copy()
    out[y0:y1, x0:x1] = dark
    return out


def blink(frame: np.ndarray, geometry: FaceGeometry, closed: float) -> np.ndarray:
    """Closes the eyes by `closed` (0..1): the skin above and below each eye slides over it."""
    if closed <= 0.01:
        return frame
    (rx, ry), (lx, ly) = geometry.eyes
    radius = max(3.0, math.dist((rx, ry), (lx, ly)) * 0.28)
    out = frame
    for cx, cy in geometry.eyes:
        x0, x1 = max(0, int(cx - radius)), min(frame.shape[1], int(cx + radius) + 1)
        y0, y1 = max(0, int(cy - radius)), min(frame.shape[0], int(cy + radius) + 1)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        weight = np.clip(1.0 - np.hypot(xs - cx, ys - cy) / radius, 0.0, 1.0)
        # Sample from further out: the lids' skin covers the eye.
        pull = closed * weight
        src_y = (cy + (ys - cy) * (1.0 + 1.5 * pull) + np.sign(ys - cy) * pull * radius * 0.3).astype(np.float32)
        if out is frame:
            out = frame.copy()
        out[y0:y1, x0:x1] = cv2.remap(frame, xs, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return out


def blink_amount(index: int, fps: int = FPS, period_s: float = 3.6, length_s: float = 0.2) -> float:
    t = (index / fps + 1.1) % period_s
    return float(math.sin(math.pi * t / length_s)) if t < length_s else 0.0


def sway(frame: np.ndarray, index: int, centre: tuple[float, float], fps: int = FPS) -> np.ndarray:
    """A slight, slow head motion: about a degree of tilt and a couple of pixels of drift."""
    t = index / fps
    angle = 1.2 * math.sin(2 * math.pi * t / 4.3)
    scale = 1.0 + 0.01 * math.sin(2 * math.pi * t / 5.1)
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[0, 2] += 1.5 * math.sin(2 * math.pi * t / 3.7)
    matrix[1, 2] += 1.0 * math.sin(2 * math.pi * t / 2.9)
    return cv2.warpAffine(frame, matrix, (frame.shape[1], frame.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


class HeadTrack:
    """The animated mode's motion: a pose per frame (from the audio) moves the head; blinks close the eyes."""

    def __init__(self, poses: np.ndarray, blinks: np.ndarray, geometry: FaceGeometry, face: Face,
                 shape: tuple[int, ...]) -> None:
        x, y, w, h = face.box
        self.poses, self.blinks, self.geometry = poses, blinks, geometry
        self.face_size = float(max(w, h))
        self.centre = (float(x + w / 2), float(y + h / 2))
        self.weight = head_weight(shape, self.centre, self.face_size)

    @classmethod
    def predict(cls, model: HeadMotion, mels: np.ndarray, face: Face, shape: tuple[int, ...], level: str,
                style: int = 0, seed: int = 0) -> HeadTrack:
        """Poses for the clip's mel windows, scaled by the motion level (still: none)."""
        if level not in MOTION_LEVELS:
            raise ValueError(f"motion level must be one of {', '.join(MOTION_LEVELS)}, got {level!r}")
        scale = MOTION_LEVELS[level]
        poses = model.poses(mels, style, seed) * scale if scale else np.zeros((len(mels), 6), np.float32)
        return cls(poses, blink_track(len(mels), FPS, seed), FaceGeometry.of(face, shape), face, shape)

    def matrix(self, index: int) -> np.ndarray:
        return pose_matrix(self.poses[index], self.centre, self.face_size)

    def render(self, frame: np.ndarray, index: int) -> np.ndarray:
        frame = blink(frame, self.geometry, float(self.blinks[index]))
        if not self.poses[index].any():
            return frame
        return head_warp(frame, self.matrix(index), self.weight)


def animate_frames(portrait: np.ndarray, face: Face, speech: Speech, model: LipSync | None, motion: bool = True,
                   restorer: FaceRestorer | None = None, restore_weight: float = 0.8,
                   head: HeadTrack | None = None, mels: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The video frames (RGB uint8) of the portrait saying `speech` at 25 fps, made WINDOW frames at a time
    so memory stays flat on long clips: the mouth (lip sync, restored; or the landmark warp), then the
    head (the animated mode's pose track and blinks; or the fast mode's procedural blinks and sway)."""
    geometry = FaceGeometry.of(face, portrait.shape)
    frames_n = frame_count(speech.duration_s)
    base = resample(speech, SAMPLE_RATE)
    if model is not None and mels is None:
        mels = mel_windows(mel_spectrogram(base.samples), frames_n)
    openings = loudness(base.samples, base.rate, frames_n) if model is None else None
    mask = lower_face_mask(portrait.shape, geometry)
    x0, y0, x1, y1 = geometry.crop
    neck = ((x0 + x1) / 2, float(y1))  # the fast mode's sway turns the head about the neck
    for start in range(0, frames_n, WINDOW):
        stop = min(frames_n, start + WINDOW)
        if model is not None:
            assert mels is not None
            frames = lipsync_frames(portrait, geometry, model, mels[start:stop], mask)
            if restorer is not None:
                frames = restore_frames(frames, np.array(face.landmarks[:5], np.float32), restorer, mask,
                                        restore_weight)
        else:
            assert openings is not None
            frames = [warp_mouth(portrait, geometry, float(o)) for o in openings[start:stop]]
        for index, frame in enumerate(frames, start):
            if head is not None:
                yield head.render(frame, index)
            elif motion:
                yield sway(blink(frame, geometry, blink_amount(index)), index, neck)
            else:
                yield frame


def animate(portrait: np.ndarray, face: Face, speech: Speech, model: LipSync | None, motion: bool = True,
            progress: Callable[[int, int], None] | None = None, restorer: FaceRestorer | None = None,
            restore_weight: float = 0.8, head: HeadTrack | None = None) -> list[np.ndarray]:
    """All frames of ``animate_frames`` in a list (short clips, tests)."""
    frames = list(animate_frames(portrait, face, speech, model, motion, restorer, restore_weight, head))
    if progress is not None:
        progress(len(frames), len(frames))
    return frames


# -- video --------------------------------------------------------------------------------------
def encode_mp4(frames: Iterable[np.ndarray], speech: Speech, out: Path, comment: str, fps: int = FPS) -> int:
    """Writes H.264 (yuv420p) + AAC frames and speech to an MP4 with `comment` (the AI label) as its tag.

    Frames are encoded as they come (an iterator keeps memory flat); returns how many there were."""
    import av

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    count = 0
    with av.open(str(tmp), "w", format="mp4") as container:
        container.metadata["comment"] = comment
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": "23", "preset": "veryfast"}
        audio = container.add_stream("aac", rate=speech.rate, layout="mono")
        for frame in itertools.chain([first], frames):
            count += 1
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        size = audio.codec_context.frame_size or 1024
        samples = np.ascontiguousarray(np.clip(speech.samples, -1.0, 1.0), np.float32)
        for start in range(0, len(samples), size):
            chunk = av.AudioFrame.from_ndarray(samples[None, start:start + size], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = speech.rate, start
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode(None):
            container.mux(packet)
    tmp.replace(out)
    return count


def encode_voice_message(speech: Speech, out: Path) -> Path:
    """Writes `speech` as OGG/Opus (mono, 48 kHz), the format of Telegram voice messages."""
    import av

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    samples = resample(speech, 48_000).samples
    with av.open(str(tmp), "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.clip(samples, -1.0, 1.0)[None].astype(np.float32), format="flt",
                                           layout="mono")
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    tmp.replace(out)
    return out


def fit_for_chat(rgb: np.ndarray, face: Face, max_side: int, round_side: int | None) -> tuple[np.ndarray, Face]:
    """Scales the portrait for chat (even sides); for a round video, a square around the face."""
    if round_side is not None:
        height, width = rgb.shape[:2]
        side = min(height, width)
        x, y, w, h = face.box
        cx, cy = x + w / 2, y + h / 2
        left = int(min(max(cx - side / 2, 0), width - side))
        top = int(min(max(cy - side / 2, 0), height - side))
        rgb = rgb[top:top + side, left:left + side]
        face = Face(box=(x - left, y - top, w, h), landmarks=[(px - left, py - top) for px, py in face.landmarks],
                    score=face.score)
        target = (round_side, round_side)
    else:
        height, width = rgb.shape[:2]
        factor = min(1.0, max_side / max(height, width))
        target = (max(2, int(width * factor) // 2 * 2), max(2, int(height * factor) // 2 * 2))
    factor_x, factor_y = target[0] / rgb.shape[1], target[1] / rgb.shape[0]
    scaled = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA if factor_x < 1 else cv2.INTER_CUBIC)
    x, y, w, h = face.box
    face = Face(box=(x * factor_x, y * factor_y, w * factor_x, h * factor_y),
                landmarks=[(px * factor_x, py * factor_y) for px, py in face.landmarks], score=face.score)
    return np.ascontiguousarray(scaled), face


# -- the pipeline -------------------------------------------------------------------------------
@dataclass
class _Loaded:
    context: PipelineContext
    settings: dict[str, Any]
    detector: FaceDetector
    lipsync: LipSync | None
    restorer: FaceRestorer | None = None
    kokoro: KokoroTTS | None = None
    head: HeadMotion | None = None


class TalkPipeline:
    """Portrait + text or audio -> a lip-synced MP4."""

    def __init__(self, detector_factory: Callable[[Path], FaceDetector] | None = None,
                 tts: list[TextToSpeech] | None = None) -> None:
        self._detector_factory = detector_factory
        self._tts = tts
        self._loaded: _Loaded | None = None

    def load(self, context: PipelineContext) -> None:
        """Opens the face detector (required), and the lip-sync model and face restorer when installed."""
        settings = {**DEFAULTS, **{k: v for k, v in context.settings.items() if k in DEFAULTS}}
        engines_from_settings(settings)  # an unknown engine name fails here, not in the first job
        yunet = _model_path(context, "yunet", "selfie")
        if yunet is None:
            raise ModelNotInstalled(model="yunet", feature="selfie", pull_command="facechain-bot models pull selfie")
        if self._detector_factory is not None:
            detector = self._detector_factory(yunet)
        else:
            from facechain_core.faces import create_detector

            detector = create_detector("yunet", yunet)
        lipsync_path = _model_path(context, LIPSYNC_MODEL, FEATURE)
        lipsync = None
        if lipsync_path is not None:
            lipsync = LipSync.open(lipsync_path, context.device, int(settings["talk_threads"]))
        else:
            log.info("talk: no lip-sync model (`facechain-bot models pull talk`); the landmark mouth warp runs")
        restorer = None
        if lipsync is not None and _wants_restorer(settings, context.device):
            restore_path = _model_path(context, RESTORE_MODEL, RESTORE_FEATURE)
            if restore_path is not None:
                restorer = FaceRestorer.open(restore_path, context.device, int(settings["talk_threads"]))
            elif settings["talk_restore"] == "on":
                log.warning("talk: talk_restore is on but the restorer is not installed "
                            "(`facechain-bot models pull %s`)", RESTORE_FEATURE)
        kokoro_files = installed_files(lambda name: _model_path(context, name, VOICES_FEATURE))
        kokoro = KokoroTTS(kokoro_files, context.device, int(settings["talk_threads"])) if kokoro_files else None
        if kokoro is None:
            log.info("talk: no Kokoro voices (`facechain-bot models pull %s`); espeak-ng speaks", VOICES_FEATURE)
        head = _head_motion(context, settings)
        self._loaded = _Loaded(context, settings, detector, lipsync, restorer, kokoro, head)

    def close(self) -> None:
        self._loaded = None

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Speaks, animates and encodes; returns the MP4 with what ran in its meta."""
        loaded = self._loaded
        if loaded is None:
            raise RuntimeError("TalkPipeline.run before load")
        settings = loaded.settings
        if params.get("sample"):
            return self._sample(params, progress)
        round_video = bool(params.get("round", False))
        max_seconds = float(settings["talk_max_seconds"])
        if round_video:
            max_seconds = min(max_seconds, ROUND_MAX_SECONDS)
        progress(0, 4, "talk.step_speech")
        # 1. speech
        speech, voice = self._speech(params, settings, max_seconds)
        if speech.duration_s > max_seconds + 0.05:
            raise UserFacingError("talk.too_long", seconds=round(speech.duration_s), max_seconds=round(max_seconds))
        progress(1, 4, "talk.step_face")
        # 2. portrait and face
        data = Path(params["image"]).read_bytes()
        rgb = np.asarray(decode_image(data, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS))
        faces = loaded.detector.detect(rgb)
        if not faces:
            raise UserFacingError("talk.no_face")
        portrait, face = fit_for_chat(rgb, faces[0], int(settings["talk_max_side"]),
                                      int(settings["talk_round_side"]) if round_video else None)
        progress(2, 4, "talk.step_frames")
        # 3. frames
        level = str(params.get("motion") or settings["talk_motion_level"])
        head, mels = None, None
        if loaded.head is not None:
            mels = mel_windows(mel_spectrogram(resample(speech, SAMPLE_RATE).samples), frame_count(speech.duration_s))
            head = HeadTrack.predict(loaded.head, mels, face, portrait.shape, level, int(settings["talk_pose_style"]))
        frames = animate_frames(portrait, face, speech, loaded.lipsync, bool(settings["talk_motion"]),
                                restorer=loaded.restorer, restore_weight=float(settings["talk_restore_weight"]),
                                head=head, mels=mels)
        progress(3, 4, "talk.step_video")
        # 4. the video, encoded as the frames come
        out = Path(params["out"]) if params.get("out") else Path(params["out_dir"]) / "talk.mp4"
        count = encode_mp4(frames, speech, out, label_text(service_name(loaded.context), "video"))
        progress(4, 4)
        animator = loaded.lipsync.name if loaded.lipsync is not None else "landmarks"
        mode = "animated" if head is not None else "fast"
        log.info("talk: %d frames, %.2f s, %s, %s mode, %s", count, speech.duration_s, animator, mode, voice)
        return JobResult(files=[out.resolve()], meta={
            "animator": animator, "voice": voice, "duration_s": round(speech.duration_s, 3), "frames": count,
            "mode": mode, "motion": level if head is not None else ("sway" if settings["talk_motion"] else "none"),
            "round": round_video, "size": [portrait.shape[1], portrait.shape[0]],
            "restored": loaded.restorer is not None,
        })

    def _speech(self, params: dict[str, Any], settings: dict[str, Any], max_seconds: float) -> tuple[Speech, str]:
        if params.get("audio"):
            return decode_audio(Path(params["audio"]), TRACK_RATE, max_seconds), "audio"
        text = str(params.get("text") or "").strip()
        if not text:
            raise UserFacingError("talk.nothing_to_say")
        speech, name = speak(text, str(params.get("language") or "en"), self._engines(), params.get("voice") or None)
        return speech, name

    def _engines(self) -> list[TextToSpeech]:
        loaded = self._loaded
        assert loaded is not None
        return self._tts if self._tts is not None else engines_from_settings(loaded.settings, loaded.kokoro)

    def _sample(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """A voice's sample for /voice: `text` spoken with `voice`, as an OGG/Opus voice message."""
        progress(0, 1, "talk.step_speech")
        speech, engine = speak(str(params["text"]), str(params.get("language") or "en"), self._engines(),
                               params.get("voice") or None)
        out = Path(params["out"]) if params.get("out") else Path(params["out_dir"]) / "sample.ogg"
        encode_voice_message(speech, out)
        progress(1, 1)
        return JobResult(files=[out.resolve()], meta={"engine": engine, "voice": speech.voice or engine,
                                                      "duration_s": round(speech.duration_s, 3)})


def _wants_restorer(settings: dict[str, Any], device: str) -> bool:
    """Whether to restore faces: "on", or "auto" where onnxruntime runs it on the GPU (on a CPU it costs
    about a second a frame; a cuda worker whose onnxruntime lacks CUDA would run it there too)."""
    mode = str(settings["talk_restore"])
    if mode not in RESTORE_MODES:
        raise ValueError(f"talk_restore must be one of {', '.join(RESTORE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    on_gpu = providers_for(device)[0] != "CPUExecutionProvider"
    if device.startswith("cuda") and not on_gpu:
        log.info("talk: no face restoration (talk_restore auto): this onnxruntime has no CUDA provider "
                 "(install onnxruntime-gpu, or set talk_restore = \"on\" to run it on the CPU)")
    return on_gpu


def _head_motion(context: PipelineContext, settings: dict[str, Any]) -> HeadMotion | None:
    """The audio-to-pose model when the mode asks for it ("animated", or "auto" on a GPU) and it is installed."""
    mode, level = str(settings["talk_mode"]), str(settings["talk_motion_level"])
    if mode not in TALK_MODES:
        raise ValueError(f"talk_mode must be one of {', '.join(TALK_MODES)}, got {mode!r}")
    if level not in MOTION_LEVELS:
        raise ValueError(f"talk_motion_level must be one of {', '.join(MOTION_LEVELS)}, got {level!r}")
    if mode == "fast" or (mode == "auto" and not context.device.startswith("cuda")):
        if mode == "auto":
            log.info("talk: fast mode (talk_mode auto on %s; the animated mode runs on a GPU)", context.device)
        return None
    path = _model_path(context, MOTION_MODEL, MOTION_FEATURE)
    if path is None:
        log.info("talk: no head-motion model (`facechain-bot models pull %s --accept-license ...`); fast mode",
                 MOTION_FEATURE)
        return None
    return HeadMotion.open(path, context.device)


def _model_path(context: PipelineContext, name: str, feature: str) -> Path | None:
    try:
        return context.model_path(name, feature)
    except ModelNotInstalled:
        return None
    except (KeyError, ValueError):
        return None
