"""Identity LoRA training on SDXL: the SD1.5 trainer (``facechain_core.train_lora``) with SDXL's conditioning.

What differs from SD1.5, and nothing else: the prompt goes through both text encoders (the penultimate hidden
states of each, concatenated, as SDXL was trained; the second encoder's pooled projection too), and the UNet
also takes "added time ids" (original size, crop corner, target size) with the pooled prompt. Latents and
the prompt are encoded once (cached latents only); the VAE stays in float32, since SDXL's VAE overflows in
fp16. On CUDA the frozen weights are half precision under autocast with gradient checkpointing, as for SD1.5;
checkpoints, resume, yields and cancel are the SD1.5 trainer's own. The result is
``out_dir/pytorch_lora_weights_sdxl.safetensors`` (beside an SD1.5 LoRA in the same folder), loadable with
``StableDiffusionXLPipeline.load_lora_weights``. Job params as for SD1.5; the operator's defaults come from
``settings["train"]`` then ``settings["train_sdxl"]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from facechain_core.errors import ModelNotInstalled
from facechain_core.manifest import load_manifest
from facechain_core.train_lora import CachedInputs, InputSource, TrainLoraPipeline, TrainParams, encode_latent_dist, \
    weights_variant

logger = logging.getLogger(__name__)

FEATURE = "train-sdxl"
WEIGHT_NAME = "pytorch_lora_weights_sdxl.safetensors"
CHECKPOINT_DIR = "checkpoint_sdxl"
RESIDENT_KEY = "train_lora:sdxl"


@dataclass
class CachedSdxlInputs(CachedInputs):
    """Cached latents and both encoders' prompt embedding, plus the pooled prompt and the time ids."""

    pooled_embeds: torch.Tensor = None  # type: ignore[assignment]  (B=1, D) from text_encoder_2's projection
    time_ids: torch.Tensor = None  # type: ignore[assignment]  (1, 6): original size, crop corner, target size

    def added_cond_kwargs(self, batch: int) -> dict[str, torch.Tensor]:
        """What SDXL's UNet takes beside the prompt embedding, for a batch of `batch`."""
        return {"text_embeds": self.pooled_embeds.expand(batch, -1), "time_ids": self.time_ids.expand(batch, -1)}


def add_time_ids(resolution: int) -> torch.Tensor:
    """SDXL's micro-conditioning for square training crops: (original h, w, crop top, left, target h, w)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)


@torch.no_grad()
def cache_sdxl_inputs(sd: StableDiffusionXLPipeline, pixels: torch.Tensor, prompt: str,
                      resolution: int) -> CachedSdxlInputs:
    """Encode every crop's latent posterior and the prompt through both text encoders, once."""
    mean, std = encode_latent_dist(sd.vae, pixels)
    text, _, pooled, _ = sd.encode_prompt(prompt, device=sd.unet.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    dtype = sd.unet.dtype
    return CachedSdxlInputs(mean, std, text.to(dtype), float(sd.vae.config.scaling_factor),
                            pooled_embeds=pooled.to(dtype), time_ids=add_time_ids(resolution).to(sd.unet.device, dtype))


def sdxl_pull_command() -> str:
    """The operator's command that installs the SDXL base for training."""
    return load_manifest().pull_command([FEATURE])


class SdxlTrainLoraPipeline(TrainLoraPipeline):
    """Job "train_sdxl": selfies -> the user's identity LoRA for SDXL styles."""

    kind = "train_sdxl"
    base_name = "sdxl"
    feature = FEATURE
    resident_key = RESIDENT_KEY
    weight_name = WEIGHT_NAME
    checkpoint_dir = CHECKPOINT_DIR
    settings_key = "train_sdxl"

    def _load_base(self) -> StableDiffusionXLPipeline:
        assert self._context is not None and self._path is not None
        path = self._path
        if not (path / "model_index.json").is_file():
            raise ModelNotInstalled(model="sdxl", feature=FEATURE, pull_command=sdxl_pull_command())
        sd = StableDiffusionXLPipeline.from_pretrained(path, dtype=self.dtype, variant=weights_variant(path),
                                                       local_files_only=True)
        if sd.vae.dtype != torch.float32:
            sd.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16; it only encodes the crops once
        sd.to(self._context.device)
        sd.set_progress_bar_config(disable=True)
        for module in (sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        logger.info("train_lora loaded SDXL %s on %s (%s)", path, self._context.device, self.dtype)
        return sd

    def job_defaults(self) -> dict[str, Any]:
        """settings["train"], then settings["train_sdxl"] over it."""
        assert self._context is not None
        return {**self._context.settings.get("train", {}), **self._context.settings.get(self.settings_key, {})}

    def make_source(self, sd: Any, pixels: torch.Tensor, prompts: str | list[str], job: TrainParams) -> InputSource:
        if not job.cache_latents:
            raise ValueError("SDXL training always caches latents (cache_latents must be true)")
        if not isinstance(prompts, str):
            raise ValueError("SDXL training takes one prompt for every photo, not per-photo captions")
        return cache_sdxl_inputs(sd, pixels, prompts, job.resolution)
