"""Head motion from the audio: SadTalker's audio-to-pose network (a conditional VAE), run by our own code.

The published checkpoint (``auido2pose_00140-model.pth``, SadTalker v0.0.2, Apache-2.0) holds a torch
state dict under ``model``: ``audio_encoder.audio_encoder.*`` (Wav2Lip's audio encoder: 80x16 mel
windows to a 512-vector a frame), ``netG.decoder.*`` (the CVAE decoder: latent + pose style + audio
to 32 frames of pose motion) and, unused here, the training-only ``netG.encoder.*`` and
``netD_motion.*``. The classes below rebuild the decoder path with the same module names, so that
state dict loads into them unchanged; the sizes are parameters only so tests can build a small one.

Inference, as SadTalker's: the first frame is the reference pose; the others go in windows of 32
frames (the last window overlaps the one before), each with its own latent ``z ~ N(0, 1)``; the
motion is smoothed (Savitzky-Golay, 13 frames, order 2). A pose is 6 numbers: pitch, yaw, roll
(radians) and a translation (x, y, z) of the 3D face model. Our reference is the frontal pose at
the origin (we fit no 3D face), so the predicted motion is the pose.

How it reaches the picture is ours (``facechain_core.talk``): no 3D face model and no neural renderer,
but a smooth warp of the head region by each frame's pose (``head_warp``), over the Wav2Lip mouth and
the blinks. Expression beyond the mouth and the eyes is not animated.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

FEATURE = "talk-motion"
MODEL = "sadtalker-audio2pose"
SEQ_LEN = 32
LATENT = 64
POSE_STYLES = 46  # the pose classes SadTalker was trained with (its pose_style 0..45)
MOTION_LEVELS = {"still": 0.0, "natural": 1.0, "lively": 1.6}


@dataclass(frozen=True)
class PoseNetSize:
    """The widths of the network; ``full`` is the published one."""

    audio: tuple[int, ...] = (32, 64, 128, 256, 512)
    unet: tuple[int, ...] = (32, 64, 128, 256)
    mlp: tuple[int, ...] = (128, 192)

    @classmethod
    def full(cls) -> PoseNetSize:
        return cls()


def build_pose_net(size: PoseNetSize | None = None):  # -> torch.nn.Module
    """The audio encoder and CVAE decoder of SadTalker's Audio2Pose, module names as in its checkpoint."""
    import torch
    from torch import nn

    size = size or PoseNetSize.full()

    class ConvUnit(nn.Module):
        def __init__(self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int], padding: int,
                     residual: bool = False) -> None:
            super().__init__()
            self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
            self.residual = residual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv_block(x)
            return torch.relu(out + x if self.residual else out)

    def audio_encoder() -> nn.Sequential:
        a, b, c, d, e = size.audio
        # 80x16 -> 1x1: the strides fold the mel bands by 3, 3, 3 and the columns by 2, then a 3x3 valid conv.
        return nn.Sequential(
            ConvUnit(1, a, 3, 1, 1), ConvUnit(a, a, 3, 1, 1, True), ConvUnit(a, a, 3, 1, 1, True),
            ConvUnit(a, b, 3, (3, 1), 1), ConvUnit(b, b, 3, 1, 1, True), ConvUnit(b, b, 3, 1, 1, True),
            ConvUnit(b, c, 3, 3, 1), ConvUnit(c, c, 3, 1, 1, True), ConvUnit(c, c, 3, 1, 1, True),
            ConvUnit(c, d, 3, (3, 2), 1), ConvUnit(d, d, 3, 1, 1, True),
            ConvUnit(d, e, 3, 1, 0), ConvUnit(e, e, 1, 1, 0))

    class ResidualConv(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int | tuple[int, int]) -> None:
            super().__init__()
            self.conv_block = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, 1),
                nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
            self.conv_skip = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_block(x) + self.conv_skip(x)

    class Upsample(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.upsample = nn.ConvTranspose2d(channels, channels, kernel_size=(2, 1), stride=(2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.upsample(x)

    class ResUnet(nn.Module):
        """A U-Net over the (frames x 6) pose map, halving and restoring the frame axis three times."""

        def __init__(self) -> None:
            super().__init__()
            f0, f1, f2, f3 = size.unet
            self.input_layer = nn.Sequential(nn.Conv2d(1, f0, 3, padding=1), nn.BatchNorm2d(f0), nn.ReLU(),
                                             nn.Conv2d(f0, f0, 3, padding=1))
            self.input_skip = nn.Sequential(nn.Conv2d(1, f0, 3, padding=1))
            self.residual_conv_1 = ResidualConv(f0, f1, (2, 1))
            self.residual_conv_2 = ResidualConv(f1, f2, (2, 1))
            self.bridge = ResidualConv(f2, f3, (2, 1))
            self.upsample_1, self.up_residual_conv1 = Upsample(f3), ResidualConv(f3 + f2, f2, 1)
            self.upsample_2, self.up_residual_conv2 = Upsample(f2), ResidualConv(f2 + f1, f1, 1)
            self.upsample_3, self.up_residual_conv3 = Upsample(f1), ResidualConv(f1 + f0, f0, 1)
            self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1 = self.input_layer(x) + self.input_skip(x)
            x2 = self.residual_conv_1(x1)
            x3 = self.residual_conv_2(x2)
            up = self.up_residual_conv1(torch.cat([self.upsample_1(self.bridge(x3)), x3], 1))
            up = self.up_residual_conv2(torch.cat([self.upsample_2(up), x2], 1))
            up = self.up_residual_conv3(torch.cat([self.upsample_3(up), x1], 1))
            return self.output_layer(up)

    class Decoder(nn.Module):
        """z + pose-style bias, the reference pose and the audio -> motion of SEQ_LEN frames."""

        def __init__(self) -> None:
            super().__init__()
            self.resunet = ResUnet()
            self.MLP = nn.Sequential()
            sizes = [LATENT + SEQ_LEN * 6 + 6, *size.mlp]
            for i, (cin, cout) in enumerate(zip(sizes[:-1], sizes[1:])):
                self.MLP.add_module(f"L{i}", nn.Linear(cin, cout))
                self.MLP.add_module(f"A{i}" if i + 2 < len(sizes) else "sigmoid",
                                    nn.ReLU() if i + 2 < len(sizes) else nn.Sigmoid())
            self.pose_linear = nn.Linear(6, 6)
            self.linear_audio = nn.Linear(size.audio[-1], 6)
            self.classbias = nn.Parameter(torch.randn(POSE_STYLES, LATENT))

        def forward(self, z: torch.Tensor, style: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
            batch = z.shape[0]
            audio_out = self.linear_audio(audio).reshape(batch, -1)
            x = self.MLP(torch.cat([ref, z + self.classbias[style], audio_out], -1)).reshape(batch, SEQ_LEN, -1)
            return self.pose_linear(self.resunet(x.unsqueeze(1)).squeeze(1))

    class CVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder()

    class PoseNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.audio_encoder = nn.Module()
            self.audio_encoder.audio_encoder = audio_encoder()
            self.netG = CVAE()

        def embed(self, mels: torch.Tensor) -> torch.Tensor:
            """Mel windows (T, 1, 80, 16) -> audio embeddings (T, width)."""
            return self.audio_encoder.audio_encoder(mels).flatten(1)

        def forward(self, mels: torch.Tensor, z: torch.Tensor, style: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            """SEQ_LEN mel windows (SEQ_LEN, 1, 80, 16) -> pose motion (1, SEQ_LEN, 6)."""
            return self.netG.decoder(z, style, ref, self.embed(mels)[None])

    return PoseNet()


class HeadMotion:
    """Predicts a pose per video frame from the mel windows the lip sync uses."""

    name = "sadtalker-audio2pose"

    def __init__(self, net, device: str = "cpu") -> None:  # type: ignore[no-untyped-def]
        self.net = net.eval().to(device)
        self.device = device

    @classmethod
    def open(cls, path: Path, device: str = "cpu", size: PoseNetSize | None = None) -> HeadMotion:
        """Loads the published checkpoint (or one of its layout): only the encoder and decoder keys."""
        import torch

        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint)
        net = build_pose_net(size or size_of(state))
        wanted = net.state_dict()
        missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise ValueError(f"{path} is not an audio2pose checkpoint: missing {missing[:3]} and {len(missing)} more")
        net.load_state_dict({k: state[k] for k in wanted if k in state}, strict=False)
        return cls(net, device)

    def poses(self, mels: np.ndarray, style: int = 0, seed: int = 0) -> np.ndarray:
        """A (frames, 6) pose track for mel windows (frames, 1, 80, 16); frame 0 is the reference."""
        import torch

        frames = len(mels)
        if not 0 <= style < POSE_STYLES:
            raise ValueError(f"pose style must be in 0..{POSE_STYLES - 1}, got {style}")
        out = np.zeros((frames, 6), np.float32)
        rest = frames - 1
        if rest <= 0:
            return out
        generator = torch.Generator().manual_seed(seed)
        ref = torch.zeros(1, 6, device=self.device)
        style_t = torch.tensor([style], device=self.device)
        usable = torch.from_numpy(np.ascontiguousarray(mels[1:], np.float32))
        starts = list(range(0, rest - SEQ_LEN + 1, SEQ_LEN)) or [0]
        if starts[-1] + SEQ_LEN < rest:
            starts.append(rest - SEQ_LEN)  # the last window overlaps the one before, as SadTalker's
        done = 0
        with torch.inference_mode():
            for start in starts:
                window = usable[start:start + SEQ_LEN]
                if len(window) < SEQ_LEN:  # a clip shorter than a window: repeat its first frame before it
                    window = torch.cat([window[:1].repeat(SEQ_LEN - len(window), 1, 1, 1), window])
                z = torch.randn(1, LATENT, generator=generator).to(self.device)
                motion = self.net(window.to(self.device), z, style_t, ref)[0].float().cpu().numpy()
                take = min(SEQ_LEN, rest - done)
                tail = start < done or rest < SEQ_LEN  # the overlapping last window, or a padded short one
                out[1 + done:1 + done + take] = motion[SEQ_LEN - take:] if tail else motion[:take]
                done += take
        return smooth(out)


def size_of(state: dict) -> PoseNetSize:
    """The widths a checkpoint was built with (the published one: ``PoseNetSize.full()``)."""
    audio = tuple(int(state[f"audio_encoder.audio_encoder.{i}.conv_block.0.weight"].shape[0]) for i in (0, 3, 6, 9, 11))
    unet = (int(state["netG.decoder.resunet.input_skip.0.weight"].shape[0]),
            *(int(state[f"netG.decoder.resunet.{name}.conv_skip.0.weight"].shape[0])
              for name in ("residual_conv_1", "residual_conv_2", "bridge")))
    mlp = tuple(int(state[f"netG.decoder.MLP.L{i}.weight"].shape[0]) for i in range(2))
    return PoseNetSize(audio=audio, unet=unet, mlp=mlp)  # type: ignore[arg-type]


def smooth(track: np.ndarray, window: int = 13, order: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing along the frames (the window shrinks, odd, for short tracks)."""
    frames = len(track)
    window = min(window, frames if frames % 2 else frames - 1)
    if window <= order:
        return track
    half = window // 2
    values = track.astype(np.float64)
    # Each frame: the least-squares polynomial over the window around it, evaluated there (one filter);
    # the first and last half windows take the polynomial fitted to the window at the track's end.
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.linalg.pinv(np.vander(offsets, order + 1, increasing=True))[0]
    out = values.copy()
    for k in range(values.shape[1]):
        out[half:frames - half, k] = np.convolve(values[:, k], weights[::-1], mode="valid")
    positions = np.arange(window, dtype=np.float64)
    for rows, at in ((slice(0, window), slice(0, half)), (slice(frames - window, frames), slice(window - half, window))):
        fitted = np.polynomial.polynomial.polyfit(positions, values[rows], order)
        edge = np.polynomial.polynomial.polyval(positions[at], fitted).T
        out[rows][at] = edge
    return out.astype(track.dtype)


def blink_track(frames: int, fps: int, seed: int) -> np.ndarray:
    """How closed the eyes are per frame: a blink (5 frames at 25 fps) every 2 to 5 s, at random times."""
    rng = np.random.default_rng(seed)
    shape = np.array([0.5, 0.9, 1.0, 0.9, 0.5], np.float32)
    track = np.zeros(frames, np.float32)
    at = int(rng.uniform(0.4, 2.0) * fps)
    while at + len(shape) <= frames:
        track[at:at + len(shape)] = shape
        at += len(shape) + int(rng.uniform(2.0, 5.0) * fps)
    return track


def pose_matrix(pose: np.ndarray, centre: tuple[float, float], face_size: float) -> np.ndarray:
    """The 2x3 affine moving the head for one pose: roll turns it about `centre`, yaw and pitch shift it
    (the head's front swings by sin(angle) of its radius) and foreshorten it, translation moves it."""
    pitch, yaw, roll, tx, ty, tz = (float(v) for v in pose)
    radius = face_size / 2
    scale = 1.0 + 0.5 * tz
    cx, cy = centre
    rotation = cv2.getRotationMatrix2D((cx, cy), math.degrees(roll), scale)
    squeeze = np.array([[math.cos(yaw), 0.0, cx * (1 - math.cos(yaw))],
                        [0.0, math.cos(pitch), cy * (1 - math.cos(pitch))], [0.0, 0.0, 1.0]])
    matrix = rotation @ squeeze
    matrix[0, 2] += radius * math.sin(yaw) + tx * face_size
    matrix[1, 2] += -radius * math.sin(pitch) - ty * face_size
    return matrix


def head_warp(frame: np.ndarray, matrix: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Moves the head by `matrix` where `weight` (HxW, 1 on the head fading to 0 around it) says so;
    the rest of the frame stays. A continuous displacement field, so nothing tears."""
    height, width = frame.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    inverse = cv2.invertAffineTransform(matrix.astype(np.float64))
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    map_x = (xs + (src_x - xs) * weight).astype(np.float32)
    map_y = (ys + (src_y - ys) * weight).astype(np.float32)
    return cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def head_weight(shape: tuple[int, ...], centre: tuple[float, float], face_size: float) -> np.ndarray:
    """1 over the head (an ellipse 1.6 face sizes tall around `centre`), fading to 0 by twice that."""
    height, width = shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rx, ry = face_size * 0.75, face_size * 0.95
    distance = np.sqrt(((xs - centre[0]) / rx) ** 2 + ((ys - centre[1]) / ry) ** 2)
    fade = np.clip(2.0 - distance, 0.0, 1.0)
    return (fade * fade * (3 - 2 * fade)).astype(np.float32)  # smoothstep
