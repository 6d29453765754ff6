"""Audio a user sends is bounded before it is decoded: length, container kind; and TTS text before synthesis."""
from __future__ import annotations

import io
import time
import tracemalloc
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from facechain_core import tts
from facechain_core.errors import UserFacingError
from facechain_core.tts import MAX_TEXT_CHARS, Speech, decode_audio, speak

LIMIT_S = 30.0
DECODE_BUDGET_BYTES = 16 * 1024 * 1024  # what a refusal may allocate (numpy arrays, as tracemalloc sees them)


def _silent_flac(seconds: int, rate: int = 1000) -> bytes:
    """A small FLAC that inflates to `seconds` of silence (resampled to 16 kHz: 64 bytes per ms)."""
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        stream.format = "s16"
        total, step = seconds * rate, 4608
        for start in range(0, total, step):
            block = np.zeros((1, min(step, total - start)), np.int16)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _silent_flac(3600)  # an hour: 230 MB of float32 at 16 kHz, from a few hundred KB


def _refused_within_budget(data: bytes) -> UserFacingError:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(UserFacingError) as refused:
            decode_audio(data, max_seconds=LIMIT_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < DECODE_BUDGET_BYTES, f"{peak / 1e6:.0f} MB allocated before refusing"
    assert time.monotonic() - started < 10
    return refused.value


def test_a_long_file_is_refused_from_its_stated_duration(bomb: bytes) -> None:
    error = _refused_within_budget(bomb)
    assert error.code == "talk.audio_too_long" and error.details == {"max_seconds": 30}


def test_decoding_stops_past_the_limit_when_no_duration_is_stated(bomb: bytes,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tts, "_stated_seconds", lambda container, stream: None)  # a container that says nothing
    assert _refused_within_budget(bomb).code == "talk.audio_too_long"


def test_audio_within_the_limit_decodes_whole() -> None:
    speech = decode_audio(_silent_flac(20), max_seconds=LIMIT_S)
    assert speech.rate == tts.SAMPLE_RATE and abs(speech.duration_s - 20.0) < 0.2


def test_a_concat_script_is_not_followed_to_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ffconcat (and playlists) would make FFmpeg open files of the worker's folder: only audio demuxers run."""
    with wave.open(str(tmp_path / "x.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 8) * 8000).astype(np.int16).tobytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserFacingError) as refused:
        decode_audio(b"ffconcat version 1.0\nfile x.wav\n")
    assert refused.value.code == "talk.bad_audio"
    assert decode_audio((tmp_path / "x.wav").read_bytes()).duration_s == pytest.approx(1.0)  # a WAV itself is fine


def test_text_over_the_cap_is_refused_before_any_engine_runs() -> None:
    class Engine:
        name = "spy"
        calls = 0

        def synthesize(self, text: str, language: str = "en", voice: str | None = None) -> Speech:
            Engine.calls += 1
            return Speech(np.zeros(160, np.float32), 16_000)

    with pytest.raises(UserFacingError) as refused:
        speak("a" * (MAX_TEXT_CHARS + 1), "en", [Engine()])
    assert refused.value.code == "talk.text_too_long" and refused.value.details["max_length"] == MAX_TEXT_CHARS
    assert Engine.calls == 0
    assert speak("a" * MAX_TEXT_CHARS, "en", [Engine()])[1] == "spy"
