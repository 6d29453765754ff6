"""The portrait controls users set: aspect ratio, likeness, and the "Vary" noise around a seed.

* Aspect ratio (``square``, ``2:3``, ``9:16``, ``3:2``): the style's pixel area kept, the sides rounded to the
  multiple the loaded base's UNet accepts (``size_multiple``: 64 for SD1.5, 32 for SDXL).
* Likeness (``low``, ``normal``, ``high``): a factor on the style's identity weight (the IP-Adapter scale).
* Vary: the starting noise of the seed, mixed with a little noise of another seed, so the picture stays
  close to the one the seed made (``variation_noise``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ASPECTS: dict[str, tuple[int, int]] = {"square": (1, 1), "2:3": (2, 3), "9:16": (9, 16), "3:2": (3, 2)}
LIKENESS: dict[str, float] = {"low": 0.7, "normal": 1.0, "high": 1.3}
MAX_IDENTITY_WEIGHT = 1.5  # the styles' own upper bound (facechain_core.styles.Style.identity_weight)
VARY_STRENGTH = 0.25
PIPELINE_MULTIPLE = 8  # share of fresh noise in a "Vary" picture's starting noise


def size_multiple(pipe: Any) -> int:
    """The side multiple a pipeline's UNet accepts: the VAE's factor times the UNet's downsamplings (and at
    least the 8 diffusers' pipelines check for)."""
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    downs = len(pipe.unet.config.block_out_channels) - 1
    return max(PIPELINE_MULTIPLE, vae_factor * 2 ** downs)


def aspect_size(width: int, height: int, aspect: str | None, multiple: int) -> tuple[int, int]:
    """(w, h) of about the area width x height in `aspect` (None: the given size), both multiples of `multiple`."""
    if aspect is None:
        w, h = width, height
    else:
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {sorted(ASPECTS)}, got {aspect!r}")
        rw, rh = ASPECTS[aspect]
        unit = math.sqrt(width * height / (rw * rh))
        w, h = rw * unit, rh * unit
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def identity_weight(style_weight: float, likeness: str | None) -> float:
    """The IP-Adapter scale for a style's identity weight at a likeness (None: "normal")."""
    key = likeness or "normal"
    if key not in LIKENESS:
        raise ValueError(f"likeness must be one of {sorted(LIKENESS)}, got {likeness!r}")
    return round(min(MAX_IDENTITY_WEIGHT, style_weight * LIKENESS[key]), 4)


def variation_noise(seed: int, variations: list[int], shape: tuple[int, ...], strength: float = VARY_STRENGTH
                    ) -> torch.Tensor:
    """Starting latents (len(variations), *shape): the seed's noise with `strength` of each variation seed's
    noise mixed in, variance kept at 1."""
    import torch  # imported here: the service process reads this module's tables without loading torch

    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within 0..1, got {strength}")
    base = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
    out = []
    for other in variations:
        fresh = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(other)))
        out.append(math.sqrt(1.0 - strength) * base + math.sqrt(strength) * fresh)
    return torch.stack(out)
