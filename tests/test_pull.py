"""`facechain_core.pull` against a local fake Hugging Face Hub and a plain file server (no network)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from facechain_core import pull as pull_module
from facechain_core.errors import ModelNotInstalled
from facechain_core.manifest import LOCK_FILE, Manifest, ModelState, load_manifest, read_lock, require, status
from facechain_core.pull import (
    DownloadInterrupted,
    LicenceNotAccepted,
    PullAction,
    PullProgress,
    SourceUnavailable,
    VerificationError,
    pull,
)
from tests.fixtures.fake_hub import FakeHub, FileServer, write_manifest

REPO = "toy/faces"
SNAPSHOT_REPO = "toy/tiny-sd"


def blob(n: int, seed: int) -> bytes:
    """Returns `n` deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


DETECTOR = blob(60_000, 1)  # LFS on the fake hub
RECOGNIZER = blob(90_000, 2)
UNET = blob(120_000, 3)
TEXT_ENCODER = blob(50_000, 4)
CONFIG = b'{"_class_name": "UNet2DConditionModel"}'
SPEAKER = blob(300_000, 5)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_module, "_RETRY_PAUSE_S", 0.0)


@pytest.fixture
def cdn() -> Iterator[FileServer]:
    with FileServer() as server:
        yield server


@pytest.fixture
def files() -> Iterator[FileServer]:
    """A plain web server, like GitHub releases."""
    with FileServer() as server:
        yield server


@pytest.fixture
def hub(cdn: FileServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(cdn) as server:
        server.add_repo(REPO, {"detector.onnx": DETECTOR, "recognizer.onnx": RECOGNIZER, "README.md": b"# toy\n"})
        server.add_repo(SNAPSHOT_REPO, {
            "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
            "unet/config.json": CONFIG,
            "unet/diffusion_pytorch_model.safetensors": UNET,
            "unet/diffusion_pytorch_model.bin": blob(80_000, 9),  # not allowed: must not be fetched
            "text_encoder/model.safetensors": TEXT_ENCODER,
            "text_encoder/config.json": b'{"hidden_size": 32}',
        })
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def entry(name: str, source: str, path: str, size: int, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": name, "features": ["toy"], "source": source, "path": path, "size": size,
        "licence": "apache-2.0", "non_commercial": False, "verified": False, "facts_from": "test fixture",
    }
    base.update(extra)
    return base


def make_manifest(tmp_path: Path, *entries: dict[str, object]) -> Manifest:
    return load_manifest(write_manifest(tmp_path / "models.toml", list(entries)))


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pulls_hub_file_and_records_the_hubs_hash(hub: FakeHub, cdn: FileServer, tmp_path: Path,
                                                  models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/detector.onnx@main", "face/detector.onnx",
                                             len(DETECTOR)))
    assert [s.state for s in status(models_dir, manifest)] == [ModelState.MISSING]
    seen: list[PullProgress] = []

    report = pull(manifest, models_dir, ["toy"], progress=seen.append)

    target = models_dir / "face/detector.onnx"
    assert target.read_bytes() == DETECTOR
    assert [(m.name, m.action) for m in report.models] == [("detector", PullAction.FETCHED)]
    record = read_lock(models_dir)["detector"]
    assert record["sha256"] == sha256(DETECTOR) and record["hash_from"] == "hub"
    assert record["revision"] == hub.repos[REPO].commit
    assert seen and seen[-1].done == len(DETECTOR) and seen[-1].total == len(DETECTOR)
    assert [s.state for s in status(models_dir, manifest, check_hash=True)] == [ModelState.INSTALLED]
    assert not (models_dir / ".pull").exists()
    assert len(cdn.seen("GET", "/blobs/")) == 1


def test_pull_by_model_name(hub: FakeHub, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(
        tmp_path,
        entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx", len(DETECTOR)),
        entry("recognizer", f"hf:{REPO}/recognizer.onnx@main", "recognizer.onnx", len(RECOGNIZER)),
    )
    report = pull(manifest, models_dir, ["recognizer"])
    assert [m.name for m in report.models] == ["recognizer"]
    assert (models_dir / "recognizer.onnx").exists() and not (models_dir / "detector.onnx").exists()


def test_pull_skips_installed_models(hub: FakeHub, cdn: FileServer, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx",
                                             len(DETECTOR)))
    pull(manifest, models_dir, ["toy"])
    requests_before = len(hub.requests) + len(cdn.requests)

    again = pull(manifest, models_dir, ["all"])

    assert [m.action for m in again.models] == [PullAction.ALREADY_INSTALLED]
    assert len(hub.requests) + len(cdn.requests) == requests_before


def test_pulls_snapshot_with_allow_patterns(hub: FakeHub, cdn: FileServer, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry(
        "tiny-sd", f"hf:{SNAPSHOT_REPO}@main", "tiny-sd", 1,
        allow_patterns=["model_index.json", "unet/config.json", "unet/*.safetensors", "text_encoder/*"],
    ))

    report = pull(manifest, models_dir, ["toy"])

    folder = models_dir / "tiny-sd"
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert found == ["model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes() == UNET
    assert not cdn.seen("GET", sha256(blob(80_000, 9)))
    record = read_lock(models_dir)["tiny-sd"]
    assert record["files"]["text_encoder/model.safetensors"]["sha256"] == sha256(TEXT_ENCODER)
    assert report.models[0].files == 5 and report.models[0].warnings  # the manifest's size was a guess
    assert [s.state for s in status(models_dir, manifest, check_hash=True)] == [ModelState.INSTALLED]

    (folder / "unet/config.json").write_bytes(b"{}")
    assert status(models_dir, manifest)[0].state is ModelState.SIZE_MISMATCH


def test_snapshot_pattern_matching_nothing_is_an_error(hub: FakeHub, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("tiny-sd", f"hf:{SNAPSHOT_REPO}@main", "tiny-sd", 1,
                                             allow_patterns=["unet/*.safetensors", "vae/*"]))
    with pytest.raises(SourceUnavailable, match="'vae/\\*' matches no file"):
        pull(manifest, models_dir, ["toy"])
    assert not (models_dir / "tiny-sd").exists()


def test_dry_run_checking_sources_lists_their_sizes_without_downloading(hub: FakeHub, cdn: FileServer, files: FileServer, tmp_path: Path,
                                                 models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(
        tmp_path,
        entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx", 1),
        entry("tiny-sd", f"hf:{SNAPSHOT_REPO}@main", "tiny-sd", 1, allow_patterns=["unet/*.safetensors"]),
        entry("speaker", url, "speaker.bin", 1, non_commercial=True, licence="toy-nc"),
        entry("readme", f"hf:{REPO}/README.md@main", "README.md", 1),
    )

    report = pull(manifest, models_dir, ["toy"], dry_run=True, check_sources=True)

    assert [(m.name, m.action, m.size) for m in report.models] == [
        ("detector", PullAction.WOULD_FETCH, len(DETECTOR)),
        ("tiny-sd", PullAction.WOULD_FETCH, len(UNET)),
        ("speaker", PullAction.WOULD_FETCH, len(SPEAKER)),
        ("readme", PullAction.WOULD_FETCH, len(b"# toy\n")),
    ]
    assert report.bytes_to_fetch == len(DETECTOR) + len(UNET) + len(SPEAKER) + 6
    assert report.licences_to_accept == ["toy-nc"]
    assert "--accept-license toy-nc" in report.pull_command
    assert not cdn.requests and not files.seen("GET") and not hub.seen("GET", "/resolve/")
    assert not models_dir.exists()


def test_resumes_an_interrupted_download_with_range(files: FileServer, tmp_path: Path, models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(tmp_path, entry("speaker", url, "speaker.bin", len(SPEAKER), sha256=sha256(SPEAKER)))
    files.drop_after("/releases/speaker.bin", 100_000)

    with pytest.raises(DownloadInterrupted, match="next pull resumes"):
        pull(manifest, models_dir, ["toy"], retries=0)
    assert status(models_dir, manifest)[0].state is ModelState.PARTIAL
    assert (models_dir / ".pull/speaker/download.part").stat().st_size == 100_000

    report = pull(manifest, models_dir, ["toy"])

    gets = files.seen("GET")
    assert len(gets) == 2 and "range" not in gets[0].headers
    assert gets[1].headers["range"] == "bytes=100000-"
    assert (models_dir / "speaker.bin").read_bytes() == SPEAKER
    assert report.models[0].sha256 == sha256(SPEAKER)
    assert read_lock(models_dir)["speaker"]["hash_from"] == "manifest"
    assert not (models_dir / ".pull").exists()


def test_resumes_within_one_pull_when_retries_allow(files: FileServer, tmp_path: Path, models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(tmp_path, entry("speaker", url, "speaker.bin", len(SPEAKER)))
    files.drop_after("/releases/speaker.bin", 65_536)
    seen: list[PullProgress] = []

    pull(manifest, models_dir, ["toy"], retries=1, progress=seen.append)

    assert [g.headers.get("range") for g in files.seen("GET")] == [None, "bytes=65536-"]
    assert (models_dir / "speaker.bin").read_bytes() == SPEAKER
    assert read_lock(models_dir)["speaker"]["sha256"] == sha256(SPEAKER)  # recorded: the URL gave no hash
    assert seen[-1].done == len(SPEAKER)


def test_url_hash_mismatch_is_rejected(files: FileServer, tmp_path: Path, models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(tmp_path, entry("speaker", url, "speaker.bin", len(SPEAKER), sha256="0" * 64))

    with pytest.raises(VerificationError, match="sha256 is"):
        pull(manifest, models_dir, ["toy"])

    assert not (models_dir / "speaker.bin").exists()
    assert not (models_dir / ".pull/speaker/download.part").exists()
    assert status(models_dir, manifest)[0].state in (ModelState.MISSING, ModelState.PARTIAL)
    assert "speaker" not in read_lock(models_dir)


def test_hub_hash_differing_from_manifest_is_refused_before_download(hub: FakeHub, cdn: FileServer, tmp_path: Path,
                                                                     models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx",
                                             len(DETECTOR), sha256=sha256(b"other bytes")))
    with pytest.raises(VerificationError, match="the manifest expects"):
        pull(manifest, models_dir, ["toy"])
    assert not cdn.requests
    assert status(models_dir, manifest)[0].state is ModelState.MISSING


def test_corrupt_bytes_from_the_cdn_are_rejected(hub: FakeHub, cdn: FileServer, tmp_path: Path,
                                                 models_dir: Path) -> None:
    hub.corrupt_cdn(REPO, "recognizer.onnx", blob(len(RECOGNIZER), 77))
    manifest = make_manifest(tmp_path, entry("recognizer", f"hf:{REPO}/recognizer.onnx@main", "recognizer.onnx",
                                             len(RECOGNIZER)))
    with pytest.raises(VerificationError, match=f"expected {sha256(RECOGNIZER)}"):
        pull(manifest, models_dir, ["toy"])
    assert not (models_dir / "recognizer.onnx").exists()
    with pytest.raises(ModelNotInstalled):
        require(models_dir, "recognizer", "toy", manifest)


def test_non_commercial_model_needs_its_licence_accepted(hub: FakeHub, cdn: FileServer, tmp_path: Path,
                                                         models_dir: Path) -> None:
    manifest = make_manifest(
        tmp_path,
        entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx", len(DETECTOR)),
        entry("recognizer", f"hf:{REPO}/recognizer.onnx@main", "recognizer.onnx", len(RECOGNIZER),
              non_commercial=True, licence="toy-research-only"),
    )

    with pytest.raises(LicenceNotAccepted) as refused:
        pull(manifest, models_dir, ["toy"], accept_licenses={"some-other-licence"})
    assert refused.value.licences == ["toy-research-only"]
    assert refused.value.models == ["recognizer"]
    assert refused.value.command == "facechain-bot models pull toy --accept-license toy-research-only"
    assert refused.value.command in str(refused.value)
    assert not hub.requests and not cdn.requests and not models_dir.exists()

    report = pull(manifest, models_dir, ["toy"], accept_licenses={"toy-research-only"})

    assert [m.action for m in report.models] == [PullAction.FETCHED, PullAction.FETCHED]
    assert (models_dir / "recognizer.onnx").read_bytes() == RECOGNIZER


def test_falls_back_to_a_mirror(hub: FakeHub, files: FileServer, tmp_path: Path, models_dir: Path) -> None:
    mirror = files.add("/mirror/detector.onnx", DETECTOR)
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/missing.onnx@main", "detector.onnx",
                                             len(DETECTOR), sha256=sha256(DETECTOR), verified=True,
                                             mirrors=[mirror]))
    report = pull(manifest, models_dir, ["toy"])
    assert report.models[0].source == mirror
    assert (models_dir / "detector.onnx").read_bytes() == DETECTOR


def test_unknown_revision_names_the_source(hub: FakeHub, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/detector.onnx@v9", "detector.onnx", 1))
    with pytest.raises(SourceUnavailable, match="RevisionNotFound|v9"):
        pull(manifest, models_dir, ["toy"])


def test_status_before_and_after_and_tampering(hub: FakeHub, tmp_path: Path, models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx",
                                             len(DETECTOR)))
    pull(manifest, models_dir, ["toy"])
    target = models_dir / "detector.onnx"

    target.write_bytes(blob(len(DETECTOR), 42))  # same size, other bytes
    assert status(models_dir, manifest)[0].state is ModelState.INSTALLED  # size only: fast
    assert status(models_dir, manifest, check_hash=True)[0].state is ModelState.HASH_MISMATCH

    target.write_bytes(DETECTOR[:100])
    assert status(models_dir, manifest)[0].state is ModelState.SIZE_MISMATCH
    with pytest.raises(ModelNotInstalled) as missing:
        require(models_dir, "detector", "toy", manifest)
    assert missing.value.details["pull_command"] == "facechain-bot models pull toy"

    report = pull(manifest, models_dir, ["toy"])  # a broken model is fetched again
    assert report.models[0].action is PullAction.FETCHED
    assert require(models_dir, "detector", "toy", manifest) == target
    assert target.read_bytes() == DETECTOR


def test_lock_file_is_valid_json_with_every_pull(hub: FakeHub, files: FileServer, tmp_path: Path,
                                                 models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(
        tmp_path,
        entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx", len(DETECTOR)),
        entry("speaker", url, "speaker.bin", len(SPEAKER)),
    )
    pull(manifest, models_dir, ["toy"])
    data = json.loads((models_dir / LOCK_FILE).read_text())
    assert sorted(data["models"]) == ["detector", "speaker"]
    assert data["models"]["speaker"]["size"] == len(SPEAKER)
    assert os.listdir(models_dir) and not any(p.endswith(".tmp") for p in os.listdir(models_dir))


def test_interrupted_snapshot_keeps_finished_files(hub: FakeHub, cdn: FileServer, tmp_path: Path,
                                                   models_dir: Path) -> None:
    manifest = make_manifest(tmp_path, entry(
        "tiny-sd", f"hf:{SNAPSHOT_REPO}@main", "tiny-sd", len(UNET) + len(TEXT_ENCODER),
        allow_patterns=["unet/*.safetensors", "text_encoder/model.safetensors"],
    ))
    unet_blob = f"/blobs/{sha256(UNET)}"
    cdn.files.pop(unet_blob)  # the CDN fails the last file of the snapshot

    with pytest.raises(SourceUnavailable, match="unet/diffusion_pytorch_model.safetensors"):
        pull(manifest, models_dir, ["toy"])
    assert status(models_dir, manifest)[0].state is ModelState.PARTIAL

    cdn.add(unet_blob, UNET)
    seen: list[PullProgress] = []
    report = pull(manifest, models_dir, ["toy"], progress=seen.append)

    assert len(cdn.seen("GET", sha256(TEXT_ENCODER))) == 1  # finished before the failure: not fetched again
    assert (models_dir / "tiny-sd/unet/diffusion_pytorch_model.safetensors").read_bytes() == UNET
    assert report.models[0].warnings == []  # the manifest's size was exact
    assert seen[-1].done == seen[-1].total == len(UNET) + len(TEXT_ENCODER)
    assert [p.done for p in seen] == sorted(p.done for p in seen)


def test_a_dry_run_answers_from_the_manifest_without_asking_any_source(hub: FakeHub, cdn: FileServer,
                                                                       files: FileServer, tmp_path: Path,
                                                                       models_dir: Path) -> None:
    url = files.add("/releases/speaker.bin", SPEAKER)
    manifest = make_manifest(
        tmp_path,
        entry("detector", f"hf:{REPO}/detector.onnx@main", "detector.onnx", 61_000),
        entry("speaker", url, "speaker.bin", 300_000, non_commercial=True, licence="toy-nc"),
    )
    report = pull(manifest, models_dir, ["toy"], dry_run=True)
    assert [(m.name, m.action, m.size, m.source) for m in report.models] == [
        ("detector", PullAction.WOULD_FETCH, 61_000, f"hf:{REPO}/detector.onnx@main"),
        ("speaker", PullAction.WOULD_FETCH, 300_000, url),
    ]
    assert report.licences_to_accept == ["toy-nc"]
    assert not hub.requests and not cdn.requests and not files.requests


def test_checking_sources_tries_a_host_that_does_not_resolve_once(tmp_path: Path, models_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (the host names do not resolve): each host is looked up once, nothing is retried."""
    looked_up: list[str] = []

    def no_dns(host: str, *args: object, **kwargs: object) -> object:
        looked_up.append(host)
        raise OSError(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(pull_module.socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    manifest = make_manifest(
        tmp_path,
        entry("a", f"hf:{REPO}/detector.onnx@main", "a.onnx", 10, mirrors=["https://cdn.example.invalid/a.onnx"]),
        entry("b", f"hf:{REPO}/recognizer.onnx@main", "b.onnx", 20),
        entry("c", "https://cdn.example.invalid/c.bin", "c.bin", 30),
    )
    report = pull(manifest, models_dir, ["toy"], dry_run=True, check_sources=True)
    assert [(m.name, m.size) for m in report.models] == [("a", 10), ("b", 20), ("c", 30)]  # the manifest's
    assert sorted(looked_up) == ["cdn.example.invalid", "hub.example.invalid"]
    assert all("does not resolve" in m.warnings[0] for m in report.models)
    with pytest.raises(SourceUnavailable, match="does not resolve"):
        pull(manifest, models_dir, ["b"])
