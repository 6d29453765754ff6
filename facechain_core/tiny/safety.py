"""A tiny diffusers ``StableDiffusionSafetyChecker`` folder (config, weights, CLIP image processor).

The layout is the real one (``CompVis/stable-diffusion-safety-checker``: ``config.json``,
``model.safetensors``, ``preprocessor_config.json``); the CLIP vision tower is tiny and random.
Its concept thresholds decide the verdict deterministically: a cosine similarity lies in [-1, 1],
so a threshold of -2 flags every image and one of 2 flags none.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
PROJECTION_DIM = 16
# Threshold per verdict: any cosine minus -2 is > 0 (flagged), any cosine minus 2 is < 0 (clean).
THRESHOLDS = {"all": -2.0, "none": 2.0}


def build_safety_checker(out_dir: Path, *, flag: Literal["all", "none"] = "none", seed: int = 0) -> Path:
    """Save a random tiny safety checker that flags every image (`flag="all"`) or none; return its folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    if flag not in THRESHOLDS:
        raise ValueError(f"flag must be one of {sorted(THRESHOLDS)}, got {flag!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 99, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=PROJECTION_DIM,
    )
    model = StableDiffusionSafetyChecker(config).eval()
    threshold = THRESHOLDS[flag]
    with torch.no_grad():
        # Random concept directions, as the real ones are learned; only the thresholds pick the verdict.
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    model.save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(out_dir)
    log.info("built safety checker (flags %s) at %s", flag, out_dir)
    return out_dir
