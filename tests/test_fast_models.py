"""Fast mode's accelerator LoRAs in the manifest: `models pull fast` against a fake Hugging Face Hub."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import cli
from facechain_core import pull as pull_module
from facechain_core.accelerators import load_accelerators
from facechain_core.manifest import installed_features, load_manifest, read_lock
from facechain_core.tiny import build_lora
from tests.fixtures.fake_hub import FakeHub, FileServer
from tests.fixtures.tiny_models import tiny_models, tiny_models_dir  # noqa: F401


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "_RETRY_PAUSE_S", 0.0)


@pytest.fixture
def hub(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The hub with the LCM-LoRA repo at the manifest's pinned revision, serving a LoRA of the real format."""
    entry = load_manifest().get("lcm-lora-sd15")
    lora = build_lora(tiny_models["sd15"], tmp_path / "src" / "pytorch_lora_weights.safetensors", seed=21)
    with FileServer() as cdn, FakeHub(cdn) as server:
        server.add_repo(entry.source.repo_id, {entry.source.filename: lora.read_bytes(), "README.md": b"# lcm\n"},
                        branch=entry.source.revision)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'models_dir = "{tmp_path / "models"}"\n', encoding="utf-8")
    return config


def test_every_accelerator_names_manifest_entries_with_pinned_sources_and_licences() -> None:
    manifest = load_manifest()
    accelerators = load_accelerators()
    assert {"lcm", "tcd", "hyper"} <= set(accelerators.by_id)
    for accelerator in accelerators.by_id.values():
        for family, name in accelerator.models.items():
            entry = manifest.get(name)
            assert entry.features == (accelerator.features[family],)
            assert entry.source.kind == "hf" and len(entry.source.revision) == 40
            assert entry.licence and not entry.non_commercial and entry.size > 0
            assert entry.verified or "not checked here" in entry.facts_from.lower()
            assert entry.sha256 is None or entry.verified  # no hash invented where none was read
    assert [e.name for e in manifest.select(["fast"])] == ["lcm-lora-sd15"]
    assert [e.name for e in manifest.select(["fast-sdxl"])] == ["lcm-lora-sdxl"]


def test_models_pull_fast_dry_run_asks_no_source(hub: FakeHub, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(_config(tmp_path)), "models", "pull", "fast", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lcm-lora-sd15" in out and "135.0 MB" in out and "lcm-lora-sdxl" not in out
    assert "latent-consistency/lcm-lora-sdv1-5" in out
    assert not hub.requests and not (tmp_path / "models" / "fast").exists()


def test_models_pull_fast_dry_run_checking_sources_reads_the_hubs_size(hub: FakeHub, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    size = len(next(iter(hub.repos.values())).files["pytorch_lora_weights.safetensors"])
    assert cli.main(["--config", str(_config(tmp_path)), "models", "pull", "fast", "--dry-run",
                     "--check-sources"]) == 0
    out = capsys.readouterr().out
    assert f"{size / 1e6:,.1f} MB" in out and hub.requests
    assert not (tmp_path / "models" / "fast").exists()


def test_models_pull_fast_installs_the_feature(hub: FakeHub, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(_config(tmp_path)), "models", "pull", "fast"]) == 0
    models = tmp_path / "models"
    entry = load_manifest().get("lcm-lora-sd15")
    assert (models / entry.path).is_file()
    assert read_lock(models)["lcm-lora-sd15"]["hash_from"] == "hub"
    assert "fast" in installed_features(models) and "fast-sdxl" not in installed_features(models)
