"""The model manifest: which weights each feature loads, where they come from, what we know of them.

The data lives in ``facechain_core/models.toml``; this module parses and validates it, tells what is
installed under ``models_dir`` (``status``) and hands pipelines the path of a model they need
(``require``), raising ``ModelNotInstalled`` with the exact pull command when it is missing.
Downloading is ``facechain_core.pull``'s job; a pipeline never downloads.

Sources are written as:

* ``hf:owner/repo/path/to/file@revision`` - one file of a Hugging Face repo;
* ``hf:owner/repo@revision`` - a snapshot of the files of a repo matching ``allow_patterns``;
* ``https://...`` (or ``http://``) - one file from a plain URL, e.g. a GitHub release asset.

What a pull verified (the hub's hash when the manifest has none, the files of a snapshot) is kept
in ``models_dir/models.lock.json``, never written back into the package.

Operators name what to pull by feature (``portrait``), by model (``sd15``) or ``all``; model names
and feature names never overlap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from facechain_core.errors import ModelNotInstalled

logger = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path(__file__).with_name("models.toml")
LOCK_FILE = "models.lock.json"
STAGING_DIR = ".pull"  # per-model folders of unfinished downloads (hub files, .part files of URLs)
PULL_COMMAND = "facechain-bot models pull"
ACCEPT_FLAG = "--accept-license"
SCHEMA = 1

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_FEATURE_RE = re.compile(r"[a-z0-9][a-z0-9-]*")
_LICENCE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REPO_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASH_CHUNK = 4 * 1024 * 1024

_REQUIRED = ("name", "features", "source", "path", "size", "licence", "non_commercial", "verified", "facts_from")
_OPTIONAL = ("sha256", "mirrors", "allow_patterns", "licence_url", "notes")


class ManifestError(ValueError):
    """The manifest file is malformed; the message names the entry and the key."""


class UnknownFeature(ValueError):
    """A name that is no feature (nor, where models may be named, a model) of the manifest."""

    def __init__(self, name: str, features: Iterable[str], models: Iterable[str] = ()) -> None:
        self.name = name
        self.features = sorted(features)
        self.models = list(models)
        known = f"known features: {', '.join(self.features)} (or 'all')"
        if self.models:
            known += f"; models: {', '.join(self.models)}"
        super().__init__(f"unknown {'feature or model' if self.models else 'feature'} {name!r}; {known}")


@dataclass(frozen=True)
class Source:
    """Where a model's bytes come from, parsed from its ``source`` string."""

    kind: Literal["hf", "url"]
    text: str
    repo_id: str = ""
    filename: str | None = None  # None: a snapshot of the repo
    revision: str = ""

    @property
    def is_snapshot(self) -> bool:
        return self.kind == "hf" and self.filename is None

    @property
    def url(self) -> str:
        return self.text


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest."""

    name: str
    features: tuple[str, ...]
    source: Source
    mirrors: tuple[Source, ...]
    path: str  # relative to models_dir; a folder for snapshots
    size: int  # bytes of the file, or of all files of a snapshot
    sha256: str | None
    licence: str
    licence_url: str | None
    non_commercial: bool
    verified: bool  # size/sha256 checked against the real bytes; false: taken from listings (see facts_from)
    facts_from: str
    allow_patterns: tuple[str, ...] = ()
    notes: str | None = None

    @property
    def is_snapshot(self) -> bool:
        return self.source.is_snapshot

    @property
    def sources(self) -> tuple[Source, ...]:
        return (self.source, *self.mirrors)


@dataclass(frozen=True)
class Manifest:
    """All model entries, in file order."""

    entries: tuple[ModelEntry, ...]
    path: Path | None = None

    def get(self, name: str) -> ModelEntry:
        """Returns the entry called `name`."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no model named {name!r} in the manifest {self.path}")

    def features(self) -> list[str]:
        """Returns every feature some entry serves, sorted."""
        return sorted({feature for entry in self.entries for feature in entry.features})

    def for_features(self, names: Iterable[str]) -> list[ModelEntry]:
        """Returns the entries serving any of `names` (``"all"``: every entry), in file order."""
        wanted = {names} if isinstance(names, str) else set(names)
        if "all" in wanted:
            return list(self.entries)
        known = set(self.features())
        for name in sorted(wanted - known):
            raise UnknownFeature(name, known)
        return [entry for entry in self.entries if wanted.intersection(entry.features)]

    def select(self, names: Iterable[str]) -> list[ModelEntry]:
        """Returns the entries named by features, model names or ``"all"``, in file order."""
        wanted = {names} if isinstance(names, str) else set(names)
        features = set(self.features())
        models = {entry.name for entry in self.entries}
        for name in sorted(wanted - features - models - {"all"}):
            raise UnknownFeature(name, features, [entry.name for entry in self.entries])
        if "all" in wanted:
            return list(self.entries)
        return [e for e in self.entries if e.name in wanted or wanted.intersection(e.features)]

    def licences_to_accept(self, entries: Iterable[ModelEntry]) -> list[str]:
        """Returns the non-commercial licences of `entries` that an operator must accept by name."""
        return sorted({entry.licence for entry in entries if entry.non_commercial})

    def pull_command(self, names: Iterable[str]) -> str:
        """Returns the exact CLI command that pulls `names` (features or models), with every licence flag."""
        names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
        licences = self.licences_to_accept(self.select(names))
        return " ".join([PULL_COMMAND, *names, *(f"{ACCEPT_FLAG} {licence}" for licence in licences)])

    def status(
        self, models_dir: Path | str, *, features: Iterable[str] | None = None, check_hash: bool = False
    ) -> list[ModelStatus]:
        """Returns the install state of each entry (of `features`, or model names, when given)."""
        entries = self.entries if features is None else self.select(features)
        lock = read_lock(models_dir)
        return [entry_status(models_dir, entry, lock=lock, check_hash=check_hash) for entry in entries]


class ModelState(str, Enum):
    """What ``status`` found for one model."""

    INSTALLED = "installed"  # present and matching what was verified
    UNVERIFIED = "unverified"  # present, but nothing trustworthy to check it against (placed by hand)
    MISSING = "missing"
    PARTIAL = "partial"  # a download was interrupted; pulling again resumes it
    SIZE_MISMATCH = "size mismatch"
    HASH_MISMATCH = "hash mismatch"


@dataclass(frozen=True)
class ModelStatus:
    """The install state of one entry under a models_dir."""

    entry: ModelEntry
    state: ModelState
    path: Path
    expected_size: int | None
    actual_size: int | None
    detail: str = ""

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def usable(self) -> bool:
        """Whether a pipeline may load it."""
        return self.state in (ModelState.INSTALLED, ModelState.UNVERIFIED)


# --- parsing -------------------------------------------------------------------------------


def parse_source(text: str) -> Source:
    """Parses a ``source`` string; raises ValueError saying what is wrong."""
    if text.startswith(("https://", "http://")):
        rest = text.split("://", 1)[1]
        if "/" not in rest or not rest.split("/", 1)[0]:
            raise ValueError(f"URL needs a host and a path, got {text!r}")
        return Source(kind="url", text=text)
    if not text.startswith("hf:"):
        raise ValueError(f"must start with 'hf:', 'https://' or 'http://', got {text!r}")
    body, sep, revision = text[3:].rpartition("@")
    if not sep or not revision or ("/" in revision and not revision.startswith("refs/")):
        raise ValueError(f"hf: sources need an explicit '@revision' (a commit, tag or branch), got {text!r}")
    parts = body.split("/")
    if len(parts) < 2 or not all(_REPO_PART_RE.fullmatch(p) for p in parts[:2]):
        raise ValueError(f"hf: sources are 'hf:owner/repo[/path/file]@revision', got {text!r}")
    filename = "/".join(parts[2:]) or None
    if filename is not None and any(p in ("", ".", "..") for p in parts[2:]):
        raise ValueError(f"bad file path in {text!r}")
    return Source(kind="hf", text=text, repo_id="/".join(parts[:2]), filename=filename, revision=revision)


def _fail(where: str, key: str, message: str) -> ManifestError:
    return ManifestError(f"{where}: key {key!r}: {message}")


def _check_type(where: str, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise _fail(where, key, f"must be {what}, got {value!r}")


def _str_list(where: str, key: str, value: Any, *, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    _check_type(where, key, value, list, "a list of strings")
    if not value:
        raise _fail(where, key, "must not be empty")
    for item in value:
        if not isinstance(item, str) or not item or (pattern is not None and not pattern.fullmatch(item)):
            raise _fail(where, key, f"bad item {item!r}")
    if len(set(value)) != len(value):
        raise _fail(where, key, f"has duplicates: {value!r}")
    return tuple(value)


def _check_path(where: str, value: Any) -> str:
    _check_type(where, "path", value, str, "a relative path")
    pure = PurePosixPath(value)
    if not value or "\\" in value or pure.is_absolute() or value.endswith("/"):
        raise _fail(where, "path", f"must be a relative POSIX path, got {value!r}")
    if any(part in ("..", ".") or part.startswith(".") for part in pure.parts):
        raise _fail(where, "path", f"must stay inside models_dir with no hidden parts, got {value!r}")
    if value == LOCK_FILE:
        raise _fail(where, "path", f"{value!r} is reserved for the pull records")
    return str(pure)


def _parse_entry(raw: Any, index: int) -> ModelEntry:
    where = f"model #{index + 1}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be a table, got {raw!r}")
    if isinstance(raw.get("name"), str):
        where = f"model #{index + 1} ({raw['name']!r})"
    for key in _REQUIRED:
        if key not in raw:
            raise _fail(where, key, "is required")
    for key in raw:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise _fail(where, key, f"is not a known key (known: {', '.join(_REQUIRED + _OPTIONAL)})")

    name = raw["name"]
    _check_type(where, "name", name, str, "a string")
    if not _NAME_RE.fullmatch(name):
        raise _fail(where, "name", f"must be lowercase letters, digits, '.', '_' or '-', got {name!r}")
    features = _str_list(where, "features", raw["features"], pattern=_FEATURE_RE)
    if "all" in features or name in features:
        raise _fail(where, "features", f"'all' and the model's own name {name!r} cannot be features")

    _check_type(where, "source", raw["source"], str, "a string")
    try:
        source = parse_source(raw["source"])
    except ValueError as exc:
        raise _fail(where, "source", str(exc)) from None
    mirrors: tuple[Source, ...] = ()
    if "mirrors" in raw:
        texts = _str_list(where, "mirrors", raw["mirrors"])
        try:
            mirrors = tuple(parse_source(text) for text in texts)
        except ValueError as exc:
            raise _fail(where, "mirrors", str(exc)) from None
    for mirror in mirrors:
        if mirror.is_snapshot != source.is_snapshot:
            kind = "snapshot" if source.is_snapshot else "file"
            raise _fail(where, "mirrors", f"{mirror.text!r} must be a {kind} too, like the source")

    path = _check_path(where, raw["path"])
    size = raw["size"]
    _check_type(where, "size", size, int, "a positive integer (bytes)")
    if size <= 0:
        raise _fail(where, "size", f"must be a positive integer (bytes), got {size!r}")

    sha256 = raw.get("sha256")
    if sha256 is not None:
        _check_type(where, "sha256", sha256, str, "64 lowercase hex digits")
        if not _SHA256_RE.fullmatch(sha256):
            raise _fail(where, "sha256", f"must be 64 lowercase hex digits, got {sha256!r}")
        if source.is_snapshot:
            raise _fail(where, "sha256", "a snapshot has one hash per file; they are recorded in the lock file")

    licence = raw["licence"]
    _check_type(where, "licence", licence, str, "a licence id")
    if not _LICENCE_RE.fullmatch(licence):
        raise _fail(where, "licence", f"must be a lowercase licence id like 'apache-2.0', got {licence!r}")
    licence_url = raw.get("licence_url")
    if licence_url is not None:
        _check_type(where, "licence_url", licence_url, str, "a URL")
        if not licence_url.startswith("https://"):
            raise _fail(where, "licence_url", f"must be an https URL, got {licence_url!r}")
    for key in ("non_commercial", "verified"):
        _check_type(where, key, raw[key], bool, "true or false")
    facts_from = raw["facts_from"]
    _check_type(where, "facts_from", facts_from, str, "a sentence saying where size, hash and licence came from")
    if not facts_from.strip():
        raise _fail(where, "facts_from", "must say where size, hash and licence came from")
    if raw["verified"] and not source.is_snapshot and sha256 is None:
        raise _fail(where, "verified", "a file can only be verified against a sha256; add it or set verified = false")

    allow_patterns: tuple[str, ...] = ()
    if source.is_snapshot:
        if "allow_patterns" not in raw:
            raise _fail(where, "allow_patterns", "a snapshot must list the files it takes (whole repos are huge)")
        allow_patterns = _str_list(where, "allow_patterns", raw["allow_patterns"])
    elif "allow_patterns" in raw:
        raise _fail(where, "allow_patterns", "only snapshot sources (hf:owner/repo@revision) take patterns")
    notes = raw.get("notes")
    if notes is not None:
        _check_type(where, "notes", notes, str, "a string")

    return ModelEntry(
        name=name,
        features=features,
        source=source,
        mirrors=mirrors,
        path=path,
        size=size,
        sha256=sha256,
        licence=licence,
        licence_url=licence_url,
        non_commercial=raw["non_commercial"],
        verified=raw["verified"],
        facts_from=facts_from,
        allow_patterns=allow_patterns,
        notes=notes,
    )


def parse_manifest(data: dict[str, Any], path: Path | None = None) -> Manifest:
    """Validates parsed TOML data and returns the manifest."""
    label = str(path) if path else "manifest"
    if data.get("schema") != SCHEMA:
        raise ManifestError(f"{label}: key 'schema': must be {SCHEMA}, got {data.get('schema')!r}")
    unknown = set(data) - {"schema", "model"}
    if unknown:
        raise ManifestError(f"{label}: unknown top-level keys {sorted(unknown)} (entries are [[model]] tables)")
    raw_entries = data.get("model", [])
    if not isinstance(raw_entries, list):
        raise ManifestError(f"{label}: key 'model': must be an array of [[model]] tables")
    entries: list[ModelEntry] = []
    for index, raw in enumerate(raw_entries):
        try:
            entry = _parse_entry(raw, index)
        except ManifestError as exc:
            raise ManifestError(f"{label}: {exc}") from None
        where = f"{label}: model #{index + 1} ({entry.name!r})"
        for other in entries:
            if other.name == entry.name:
                raise ManifestError(f"{where}: key 'name': {entry.name!r} is already used")
            if other.name in entry.features or entry.name in other.features:
                clash = other.name if other.name in entry.features else entry.name
                raise ManifestError(f"{where}: {clash!r} is both a model name and a feature; rename one")
            mine, theirs = PurePosixPath(entry.path), PurePosixPath(other.path)
            if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
                raise ManifestError(f"{where}: key 'path': {entry.path!r} overlaps {other.name!r} at {other.path!r}")
        entries.append(entry)
    return Manifest(entries=tuple(entries), path=path)


def load_manifest(path: Path | str | None = None) -> Manifest:
    """Loads and validates the manifest: the packaged ``models.toml`` with the template pictures of
    ``templates/`` (``facechain_core.templates``) by default, or the one file `path`."""
    packaged = path is None
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    manifest = parse_manifest(data, path)
    if packaged:
        from facechain_core.templates import DEFAULT_TEMPLATES_DIR, load_templates

        if DEFAULT_TEMPLATES_DIR.is_dir():
            extra = tuple(entry.manifest_entry() for entry in load_templates())
            manifest = Manifest(entries=manifest.entries + extra, path=path)
    return manifest


# --- what is on disk -----------------------------------------------------------------------


def model_path(models_dir: Path | str, entry: ModelEntry) -> Path:
    """Returns where `entry` lives under `models_dir` (a folder for snapshots)."""
    return Path(models_dir) / entry.path


def staging_path(models_dir: Path | str, entry: ModelEntry) -> Path:
    """Returns the folder where an unfinished download of `entry` waits to be resumed."""
    return Path(models_dir) / STAGING_DIR / entry.name


def hash_file(path: Path, *, git_blob: bool = False) -> tuple[str, str | None]:
    """Returns the file's sha256 and, when asked, its git blob sha1 (the hub's id of small files)."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git_blob:
        sha1 = hashlib.sha1(usedforsecurity=False)
        sha1.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def read_lock(models_dir: Path | str) -> dict[str, dict[str, Any]]:
    """Returns the pull records of `models_dir` by model name (empty when there are none)."""
    path = Path(models_dir) / LOCK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def _record_for(entry: ModelEntry, lock: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    record = lock.get(entry.name)
    # A record of another source or place describes other bytes: the manifest changed since the pull.
    if record and record.get("source") == entry.source.text and record.get("path") == entry.path:
        return record
    return None


_HAND_PLACED = "not pulled by facechain-bot; nothing to check it against"


def _file_status(entry: ModelEntry, target: Path, record: dict[str, Any] | None, check_hash: bool) -> ModelStatus:
    actual = target.stat().st_size
    if record is not None:
        size, sha256 = record.get("size"), record.get("sha256")
    elif entry.verified:
        size, sha256 = entry.size, entry.sha256
    else:
        size, sha256 = None, entry.sha256
    if size is not None and actual != size:
        detail = f"expected {size} bytes, found {actual}"
        return ModelStatus(entry, ModelState.SIZE_MISMATCH, target, size, actual, detail)
    if check_hash and sha256:
        found, _ = hash_file(target)
        if found != sha256:
            detail = f"sha256 {found}, expected {sha256}"
            return ModelStatus(entry, ModelState.HASH_MISMATCH, target, size, actual, detail)
    if size is None and not (check_hash and sha256):
        return ModelStatus(entry, ModelState.UNVERIFIED, target, entry.size, actual, _HAND_PLACED)
    return ModelStatus(entry, ModelState.INSTALLED, target, size, actual)


def _snapshot_status(entry: ModelEntry, target: Path, record: dict[str, Any] | None, check_hash: bool) -> ModelStatus:
    files = record.get("files") if record is not None else None
    if not isinstance(files, dict):
        present = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        state = ModelState.UNVERIFIED if present else ModelState.MISSING
        return ModelStatus(entry, state, target, entry.size, present, _HAND_PLACED if present else "folder is empty")
    expected = sum(int(info.get("size", 0)) for info in files.values())
    actual = 0
    for rel, info in sorted(files.items()):
        path = target / rel
        size = path.stat().st_size if path.is_file() else None
        if size != info.get("size"):
            detail = f"{rel} is missing" if size is None else f"{rel}: {size} bytes, expected {info.get('size')}"
            return ModelStatus(entry, ModelState.SIZE_MISMATCH, target, expected, None, detail)
        if check_hash and info.get("sha256") and hash_file(path)[0] != info["sha256"]:
            return ModelStatus(entry, ModelState.HASH_MISMATCH, target, expected, None, f"{rel}: sha256 differs")
        actual += size
    return ModelStatus(entry, ModelState.INSTALLED, target, expected, actual)


def entry_status(
    models_dir: Path | str,
    entry: ModelEntry,
    *,
    lock: dict[str, dict[str, Any]] | None = None,
    check_hash: bool = False,
) -> ModelStatus:
    """Returns the install state of one entry; hashing (slow for GBs) only when `check_hash`."""
    target = model_path(models_dir, entry)
    record = _record_for(entry, read_lock(models_dir) if lock is None else lock)
    exists = target.is_dir() if entry.is_snapshot else target.is_file()
    if not exists:
        if staging_path(models_dir, entry).exists():
            detail = "download interrupted; pull again to resume"
            return ModelStatus(entry, ModelState.PARTIAL, target, entry.size, None, detail)
        return ModelStatus(entry, ModelState.MISSING, target, entry.size, None)
    if entry.is_snapshot:
        return _snapshot_status(entry, target, record, check_hash)
    return _file_status(entry, target, record, check_hash)


def status(
    models_dir: Path | str,
    manifest: Manifest | None = None,
    *,
    features: Iterable[str] | None = None,
    check_hash: bool = False,
) -> list[ModelStatus]:
    """Returns the install state of every entry (of `features` when given) of the manifest."""
    return (manifest or load_manifest()).status(models_dir, features=features, check_hash=check_hash)


def require(models_dir: Path | str, name: str, feature: str, manifest: Manifest | None = None) -> Path:
    """Returns the path of model `name` for `feature`; raises ModelNotInstalled when it is not usable."""
    manifest = manifest or load_manifest()
    entry = manifest.get(name)
    if feature not in entry.features:
        raise ValueError(f"model {name!r} does not serve feature {feature!r} (it serves {', '.join(entry.features)})")
    found = entry_status(models_dir, entry)
    if not found.usable:
        logger.warning("model %s for %s is %s at %s", name, feature, found.state.value, found.path)
        raise ModelNotInstalled(model=name, feature=feature, pull_command=manifest.pull_command([feature]))
    return found.path


def resolve(models_dir: Path | str, name: str, feature: str, overrides: dict[str, Any] | None = None,
            manifest: Manifest | None = None) -> Path:
    """Returns where model `name` is: the operator's override (config ``[model_paths]``), which only has
    to exist, or the manifest's place under models_dir, which must pass ``require``."""
    if overrides and name in overrides:
        path = Path(str(overrides[name])).expanduser()
        path = path if path.is_absolute() else Path(models_dir) / path
        if path.exists():
            return path
        logger.warning("model_paths.%s points at %s, which does not exist", name, path)
        raise ModelNotInstalled(model=name, feature=feature, pull_command=f"fix model_paths.{name} ({path})")
    return require(models_dir, name, feature, manifest)


def installed_features(models_dir: Path | str, overrides: dict[str, Any] | None = None,
                       manifest: Manifest | None = None) -> set[str]:
    """Returns the features whose every model resolves (see ``resolve``)."""
    manifest = manifest or load_manifest()
    installed = set()
    for feature in manifest.features():
        try:
            for entry in manifest.for_features([feature]):
                resolve(models_dir, entry.name, feature, overrides, manifest)
        except ModelNotInstalled:
            continue
        installed.add(feature)
    return installed
