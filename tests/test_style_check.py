"""`styles check`: every shipped style valid and within CLIP's window, its base and LoRA pinned in the manifest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from facechain_core.clip_tokens import CONTEXT_LENGTH, clip_tokenizer, count_tokens
from facechain_core.manifest import load_manifest
from facechain_core.style_check import BASE_FEATURES, STYLES_FEATURE, check_styles
from facechain_core.styles import DEFAULT_STYLES_DIR, load_styles, lora_feature
from tests.test_styles import VALID, write_style

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_vocabulary_tokenizes_as_clip_does() -> None:
    # Ids of OpenAI CLIP's tokenizer for this phrase (start marker 49406, end marker 49407).
    assert clip_tokenizer()("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(clip_tokenizer()) == 49408
    assert clip_tokenizer().tokenize("hanfu") == ["han", "fu</w>"]  # a rare word costs more than one token
    assert count_tokens("portrait photo") == 4


def test_every_shipped_style_passes_the_check() -> None:
    report = check_styles(DEFAULT_STYLES_DIR)
    assert report.ok, "\n".join(map(str, report.problems))
    assert report.styles == len(list(DEFAULT_STYLES_DIR.glob("*.toml")))
    assert 0 < report.longest_prompt[1] <= CONTEXT_LENGTH


def test_styles_check_command_passes_on_the_shipped_catalogue() -> None:
    result = subprocess.run([sys.executable, "-m", "bot", "styles", "check"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ") and "tokens" in result.stdout


def test_every_shipped_lora_and_base_is_a_pinned_style_model() -> None:
    manifest = load_manifest()
    for style in load_styles():
        names = [n for n in (style.base, style.lora_model) if n]
        for name in names:
            entry = manifest.get(name)
            assert STYLES_FEATURE in entry.features and BASE_FEATURES[style.family] in entry.features, name
            assert entry.source.kind == "url" or len(entry.source.revision) == 40, name  # a commit, not a branch
            assert entry.licence and entry.facts_from, name
        if style.lora is not None:
            assert lora_feature(style.id) in manifest.get(style.lora_model).features


LONG = "portrait photo of {subject}, " + ", ".join(f"detail{i} ornament{i}" for i in range(40))


@pytest.mark.parametrize(("change", "key", "words"), [
    (lambda s: s.replace('"portrait photo of {subject}, studio light"', f'"{LONG}"'), "prompt", "CLIP tokens"),
    (lambda s: s.replace('negative_prompt = "blurry"', f'negative_prompt = "{LONG.replace("{subject}", "x")}"'),
     "negative_prompt", "CLIP tokens"),
    (lambda s: s.replace('zh = "坏风格"', 'zh = "Bad style"'), "name.zh", "Chinese"),
    (lambda s: s.replace('family = "sd15"', 'family = "sd15"\nbase = "no-such-model"'), "base", "not a model"),
    (lambda s: s.replace('family = "sd15"', 'family = "sd15"\nbase = "leosam-helloworld-xl"'), "base", "no sd15"),
    (lambda s: s + '\n[lora]\nsource = "hf:someone/style"\nfile = "s.safetensors"\nweight = 0.8\n', "lora",
     "prompt-only"),
    (lambda s: s.replace('family = "sd15"', 'family = "sdxl"').replace("width = 512", "width = 1024")
     .replace("height = 768", "height = 1024")
     + '\n[lora]\nsource = "hf:other/repo"\nfile = "papercut.safetensors"\nweight = 0.8\nmodel = "style-lora-papercut"\n',
     "lora", "must serve"),
])
def test_a_broken_style_is_reported_with_its_key(tmp_path: Path, change, key: str, words: str) -> None:
    write_style(tmp_path, "fine", en="Fine", zh="好风格")
    bad = VALID.format(id="broken", name_en="Broken", name_zh="坏风格")
    write_style(tmp_path, "broken", change(bad))
    report = check_styles(tmp_path)
    assert not report.ok
    assert {p.path.name for p in report.problems} == {"broken.toml"}
    assert any(p.key.startswith(key) and words in p.message for p in report.problems), report.problems


def test_an_invalid_file_fails_the_command(tmp_path: Path) -> None:
    write_style(tmp_path, "fine", en="Fine", zh="好风格")
    write_style(tmp_path, "broken", 'id = "broken"\nfamily = sd15\n')
    result = subprocess.run([sys.executable, "-m", "bot", "styles", "check", "--styles-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert "broken.toml" in result.stdout and "invalid TOML" in result.stdout


def test_lora_styles_are_offered_once_their_lora_is_pulled_or_configured() -> None:
    from types import SimpleNamespace

    from handlers.portrait import _catalogue

    def offered(features: set[str], model_paths: dict[str, str]) -> set[str]:
        services = SimpleNamespace(styles=load_styles(), features_installed={"portrait", "portrait-sdxl", *features},
                                   settings=SimpleNamespace(model_paths=model_paths))
        return set(_catalogue(services).ids())

    lora_styles = {"papercut", "pixel_art", "watercolor_sketch"}
    assert not offered(set(), {}) & lora_styles
    assert offered({lora_feature("papercut")}, {}) & lora_styles == {"papercut"}
    assert offered(set(), {"style-lora-pixel_art": "/x.safetensors"}) & lora_styles == {"pixel_art"}
    assert "hanfu" in offered(set(), {})  # a style on a base not pulled still runs (on the default base)
