"""Diffusion cartoon styles (3D, hand-drawn): img2img that keeps the face through IP-Adapter FaceID.

DCT-Net's 3D and hand-drawn weights are TensorFlow-only, so these looks come from the portrait
feature's resident SD1.5 base instead: an img2img pipeline derived from it (``from_pipe``: shared
modules, no extra memory) repaints the photo after a prompt, while the ArcFace embedding of the
photo's own main face conditions IP-Adapter FaceID, so the cartoon keeps the person's likeness.
The portrait pipeline's LoRAs are switched off for the job (the next portrait job switches them on).

Settings beside the portrait ones (``sd15_path``, ``ip_adapter_path``, ``arcface_path``...):
``cartoon_diffusion_size`` and ``cartoon_diffusion_steps`` override every style's working size and
steps (small values for CPU hosts and tests); ``subject`` ("a person") fills ``{subject}``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from facechain_core.faces import Face
from facechain_core.pipeline import PipelineContext

log = logging.getLogger(__name__)

FAMILY = "sd15"
DERIVED_KEY = "cartoon:img2img"
SIZE_MULTIPLE = 8  # SD1.5 latents are 1/8 of the picture: sides must be multiples of 8
MIN_SIDE = 64


@dataclass(frozen=True)
class DiffusionSpec:
    """How a diffusion style repaints: prompt, how much (strength), steps, guidance, likeness weight."""

    prompt: str  # with "{subject}"
    negative_prompt: str = ""
    strength: float = 0.6  # 0: the photo unchanged, 1: ignore the photo
    steps: int = 30
    guidance: float = 6.0
    identity_weight: float = 0.8
    size: int = 640  # longer side of the working picture

    def __post_init__(self) -> None:
        if "{subject}" not in self.prompt:
            raise ValueError(f"prompt must contain {{subject}}, got {self.prompt!r}")
        if not 0.05 <= self.strength <= 1.0:
            raise ValueError(f"strength must be within 0.05..1, got {self.strength}")
        if self.steps < 1 or self.size < MIN_SIDE:
            raise ValueError(f"steps must be >= 1 and size >= {MIN_SIDE}, got {self.steps} and {self.size}")


def working_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """The picture's size scaled to `long_side`, each side a multiple of 8 (at least 64)."""
    scale = long_side / max(width, height)

    def side(value: int) -> int:
        return max(MIN_SIDE, int(round(value * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    return side(width), side(height)


class DiffusionStyler:
    """Repaints a photo with a DiffusionSpec; loads the portrait base and ArcFace on first use."""

    def __init__(self, context: PipelineContext) -> None:
        self._context = context
        self._portrait: Any | None = None
        self._arcface: Any | None = None

    def __call__(self, rgb: np.ndarray, face: Face, spec: DiffusionSpec, seed: int,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Returns the repainted picture at rgb's size; `on_step(done, total)` follows the denoising."""
        import torch
        from diffusers import StableDiffusionImg2ImgPipeline

        from facechain_core.identity import PLUS_CROP_SIZE, Identity, align_face, landmarks_of
        from facechain_core.resident import SHARED_KEY

        portrait, arcface = self._load()
        settings = self._context.settings
        landmarks = landmarks_of(face)
        if landmarks is None:
            raise ValueError("the face needs five landmarks")
        # 1. The photo's own identity.
        embedding = arcface.embed_face(rgb, landmarks).astype(np.float32)
        # 2. The resident base without LoRAs, its likeness weight, and img2img sharing its modules.
        base = portrait.base(FAMILY)
        portrait.activate_loras(base, [])
        base.use_scheduler(None)
        base.pipe.set_ip_adapter_scale(spec.identity_weight)
        resident = self._context.shared[SHARED_KEY]
        img2img = resident.derive(DERIVED_KEY, portrait.resident_key(FAMILY),
                                  # dtype: from_pipe would otherwise cast the shared modules to float32
                                  lambda b: StableDiffusionImg2ImgPipeline.from_pipe(b.pipe, dtype=b.pipe.unet.dtype))
        img2img.set_progress_bar_config(disable=True)
        cfg = spec.guidance > 1.0
        if base.plus:
            crop = align_face(rgb, landmarks, PLUS_CROP_SIZE)
            identity = Identity(embedding=embedding, photo_embeddings=embedding[None], crop=crop)
            # FaceID Plus also reads the CLIP states of the face crop, set on the shared projection.
            portrait._set_clip_embeds(base, identity, 1, cfg)
        device, dtype = img2img.device, img2img.unet.dtype
        ip = torch.from_numpy(embedding).reshape(1, 1, -1).to(device, dtype)
        ip_embeds = torch.cat([torch.zeros_like(ip), ip]) if cfg else ip
        # 3. Repaint at the working size, then back to the photo's size.
        height, width = rgb.shape[:2]
        long_side = int(settings.get("cartoon_diffusion_size") or spec.size)
        steps = int(settings.get("cartoon_diffusion_steps") or spec.steps)
        work = Image.fromarray(rgb).resize(working_size(width, height, long_side), Image.LANCZOS)
        total = max(1, int(steps * spec.strength))
        done = 0

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal done, total
            done += 1
            # The scheduler decides how many steps strength leaves (PNDM runs one more than steps * strength).
            total = max(total, int(getattr(pipe, "num_timesteps", 0) or 0), done)
            if on_step is not None:
                on_step(done, total)
            return kwargs

        subject = str(settings.get("subject") or "a person")
        result = img2img(
            prompt=spec.prompt.replace("{subject}", subject), negative_prompt=spec.negative_prompt or None,
            image=work, strength=spec.strength, num_inference_steps=steps, guidance_scale=spec.guidance,
            generator=torch.Generator("cpu").manual_seed(seed), ip_adapter_image_embeds=[ip_embeds],
            callback_on_step_end=step_end, output_type="pil",
        ).images[0]
        log.info("diffusion cartoon at %dx%d, %d steps, strength %.2f", work.width, work.height, steps,
                 spec.strength)
        return np.asarray(result.convert("RGB").resize((width, height), Image.LANCZOS))

    def close(self) -> None:
        """Drops ArcFace; the base stays resident for the portrait feature (the worker frees it)."""
        self._portrait = self._arcface = None

    def _load(self) -> tuple[Any, Any]:
        if self._portrait is None or self._arcface is None:
            from facechain_core.identity import open_arcface
            from facechain_core.portrait import PortraitPipeline

            portrait = PortraitPipeline()
            portrait.load(self._context)
            self._arcface = open_arcface(self._context)
            self._portrait = portrait
        return self._portrait, self._arcface

