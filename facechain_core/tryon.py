"""Virtual try-on: the outfit photo's garment, pose and framing, worn by the user.

Steps of a job: parse the outfit photo (``garment.ClothesParser``) into a garment mask (upper,
lower, dress classes) that is dilated and feathered; find the wearer's pose with DWPose on the
parser's person box (``pose.PoseEstimator``) and draw it as OpenPose does; repaint everything
*except* the garment with SD1.5 inpainting + two ControlNets (``StableDiffusionControlNetInpaintPipeline``
with the stock diffusers loaders): openpose on that skeleton, and depth on ``garment.control_map``,
the person's silhouette, so arms and legs keep the garment's outline; conditioned on the user's
IP-Adapter FaceID embedding (FaceID Plus also reads their face crop when ``ip_adapter_path`` names a
Plus file; and their LoRA when trained); paste the original garment pixels back
through the feathered mask so the garment stays faithful; rank the candidates by face similarity, screen
them by safe mode and write them labelled, as portraits do. ``params["pose_image"]`` replaces the skeleton
with a given OpenPose picture. A job is prepared (``prepare``) up to its denoising, so several users' try-ons
(and templates, on the same base) can share one pass (``facechain_core.shared_pass``,
``facechain_core.inpaint_batch``): each row is given its own picture, mask and control pictures, alone too,
so a row's result never depends on the rows beside it.

Settings: the portrait's shared ones (``face_filter``, ``oversample``, ``batch_size``,
``detector_kind``) and a ``tryon`` table: ``side`` (512, the working size's longer side),
``steps`` (30), ``guidance_scale`` (7.0), ``pose_scale`` (1.0) and ``silhouette_scale`` (0.5), the
two ControlNets' weights, ``identity_weight`` (1.0), ``dilate_px`` (6), ``feather_px`` (8) at 512 px
(scaled with ``side``), ``prompt``, ``negative_prompt``. Models come from the manifest
(``sd15-inpainting``, ``controlnet-openpose-sd15``, ``controlnet-depth-sd15``, ``dwpose-wholebody``,
``segformer-clothes``, ``ip-adapter-faceid-sd15``) or ``model_paths`` overrides.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.garment import ClothesParser, Parsing, control_map, feather_mask, parser_summary
from facechain_core.garment import MIN_GARMENT_FRACTION, MIN_PERSON_FRACTION
from facechain_core.identity import open_arcface, pull_command
from facechain_core.inpaint_batch import working_size
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.pose import Pose, PoseEstimator, draw_openpose, openpose_body, person_box
from facechain_core.portrait import DEFAULTS, DTYPES, PortraitPipeline, PreparedPortrait, ResidentBase, StudioPlan, \
    attach_image_encoder, candidate_seeds, job_count
from facechain_core.resident import SHARED_KEY, ResidentPipelines

log = logging.getLogger(__name__)

FEATURE = "tryon"
RESIDENT_KEY = "tryon:sd15"
# setting in the tryon table -> model name in the manifest
MODELS = {"inpaint_path": "sd15-inpainting", "openpose_controlnet_path": "controlnet-openpose-sd15",
          "depth_controlnet_path": "controlnet-depth-sd15", "pose_path": "dwpose-wholebody",
          "parser_path": "segformer-clothes", "ip_adapter_path": "ip-adapter-faceid-sd15"}
TRYON_DEFAULTS: dict[str, Any] = {
    "side": 512, "steps": 30, "guidance_scale": 7.0, "pose_scale": 1.0, "silhouette_scale": 0.5,
    "identity_weight": 1.0,
    "dilate_px": 6, "feather_px": 8,
    "prompt": "a photo of a person wearing the outfit, natural skin, detailed face, best quality",
    "negative_prompt": "lowres, blurry, deformed face, extra limbs, watermark",
}
REFERENCE_SIDE = 512  # dilate_px and feather_px are given at this side
MIN_POSE_POINTS = 4  # of OpenPose's 18 body points, below which there is no body pose to keep


@dataclass(kw_only=True)
class PreparedInpaint(PreparedPortrait):
    """A try-on or template job resolved up to its denoising. Its `style` is the settings table (fast mode's
    sampler applied), its plan the working size and identity weight."""

    picture: np.ndarray  # the working picture (RGB)
    repaint: Image.Image  # white where the picture is repainted
    keep: np.ndarray  # float (h, w): the share of the picture put back over each generated pixel
    controls: tuple[Image.Image, Image.Image]  # the openpose and depth ControlNets' pictures
    scales: tuple[float, float]  # their weights (a shared pass gives each sample its own)
    meta: dict[str, Any]  # what the result says beside the common meta

    @property
    def control_scales(self) -> tuple[float, ...]:
        return self.scales

    def pass_call(self) -> dict[str, Any]:
        return {**super().pass_call(), "strength": 1.0, "controlnet_conditioning_scale": list(self.scales)}

    def sample_input(self) -> dict[str, Any]:
        return {**super().sample_input(), "image": Image.fromarray(self.picture), "mask_image": self.repaint,
                "control_image": self.controls}


class TryOnPipeline(PortraitPipeline):
    """Job "tryon": outfit photo + identity -> the outfit worn by the user (see the module docstring)."""

    kind = "tryon"
    file_prefix = "tryon"

    def __init__(self, detector_factory: Any | None = None) -> None:
        super().__init__(detector_factory)
        self._tryon: dict[str, Any] = {}
        self._parser: ClothesParser | None = None
        self._pose: PoseEstimator | None = None

    def load(self, context: PipelineContext) -> None:
        """Open the parser, the pose model, ArcFace and the face detector; make the inpainting base resident."""
        self._context = context
        self._settings = {**DEFAULTS, **context.settings}
        self._tryon = {**TRYON_DEFAULTS, **(context.settings.get("tryon") or {})}
        self._resident = context.shared.setdefault(SHARED_KEY, ResidentPipelines(context.memory_budget_mb * 2**20))
        self._parser = ClothesParser(self._model("parser_path"), context.device)
        self._pose = PoseEstimator(self._model("pose_path"), context.device)
        self._arcface = open_arcface(context)
        if self._settings["face_filter"]:
            self._detector = self._open_detector()
        self.base("sd15")

    def close(self) -> None:
        """Evict the inpainting base and drop the parser and the pose model."""
        if self._resident is not None:
            self._resident.evict(RESIDENT_KEY)
        self._arcface = self._detector = self._parser = self._pose = None

    def base(self, family: str = "sd15") -> ResidentBase:
        """Return the resident inpainting base (SD1.5 only), loading it on first use."""
        if family != "sd15":
            raise ValueError(f"try-on runs on the sd15 family only, got {family!r}")
        if self._resident is None:
            raise RuntimeError("TryOnPipeline used before load")
        return self._resident.get(RESIDENT_KEY, self._load_inpaint_base)

    # -- one job ---------------------------------------------------------------------------------

    def prepare(self, params: dict[str, Any]) -> PreparedInpaint:
        """Steps 1-3 of a job: the outfit at the working size, its garment, pose and masks, the identity, LoRAs."""
        if self._parser is None or self._pose is None or self._arcface is None:
            raise RuntimeError("TryOnPipeline.run called before load")
        cfg = self._tryon
        # 1. The job's numbers and the outfit at the working size.
        count = job_count(params)
        seeds = candidate_seeds(params, count, self._settings["oversample"])
        outfit = working_image(Path(params["outfit"]), int(cfg["side"]))
        # 2. Parse: the garment to keep, the person to repaint, the wearer's pose.
        parsing = self._parser.parse(outfit)
        check_parsing(parsing)
        pose = pose_image(params.get("pose_image"), self._pose, outfit, parsing.person)
        scale = max(outfit.shape[:2]) / REFERENCE_SIDE
        keep = feather_mask(parsing.garment, round(int(cfg["dilate_px"]) * scale),
                            round(int(cfg["feather_px"]) * scale))
        # 3. The identity, LoRAs and fast mode on the resident base.
        return self.inpaint_job(
            params, count, seeds, picture=outfit, repaint=Image.fromarray(((keep < 1.0) * 255).astype(np.uint8)),
            keep=keep, controls=(pose, Image.fromarray(control_map(parsing))),
            control_scales=(float(cfg["pose_scale"]), float(cfg["silhouette_scale"])),
            weight=float(cfg["identity_weight"]), prompt=str(params.get("prompt") or cfg["prompt"]),
            meta=parser_summary(parsing))

    def inpaint_job(self, params: dict[str, Any], count: int, seeds: list[int], *, picture: np.ndarray,
                    repaint: Image.Image, keep: np.ndarray, controls: tuple[Image.Image, Image.Image],
                    control_scales: tuple[float, float], weight: float, prompt: str, meta: dict[str, Any],
                    vary_seed: int | None = None) -> PreparedInpaint:
        """Step 3 of a job: the identity and LoRAs on the resident base, fast mode where the accelerator runs on
        the inpainting base with ControlNets (else normally); the job ready to denoise."""
        identity = self._load_identity(params["identity"], params.get("selfies"))
        fast = self.accelerator_for("sd15", params, inpainting=True, controlnet=True)
        cfg = fast.sampler(self._tryon) if fast is not None else self._tryon
        user_loras = self._lora_requests({}, params)
        height, width = picture.shape[:2]
        return PreparedInpaint(
            self, params, {"sampler": cfg, "negative_prompt": cfg["negative_prompt"]}, count, seeds, self.base(),
            StudioPlan(width, height, weight, vary_seed=vary_seed), identity,
            user_loras + self.fast_loras("sd15", fast), prompt, fast, picture=picture, repaint=repaint, keep=keep,
            controls=controls, scales=control_scales,
            meta={"size": [width, height], **meta, "lora_used": bool(user_loras)})

    def _generate(self, job: PreparedPortrait, chunks: list[list[int]], progress: Progress, total: int
                  ) -> list[np.ndarray]:
        """Run the ControlNet inpainting pipeline once per chunk of seeds, each row given the job's picture, mask
        and control pictures as a shared pass gives them; report each step."""
        assert isinstance(job, PreparedInpaint)
        return self.denoise_chunks(job.base, job.identity, chunks, progress, total, job.set_up, job.guidance,
                                   latents_for=job.plan.latents_for(job.base), per_sample=job.sample_input(),
                                   **job.pass_call())

    def finish(self, job: PreparedPortrait, candidates: list[np.ndarray], progress: Progress,
               total: int) -> JobResult:
        """Steps 4-6 of a job: put the picture back outside the repainted region, rank by face similarity,
        screen and write the kept pictures labelled."""
        assert isinstance(job, PreparedInpaint)
        composed = [composite(job.picture, image, job.keep) for image in candidates]
        ranked = self._rank(composed, job.identity, len(composed))
        progress(total, total)
        files, meta = self.keep_ranked(job, composed, ranked, f"{self.kind}.no_good_candidates")
        meta = {**meta, **job.meta, "fast": job.fast.id if job.fast is not None else None,
                "steps": int(job.style["sampler"]["steps"])}
        log.info("%s kept %d of %d candidates", self.kind, len(files), len(composed))
        return JobResult(files=files, meta=meta)

    # -- loading ---------------------------------------------------------------------------------

    def _model(self, setting: str) -> Path:
        """The path of a try-on model: the tryon table's setting, else the manifest; or ModelNotInstalled."""
        assert self._context is not None
        value = self._tryon.get(setting)
        name = MODELS[setting]
        if value:
            path = Path(value)
            path = path if path.is_absolute() else self._context.models_dir / path
        else:
            path = self._context.model_path(name, FEATURE)
        if not path.exists():
            raise ModelNotInstalled(name, FEATURE, pull_command(name))
        return path

    def _load_inpaint_base(self) -> ResidentBase:
        """Load SD1.5 inpainting with the openpose and depth ControlNets and IP-Adapter FaceID (diffusers' loaders);
        a FaceID Plus file (``ip_adapter_path``) brings the CLIP image encoder as in portraits."""
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline
        from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

        assert self._context is not None
        dtype = DTYPES.get(self._context.dtype, torch.float32)
        controlnets = [ControlNetModel.from_pretrained(self._model(setting), dtype=dtype, local_files_only=True)
                       for setting in ("openpose_controlnet_path", "depth_controlnet_path")]
        pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
            self._model("inpaint_path"), controlnet=controlnets, dtype=dtype, local_files_only=True,
            safety_checker=None, requires_safety_checker=False)
        pipe.to(self._context.device)
        pipe.set_progress_bar_config(disable=True)
        adapter = self._model("ip_adapter_path")
        pipe.load_ip_adapter(str(adapter.parent), subfolder=None, weight_name=adapter.name,
                             image_encoder_folder=None, local_files_only=True)
        plus = isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterFaceIDPlusImageProjection)
        if plus:
            attach_image_encoder(pipe, self._path("image_encoder_path"), dtype)
        log.info("loaded try-on base (SD1.5 inpainting + openpose and depth ControlNets + IP-Adapter FaceID%s)",
                 " Plus" if plus else "")
        return ResidentBase(pipe=pipe, family="sd15", plus=plus, schedulers={"": pipe.scheduler})


# -- pure steps (tested directly) ------------------------------------------------------------------

def working_image(path: Path, side: int) -> np.ndarray:
    """Read a picture as RGB, scaled so its longer side is `side`, both sides multiples of 64 (>= 64)."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    return np.asarray(image.resize(working_size(*image.size, side), Image.LANCZOS))


def check_parsing(parsing: Parsing) -> None:
    """Refuse a picture without a person or without a garment the user can try on."""
    if parsing.person_fraction < MIN_PERSON_FRACTION:
        raise UserFacingError("tryon.no_person")
    if parsing.garment_fraction < MIN_GARMENT_FRACTION:
        raise UserFacingError("tryon.no_garment")


def pose_image(path: str | None, estimator: PoseEstimator, outfit: np.ndarray, person: np.ndarray) -> Image.Image:
    """The openpose ControlNet's picture: a given one at the working size, else the wearer's skeleton."""
    height, width = outfit.shape[:2]
    if path:
        with Image.open(path) as im:
            return im.convert("RGB").resize((width, height), Image.BILINEAR)
    box = person_box(person)
    if box is None:
        raise UserFacingError("tryon.no_person")
    body = openpose_body(estimator.estimate(outfit, box))
    check_pose(body)
    return Image.fromarray(draw_openpose(body, (height, width)))


def check_pose(body: Pose) -> None:
    """Refuse a picture whose wearer shows too little of a body to keep the pose of."""
    if int(body.confident().sum()) < MIN_POSE_POINTS:
        raise UserFacingError("tryon.no_pose")


def composite(original: np.ndarray, generated: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Blend: `keep` (float HxW in [0, 1]) of the original over the generated picture; RGB uint8."""
    if original.shape != generated.shape or keep.shape != original.shape[:2]:
        raise ValueError(f"shapes differ: original {original.shape}, generated {generated.shape}, mask {keep.shape}")
    k = keep[:, :, None].astype(np.float32)
    mixed = k * original.astype(np.float32) + (1.0 - k) * generated.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
