"""The template library: photos and paintings a user's face is painted into (``templates/<id>.toml``).

Each file names a picture that may be redistributed (public domain or CC0) by its pinned source URL, licence,
size and, where known, sha256; the operator fetches the pictures like models (``facechain-bot models pull
templates``: every template is a manifest entry ``template-<id>`` of the feature ``templates``, stored at
``models_dir/templates/<picture>``). A template is offered once its picture is there. ``faces`` says how many
people it shows: /template takes one-face templates; duo portraits take the two-face ones::

    id = "mona_lisa"
    faces = 1
    picture = "mona_lisa.jpg"                     # file name under models_dir/templates/
    source = "https://upload.wikimedia.org/..."   # the pinned file
    page = "https://commons.wikimedia.org/..."    # where its licence is stated
    licence = "public-domain"
    size = 90_000_000                             # bytes (an estimate while verified = false)
    verified = false                              # true: size and sha256 checked against the real file
    prompt = "renaissance oil painting"           # optional hints for the repainted region
    credit = "Leonardo da Vinci, c. 1503-1519"
    facts_from = "..."                            # where the facts above came from
    [name]
    en = "Mona Lisa"
    zh = "蒙娜丽莎"
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from facechain_core.datafiles import REPO_ROOT, load_folder, match_key
from facechain_core.manifest import ModelEntry, parse_source
from facechain_core.styles import ID_PATTERN, LocalizedText

DEFAULT_TEMPLATES_DIR = REPO_ROOT / "templates"
FEATURE = "templates"  # `models pull templates` fetches every picture
FOLDER = "templates"  # under models_dir
MODEL_PREFIX = "template-"
LICENCES = frozenset({"public-domain", "cc0-1.0"})  # redistribution without conditions
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class TemplateEntry(BaseModel):
    """One template of the library."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: LocalizedText
    faces: int = Field(ge=1, le=4)
    picture: str
    source: str
    page: str = Field(pattern=r"^https://")
    licence: str
    size: int = Field(gt=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    verified: bool
    prompt: str = ""
    credit: str
    facts_from: str = Field(min_length=10)
    sort: int = 100

    @field_validator("picture")
    @classmethod
    def _check_picture(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith(".") or not value.lower().endswith(PICTURE_SUFFIXES):
            raise ValueError(f"must be a plain file name ending in {', '.join(PICTURE_SUFFIXES)}, got {value!r}")
        return value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(f"must be a pinned https:// URL, got {value!r}")
        parse_source(value)
        return value

    @field_validator("licence")
    @classmethod
    def _check_licence(cls, value: str) -> str:
        if value not in LICENCES:
            raise ValueError(f"templates must be free to redistribute ({', '.join(sorted(LICENCES))}), got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_verified(self) -> TemplateEntry:
        if self.verified and self.sha256 is None:
            raise ValueError("verified: a picture can only be verified against a sha256; add it or set false")
        return self

    @property
    def model_name(self) -> str:
        return MODEL_PREFIX + self.id

    def display_name(self, lang: str | None = None) -> str:
        return self.name.get(lang)

    def picture_path(self, models_dir: Path) -> Path:
        return Path(models_dir) / FOLDER / self.picture

    def manifest_entry(self) -> ModelEntry:
        """The template's picture as a model of the manifest, so ``models pull templates`` fetches it."""
        return ModelEntry(
            name=self.model_name, features=(FEATURE,), source=parse_source(self.source), mirrors=(),
            path=f"{FOLDER}/{self.picture}", size=self.size, sha256=self.sha256, licence=self.licence,
            licence_url=self.page, non_commercial=False, verified=self.verified, facts_from=self.facts_from,
            notes=f"Template picture: {self.credit}.")


class TemplateLibrary:
    """Templates in menu order (sort, then id), found by id or name in either language."""

    def __init__(self, entries: Iterable[TemplateEntry]) -> None:
        self._entries = sorted(entries, key=lambda e: (e.sort, e.id))
        ids = [e.id for e in self._entries]
        if len(set(ids)) != len(ids):
            raise ValueError("template ids must be unique")
        pictures = [e.picture for e in self._entries]
        if len(set(pictures)) != len(pictures):
            raise ValueError("template picture names must be unique")

    def __iter__(self) -> Iterator[TemplateEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, template_id: str) -> TemplateEntry | None:
        return next((e for e in self._entries if e.id == template_id), None)

    def find(self, text: str) -> TemplateEntry | None:
        """The template whose id or name (any language, ignoring case and separators) is `text`."""
        wanted = match_key(text)
        return next((e for e in self._entries
                     if wanted in {match_key(e.id), match_key(e.name.en), match_key(e.name.zh)}), None)

    def with_faces(self, faces: int) -> TemplateLibrary:
        """The templates showing exactly `faces` people."""
        return TemplateLibrary(e for e in self._entries if e.faces == faces)

    def installed(self, models_dir: Path, overrides: dict | None = None) -> TemplateLibrary:
        """The templates whose picture is in place (or named by ``[model_paths] template-<id>``)."""
        return TemplateLibrary(e for e in self._entries if self.picture(e, models_dir, overrides) is not None)

    @staticmethod
    def picture(entry: TemplateEntry, models_dir: Path, overrides: dict | None = None) -> Path | None:
        """Where the template's picture is, or None when it is not installed."""
        override = (overrides or {}).get(entry.model_name)
        path = Path(str(override)) if override else entry.picture_path(models_dir)
        return path if path.is_file() else None

    def page(self, number: int, per_page: int) -> tuple[list[TemplateEntry], int]:
        """The templates of page `number` (from 0) and the number of pages."""
        pages = max(1, math.ceil(len(self._entries) / per_page))
        if not 0 <= number < pages:
            raise ValueError(f"page must be within 0..{pages - 1}, got {number}")
        return self._entries[number * per_page:(number + 1) * per_page], pages



def load_templates(folder: Path = DEFAULT_TEMPLATES_DIR) -> TemplateLibrary:
    """Every template file of `folder`; raises DataFileError naming each bad file and key."""
    return TemplateLibrary(load_folder(folder, TemplateEntry))
