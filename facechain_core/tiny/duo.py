"""Tiny models for group portraits: an SD1.5-layout base, its openpose ControlNet and IP-Adapter FaceID.

The group test asks that changing one person's identity changes that person's region several times more
than anyone else's. Two things of a random tiny model mix the whole picture far more than a trained one:
GroupNorm with one channel per group (the tiny UNet's 32 groups over 32 channels; SD1.5 has 10 to 40
channels a group), whose per-channel statistics over the whole picture spread any local change
everywhere, and the FaceID LoRA's random weights on every self-attention. So this base normalises over
all channels of a group of one (``NORM_GROUPS``), its adapter has no LoRA, and the adapter's image keys
and values are drawn wider (``IP_STD``) so that the identity steers its region as a trained one does.
The formats and loaders are the production ones.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from facechain_core.tiny.ip_adapter import build_ip_adapter_faceid
from facechain_core.tiny.sd import build_sd15
from facechain_core.tiny.tryon import build_controlnet

IP_STD = 0.6
NORM_GROUPS = 1

# Names (the manifest's where there is one) -> paths under out_dir.
DUO_LAYOUT = {
    "sd15": "sd15-duo",
    "controlnet-openpose-sd15": "controlnet-openpose-sd15",
    "ip-adapter-faceid-sd15": "ip-adapter-faceid/ip-adapter-faceid_sd15_duo.bin",
}


def build_duo_base(out_dir: Path, *, seed: int = 0) -> Path:
    """An SD1.5-layout folder like ``build_sd15``'s whose UNet and VAE use NORM_GROUPS groups."""
    out_dir = Path(out_dir)
    build_sd15(out_dir, seed=seed)
    torch.manual_seed(seed)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        config = {**cls.load_config(out_dir / sub), "norm_num_groups": NORM_GROUPS}
        model = cls.from_config(config)
        shutil.rmtree(out_dir / sub)
        model.save_pretrained(out_dir / sub, safe_serialization=True)
    return out_dir


def build_duo_models(out_dir: Path, *, ip_std: float = IP_STD) -> dict[str, Path]:
    """Build the base, its openpose ControlNet and its FaceID adapter under out_dir; name -> path."""
    out_dir = Path(out_dir)
    at = {name: out_dir / rel for name, rel in DUO_LAYOUT.items()}
    build_duo_base(at["sd15"])
    build_controlnet(at["controlnet-openpose-sd15"], at["sd15"], seed=3)
    build_ip_adapter_faceid(at["ip-adapter-faceid-sd15"], at["sd15"], seed=4, ip_std=ip_std, lora_rank=0)
    return at
