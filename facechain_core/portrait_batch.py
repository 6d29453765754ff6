"""Several portrait jobs in one denoising pass: the UNet runs once per step for every job's candidates.

Jobs share a pass when what applies to the whole batch is the same (``batch_plan``'s key): the base
family, sampler (scheduler, steps, guidance), picture size, the LoRA set and weights, and the
IP-Adapter scale (identity weight); a pose or a Vary asks for its own pass. Per sample the pass takes its
prompt and negative prompt, its FaceID embedding (and FaceID Plus face crop) and its own seeded
generator, so each job gets the pictures it would get alone at the same seeds (up to float rounding).

Per job: progress goes to its own callback; a job whose callback raises (cancelled) is dropped at that
step: it ends at once, its rows finish the pass (diffusers' multistep schedulers keep per-row history)
and are thrown away; when every job is dropped the pass stops. Ranking, safety and files stay per job,
and one job's failure (no face, nothing safe, a missing identity) never fails the others.

``batch_plan`` runs in the service process: it imports no torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from facechain_core.errors import JobCancelled
from facechain_core.studio import identity_weight

if TYPE_CHECKING:
    import numpy as np

    from facechain_core.pipeline import JobResult, Progress
    from facechain_core.portrait import PortraitPipeline, PreparedPortrait

log = logging.getLogger(__name__)

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
        (params.get("user_lora"), params.get("user_lora_scale", 1.0)) if params.get("user_lora") else None,
    ))
    return key, count * max(1, int(settings.get("oversample", DEFAULT_OVERSAMPLE)))


def pass_key(job: PreparedPortrait) -> tuple[Any, ...] | None:
    """What a prepared job's pass applies to the whole batch (None: it runs alone)."""
    if job.plan.pose_image is not None or job.plan.vary_seed is not None:
        return None
    sampler = job.style["sampler"]
    return (job.base.family, job.base.name, job.fast.id if job.fast is not None else None, sampler.get("scheduler"),
            int(sampler["steps"]), float(sampler.get("guidance_scale", 7.0)), sampler.get("eta"),
            job.plan.width, job.plan.height, job.plan.identity_weight,
            tuple((r.slot, r.key, r.weight) for r in job.loras))


@dataclass
class _Member:
    """One job of a pass: its prepared state, progress and how it ended."""

    job: PreparedPortrait
    progress: Progress
    total: int
    outcome: JobResult | BaseException | None = None
    images: list[np.ndarray] = field(default_factory=list)


class _AllDropped(Exception):
    """Every job of the pass was dropped: stop denoising."""


def run_portrait_batch(pipeline: PortraitPipeline, jobs: list[tuple[dict[str, Any], Progress]]
                       ) -> list[JobResult | BaseException]:
    """Run the jobs, compatible ones in one pass each; one outcome per job (a result or its exception)."""
    outcomes: list[JobResult | BaseException | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    prepared: dict[int, PreparedPortrait] = {}
    # 1. Prepare each job alone: a bad job (no identity, missing LoRA) fails by itself.
    for index, (params, _) in enumerate(jobs):
        try:
            prepared[index] = job = pipeline.prepare(params)
        except Exception as exc:
            outcomes[index] = exc
            continue
        key = pass_key(job)
        groups.setdefault(key if key is not None else ("alone", index), []).append(index)
    # 2. One pass per group (the scheduler sends one group; a mismatch still comes out right).
    for indexes in groups.values():
        if len(indexes) == 1:
            index = indexes[0]
            try:
                outcomes[index] = pipeline.run(jobs[index][0], jobs[index][1])
            except Exception as exc:
                outcomes[index] = exc
            continue
        members = [_Member(prepared[i], jobs[i][1], int(prepared[i].style["sampler"]["steps"]) + 1) for i in indexes]
        _denoise_together(pipeline, members)
        # 3. Rank, screen and write per job.
        for index, member in zip(indexes, members, strict=True):
            if member.outcome is None:
                try:
                    member.outcome = pipeline.finish(member.job, member.images, member.progress, member.total)
                except Exception as exc:
                    member.outcome = exc
            outcomes[index] = member.outcome
    return [o if o is not None else RuntimeError("job not run") for o in outcomes]


def _denoise_together(pipeline: PortraitPipeline, members: list[_Member]) -> None:
    """One pass of the base over every member's candidates; fills each member's images (or its outcome)."""
    import torch

    from facechain_core.lora_fuse import fused_loras
    from facechain_core.portrait import _to_uint8, eta_of

    first = members[0].job
    base, pipe = first.base, first.base.pipe
    first.set_up()
    guidance = float(first.style["sampler"].get("guidance_scale", 7.0))
    cfg = guidance > 1.0
    prompts: list[str] = []
    negatives: list[str] = []
    embeddings: list[torch.Tensor] = []
    generators: list[torch.Generator] = []
    for member in members:
        job = member.job
        n = len(job.seeds)
        prompts += [job.prompt] * n
        negatives += [job.style.get("negative_prompt") or ""] * n  # "" is what None means to diffusers
        embedding = torch.from_numpy(job.identity.embedding).reshape(1, 1, -1).to(pipe.device, pipe.unet.dtype)
        embeddings += [embedding] * n
        generators += [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
    positive = torch.cat(embeddings)
    ip_embeds = torch.cat([torch.zeros_like(positive), positive]) if cfg else positive
    if base.plus:
        _set_batch_clip_embeds(pipeline, members, cfg)
    live = list(members)

    def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        for member in list(live):
            try:
                member.progress(step + 1, member.total)
            except JobCancelled as exc:
                log.info("a job of a batched pass was cancelled at step %d: its samples are dropped", step + 1)
                member.outcome = exc
                live.remove(member)
        if not live:
            raise _AllDropped
        return kwargs

    # diffusers repeats the FaceID embeddings it is given for every prompt of the batch (one identity per call):
    # it gets a placeholder of the right shape, and each UNet call gets each sample's own embedding instead.
    placeholder = torch.zeros_like(embeddings[0])
    hook = pipe.unet.register_forward_pre_hook(_per_sample_embeds(ip_embeds), with_kwargs=True)
    sampler = first.style["sampler"]
    try:
        with fused_loras(pipe.unet, pipeline.fusing(base)):
            result = pipe(
                prompt=prompts, negative_prompt=negatives, num_inference_steps=int(sampler["steps"]),
                width=first.plan.width, height=first.plan.height, guidance_scale=guidance, num_images_per_prompt=1,
                generator=generators, ip_adapter_image_embeds=[torch.cat([placeholder, placeholder]) if cfg
                                                               else placeholder],
                callback_on_step_end=on_step_end, output_type="np", **eta_of(sampler),
            )
    except _AllDropped:
        return
    finally:
        hook.remove()
    images = _to_uint8(result.images)
    start = 0
    for member in members:
        n = len(member.job.seeds)
        member.images = images[start:start + n]
        start += n


def _per_sample_embeds(ip_embeds: Any) -> Any:
    """A UNet forward pre-hook that hands the IP-Adapter each sample's FaceID embedding (negatives first)."""
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        added = kwargs.get("added_cond_kwargs")
        if added and "image_embeds" in added:
            expected = added["image_embeds"][0].shape
            if expected != ip_embeds.shape:
                raise RuntimeError(f"batched FaceID embeddings {tuple(ip_embeds.shape)} do not fit {tuple(expected)}")
            kwargs = {**kwargs, "added_cond_kwargs": {**added, "image_embeds": [ip_embeds]}}
        return args, kwargs
    return hook


def _set_batch_clip_embeds(pipeline: PortraitPipeline, members: list[_Member], cfg: bool) -> None:
    """FaceID Plus: each sample's CLIP hidden states of its own identity's face crop (negatives first)."""
    import torch
    from PIL import Image

    pipe = members[0].job.base.pipe
    negatives, positives = [], []
    for member in members:
        crop = Image.fromarray(member.job.identity.crop)
        clip = pipe.prepare_ip_adapter_image_embeds([crop], None, pipe.device, len(member.job.seeds), cfg)[0]
        if cfg:
            negative, clip = clip.chunk(2)
            negatives.append(negative)
        positives.append(clip)
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    layer.clip_embeds = torch.cat(negatives + positives).to(dtype=pipe.unet.dtype)
    layer.shortcut = bool(pipeline._settings["plus_shortcut"])
