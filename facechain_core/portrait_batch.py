"""Which portrait jobs may share a denoising pass (``facechain_core.shared_pass`` runs the pass).

Jobs share a pass when what applies to the whole batch is the same (``batch_plan``'s key): the base
family, sampler (scheduler, steps, guidance), picture size, the LoRA set and weights, and the
IP-Adapter scale (identity weight); a pose or a Vary asks for its own pass. Prompts, identities and seeds
are per sample.

``batch_plan`` runs in the service process: it imports no torch.
"""
from __future__ import annotations

from typing import Any

from facechain_core.studio import identity_weight

DEFAULT_OVERSAMPLE = 2


def batch_plan(params: dict[str, Any], settings: dict[str, Any]) -> tuple[str, int] | None:
    """(key, samples) of a portrait job: jobs with equal keys may share a pass; None: it runs alone.

    `settings` are the portrait pipeline's (``sampler_override``, ``oversample``, ``default_family``).
    """
    style = params.get("style")
    if not isinstance(style, dict) or "sampler" not in style:
        return None
    controls = params.get("controls") or {}
    if controls.get("pose") or controls.get("vary") is not None or params.get("low_memory"):
        return None  # a ControlNet image, Vary's own starting noise, the worker's low-memory retry: alone
    sampler = {**style["sampler"], **(settings.get("sampler_override") or {})}
    try:
        weight = identity_weight(float(style.get("identity_weight", 1.0)), controls.get("likeness"))
        count = int(params.get("count", 1))
    except (TypeError, ValueError):
        return None  # the pipeline will tell the user; nothing to share
    lora = style.get("lora") or None
    key = repr((
        style.get("family") or settings.get("default_family", "sd15"), style.get("base"),
        bool(params.get("fast")) and style.get("fast") is not False,
        sampler.get("scheduler"), sampler.get("steps"), sampler.get("guidance_scale", 7.0),
        sampler.get("width"), sampler.get("height"), controls.get("aspect"), weight,
        (style.get("id"), params.get("style_lora"), lora and lora.get("weight", 1.0)) if lora else None,
        user_lora_key(params),
    ))
    return key, count * max(1, int(settings.get("oversample", DEFAULT_OVERSAMPLE)))


def user_lora_key(params: dict[str, Any]) -> tuple[Any, Any] | None:
    """The user's LoRA (file and scale) a job activates for the whole pass, or None."""
    return (params.get("user_lora"), params.get("user_lora_scale", 1.0)) if params.get("user_lora") else None
