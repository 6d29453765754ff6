"""Fast mode's accelerator LoRAs in the manifest: `models pull fast` against a fake Hugging Face Hub."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import cli
from facechain_core import pull as pull_module
from facechain_core.accelerators import decide_fast, load_accelerators
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


@pytest.mark.parametrize(("settings", "choice", "queued", "fast"), [
    ({}, None, 100, False),  # off by default
    ({"fast_mode": "on"}, None, 0, True),
    ({"fast_mode": "on"}, "off", 0, False),  # the user's choice wins
    ({"fast_mode": "off"}, "on", 0, True),
    ({"fast_mode": "auto"}, None, 4, False),  # auto: only while more than fast_auto_queue (4) jobs wait
    ({"fast_mode": "auto"}, None, 5, True),
    ({"fast_mode": "auto", "fast_auto_queue": 0}, None, 1, True),
    ({"fast_mode": "auto"}, "off", 50, False),
])
def test_decide_fast(settings: dict, choice: str | None, queued: int, fast: bool) -> None:
    assert decide_fast(settings, choice, queued) is fast


def test_fast_settings_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from bot.config import ConfigError, load_config

    for bad, word in (('fast_mode = "sometimes"', "fast_mode"), ("fast_auto_queue = -1", "fast_auto_queue"),
                      ('fast_accelerator = "turbo"', "turbo")):
        config = tmp_path / "bad.toml"
        config.write_text(f"[pipeline]\n{bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=word):
            load_config(config)
    config = tmp_path / "good.toml"
    config.write_text('[pipeline]\nfast_mode = "auto"\nfast_auto_queue = 2\nfast_accelerator = "tcd"\n',
                      encoding="utf-8")
    assert load_config(config).pipeline["fast_mode"] == "auto"


@pytest.mark.parametrize(("accelerator", "kind", "reason"), [
    ("lcm", "template", None), ("lcm", "tryon", None), ("tcd", "tryon", None),
    ("hyper", "template", "fast.skipped_unsupported"), ("hyper", "tryon", "fast.skipped_unsupported"),
    ("hyper", "portrait", None),
])
def test_try_on_and_templates_run_fast_only_where_the_accelerator_inpaints(accelerator: str, kind: str,
                                                                         reason: str | None) -> None:
    from types import SimpleNamespace

    from handlers.fast import skip_reason

    features = {accelerators_feature for a in load_accelerators().by_id.values()
                for accelerators_feature in a.features.values()}
    services = SimpleNamespace(settings=SimpleNamespace(pipeline={"fast_accelerator": accelerator}),
                               features_installed=features)
    assert skip_reason(services, kind, {"style": {"family": "sd15"}}) == reason
    services.features_installed = set()
    assert skip_reason(services, kind, {}) == (reason or "fast.skipped_not_installed")


@pytest.mark.parametrize(("waiting", "fast"), [(4, False), (5, True)])
async def test_auto_mode_reads_the_queue_length_when_a_job_is_queued(waiting: int, fast: bool) -> None:
    from types import SimpleNamespace

    from handlers.fast import settle_fast

    services = SimpleNamespace(settings=SimpleNamespace(pipeline={"fast_mode": "auto", "fast_auto_queue": 4}),
                               features_installed={"fast"}, jobs=SimpleNamespace(queue_length=lambda: waiting))
    event = SimpleNamespace(user=SimpleNamespace(key="telegram:1"))
    params = {"style": {"family": "sd15"}, "controls": {}, "fast": True, "fast_note": "fast.skipped_style"}
    admitted = await settle_fast(services, event, "portrait", params)
    # An earlier decision (Again re-queues a job's params) is decided anew, its note dropped.
    assert admitted.params["fast"] is fast and "fast_note" not in admitted.params
    assert await settle_fast(services, event, "cartoon", {}) is None  # kinds fast mode does not serve
