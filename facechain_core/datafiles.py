"""Folders of one TOML file per entry (``poses/``, ``templates/``), validated into pydantic models.

``load_folder(folder, Model)`` reads every ``*.toml``, checks that each file's ``id`` equals its name,
and raises one ``DataFileError`` naming every bad file and key, as the styles catalogue does.
"""
from __future__ import annotations

import tomllib
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent

M = TypeVar("M", bound=BaseModel)


class DataFileError(ValueError):
    """One or more data files are invalid; each line names the file and the key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(f"{len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems))


def load_file(path: Path, model: type[M], context: dict | None = None) -> M:
    """One validated entry; raises DataFileError naming the file and each bad key."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataFileError([f"{path}: cannot read: {exc}"]) from exc
    try:
        entry = model.model_validate(data, context=context)
    except ValidationError as exc:
        raise DataFileError([f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_url=False)]) from exc
    if getattr(entry, "id", path.stem) != path.stem:
        raise DataFileError([f"{path}: id: must equal the file name {path.stem!r}"])
    return entry


def load_folder(folder: Path, model: type[M], context: dict | None = None) -> list[M]:
    """Every ``*.toml`` of `folder`, in file-name order; all problems reported at once."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFileError([f"{folder}: folder not found"])
    entries, problems = [], []
    for path in sorted(folder.glob("*.toml")):
        try:
            entries.append(load_file(path, model, context))
        except DataFileError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataFileError(problems)
    return entries


def match_key(text: str) -> str:
    """`text` folded for matching names: width and case folded, only letters and digits kept."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())
