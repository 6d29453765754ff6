"""The message catalogue: every code in every language, with the same placeholders everywhere."""
from __future__ import annotations

import re
import string
from pathlib import Path

from handlers import router
from handlers.messages import LANGUAGES, catalogue

ROOT = Path(__file__).resolve().parent.parent
# A literal code handed to the catalogue: t("core.error", ...), UserFacingError("selfie.no_face", ...).
CODE_USE = re.compile(r"""(?:\bt\(|UserFacingError\(|message_for\()\s*["']([a-z0-9_]+(?:\.[a-z0-9_]+)+)["']""")
TELEGRAM_DESCRIPTION = (3, 256)  # BotCommand.description length limits


def placeholders(text: str) -> set[str]:
    """The str.format field names of `text` (raises ValueError on unbalanced braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def catalogue_problems(entries: dict[str, dict[str, str]]) -> list[str]:
    """Every code missing a language, with unparsable text, or with placeholders differing by language."""
    problems = []
    for code, texts in sorted(entries.items()):
        missing = [lang for lang in LANGUAGES if not texts.get(lang, "").strip()]
        if missing:
            problems.append(f"{code}: no text in {', '.join(missing)}")
            continue
        fields = {}
        for lang in LANGUAGES:
            try:
                fields[lang] = placeholders(texts[lang])
            except ValueError as exc:
                problems.append(f"{code} [{lang}]: {exc}")
        if len(fields) == len(LANGUAGES) and len({frozenset(f) for f in fields.values()}) > 1:
            shown = "; ".join(f"{lang} {sorted(f)}" for lang, f in fields.items())
            problems.append(f"{code}: placeholders differ: {shown}")
    return problems


def test_every_code_has_every_language_with_the_same_placeholders() -> None:
    entries = catalogue()
    assert len(entries) > 50  # every feature's file was loaded
    assert catalogue_problems(entries) == []


def test_the_check_catches_a_missing_language_and_a_mismatched_placeholder() -> None:
    bad = {
        "a.missing": {"en": "Hello"},
        "a.renamed": {"en": "{count} photos", "zh": "{number} 张照片"},
        "a.broken": {"en": "{oops", "zh": "好"},
        "a.fine": {"en": "{n} of {max}", "zh": "{max} 中的 {n}"},
    }
    problems = catalogue_problems(bad)
    assert [p.split(":")[0].split(" ")[0] for p in problems] == ["a.broken", "a.missing", "a.renamed"]


def test_every_code_used_in_the_source_is_in_the_catalogue() -> None:
    entries = catalogue()
    used: dict[str, str] = {}
    for package in ("bot", "handlers", "facechain_core"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for match in CODE_USE.finditer(path.read_text(encoding="utf-8")):
                used.setdefault(match.group(1), str(path.relative_to(ROOT)))
    assert len(used) > 30
    unknown = {code: where for code, where in used.items() if code not in entries}
    assert unknown == {}


def test_command_descriptions_fit_the_menus_in_every_language() -> None:
    low, high = TELEGRAM_DESCRIPTION
    for command in router.commands():
        for lang in LANGUAGES:
            text = catalogue()[command.help_code][lang]
            assert low <= len(text) <= high, (command.name, lang, text)
    assert "language" in {c.name for c in router.commands()}
