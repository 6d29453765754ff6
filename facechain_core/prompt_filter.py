"""The prompt filter /imagine runs before any job: word lists per language, on normalised text.

``PromptFilter.load()`` reads ``filters/prompt_<lang>.toml`` (categories of words and an ``allow`` list of
innocent phrases). ``check(text)`` returns the first category the text falls in, or None:

1. normalise: NFKC (full-width letters, ligatures), case folded, traditional Chinese made simplified
   (OpenCC ``t2s``), invisible format characters dropped;
2. English: look-alike digits and symbols read as letters (``nud3`` -> ``nude``), spaced-out letters joined
   (``n u d e``), the allowed phrases removed, then every word matched as a whole word with -s, -es, -ed,
   -ing or -er;
3. Chinese: spaces and punctuation removed, the allowed phrases removed, then every word matched anywhere;
4. where an operator installed one, a text classifier (any callable ``text -> category | None``) has the
   last word on what the lists let through.
"""
from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from facechain_core.datafiles import REPO_ROOT

DEFAULT_FILTERS_DIR = REPO_ROOT / "filters"
LANGUAGES = ("en", "zh")
CATEGORIES = ("sexual", "minors", "violence", "hate", "self_harm")
SUFFIXES = "(?:s|es|ed|ing|er|ers)?"
MIN_JOINED = 4  # shorter words are not looked for inside joined letters ("sex" in "e s s e x")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_SPACED = re.compile(r"\b(?:[a-z][\s._*\-]+){2,}[a-z]\b")
_CJK = re.compile(r"[\u3400-\u9fff]")

Classifier = Callable[[str], "str | None"]


@dataclass(frozen=True)
class WordList:
    """One language's words by category, and the phrases removed before matching."""

    words: dict[str, tuple[str, ...]]
    allow: tuple[str, ...]


@cache
def _t2s() -> Callable[[str], str]:
    import opencc

    return opencc.OpenCC("t2s").convert


def normalise(text: str) -> str:
    """NFKC, case folded, simplified Chinese, without invisible format characters."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _t2s()(text) if _CJK.search(text) else text


def _english(text: str) -> str:
    text = text.translate(_LEET)
    text = _SPACED.sub(lambda m: re.sub(r"[\s._*\-]+", "", m.group(0)), text)
    return " " + re.sub(r"[^a-z0-9'\-]+", " ", text) + " "


def _inflected(word: str) -> str:
    """A pattern of `word` with its English endings (a final -e gives way: torture, torturing)."""
    if word.endswith("e"):
        return re.escape(word[:-1]) + "(?:e|es|ed|er|ers|ing)"
    return re.escape(word) + SUFFIXES


def _spaced_runs(text: str) -> list[str]:
    """Letters written apart (``a n u d e``, ``n.a.k.e.d``), joined: bad words are looked for inside them."""
    return [re.sub(r"[\s._*\-]+", "", m.group(0)) for m in _SPACED.finditer(text.translate(_LEET))]


def _chinese(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


class PromptFilter:
    """Refuses prompts by word lists (and an optional classifier); see the module docstring."""

    def __init__(self, lists: dict[str, WordList], classifier: Classifier | None = None) -> None:
        self.lists = lists
        self.classifier = classifier
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        english = lists.get("en")
        if english is not None:
            for category, words in english.words.items():
                alternatives = "|".join(_inflected(_english(normalise(w)).strip()) for w in words)
                self._patterns.append((category, re.compile(rf"(?<![a-z])(?:{alternatives})(?![a-z])")))
        self._english_joined = {c: tuple(w.replace(" ", "") for w in english.words[c] if len(w) >= MIN_JOINED)
                                for c in english.words} if english else {}
        self._english_allow = tuple(_english(normalise(p)).strip() for p in english.allow) if english else ()
        chinese = lists.get("zh")
        self._chinese = {c: tuple(_chinese(normalise(w)) for w in ws) for c, ws in chinese.words.items()} \
            if chinese else {}
        self._chinese_allow = tuple(_chinese(normalise(p)) for p in chinese.allow) if chinese else ()

    @classmethod
    def load(cls, folder: Path = DEFAULT_FILTERS_DIR, classifier: Classifier | None = None) -> PromptFilter:
        """The word lists of `folder` (``prompt_en.toml``, ``prompt_zh.toml``)."""
        lists = {}
        for lang in LANGUAGES:
            with (Path(folder) / f"prompt_{lang}.toml").open("rb") as f:
                data = tomllib.load(f)
            unknown = sorted(set(data) - {"allow", *CATEGORIES})
            if unknown:
                raise ValueError(f"prompt_{lang}.toml: unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
            lists[lang] = WordList({c: tuple(data[c]["words"]) for c in CATEGORIES if c in data},
                                   tuple(data.get("allow", ())))
        return cls(lists, classifier)

    def check(self, text: str) -> str | None:
        """The category `text` is refused for, or None when it may go ahead."""
        plain = normalise(text)
        english = _english(plain)
        for phrase in self._english_allow:
            english = re.sub(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", " ", english)
        for category, pattern in self._patterns:
            if pattern.search(english):
                return category
        for run in _spaced_runs(plain):
            for category, words in self._english_joined.items():
                if any(word in run for word in words):
                    return category
        chinese = _chinese(plain)
        for phrase in self._chinese_allow:
            chinese = chinese.replace(phrase, "")
        for category, words in self._chinese.items():
            if any(word and word in chinese for word in words):
                return category
        if self.classifier is not None:
            return self.classifier(plain)
        return None
