"""Kokoro, the natural offline voice: the real KModel exported at a reduced size (tests/fixtures/tiny_models.py),
our phonemes, the language of the text picking model and voice, and espeak-ng when the files are missing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facechain_core import phonemes
from facechain_core.kokoro import HOP, RATE, KokoroFiles, KokoroModel, KokoroTTS
from facechain_core.pipeline import PipelineContext
from facechain_core.talk import TalkPipeline
from facechain_core.tiny.kokoro import CHINESE_VOICES, ENGLISH_VOICES
from facechain_core.tts import OFFLINE_VOICE, EspeakTTS, engines_from_settings, rms, speak
from tests.fixtures.progress import StepRecorder

pytestmark = pytest.mark.timeout(120)


def _files(models: dict[str, Path], version: str) -> KokoroFiles:
    return KokoroFiles(models[f"kokoro-{version}-onnx"], models[f"kokoro-{version}-voices"],
                       models[f"kokoro-{version}-config"])


@pytest.fixture(scope="module")
def kokoro(kokoro_models: dict[str, Path]) -> KokoroTTS:
    return KokoroTTS({"en": _files(kokoro_models, "v1.0"), "zh": _files(kokoro_models, "v1.1-zh")}, threads=1)


def test_audio_length_is_the_sum_of_the_predicted_durations_times_the_hop(kokoro: KokoroTTS) -> None:
    model = kokoro.model("en")
    tokens = model.tokens(phonemes.english("Hello everyone, look at me talk."))
    assert len(tokens) > 20
    lengths = set()
    for voice in ENGLISH_VOICES[:2]:
        waveform, durations = model.run(tokens, voice)
        assert durations is not None and len(durations) == len(tokens) + 2  # the two boundary tokens too
        assert durations.min() >= 1
        assert len(waveform) == int(durations.sum()) * HOP
        lengths.add(len(waveform))
    assert np.isfinite(waveform).all() and rms(waveform) > 0
    speech = kokoro.synthesize("Hello everyone, look at me talk.", "en")
    assert speech.rate == RATE and speech.voice == ENGLISH_VOICES[0] and len(speech.samples) % HOP == 0


def test_english_phonemes_are_in_kokoros_alphabet() -> None:
    spoken = phonemes.english("Hello, the water is better today!")
    # Diphthongs and the flap become misaki's single letters; punctuation stays for the prosody.
    assert spoken.startswith("həlˈO,") and "T" in spoken and "A" in spoken and spoken.endswith("!")
    assert "^" not in spoken and "ː" not in spoken and "ɚ" not in spoken
    assert phonemes.text_language("你好 world") == "zh" and phonemes.text_language("Hello 你") == "en"
    assert phonemes.text_language("123 !", "zh") == "zh"


def test_the_texts_language_picks_the_model_and_a_fitting_voice(kokoro: KokoroTTS) -> None:
    engines = engines_from_settings({}, kokoro)
    assert [e.name for e in engines] == ["kokoro", "espeak-ng"]
    # A Chinese text from a user whose app speaks English: Mandarin model, its default voice.
    speech, engine = speak("今天天气很好。", "en", engines)
    assert engine == "kokoro" and speech.voice == CHINESE_VOICES[0]
    assert "ㄊ言1" in phonemes.chinese("今天天气很好。")
    # An English voice chosen: English text speaks with it, Chinese text falls back to a Mandarin voice.
    speech, _ = speak("Good morning.", "zh", engines, voice="bf_emma")
    assert speech.voice == "bf_emma"
    speech, _ = speak("早上好", "en", engines, voice="bf_emma")
    assert speech.voice == CHINESE_VOICES[0]
    # The robotic voice on request.
    speech, engine = speak("Hi.", "en", engines, voice=OFFLINE_VOICE)
    assert engine == "espeak-ng" and speech.voice == ""


def test_espeak_speaks_where_the_kokoro_files_are_missing(tmp_path: Path, kokoro_models: dict[str, Path],
                                                         yunet_path: Path) -> None:
    def pipeline(**paths: Path) -> TalkPipeline:
        loaded = TalkPipeline()
        loaded.load(PipelineContext(models_dir=tmp_path, settings={
            "model_paths": {"yunet": str(yunet_path), **{k: str(v) for k, v in paths.items()}}}))
        return loaded

    bare = pipeline()
    result = bare.run({"sample": True, "text": "Hello there.", "out": str(tmp_path / "a.ogg")}, StepRecorder())
    assert result.meta["engine"] == "espeak-ng"
    english_only = {k: v for k, v in kokoro_models.items() if "v1.0" in k}
    partial = pipeline(**english_only)
    result = partial.run({"sample": True, "text": "Hello there.", "voice": "am_michael",
                          "out": str(tmp_path / "b.ogg")}, StepRecorder())
    assert result.meta == {"engine": "kokoro", "voice": "am_michael", "duration_s": result.meta["duration_s"]}
    sample_s = result.meta["duration_s"]
    result = partial.run({"sample": True, "text": "你好。", "out": str(tmp_path / "c.ogg")}, StepRecorder())
    assert result.meta["engine"] == "espeak-ng"  # no Mandarin model: the fallback speaks Chinese
    from facechain_core.tts import decode_audio

    assert decode_audio(tmp_path / "b.ogg").duration_s == pytest.approx(sample_s, abs=0.05)  # a voice message
    assert isinstance(engines_from_settings({"talk_tts": ["kokoro", "espeak"]})[-1], EspeakTTS)
