"""Tiny models of every real format the engine loads, built with random weights.

Tests and CPU benchmarks load these through the production code and the stock diffusers loaders,
so the tiny files keep the real layouts and key names; only the sizes shrink. Layers that real
training starts at zero (peft's lora_B, IP-Adapter LoRA "up") are random here so wiring tests
see an effect.
"""
from __future__ import annotations

import logging
from pathlib import Path

from facechain_core.tiny.arcface import build_arcface
from facechain_core.tiny.clip_vision import build_clip_vision
from facechain_core.tiny.identity import build_identity
from facechain_core.tiny.ip_adapter import build_ip_adapter_faceid
from facechain_core.tiny.lora import build_lora, unet_config_of
from facechain_core.tiny.sd import build_sd15, build_sdxl, sd15_unet_config, sdxl_unet_config
from facechain_core.tiny.upscale import build_upscaler

log = logging.getLogger(__name__)

__all__ = [
    "TINY_LAYOUT", "build_all", "build_arcface", "build_clip_vision", "build_identity", "build_ip_adapter_faceid",
    "build_lora", "build_sd15", "build_sdxl", "build_upscaler", "sd15_unet_config", "sdxl_unet_config", "unet_config_of",
]

CLIP_VISION_HIDDEN = 32

# Where build_all puts each model, relative to its out_dir: the model manifest's paths (models.toml),
# so a tiny folder serves as a models_dir (YuNet aside: copy the real 230 kB file beside them).
TINY_LAYOUT: dict[str, str] = {
    "sd15": "sd15",
    "sdxl": "sdxl-base-1.0",
    "ip_adapter_faceid_sd15": "ip-adapter-faceid/ip-adapter-faceid_sd15.bin",
    "ip_adapter_faceid_plus_sd15": "ip-adapter-faceid/ip-adapter-faceid-plusv2_sd15.bin",
    "ip_adapter_faceid_sdxl": "ip-adapter-faceid/ip-adapter-faceid_sdxl.bin",
    "image_encoder": "clip-vit-h-14",
    "arcface": "insightface/w600k_r50.onnx",
    "lora_sd15_a": "loras/sd15_a.safetensors",
    "lora_sd15_b": "loras/sd15_b.safetensors",
    "lora_sd15_style": "loras/sd15_style.safetensors",
    "lora_sdxl": "loras/sdxl_a.safetensors",
    "upscaler_x2": "enhance/real_esrgan_x2.onnx",  # Enhance: Real-ESRGAN signature, own PixelShuffle layers
    "upscaler_x4": "enhance/real_esrgan_x4.onnx",
}


def build_all(out_dir: Path, full_size: bool = False) -> dict[str, Path]:
    """Build every tiny model under out_dir and return {name: path} (names and places as TINY_LAYOUT).

    ``full_size`` gives SD1.5 (and its adapters and LoRAs) the real dimensions for timing; the
    SDXL layout, encoders and ArcFace stay tiny.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    at = {name: out_dir / rel for name, rel in TINY_LAYOUT.items()}
    lora_rank = 128 if full_size else 4  # the published FaceID LoRA has rank 128
    build_sd15(at["sd15"], full_size=full_size)
    build_sdxl(at["sdxl"])
    build_ip_adapter_faceid(at["ip_adapter_faceid_sd15"], at["sd15"], full_size=full_size, lora_rank=lora_rank)
    build_ip_adapter_faceid(at["ip_adapter_faceid_plus_sd15"], at["sd15"], plus=True, clip_dim=CLIP_VISION_HIDDEN,
                            full_size=full_size, lora_rank=lora_rank, seed=1)
    build_ip_adapter_faceid(at["ip_adapter_faceid_sdxl"], at["sdxl"], seed=2)
    build_clip_vision(at["image_encoder"], hidden_size=CLIP_VISION_HIDDEN)
    build_arcface(at["arcface"])
    for seed, name in enumerate(("lora_sd15_a", "lora_sd15_b", "lora_sd15_style"), start=10):
        build_lora(at["sd15"], at[name], seed=seed)
    build_lora(at["sdxl"], at["lora_sdxl"], seed=13)
    build_upscaler(at["upscaler_x2"], 2)
    build_upscaler(at["upscaler_x4"], 4, seed=1)
    log.info("built %d tiny models under %s", len(at), out_dir)
    return at
