"""Shared fixtures. Feature-specific fixtures live in tests/fixtures/ and are imported here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import handlers.features  # noqa: F401  (every command, button and presenter registered, as in the service)

pytest_plugins = [
    "tests.fixtures.fake_telegram", "tests.fixtures.fake_discord", "tests.fixtures.tiny_models", "tests.fixtures.ray_cluster",
]

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def find_asset(relative: str, models_dir: Path | None = None) -> Path:
    """Finds a test asset in the configured models dir first, then ../shared/, or skips the test."""
    candidates = []
    if models_dir is not None:
        candidates.append(models_dir / Path(relative).name)
    env_models = os.environ.get("FACECHAIN_MODELS_DIR")
    if env_models:
        candidates.append(Path(env_models) / Path(relative).name)
    candidates.append(SHARED / relative)
    for path in candidates:
        if path.exists():
            return path
    pytest.skip(f"{relative} not found in the models dir nor in {SHARED} (a fresh clone has no ../shared/)")


@pytest.fixture
def yunet_path() -> Path:
    return find_asset("models/yunet_s_640_640.onnx")


@pytest.fixture
def faces_dir() -> Path:
    path = SHARED / "faces"
    if not path.is_dir():
        pytest.skip(f"{path} not present (a fresh clone has no ../shared/)")
    return path
