"""Fixed templates: the user's face painted into a template picture, its outfit, pose and scene kept.

Steps of a job: read the template (a library picture, ``facechain_core.templates``, or the user's own photo) at
the working size; find its one face (YuNet; none or several are refused, several with a pointer to duo
portraits); the region to repaint is an ellipse over that face and its hair, dilated and feathered; DWPose's
skeleton of the person holds the pose through the openpose ControlNet; SD1.5 inpainting (the try-on's
resident base, ``facechain_core.tryon``) repaints the region with the user's IP-Adapter FaceID embedding
(FaceID Plus with the face crop, and their LoRA when trained), from the starting noise of the seed or, for
"Vary" (``controls["vary"]``), of a seed it varies; the template's own pixels are put back outside
the region through the feathered mask; candidates are ranked by similarity to the identity, screened by safe
mode and labelled as portraits are.

Settings: the portrait's shared ones and a ``template`` table: ``side`` (512), ``steps`` (30),
``guidance_scale`` (7.0), ``pose_scale`` (1.0), ``identity_weight`` (1.0), ``face_grow`` (1.6: the ellipse's
size over the face box), ``dilate_px`` (8) and ``feather_px`` (12) at 512 px, ``prompt``, ``negative_prompt``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from facechain_core.errors import UserFacingError
from facechain_core.faces import Face
from facechain_core.garment import feather_mask
from facechain_core.identity import open_arcface
from facechain_core.pipeline import PipelineContext
from facechain_core.portrait import DEFAULTS, candidate_seeds, job_count
from facechain_core.poses import has_pose, photo_skeleton, pose_map
from facechain_core.pose import PoseEstimator
from facechain_core.resident import SHARED_KEY, ResidentPipelines
from facechain_core.studio import identity_weight
from facechain_core.tryon import REFERENCE_SIDE, PreparedInpaint, TryOnPipeline, working_image

log = logging.getLogger(__name__)

FEATURE = "template"
DETECT_SIDE = 1024  # the template's longer side when its face is looked for
TEMPLATE_DEFAULTS: dict[str, Any] = {
    "side": 512, "steps": 30, "guidance_scale": 7.0, "pose_scale": 1.0, "identity_weight": 1.0,
    "face_grow": 1.6, "dilate_px": 8, "feather_px": 12,
    "prompt": "portrait of {subject}, detailed face, natural skin, best quality",
    "negative_prompt": "lowres, blurry, deformed face, asymmetric eyes, watermark, text",
}


class TemplatePipeline(TryOnPipeline):
    """Job "template": a template picture + identity -> the user in that picture (see the module docstring)."""

    kind = "template"
    file_prefix = "portrait"

    def load(self, context: PipelineContext) -> None:
        """Open DWPose, ArcFace and the face detector; make the try-on's inpainting base resident."""
        self._context = context
        self._settings = {**DEFAULTS, **context.settings}
        self._tryon = {**TEMPLATE_DEFAULTS, **(context.settings.get("template") or {})}
        self._resident = context.shared.setdefault(SHARED_KEY, ResidentPipelines(context.memory_budget_mb * 2**20))
        self._pose = PoseEstimator(self._model("pose_path"), context.device)
        self._arcface = open_arcface(context)
        self._detector = self._open_detector()  # the template's face is found whatever face_filter says
        self.base("sd15")

    def prepare(self, params: dict[str, Any]) -> PreparedInpaint:
        """Steps 1-3 of a job: the template at the working size, its face region and pose, the identity, LoRAs."""
        if self._pose is None or self._arcface is None or self._detector is None:
            raise RuntimeError("TemplatePipeline.run called before load")
        cfg = self._tryon
        # 1. The job's numbers and the template at the working size.
        count = job_count(params)
        seeds = candidate_seeds(params, count, self._settings["oversample"])
        picture = working_image(Path(params["template"]), int(cfg["side"]))
        # 2. Its one face, the region to repaint, and the pose to hold.
        face = self._one_face(Path(params["template"]), picture.shape[:2])
        scale = max(picture.shape[:2]) / REFERENCE_SIDE
        region = face_region(face, picture.shape[:2], float(cfg["face_grow"]))
        repaint_soft = feather_mask(region, round(int(cfg["dilate_px"]) * scale),
                                    round(int(cfg["feather_px"]) * scale))
        pose, pose_weight = self._pose_control(picture)
        silhouette = Image.fromarray(np.zeros_like(picture))  # the try-on base's depth ControlNet: off
        # 3. Identity and LoRA on the resident base; the likeness control scales the identity weight.
        controls = params.get("controls") or {}
        weight = identity_weight(float(cfg["identity_weight"]), controls.get("likeness"))
        vary_seed = int(controls["vary"]["seed"]) if controls.get("vary") else None
        subject = str(params.get("subject") or self._settings["subject"])
        prompt = ", ".join(p for p in (str(cfg["prompt"]).replace("{subject}", subject), params.get("hints")) if p)
        ys, xs = np.nonzero(repaint_soft > 0)
        meta = {"template": params.get("template_id") or "photo",
                "mask_box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "identity_weight": weight, "pose_found": pose_weight > 0, "vary_of": vary_seed}
        repaint = Image.fromarray(((repaint_soft > 0) * 255).astype(np.uint8))
        return self.inpaint_job(params, count, seeds, picture=picture, repaint=repaint, keep=1.0 - repaint_soft,
                                controls=(pose, silhouette), control_scales=(pose_weight, 0.0), weight=weight,
                                prompt=prompt, meta=meta, vary_seed=vary_seed)

    def _one_face(self, path: Path, shape: tuple[int, int]) -> Face:
        """The template's only face (found at up to DETECT_SIDE px, mapped to the working `shape`); none, or
        more than one, is refused."""
        assert self._detector is not None
        with Image.open(path) as im:
            im.draft("RGB", (DETECT_SIDE, DETECT_SIDE))  # JPEGs decode at a fraction of a large original
            image = im.convert("RGB")
        image.thumbnail((DETECT_SIDE, DETECT_SIDE))
        faces = [f.scaled(shape[1] / image.width) for f in self._detector.detect(np.asarray(image))]
        if not faces:
            raise UserFacingError("template.no_face")
        if len(faces) > 1:
            raise UserFacingError("template.many_faces", faces=len(faces))
        return faces[0]

    def _pose_control(self, picture: np.ndarray) -> tuple[Image.Image, float]:
        """The person's OpenPose skeleton and the openpose ControlNet's weight (0 when no body is found)."""
        assert self._pose is not None
        body, frame = photo_skeleton(self._pose, picture)
        size = (picture.shape[1], picture.shape[0])
        if not has_pose(body):
            return Image.fromarray(np.zeros_like(picture)), 0.0
        return Image.fromarray(pose_map(body, frame, size)), float(self._tryon["pose_scale"])


def face_region(face: Face, shape: tuple[int, int], grow: float) -> np.ndarray:
    """A bool mask (h, w): an ellipse over the face box grown by `grow`, raised to take in the hair."""
    x, y, w, h = face.box
    mask = np.zeros(shape, np.uint8)
    centre = (int(round(x + w / 2)), int(round(y + h / 2 - 0.12 * h * grow)))
    axes = (max(1, int(round(w * grow / 2))), max(1, int(round(h * grow * 0.62))))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1)
    return mask.astype(bool)
