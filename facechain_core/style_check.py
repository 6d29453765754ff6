"""`facechain-bot styles check`: the whole catalogue against the rules a file-by-file load cannot see.

Every style file must load (``facechain_core.styles``); beyond that each style's prompt and negative
prompt must fit the text encoder's window under the real CLIP tokenizer (``facechain_core.clip_tokens``),
its base checkpoint and LoRA must be manifest entries of the right family with a pinned source, its
names must be given in English and Chinese, and ids must be unique.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from facechain_core.clip_tokens import CONTEXT_LENGTH, count_tokens
from facechain_core.manifest import Manifest, ManifestError, load_manifest
from facechain_core.styles import DEFAULT_STYLES_DIR, Style, StyleError, StyleProblem, load_styles, lora_feature, \
    render_prompt

STYLES_FEATURE = "styles"  # `models pull styles`: every style base and style LoRA
# A community base of a family serves this feature too, which is how the check knows its family.
BASE_FEATURES = {"sd15": "styles-sd15", "sdxl": "styles-sdxl"}
# The longest subject phrase a prompt is checked with: longer than the bot's own ("a person").
CHECK_SUBJECT = "a young woman with long wavy hair"
_CJK = re.compile(r"[\u3400-\u9fff]")


@dataclass
class CheckReport:
    """What `check_styles` found: the problems, and counts for the summary line."""

    problems: list[StyleProblem] = field(default_factory=list)
    styles: int = 0
    families: Counter[str] = field(default_factory=Counter)
    with_base: int = 0
    with_lora: int = 0
    longest_prompt: tuple[str, int] = ("", 0)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        style_id, tokens = self.longest_prompt
        per_family = ", ".join(f"{n} {family}" for family, n in sorted(self.families.items()))
        return (f"{self.styles} styles ({per_family}); {self.with_base} on a named base, {self.with_lora} with a "
                f"style LoRA; longest prompt {tokens}/{CONTEXT_LENGTH} tokens ({style_id})")


def check_styles(styles_dir: Path = DEFAULT_STYLES_DIR, manifest: Manifest | None = None) -> CheckReport:
    """Checks every style of `styles_dir` against the tokenizer and the manifest."""
    report = CheckReport()
    try:
        catalogue = load_styles(styles_dir)
    except StyleError as exc:
        report.problems.extend(exc.problems)
        return report
    try:
        manifest = manifest or load_manifest()
    except ManifestError as exc:
        report.problems.append(StyleProblem(Path(styles_dir), "", f"the model manifest is invalid: {exc}"))
        return report
    ids = Counter(style.id for style in catalogue)
    for style in catalogue:
        path = Path(styles_dir) / f"{style.id}.toml"
        report.styles += 1
        report.families[style.family] += 1
        report.with_base += style.base is not None
        report.with_lora += style.lora is not None
        if ids[style.id] > 1:
            report.problems.append(StyleProblem(path, "id", f"{style.id!r} is used by {ids[style.id]} styles"))
        report.problems.extend(_check_text(path, style, report))
        report.problems.extend(_check_base(path, style, manifest))
        report.problems.extend(_check_lora(path, style, manifest))
    return report


def _check_text(path: Path, style: Style, report: CheckReport) -> list[StyleProblem]:
    problems = []
    for key, text in (("prompt", render_prompt(style, CHECK_SUBJECT)), ("negative_prompt", style.negative_prompt)):
        tokens = count_tokens(text)
        if key == "prompt" and tokens > report.longest_prompt[1]:
            report.longest_prompt = (style.id, tokens)
        if tokens > CONTEXT_LENGTH:
            problems.append(StyleProblem(path, key, f"takes {tokens} CLIP tokens (with {CHECK_SUBJECT!r} as the "
                                                    f"subject); the text encoder keeps {CONTEXT_LENGTH}"))
    for key, text in (("name.zh", style.name.zh), ("description.zh", style.description.zh)):
        if not _CJK.search(text):
            problems.append(StyleProblem(path, key, f"must be Chinese, got {text!r}"))
    for key, text in (("name.en", style.name.en), ("description.en", style.description.en)):
        if _CJK.search(text):
            problems.append(StyleProblem(path, key, f"must be English, got {text!r}"))
    return problems


def _check_base(path: Path, style: Style, manifest: Manifest) -> list[StyleProblem]:
    if style.base is None:
        return []
    try:
        entry = manifest.get(style.base)
    except KeyError:
        return [StyleProblem(path, "base", f"{style.base!r} is not a model of the manifest")]
    wanted = BASE_FEATURES[style.family]
    if wanted not in entry.features:
        return [StyleProblem(path, "base", f"{style.base!r} is no {style.family} base (its features lack {wanted!r})")]
    return []


def _check_lora(path: Path, style: Style, manifest: Manifest) -> list[StyleProblem]:
    if style.lora is None:
        return []
    name = style.lora_model
    assert name is not None
    try:
        entry = manifest.get(name)
    except KeyError:
        return [StyleProblem(path, "lora", f"no manifest entry {name!r}: pin the LoRA there, or drop [lora] "
                                           f"and keep the style prompt-only")]
    problems = []
    for feature in (STYLES_FEATURE, BASE_FEATURES[style.family], lora_feature(style.id)):
        if feature not in entry.features:
            problems.append(StyleProblem(path, "lora", f"manifest entry {name!r} must serve feature {feature!r}"))
    source = style.lora.source.removeprefix("hf:").split("@")[0]
    if entry.source.kind == "hf" and (entry.source.repo_id != source or entry.source.filename != style.lora.file):
        problems.append(StyleProblem(path, "lora.source", f"{source}/{style.lora.file} differs from manifest "
                                                          f"entry {name!r} ({entry.source.text})"))
    if style.lora.license and style.lora.license != entry.licence:
        problems.append(StyleProblem(path, "lora.license", f"{style.lora.license!r} differs from the manifest's "
                                                           f"{entry.licence!r}"))
    return problems
