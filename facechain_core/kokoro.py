"""Kokoro-82M, the natural offline voice of /talk: v1.0 speaks English, v1.1-zh Mandarin (ONNX, 24 kHz).

Each language has three files (manifest feature ``talk-voices``): the ONNX export of Kokoro's
``KModel`` (inputs ``input_ids`` int64 [1, N+2], ``style`` float32 [1, 256], ``speed`` [1] int32 or
float32; outputs the waveform and, in newer exports, each token's duration in frames), the voice packs
(an NPZ of float32 [510, 1, 256] per voice: the style for an utterance of n phonemes is row n-1) and
the model's ``config.json`` (its ``vocab`` maps each phoneme symbol to a token id). Phonemes come
from ``facechain_core.phonemes``. A frame is ``HOP`` samples: the decoder upsamples the frame rate
by 2 (F0), 10 and 6 (its transposed convolutions) and 5 (the iSTFT hop).

Text longer than the model's 510-token window is spoken in sentence-sized chunks, joined.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facechain_core import phonemes
from facechain_core.sessions import open_session
from facechain_core.tts import Speech

log = logging.getLogger(__name__)

RATE = 24_000
HOP = 600  # samples per predicted duration frame (2 x 10 x 6 x 5)
MAX_PHONEMES = 510  # the context window less the two boundary tokens
FEATURE = "talk-voices"
# manifest names of each language's model, voice packs and config
MODELS = {
    "en": ("kokoro-v1.0-onnx", "kokoro-v1.0-voices", "kokoro-v1.0-config"),
    "zh": ("kokoro-v1.1-zh-onnx", "kokoro-v1.1-zh-voices", "kokoro-v1.1-zh-config"),
}
_SENTENCE_END = re.compile(r"(?<=[.!?;:,…—])\s+")


@dataclass(frozen=True)
class Voice:
    """One voice /voice offers: Kokoro's id (language letter, gender letter, name) and how to label it."""

    id: str
    name: str
    accent: str = ""  # "US", "UK"; empty for Mandarin

    @property
    def language(self) -> str:
        return "zh" if self.id.startswith("z") else "en"

    @property
    def female(self) -> bool:
        return self.id[1:2] == "f"


# Voices with the best grades in Kokoro's VOICES.md (v1.0), and v1.1-zh's numbered Mandarin speakers;
# the first of each language is its default.
VOICES: tuple[Voice, ...] = (
    Voice("af_heart", "Heart", "US"), Voice("af_bella", "Bella", "US"), Voice("am_michael", "Michael", "US"),
    Voice("am_fenrir", "Fenrir", "US"), Voice("bf_emma", "Emma", "UK"), Voice("bm_george", "George", "UK"),
    Voice("zf_001", "1"), Voice("zf_002", "2"), Voice("zm_009", "3"), Voice("zm_010", "4"),
)
VOICE_IDS = frozenset(v.id for v in VOICES)


def voices_of(language: str) -> list[Voice]:
    return [v for v in VOICES if v.language == language]


def voice_language(voice: str) -> str | None:
    """The language a Kokoro voice id speaks, or None for anything else."""
    return next((v.language for v in VOICES if v.id == voice), None)


@dataclass(frozen=True)
class KokoroFiles:
    model: Path
    voices: Path
    config: Path


class KokoroModel:
    """One Kokoro ONNX export with its vocabulary and voice packs."""

    def __init__(self, session: Any, vocab: dict[str, int], packs: Any) -> None:
        self._session = session
        self.vocab = vocab
        self._packs = packs  # an NpzFile: voices load on first use
        names = {i.name: i for i in session.get_inputs()}
        self._ids = "input_ids" if "input_ids" in names else "tokens"
        if self._ids not in names or "style" not in names or "speed" not in names:
            raise ValueError(f"not a Kokoro signature: inputs {sorted(names)}")
        self._speed_type = np.int32 if names["speed"].type == "tensor(int32)" else np.float32
        outputs = session.get_outputs()
        self._outputs = [o.name for o in outputs[:2]]

    @classmethod
    def open(cls, files: KokoroFiles, device: str = "cpu", threads: int = 0) -> KokoroModel:
        vocab = json.loads(files.config.read_text(encoding="utf-8"))["vocab"]
        return cls(open_session(files.model, device, threads), vocab, np.load(files.voices))

    @property
    def voice_ids(self) -> list[str]:
        return list(self._packs.files)

    def tokens(self, phoneme_text: str) -> list[int]:
        """The token ids of the symbols the vocabulary knows (others are dropped, as Kokoro does)."""
        return [self.vocab[p] for p in phoneme_text if p in self.vocab]

    def style(self, voice: str, count: int) -> np.ndarray:
        pack = np.asarray(self._packs[voice], np.float32)
        return pack[min(max(count, 1), len(pack)) - 1].reshape(1, -1)

    def run(self, tokens: list[int], voice: str, speed: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """The waveform (float32 at 24 kHz) and each token's frames (None where the export has no durations)."""
        if not tokens or len(tokens) > MAX_PHONEMES:
            raise ValueError(f"Kokoro takes 1 to {MAX_PHONEMES} tokens, got {len(tokens)}")
        feeds = {self._ids: np.array([[0, *tokens, 0]], np.int64), "style": self.style(voice, len(tokens)),
                 "speed": np.array([speed], self._speed_type)}
        out = self._session.run(self._outputs, feeds)
        durations = np.asarray(out[1]).reshape(-1) if len(out) > 1 else None
        return np.asarray(out[0], np.float32).reshape(-1), durations


class KokoroTTS:
    """Kokoro's voices for the languages whose files are installed; the text's language picks the model."""

    name = "kokoro"

    def __init__(self, files: dict[str, KokoroFiles], device: str = "cpu", threads: int = 0) -> None:
        if not files:
            raise ValueError("KokoroTTS needs the files of at least one language")
        self.files = dict(files)
        self.device, self.threads = device, threads
        self._models: dict[str, KokoroModel] = {}
        self._lock = threading.Lock()

    @property
    def languages(self) -> set[str]:
        return set(self.files)

    def model(self, language: str) -> KokoroModel:
        """The language's model, opened on first use and kept."""
        with self._lock:
            model = self._models.get(language)
            if model is None:
                log.info("loading Kokoro (%s) from %s", language, self.files[language].model)
                model = self._models[language] = KokoroModel.open(self.files[language], self.device, self.threads)
            return model

    def synthesize(self, text: str, language: str = "en", voice: str | None = None) -> Speech:
        """Speaks `text` in `language` ("en" or "zh") with `voice` when it is one of that language's."""
        if language not in self.files:
            raise LookupError(f"Kokoro has no {language!r} model installed")
        model = self.model(language)
        voice = self.pick_voice(model, language, voice)
        spoken = phonemes.chinese(text) if language == "zh" else phonemes.english(text)
        parts = [model.run(tokens, voice)[0] for tokens in self._chunks(model, spoken)]
        if not parts:
            raise ValueError(f"no phonemes Kokoro knows in {text!r}")
        return Speech(np.concatenate(parts), RATE, voice)

    @staticmethod
    def pick_voice(model: KokoroModel, language: str, wanted: str | None) -> str:
        """`wanted` if the packs have it and it speaks `language`; else the language's first voice the packs have."""
        available = set(model.voice_ids)
        if wanted in available and voice_language(wanted) in (language, None):
            return wanted
        for candidate in voices_of(language):
            if candidate.id in available:
                return candidate.id
        prefix = "z" if language == "zh" else "a"
        fallback = next((v for v in model.voice_ids if v.startswith(prefix)), None) or model.voice_ids[0]
        log.warning("Kokoro: none of our %s voices is in the packs; using %s", language, fallback)
        return fallback

    @staticmethod
    def _chunks(model: KokoroModel, spoken: str) -> list[list[int]]:
        """Token lists of at most MAX_PHONEMES, cut between sentences (or clauses) where possible."""
        chunks: list[list[int]] = []
        current: list[int] = []
        for piece in _SENTENCE_END.split(spoken):
            tokens = model.tokens(piece + " ")
            while len(tokens) > MAX_PHONEMES:  # one clause longer than the window: cut it hard
                chunks.append(tokens[:MAX_PHONEMES])
                tokens = tokens[MAX_PHONEMES:]
            if current and len(current) + len(tokens) > MAX_PHONEMES:
                chunks.append(current)
                current = []
            current = current + tokens
        while current and current[-1] == model.vocab.get(" "):
            current = current[:-1]
        if current:
            chunks.append(current)
        return chunks


def installed_files(resolve: Any) -> dict[str, KokoroFiles]:
    """Each language whose three files `resolve(name)` finds (it returns a Path or None)."""
    found = {}
    for language, names in MODELS.items():
        paths = []
        for name in names:  # the first missing file settles it (and is the one logged)
            path = resolve(name)
            if path is None:
                break
            paths.append(path)
        else:
            found[language] = KokoroFiles(*paths)
    return found
