"""bench/bench_likeness.py runs end to end on tiny models: identity, LoRA training, portraits per style and
mode, SFace scoring through OpenCV's FaceRecognizerSF (numbers meaningless, the path is the real one)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from tests.fixtures.tiny_models import one_torch_thread, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]
BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_likeness.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_likeness", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_likeness_bench_runs_on_tiny_models(tmp_path: Path, faces_dir: Path, yunet_path: Path,
                                               tiny_models_dir: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture) -> None:
    selfies = tmp_path / "selfies"
    for person, photos in (("obama", ["obama.jpg", "obama2.jpg", "obama3.jpg"]), ("biden", ["biden.jpg"]),
                           ("nobody", [])):
        (selfies / person).mkdir(parents=True)
        for name in photos:
            shutil.copy(faces_dir / name, selfies / person / name)
    with Image.open(faces_dir / "biden.jpg") as photo:  # a second, mirrored photo makes Biden count
        ImageOps.mirror(photo).save(selfies / "biden" / "biden_mirrored.jpg")
    code = _bench().main(["--faces", str(selfies), "--tiny", "--tiny-dir", str(tiny_models_dir), "--yunet",
                          str(yunet_path), "--styles", "hanfu", "--count", "1", "--scratch", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped nobody: needs at least 2 photos" in out
    assert "2 people, 1 portraits" in out and "numbers meaningless" in out
    (row,) = [line for line in out.splitlines() if line.startswith("hanfu")]
    cells = row.split()
    # One mean cosine per mode, each over 2 portraits (one per person), all from the real scoring path.
    assert len([c for c in cells if c.startswith(("0", "-0", "1"))]) == 2 and row.count("/2 faces") == 2
    assert all(-1.0 <= float(c) <= 1.0 for c in cells[1:] if c[0].isdigit() or c.startswith("-"))
    assert "PuLID 0.733, InstantID 0.725, IP-Adapter 0.619" in out
    assert (tmp_path / "work" / "people" / "obama" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_likeness_bench_refuses_bad_modes(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--faces", str(tmp_path), "--modes", "magic"])
