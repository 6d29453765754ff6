"""A LoRA for a UNet in the file format diffusers' ``save_lora_weights`` writes (peft keys)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


log = logging.getLogger(__name__)

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def unet_config_of(source: dict[str, Any] | Path | str) -> dict[str, Any]:
    """Return a UNet config from a dict, a diffusers model folder, or a UNet folder."""
    if isinstance(source, dict):
        return dict(source)
    folder = Path(source)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    return dict(UNet2DConditionModel.load_config(folder))


def build_lora(unet_config: dict[str, Any] | Path | str, out: Path, *, rank: int = 4,
               alpha: int | None = None, seed: int = 0, std: float = 0.05) -> Path:
    """Write a random UNet LoRA (peft adapter on attention projections) to the .safetensors file `out`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out must be a .safetensors file, got {out}")
    torch.manual_seed(seed)
    # Only the adapter's tensors are real: the base UNet stays on the meta device, so a LoRA for the
    # full-size architecture costs no 3 GB initialisation.
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config_of(unet_config))
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(TARGET_MODULES))
    unet.add_adapter(config)
    with torch.no_grad():
        for module in unet.modules():
            for part in ("lora_A", "lora_B"):
                if isinstance(getattr(module, part, None), torch.nn.ModuleDict):
                    getattr(module, part).to_empty(device="cpu")
        # Random lora_B too (peft starts it at zero, which would make the adapter a no-op).
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        out.parent, unet_lora_layers=layers, weight_name=out.name, safe_serialization=True,
        unet_lora_adapter_metadata=config.to_dict(),
    )
    log.info("built LoRA rank %d at %s", rank, out)
    return out
