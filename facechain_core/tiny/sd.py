"""Stable Diffusion folders (SD1.5 and SDXL layouts) with random weights, loadable by ``from_pretrained``."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from facechain_core.tiny._common import MAX_LENGTH, randomise_zero_weights, special_ids, write_tokenizer_files

log = logging.getLogger(__name__)

# The noise schedule SD1.5 and SDXL were trained with.
_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def _tokenizer() -> tuple[CLIPTokenizer, int]:
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp), vocab_size


def _text_config(vocab_size: int, *, hidden: int, layers: int, heads: int, inner: int,
                 projection: int, act: str = "quick_gelu") -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=max(vocab_size, 49408) if hidden >= 768 else vocab_size,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection,
        **special_ids(vocab_size),
    )


def _vae(full_size: bool, *, sample_size: int, scaling_factor: float) -> AutoencoderKL:
    channels = (128, 256, 512, 512) if full_size else (32, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=2 if full_size else 1,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd15_unet_config(full_size: bool = False) -> dict:
    """Return the UNet config of the SD1.5 layout (real dimensions or tiny)."""
    if full_size:
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
    }


def build_sd15(out_dir: Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """Build an SD1.5-layout diffusers folder with random weights and return its path."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer()
    if full_size:
        text = _text_config(vocab_size, hidden=768, layers=12, heads=12, inner=3072, projection=768)
    else:
        text = _text_config(vocab_size, hidden=32, layers=5, heads=4, inner=37, projection=32)
    unet = UNet2DConditionModel(**sd15_unet_config(full_size))
    randomise_zero_weights(unet)
    pipe = StableDiffusionPipeline(
        vae=_vae(full_size, sample_size=512 if full_size else 64, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_slow_tokenizer(out_dir / "tokenizer")
    log.info("built SD1.5 layout (full_size=%s) at %s", full_size, out_dir)
    return out_dir


def sdxl_unet_config(full_size: bool = False) -> dict:
    """Return the UNet config of the SDXL layout (real dimensions or tiny)."""
    if full_size:
        return {
            "sample_size": 128,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }
    return {
        "sample_size": 32,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + pooled text 32
    }


def build_sdxl(out_dir: Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """Build an SDXL-layout diffusers folder (two text encoders) with random weights."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, vocab_size = _tokenizer()
    if full_size:
        text1 = _text_config(vocab_size, hidden=768, layers=12, heads=12, inner=3072, projection=768)
        text2 = _text_config(vocab_size, hidden=1280, layers=32, heads=20, inner=5120, projection=1280, act="gelu")
    else:
        text1 = _text_config(vocab_size, hidden=32, layers=5, heads=4, inner=37, projection=32)
        text2 = _text_config(vocab_size, hidden=32, layers=5, heads=4, inner=37, projection=32, act="gelu")
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sdxl_unet_config(full_size))
    randomise_zero_weights(unet)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(full_size, sample_size=1024 if full_size else 64, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(text1),
        text_encoder_2=CLIPTextModelWithProjection(text2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading", interpolation_type="linear"),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_slow_tokenizer(out_dir / "tokenizer")
    _write_slow_tokenizer(out_dir / "tokenizer_2")
    log.info("built SDXL layout (full_size=%s) at %s", full_size, out_dir)
    return out_dir



def _write_slow_tokenizer(folder: Path) -> None:
    # The published checkpoints ship vocab.json + merges.txt (no tokenizer.json): keep that layout.
    shutil.rmtree(folder, ignore_errors=True)
    write_tokenizer_files(folder)
