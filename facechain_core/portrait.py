"""Train-free portraits: IP-Adapter FaceID conditions Stable Diffusion on the user's ArcFace identity.

The base model (SD1.5, or SDXL for styles of that family) stays resident in the worker's
``ResidentPipelines``; a job only swaps the identity embedding and the LoRA adapters. LoRAs live in
two slots, "user" and "style": a new file's weights are copied into its slot's adapter in place (a
fresh adapter replaces it only when rank, scaling or targets differ), so memory stays at one adapter
per slot and switching users never reloads the base. Each job generates ``count * oversample``
candidates, drops those without exactly one face, ranks the rest by ArcFace similarity to the
identity and keeps the best ``count`` that safe mode lets out (``facechain_core.safety``); the PNGs
carry the AI-generated label.

Settings (``PipelineContext.settings``; paths absolute or relative to ``models_dir``):
``sd15_path`` (diffusers folder), ``ip_adapter_path`` (IP-Adapter FaceID file for SD1.5),
``sdxl_path`` and ``sdxl_ip_adapter_path`` (optional SDXL family), ``image_encoder_path`` (CLIP vision
folder, FaceID Plus only), ``arcface_path``, ``detector_path``, ``detector_kind`` ("yunet"),
``face_filter`` (True), ``oversample`` (2), ``batch_size`` (4), ``subject`` ("a person"; a job's
``params["subject"]`` wins), ``default_family`` ("sd15"), ``plus_shortcut`` (True: Plus v2), ``sampler_override`` (a dict over
every style's sampler: steps, width, height, guidance_scale, scheduler), ``fuse_loras`` ("auto": merge the
active LoRAs into the UNet for each batch on CUDA, see ``facechain_core.lora_fuse``), ``fast_accelerator``
(an ``accelerators.toml`` id; default its ``default``). A job with ``params["fast"]`` true runs the accelerator's
LoRA in a third slot ("fast") with its scheduler, steps and guidance, unless the style says ``fast = false``
(``facechain_core.accelerators``). ``auto_restore`` ("off"; "on"; "auto": on a GPU) restores the faces of every
kept portrait (``facechain_core.enhance``); ``identity_adapter`` ("auto": FaceID Plus v2 when installed).
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facechain_core import safety
from facechain_core.accelerators import FAST_SLOT, Accelerator, accelerators
from facechain_core.enhance import open_restorer, restore_faces, wants_auto_restore
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.identity import ARCFACE_SIZE, ArcFace, Identity, align_face, build_identity, landmarks_of, \
    load_identity, open_arcface, pull_command, save_identity
from facechain_core.lora_fuse import fused_loras, wants_fusing
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.ranking import Ranked, filter_and_rank
from facechain_core.resident import SHARED_KEY, ResidentPipelines, modules_of
from facechain_core.styles import LORA_MODEL_PREFIX
from facechain_core.studio import aspect_size, identity_weight, size_multiple, variation_noise

log = logging.getLogger(__name__)

MAX_COUNT = 16
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# family -> (setting of the base folder, setting of its IP-Adapter FaceID file)
FAMILIES = {"sd15": ("sd15_path", "ip_adapter_path"), "sdxl": ("sdxl_path", "sdxl_ip_adapter_path")}
# setting -> model name in the manifest, for the operator's pull command
MODEL_NAMES = {
    "sd15_path": "sd15", "ip_adapter_path": "ip-adapter-faceid-sd15", "sdxl_path": "sdxl",
    "sdxl_ip_adapter_path": "ip-adapter-faceid-sdxl", "image_encoder_path": "ip-adapter-image-encoder",
    "arcface_path": "arcface", "detector_path": "yunet",
}
# identity_adapter -> the SD1.5 IP-Adapter's manifest name; "auto" takes FaceID Plus v2 when it and its CLIP image
# encoder are installed (better likeness), else plain FaceID. An explicit ip_adapter_path wins over both.
IDENTITY_ADAPTERS = {"plusv2": "ip-adapter-faceid-plusv2-sd15", "faceid": "ip-adapter-faceid-sd15"}
DEFAULTS: dict[str, Any] = {
    "face_filter": True, "oversample": 2, "batch_size": 4, "subject": "a person",
    "default_family": "sd15", "plus_shortcut": True, "detector_kind": "yunet", "fuse_loras": "auto",
    "pose_scale": 1.0, "auto_restore": "off", "identity_adapter": "auto",
}
# Pose for /style: the family's openpose ControlNet (manifest name, feature); DWPose reads a photo's pose.
POSE_CONTROLNETS = {"sd15": ("controlnet-openpose-sd15", "pose"), "sdxl": ("controlnet-openpose-sdxl", "pose-sdxl")}
POSE_MODEL, POSE_FEATURE = "dwpose-wholebody", "pose"
RESIDENT_PREFIX = "portrait"
STYLE_BASE_FEATURE = "styles"  # the manifest feature of the community bases a style may name
MISSING_BASE_RECHECK_S = 60.0  # a style base found missing is looked for again after this (a pull needs no restart)
DEFAULT_POSES_DIR = Path(__file__).resolve().parent.parent / "poses"


@dataclass
class ResidentBase:
    """One resident base pipeline with its IP-Adapter and the LoRA adapters currently loaded."""

    pipe: Any  # StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str
    plus: bool
    name: str | None = None  # the style base's manifest name; None: the family's default base
    slots: dict[str, str] = field(default_factory=dict)  # adapter slot ("user", "style", "fast") -> LoRA key
    slot_params: dict[str, dict[str, torch.nn.Parameter]] = field(default_factory=dict)  # per slot, peft key -> tensor
    # Adapters and weights last activated: () when LoRA is off, None when unknown.
    active: tuple[tuple[str, float], ...] | None = None
    schedulers: dict[str, Any] = field(default_factory=dict)

    def resident_modules(self) -> list[torch.nn.Module]:
        return modules_of(self.pipe)

    def use_scheduler(self, name: str | None, spec: tuple[str, dict[str, Any]] | None = None) -> None:
        """Switch to scheduler `name` (a styles.SCHEDULERS key, or any key with its `spec`: class name and
        overrides, as an accelerator's; None: the base's own) on the base's schedule."""
        key = name or ""
        if key not in self.schedulers:
            import diffusers

            from facechain_core.styles import SCHEDULERS

            if spec is None and key not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {name!r}, expected one of {sorted(SCHEDULERS)}")
            class_name, extra = spec or SCHEDULERS[key]
            config = self.schedulers[""].config
            self.schedulers[key] = getattr(diffusers, class_name).from_config(config, **extra)
        self.pipe.scheduler = self.schedulers[key]


@dataclass
class StudioPlan:
    """What a job's controls ask of the generation (facechain_core.studio)."""

    width: int
    height: int
    identity_weight: float
    aspect: str | None = None
    likeness: str | None = None
    pose_id: str | None = None
    pose_image: Image.Image | None = None  # the openpose ControlNet's picture at width x height
    vary_seed: int | None = None

    def latents_for(self, base: ResidentBase) -> Callable[[list[int]], torch.Tensor] | None:
        """Vary: each seed of a chunk picks the small change mixed into the varied seed's noise."""
        return vary_latents(base.pipe, self.vary_seed, self.width, self.height)

    def meta(self, base: ResidentBase) -> dict[str, Any]:
        """The controls as they reached the model: the size, the identity scale the adapter holds, the pose."""
        return {"size": [self.width, self.height], "identity_weight": adapter_scale(base.pipe),
                "aspect": self.aspect or "style", "likeness": self.likeness or "normal", "pose": self.pose_id,
                "vary_of": self.vary_seed}


def vary_latents(pipe: Any, vary_seed: int | None, width: int, height: int
                 ) -> Callable[[list[int]], torch.Tensor] | None:
    """Vary's starting noise for a pipeline at width x height (None: no Vary): each seed of a chunk picks the
    small change mixed into the varied seed's noise. The noise has the VAE's latent channels (an inpainting
    UNet takes more inputs than that)."""
    if vary_seed is None:
        return None
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (int(pipe.vae.config.latent_channels), height // factor, width // factor)
    return lambda chunk: variation_noise(int(vary_seed), chunk, shape).to(pipe.device, pipe.unet.dtype)


def adapter_scale(pipe: Any) -> float | None:
    """The IP-Adapter scale its attention processors hold now (what set_ip_adapter_scale reached)."""
    for processor in pipe.unet.attn_processors.values():
        scale = getattr(processor, "scale", None)
        if isinstance(scale, list) and scale:
            return round(float(scale[0]), 4)
    return None


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA file to activate at a weight in an adapter slot; `key` changes when the file does."""

    slot: str
    path: Path
    weight: float

    @property
    def key(self) -> str:
        stat = self.path.stat()
        return f"{self.path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"


@dataclass
class PreparedPortrait:
    """One job resolved up to its denoising: what ``PortraitPipeline.finish`` and a batched pass need."""

    pipeline: PortraitPipeline
    params: dict[str, Any]
    style: dict[str, Any]  # with the operator's sampler override (and fast mode's sampler) applied
    count: int
    seeds: list[int]  # one candidate per seed
    base: ResidentBase
    plan: StudioPlan
    identity: Identity
    loras: list[LoraRequest]
    prompt: str
    fast: Accelerator | None = None

    def set_up(self) -> None:
        """Put the resident base in this job's state: its LoRAs, identity scale and scheduler."""
        self.pipeline.activate_loras(self.base, self.loras)
        self.base.pipe.set_ip_adapter_scale(self.plan.identity_weight)
        use_sampler(self.base, self.fast, self.style["sampler"].get("scheduler"))

    @property
    def guidance(self) -> float:
        return float(self.style["sampler"].get("guidance_scale", 7.0))

    def pass_key(self) -> tuple[Any, ...] | None:
        """What this job's pass applies to the whole batch: jobs with equal keys may share one (None: alone)."""
        if self.plan.pose_image is not None or self.plan.vary_seed is not None:
            return None
        sampler = self.style["sampler"]
        return (self.base.family, self.base.name, self.fast.id if self.fast is not None else None,
                sampler.get("scheduler"), int(sampler["steps"]), self.guidance, sampler.get("eta"),
                self.plan.width, self.plan.height, self.plan.identity_weight,
                tuple((r.slot, r.key, r.weight) for r in self.loras))

    @property
    def control_scales(self) -> tuple[float, ...]:
        """Each ControlNet's weight for this job's samples (none: a shared pass of portraits has no ControlNet)."""
        return ()

    def pass_call(self) -> dict[str, Any]:
        """The pipeline keywords the whole pass shares (besides guidance, seeds and the identity)."""
        sampler = self.style["sampler"]
        return {"num_inference_steps": int(sampler["steps"]), "width": self.plan.width, "height": self.plan.height,
                **eta_of(sampler)}

    def sample_input(self) -> dict[str, Any]:
        """The pipeline inputs of one of this job's samples (``batched_inputs`` stacks them)."""
        # "" is what None means to diffusers, and a batch's list of negatives takes no None
        return {"prompt": self.prompt, "negative_prompt": self.style.get("negative_prompt") or ""}


class PortraitPipeline:
    """Job "portrait": identity + style -> ranked portraits (see the module docstring)."""

    kind = "portrait"
    file_prefix = "portrait"  # result files are <prefix>_<rank>_<seed>.png

    def __init__(self, detector_factory: Callable[[str, Path], Any] | None = None) -> None:
        self._detector_factory = detector_factory
        self._context: PipelineContext | None = None
        self._settings: dict[str, Any] = {}
        self._resident: ResidentPipelines | None = None
        self._arcface: ArcFace | None = None
        self._detector: Any | None = None
        self._pose_model: Any | None = None
        self._restorer: Any | None = None
        self._missing_bases: dict[str, float] = {}  # style base -> when it was last found missing
        self._style_bases: set[str] = set()  # resident keys of the style bases this pipeline loaded

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self, context: PipelineContext) -> None:
        """Open ArcFace and the face detector, and make the default family's base resident."""
        self._context = context
        self._settings = {**DEFAULTS, **context.settings}
        budget = context.memory_budget_mb * 2**20
        self._resident = context.shared.setdefault(SHARED_KEY, ResidentPipelines(budget))
        self._arcface = open_arcface(context)
        if self._settings["face_filter"]:
            self._detector = self._open_detector()
        if wants_auto_restore(str(self._settings["auto_restore"]), context.device):
            self._restorer = open_restorer(context, self._settings)
            if self._restorer is None:
                log.warning("auto_restore is on but no face restorer is installed "
                            "(`facechain-bot models pull enhance-restore`)")
            elif self._detector is None:
                self._detector = self._open_detector()
        self.base(self._settings["default_family"])

    def close(self) -> None:
        """Evict this pipeline's base models from the resident cache."""
        if self._resident is not None:
            for key in [self.resident_key(family) for family in FAMILIES] + sorted(self._style_bases):
                self._resident.evict(key)
        self._arcface = self._detector = self._pose_model = self._restorer = None

    @staticmethod
    def resident_key(family: str, name: str | None = None) -> str:
        """Return the key of the family's base (or of the style base `name`) in the worker's ResidentPipelines."""
        return f"{RESIDENT_PREFIX}:{family}" + (f":{name}" if name else "")

    def base(self, family: str, name: str | None = None) -> ResidentBase:
        """Return the resident base of `family` (the style base `name` of it, if given), loading it on first use."""
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}, expected one of {sorted(FAMILIES)}")
        if self._resident is None:
            raise RuntimeError("PortraitPipeline used before load")
        key = self.resident_key(family, name)
        if name is not None:
            self._style_bases.add(key)
        return self._resident.get(key, lambda: self._load_base(family, name))

    def style_base(self, style: dict[str, Any]) -> str | None:
        """The style's own base when it names one and it is installed; None (the family's default) otherwise."""
        name = style.get("base")
        if not name:
            return None
        assert self._context is not None
        missing_since = self._missing_bases.get(name)
        if missing_since is not None and time.monotonic() - missing_since < MISSING_BASE_RECHECK_S:
            return None  # asked recently: the manifest is not read again for every job
        if self.resident_key(style["family"], name) in self._style_bases:
            return str(name)
        try:
            self._context.model_path(name, STYLE_BASE_FEATURE)
        except (ModelNotInstalled, KeyError, ValueError):
            if missing_since is None:
                log.warning("style base %s is not installed; its styles run on the default %s base until "
                            "`facechain-bot models pull %s`", name, style.get("family"), name)
            self._missing_bases[name] = time.monotonic()
            return None
        self._missing_bases.pop(name, None)
        return str(name)

    # -- one job ---------------------------------------------------------------------------------

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Generate, filter and rank portraits of the identity in the style; write PNGs."""
        return self.run_prepared(self.prepare(params), progress)

    def run_prepared(self, job: PreparedPortrait, progress: Progress) -> JobResult:
        """Steps 4-7 of a prepared job on its own."""
        job.set_up()
        # 4. Generate the candidates; progress raising JobCancelled stops between steps.
        batch = 1 if job.params.get("low_memory") else max(1, int(self._settings["batch_size"]))  # the OOM retry
        chunks = [job.seeds[i:i + batch] for i in range(0, len(job.seeds), batch)]
        total = int(job.style["sampler"]["steps"]) * len(chunks) + 1
        candidates = self._generate(job, chunks, progress, total)
        return self.finish(job, candidates, progress, total)

    def prepare(self, params: dict[str, Any]) -> PreparedPortrait:
        """Steps 1-3 of a job: its style, numbers, controls, identity and LoRAs (nothing generated yet)."""
        if self._arcface is None:
            raise RuntimeError("PortraitPipeline.run called before load")
        # 1. Resolve the style, the job's numbers and the user's controls (aspect, likeness, pose, vary).
        style = _style_dict(params["style"])
        # The operator may cap every style's sampler (fewer steps or smaller images on a small GPU).
        sampler = style["sampler"] = {**style["sampler"], **self._settings.get("sampler_override", {})}
        # Fast mode: the accelerator's steps and guidance (and its LoRA and scheduler below) over the style's.
        posed = bool((params.get("controls") or {}).get("pose"))
        fast = self.accelerator_for(style["family"], params, controlnet=posed, opted_out=style.get("fast") is False)
        if fast is not None:
            style["sampler"] = fast.sampler(sampler)
        count = job_count(params)
        seeds = candidate_seeds(params, count, self._settings["oversample"])
        base = self.base(style["family"], self.style_base(style))
        plan = self.studio_plan(base, style, params.get("controls") or {})
        # 2. Load the identity.
        identity = self._load_identity(params["identity"], params.get("selfies"))
        # 3. The user, style (and fast mode's) LoRAs to activate on the resident base.
        loras = self._lora_requests(style, params) + self.fast_loras(style["family"], fast)
        prompt = style["prompt"].replace("{subject}", str(params.get("subject") or self._settings["subject"]))
        return PreparedPortrait(self, params, style, count, seeds, base, plan, identity, loras, prompt, fast)

    def finish(self, job: PreparedPortrait, candidates: list[np.ndarray], progress: Progress,
               total: int) -> JobResult:
        """Steps 5-7 of a job: rank its candidates, screen them, write the kept portraits."""
        # 5. Keep one-face candidates, best identity match first.
        ranked = self._rank(candidates, job.identity, len(candidates))
        progress(total, total)
        # 6-7. Safe mode keeps the best `count`; their faces restored (auto_restore), written labelled.
        files, meta = self.keep_ranked(job, candidates, ranked, "portrait.no_good_candidates", self.restore)
        user_lora = any(r.slot == "user" for r in job.loras)
        meta = {
            **meta,
            "style": job.style.get("id"),
            "base": job.base.name or job.base.family,
            "lora_used": user_lora,
            "restored": self._restorer is not None,
            "fast": job.fast.id if job.fast is not None else None,
            "steps": int(job.style["sampler"]["steps"]),
            **job.plan.meta(job.base),
        }
        log.info("portrait style=%s kept %d of %d candidates, user lora=%s", job.style.get("id"), len(files),
                 len(candidates), user_lora)
        return JobResult(files=files, meta=meta)

    def keep_ranked(self, job: PreparedPortrait, candidates: list[np.ndarray], ranked: list[Ranked], code: str,
                    restore: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[list[Path], dict[str, Any]]:
        """Safe mode over the ranked candidates (best first; none: UserFacingError `code`), then the kept ones
        (`restore`d) written as labelled PNGs: the files and the meta every ranked result carries."""
        if not ranked:
            raise UserFacingError(code, candidates=len(candidates))
        screened = safety.screen(self._context, job.params, [candidates[r.index] for r in ranked], job.count)
        ranked = [ranked[i] for i in screened.kept]
        seeds = [job.seeds[r.index] for r in ranked]
        kept = [candidates[r.index] for r in ranked]
        files = _write_pngs(Path(job.params["out_dir"]), [restore(k) for k in kept] if restore else kept, seeds,
                            safety.service_name(self._context), self.file_prefix)
        return files, {"seeds": seeds, "similarity": [round(r.similarity, 4) for r in ranked],
                       "safety": safety.safety_meta(screened), "file_meta": [{"seed": seed} for seed in seeds]}

    def run_batch(self, jobs: list[tuple[dict[str, Any], Progress]]) -> list[JobResult | BaseException]:
        """Several jobs' candidates in one denoising pass (``facechain_core.shared_pass``); one outcome per job."""
        from facechain_core.shared_pass import run_shared_passes

        return run_shared_passes(self, jobs)

    def restore(self, image: np.ndarray) -> np.ndarray:
        """The picture with its faces restored when auto_restore runs (unchanged otherwise)."""
        if self._restorer is None or self._detector is None:
            return image
        return restore_faces(image, self._detector.detect(image), self._restorer)

    def studio_plan(self, base: ResidentBase, style: dict[str, Any], controls: dict[str, Any]) -> StudioPlan:
        """The picture size, identity weight, pose map and starting noise the user's controls ask for."""
        sampler = style["sampler"]
        width, height = aspect_size(int(sampler["width"]), int(sampler["height"]), controls.get("aspect"),
                                    size_multiple(base.pipe))
        weight = identity_weight(float(style.get("identity_weight", 1.0)), controls.get("likeness"))
        plan = StudioPlan(width, height, weight, controls.get("aspect"), controls.get("likeness"))
        pose = controls.get("pose")
        if pose:
            plan.pose_id = pose.get("id") or "photo"
            plan.pose_image = Image.fromarray(self._pose_map(pose, (width, height)))
        vary = controls.get("vary")
        if vary is not None:
            plan.vary_seed = int(vary["seed"])
        return plan

    def _pose_map(self, pose: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
        """A library pose (``{"id"}``) or the pose of a photo (``{"image"}``, through DWPose) drawn at `size`."""
        from facechain_core.poses import has_pose, load_poses, photo_skeleton, pose_map

        if pose.get("image"):
            with Image.open(pose["image"]) as im:
                rgb = np.asarray(im.convert("RGB"))
            body, frame = photo_skeleton(self._pose_estimator(), rgb)
            if not has_pose(body):
                raise UserFacingError("pose.none_found")
        else:
            entry = load_poses(Path(self._settings.get("poses_dir") or DEFAULT_POSES_DIR)).get(str(pose.get("id")))
            if entry is None:
                raise UserFacingError("pose.unknown", name=str(pose.get("id")))
            body, frame = entry.skeleton()
        return pose_map(body, frame, size)

    def _pose_estimator(self) -> Any:
        from facechain_core.pose import PoseEstimator

        if self._pose_model is None:
            assert self._context is not None
            self._pose_model = PoseEstimator(self._context.model_path(POSE_MODEL, POSE_FEATURE), self._context.device)
        return self._pose_model

    def pose_pipeline(self, base: ResidentBase) -> Any:
        """The base's pipeline with the family's openpose ControlNet, sharing every module of the base."""
        assert self._resident is not None
        own = self.resident_key(base.family, base.name)
        return self._resident.derive(f"{own}:openpose", own, lambda _: self._load_pose_pipe(base))

    def _load_pose_pipe(self, base: ResidentBase) -> Any:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        assert self._context is not None
        name, feature = POSE_CONTROLNETS[base.family]
        path = self._context.model_path(name, feature)
        controlnet = ControlNetModel.from_pretrained(path, dtype=base.pipe.unet.dtype, local_files_only=True)
        cls = StableDiffusionControlNetPipeline if base.family == "sd15" else StableDiffusionXLControlNetPipeline
        pipe = cls.from_pipe(base.pipe, controlnet=controlnet.to(base.pipe.device))
        pipe.set_progress_bar_config(disable=True)
        log.info("loaded the %s openpose ControlNet from %s", base.family, path)
        return pipe

    # -- steps -----------------------------------------------------------------------------------

    def _load_identity(self, path: str | Path, selfies: list[dict[str, Any]] | None = None) -> Identity:
        """Loads the user's identity; builds it from `selfies` first when its job has not run yet."""
        path = Path(path)
        if not path.is_file():
            if not selfies:
                raise UserFacingError("portrait.no_identity")
            assert self._arcface is not None
            save_identity(build_identity([(s["path"], s.get("face")) for s in selfies], self._arcface), path)
        return load_identity(path)

    def _lora_requests(self, style: dict[str, Any], params: dict[str, Any]) -> list[LoraRequest]:
        requests = []
        if params.get("user_lora"):
            path = Path(params["user_lora"])
            if not path.is_file():
                raise UserFacingError("portrait.user_lora_missing")
            requests.append(LoraRequest("user", path, float(params.get("user_lora_scale", 1.0))))
        spec = style.get("lora")
        if spec:
            name = spec.get("model") or f"{LORA_MODEL_PREFIX}{style.get('id')}"
            if params.get("style_lora"):
                path = Path(params["style_lora"])
                if not path.is_file():
                    raise ModelNotInstalled(name, "styles", pull_command(name))
            else:
                assert self._context is not None
                try:
                    path = self._context.model_path(name, "styles")  # [model_paths] style-lora-<id>
                except KeyError:  # neither configured nor in the manifest
                    raise ModelNotInstalled(name, "styles", pull_command(name)) from None
            requests.append(LoraRequest("style", path, float(spec.get("weight", 1.0))))
        return requests

    def accelerator_for(self, family: str, params: dict[str, Any], *, inpainting: bool = False,
                        controlnet: bool = False, opted_out: bool = False) -> Accelerator | None:
        """The accelerator a job runs with: None unless ``params["fast"]`` asks for it, the style does not opt out,
        and the operator's accelerator supports the family and what the job needs (inpainting, ControlNets)."""
        if not params.get("fast"):
            return None
        accelerator = accelerators().get(self._settings.get("fast_accelerator"))
        if opted_out or not accelerator.supports(family, inpainting=inpainting, controlnet=controlnet):
            log.info("fast mode asked for but not used: %s", "the style opts out" if opted_out else
                     f"{accelerator.id} does not support this job on {family}")
            return None
        return accelerator

    def fast_loras(self, family: str, accelerator: Accelerator | None) -> list[LoraRequest]:
        """The accelerator's LoRA for the "fast" slot (none without an accelerator)."""
        if accelerator is None:
            return []
        assert self._context is not None
        name, feature = accelerator.models[family], accelerator.features[family]
        path = self._context.model_path(name, feature)  # [model_paths] <name> overrides the manifest's place
        return [LoraRequest(FAST_SLOT, path, accelerator.weight)]

    def activate_loras(self, base: ResidentBase, requests: list[LoraRequest]) -> None:
        """Put each requested LoRA in its slot (weights copied in place when they fit), activate them."""
        pipe = base.pipe
        scale_reset = False
        for req in requests:
            if base.slots.get(req.slot) != req.key:
                try:
                    scale_reset |= self._load_into_slot(base, req)
                except Exception:
                    base.active = None  # peft's active set is unknown after a failed load
                    raise
        # The FaceID adapter's own LoRA (faceid_N) must stay active beside ours.
        loaded = {n for names in pipe.get_list_adapters().values() for n in names}
        names = sorted(n for n in loaded if n.startswith("faceid_")) + [req.slot for req in requests]
        weights = [1.0] * (len(names) - len(requests)) + [req.weight for req in requests]
        active = tuple(zip(names, weights, strict=True))
        # set_adapters walks every UNet module (tens of ms at full size): skip it when nothing changed.
        if active == base.active and not scale_reset:
            return
        if names:
            if not base.active:  # None (unknown) or () (LoRA switched off)
                pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=weights)
        elif loaded:
            pipe.disable_lora()
        base.active = active

    def _load_into_slot(self, base: ResidentBase, req: LoraRequest) -> bool:
        """Load req's LoRA into its slot; return True when a new adapter replaced the slot's.

        Same keys, shapes and scaling as the slot's adapter: its tensors are overwritten in place
        (milliseconds, and peft's config stays true). Otherwise the old adapter is deleted and
        diffusers loads a fresh one, so memory holds one adapter per slot.
        """
        pipe = base.pipe
        if req.slot in base.slots:
            if _copy_into_slot(base, req):
                base.slots[req.slot] = req.key
                log.debug("copied %s LoRA %s into its slot", req.slot, req.path)
                return False
            _delete_adapter(pipe, req.slot)
            del base.slots[req.slot]
        base.slot_params.pop(req.slot, None)
        try:
            pipe.load_lora_weights(str(req.path), adapter_name=req.slot)
        except (ValueError, KeyError, RuntimeError) as exc:
            log.warning("LoRA %s does not fit the %s base: %s", req.path, base.family, str(exc).splitlines()[0])
            _delete_adapter(pipe, req.slot)
            raise UserFacingError("portrait.lora_incompatible", family=base.family) from exc
        base.slots[req.slot] = req.key
        return True

    def _generate(self, job: PreparedPortrait, chunks: list[list[int]], progress: Progress, total: int
                  ) -> list[np.ndarray]:
        """Run the base once per chunk of seeds, one image per seed; report each denoising step."""
        call: dict[str, Any] = {}
        runner = None
        if job.plan.pose_image is not None:
            runner = self.pose_pipeline(job.base)
            call = {"image": job.plan.pose_image, "controlnet_conditioning_scale": float(self._settings["pose_scale"])}
        return self.denoise_chunks(
            job.base, job.identity, chunks, progress, total, job.set_up, job.guidance, runner=runner,
            latents_for=job.plan.latents_for(job.base), **job.sample_input(), **job.pass_call(), **call)

    def denoise_chunks(self, base: ResidentBase, identity: Identity | list[Identity], chunks: list[list[int]],
                       progress: Progress, total: int, set_up: Callable[[], None], guidance: float, *,
                       runner: Any = None, latents_for: Callable[[list[int]], torch.Tensor] | None = None,
                       per_sample: dict[str, Any] | None = None, **call: Any) -> list[np.ndarray]:
        """Call the base's pipeline (or `runner`, one derived from it) with `call` once per chunk of seeds, one image
        per seed, with what every job shares: the identity's FaceID (Plus) embeddings, merged LoRAs, a step report,
        and between chunks a yield point after which `set_up` restores this job's adapters. `latents_for` gives a
        chunk's starting noise where the seeds alone do not (Vary). `per_sample`: one sample's inputs, given once
        per row (as a shared pass gives them), so each row's result does not depend on the rows beside it.
        A list of identities (a group portrait) makes one IP-Adapter image each; their region masks come in
        `call`'s ``cross_attention_kwargs``."""
        cfg = guidance > 1.0
        done = 0
        pipe = base.pipe
        runner = runner or pipe
        people = identity if isinstance(identity, list) else [identity]
        stacked = np.stack([person.embedding for person in people])  # (people, 512)
        embedding = torch.from_numpy(stacked).reshape(1, len(people), -1).to(pipe.device, pipe.unet.dtype)
        ip_embeds = torch.cat([torch.zeros_like(embedding), embedding]) if cfg else embedding

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            progress(done, total)
            return kwargs

        images: list[np.ndarray] = []
        for index, chunk in enumerate(chunks):
            if index:
                yield_point = getattr(progress, "yield_point", None)
                if yield_point is not None:
                    yield_point()
                    set_up()  # a short job may have used this base in between
            if base.plus:
                self._set_clip_embeds(base, identity, len(chunk), cfg)
            latents = latents_for(chunk) if latents_for is not None else None
            rows = batched_inputs([per_sample] * len(chunk)) if per_sample is not None else {}
            with fused_loras(pipe.unet, self.fusing(base)):
                result = runner(
                    **call, **rows, guidance_scale=guidance, num_images_per_prompt=1 if rows else len(chunk),
                    generator=[torch.Generator("cpu").manual_seed(s) for s in chunk], latents=latents,
                    ip_adapter_image_embeds=[ip_embeds], callback_on_step_end=on_step_end, output_type="np",
                )
            images.extend(_to_uint8(result.images))
        return images

    def fusing(self, base: ResidentBase) -> bool:
        """Whether this job's batches run with the active LoRAs merged (``fuse_loras`` on the base's device)."""
        return wants_fusing(self._settings.get("fuse_loras", "auto"), base.pipe.device)

    def _set_clip_embeds(self, base: ResidentBase, identity: Identity | list[Identity], n: int, cfg: bool) -> None:
        """Give FaceID Plus the CLIP hidden states of the identity's face crop (of each person's, for a group)."""
        pipe = base.pipe
        crops = [Image.fromarray(person.crop) for person in (identity if isinstance(identity, list) else [identity])]
        clip = pipe.prepare_ip_adapter_image_embeds([crops], None, pipe.device, n, cfg)[0]
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds = clip.to(dtype=pipe.unet.dtype)
        layer.shortcut = bool(self._settings["plus_shortcut"])

    def _rank(self, candidates: list[np.ndarray], identity: Identity, keep: int) -> list[Ranked]:
        arcface = self._arcface
        assert arcface is not None

        def embed(image: np.ndarray, face: Any | None) -> np.ndarray:
            landmarks = landmarks_of(face) if face is not None else None
            if landmarks is None:
                crop = np.asarray(Image.fromarray(image).resize((ARCFACE_SIZE, ARCFACE_SIZE), Image.BICUBIC))
            else:
                crop = align_face(image, landmarks)
            return arcface.embed([crop])[0]

        detector = self._detector if self._settings["face_filter"] else None
        return filter_and_rank(candidates, detector, embed, identity.embedding, keep)

    # -- loading ---------------------------------------------------------------------------------

    def _path(self, setting: str, *, required: bool = True) -> Path | None:
        """Return the existing file or folder named by a setting, or raise ModelNotInstalled."""
        assert self._context is not None
        value = self._settings.get(setting)
        path = None
        if value:
            path = Path(value)
            path = path if path.is_absolute() else self._context.models_dir / path
        elif setting in MODEL_NAMES:
            # No explicit setting: the manifest's place (or the operator's model_paths override).
            name = self.identity_adapter() if setting == "ip_adapter_path" else MODEL_NAMES[setting]
            try:
                path = self._context.model_path(name, "portrait-sdxl" if "sdxl" in setting else "portrait")
            except ModelNotInstalled:
                if required:
                    raise
                return None
        if path is None or not path.exists():
            if not required:
                return None
            name = MODEL_NAMES.get(setting, setting)
            raise ModelNotInstalled(name, "portrait", pull_command(name))
        return path

    def identity_adapter(self) -> str:
        """The manifest name of the SD1.5 identity adapter (``identity_adapter``: "auto", "plusv2" or "faceid")."""
        choice = str(self._settings["identity_adapter"])
        if choice != "auto":
            if choice not in IDENTITY_ADAPTERS:
                raise ValueError(f"identity_adapter must be auto or one of {sorted(IDENTITY_ADAPTERS)}, got {choice!r}")
            return IDENTITY_ADAPTERS[choice]
        plus = IDENTITY_ADAPTERS["plusv2"]
        encoder = bool(self._settings.get("image_encoder_path")) or self._resolves(MODEL_NAMES["image_encoder_path"])
        return plus if encoder and self._resolves(plus) else IDENTITY_ADAPTERS["faceid"]

    def _resolves(self, name: str) -> bool:
        """Whether manifest model `name` is installed (or the operator's model_paths names it)."""
        assert self._context is not None
        try:
            self._context.model_path(name, "portrait")
        except (ModelNotInstalled, KeyError, ValueError):
            return False
        return True

    def _open_detector(self) -> Any:
        path = self._path("detector_path")
        assert path is not None
        if self._detector_factory is not None:
            return self._detector_factory(self._settings["detector_kind"], path)
        from facechain_core.faces import create_detector

        return create_detector(self._settings["detector_kind"], path)

    def _load_base(self, family: str, name: str | None = None) -> ResidentBase:
        """Load the family's base pipeline (or the style base `name`, a diffusers folder of that family) and its
        IP-Adapter FaceID (and image encoder for Plus)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

        assert self._context is not None
        folder_setting, adapter_setting = FAMILIES[family]
        folder = self._path(folder_setting)
        adapter = self._path(adapter_setting)
        assert folder is not None and adapter is not None
        dtype = DTYPES.get(self._context.dtype, torch.float32)
        cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
        extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
        if name is not None:
            folder = self._context.model_path(name, STYLE_BASE_FEATURE)
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
        pipe.to(self._context.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(str(adapter.parent), subfolder=None, weight_name=adapter.name,
                             image_encoder_folder=None, local_files_only=True)
        plus = isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterFaceIDPlusImageProjection)
        if plus:
            default_key = self.resident_key(family)
            plain = self._resident.get(default_key, lambda: None) if name and default_key in self._resident else None
            encoder = getattr(getattr(plain, "pipe", None), "image_encoder", None)
            if encoder is not None:  # a style base shares the plain base's image encoder (1.3 GB in fp16)
                pipe.register_modules(image_encoder=encoder, feature_extractor=plain.pipe.feature_extractor)
            else:
                attach_image_encoder(pipe, self._path("image_encoder_path"), dtype)
        log.info("loaded %s base from %s with IP-Adapter FaceID%s", family, folder, " Plus" if plus else "")
        return ResidentBase(pipe=pipe, family=family, plus=plus, name=name, schedulers={"": pipe.scheduler})


def attach_image_encoder(pipe: Any, folder: Path | None, dtype: torch.dtype) -> None:
    """Give a pipeline FaceID Plus's CLIP image encoder (and its processor) from a local folder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    assert folder is not None
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, local_files_only=True)
    size = encoder.config.image_size
    pipe.register_modules(image_encoder=encoder.to(pipe.device),
                          feature_extractor=CLIPImageProcessor(size=size, crop_size=size))


def use_sampler(base: ResidentBase, fast: Accelerator | None, scheduler: str | None = None) -> None:
    """Switch the base to the accelerator's scheduler, or (no accelerator) to `scheduler` (None: the base's own)."""
    if fast is not None:
        base.use_scheduler(*fast.scheduler_spec())
    else:
        base.use_scheduler(scheduler)


def eta_of(sampler: dict[str, Any]) -> dict[str, Any]:
    """The sampler's eta as a pipeline keyword (an accelerator's, TCD's gamma), or nothing."""
    return {"eta": float(sampler["eta"])} if sampler.get("eta") is not None else {}


def _style_dict(style: Any) -> dict[str, Any]:
    if hasattr(style, "model_dump"):
        style = style.model_dump(mode="json")
    if not isinstance(style, dict):
        raise ValueError(f"params['style'] must be a style dict, got {type(style).__name__}")
    missing = [key for key in ("prompt", "family", "sampler") if key not in style]
    if missing:
        raise ValueError(f"style {style.get('id')!r} lacks {missing}")
    if "{subject}" not in style["prompt"]:
        raise ValueError(f"style {style.get('id')!r} prompt lacks {{subject}}: {style['prompt']!r}")
    return style


_SCALING_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")


def _slot_parameters(unet: torch.nn.Module, slot: str) -> dict[str, torch.nn.Parameter]:
    """Map peft state-dict keys (adapter name removed) to the slot adapter's parameters."""
    marks = (f".lora_A.{slot}.", f".lora_B.{slot}.")
    return {name.replace(f".{slot}.", "."): param for name, param in unet.named_parameters()
            if any(mark in name for mark in marks)}


def _copy_into_slot(base: ResidentBase, req: LoraRequest) -> bool:
    """Copy req's LoRA into the slot's tensors when keys, shapes and scaling match exactly; else False."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    pipe = base.pipe
    config = getattr(pipe.unet, "peft_config", {}).get(req.slot)
    if config is None:
        return False
    state, alphas, metadata = pipe.lora_state_dict(str(req.path), return_lora_metadata=True)
    if alphas or any(not key.startswith("unet.") for key in state):
        return False  # kohya alphas or text-encoder layers: leave those to diffusers' loader
    state = {key.removeprefix("unet."): value for key, value in state.items()}
    if state and "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    if metadata:
        meta = {key.removeprefix("unet."): value for key, value in metadata.items()}
        if any(meta.get(name) != getattr(config, name, None) for name in _SCALING_FIELDS):
            return False
    elif config.lora_alpha != config.r or config.alpha_pattern or any(
            v != config.r for v in (config.rank_pattern or {}).values()):
        return False  # without metadata diffusers infers alpha = rank
    params = base.slot_params.get(req.slot)
    if params is None:
        params = base.slot_params[req.slot] = _slot_parameters(pipe.unet, req.slot)
    if set(state) != set(params) or any(state[k].shape != params[k].shape for k in params):
        return False
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])
    return True


def _delete_adapter(pipe: Any, name: str) -> None:
    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    if name in loaded:
        pipe.delete_adapters(name)


def batched_inputs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline call's inputs from each sample's: a list per input; a tuple (one picture per ControlNet)
    becomes one array of pictures per ControlNet (diffusers takes no nested lists for several ControlNets)."""
    rows: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        rows[key] = [_picture_batch(v) for v in zip(*values, strict=True)] if isinstance(values[0], tuple) else values
    return rows


def _picture_batch(pictures: tuple[Image.Image, ...]) -> np.ndarray:
    """Pictures as one (n, h, w, 3) float batch in [0, 1], the values diffusers reads from each PIL picture."""
    return np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pictures])


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return [np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8) for img in images]


def job_count(params: dict[str, Any]) -> int:
    """The pictures a job asks for, checked against MAX_COUNT."""
    count = int(params.get("count", 1))
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be in 1..{MAX_COUNT}, got {count}")
    return count


def candidate_seeds(params: dict[str, Any], count: int, oversample: Any) -> list[int]:
    """One seed per candidate (`count` times `oversample`), from the job's seed or a random one."""
    first = params.get("seed")
    first = secrets.randbelow(2**31) if first is None else int(first)
    return [first + i for i in range(count * max(1, int(oversample)))]


def _write_pngs(out_dir: Path, images: list[np.ndarray], seeds: list[int], service: str,
                prefix: str = "portrait") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for rank, (image, seed) in enumerate(zip(images, seeds, strict=True), start=1):
        path = out_dir / f"{prefix}_{rank:02d}_{seed}.png"
        safety.save_labelled(Image.fromarray(image), path, service)
        files.append(path.resolve())
    return files
