"""Several jobs in one denoising pass: the UNet (and ControlNets) run once per step for every job's samples.

A pipeline that batches (portraits, try-on, templates) splits a job into ``prepare(params)`` (everything up to
the denoising: a ``PassJob``), its own ``run_prepared(job, progress)`` and ``finish(job, images, progress,
total)`` (rank, screen, write). Jobs share a pass when their ``pass_key()`` (what applies to the whole batch:
base, sampler, size, LoRAs, identity scale) is equal. Per sample the pass takes the job's ``sample_input()``
(prompt and negative prompt; for inpainting its picture, mask and control pictures), its ControlNet weights
(``control_scales``, through a pre-hook on each ControlNet), its FaceID embedding (and FaceID Plus face crop)
and its own seeded generator, so each job gets the pictures it would get alone at the same seeds (up to float
rounding).

Per job: progress goes to its own callback; a job whose callback raises (cancelled) is dropped at that
step: it ends at once, its rows finish the pass (diffusers' multistep schedulers keep per-row history)
and are thrown away; when every job is dropped the pass stops. Ranking, safety and files stay per job,
and one job's failure (no face, nothing safe, a missing identity) never fails the others.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from facechain_core.errors import JobCancelled
from facechain_core.identity import Identity
from facechain_core.lora_fuse import fused_loras
from facechain_core.pipeline import JobResult, Progress
from facechain_core.portrait import ResidentBase, _to_uint8, batched_inputs

log = logging.getLogger(__name__)


class PassJob(Protocol):
    """A job resolved up to its denoising (``facechain_core.portrait.PreparedPortrait`` and its kin)."""

    base: ResidentBase
    identity: Identity
    seeds: list[int]

    @property
    def guidance(self) -> float: ...

    @property
    def control_scales(self) -> tuple[float, ...]: ...

    def set_up(self) -> None: ...

    def pass_key(self) -> tuple[Any, ...] | None: ...

    def pass_call(self) -> dict[str, Any]: ...

    def sample_input(self) -> dict[str, Any]: ...


class BatchingPipeline(Protocol):
    """What ``run_shared_passes`` needs of a pipeline."""

    _settings: dict[str, Any]

    def prepare(self, params: dict[str, Any]) -> Any: ...

    def run_prepared(self, job: Any, progress: Progress) -> JobResult: ...

    def finish(self, job: Any, images: list[np.ndarray], progress: Progress, total: int) -> JobResult: ...

    def fusing(self, base: ResidentBase) -> bool: ...


@dataclass
class _Member:
    """One job of a pass: its prepared state, progress and how it ended."""

    job: PassJob
    progress: Progress
    total: int
    outcome: JobResult | BaseException | None = None
    images: list[np.ndarray] = field(default_factory=list)


class _AllDropped(Exception):
    """Every job of the pass was dropped: stop denoising."""


def run_shared_passes(pipeline: BatchingPipeline, jobs: list[tuple[dict[str, Any], Progress]]
                      ) -> list[JobResult | BaseException]:
    """Run the jobs, compatible ones in one pass each; one outcome per job (a result or its exception)."""
    outcomes: list[JobResult | BaseException | None] = [None] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    prepared: dict[int, PassJob] = {}
    # 1. Prepare each job alone: a bad job (no identity, missing LoRA, no garment) fails by itself.
    for index, (params, _) in enumerate(jobs):
        try:
            prepared[index] = job = pipeline.prepare(params)
        except Exception as exc:
            outcomes[index] = exc
            continue
        key = job.pass_key()
        groups.setdefault(key if key is not None else ("alone", index), []).append(index)
    # 2. One pass per group (the scheduler sends one group; a mismatch still comes out right).
    for indexes in groups.values():
        if len(indexes) == 1:
            index = indexes[0]
            try:
                outcomes[index] = pipeline.run_prepared(prepared[index], jobs[index][1])
            except Exception as exc:
                outcomes[index] = exc
            continue
        members = [_Member(prepared[i], jobs[i][1], int(prepared[i].pass_call()["num_inference_steps"]) + 1)
                   for i in indexes]
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


def _denoise_together(pipeline: BatchingPipeline, members: list[_Member]) -> None:
    """One pass of the base over every member's samples; fills each member's images (or its outcome)."""
    first = members[0].job
    base, pipe = first.base, first.base.pipe
    first.set_up()
    cfg = first.guidance > 1.0
    samples: list[dict[str, Any]] = []
    embeddings: list[torch.Tensor] = []
    generators: list[torch.Generator] = []
    for member in members:
        job = member.job
        samples += [job.sample_input()] * len(job.seeds)
        embedding = torch.from_numpy(job.identity.embedding).reshape(1, 1, -1).to(pipe.device, pipe.unet.dtype)
        embeddings += [embedding] * len(job.seeds)
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
    hooks = [pipe.unet.register_forward_pre_hook(_per_sample_embeds(ip_embeds), with_kwargs=True)]
    call = first.pass_call()
    if first.control_scales:  # each ControlNet weighs each sample by its own job's weight (diffusers: one per call)
        call["controlnet_conditioning_scale"] = [1.0] * len(first.control_scales)
        for net_index, net in enumerate(pipe.controlnet.nets):
            weights = torch.tensor([m.job.control_scales[net_index] for m in members for _ in m.job.seeds])
            weights = (torch.cat([weights, weights]) if cfg else weights).to(pipe.device, net.dtype)
            hooks.append(net.register_forward_pre_hook(_per_sample_scale(weights.view(-1, 1, 1, 1)),
                                                       with_kwargs=True))
    try:
        with fused_loras(pipe.unet, pipeline.fusing(base)):
            result = pipe(
                **call, **batched_inputs(samples), guidance_scale=first.guidance,
                num_images_per_prompt=1, generator=generators,
                ip_adapter_image_embeds=[torch.cat([placeholder, placeholder]) if cfg else placeholder],
                callback_on_step_end=on_step_end, output_type="np",
            )
    except _AllDropped:
        return
    finally:
        for hook in hooks:
            hook.remove()
    images = _to_uint8(result.images)
    start = 0
    for member in members:
        n = len(member.job.seeds)
        member.images = images[start:start + n]
        start += n


def _per_sample_embeds(ip_embeds: torch.Tensor) -> Any:
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


def _per_sample_scale(weights: torch.Tensor) -> Any:
    """A ControlNet forward pre-hook that scales each sample's residuals by its own weight (negatives first)."""
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = kwargs["sample"].shape[0]
        if rows != weights.shape[0]:
            raise RuntimeError(f"batched ControlNet weights for {weights.shape[0]} rows do not fit {rows}")
        return args, {**kwargs, "conditioning_scale": kwargs["conditioning_scale"] * weights}
    return hook


def _set_batch_clip_embeds(pipeline: BatchingPipeline, members: list[_Member], cfg: bool) -> None:
    """FaceID Plus: each sample's CLIP hidden states of its own identity's face crop (negatives first)."""
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
