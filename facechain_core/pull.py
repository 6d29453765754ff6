"""Fetch the models of some features into models_dir, verified, resumable, licence-checked.

``pull(manifest, models_dir, ["portrait"], accept_licenses={...})`` is what
``facechain-bot models pull portrait --accept-license NAME`` runs. For each entry it:

1. skips models already installed (``--force`` re-fetches);
2. refuses non-commercial models whose licence the operator did not accept by name;
3. downloads ``hf:`` sources through huggingface_hub (``HF_ENDPOINT`` or ``hf_endpoint`` picks the hub)
   into ``models_dir/.pull/<name>/``, and ``https:`` sources with HTTP Range into a ``.part`` file there,
   so an interrupted pull resumes;
4. checks size and sha256 (the manifest's, else the hub's LFS hash, else the git blob id of a small
   file) and only then moves the bytes into place and records them in ``models_dir/models.lock.json``.

A dry run answers from the manifest alone (sizes, sources, licences: no network). With
``check_sources`` it also asks each source for its size (metadata only, no file bodies), with a short
timeout; a host name that does not resolve is tried once per pull, not once per source or retry.
Library code: everything raises a ``PullError``; the CLI decides what to print and how to exit.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2  # huggingface_hub's HTTP client; its errors reach us from hf_hub_download
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from facechain_core.manifest import (
    LOCK_FILE,
    Manifest,
    ModelEntry,
    ModelState,
    Source,
    entry_status,
    hash_file,
    model_path,
    read_lock,
    staging_path,
)
from facechain_core.numbers import ascii_int

logger = logging.getLogger(__name__)

USER_AGENT = "facechain-bot (model pull)"
CHUNK_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
CHECK_TIMEOUT_S = 5.0  # per request of a dry run that checks its sources
HF_DEFAULT_HOST = "huggingface.co"
_RETRY_PAUSE_S = 1.0  # times the attempt number; tests set it to 0
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
# HfHubHTTPError (404s, gated repos...) and OfflineModeIsEnabled are OSErrors; ValueError: a bad repo id.
_HUB_ERRORS = (OSError, httpx2.HTTPError, ValueError)
_NET_ERRORS = (HTTPException, ConnectionError, TimeoutError, socket.timeout)


# --- errors --------------------------------------------------------------------------------


class PullError(Exception):
    """A pull could not complete; the message says what to do."""


class LicenceNotAccepted(PullError):
    """Non-commercial models were asked for without accepting their licences by name."""

    def __init__(self, licences: list[str], models: list[str], command: str) -> None:
        self.licences = licences
        self.models = models
        self.command = command
        super().__init__(
            f"{', '.join(models)} may only be used for non-commercial research. Read the licence(s) "
            f"{', '.join(licences)} (see `models status`) and accept each by name to pull them:\n  {command}"
        )


class VerificationError(PullError):
    """Downloaded bytes differ from what the manifest or the hub says; they were discarded."""


class DownloadInterrupted(PullError):
    """The connection broke too often; the partial file is kept and the next pull resumes it."""


class SourceUnavailable(PullError):
    """A source could not be reached or does not have the file."""


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullProgress:
    """Bytes of one model so far, reported while it downloads."""

    model: str
    file: str
    done: int
    total: int | None


ProgressFn = Callable[[PullProgress], None]


class PullAction(str, Enum):
    """What a pull did (or would do) with one model."""

    FETCHED = "fetched"
    ALREADY_INSTALLED = "already installed"
    WOULD_FETCH = "would fetch"


@dataclass
class PulledModel:
    """One model in a pull report."""

    name: str
    action: PullAction
    path: Path
    size: int | None  # bytes fetched, installed, or (dry run) to fetch
    source: str | None
    licence: str
    non_commercial: bool
    files: int = 1
    sha256: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class PullReport:
    """What ``pull`` did, model by model."""

    features: list[str]
    dry_run: bool
    models: list[PulledModel]
    licences_to_accept: list[str]  # licences still missing for what would be fetched (dry runs)
    pull_command: str

    @property
    def bytes_to_fetch(self) -> int:
        return sum(m.size or 0 for m in self.models if m.action is PullAction.WOULD_FETCH)

    @property
    def fetched(self) -> list[PulledModel]:
        return [m for m in self.models if m.action is PullAction.FETCHED]


@dataclass(frozen=True)
class _Context:
    models_dir: Path
    endpoint: str | None
    progress: ProgressFn | None
    retries: int
    timeout: float
    resolved: dict[str, bool] = field(default_factory=dict)  # host -> whether its name resolved


@dataclass
class _Fetched:
    """Bytes verified in staging, ready to move into place."""

    source: Source
    staged: Path
    size: int
    sha256: str | None
    hash_from: str
    revision: str | None = None
    files: dict[str, dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)


# --- progress ------------------------------------------------------------------------------


class _Counter:
    """Adds up a model's bytes across its files and reports them."""

    def __init__(self, ctx: _Context, model: str, total: int | None) -> None:
        self.ctx, self.model, self.total, self.done = ctx, model, total, 0

    def add(self, file: str, n: int) -> None:
        if n:
            self.set(file, self.done + n)

    def set(self, file: str, done: int) -> None:
        self.done = done
        if self.ctx.progress is not None:
            self.ctx.progress(PullProgress(self.model, file, self.done, self.total))

    def bar_class(self, file: str) -> type:
        """Returns a tqdm stand-in for huggingface_hub that feeds this counter (and draws nothing)."""
        counter = self

        class _Bar:
            def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
                counter.add(file, int(initial or 0))

            def update(self, n: float | None = 1) -> None:
                counter.add(file, int(n or 0))

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def __getattr__(self, name: str) -> Any:
                if name.startswith("__"):
                    raise AttributeError(name)
                return lambda *args, **kwargs: None  # close, refresh, set_postfix_str...

        return _Bar


# --- helpers -------------------------------------------------------------------------------


def _lfs_sha256(etag: str | None) -> str | None:
    return etag if etag and _SHA256_RE.fullmatch(etag) else None


def _git_sha1(etag: str | None) -> str | None:
    return etag if etag and _SHA1_RE.fullmatch(etag) else None


def _check_bytes(entry: ModelEntry, what: str, path: Path, size: int, reported: int | None,
                 sha256: str, expected_sha: str | None, git_sha1: str | None = None) -> None:
    """Raises VerificationError (deleting `path`) when the bytes are wrong."""
    problem = None
    if reported is not None and size != reported:
        problem = f"{size} bytes arrived, the source announced {reported}"
    elif expected_sha is not None and sha256 != expected_sha:
        problem = f"sha256 is {sha256}, expected {expected_sha}"
    elif expected_sha is None and git_sha1 is not None and hash_file(path, git_blob=True)[1] != git_sha1:
        problem = f"git blob id differs from the hub's {git_sha1}"
    if problem:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{entry.name}: {what}: {problem}; the download was discarded")


def _size_warnings(entry: ModelEntry, size: int, path: Path) -> list[str]:
    """Returns a warning when an unverified manifest size was wrong; raises (deleting `path`) for a verified one."""
    if size == entry.size:
        return []
    message = f"{entry.name}: the manifest says {entry.size} bytes, the source has {size}"
    if entry.verified:
        path.unlink(missing_ok=True)
        raise VerificationError(message + " (the manifest's size is verified); nothing was installed")
    logger.warning("%s (the manifest's size is unverified)", message)
    return [message + " (manifest size is unverified)"]


def _write_record(models_dir: Path, name: str, record: dict[str, Any]) -> None:
    path = models_dir / LOCK_FILE
    models = read_lock(models_dir)
    models[name] = record
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"schema": 1, "models": models}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _install(entry: ModelEntry, fetched: _Fetched, ctx: _Context) -> Path:
    """Moves verified bytes into place, records them and clears the staging folder."""
    target = model_path(ctx.models_dir, entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry.is_snapshot:
        shutil.rmtree(fetched.staged / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(fetched.staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(fetched.staged, target)
    staging = staging_path(ctx.models_dir, entry)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()  # only when no other download waits there
    except OSError:
        pass
    record: dict[str, Any] = {
        "source": entry.source.text,
        "fetched_from": fetched.source.text,
        "revision": fetched.revision,
        "path": entry.path,
        "size": fetched.size,
        "sha256": fetched.sha256,
        "hash_from": fetched.hash_from,
        "pulled_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if fetched.files is not None:
        record["files"] = fetched.files
    _write_record(ctx.models_dir, entry.name, record)
    logger.info("installed %s (%d bytes, sha256 from %s) at %s", entry.name, fetched.size, fetched.hash_from, target)
    return target


# --- hf: one file ----------------------------------------------------------------------------


def _hf_file_metadata(ctx: _Context, source: Source) -> Any:
    assert source.filename is not None
    url = hf_hub_url(source.repo_id, source.filename, revision=source.revision, endpoint=ctx.endpoint)
    try:
        return get_hf_file_metadata(url, timeout=ctx.timeout)
    except _HUB_ERRORS as exc:
        raise SourceUnavailable(f"{source.text}: {type(exc).__name__}: {exc}") from exc


def _plan_hf_file(ctx: _Context, entry: ModelEntry, source: Source) -> tuple[int | None, int, list[str]]:
    meta = _hf_file_metadata(ctx, source)
    hub_sha = _lfs_sha256(meta.etag)
    if entry.sha256 and hub_sha and hub_sha != entry.sha256:
        return meta.size, 1, [f"{entry.name}: the hub's sha256 {hub_sha} differs from the manifest's; pull refuses it"]
    return meta.size, 1, []


def _fetch_hf_file(ctx: _Context, entry: ModelEntry, source: Source) -> _Fetched:
    assert source.filename is not None
    meta = _hf_file_metadata(ctx, source)
    hub_sha = _lfs_sha256(meta.etag)
    if entry.sha256 and hub_sha and hub_sha != entry.sha256:
        raise VerificationError(
            f"{entry.name}: {source.text} has sha256 {hub_sha}, the manifest expects {entry.sha256}; not downloaded"
        )
    staging = staging_path(ctx.models_dir, entry)
    counter = _Counter(ctx, entry.name, meta.size)
    try:
        local = Path(hf_hub_download(
            source.repo_id, source.filename, revision=meta.commit_hash, local_dir=staging,
            cache_dir=staging / ".hf-cache", endpoint=ctx.endpoint, etag_timeout=ctx.timeout,
            tqdm_class=counter.bar_class(source.filename),
        ))
    except _HUB_ERRORS as exc:
        raise SourceUnavailable(f"{source.text}: {type(exc).__name__}: {exc}") from exc
    size = local.stat().st_size
    sha256, _ = hash_file(local)
    expected = entry.sha256 or hub_sha
    git_sha1 = None if expected else _git_sha1(meta.etag)  # a small (non-LFS) file: the hub gives its git id
    _check_bytes(entry, source.text, local, size, meta.size, sha256, expected, git_sha1)
    warnings = _size_warnings(entry, size, local)
    hash_from = "manifest" if entry.sha256 else "hub" if hub_sha else "computed"
    return _Fetched(source, local, size, sha256, hash_from, revision=meta.commit_hash, warnings=warnings)


# --- hf: a snapshot ----------------------------------------------------------------------------


def _snapshot_files(ctx: _Context, entry: ModelEntry, source: Source) -> tuple[str, list[RepoFile]]:
    api = HfApi(endpoint=ctx.endpoint)
    try:
        commit: str | None = source.revision
        if not _SHA1_RE.fullmatch(source.revision):
            commit = api.repo_info(source.repo_id, revision=source.revision, timeout=ctx.timeout).sha
        if commit is None:
            raise SourceUnavailable(f"{source.text}: the hub did not say which commit {source.revision!r} is")
        tree = api.list_repo_tree(source.repo_id, revision=commit, recursive=True)
        files = [f for f in tree if isinstance(f, RepoFile)]
    except _HUB_ERRORS as exc:
        raise SourceUnavailable(f"{source.text}: {type(exc).__name__}: {exc}") from exc
    for pattern in entry.allow_patterns:
        if not list(filter_repo_objects(files, allow_patterns=[pattern], key=lambda f: f.path)):
            raise SourceUnavailable(
                f"{entry.name}: pattern {pattern!r} matches no file of {source.repo_id}@{commit}"
            )
    return commit, list(filter_repo_objects(files, allow_patterns=list(entry.allow_patterns), key=lambda f: f.path))


def _repo_file_size(f: RepoFile) -> int:
    return f.lfs.size if f.lfs is not None else f.size


def _fetch_snapshot(ctx: _Context, entry: ModelEntry, source: Source) -> _Fetched:
    commit, files = _snapshot_files(ctx, entry, source)
    staging = staging_path(ctx.models_dir, entry)
    counter = _Counter(ctx, entry.name, sum(_repo_file_size(f) for f in files))
    record: dict[str, dict[str, Any]] = {}
    done = 0
    for f in files:
        try:
            local = Path(hf_hub_download(
                source.repo_id, f.path, revision=commit, local_dir=staging, cache_dir=staging / ".hf-cache",
                endpoint=ctx.endpoint, etag_timeout=ctx.timeout, tqdm_class=counter.bar_class(f.path),
            ))
        except _HUB_ERRORS as exc:
            raise SourceUnavailable(f"{source.text}: {f.path}: {type(exc).__name__}: {exc}") from exc
        size = local.stat().st_size
        sha256, _ = hash_file(local)
        lfs_sha = f.lfs.sha256 if f.lfs is not None else None
        _check_bytes(entry, f"{source.text}: {f.path}", local, size, _repo_file_size(f), sha256, lfs_sha,
                     None if lfs_sha else _git_sha1(f.blob_id))
        record[f.path] = {"size": size, "sha256": sha256}
        done += size
        counter.set(f.path, done)  # also counts files a previous, interrupted pull had finished
    for path in staging.rglob("*"):
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and rel not in record and not rel.startswith(".cache/"):
            path.unlink()  # left by a pull of other patterns or another revision
    total = sum(info["size"] for info in record.values())
    warnings = [] if total == entry.size else [
        f"{entry.name}: the manifest estimates {entry.size} bytes, the snapshot has {total}"
    ]
    return _Fetched(source, staging, total, None, "hub", revision=commit, files=record, warnings=warnings)


# --- https: one file, resumable ----------------------------------------------------------------


class _Interrupted(Exception):
    """The body ended before Content-Length bytes arrived."""


def _request(url: str, headers: dict[str, str], method: str = "GET") -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers}, method=method)


def _plan_url(ctx: _Context, entry: ModelEntry, source: Source) -> tuple[int | None, int, list[str]]:
    try:
        with urllib.request.urlopen(_request(source.url, {}, "HEAD"), timeout=ctx.timeout) as resp:
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise SourceUnavailable(f"{source.text}: HTTP {exc.code}") from exc
        return entry.size, 1, [f"{entry.name}: {source.text} answered HEAD with {exc.code}; size from the manifest"]
    except (urllib.error.URLError, *_NET_ERRORS) as exc:
        raise SourceUnavailable(f"{source.text}: {exc}") from exc
    size = ascii_int(length)
    return (size if size is not None else entry.size), 1, []


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not match:
        return None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _download_once(ctx: _Context, url: str, part: Path, counter: _Counter, file: str) -> int | None:
    """Appends to `part` from where it ends; returns the full size the server announced."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = urllib.request.urlopen(_request(url, headers), timeout=ctx.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The part is as long as the file (or longer): start over, the hash decides.
            part.unlink()
            raise _Interrupted("range not satisfiable; restarting") from exc
        raise SourceUnavailable(f"{url}: HTTP {exc.code}") from exc
    with resp:
        total: int | None = None
        if offset and resp.status == 206:
            content_range = _parse_content_range(resp.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                found = resp.headers.get("Content-Range")
                raise SourceUnavailable(f"{url}: Content-Range {found!r} does not continue at byte {offset}")
            total = content_range[1]
        else:
            offset = 0  # the server ignored the Range header: take the whole body
            length = resp.headers.get("Content-Length")
            total = ascii_int(length)
        counter.set(file, offset)
        with part.open("ab" if offset else "wb") as out:
            while chunk := resp.read(CHUNK_BYTES):
                out.write(chunk)
                counter.add(file, len(chunk))
        got = part.stat().st_size
        if total is not None and got < total:
            raise _Interrupted(f"connection closed after {got} of {total} bytes")
        return total


def _fetch_url(ctx: _Context, entry: ModelEntry, source: Source) -> _Fetched:
    staging = staging_path(ctx.models_dir, entry)
    part, state = staging / "download.part", staging / "download.json"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        previous = json.loads(state.read_text(encoding="utf-8")).get("url")
    except (OSError, ValueError):
        previous = None
    if previous != source.url:
        part.unlink(missing_ok=True)  # a part of other bytes must not be continued
        state.write_text(json.dumps({"url": source.url}), encoding="utf-8")
    need, free = entry.size - (part.stat().st_size if part.exists() else 0), shutil.disk_usage(staging).free
    if need > free:
        raise PullError(f"{entry.name}: needs about {need} more bytes, {staging} has {free} free")
    file = PurePosixPath(entry.path).name
    counter = _Counter(ctx, entry.name, entry.size)
    attempt = 0
    while True:
        try:
            total = _download_once(ctx, source.url, part, counter, file)
            break
        except (_Interrupted, urllib.error.URLError, *_NET_ERRORS) as exc:
            if isinstance(exc, urllib.error.URLError) and not part.exists():
                raise SourceUnavailable(f"{source.text}: {exc.reason}") from exc
            attempt += 1
            kept = part.stat().st_size if part.exists() else 0
            if attempt > ctx.retries:
                raise DownloadInterrupted(
                    f"{entry.name}: the download from {source.text} broke off ({exc}); {kept} bytes are kept in "
                    f"{part} and the next pull resumes from there"
                ) from exc
            logger.warning("%s: download broke off at %d bytes (%s); resuming (try %d of %d)",
                           entry.name, kept, exc, attempt, ctx.retries)
            time.sleep(_RETRY_PAUSE_S * attempt)
    size = part.stat().st_size
    sha256, _ = hash_file(part)
    try:
        _check_bytes(entry, source.text, part, size, total, sha256, entry.sha256)
    except VerificationError:
        state.unlink(missing_ok=True)
        raise
    warnings = _size_warnings(entry, size, part)
    return _Fetched(source, part, size, sha256, "manifest" if entry.sha256 else "computed", warnings=warnings)


# --- the pull ------------------------------------------------------------------------------


def _fetch(ctx: _Context, entry: ModelEntry) -> _Fetched:
    """Tries the entry's sources in order; an interrupted download stops at once so it can resume."""
    failures: list[PullError] = []
    for source in entry.sources:
        host = _source_host(ctx, source)
        if not _resolves(ctx, host):
            failures.append(SourceUnavailable(f"{source.text}: the host name {host!r} does not resolve"))
            logger.warning("%s: %s", entry.name, failures[-1])
            continue
        try:
            if source.kind == "url":
                return _fetch_url(ctx, entry, source)
            if source.is_snapshot:
                return _fetch_snapshot(ctx, entry, source)
            return _fetch_hf_file(ctx, entry, source)
        except (SourceUnavailable, VerificationError) as exc:
            logger.warning("%s: %s", entry.name, exc)
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    raise SourceUnavailable(f"{entry.name}: every source failed:\n" + "\n".join(f"  {f}" for f in failures))


def _plan_source(ctx: _Context, entry: ModelEntry, source: Source) -> tuple[int | None, int, list[str]]:
    """Returns (bytes, files, warnings) that fetching `entry` from `source` would take."""
    if source.kind == "url":
        return _plan_url(ctx, entry, source)
    if source.is_snapshot:
        _, repo_files = _snapshot_files(ctx, entry, source)
        return sum(_repo_file_size(f) for f in repo_files), len(repo_files), []
    return _plan_hf_file(ctx, entry, source)


def _source_host(ctx: _Context, source: Source) -> str:
    url = source.url if source.kind == "url" else (ctx.endpoint or f"https://{HF_DEFAULT_HOST}")
    return urllib.parse.urlsplit(url).hostname or ""


def _resolves(ctx: _Context, host: str) -> bool:
    """Whether `host` has an address; asked once per pull (no retry: the answer will not change)."""
    if host not in ctx.resolved:
        try:
            socket.getaddrinfo(host, None)
            ctx.resolved[host] = True
        except (OSError, UnicodeError):
            ctx.resolved[host] = False
    return ctx.resolved[host]


def _plan_from_manifest(ctx: _Context, entry: ModelEntry) -> PulledModel:
    """What the manifest says fetching `entry` takes (no network)."""
    return PulledModel(entry.name, PullAction.WOULD_FETCH, model_path(ctx.models_dir, entry), entry.size,
                       entry.source.text, entry.licence, entry.non_commercial)


def _plan(ctx: _Context, entry: ModelEntry) -> PulledModel:
    """Asks the first source that answers how much would be fetched."""
    failures: list[str] = []
    target = model_path(ctx.models_dir, entry)
    for source in entry.sources:
        host = _source_host(ctx, source)
        if not _resolves(ctx, host):
            failures.append(f"{source.text}: the host name {host!r} does not resolve")
            continue
        try:
            size, files, warnings = _plan_source(ctx, entry, source)
        except SourceUnavailable as exc:
            failures.append(str(exc))
            continue
        return PulledModel(entry.name, PullAction.WOULD_FETCH, target, size, source.text, entry.licence,
                           entry.non_commercial, files=files, warnings=failures + warnings)
    failures.append("no source answered; size from the manifest")
    return PulledModel(entry.name, PullAction.WOULD_FETCH, target, entry.size, None, entry.licence,
                       entry.non_commercial, warnings=failures)


def pull(
    manifest: Manifest,
    models_dir: Path | str,
    features: Iterable[str],
    *,
    accept_licenses: Iterable[str] = (),
    dry_run: bool = False,
    check_sources: bool = False,
    progress: ProgressFn | None = None,
    hf_endpoint: str | None = None,
    force: bool = False,
    retries: int = DEFAULT_RETRIES,
    timeout: float | None = None,
) -> PullReport:
    """Fetches the models of `features` into `models_dir`; see the module docstring.

    `features` names features, single models, or ``"all"``. A dry run answers from the manifest; with
    `check_sources` it asks the sources for sizes (with `timeout`, default ``CHECK_TIMEOUT_S`` then).

    `hf_endpoint` defaults to ``$HF_ENDPOINT`` (read now, not at import) and then to huggingface_hub's
    default. `retries` counts resumptions after a broken connection within this call.
    """
    features = [features] if isinstance(features, str) else list(dict.fromkeys(features))
    if not features:
        raise ValueError("name at least one feature, or 'all'")
    models_dir = Path(models_dir)
    entries = manifest.select(features)
    endpoint = (hf_endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    if timeout is None:
        timeout = CHECK_TIMEOUT_S if dry_run else DEFAULT_TIMEOUT_S
    ctx = _Context(models_dir, endpoint, progress, retries, timeout)
    lock = read_lock(models_dir)

    # 1. What is already there.
    installed: dict[str, PulledModel] = {}
    for entry in entries:
        found = entry_status(models_dir, entry, lock=lock)
        if found.usable and not force:
            installed[entry.name] = PulledModel(
                entry.name, PullAction.ALREADY_INSTALLED, found.path, found.actual_size, None, entry.licence,
                entry.non_commercial, sha256=(lock.get(entry.name) or {}).get("sha256"),
                warnings=[found.detail] if found.state is ModelState.UNVERIFIED else [],
            )
    to_fetch = [entry for entry in entries if entry.name not in installed]

    # 2. Licences the operator must accept by name.
    accepted = set(accept_licenses)
    missing = sorted({e.licence for e in to_fetch if e.non_commercial} - accepted)
    command = manifest.pull_command(features)
    if missing and not dry_run:
        names = [e.name for e in to_fetch if e.non_commercial and e.licence in missing]
        raise LicenceNotAccepted(missing, names, command)

    # 3. Fetch (or, in a dry run, ask for sizes), in manifest order.
    report = PullReport(features, dry_run, [], missing, command)
    if not dry_run:
        models_dir.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if entry.name in installed:
            report.models.append(installed[entry.name])
        elif dry_run:
            report.models.append(_plan(ctx, entry) if check_sources else _plan_from_manifest(ctx, entry))
        else:
            logger.info("pulling %s from %s", entry.name, entry.source.text)
            fetched = _fetch(ctx, entry)
            target = _install(entry, fetched, ctx)
            report.models.append(PulledModel(
                entry.name, PullAction.FETCHED, target, fetched.size, fetched.source.text, entry.licence,
                entry.non_commercial, files=len(fetched.files) if fetched.files is not None else 1,
                sha256=fetched.sha256, warnings=fetched.warnings,
            ))
    return report
