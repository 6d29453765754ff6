"""The model manifest: the packaged models.toml, validation, status and require."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from facechain_core.errors import ModelNotInstalled
from facechain_core.manifest import (
    LOCK_FILE,
    Manifest,
    ManifestError,
    ModelState,
    UnknownFeature,
    load_manifest,
    model_path,
    parse_source,
    require,
    status,
)
from handlers.messages import catalogue, t
from tests.fixtures.fake_hub import write_manifest

PORTRAIT_NC_COMMAND = (
    "facechain-bot models pull portrait"
    " --accept-license insightface-non-commercial --accept-license ip-adapter-faceid-non-commercial"
)


def entry(name: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name, "features": ["toy"], "source": f"https://example.org/{name}.bin", "path": f"{name}.bin",
        "size": 4, "licence": "apache-2.0", "non_commercial": False, "verified": False, "facts_from": "test",
    }
    base.update(extra)
    return base


def manifest_of(tmp_path: Path, *entries: dict[str, Any]) -> Manifest:
    return load_manifest(write_manifest(tmp_path / "models.toml", list(entries)))


# --- the real manifest -------------------------------------------------------------------------


def test_packaged_manifest_loads_and_covers_the_portrait_features() -> None:
    manifest = load_manifest()
    assert {"selfie", "portrait", "portrait-sdxl"} <= set(manifest.features())
    names = {e.name for e in manifest.entries}
    assert {"yunet", "sd15", "sdxl", "ip-adapter-faceid-sd15", "ip-adapter-faceid-plusv2-sd15",
            "ip-adapter-faceid-sdxl", "arcface", "ip-adapter-image-encoder"} <= names
    for e in manifest.entries:
        assert e.facts_from.strip() and e.size > 0
        if not e.verified:
            assert "not checked here" in e.facts_from.lower(), e.name
    portrait = {e.name for e in manifest.for_features(["portrait"])}
    assert {"sd15", "ip-adapter-faceid-plusv2-sd15", "ip-adapter-image-encoder", "arcface", "yunet"} <= portrait
    assert "sdxl" not in portrait
    assert [e.name for e in manifest.for_features(["train"])] == ["sd15"]


def test_packaged_manifest_marks_faceid_and_arcface_non_commercial() -> None:
    manifest = load_manifest()
    non_commercial = {e.name for e in manifest.entries if e.non_commercial}
    assert non_commercial == {"ip-adapter-faceid-sd15", "ip-adapter-faceid-plusv2-sd15", "ip-adapter-faceid-sdxl",
                              "arcface", "animegan-v2-shinkai", "animegan-v3-hayao", "animegan-v3-portrait-sketch",
                              "wav2lip-gan-onnx", "sadtalker-audio2pose", "codeformer-onnx"}
    assert manifest.pull_command(["portrait"]) == PORTRAIT_NC_COMMAND
    assert manifest.pull_command(["selfie"]) == "facechain-bot models pull selfie"
    for e in manifest.entries:
        if e.source.kind == "hf":
            assert e.source.revision and e.source.revision != "main", f"{e.name} should pin a revision"


def test_packaged_yunet_entry_matches_the_shared_file(yunet_path: Path) -> None:
    yunet = load_manifest().get("yunet")
    data = yunet_path.read_bytes()
    assert yunet.verified
    assert yunet.size == len(data) == 232_589
    assert yunet.sha256 == hashlib.sha256(data).hexdigest()


# --- sources and validation --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "repo", "filename", "revision"), [
    ("hf:h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin@abc123", "h94/IP-Adapter-FaceID",
     "ip-adapter-faceid_sd15.bin", "abc123"),
    ("hf:public-data/insightface/models/buffalo_l/w600k_r50.onnx@main", "public-data/insightface",
     "models/buffalo_l/w600k_r50.onnx", "main"),
    ("hf:stabilityai/stable-diffusion-xl-base-1.0@refs/pr/1", "stabilityai/stable-diffusion-xl-base-1.0", None,
     "refs/pr/1"),
])
def test_parse_hf_sources(text: str, repo: str, filename: str | None, revision: str) -> None:
    source = parse_source(text)
    assert (source.kind, source.repo_id, source.filename, source.revision) == ("hf", repo, filename, revision)
    assert source.is_snapshot == (filename is None)


@pytest.mark.parametrize("text", [
    "hf:owner/repo/file.bin", "hf:owner@main", "hf:owner/repo/../x@main", "ftp://x/y", "https://", "owner/repo",
])
def test_parse_source_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_source(text)


@pytest.mark.parametrize(("bad", "key"), [
    ({"size": -1}, "size"),
    ({"size": True}, "size"),
    ({"sha256": "ABC"}, "sha256"),
    ({"path": "../escape.bin"}, "path"),
    ({"path": "/abs.bin"}, "path"),
    ({"path": ".hidden/x.bin"}, "path"),
    ({"features": []}, "features"),
    ({"features": ["Portrait"]}, "features"),
    ({"source": "hf:owner/repo/file.bin"}, "source"),
    ({"licence": "Apache 2"}, "licence"),
    ({"non_commercial": "no"}, "non_commercial"),
    ({"verified": True}, "verified"),  # a verified file needs a sha256
    ({"sizes": 3}, "sizes"),
    ({"source": "hf:owner/repo@main"}, "allow_patterns"),
    ({"source": "hf:owner/repo@main", "allow_patterns": ["*"], "sha256": "a" * 64}, "sha256"),
    ({"allow_patterns": ["*.bin"]}, "allow_patterns"),
    ({"mirrors": ["hf:owner/repo@main"]}, "mirrors"),
    ({"facts_from": " "}, "facts_from"),
])
def test_validation_names_entry_and_key(tmp_path: Path, bad: dict[str, Any], key: str) -> None:
    with pytest.raises(ManifestError) as err:
        manifest_of(tmp_path, entry("good"), entry("broken", **bad))
    assert "'broken'" in str(err.value) and f"key {key!r}" in str(err.value)


def test_validation_names_a_missing_key(tmp_path: Path) -> None:
    broken = entry("broken")
    del broken["facts_from"]
    with pytest.raises(ManifestError, match="'broken'.*key 'facts_from': is required"):
        manifest_of(tmp_path, broken)


def test_validation_rejects_duplicates_and_overlaps(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="key 'name': 'a' is already used"):
        manifest_of(tmp_path, entry("a"), entry("a", path="other.bin"))
    with pytest.raises(ManifestError, match="key 'path'.*overlaps 'sd'"):
        manifest_of(tmp_path, entry("sd", source="hf:o/r@main", path="sd", allow_patterns=["*"]),
                    entry("unet", path="sd/unet.bin"))


def test_validation_rejects_bad_toml_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("schema = 1\n[[model]\n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(path)
    path.write_text("schema = 2\n")
    with pytest.raises(ManifestError, match="key 'schema'"):
        load_manifest(path)


def test_for_features(tmp_path: Path) -> None:
    manifest = manifest_of(tmp_path, entry("a", features=["selfie", "portrait"]), entry("b", features=["talk"]),
                           entry("c", features=["portrait"]))
    assert [e.name for e in manifest.for_features(["portrait"])] == ["a", "c"]
    assert [e.name for e in manifest.for_features(["talk", "selfie"])] == ["a", "b"]
    assert [e.name for e in manifest.for_features(["all"])] == ["a", "b", "c"]
    with pytest.raises(UnknownFeature, match="'cartoon'.*portrait, selfie, talk"):
        manifest.for_features(["cartoon"])
    with pytest.raises(UnknownFeature):
        manifest.for_features(["b"])  # a model name is no feature


def test_select_takes_features_and_model_names(tmp_path: Path) -> None:
    manifest = manifest_of(tmp_path, entry("a", features=["selfie"]), entry("b", features=["talk"]),
                           entry("c", features=["portrait"], non_commercial=True, licence="toy-nc"))
    assert [e.name for e in manifest.select(["c", "selfie"])] == ["a", "c"]
    assert [e.name for e in manifest.select("all")] == ["a", "b", "c"]
    assert manifest.pull_command(["c"]) == "facechain-bot models pull c --accept-license toy-nc"
    with pytest.raises(UnknownFeature, match="'d'.*models: a, b, c"):
        manifest.select(["d"])
    with pytest.raises(ManifestError, match="'talk' is both a model name and a feature"):
        manifest_of(tmp_path, entry("a", features=["talk"]), entry("talk", features=["x"]))


# --- status and require ------------------------------------------------------------------------


def test_status_of_files_placed_by_hand(tmp_path: Path) -> None:
    data = b"abcd"
    manifest = manifest_of(
        tmp_path,
        entry("checked", sha256=hashlib.sha256(data).hexdigest(), verified=True),
        entry("unchecked"),
        entry("short", sha256=hashlib.sha256(data).hexdigest(), verified=True),
        entry("absent"),
        entry("interrupted"),
        entry("snap", source="hf:o/r@main", path="snap", allow_patterns=["*"]),
    )
    models = tmp_path / "models"
    (models / ".pull/interrupted").mkdir(parents=True)
    (models / "checked.bin").write_bytes(data)
    (models / "unchecked.bin").write_bytes(b"whatever size")
    (models / "short.bin").write_bytes(b"ab")
    (models / "snap").mkdir()
    (models / "snap/model_index.json").write_text("{}")

    found = {s.name: s for s in status(models, manifest, check_hash=True)}

    assert {name: s.state for name, s in found.items()} == {
        "checked": ModelState.INSTALLED,
        "unchecked": ModelState.UNVERIFIED,
        "short": ModelState.SIZE_MISMATCH,
        "absent": ModelState.MISSING,
        "interrupted": ModelState.PARTIAL,
        "snap": ModelState.UNVERIFIED,
    }
    assert found["short"].actual_size == 2 and found["short"].expected_size == 4
    assert found["checked"].path == model_path(models, manifest.get("checked"))
    (models / "checked.bin").write_bytes(b"dcba")
    assert status(models, manifest, features=["toy"], check_hash=True)[0].state is ModelState.HASH_MISMATCH


def test_status_trusts_the_lock_record_only_for_the_same_source(tmp_path: Path) -> None:
    manifest = manifest_of(tmp_path, entry("a"))
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.bin").write_bytes(b"abcd")
    record = {"source": "https://example.org/a.bin", "path": "a.bin", "size": 4,
              "sha256": hashlib.sha256(b"abcd").hexdigest()}
    (models / LOCK_FILE).write_text(json.dumps({"schema": 1, "models": {"a": record}}))
    assert status(models, manifest, check_hash=True)[0].state is ModelState.INSTALLED
    record["source"] = "https://example.org/older.bin"
    (models / LOCK_FILE).write_text(json.dumps({"schema": 1, "models": {"a": record}}))
    assert status(models, manifest)[0].state is ModelState.UNVERIFIED


def test_require_returns_the_path_or_raises_with_the_pull_command(tmp_path: Path) -> None:
    manifest = manifest_of(
        tmp_path,
        entry("detector", features=["selfie", "portrait"]),
        entry("recognizer", features=["portrait"], non_commercial=True, licence="insightface-non-commercial"),
        entry("adapter", features=["portrait"], non_commercial=True, licence="ip-adapter-faceid-non-commercial"),
    )
    models = tmp_path / "models"

    with pytest.raises(ModelNotInstalled) as err:
        require(models, "detector", "portrait", manifest)
    assert err.value.code == "model.not_installed"
    assert err.value.details == {"model": "detector", "feature": "portrait", "pull_command": PORTRAIT_NC_COMMAND}
    with pytest.raises(ModelNotInstalled) as err:
        require(models, "detector", "selfie", manifest)
    assert err.value.details["pull_command"] == "facechain-bot models pull selfie"

    models.mkdir()
    (models / "detector.bin").write_bytes(b"abcd")
    assert require(models, "detector", "selfie", manifest) == models / "detector.bin"
    with pytest.raises(ValueError, match="does not serve feature 'talk'"):
        require(models, "detector", "talk", manifest)
    with pytest.raises(KeyError, match="no model named 'nope'"):
        require(models, "nope", "selfie", manifest)


def test_require_against_the_packaged_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalled) as err:
        require(tmp_path, "arcface", "portrait")
    assert err.value.details["pull_command"] == PORTRAIT_NC_COMMAND


def test_not_installed_message_exists_in_both_languages() -> None:
    assert {"en", "zh"} <= set(catalogue()["model.not_installed"])
    for lang in ("en", "zh"):
        text = t("model.not_installed", lang, model="sd15", feature="portrait", pull_command=PORTRAIT_NC_COMMAND)
        assert "sd15" in text and PORTRAIT_NC_COMMAND in text and "{" not in text
