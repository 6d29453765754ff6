"""The talking-head engine: offline speech, Wav2Lip features, the paste-back, the landmark fallback, the MP4."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from facechain_core.errors import UserFacingError
from facechain_core.faces import Face, YuNetDetector
from facechain_core.pipeline import PipelineContext
from facechain_core.safety import label_text
from facechain_core.talk import (
    FPS, FaceGeometry, LipSync, TalkPipeline, animate, fit_for_chat, loudness, lower_face_mask,
    mel_spectrogram, mel_windows,
)
from facechain_core.tiny.talk import CONSTANT_BGR, build_lipsync
from facechain_core.tts import (
    OFFLINE_VOICE, EdgeTTS, EspeakTTS, Speech, decode_audio, engines_from_settings, rms, speak,
)
from tests.fixtures.progress import StepRecorder

pytestmark = pytest.mark.timeout(60)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def portrait(faces_dir: Path, yunet_path: Path) -> tuple[np.ndarray, Face]:
    image = np.asarray(Image.open(faces_dir / "obama.jpg").convert("RGB"))
    face = YuNetDetector(yunet_path).detect(image)[0]
    return fit_for_chat(image, face, 320, None)


@pytest.fixture(scope="module")
def speech() -> Speech:
    return EspeakTTS().synthesize("Hello everyone, look at me talk.")


def _tone_bursts(seconds: float, rate: int = 16_000) -> tuple[np.ndarray, np.ndarray]:
    """Noise whose loudness follows a slow envelope; returns (samples, envelope per sample)."""
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.clip(np.sin(2 * np.pi * 1.3 * t), 0, None) ** 2
    noise = np.random.default_rng(0).normal(0, 0.3, len(t))
    return (envelope * noise).astype(np.float32), envelope


def test_the_offline_engine_takes_over_when_the_online_one_fails() -> None:
    edge = EdgeTTS(proxy=f"http://127.0.0.1:{closed_port()}", timeout_s=2)
    speech, engine = speak("Hello there, this is a test.", "en", [edge, EspeakTTS()])
    assert engine == "espeak-ng"
    assert speech.duration_s > 0.5
    assert rms(speech.samples) > 0.02  # speech, not silence
    chinese, _ = speak("大家好", "zh", [EspeakTTS()])
    assert rms(chinese.samples) > 0.02
    with pytest.raises(UserFacingError) as failed:
        speak("Hello", "en", [edge])
    assert failed.value.code == "talk.tts_failed"
    assert [e.name for e in engines_from_settings({"talk_tts": ["edge", "espeak"]})] == ["edge-tts", "espeak-ng"]
    assert [e.name for e in engines_from_settings({})] == ["espeak-ng"]  # nothing leaves the server by default
    with pytest.raises(ValueError, match="unknown engine"):
        engines_from_settings({"talk_tts": ["cloud"]})


def test_a_chosen_voice_reaches_the_online_engine_and_offline_skips_it() -> None:
    asked: list[str | None] = []

    class RecordingEdge(EdgeTTS):
        def synthesize(self, text: str, language: str = "en", voice: str | None = None) -> Speech:
            asked.append(voice)
            return Speech(np.full(2400, 0.1, np.float32), 24_000)

    speech, engine = speak("Hello", "en", [RecordingEdge(), EspeakTTS()], voice="en-GB-RyanNeural")
    assert engine == "edge-tts" and asked == ["en-GB-RyanNeural"]
    speech, engine = speak("Hello", "en", [RecordingEdge(), EspeakTTS()], voice=OFFLINE_VOICE)
    assert engine == "espeak-ng" and asked == ["en-GB-RyanNeural"] and rms(speech.samples) > 0.02
    _, engine = speak("Hello", "en", [EspeakTTS()], voice="en-GB-RyanNeural")  # edge switched off since
    assert engine == "espeak-ng"
    assert "en-GB-RyanNeural" in EdgeTTS.LANGUAGE_VOICES["en"] and EdgeTTS.VOICES["zh"] in EdgeTTS.LANGUAGE_VOICES["zh"]


def test_mel_windows_have_wav2lips_shape_and_follow_the_frames() -> None:
    rate = 16_000
    samples = np.zeros(2 * rate, np.float32)
    burst = slice(int(1.2 * rate), int(1.3 * rate))
    samples[burst] = np.sin(2 * np.pi * 440 * np.arange(burst.stop - burst.start) / rate) * 0.5
    mel = mel_spectrogram(samples)
    assert mel.shape == (80, 2 * 80 + 1)  # 80 columns a second
    assert mel.min() >= -4 and mel.max() <= 4
    windows = mel_windows(mel, 2 * FPS)
    assert windows.shape == (50, 1, 80, 16)
    # The burst at 1.2..1.3 s is in the first column of frame 30 (1.2 s at 25 fps) and not in frame 20's window.
    assert windows[30, 0, :, 0].max() > windows[20, 0].max() + 1
    assert np.array_equal(windows[30, 0], mel[:, 96:112])


def test_the_models_patch_lands_in_the_mouth_box_and_nothing_else_changes(
        tmp_path: Path, portrait: tuple[np.ndarray, Face], speech: Speech) -> None:
    image, face = portrait
    model = LipSync.open(build_lipsync(tmp_path / "constant.onnx", constant=True))
    frames = animate(image, face, speech, model, motion=False)
    geometry = FaceGeometry.of(face, image.shape)
    mask = lower_face_mask(image.shape, geometry)
    x0, y0, x1, y1 = geometry.crop
    mx, my = (int(v) for v in geometry.mouth)
    assert mask[my, mx] == pytest.approx(1.0) and y0 <= my < y1 and x0 <= mx < x1
    colour = np.array(CONSTANT_BGR[::-1]) * 255  # the model speaks BGR
    assert len(frames) == round(speech.duration_s * FPS)
    for frame in frames:
        assert np.array_equal(frame[mask == 0], image[mask == 0])
        inside = mask > 0.999
        assert inside.sum() > 100 and np.abs(frame[inside].astype(float) - colour).max() <= 1.5
        assert frame[:y0 + (y1 - y0) // 3].tobytes() == image[:y0 + (y1 - y0) // 3].tobytes()  # eyes untouched


def test_silence_and_speech_give_different_mouths(tmp_path: Path, portrait: tuple[np.ndarray, Face],
                                                  speech: Speech) -> None:
    image, face = portrait
    model = LipSync.open(build_lipsync(tmp_path / "tiny.onnx"))
    silent = Speech(np.zeros_like(speech.samples), speech.rate)
    quiet = animate(image, face, silent, model, motion=False)
    spoken = animate(image, face, speech, model, motion=False)
    x0, y0, x1, y1 = FaceGeometry.of(face, image.shape).crop
    mouth = (slice((y0 + y1) // 2, y1), slice(x0, x1))
    loud = int(np.argmax(loudness(speech.samples, speech.rate, len(spoken))))
    diff = np.abs(quiet[loud][mouth].astype(float) - spoken[loud][mouth].astype(float)).mean()
    assert diff > 3
    assert len({frame[mouth].tobytes() for frame in spoken}) > 3  # the mouth moves over time


def test_the_landmark_fallback_follows_the_audio_envelope(portrait: tuple[np.ndarray, Face]) -> None:
    image, face = portrait
    samples, envelope = _tone_bursts(3.0)
    frames = animate(image, face, Speech(samples, 16_000), None, motion=False)
    geometry = FaceGeometry.of(face, image.shape)
    cx, cy = (int(v) for v in geometry.mouth)
    r = int(geometry.mouth_width)
    change = [np.abs(f[cy - r:cy + r, cx - r:cx + r].astype(float) - image[cy - r:cy + r, cx - r:cx + r]).mean()
              for f in frames]
    per_frame = envelope[::16_000 // FPS][:len(frames)]
    assert np.corrcoef(change, per_frame)[0, 1] > 0.8
    assert frames[0][: cy - r].tobytes() == image[: cy - r].tobytes()  # above the mouth nothing moves


def _context(yunet_path: Path, **settings: Any) -> PipelineContext:
    return PipelineContext(models_dir=yunet_path.parent, settings=settings)


def _streams(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        return {"frames": frames, "video_s": float(video.duration * video.time_base),
                "audio_s": float(audio.duration * audio.time_base), "size": (video.width, video.height),
                "codecs": (video.codec_context.name, audio.codec_context.name),
                "comment": container.metadata.get("comment")}


def test_the_pipeline_writes_an_mp4_as_long_as_the_speech(tmp_path: Path, faces_dir: Path, yunet_path: Path) -> None:
    tiny = build_lipsync(tmp_path / "wav2lip.onnx")
    pipeline = TalkPipeline()
    pipeline.load(_context(yunet_path, model_paths={"wav2lip-gan-onnx": str(tiny)}, talk_max_side=320,
                           talk_tts=["edge", "espeak"], talk_edge_proxy=f"http://127.0.0.1:{closed_port()}"))
    progress = StepRecorder()
    result = pipeline.run({"image": str(faces_dir / "obama.jpg"), "text": "Good morning to you all.",
                           "out": str(tmp_path / "talk.mp4")}, progress)
    assert result.meta["animator"] == "wav2lip" and result.meta["voice"] == "espeak-ng"
    info = _streams(result.files[0])
    assert info["codecs"] == ("h264", "aac") and info["comment"] == label_text("FaceChain Bot", "video")
    assert info["frames"] == result.meta["frames"]
    assert abs(info["video_s"] - result.meta["duration_s"]) <= 1 / FPS
    assert abs(info["audio_s"] - result.meta["duration_s"]) <= 1 / FPS
    assert max(info["size"]) == 320 and progress.steps[-1] == (4, 4)


def test_a_voice_message_becomes_a_round_video_without_the_lipsync_model(
        tmp_path: Path, faces_dir: Path, yunet_path: Path) -> None:
    samples, _ = _tone_bursts(1.5, 48_000)
    voice = tmp_path / "voice.ogg"
    with av.open(str(voice), "w", format="ogg") as container:  # a Telegram voice message: OGG/Opus
        stream = container.add_stream("libopus", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 48_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    decoded = decode_audio(voice)
    assert abs(decoded.duration_s - 1.5) < 0.1
    pipeline = TalkPipeline()
    pipeline.load(_context(yunet_path, talk_round_side=192))
    result = pipeline.run({"image": str(faces_dir / "obama.jpg"), "audio": str(voice), "round": True,
                           "out_dir": str(tmp_path)}, StepRecorder())
    assert result.meta["animator"] == "landmarks" and result.meta["voice"] == "audio"
    info = _streams(result.files[0])
    assert info["size"] == (192, 192)
    assert abs(info["video_s"] - result.meta["duration_s"]) <= 1 / FPS
    assert abs(info["audio_s"] - decoded.duration_s) <= 1 / FPS


def test_expected_failures_have_codes(tmp_path: Path, faces_dir: Path, yunet_path: Path) -> None:
    pipeline = TalkPipeline()
    pipeline.load(_context(yunet_path, talk_max_seconds=0.5))
    image = str(faces_dir / "obama.jpg")
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 200), (120, 130, 140)).save(blank)
    not_audio = tmp_path / "not.ogg"
    not_audio.write_bytes(b"not audio at all")
    cases = [({"image": image, "text": "This sentence is far longer than half a second."}, "talk.too_long"),
             ({"image": str(blank), "text": "Hi"}, "talk.no_face"),
             ({"image": image, "text": "   "}, "talk.nothing_to_say"),
             ({"image": image, "audio": str(not_audio)}, "talk.bad_audio")]
    for params, code in cases:
        with pytest.raises(UserFacingError) as failed:
            pipeline.run({**params, "out_dir": str(tmp_path)}, StepRecorder())
        assert failed.value.code == code


def test_the_cli_writes_the_video(tmp_path: Path, faces_dir: Path, yunet_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'models_dir = "{yunet_path.parent}"\ndata_dir = "{tmp_path / "data"}"\n')
    out = tmp_path / "cli.mp4"
    assert main(["--config", str(config), "talk", "--image", str(faces_dir / "obama.jpg"), "--text", "Hi there",
                 "--out", str(out)]) == 0
    assert "mouth by landmarks" in capsys.readouterr().out
    info = _streams(out)
    assert info["codecs"] == ("h264", "aac") and abs(info["video_s"] - info["audio_s"]) <= 1 / FPS


async def test_a_round_video_falls_back_to_a_plain_video_where_there_is_none(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from handlers.protocols import Chat, MessageRef, NotSupported, SentFile
    from handlers.talk import present_talk

    sent: list[tuple[str, Any]] = []
    delivered: list[tuple[str, str | None]] = []
    chat = Chat("discord", "1", False)

    class NoRoundChannel:
        def __init__(self) -> None:
            self.chat = chat

        async def send_video_note(self, video: Any) -> SentFile:
            raise NotSupported("no round videos here")

        async def send_video(self, video: Any, caption: str | None = None, buttons: Any = None) -> SentFile:
            sent.append(("video", caption))
            return SentFile(MessageRef(chat, "9"), "vid-1")

        async def send_text(self, text: str, buttons: Any = None, visibility: Any = None) -> MessageRef:
            sent.append(("text", text))
            return MessageRef(chat, "10")

    async def mark_delivered(artifact_id: str, platform: str, file_id: str | None) -> None:
        delivered.append((artifact_id, file_id))

    folder = tmp_path / "talk" / "jobs" / "abc"
    folder.mkdir(parents=True)
    (folder / "input.jpg").write_bytes(b"x")
    services = SimpleNamespace(storage=SimpleNamespace(mark_delivered=mark_delivered),
                               settings=SimpleNamespace(pipeline={}))
    job = SimpleNamespace(id=1, kind="talk", chat={"platform": "discord"}, params={"round": True, "out_dir": str(folder)},
                          result={"meta": {"animator": "landmarks"}})
    artifact = SimpleNamespace(id="a1", kind="talk", path=str(folder / "talk.mp4"), media_type="video/mp4",
                               file_ids={}, delivered_at=None, owner_key="discord:1")
    await present_talk(services, job, [artifact], NoRoundChannel(), "en")  # type: ignore[arg-type]
    assert [kind for kind, _ in sent] == ["video"] and "simple mouth animation" in str(sent[0][1])
    assert delivered == [("a1", "vid-1")]
    assert not (folder / "input.jpg").exists()


def test_blinks_and_sway_keep_the_photo_from_looking_frozen(portrait: tuple[np.ndarray, Face]) -> None:
    from facechain_core.talk import blink, blink_amount

    image, face = portrait
    samples, _ = _tone_bursts(4.0)
    frames = animate(image, face, Speech(samples, 16_000), None, motion=True)
    geometry = FaceGeometry.of(face, image.shape)
    top = slice(0, int(geometry.eyes[0][1]) - 5)  # above the eyes only the sway moves things
    assert len({f[top].tobytes() for f in frames}) > len(frames) // 2
    blinking = [i for i in range(len(frames)) if blink_amount(i) > 0.5]
    assert blinking and len(blinking) < len(frames) // 10  # brief blinks, not a squint
    (ex, ey), _ = geometry.eyes
    eye = (slice(int(ey) - 4, int(ey) + 5), slice(int(ex) - 4, int(ex) + 5))
    closed = blink(image, geometry, 1.0)
    assert np.abs(closed[eye].astype(float) - image[eye]).mean() > 5
