"""Merged LoRAs for the denoiser: same pictures, base weights restored bit for bit, chosen by fuse_loras."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from facechain_core.lora_fuse import fused_loras, wants_fusing
from facechain_core.tiny import build_identity
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401
from tests.test_portrait import _load, _pixels, _run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _half_precision_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"],
                                               init_lora_weights=False), model, adapter_name="user")
    return model.to(torch.float16)


def _base_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.get_base_layer().weight.detach().clone() for m in model.modules() if isinstance(m, LoraLayer)]


def test_merged_forward_matches_and_the_base_comes_back_exactly_where_unmerge_drifts() -> None:
    model = _half_precision_model()
    x = torch.randn(8, 64, dtype=torch.float16)
    before = _base_weights(model)
    with torch.no_grad():
        unmerged = model(x).float()
        for _ in range(50):
            with fused_loras(model) as merged_layers:
                merged = model(x).float()
        assert merged_layers == 2
    assert torch.allclose(merged, unmerged, atol=2e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, _base_weights(model)))
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    # peft's own merge + unmerge subtracts the delta again: in float16 the base does not come back.
    drifting = _half_precision_model()
    for _ in range(50):
        for m in drifting.modules():
            if isinstance(m, LoraLayer):
                m.merge()
                m.unmerge()
    assert not all(torch.equal(a, b) for a, b in zip(before, _base_weights(drifting)))


def test_nothing_is_merged_when_disabled_or_no_adapter_is_active() -> None:
    model = _half_precision_model()
    with fused_loras(model, enabled=False) as count:
        assert count == 0 and not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_adapter([])
    with fused_loras(model) as count:
        assert count == 0


def test_the_base_is_restored_when_the_block_fails() -> None:
    model = _half_precision_model()
    before = _base_weights(model)
    with pytest.raises(RuntimeError), fused_loras(model):
        raise RuntimeError("cancelled mid-batch")
    assert all(torch.equal(a, b) for a, b in zip(before, _base_weights(model)))


@pytest.mark.parametrize(("setting", "device", "expected"), [
    ("auto", "cpu", False), ("auto", "cuda", True), (True, "cpu", True), (False, "cuda", False)])
def test_fuse_loras_setting(setting: Any, device: str, expected: bool) -> None:
    assert wants_fusing(setting, device) is expected


def test_an_unknown_fuse_loras_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="fuse_loras"):
        wants_fusing("sometimes", "cpu")


def test_portraits_with_merged_loras_match_and_leave_the_base_untouched(tiny_models, tmp_path: Path) -> None:
    identity = build_identity(tmp_path / "id.npz", 3)
    plain = _load(tiny_models, tmp_path / "m1", fuse_loras=False)
    fused = _load(tiny_models, tmp_path / "m2", fuse_loras=True)
    lora = {"user_lora": str(tiny_models["lora_sd15_a"]), "user_lora_scale": 0.9}
    expected = _pixels(_run(plain, tmp_path / "p", identity, **lora).files[0])
    base = fused.base("sd15")
    merged_during: list[bool] = []
    unet = base.pipe.unet
    handle = unet.register_forward_pre_hook(
        lambda module, args: merged_during.append(any(m.merged for m in module.modules() if isinstance(m, LoraLayer))))
    first = _pixels(_run(fused, tmp_path / "f", identity, **lora).files[0])  # loads the user slot
    before = _base_weights(unet)
    again = _pixels(_run(fused, tmp_path / "g", identity, **lora).files[0])
    handle.remove()
    assert merged_during and all(merged_during)  # every denoising step ran merged (FaceID and user LoRA)
    assert np.abs(first - expected).max() <= 2 and np.array_equal(first, again)
    after = _base_weights(unet)
    assert len(after) == len(before) > 0 and all(torch.equal(x, y) for x, y in zip(before, after))
    # Another user's LoRA next: the picture is what an unmerged base makes of it.
    other = {"user_lora": str(tiny_models["lora_sd15_b"]), "user_lora_scale": 0.9}
    assert np.abs(_pixels(_run(fused, tmp_path / "f2", identity, **other).files[0])
                  - _pixels(_run(plain, tmp_path / "p2", identity, **other).files[0])).max() <= 2
