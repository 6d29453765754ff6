"""Backup and restore of the service's data: the SQLite database, ``data_dir/users/`` and the styles
published from chat (``data_dir/styles/``).

``backup`` works while the service runs: it first takes one consistent snapshot of the database
with SQLite's online backup API, then archives the user folders. Every file a row of the snapshot
names was written before its row, so it is in the archive unless it was deleted meanwhile (a user's
/delete): such files are listed as missing in the manifest. Files written after the snapshot may
be archived too (a job that finished meanwhile is in the snapshot as running and runs again after
a restore). The archive is a tar file (gzip when the name ends in .gz or .tgz)::

    backup.json            manifest: format, time, original data dir, row counts, missing files
    facechain.sqlite3      the database snapshot
    users/<user key>/...   selfies, identities, LoRAs, results, private styles
    styles/...             published styles: <id>.toml, <id>.safetensors, previews/

``restore`` unpacks an archive into an empty data dir and re-roots the stored paths at it.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from bot.storage import Storage, snapshot_database

log = logging.getLogger(__name__)

FORMAT = "facechain-bot-backup"
FORMAT_VERSION = 1
MANIFEST = "backup.json"
DATABASE = "facechain.sqlite3"
USERS = "users"
STYLES = "styles"  # handlers.style_sources.PUBLISHED_FOLDER: styles published with /makestyle
FOLDERS = (USERS, STYLES)  # the data_dir folders an archive holds
# Files a writer is still filling (atomic writes rename them into place when done).
SKIP_SUFFIXES = (".tmp", ".part", ".partial")
COPY_TRIES = 3


class BackupError(Exception):
    """A backup or restore cannot proceed; the message says why and what to do."""


@dataclass
class BackupSummary:
    """What a backup or restore did."""

    archive: Path
    files: int = 0
    bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # files rows name that are not in the archive
    skipped: list[str] = field(default_factory=list)  # files that vanished or kept changing while read
    relocated: int = 0  # stored paths moved to the new data dir (restore)
    seconds: float = 0.0

    def describe(self) -> str:
        """One line for the terminal."""
        rows = ", ".join(f"{n} {t}" for t, n in self.rows.items() if t in ("users", "identities", "artifacts", "jobs"))
        line = f"{self.archive}: {self.files} file(s), {self.bytes / 1e6:.1f} MB, {rows}; {self.seconds:.1f} s"
        if self.relocated:
            line += f"; {self.relocated} stored path(s) moved to the new data dir"
        if self.missing:
            line += f"; {len(self.missing)} file(s) named by rows are missing (deleted meanwhile?): {self.missing[:3]}"
        if self.skipped:
            line += f"; {len(self.skipped)} file(s) skipped (changing while read)"
        return line


def _compression(path: Path) -> str:
    return "gz" if path.name.endswith((".gz", ".tgz")) else ""


def _under(path: str, root: Path) -> str | None:
    """`path` (absolute, or relative to the working dir) relative to `root`, or None when outside."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return None


def _add_file(tar: tarfile.TarFile, path: Path, name: str, scratch: Path) -> int | None:
    """Adds one file as it was at one moment; None when it vanished or kept changing while copied.

    The file is copied aside first and kept only if its size and mtime did not move meanwhile: a
    tar member whose file shrinks while it is read would corrupt the whole archive.
    """
    for _ in range(COPY_TRIES):
        try:
            before = path.stat()
            shutil.copyfile(path, scratch)
            after = path.stat()
        except FileNotFoundError:
            return None
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            info = tar.gettarinfo(str(scratch), arcname=name)
            info.mtime, info.mode = int(after.st_mtime), after.st_mode & 0o777
            with scratch.open("rb") as f:
                tar.addfile(info, f)
            return info.size
        log.info("backup: %s changed while copied, trying again", path)
    return None


def _write_archive(partial: Path, snapshot: Path, data_dir: Path, referenced: list[str],
                   manifest: dict[str, Any], summary: BackupSummary) -> None:
    """Writes the snapshot, the user folders and the manifest into `partial` (blocking)."""
    root = data_dir.resolve()
    archived: set[str] = set()
    with tarfile.open(partial, f"w:{_compression(partial)}") as tar:
        tar.add(snapshot, arcname=DATABASE)
        for folder, dirs, files in (entry for name in FOLDERS for entry in os.walk(data_dir / name)):
            dirs.sort()
            for file_name in sorted(files):
                path = Path(folder) / file_name
                if file_name.endswith(SKIP_SUFFIXES) or path.is_symlink():
                    continue
                name = path.relative_to(data_dir).as_posix()
                size = _add_file(tar, path, name, partial.with_name("file.copy"))
                if size is None:
                    summary.skipped.append(name)
                    continue
                archived.add(name)
                summary.files += 1
                summary.bytes += size
        for stored in referenced:
            relative = _under(stored, root)
            if relative is None:
                continue  # outside the data dir (an operator's own file): not ours to back up
            if relative not in archived and not any(a.startswith(relative + "/") for a in archived):
                summary.missing.append(relative)
        manifest["missing"] = summary.missing
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(data), int(time.time())
        tar.addfile(info, io.BytesIO(data))


async def backup(data_dir: Path, db_path: Path, out: Path) -> BackupSummary:
    """Backs up the database and the user folders of `data_dir` to the archive `out` (never overwritten)."""
    started = time.monotonic()
    out = Path(out)
    if out.exists():
        raise BackupError(f"{out} already exists: choose a new name")
    if not Path(db_path).is_file():
        raise BackupError(f"no database at {db_path}: is data_dir right?")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = BackupSummary(archive=out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        snapshot = Path(tmp) / DATABASE
        # 1. One consistent snapshot of the database (the service may be writing).
        await snapshot_database(Path(db_path), snapshot)
        # 2. What the snapshot holds, from the snapshot itself.
        async with Storage(snapshot) as copy:
            referenced = await copy.file_paths()
            summary.rows = await copy.table_counts()
            await copy.checkpoint()
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "created_at": time.time(),
            "data_dir": str(data_dir), "data_dir_resolved": str(Path(data_dir).resolve()), "rows": summary.rows,
        }
        # 3. The user folders, then the manifest; renamed into place only when whole.
        partial = Path(tmp) / ("archive" + "".join(out.suffixes))
        await asyncio.to_thread(_write_archive, partial, snapshot, Path(data_dir), referenced, manifest, summary)
        os.replace(partial, out)
    summary.seconds = time.monotonic() - started
    log.debug("backup: %s", summary.describe())
    return summary


def _safe_members(tar: tarfile.TarFile) -> Iterable[tarfile.TarInfo]:
    """The archive's members, refusing anything outside the backup layout."""
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.name in (MANIFEST, DATABASE):
            yield member
        elif parts and parts[0] in FOLDERS and ".." not in parts and (member.isfile() or member.isdir()):
            yield member
        else:
            raise BackupError(f"unexpected entry {member.name!r} in the archive: not a backup of this bot")


def _read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise BackupError(f"no {MANIFEST} in the archive: not a backup of this bot") from None
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupError(f"{MANIFEST} in the archive is not a file")
    manifest = json.loads(handle.read())
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise BackupError(f"unsupported backup format {manifest.get('format')!r} version {manifest.get('version')!r}")
    return manifest


def _unpack(archive: Path, staging: Path) -> dict[str, Any]:
    """Checks and extracts the archive into `staging` (blocking); returns its manifest."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            manifest = _read_manifest(tar)
            members = list(_safe_members(tar))
            tar.extractall(staging, members=members, filter="data")
    except tarfile.TarError as exc:
        raise BackupError(f"{archive} is not a readable archive: {exc}") from None
    if not (staging / DATABASE).is_file():
        raise BackupError(f"{archive} holds no database")
    return manifest


async def restore(archive: Path, data_dir: Path, db_path: Path) -> BackupSummary:
    """Restores `archive` into `data_dir`, which must hold no database and no user folders."""
    started = time.monotonic()
    archive, data_dir, db_path = Path(archive), Path(data_dir), Path(db_path)
    if not archive.is_file():
        raise BackupError(f"{archive} is not a file")
    if db_path.exists() or any((data_dir / name).exists() and any((data_dir / name).iterdir()) for name in FOLDERS):
        raise BackupError(f"{data_dir} already holds data: restore into an empty data dir "
                          "(stop the service and move the old one away first)")
    data_dir.mkdir(parents=True, exist_ok=True)
    summary = BackupSummary(archive=archive)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".restore-") as tmp:
        staging = Path(tmp)
        manifest = await asyncio.to_thread(_unpack, archive, staging)
        for name in FOLDERS:
            if (staging / name).is_dir():
                if (data_dir / name).exists():
                    (data_dir / name).rmdir()  # empty, checked above
                shutil.move(staging / name, data_dir / name)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / DATABASE, db_path)
    new_root = str(data_dir.resolve())
    old_roots = {str(manifest.get("data_dir", "")), str(manifest.get("data_dir_resolved", ""))}
    async with Storage(db_path) as storage:
        summary.relocated = await storage.relocate_paths(old_roots, new_root)
        summary.rows = await storage.table_counts()
        for stored in await storage.file_paths():
            if not Path(stored).exists():
                summary.missing.append(stored)
    for path in (p for name in FOLDERS for p in (data_dir / name).rglob("*")):
        if path.is_file():
            summary.files += 1
            summary.bytes += path.stat().st_size
    summary.seconds = time.monotonic() - started
    log.debug("restore: %s", summary.describe())
    return summary
