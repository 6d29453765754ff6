"""Tests for the styles catalogue: shipped files, validation errors by path and key, lookup, paging."""
from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from facechain_core.styles import (
    DEFAULT_STYLES_DIR,
    SCHEDULERS,
    SchedulerName,
    StyleCatalog,
    StyleError,
    UnknownStyle,
    load_style,
    load_styles,
    render_prompt,
)
from handlers.messages import t

REQUIRED_THEMES = {
    "hanfu", "dunhuang", "business_headshot", "id_photo", "wedding",
    "cyberpunk", "oil_painting", "analog_film", "winter", "beach",
}
DYNASTIES = {"han_dynasty", "tang_dynasty", "song_dynasty", "ming_dynasty", "qing_dynasty"}
CJK = re.compile(r"[\u4e00-\u9fff]")

VALID = """\
id = "{id}"
family = "sd15"
identity_weight = 0.8
tags = ["test"]
prompt = "portrait photo of {{subject}}, studio light"
negative_prompt = "blurry"

[name]
en = "{name_en}"
zh = "{name_zh}"

[description]
en = "A test style."
zh = "测试风格。"

[sampler]
scheduler = "dpmpp_2m"
steps = 20
guidance_scale = 7.0
width = 512
height = 768
"""


def write_style(folder: Path, style_id: str, text: str | None = None, **names: str) -> Path:
    """Writes a style file (valid unless `text` is given) and returns its path."""
    if text is None:
        text = VALID.format(id=style_id, name_en=names.get("en", f"Name {style_id}"),
                            name_zh=names.get("zh", f"风格{style_id}"))
    path = folder / f"{style_id}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shipped() -> StyleCatalog:
    return load_styles(DEFAULT_STYLES_DIR)


@pytest.fixture
def small(tmp_path: Path) -> StyleCatalog:
    write_style(tmp_path, "hanfu", en="Hanfu", zh="汉服")
    write_style(tmp_path, "business_headshot", en="Business Headshot", zh="商务形象照")
    write_style(tmp_path, "dunhuang", en="Dunhuang Apsara", zh="敦煌飞天")
    return load_styles(tmp_path)


# --- the shipped catalogue ---------------------------------------------------------------

def test_every_shipped_file_loads_with_id_equal_to_stem(shipped: StyleCatalog) -> None:
    files = sorted(DEFAULT_STYLES_DIR.glob("*.toml"))
    assert len(files) >= 30
    assert len(shipped) == len(files)
    assert sorted(shipped.ids()) == sorted(p.stem for p in files)
    assert len(set(shipped.ids())) == len(shipped)
    for path in files:
        assert load_style(path).id == path.stem


def test_shipped_catalogue_covers_the_seed_themes(shipped: StyleCatalog) -> None:
    assert REQUIRED_THEMES <= set(shipped.ids())
    families = {s.family for s in shipped}
    assert families == {"sd15", "sdxl"}


def test_shipped_catalogue_is_past_facechains(shipped: StyleCatalog) -> None:
    assert len(shipped) >= 100
    assert len([s for s in shipped if s.family == "sdxl"]) >= 25
    assert DYNASTIES <= set(shipped.ids())
    for tag in ("professional", "celebration", "romantic", "youth", "season", "film", "fashion", "fantasy", "game",
                "travel", "art"):
        assert len(shipped.with_tag(tag)) >= 3, tag
    # Photo-real styles name the community bases FaceChain's styles run on.
    assert {s.base for s in shipped if s.base} == {"majicmix-realistic-v7", "leosam-moonfilm-2",
                                                    "leosam-helloworld-xl"}


def test_shipped_styles_have_chinese_names_and_descriptions(shipped: StyleCatalog) -> None:
    for style in shipped:
        assert CJK.search(style.name.zh), style.id
        assert CJK.search(style.description.zh), style.id
        assert not CJK.search(style.name.en) and not CJK.search(style.prompt), style.id


def test_shipped_sizes_suit_their_family(shipped: StyleCatalog) -> None:
    for style in shipped:
        pixels = style.sampler.width * style.sampler.height
        if style.family == "sdxl":
            assert pixels >= 768 * 768, style.id
        else:
            assert pixels <= 768 * 768, style.id


def test_shipped_prompts_fit_the_clip_context(shipped: StyleCatalog) -> None:
    # CLIP keeps 77 tokens; words plus punctuation is a lower bound of the BPE count,
    # so staying under 60 leaves room for the subject and for words split into pieces.
    for style in shipped:
        prompt = render_prompt(style, "a young woman with short hair")
        assert len(re.findall(r"\w+|[^\w\s]", prompt)) < 60, style.id


def test_shipped_loras_name_a_hub_repo_and_safetensors(shipped: StyleCatalog) -> None:
    with_lora = [s for s in shipped if s.lora is not None]
    assert with_lora, "at least one style shows how a style LoRA is declared"
    for style in with_lora:
        assert style.lora.source.startswith(("hf:", "https://")), style.id
        assert style.lora.file.endswith(".safetensors")
        assert style.family == "sdxl", "the shipped LoRAs were trained on SDXL"


def test_scheduler_names_map_to_real_diffusers_classes() -> None:
    import diffusers

    assert set(get_args(SchedulerName)) == set(SCHEDULERS)
    for name, (class_name, extra) in SCHEDULERS.items():
        cls = getattr(diffusers, class_name)
        scheduler = cls.from_config(cls().config, **extra)
        for key, value in extra.items():
            assert scheduler.config[key] == value, name


# --- validation of broken files ------------------------------------------------------------

BROKEN = {
    "bad_toml": (lambda s: s.replace('family = "sd15"', "family = sd15"), ""),
    "missing_key": (lambda s: s.replace('zh = "坏风格"\n', ""), "name.zh"),
    "id_not_lowercase": (lambda s: s.replace('id = "broken"', 'id = "Broken"'), "id"),
    "id_not_stem": (lambda s: s.replace('id = "broken"', 'id = "other"'), "id"),
    "width_not_multiple_of_8": (lambda s: s.replace("width = 512", "width = 500"), "sampler.width"),
    "size_too_large_for_family": (lambda s: s.replace("height = 768", "height = 1536"), "sampler.height"),
    "unknown_scheduler": (lambda s: s.replace('"dpmpp_2m"', '"turbo"'), "sampler.scheduler"),
    "steps_as_string": (lambda s: s.replace("steps = 20", 'steps = "20"'), "sampler.steps"),
    "prompt_without_subject": (lambda s: s.replace("{subject}", "a person"), "prompt"),
    "prompt_with_other_field": (lambda s: s.replace("studio light", "{light}"), "prompt"),
    "misspelt_key": (lambda s: s.replace("negative_prompt", "negativ_prompt"), "negativ_prompt"),
    "identity_too_strong": (lambda s: s.replace("identity_weight = 0.8", "identity_weight = 2.0"), "identity_weight"),
    "bad_family": (lambda s: s.replace('family = "sd15"', 'family = "flux"'), "family"),
    "lora_weight_out_of_range": (
        lambda s: s + '\n[lora]\nsource = "hf:owner/repo"\nfile = "x.safetensors"\nweight = 3.0\n', "lora.weight"),
    "lora_bad_source": (
        lambda s: s + '\n[lora]\nsource = "owner/repo"\nfile = "x.safetensors"\nweight = 1.0\n', "lora.source"),
    "lora_path_escape": (
        lambda s: s + '\n[lora]\nsource = "hf:owner/repo"\nfile = "../x.safetensors"\nweight = 1.0\n', "lora.file"),
    "preview_missing": (lambda s: s.replace("tags =", 'preview = "previews/none.jpg"\ntags ='), "preview"),
    "preview_outside": (lambda s: s.replace("tags =", 'preview = "../secret.png"\ntags ='), "preview"),
    "bad_tag": (lambda s: s.replace('["test"]', '["Test Tag"]'), "tags"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_is_reported_with_path_and_key(tmp_path: Path, case: str) -> None:
    transform, key = BROKEN[case]
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    styles = tmp_path / "styles"
    styles.mkdir()
    write_style(styles, "good")
    text = VALID.format(id="broken", name_en="Broken", name_zh="坏风格")
    changed = transform(text)
    assert changed != text, "the case must change the file"
    bad = write_style(styles, "broken", changed)

    with pytest.raises(StyleError) as info:
        load_styles(styles)

    assert info.value.paths == (bad,)
    assert str(bad) in str(info.value)
    assert key in {p.key for p in info.value.problems}, info.value


def test_every_bad_file_is_listed_in_one_error(tmp_path: Path) -> None:
    write_style(tmp_path, "good")
    first = write_style(tmp_path, "a_bad", "id = ")
    text = VALID.format(id="z_bad", name_en="Z", name_zh="坏").replace("steps = 20", "steps = 0")
    second = write_style(tmp_path, "z_bad", text)

    with pytest.raises(StyleError) as info:
        load_styles(tmp_path)

    assert info.value.paths == (first, second)
    assert {p.key for p in info.value.problems if p.path == second} == {"sampler.steps"}


def test_names_that_would_make_lookup_ambiguous_are_rejected(tmp_path: Path) -> None:
    write_style(tmp_path, "hanfu", en="Hanfu", zh="汉服")
    clash = write_style(tmp_path, "hanfu_two", en="Hanfu Two", zh="汉服")
    with pytest.raises(StyleError) as info:
        load_styles(tmp_path)
    assert info.value.paths == (clash,)
    assert info.value.problems[0].key == "name.zh"


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StyleError, match="no style files"):
        load_styles(tmp_path)
    with pytest.raises(StyleError, match="not found"):
        load_styles(tmp_path / "absent")


def test_preview_resolves_inside_the_styles_folder(tmp_path: Path) -> None:
    (tmp_path / "previews").mkdir()
    image = tmp_path / "previews" / "p.png"
    image.write_bytes(b"\x89PNG")
    text = VALID.format(id="p", name_en="P", name_zh="预览").replace("tags =", 'preview = "previews/p.png"\ntags =')
    write_style(tmp_path, "p", text)
    style = load_styles(tmp_path).get("p")
    assert style is not None and style.preview == image.resolve()
    assert style.lora is None and style.sort == 100


# --- lookup, paging, prompts -----------------------------------------------------------------

@pytest.mark.parametrize("query", ["hanfu", "HanFu", "  HANFU ", "汉服", "Ｈａｎｆｕ"])
def test_find_matches_id_and_names_ignoring_case_and_width(small: StyleCatalog, query: str) -> None:
    assert small.find(query).id == "hanfu"


@pytest.mark.parametrize("query", ["business headshot", "Business-Headshot", "商务形象照"])
def test_find_matches_multiword_names(small: StyleCatalog, query: str) -> None:
    assert small.find(query).id == "business_headshot"


def test_unknown_style_suggests_close_matches_in_the_users_language(small: StyleCatalog) -> None:
    with pytest.raises(UnknownStyle) as info:
        small.find("hanfoo", "zh")
    error = info.value
    assert error.code == "style.unknown"
    assert error.suggestions == ("hanfu",)
    assert "汉服" in error.details["suggestions"]
    text = t(error.code, "zh", **error.details)
    assert "hanfoo" in text and "汉服" in text

    with pytest.raises(UnknownStyle) as info:
        small.find("headshot", "en")
    assert info.value.suggestions == ("business_headshot",)
    assert "Business Headshot" in t(info.value.code, "en", **info.value.details)

    with pytest.raises(UnknownStyle) as info:
        small.find("敦煌", "zh")
    assert info.value.suggestions == ("dunhuang",)


def test_unknown_style_without_any_match_has_its_own_message(small: StyleCatalog) -> None:
    with pytest.raises(UnknownStyle) as info:
        small.find("qqqqzz")
    assert info.value.code == "style.unknown_no_match"
    assert info.value.suggestions == ()
    assert "qqqqzz" in t(info.value.code, "en", **info.value.details)


def test_get_is_exact_and_returns_none_for_stale_ids(small: StyleCatalog) -> None:
    assert small.get("hanfu") is small["hanfu"]
    assert small.get("Hanfu") is None
    assert "dunhuang" in small and "nope" not in small


@pytest.mark.parametrize("per_page", [1, 7, 8, 100])
def test_pages_cover_every_style_once_in_menu_order(shipped: StyleCatalog, per_page: int) -> None:
    first = shipped.page(0, per_page)
    seen = []
    for number in range(first.total_pages):
        page = shipped.page(number, per_page)
        assert 0 < len(page.styles) <= per_page
        assert page.has_previous == (number > 0)
        assert page.has_next == (number < first.total_pages - 1)
        seen.extend(s.id for s in page.styles)
    assert seen == shipped.ids()
    assert [(s.sort, s.id) for s in shipped] == sorted((s.sort, s.id) for s in shipped)
    with pytest.raises(ValueError):
        shipped.page(first.total_pages, per_page)
    with pytest.raises(ValueError):
        shipped.page(-1, per_page)


def test_page_size_must_be_positive(small: StyleCatalog) -> None:
    with pytest.raises(ValueError, match="per_page"):
        small.page(0, 0)


def test_render_prompt_fills_the_subject(shipped: StyleCatalog) -> None:
    for style in shipped:
        prompt = render_prompt(style, "a man")
        assert "a man" in prompt and "{" not in prompt and "}" not in prompt, style.id
    hanfu = shipped["hanfu"]
    assert render_prompt(hanfu, " a {tall} person ").startswith("portrait photo of a {tall} person wearing")
    with pytest.raises(ValueError):
        render_prompt(hanfu, "  ")


def test_filters_by_family_and_tag(shipped: StyleCatalog) -> None:
    sd15 = shipped.only(["sd15"])
    assert 0 < len(sd15) < len(shipped)
    assert all(s.family == "sd15" for s in sd15)
    traditional = shipped.with_tag("traditional")
    assert "hanfu" in {s.id for s in traditional}
    assert all("traditional" in s.tags for s in traditional)
