"""The /imagine prompt filter on its checked-in corpus (tests/data/prompt_corpus.tsv), per language."""
from __future__ import annotations

from pathlib import Path

import pytest

from facechain_core.prompt_filter import CATEGORIES, PromptFilter, normalise

CORPUS = Path(__file__).parent / "data" / "prompt_corpus.tsv"
MAX_FALSE_REFUSALS = 0.02  # of allowed prompts refused
MAX_MISSES = 0.05  # of prompts to refuse let through


@pytest.fixture(scope="module")
def prompt_filter() -> PromptFilter:
    return PromptFilter.load()


def _corpus() -> list[tuple[str, str, str]]:
    rows = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            verdict, lang, text = line.split("\t")
            rows.append((verdict, lang, text))
    return rows


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_corpus_rates_stay_within_bounds(prompt_filter: PromptFilter, lang: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rows = [(v, text) for v, language, text in _corpus() if language == lang]
    allowed = [text for v, text in rows if v == "allow"]
    refused = [text for v, text in rows if v == "refuse"]
    assert len(allowed) >= 100 and len(refused) >= 100
    false_refusals = [text for text in allowed if prompt_filter.check(text) is not None]
    misses = [text for text in refused if prompt_filter.check(text) is None]
    fr_rate, miss_rate = len(false_refusals) / len(allowed), len(misses) / len(refused)
    with capsys.disabled():
        print(f"\nprompt filter [{lang}]: false refusals {fr_rate:.1%} ({len(false_refusals)}/{len(allowed)}), "
              f"misses {miss_rate:.1%} ({len(misses)}/{len(refused)})")
    assert fr_rate <= MAX_FALSE_REFUSALS, false_refusals
    assert miss_rate <= MAX_MISSES, misses


def test_normalisation_catches_width_case_traditional_and_spacing(prompt_filter: PromptFilter) -> None:
    assert normalise("ＮＡＫＥＤ") == "naked"
    assert normalise("裸體") == "裸体"
    for text in ("ＮＡＫＥＤ me", "me n.a.k.e.d", "a n u d e beach", "nud3 pic", "我的裸體照", "我的裸\u200b体照", "裸 体"):
        assert prompt_filter.check(text) == "sexual", text
    assert prompt_filter.check("e s s e x lanes") is None  # short words are not looked for in joined letters
    assert prompt_filter.check("me torturing a prisoner") == "violence"  # inflections of a word ending in -e


def test_allowed_phrases_and_an_installed_classifier(prompt_filter: PromptFilter) -> None:
    assert prompt_filter.check("a photo shoot with a shooting star") is None
    assert prompt_filter.check("我吃鸡胸肉") is None
    seen = []

    def classifier(text: str) -> str | None:
        seen.append(text)
        return "violence" if "grim" in text else None

    with_model = PromptFilter(prompt_filter.lists, classifier)
    assert with_model.check("A GRIM scene") == "violence" and seen == ["a grim scene"]
    assert with_model.check("naked") == "sexual" and len(seen) == 1  # the lists decide first
    assert set(prompt_filter.lists["en"].words) <= set(CATEGORIES)
