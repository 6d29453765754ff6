"""Phonemes for Kokoro: English through espeak-ng's IPA, Mandarin through misaki's v1.1 Chinese G2P.

Kokoro v1.0 was trained on misaki's phoneme alphabet, one symbol per sound: diphthongs and
affricates are single letters (``A`` for /eɪ/, ``I`` /aɪ/, ``W`` /aʊ/, ``O`` /oʊ/, ``Y`` /ɔɪ/, ``ʤ``,
``ʧ``), the American flap is ``T`` and r-coloured schwa is ``əɹ``. espeak-ng's IPA (asked for with a
tie mark between the letters of one phoneme) is rewritten into that alphabet here, as misaki does
for words outside its own dictionary. We drive espeak-ng through its C API (the library the
``espeakng-loader`` wheel bundles, already our offline voice), so no GPL Python package
(``phonemizer``) is needed.

Mandarin goes through ``misaki[zh]`` (Apache-2.0: jieba, pypinyin, cn2an): its ``ZHG2P(version="1.1")``
writes the zhuyin-based symbols Kokoro v1.1-zh was trained on; Latin words inside Chinese text are
spelled by the English path above.
"""
from __future__ import annotations

import ctypes
import logging
import re
import threading
from functools import cache

log = logging.getLogger(__name__)

_IPA = 0x02
_USE_TIE = 1 << 7
_TIE = "^"
_CHARS_UTF8 = 1
# espeak-ng IPA (tied) -> misaki's American English symbols; longest first so a diphthong wins over its parts.
_ESPEAK_TO_KOKORO = sorted({
    "a^ɪ": "I", "a^ʊ": "W", "e^ɪ": "A", "o^ʊ": "O", "ɔ^ɪ": "Y", "d^ʒ": "ʤ", "t^ʃ": "ʧ", "ə^l": "ᵊl",
    "ɚ": "əɹ", "ɜː": "ɜɹ", "ɪə": "iə", "r": "ɹ", "x": "k", "ç": "k", "ɐ": "ə", "ɬ": "l", "ʲ": "",
    "ɾ": "T", "ʔ": "t", "ː": "", "\u0303": "",
}.items(), key=lambda item: -len(item[0]))
# Punctuation Kokoro reads as pauses and intonation; kept between the phonemised chunks.
_PUNCTUATION = re.compile(r"\s*([.,!?;:…—\"“”()]+)\s*")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_lock = threading.Lock()


def text_language(text: str, fallback: str = "en") -> str:
    """``zh`` when the text is mostly Chinese characters, ``en`` when mostly Latin letters, else `fallback`."""
    han, latin = len(_HAN.findall(text)), len(_LATIN.findall(text))
    if not han and not latin:
        return fallback
    # A Chinese character carries a syllable, an English word several letters: weigh them alike.
    return "zh" if han * 4 >= latin else "en"


def english(text: str) -> str:
    """Kokoro v1.0 phonemes of English text (punctuation kept as Kokoro reads it)."""
    parts: list[str] = []
    for piece in _PUNCTUATION.split(" ".join(text.split())):
        if not piece:
            continue
        if _PUNCTUATION.fullmatch(piece):
            parts.append(piece.strip() + " ")
            continue
        phonemes = _to_kokoro(_espeak_ipa(piece))
        if phonemes:
            parts.append(phonemes)
    return "".join(parts).strip()


def chinese(text: str) -> str:
    """Kokoro v1.1-zh phonemes of Mandarin text (English words in it through ``english``)."""
    phonemes, _ = _chinese_g2p()(text)
    return phonemes.strip()


def _to_kokoro(ipa: str) -> str:
    for old, new in _ESPEAK_TO_KOKORO:
        ipa = ipa.replace(old, new)
    # espeak links a final r to a following vowel ("better is": ɚɹ), which the rewrite above doubles.
    return ipa.replace(_TIE, "").replace("ɹɹ", "ɹ").strip()


def _espeak_ipa(text: str) -> str:
    """espeak-ng's IPA of `text` (American English), its clauses joined by spaces."""
    from facechain_core.tts import EspeakTTS

    data = ctypes.create_string_buffer(text.encode("utf-8"))
    pointer = ctypes.c_void_p(ctypes.addressof(data))
    clauses = []
    with EspeakTTS.lock():
        lib = _phoneme_api(EspeakTTS.library())
        if lib.espeak_SetVoiceByName(b"en-us") != 0:
            raise RuntimeError("espeak-ng has no en-us voice")
        while pointer.value:
            out = lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8, _IPA | _USE_TIE | (ord(_TIE) << 8))
            if out:
                clauses.append(out.decode("utf-8"))
    return " ".join(c.strip() for c in clauses if c.strip())


@cache
def _phoneme_api(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
    return lib


def _chinese_g2p():  # -> misaki.zh.ZHG2P
    with _lock:
        return _load_chinese_g2p()


@cache
def _load_chinese_g2p():  # type: ignore[no-untyped-def]
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it prints its dictionary loading at INFO
    from misaki.zh import ZHG2P

    log.info("loading misaki's Chinese G2P")
    return ZHG2P(version="1.1", en_callable=english)
