"""Speech for the talking head: text-to-speech (Kokoro and espeak-ng offline, edge-tts online) and audio decoding.

Kokoro-82M (``facechain_core.kokoro``) is the natural offline voice once its files are pulled
(``models pull talk-voices``); espeak-ng is the last fallback. edge-tts sends the text to
Microsoft's online read-aloud service, so it runs only where the operator lists it
(``[pipeline] talk_tts = ["edge", "kokoro", "espeak"]``); ``speak`` falls back to the next engine
when one fails. espeak-ng comes as a bundled shared library from the ``espeakng-loader`` wheel and is driven
through ctypes in synchronous mode: no network, no subprocess. The library keeps global state, so
one lock serialises every synthesis in the process. Audio files and voice messages (OGG/Opus, MP3,
M4A, WAV) are decoded with PyAV and resampled to mono float32 at the rate asked for.
"""
from __future__ import annotations

import asyncio
import ctypes
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facechain_core.errors import UserFacingError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # what the lip-sync features are computed at
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_VOICES = {"en": "en-us", "zh": "cmn"}  # catalogue language -> espeak-ng voice
OFFLINE_VOICE = "espeak"  # the voice choice meaning "espeak-ng only"
MAX_TEXT_CHARS = 500  # the most one talking portrait says (the /talk handler and the CLI take no more)
# Demuxers decode_audio opens: audio containers only ("mov" is MP4/M4A's, "matroska" WebM's).
AUDIO_FORMATS = "ogg,mp3,mov,wav,flac,aac,matroska,webm"
DECODE_MARGIN_S = 1.0  # decoded past the limit before refusing (a stated duration rounds)


@dataclass(frozen=True)
class Speech:
    """Mono float32 samples in [-1, 1] at `rate` Hz (`voice`: the engine's voice that spoke them, if it says)."""

    samples: np.ndarray
    rate: int
    voice: str = ""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate


class TextToSpeech(Protocol):
    """Turns text into speech in a language (``en``, ``zh``)."""

    name: str

    def synthesize(self, text: str, language: str = "en") -> Speech: ...  # Kokoro and edge-tts also take voice=


class EspeakTTS:
    """espeak-ng through its C API, offline; the voice follows the language."""

    name = "espeak-ng"
    _lock = threading.Lock()
    _library: ctypes.CDLL | None = None
    _rate = 0

    def __init__(self, rate_wpm: int = 160) -> None:
        self.rate_wpm = rate_wpm

    def synthesize(self, text: str, language: str = "en") -> Speech:
        """Speaks `text`; returns its samples at espeak-ng's own rate (22050 Hz)."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("nothing to say: the text is empty")
        chunks: list[np.ndarray] = []

        @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        def collect(wav: ctypes.Array, count: int, _events: int) -> int:
            if wav and count > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0

        with self._lock:
            lib = self._open()
            lib.espeak_SetSynthCallback(collect)
            voice = _VOICES.get(language, language)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0 and lib.espeak_SetVoiceByName(b"en-us") != 0:
                raise RuntimeError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(1, self.rate_wpm, 0)  # espeakRATE, absolute
            data = text.encode("utf-8") + b"\0"
            status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status}")
            lib.espeak_Synchronize()
            rate = type(self)._rate
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
        return Speech(samples.astype(np.float32) / 32768.0, rate)

    @classmethod
    def lock(cls) -> threading.Lock:
        """The lock every call into the library holds (it keeps global state)."""
        return cls._lock

    @classmethod
    def library(cls) -> ctypes.CDLL:
        """The initialised library; call with ``lock()`` held."""
        return cls._open()

    @classmethod
    def _open(cls) -> ctypes.CDLL:
        if cls._library is None:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetSynthCallback.argtypes = [ctypes.c_void_p]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                         ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            data_path = str(Path(espeakng_loader.get_data_path()))
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
            if rate <= 0:
                raise RuntimeError(f"espeak-ng did not start (data at {data_path})")
            cls._library, cls._rate = lib, rate
            log.info("espeak-ng ready at %d Hz", rate)
        return cls._library


class EdgeTTS:
    """Microsoft Edge's online read-aloud voices through the ``edge-tts`` package (MP3, decoded here)."""

    name = "edge-tts"
    VOICES = {"en": "en-US-EmmaMultilingualNeural", "zh": "zh-CN-XiaoxiaoNeural"}
    # The voices offered per language by /voice (the first is the default above).
    LANGUAGE_VOICES: dict[str, tuple[str, ...]] = {
        "en": ("en-US-EmmaMultilingualNeural", "en-US-AndrewMultilingualNeural", "en-GB-SoniaNeural",
               "en-GB-RyanNeural"),
        "zh": ("zh-CN-XiaoxiaoNeural", "zh-CN-YunxiNeural", "zh-CN-XiaoyiNeural", "zh-CN-YunjianNeural"),
    }
    RATE = 24_000  # the service's MP3 rate

    def __init__(self, voices: dict[str, str] | None = None, proxy: str | None = None, timeout_s: int = 10) -> None:
        self.voices = {**self.VOICES, **(voices or {})}
        self.proxy = proxy or None
        self.timeout_s = timeout_s

    def synthesize(self, text: str, language: str = "en", voice: str | None = None) -> Speech:
        """Fetches the speech in `voice` when it is one of ours (blocking; raises on any failure)."""
        if voice not in self.known_voices():
            voice = self.voices.get(language) or self.voices["en"]
        data = asyncio.run(self._fetch(text, voice))
        if not data:
            raise RuntimeError("edge-tts returned no audio")
        return decode_audio(data, self.RATE)

    @classmethod
    def known_voices(cls) -> set[str]:
        return {v for voices in cls.LANGUAGE_VOICES.values() for v in voices} | set(cls.VOICES.values())

    async def _fetch(self, text: str, voice: str) -> bytes:
        import edge_tts

        communicate = edge_tts.Communicate(text, voice, proxy=self.proxy, connect_timeout=self.timeout_s,
                                           receive_timeout=self.timeout_s * 3)
        chunks = [chunk["data"] async for chunk in communicate.stream() if chunk["type"] == "audio"]
        return b"".join(chunks)


DEFAULT_ENGINES = ["kokoro", "espeak"]
ENGINE_NAMES = ("edge", "kokoro", "espeak")


def engines_from_settings(settings: dict[str, object], kokoro: TextToSpeech | None = None) -> list[TextToSpeech]:
    """The engines named by ``talk_tts`` (in order: "edge", "kokoro", "espeak"); espeak-ng always ends the list.

    "kokoro" takes part only where its files are installed (`kokoro`, built by the pipeline from them)."""
    names = settings.get("talk_tts") or DEFAULT_ENGINES
    if isinstance(names, str):
        names = [names]
    engines: list[TextToSpeech] = []
    for name in names:  # type: ignore[union-attr]
        if name == "edge":
            engines.append(EdgeTTS(proxy=str(settings.get("talk_edge_proxy") or "") or None))
        elif name == "kokoro":
            if kokoro is not None:
                engines.append(kokoro)
        elif name != "espeak":
            raise ValueError(f"talk_tts: unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")
    engines.append(EspeakTTS())
    return engines


def edge_enabled(settings: dict[str, object]) -> bool:
    """Whether the operator lets edge-tts (online) speak: "edge" in ``talk_tts``."""
    names = settings.get("talk_tts") or DEFAULT_ENGINES
    return "edge" in ([names] if isinstance(names, str) else list(names))  # type: ignore[call-overload]


def edge_voice_language(voice: str | None) -> str | None:
    """The language of one of our edge-tts voices (``en-GB-RyanNeural`` -> ``en``), else None."""
    return voice.split("-", 1)[0] if voice in EdgeTTS.known_voices() else None


def speak(text: str, language: str, engines: list[TextToSpeech], voice: str | None = None) -> tuple[Speech, str]:
    """Speaks with the first engine that works; returns the speech and that engine's name.

    The text's own language (``phonemes.text_language``; `language` when it has no letters) picks the
    model and the default voice. `voice` (a user's /voice choice) is used when it speaks that language,
    and its engine goes first; ``OFFLINE_VOICE`` means espeak-ng alone."""
    from facechain_core.phonemes import text_language

    check_text_length(text)
    language = text_language(text, language)
    if voice == OFFLINE_VOICE:
        engines = [e for e in engines if isinstance(e, EspeakTTS)] or engines
    owner = _owner(engines, voice, language)
    if owner is not None:
        engines = [owner, *(e for e in engines if e is not owner)]
    else:
        voice = None
    errors = []
    for engine in engines:
        if language not in getattr(engine, "languages", {language}):
            continue  # Kokoro without this language's model
        try:
            if isinstance(engine, EspeakTTS):
                speech = engine.synthesize(text, language)
            else:
                speech = engine.synthesize(text, language, voice=voice if engine is owner else None)  # type: ignore[call-arg]
        except Exception as exc:  # an online engine may fail in any way; the next one takes over
            log.warning("tts %s failed (%s); trying the next engine", engine.name, exc)
            errors.append(engine.name)
            continue
        if len(speech.samples):
            return speech, engine.name
        errors.append(engine.name)
    raise UserFacingError("talk.tts_failed")


def _owner(engines: list[TextToSpeech], voice: str | None, language: str) -> TextToSpeech | None:
    """The engine a chosen voice belongs to, if that voice speaks `language`."""
    from facechain_core.kokoro import voice_language

    for engine in engines:
        if isinstance(engine, EdgeTTS) and edge_voice_language(voice) == language:
            return engine
        if engine.name == "kokoro" and voice_language(voice or "") == language:
            return engine
    return None


def decode_audio(path: Path | bytes, rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> Speech:
    """Decodes an audio file (the containers of ``AUDIO_FORMATS``) to mono float32 at `rate`.

    Past `max_seconds` (plus ``DECODE_MARGIN_S``) it refuses with ``talk.audio_too_long``: from the
    container's stated duration before decoding anything, else as soon as the decoded audio passes it,
    so a small file that inflates to hours of samples costs nothing. Raises ``talk.bad_audio`` for the rest."""
    import av

    limit = None if max_seconds is None else max_seconds + DECODE_MARGIN_S
    parts: list[np.ndarray] = []
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else str(path)
        # Only audio demuxers: no playlists or concat scripts that open other files or URLs.
        with av.open(source, options={"format_whitelist": AUDIO_FORMATS}) as container:
            if not container.streams.audio:
                raise UserFacingError("talk.bad_audio")
            stream = container.streams.audio[0]
            stated = _stated_seconds(container, stream)
            if limit is not None and stated is not None and stated > limit:
                raise _too_long(max_seconds)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            decoded = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    decoded += len(parts[-1])
                if limit is not None and decoded > limit * rate:
                    raise _too_long(max_seconds)
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, ValueError) as exc:
        log.info("could not decode audio %s: %s", "bytes" if isinstance(path, bytes) else path, exc)
        raise UserFacingError("talk.bad_audio") from None
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not len(samples):
        raise UserFacingError("talk.bad_audio")
    return Speech(samples, rate)


def _stated_seconds(container: object, stream: object) -> float | None:
    """The duration the container or the stream states, if any (it may be missing or a lie: decoding checks too)."""
    duration = getattr(container, "duration", None)  # in AV_TIME_BASE (microsecond) units
    if duration:
        return duration / 1_000_000
    if getattr(stream, "duration", None) and getattr(stream, "time_base", None):
        return float(stream.duration * stream.time_base)  # type: ignore[attr-defined]
    return None


def _too_long(max_seconds: float | None) -> UserFacingError:
    return UserFacingError("talk.audio_too_long", max_seconds=round(max_seconds or 0))


def check_text_length(text: str) -> None:
    """Refuses text longer than one talking portrait says (``talk.text_too_long``), before any synthesis."""
    if len(text) > MAX_TEXT_CHARS:
        raise UserFacingError("talk.text_too_long", length=len(text), max_length=MAX_TEXT_CHARS)


def resample(speech: Speech, rate: int = SAMPLE_RATE) -> Speech:
    """Resamples by linear interpolation (speech features need no better)."""
    if speech.rate == rate:
        return speech
    count = max(1, round(len(speech.samples) * rate / speech.rate))
    times = np.arange(count) * (speech.rate / rate)
    samples = np.interp(times, np.arange(len(speech.samples)), speech.samples).astype(np.float32)
    return Speech(samples, rate)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
