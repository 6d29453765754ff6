"""The job kinds table: for each kind its pipeline, priority class, tries and timeout.

Pipelines are named by import path and imported lazily inside the worker process, so the
bot process never loads torch. Priority: a lower class runs first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from bot.config import KindOverride

INTERACTIVE = 0  # quick jobs a user waits for in the chat (identity, cartoon)
GENERATE = 1  # generation jobs (portraits, try-on, talking head)
LONG = 2  # long jobs that yield at checkpoints (LoRA training)


@dataclass(frozen=True)
class JobKind:
    name: str
    pipeline: str  # "module:Class" implementing facechain_core.pipeline.Pipeline
    priority: int
    max_tries: int
    timeout_s: float
    # A long job yields at checkpoints: the worker may run short jobs inside it.
    preemptible: bool = False
    # Jobs of this kind may share a pass: the plan function's "module:function" (bot.engine.batching).
    batch: str | None = None
    # (manifest model, feature) pairs a worker must have for this kind; a Ray node without them never gets it.
    needs: tuple[tuple[str, str], ...] = ()


BUILTIN_KINDS: tuple[JobKind, ...] = (
    JobKind("identity", "facechain_core.identity:IdentityPipeline", INTERACTIVE, 3, 300,
            needs=(("arcface", "portrait"),)),
    JobKind("cartoon", "facechain_core.cartoon:CartoonPipeline", INTERACTIVE, 2, 300),
    # /voice's ▶: a few seconds of speech, through the talk pipeline (its voices stay loaded once).
    JobKind("voice_sample", "facechain_core.talk:TalkPipeline", INTERACTIVE, 2, 120),
    JobKind("portrait", "facechain_core.portrait:PortraitPipeline", GENERATE, 2, 900,
            batch="facechain_core.portrait_batch:batch_plan",
            needs=(("sd15", "portrait"), ("ip-adapter-faceid-sd15", "portrait"), ("arcface", "portrait"))),
    JobKind("talk", "facechain_core.talk:TalkPipeline", GENERATE, 2, 600, needs=(("wav2lip-gan-onnx", "talk"),)),
    JobKind("tryon", "facechain_core.tryon:TryOnPipeline", GENERATE, 2, 900,
            batch="facechain_core.inpaint_batch:tryon_batch_plan",
            needs=(("sd15-inpainting", "tryon"), ("segformer-clothes", "tryon"))),
    JobKind("template", "facechain_core.template:TemplatePipeline", GENERATE, 2, 900,
            batch="facechain_core.inpaint_batch:template_batch_plan",
            needs=(("sd15-inpainting", "template"),)),
    # Enhance / Upscale under a result: face restoration, then x2 or x4 super-resolution.
    JobKind("enhance", "facechain_core.enhance:EnhancePipeline", GENERATE, 2, 600,
            needs=(("real-esrgan-x2-onnx", "enhance"), ("real-esrgan-x4-onnx", "enhance"), ("yunet", "enhance"))),
    JobKind("duo", "facechain_core.duo:DuoPipeline", GENERATE, 2, 900,
            needs=(("sd15", "portrait"), ("ip-adapter-faceid-sd15", "portrait"), ("arcface", "portrait"),
                   ("controlnet-openpose-sd15", "duo"))),
    JobKind("duo_template", "facechain_core.duo_template:DuoTemplatePipeline", GENERATE, 2, 900,
            needs=(("sd15-inpainting", "template"),)),
    JobKind("train", "facechain_core.train_lora:TrainLoraPipeline", LONG, 3, 4 * 3600, preemptible=True,
            needs=(("sd15", "train"),)),
    JobKind("train_sdxl", "facechain_core.train_lora_sdxl:SdxlTrainLoraPipeline", LONG, 3, 6 * 3600, preemptible=True,
            needs=(("sdxl", "train-sdxl"),)),
    # /makestyle: checks the example set, trains a style LoRA (yields at checkpoints), renders previews.
    JobKind("style_train", "facechain_core.style_maker:StyleLoraPipeline", LONG, 3, 6 * 3600, preemptible=True,
            needs=(("sd15", "train"), ("arcface", "portrait"), ("yunet", "portrait"))),
)


class JobKinds:
    """Kinds by name, with the operator's overrides applied."""

    def __init__(self, kinds: tuple[JobKind, ...] = BUILTIN_KINDS, overrides: dict[str, KindOverride] | None = None):
        self._kinds: dict[str, JobKind] = {}
        for kind in kinds:
            self.register(kind)
        for name, override in (overrides or {}).items():
            if name not in self._kinds:
                raise KeyError(f"scheduler.kinds.{name}: unknown job kind")
            changes = {k: v for k, v in override.model_dump().items() if v is not None}
            self._kinds[name] = replace(self._kinds[name], **changes)

    def register(self, kind: JobKind) -> None:
        self._kinds[kind.name] = kind

    def __getitem__(self, name: str) -> JobKind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def needs(self) -> dict[str, list[list[str]]]:
        """Each kind's required (model, feature) pairs, as a worker host checks them."""
        return {name: [list(pair) for pair in kind.needs] for name, kind in self._kinds.items()}
