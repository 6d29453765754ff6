"""`models pull styles`: every style base and style LoRA of the shipped manifest, against a local fake hub."""
from __future__ import annotations

import fnmatch
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from facechain_core import pull as pull_module
from facechain_core.manifest import Manifest, installed_features, load_manifest
from facechain_core.pull import PullAction, pull
from facechain_core.style_check import STYLES_FEATURE
from facechain_core.styles import load_styles, lora_feature
from tests.fixtures.fake_hub import FakeHub, FileServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "_RETRY_PAUSE_S", 0.0)


def _files_for(patterns: tuple[str, ...], seed: int) -> dict[str, bytes]:
    """One small file per allow pattern, named so that it matches it (and a file no pattern takes)."""
    files = {pattern.replace("*", "weights.safetensors"): bytes([seed % 256]) * (2000 + i)
             for i, pattern in enumerate(patterns)}
    files["unet/diffusion_pytorch_model.bin"] = b"not taken" * 300
    assert all(any(fnmatch.fnmatch(name, p) for name in files) for p in patterns)
    return files


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHub, Manifest]]:
    """The fake hub serving every `styles` entry of the real manifest at its pinned revision."""
    manifest = load_manifest()
    with FileServer() as cdn, FakeHub(cdn) as server:
        for seed, entry in enumerate(manifest.for_features([STYLES_FEATURE])):
            source = entry.source
            files = (_files_for(entry.allow_patterns, seed) if source.is_snapshot
                     else {source.filename: bytes([seed]) * (3000 + seed)})
            server.add_repo(source.repo_id, files, branch=source.revision)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server, manifest


def test_the_styles_feature_holds_every_base_and_lora_the_styles_name() -> None:
    manifest = load_manifest()
    wanted = {name for style in load_styles() for name in (style.base, style.lora_model) if name}
    assert {entry.name for entry in manifest.for_features([STYLES_FEATURE])} == wanted


def test_dry_run_lists_sizes_and_licences_without_downloading(hub, tmp_path: Path) -> None:
    server, manifest = hub
    report = pull(manifest, tmp_path / "models", [STYLES_FEATURE], dry_run=True, check_sources=True)
    entries = manifest.for_features([STYLES_FEATURE])
    assert [m.name for m in report.models] == [e.name for e in entries]
    assert all(m.action is PullAction.WOULD_FETCH and m.size and m.licence for m in report.models)
    # Sizes come from the hub: the snapshot's allowed files only.
    snapshot = next(e for e in entries if e.is_snapshot)
    sizes = {m.name: m.size for m in report.models}
    assert sizes[snapshot.name] == sum(2000 + i for i in range(len(snapshot.allow_patterns)))
    assert not server.seen("GET", "/resolve/") and not (tmp_path / "models").exists()


def test_the_command_shows_sizes_licences_and_their_use_restrictions() -> None:
    result = subprocess.run([sys.executable, "-m", "bot", "models", "pull", "styles", "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("would fetch")]
    assert len(lines) == len(load_manifest().for_features([STYLES_FEATURE]))
    assert all(" MB  [" in line for line in lines)
    assert any("majicmix-realistic-v7" in line and "[creativeml-openrail-m]" in line for line in lines)
    assert "use restrictions: creativeml-openrail-m" in result.stdout and "total to fetch" in result.stdout


def test_pulling_styles_installs_them_and_the_bot_offers_their_lora_styles(hub, tmp_path: Path) -> None:
    _, manifest = hub
    models_dir = tmp_path / "models"
    report = pull(manifest, models_dir, [STYLES_FEATURE])
    assert {m.action for m in report.models} == {PullAction.FETCHED}
    assert not list(models_dir.rglob("*.bin"))  # only the allowed files of a snapshot
    features = installed_features(models_dir, manifest=manifest)
    assert STYLES_FEATURE in features
    for style in load_styles():
        if style.lora is not None:
            assert lora_feature(style.id) in features, style.id
    again = pull(manifest, models_dir, [STYLES_FEATURE])
    assert {m.action for m in again.models} == {PullAction.ALREADY_INSTALLED}
