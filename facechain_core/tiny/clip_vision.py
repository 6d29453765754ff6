"""A tiny CLIP vision encoder (CLIPVisionModelWithProjection folder) for IP-Adapter FaceID Plus."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

log = logging.getLogger(__name__)


def build_clip_vision(out_dir: Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a random CLIPVisionModelWithProjection (32 px input) and return its folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=37, projection_dim=hidden_size, num_hidden_layers=4,
        num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu",
    )
    CLIPVisionModelWithProjection(config).save_pretrained(out_dir)
    log.info("built CLIP vision encoder at %s", out_dir)
    return out_dir
