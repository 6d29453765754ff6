"""The /imagine prompt filter on its checked-in corpus (tests/data/prompt_corpus.tsv), per language."""
from __future__ import annotations

from pathlib import Path

import pytest

from facechain_core.prompt_classifier import TextClassifier
from facechain_core.prompt_filter import CATEGORIES, PromptFilter, normalise
from tests.fixtures.tiny_models import one_torch_thread, prompt_classifier_dir  # noqa: F401

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


def test_the_text_classifier_refuses_what_the_lists_let_through(
        prompt_filter: PromptFilter, prompt_classifier_dir: Path, one_torch_thread: None) -> None:  # noqa: F811
    classifier = TextClassifier(prompt_classifier_dir, threshold=0.6)
    scores = classifier.scores("me at a gorefest")
    assert set(scores) == set(CATEGORIES) and scores["violence"] > 0.9  # V and V2 add up; OK and HR refuse nothing
    assert classifier("me at a gorefest") == "violence"
    assert classifier("me surfing at sunset") is None and classifier("我在西湖边划船") is None
    assert TextClassifier(prompt_classifier_dir, threshold=1.0)("me at a gorefest") is None  # below the threshold
    with_model = PromptFilter(prompt_filter.lists, classifier)
    assert prompt_filter.check("me at a gorefest") is None and with_model.check("Me at a GOREFEST") == "violence"
    assert with_model.check("me n a k e d") == "sexual"  # the lists still answer first
    with pytest.raises(ValueError):
        TextClassifier(prompt_classifier_dir, threshold=0.0)


def test_imagine_asks_the_classifier_only_where_installed_and_wanted(
        prompt_classifier_dir: Path, tmp_path: Path, one_torch_thread: None,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from bot.config import Settings
    from handlers.imagine import check_prompt

    def services(folder: Path, installed: bool = True, **imagine: object) -> SimpleNamespace:
        settings = Settings.model_validate({"models_dir": str(tmp_path), "imagine": imagine,
                                            "model_paths": {"text-moderation": str(folder)}})
        return SimpleNamespace(settings=settings, features_installed={"imagine-classifier"} if installed else set())

    assert check_prompt(services(prompt_classifier_dir), "me at a gorefest") == "violence"
    assert check_prompt(services(prompt_classifier_dir, classifier=False), "me at a gorefest") is None
    assert check_prompt(services(prompt_classifier_dir, installed=False), "me at a gorefest") is None
    assert check_prompt(services(prompt_classifier_dir, classifier_threshold=1.0), "me at a gorefest") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    assert check_prompt(services(broken), "me at a gorefest") is None  # a broken install: the lists still work
    assert check_prompt(services(broken), "me naked") == "sexual" and "does not load" in caplog.text
