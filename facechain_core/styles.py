"""The styles catalogue: one TOML file per portrait style under ``styles/``.

Adding a style is adding a file ``styles/<id>.toml``::

    id = "hanfu"
    family = "sd15"                 # base model family: "sd15" or "sdxl"
    identity_weight = 0.85          # IP-Adapter scale, 0..1.5
    tags = ["traditional"]
    sort = 10                       # optional; lower comes first in menus
    prompt = "{subject} wearing ..."  # `{subject}` is replaced by e.g. "a woman"
    negative_prompt = "..."
    preview = "previews/hanfu.jpg"  # optional, relative to styles/, must exist
    base = "majicmix-realistic-v7"  # optional: a photo-real base of the family, by manifest name
                                    # (the family's default base when absent or not installed)

    [name]
    en = "Hanfu"
    zh = "汉服"

    [description]
    en = "..."
    zh = "..."

    [sampler]
    scheduler = "dpmpp_2m_karras"
    steps = 30
    guidance_scale = 7.0
    width = 512
    height = 768

    [lora]                          # optional: only where the style needs one
    source = "hf:owner/repo"        # or "hf:owner/repo@revision", or an https:// URL
    file = "style.safetensors"
    weight = 0.8                    # 0..2
    license = "apache-2.0"          # optional
    model = "style-lora-papercut"   # optional: its manifest entry (default "style-lora-<id>")

A style made in chat (/makestyle) names ``source = "local"``: its LoRA file lies beside its TOML
(published ones under ``data_dir/styles/``, the second folder `load_styles` reads).

`load_styles` validates every file and raises one `StyleError` naming each bad file and key.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
import string
import tomllib
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from facechain_core.errors import UserFacingError

logger = logging.getLogger(__name__)

DEFAULT_STYLES_DIR = Path(__file__).resolve().parent.parent / "styles"
DEFAULT_SORT = 100
DEFAULT_PER_PAGE = 8
SUBJECT_FIELD = "subject"
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
TAG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
PREVIEW_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PREVIEWS_DIR = "previews"  # under data_dir: rendered previews (`facechain-bot styles previews`)

Family = Literal["sd15", "sdxl"]
# Pixel limits per family: outside them the base model produces tiled or mushy images.
SIZE_LIMITS: dict[str, tuple[int, int]] = {"sd15": (256, 1024), "sdxl": (512, 2048)}

# Scheduler names a style may use -> (diffusers class name, overrides). Pass the overrides as
# keyword arguments, `cls.from_config(pipe.scheduler.config, **overrides)`: merged into the config
# dict they are dropped again for keys the base config lists under `_use_default_values`.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SchedulerName = Literal["ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "unipc"]

_HF_SOURCE = re.compile(r"^hf:[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_HTTPS_SOURCE = re.compile(r"^https://[^\s/]+\.[^\s/]+/\S+$")
LOCAL_SOURCE = "local"  # the LoRA file lies beside the style's TOML (styles made with /makestyle)
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"  # a manifest entry's name (facechain_core.manifest)
LORA_MODEL_PREFIX = "style-lora-"


class _Strict(BaseModel):
    # strict: TOML is typed, so "30" for steps is a mistake to report, not to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=True)


class LocalizedText(_Strict):
    """A text in every catalogue language."""

    en: str = Field(min_length=1)
    zh: str = Field(min_length=1)

    def get(self, lang: str | None) -> str:
        """Returns the text in `lang`, falling back to English."""
        return self.zh if lang == "zh" else self.en


class StyleLora(_Strict):
    """A style LoRA to fuse at `weight`, found through the model manifest by source and file."""

    source: str
    file: str
    weight: float = Field(ge=0.0, le=2.0)
    license: str | None = None
    model: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if not (_HF_SOURCE.match(value) or _HTTPS_SOURCE.match(value) or value == LOCAL_SOURCE):
            raise ValueError(f"must be 'hf:owner/repo[@revision]', an https:// URL or 'local', got {value!r}")
        return value

    @field_validator("file")
    @classmethod
    def _check_file(cls, value: str) -> str:
        parts = PurePosixPath(value).parts
        if not value.endswith(".safetensors") or value.startswith("/") or ".." in parts or "\\" in value:
            raise ValueError(f"must be a relative .safetensors path inside the source, got {value!r}")
        return value


class Sampler(_Strict):
    """Sampler settings for one style."""

    scheduler: SchedulerName
    steps: int = Field(ge=1, le=150)
    guidance_scale: float = Field(ge=0.0, le=30.0)
    width: int
    height: int

    @field_validator("width", "height")
    @classmethod
    def _check_multiple_of_8(cls, value: int) -> int:
        if value <= 0 or value % 8:
            raise ValueError(f"must be a positive multiple of 8, got {value}")
        return value


class Style(_Strict):
    """One validated portrait style."""

    id: str
    name: LocalizedText
    description: LocalizedText
    family: Family
    prompt: str = Field(min_length=1)
    negative_prompt: str
    lora: StyleLora | None = None
    identity_weight: float = Field(ge=0.0, le=1.5)
    sampler: Sampler
    fast: bool = True  # false: fast mode (facechain_core.accelerators) leaves this style at its own sampler
    preview: Path | None = None
    tags: tuple[str, ...] = Field(default=(), strict=False)  # TOML arrays arrive as lists
    sort: int = DEFAULT_SORT
    base: str | None = Field(default=None, pattern=MODEL_NAME_PATTERN)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not re.match(ID_PATTERN, value):
            raise ValueError(f"must be 1-48 lowercase letters, digits, '_' or '-', got {value!r}")
        return value

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"has unbalanced braces ({exc}); only {{{SUBJECT_FIELD}}} is allowed") from exc
        if SUBJECT_FIELD not in fields:
            raise ValueError(f"must contain the {{{SUBJECT_FIELD}}} placeholder")
        others = sorted(set(fields) - {SUBJECT_FIELD})
        if others:
            raise ValueError(f"may only use the {{{SUBJECT_FIELD}}} placeholder, found {others}")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [tag for tag in value if not re.match(TAG_PATTERN, tag)]
        if bad:
            raise ValueError(f"tags must be lowercase words ([a-z0-9_-]), got {bad}")
        return value

    @field_validator("preview", mode="before")
    @classmethod
    def _resolve_preview(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError("must be a path relative to the styles folder")
        styles_dir = (info.context or {}).get("styles_dir")
        if styles_dir is None:
            raise ValueError("cannot be checked without the styles folder")
        root = Path(styles_dir).resolve()
        path = (root / value).resolve()
        if PurePosixPath(value).is_absolute() or not path.is_relative_to(root):
            raise ValueError(f"must stay inside the styles folder, got {value!r}")
        if path.suffix.lower() not in PREVIEW_SUFFIXES:
            raise ValueError(f"must be one of {', '.join(PREVIEW_SUFFIXES)}, got {value!r}")
        if not path.is_file():
            raise ValueError(f"file not found: {value!r}")
        return path

    @model_validator(mode="after")
    def _check_size_for_family(self) -> Style:
        low, high = SIZE_LIMITS[self.family]
        for key in ("width", "height"):
            value = getattr(self.sampler, key)
            if not low <= value <= high:
                raise ValueError(f"sampler.{key}: must be within {low}..{high} for family {self.family}, got {value}")
        return self

    def display_name(self, lang: str | None = None) -> str:
        """Returns the style's name in `lang` (English fallback)."""
        return self.name.get(lang)

    @property
    def lora_model(self) -> str | None:
        """The manifest name of the style's LoRA (None without one)."""
        if self.lora is None:
            return None
        return self.lora.model or f"{LORA_MODEL_PREFIX}{self.id}"

    def content_hash(self) -> str:
        """A short hash of everything that shapes the style's pictures (not its names or menu place)."""
        keep = self.model_dump(mode="json", include={"family", "prompt", "negative_prompt", "lora",
                                                     "identity_weight", "sampler", "base"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StyleProblem:
    """One reason a style file was rejected."""

    path: Path
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.message}" if self.key else f"{self.path}: {self.message}"


class StyleError(Exception):
    """One or more style files are invalid; every problem names its file and key."""

    def __init__(self, problems: Sequence[StyleProblem]) -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the styles catalogue:\n{lines}")

    @property
    def paths(self) -> tuple[Path, ...]:
        """Returns each bad file once, in the order found."""
        return tuple(dict.fromkeys(p.path for p in self.problems))


class UnknownStyle(UserFacingError):
    """No style matches the user's query; `suggestions` holds the ids of close matches."""

    def __init__(self, query: str, suggestions: Sequence[Style], lang: str | None) -> None:
        self.suggestions = tuple(s.id for s in suggestions)
        if suggestions:
            sep, fmt = ("、", "{}（{}）") if lang == "zh" else (", ", "{} ({})")
            text = sep.join(fmt.format(s.id, s.display_name(lang)) for s in suggestions)
            super().__init__("style.unknown", name=query, suggestions=text, suggestion_ids=list(self.suggestions))
        else:
            super().__init__("style.unknown_no_match", name=query)


@dataclass(frozen=True)
class StylePage:
    """One page of the catalogue for a paged menu; `number` counts from 0."""

    number: int
    total_pages: int
    styles: tuple[Style, ...]

    @property
    def has_previous(self) -> bool:
        return self.number > 0

    @property
    def has_next(self) -> bool:
        return self.number + 1 < self.total_pages


def _normalise(text: str) -> str:
    """Folds width, case and separators so 'Business Headshot' matches 'business_headshot'."""
    folded = unicodedata.normalize("NFKC", text).casefold().strip()
    return re.sub(r"[\s_\-]+", "_", folded)


class StyleCatalog:
    """Validated styles in menu order (sort, then id)."""

    def __init__(self, styles: Iterable[Style]) -> None:
        self._styles = tuple(sorted(styles, key=lambda s: (s.sort, s.id)))
        self._by_id = {s.id: s for s in self._styles}
        if len(self._by_id) != len(self._styles):
            raise ValueError("style ids must be unique")
        self._keys: dict[str, Style] = {}
        for style in self._styles:
            for key in (style.id, style.name.en, style.name.zh):
                self._keys.setdefault(_normalise(key), style)

    def __len__(self) -> int:
        return len(self._styles)

    def __iter__(self) -> Iterator[Style]:
        return iter(self._styles)

    def __contains__(self, style_id: object) -> bool:
        return style_id in self._by_id

    def __getitem__(self, style_id: str) -> Style:
        return self._by_id[style_id]

    def ids(self) -> list[str]:
        """Returns every style id in menu order."""
        return [s.id for s in self._styles]

    def get(self, style_id: str) -> Style | None:
        """Returns the style with exactly this id, or None (e.g. for a stale button)."""
        return self._by_id.get(style_id)

    def find(self, query: str, lang: str | None = None) -> Style:
        """Returns the style whose id or name (any language) matches `query`, ignoring case.

        Raises `UnknownStyle` (a user-facing error) with close matches otherwise.
        """
        key = _normalise(query)
        if key in self._keys:
            return self._keys[key]
        raise UnknownStyle(query.strip(), self.suggest(query), lang)

    def suggest(self, query: str, limit: int = 3) -> list[Style]:
        """Returns up to `limit` styles whose id or name contains or resembles `query`."""
        key = _normalise(query)
        if not key:
            return []
        found: dict[str, Style] = {}
        for name, style in self._keys.items():
            if key in name or (len(name) >= 2 and name in key):
                found.setdefault(style.id, style)
        for name in difflib.get_close_matches(key, list(self._keys), n=limit * 3, cutoff=0.6):
            found.setdefault(self._keys[name].id, self._keys[name])
        return list(found.values())[:limit]

    def page(self, number: int, per_page: int = DEFAULT_PER_PAGE) -> StylePage:
        """Returns page `number` (from 0) of `per_page` styles."""
        if per_page < 1:
            raise ValueError(f"per_page must be at least 1, got {per_page}")
        total = max(1, math.ceil(len(self._styles) / per_page))
        if not 0 <= number < total:
            raise ValueError(f"page must be within 0..{total - 1}, got {number}")
        start = number * per_page
        return StylePage(number, total, self._styles[start : start + per_page])

    def with_tag(self, tag: str) -> list[Style]:
        """Returns the styles carrying `tag`, in menu order."""
        return [s for s in self._styles if tag in s.tags]

    def only(self, families: Iterable[str]) -> StyleCatalog:
        """Returns the sub-catalogue whose base family is installed."""
        wanted = set(families)
        return StyleCatalog(s for s in self._styles if s.family in wanted)


def preview_path(data_dir: Path, style: Style) -> Path:
    """Where `styles previews` caches the style's rendered preview: named by the style's content hash, so an
    edited style is rendered again and a stale picture is never shown for it."""
    return Path(data_dir) / PREVIEWS_DIR / f"{style.id}-{style.content_hash()}.jpg"


def find_preview(data_dir: Path, style: Style) -> Path | None:
    """The style's rendered preview if cached, else the picture its file names (``preview``), else None."""
    rendered = preview_path(data_dir, style)
    if rendered.is_file():
        return rendered
    return style.preview if style.preview is not None and style.preview.is_file() else None


def lora_feature(style_id: str) -> str:
    """The manifest feature of one style's LoRA, so a running bot knows which style LoRAs are installed."""
    return "style-" + style_id.replace("_", "-")


def render_prompt(style: Style, subject: str) -> str:
    """Returns the style's prompt with the identity subject phrase (e.g. 'a woman') filled in."""
    subject = subject.strip()
    if not subject:
        raise ValueError("subject must not be empty")
    return style.prompt.format(**{SUBJECT_FIELD: subject})


def _problems_from_validation(path: Path, error: ValidationError) -> list[StyleProblem]:
    problems = []
    for item in error.errors(include_url=False):
        key = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not key and (found := re.match(r"^([\w.]+): (.*)$", message)):
            # Whole-model checks name their key at the front of the message.
            key, message = found.groups()
        problems.append(StyleProblem(path, key, message))
    return problems


def load_style(path: Path, styles_dir: Path | None = None) -> Style:
    """Parses and validates one style file; raises `StyleError` naming the file and key."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise StyleError([StyleProblem(path, "", f"invalid TOML: {exc}")]) from exc
    except OSError as exc:
        raise StyleError([StyleProblem(path, "", f"cannot read: {exc.strerror or exc}")]) from exc
    try:
        style = Style.model_validate(data, context={"styles_dir": styles_dir or path.parent})
    except ValidationError as exc:
        raise StyleError(_problems_from_validation(path, exc)) from exc
    if style.id != path.stem:
        raise StyleError([StyleProblem(path, "id", f"must equal the file name {path.stem!r}, got {style.id!r}")])
    return style


def load_styles(styles_dir: Path = DEFAULT_STYLES_DIR, published_dir: Path | None = None) -> StyleCatalog:
    """Loads every ``*.toml`` in `styles_dir`, then in `published_dir` (styles published from chat, when
    the folder exists); raises one `StyleError` listing every bad file."""
    styles_dir = Path(styles_dir)
    if not styles_dir.is_dir():
        raise StyleError([StyleProblem(styles_dir, "", "styles folder not found")])
    styles: list[tuple[Path, Style]] = []
    problems: list[StyleProblem] = []
    folders = [styles_dir] + ([Path(published_dir)] if published_dir is not None and Path(published_dir).is_dir() else [])
    for folder in folders:
        for path in sorted(folder.glob("*.toml")):
            try:
                styles.append((path, load_style(path, folder)))
            except StyleError as exc:
                problems.extend(exc.problems)
    problems.extend(_name_clashes(styles))
    if not styles and not problems:
        problems.append(StyleProblem(styles_dir, "", "no style files (*.toml) found"))
    if problems:
        raise StyleError(problems)
    logger.info("loaded %d styles from %s", len(styles), ", ".join(str(f) for f in folders))
    return StyleCatalog(style for _, style in styles)


def _name_clashes(styles: Sequence[tuple[Path, Style]]) -> list[StyleProblem]:
    """Reports names that would make `find` ambiguous (same text as another style's id or name)."""
    owners: dict[str, tuple[Path, str]] = {}
    problems = []
    for path, style in styles:
        keys = {_normalise(style.id): "id", _normalise(style.name.en): "name.en", _normalise(style.name.zh): "name.zh"}
        for text, key in keys.items():
            if text in owners and owners[text][0] != path:
                other = owners[text][0]
                problems.append(StyleProblem(path, key, f"clashes with {owners[text][1]} of {other.name}"))
            else:
                owners.setdefault(text, (path, key))
    return problems
