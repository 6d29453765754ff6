"""Job inputs and outputs as bytes, for workers on machines that do not share the service's disk.

The service side (``pack_params``) replaces every parameter that names a file or folder under
``data_dir`` with a reference ``{"$input": digest, "name": basename}``; the digest is the content's
SHA-256 (a folder's is over its files' relative paths and digests), so a user LoRA sent once is found
again in a node's cache. The node side (``InputCache``) keeps those contents under its cache folder,
least recently used first out, and ``unpack_params`` turns references back into paths there.
Results come back as ``{relative path: bytes}`` and are written under the job's ``out_dir``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

INPUT_KEY = "$input"
OUTPUT_KEY = "$output"  # a file the job writes outside its out_dir (e.g. identity's "out"): made on the node,
OUTPUTS_DIR = ".outputs"  # under this folder of the job's folder, and written back where the service wants it
OUTPUT_PARAMS = ("out",)  # parameters that name an output file even when it exists already
Blob = dict[str, bytes]  # relative path -> content


def _walk(value: Any, visit: Callable[[str], Any]) -> Any:
    if isinstance(value, str):
        return visit(value)
    if isinstance(value, dict):
        if INPUT_KEY in value or OUTPUT_KEY in value:
            return visit(value)  # type: ignore[arg-type]
        return {k: _walk(v, visit) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, visit) for v in value]
    return value


def _files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


class Packer:
    """The service side: finds inputs under `data_dir`, digests them (remembered by size and mtime)."""

    def __init__(self, data_dir: Path) -> None:
        self._root = Path(data_dir).resolve()
        self._digests: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def _file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._digests.get(key)
        if known is None:
            digest = hashlib.sha256()
            with path.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
            known = digest.hexdigest()
            with self._lock:
                self._digests[key] = known
        return known

    def digest(self, path: Path) -> str:
        """The content address of a file or a folder, with its name (a node keeps it under that name)."""
        if path.is_file():
            return hashlib.sha256(f"{path.name}\0{self._file_digest(path)}".encode()).hexdigest()
        folder = hashlib.sha256(f"{path.name}/\0".encode())
        for file in _files_of(path):
            folder.update(f"{file.relative_to(path).as_posix()}\0{self._file_digest(file)}\n".encode())
        return folder.hexdigest()

    def under_data_dir(self, text: str) -> Path | None:
        if not text.startswith("/") or len(text) > 4096:
            return None
        path = Path(text).resolve()
        return path if path.is_relative_to(self._root) else None

    def pack_params(self, params: dict[str, Any], skip: tuple[str, ...] = ("out_dir",)
                    ) -> tuple[dict[str, Any], dict[str, Path], dict[str, Path]]:
        """Params with references instead of data_dir paths: each input's digest -> local path, and each
        output's name on the node -> where the service wants it (a path not there yet is an output)."""
        found: dict[str, Path] = {}
        outputs: dict[str, Path] = {}

        def output(path: Path) -> dict[str, str]:
            name = f"{len(outputs)}-{path.name}"
            outputs[f"{OUTPUTS_DIR}/{name}"] = path
            return {OUTPUT_KEY: name}

        def visit(text: Any) -> Any:
            path = self.under_data_dir(text) if isinstance(text, str) else None
            if path is None:
                return text
            if not path.exists():
                return output(path)
            digest = self.digest(path)
            found[digest] = path
            return {INPUT_KEY: digest, "name": path.name}

        packed: dict[str, Any] = {}
        for key, value in params.items():
            path = self.under_data_dir(value) if key in OUTPUT_PARAMS and isinstance(value, str) else None
            packed[key] = value if key in skip else output(path) if path is not None else _walk(value, visit)
        return packed, found, outputs


def read_blob(path: Path) -> Blob:
    """A file or a folder's files as ``{relative path: bytes}`` (a file's key is its name)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {f"{path.name}/{f.relative_to(path).as_posix()}": f.read_bytes() for f in _files_of(path)}


def read_tree(folder: Path, since: dict[str, tuple[int, int]] | None = None) -> Blob:
    """A folder's files as ``{relative path: bytes}``; with `since`, only those changed (updates it)."""
    blob: Blob = {}
    if not folder.is_dir():
        return blob
    for file in _files_of(folder):
        rel = file.relative_to(folder).as_posix()
        stat = file.stat()
        mark = (stat.st_size, stat.st_mtime_ns)
        if since is not None:
            if since.get(rel) == mark:
                continue
            since[rel] = mark
        blob[rel] = file.read_bytes()
    return blob


def write_tree(folder: Path, blob: Blob) -> list[Path]:
    """Writes ``{relative path: bytes}`` under `folder` (each file whole or not at all); refuses escapes."""
    root = folder.resolve()
    written: list[Path] = []
    for rel, data in blob.items():
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or target == root:
            raise ValueError(f"a shipped file points outside its folder: {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        part.write_bytes(data)
        os.replace(part, target)
        written.append(target)
    return written


class InputCache:
    """The node side: contents by digest under `root`, least recently used evicted past `budget_bytes`."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self._used: dict[str, float] = {}
        self._sizes: dict[str, int] = {}
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                self._used[entry.name] = entry.stat().st_mtime
                self._sizes[entry.name] = sum(f.stat().st_size for f in _files_of(entry))

    def missing(self, digests: list[str]) -> list[str]:
        return [d for d in digests if d not in self._sizes]

    def put(self, digest: str, blob: Blob) -> None:
        if digest in self._sizes:
            return
        staging = self.root / f".{digest}.part"
        shutil.rmtree(staging, ignore_errors=True)
        write_tree(staging, blob)
        os.replace(staging, self.root / digest)
        self._sizes[digest] = sum(len(b) for b in blob.values())
        self._used[digest] = time.time()

    def path(self, digest: str, name: str) -> Path:
        self._used[digest] = time.time()
        return self.root / digest / name

    def evict(self, keep: set[str]) -> list[str]:
        """Removes the least recently used contents (not those in `keep`) until under the budget."""
        gone: list[str] = []
        for digest in sorted(self._used, key=self._used.__getitem__):
            if sum(self._sizes.values()) <= self.budget_bytes:
                break
            if digest in keep:
                continue
            shutil.rmtree(self.root / digest, ignore_errors=True)
            self._sizes.pop(digest, None)
            self._used.pop(digest, None)
            gone.append(digest)
        return gone

    def digests(self) -> list[str]:
        """Cached contents, least recently used first."""
        return sorted(self._used, key=self._used.__getitem__)


def unpack_params(params: dict[str, Any], cache: InputCache, job_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """Params with the node's paths for references (outputs inside `job_dir`), and the digests they use."""
    used: set[str] = set()

    def visit(value: Any) -> Any:
        if isinstance(value, dict) and INPUT_KEY in value:
            used.add(str(value[INPUT_KEY]))
            return str(cache.path(str(value[INPUT_KEY]), str(value["name"])))
        if isinstance(value, dict) and OUTPUT_KEY in value:
            target = job_dir / OUTPUTS_DIR / Path(str(value[OUTPUT_KEY])).name
            target.parent.mkdir(parents=True, exist_ok=True)
            return str(target)
        return value

    return _walk(params, visit), used
