"""Which try-on and template jobs may share a denoising pass (``facechain_core.shared_pass`` runs the pass).

Both kinds run on the try-on's resident inpainting base with its openpose and depth ControlNets. The sampler,
the ControlNet weights and the working side are the operator's settings, the same for every job of a kind;
what differs per job and applies to the whole batch is the working size (from the picture's pixel size,
which the handler stores as ``params["picture_size"]``), fast mode, a template's likeness (the identity
weight) and the user's LoRA. Per sample the pass takes the job's picture, mask and control pictures, its
ControlNet weights (a template whose pose is not found holds its openpose ControlNet at 0), its prompt,
identity and seed. A template's Vary (its own starting noise) and the worker's low-memory retry run alone,
and so does a job queued without ``picture_size``; the worker checks again what the plan cannot know (the
pass key of each prepared job) and runs jobs that do not fit together in passes of their own.

The plans run in the service process: this module imports no torch.
"""
from __future__ import annotations

from typing import Any

from facechain_core.portrait_batch import DEFAULT_OVERSAMPLE, user_lora_key

DEFAULT_SIDE = 512  # the working picture's longer side (the tryon and template tables' ``side``)
SIZE_MULTIPLE = 64  # latents of the real VAE (8x) must divide by the UNet's 8x downsampling


def working_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) of a width x height picture scaled so its longer side is `side`, both multiples of 64 (>= 64)."""
    if side < SIZE_MULTIPLE:
        raise ValueError(f"side must be at least {SIZE_MULTIPLE}, got {side}")
    ratio = side / max(width, height)
    w, h = (max(SIZE_MULTIPLE, int(round(v * ratio / SIZE_MULTIPLE)) * SIZE_MULTIPLE) for v in (width, height))
    return w, h


def tryon_batch_plan(params: dict[str, Any], settings: dict[str, Any]) -> tuple[str, int] | None:
    """(key, samples) of a try-on job: jobs with equal keys may share a pass; None: it runs alone."""
    return _plan(params, settings, "tryon", None)


def template_batch_plan(params: dict[str, Any], settings: dict[str, Any]) -> tuple[str, int] | None:
    """(key, samples) of a template job: jobs with equal keys may share a pass; None: it runs alone."""
    controls = params.get("controls") or {}
    if controls.get("vary") is not None:
        return None
    return _plan(params, settings, "template", controls.get("likeness") or "normal")


def _plan(params: dict[str, Any], settings: dict[str, Any], table: str, likeness: str | None
          ) -> tuple[str, int] | None:
    if params.get("low_memory"):
        return None
    try:
        width, height = (int(v) for v in params["picture_size"])
        size = working_size(width, height, int((settings.get(table) or {}).get("side", DEFAULT_SIDE)))
        count = int(params.get("count", 1))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # an older job, or one the pipeline will refuse: nothing to share
    key = repr((size, bool(params.get("fast")), likeness, user_lora_key(params)))
    return key, count * max(1, int(settings.get("oversample", DEFAULT_OVERSAMPLE)))
