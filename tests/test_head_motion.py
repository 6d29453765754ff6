"""The animated mode: SadTalker's audio-to-pose network (our code, a small random checkpoint in its published
layout) moves the head by the audio; the Wav2Lip mouth and the blinks ride along; the MP4 is right."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from facechain_core.faces import Face, YuNetDetector
from facechain_core.head_motion import SEQ_LEN, HeadMotion, build_pose_net, size_of, smooth
from facechain_core.pipeline import PipelineContext
from facechain_core.talk import (
    FPS, HeadTrack, LipSync, TalkPipeline, animate, fit_for_chat, mel_spectrogram, mel_windows,
)
from facechain_core.tiny.head_motion import build_audio2pose
from facechain_core.tiny.talk import build_lipsync
from facechain_core.tts import Speech
from tests.fixtures.progress import StepRecorder

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def motion_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("motion")
    return {"sadtalker-audio2pose": build_audio2pose(out / "a2p.pth"), "wav2lip-gan-onnx": build_lipsync(out / "w.onnx")}


@pytest.fixture(scope="module")
def head(motion_files: dict[str, Path]) -> HeadMotion:
    import torch

    torch.set_num_threads(1)
    return HeadMotion.open(motion_files["sadtalker-audio2pose"])


@pytest.fixture
def portrait(faces_dir: Path, yunet_path: Path) -> tuple[np.ndarray, Face]:
    image = np.asarray(Image.open(faces_dir / "obama.jpg").convert("RGB"))
    face = YuNetDetector(yunet_path).detect(image)[0]
    return fit_for_chat(image, face, 256, None)


def _voice(seconds: float, seed: int, rate: int = 16_000) -> Speech:
    """Speech-like noise: bursts at a per-seed syllable rate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(1.5, 4.0) * t + rng.uniform(0, 6)), 0, None) ** 2
    return Speech((envelope * rng.normal(0, 0.3, len(t))).astype(np.float32), rate)


def _mels(speech: Speech) -> np.ndarray:
    frames = round(speech.duration_s * FPS)
    return mel_windows(mel_spectrogram(speech.samples), frames)


def test_the_checkpoint_layout_is_sadtalkers_and_loads_back(motion_files: dict[str, Path]) -> None:
    import torch

    state = torch.load(motion_files["sadtalker-audio2pose"], weights_only=True)["model"]
    assert "audio_encoder.audio_encoder.12.conv_block.0.weight" in state  # 13 conv units, as Wav2Lip's encoder
    assert state["netG.decoder.MLP.L0.weight"].shape[1] == 64 + SEQ_LEN * 6 + 6
    assert state["netG.decoder.classbias"].shape == (46, 64)
    full = build_pose_net().state_dict()
    assert set(full) == set(state) and size_of(full) == size_of(full)
    assert full["audio_encoder.audio_encoder.11.conv_block.0.weight"].shape == (512, 256, 3, 3)


def test_different_audio_gives_different_head_pose_tracks_and_still_none(head: HeadMotion,
                                                                          portrait: tuple[np.ndarray, Face]) -> None:
    image, face = portrait
    a, b = _mels(_voice(3.0, 1)), _mels(_voice(3.0, 2))
    assert len(a) == len(b) == 75
    poses_a, poses_b = head.poses(a), head.poses(b)
    assert poses_a.shape == (75, 6) and np.abs(poses_a).max() < 0.3
    assert np.abs(poses_a - poses_b).mean() > 1e-3  # the audio drives the pose
    assert np.abs(np.diff(poses_a[1:], axis=0)).mean() > 1e-4  # it moves over time
    np.testing.assert_array_equal(head.poses(a), poses_a)  # the same clip, the same track
    still = HeadTrack.predict(head, a, face, image.shape, "still")
    assert not still.poses.any()
    lively = HeadTrack.predict(head, a, face, image.shape, "lively")
    natural = HeadTrack.predict(head, a, face, image.shape, "natural")
    np.testing.assert_allclose(lively.poses, natural.poses * 1.6, rtol=1e-5)
    line = np.linspace(0, 1, 40)[:, None].repeat(6, 1).astype(np.float32)
    np.testing.assert_allclose(smooth(line), line, atol=1e-5)  # smoothing keeps a straight motion


def test_still_keeps_the_head_and_the_frame_count_follows_the_audio(head: HeadMotion,
                                                                     portrait: tuple[np.ndarray, Face]) -> None:
    image, face = portrait
    speech = _voice(2.02, 3)
    track = HeadTrack.predict(head, _mels(speech), face, image.shape, "still")
    frames = animate(image, face, speech, None, motion=True, head=track)
    assert abs(len(frames) - speech.duration_s * FPS) <= 1
    x, y, w, h = face.box
    # Without a pose only the mouth and the eyes change: the forehead and the edges keep their pixels,
    # so the fast mode's procedural sway (which moves the whole frame) is off.
    forehead = (slice(int(y), int(y + h * 0.15)), slice(int(x), int(x + w)))
    for frame in frames:
        assert np.array_equal(frame[forehead], image[forehead])
        assert np.array_equal(frame[:, :8], image[:, :8])


def test_the_face_region_follows_the_landmarks(head: HeadMotion, portrait: tuple[np.ndarray, Face]) -> None:
    image, face = portrait
    speech = _voice(2.0, 4)
    track = HeadTrack.predict(head, _mels(speech), face, image.shape, "natural")
    track.poses[:] = 0
    track.poses[10] = [0.0, 0.15, 0.12, 0.02, 0.0, 0.0]  # a clear turn and tilt at frame 10
    track.blinks[:] = 0
    frames = animate(image, face, speech, None, motion=False, head=track)
    matrix = track.matrix(10)
    nose = np.array(face.landmarks[2], np.float64)
    moved = matrix[:, :2] @ nose + matrix[:, 2]
    assert np.linalg.norm(moved - nose) > 4  # the pose moves the nose by pixels

    def patch(frame: np.ndarray, at: np.ndarray) -> np.ndarray:
        cx, cy = (int(round(v)) for v in at)
        return frame[cy - 3:cy + 4, cx - 3:cx + 4].astype(float)

    followed = np.abs(patch(frames[10], moved) - patch(image, nose)).mean()
    stayed = np.abs(patch(frames[10], nose) - patch(image, nose)).mean()
    assert followed < 6 and followed < stayed / 2
    x, y, w, h = face.box
    forehead = (slice(int(y), int(y + h * 0.15)), slice(int(x), int(x + w)))
    assert np.array_equal(frames[9][forehead], image[forehead])  # no pose at frame 9: the head is where it was


def _streams(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return {"frames": sum(1 for _ in container.decode(video=0)), "codecs": (video.codec_context.name,
                audio.codec_context.name), "video_s": float(video.duration * video.time_base),
                "audio_s": float(audio.duration * audio.time_base)}


def test_the_animated_pipeline_writes_h264_and_aac_of_the_speechs_length(
        tmp_path: Path, faces_dir: Path, yunet_path: Path, motion_files: dict[str, Path]) -> None:
    paths = {"yunet": str(yunet_path), **{k: str(v) for k, v in motion_files.items()}}
    pipeline = TalkPipeline()
    pipeline.load(PipelineContext(models_dir=tmp_path, settings={
        "model_paths": paths, "talk_mode": "animated", "talk_max_side": 256, "talk_threads": 1}))
    voice = tmp_path / "voice.wav"
    speech = _voice(2.5, 5, 16_000)
    with av.open(str(voice), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000, layout="mono")
        frame = av.AudioFrame.from_ndarray((speech.samples[None] * 32767).astype(np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 16_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    result = pipeline.run({"image": str(faces_dir / "obama.jpg"), "audio": str(voice),
                           "out": str(tmp_path / "a.mp4")}, StepRecorder())
    assert result.meta["mode"] == "animated" and result.meta["motion"] == "natural"
    assert result.meta["animator"] == "wav2lip"
    info = _streams(result.files[0])
    assert info["codecs"] == ("h264", "aac") and info["frames"] == result.meta["frames"]
    assert abs(info["frames"] - 2.5 * FPS) <= 1
    assert abs(info["video_s"] - 2.5) <= 1 / FPS + 0.01 and abs(info["audio_s"] - 2.5) <= 1 / FPS + 0.01
    # auto on a CPU: the fast mode, even with the model installed
    fast = TalkPipeline()
    fast.load(PipelineContext(models_dir=tmp_path, settings={"model_paths": paths, "talk_max_side": 160}))
    result = fast.run({"image": str(faces_dir / "obama.jpg"), "audio": str(voice), "motion": "still",
                       "out": str(tmp_path / "f.mp4")}, StepRecorder())
    assert result.meta["mode"] == "fast" and result.meta["motion"] == "sway"
    with pytest.raises(ValueError, match="talk_mode"):
        TalkPipeline().load(PipelineContext(models_dir=tmp_path, settings={"model_paths": paths,
                                                                           "talk_mode": "cinematic"}))
    assert isinstance(LipSync.open(motion_files["wav2lip-gan-onnx"]), LipSync)


async def test_talk_flags_set_the_motion_level_of_the_job() -> None:
    from types import SimpleNamespace

    import handlers.talk as talk

    submitted: list[dict[str, Any]] = []

    async def submit(services: Any, event: Any, channel: Any, folder: Path, speech: dict[str, Any],
                     round_video: bool) -> None:
        submitted.append({**speech, "round": round_video})

    async def source(services: Any, event: Any) -> Any:
        return None

    async def stage(services: Any, user_key: str, src: Any) -> Path:
        return Path("/nowhere")

    storage = SimpleNamespace(user_voice=lambda key: _none())
    services = SimpleNamespace(storage=storage)
    event = SimpleNamespace(args=["round", "--lively", "Hello", "there"], language="en",
                            user=SimpleNamespace(key="telegram:1"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(talk, "submit_talk", submit)
        patch.setattr(talk, "portrait_source", source)
        patch.setattr(talk, "stage_portrait", stage)
        await talk.make_talk(services, event, None)  # type: ignore[arg-type]
        event.args = ["--still", "still", "waters"]
        await talk.make_talk(services, event, None)  # type: ignore[arg-type]
    assert submitted[0] == {"text": "Hello there", "language": "en", "motion": "lively", "round": True}
    assert submitted[1] == {"text": "still waters", "language": "en", "motion": "still", "round": False}


async def _none() -> None:
    return None
