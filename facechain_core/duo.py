"""Duo and group portraits: two to four identities in one picture, each restricted to its own region.

Train-free, on the portrait's resident base (``facechain_core.portrait``: the same SD1.5/SDXL with its
IP-Adapter FaceID and the family's openpose ControlNet). A group layout (``facechain_core.group_poses``)
draws one skeleton per person for the ControlNet and gives each person a region; the identities' FaceID
embeddings go to the one IP-Adapter as several images, each masked to its person's region through
diffusers' ``IPAdapterMaskProcessor`` masks (``cross_attention_kwargs["ip_adapter_masks"]``). Personal
LoRAs are not applied (one LoRA would paint every face alike; ``meta["lora_used"]`` says so); a style's
own LoRA is. Candidates are ranked by matching detected faces one-to-one to the identities
(``facechain_core.group_ranking``) and dropped when anyone is not recognisable; safe mode screens them
and the PNGs carry the AI-generated label, as portraits do.

Job params: ``style`` (a style dict), ``identities`` (2..4 identity files, the requester's first),
``layout`` (a group layout id; default the first for that many people), ``count``, ``seed``, ``out_dir``.
Settings: the portrait's, plus ``duo_min_similarity`` (0.2) and ``groups_dir`` (``poses/groups``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facechain_core import safety
from facechain_core.errors import UserFacingError
from facechain_core.group_poses import DEFAULT_GROUPS_DIR, MAX_PEOPLE, MIN_PEOPLE, GroupLayout, load_groups, \
    region_masks
from facechain_core.group_ranking import GroupRanked, rank_group
from facechain_core.identity import ARCFACE_SIZE, Identity, align_face, landmarks_of, load_identity
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.portrait import PortraitPipeline, ResidentBase, _style_dict, _write_pngs, \
    candidate_seeds, job_count
from facechain_core.studio import size_multiple

log = logging.getLogger(__name__)

DUO_DEFAULTS: dict[str, Any] = {"duo_min_similarity": 0.2}
SUBJECTS = {2: "two people", 3: "three people", 4: "four people"}


class DuoPipeline(PortraitPipeline):
    """Job "duo": 2..4 identities + style -> ranked group portraits (see the module docstring)."""

    kind = "duo"

    def close(self) -> None:
        """Let go of the detector and ArcFace; the resident base stays for the portrait pipeline sharing it."""
        self._arcface = self._detector = self._pose_model = None

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Generate, rank by one-to-one face matching, screen and write group portraits."""
        if self._arcface is None:
            raise RuntimeError("DuoPipeline.run called before load")
        settings = {**DUO_DEFAULTS, **self._settings}
        # 1. The style, the job's numbers and the people.
        style = _style_dict(params["style"])
        sampler = style["sampler"] = {**style["sampler"], **settings.get("sampler_override", {})}
        count = job_count(params)
        paths = [Path(p) for p in params["identities"]]
        if not MIN_PEOPLE <= len(paths) <= MAX_PEOPLE:
            raise ValueError(f"a group portrait needs {MIN_PEOPLE}..{MAX_PEOPLE} identities, got {len(paths)}")
        if not all(p.is_file() for p in paths):
            raise UserFacingError("duo.no_identity")
        identities = [load_identity(p) for p in paths]
        seeds = candidate_seeds(params, count, settings["oversample"])
        # 2. The layout: a skeleton per person for the ControlNet, a region per person for their identity.
        base = self.base(style["family"], self.style_base(style))
        layout = self.layout(len(paths), params.get("layout"))
        width, height = self.group_size(base, layout, int(sampler["width"]) * int(sampler["height"]))
        pose = Image.fromarray(layout.pose_map((width, height)))
        masks = self.masks(base, layout, (width, height))
        # 3. The resident base: the style's LoRA only, the identity scale, the scheduler.
        loras = self._lora_requests(style, {})
        weight = float(style.get("identity_weight", 1.0))

        def set_up() -> None:
            self.activate_loras(base, loras)
            base.pipe.set_ip_adapter_scale(weight)
            base.use_scheduler(sampler.get("scheduler"))

        set_up()
        # 4. Generate through the openpose ControlNet with each identity masked to its region.
        batch = max(1, int(settings["batch_size"]))
        chunks = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
        total = int(sampler["steps"]) * len(chunks) + 1
        prompt = style["prompt"].replace("{subject}", SUBJECTS[len(paths)])
        runner = self.pose_pipeline(base)
        candidates = self.denoise_chunks(
            base, identities, chunks, progress, total, set_up, float(sampler.get("guidance_scale", 7.0)),
            runner=runner, cross_attention_kwargs={"ip_adapter_masks": [ip_adapter_mask(masks)]}, prompt=prompt,
            negative_prompt=style.get("negative_prompt") or None, num_inference_steps=int(sampler["steps"]),
            width=width, height=height, image=pose,
            controlnet_conditioning_scale=float(settings["pose_scale"]))
        # 5. Keep the candidates where everyone is recognised, best total match first.
        ranked = self.rank(candidates, identities, masks, float(settings["duo_min_similarity"]))
        progress(total, total)
        # 6. Safe mode, then the labelled PNGs.
        files, meta = keep_group_results(self._context, params, candidates, ranked, seeds, count)
        meta.update({"style": style.get("id"), "layout": layout.id, "people": len(paths), "size": [width, height],
                     "identity_weight": weight})
        log.info("duo style=%s layout=%s people=%d kept %d of %d candidates", style.get("id"), layout.id,
                 len(paths), len(files), len(candidates))
        return JobResult(files=files, meta=meta)

    # -- steps -----------------------------------------------------------------------------------

    def layout(self, people: int, layout_id: str | None) -> GroupLayout:
        """The requested layout (it must be for `people`), else the first for that many people."""
        library = load_groups(Path(self._settings.get("groups_dir") or DEFAULT_GROUPS_DIR))
        if layout_id:
            layout = library.get(str(layout_id))
            if layout is None or layout.people != people:
                raise UserFacingError("duo.unknown_layout", name=str(layout_id), people=people)
            return layout
        fitting = library.for_people(people)
        if not fitting:
            raise UserFacingError("duo.unknown_layout", name="", people=people)
        return fitting[0]

    @staticmethod
    def group_size(base: ResidentBase, layout: GroupLayout, area: int) -> tuple[int, int]:
        """(w, h) of about `area` pixels in the layout's aspect, multiples of what the UNet accepts."""
        multiple = size_multiple(base.pipe)
        height = (area / layout.aspect) ** 0.5
        w = max(multiple, round(height * layout.aspect / multiple) * multiple)
        h = max(multiple, round(height / multiple) * multiple)
        return w, h

    @staticmethod
    def masks(base: ResidentBase, layout: GroupLayout, size: tuple[int, int]) -> np.ndarray:
        """Each person's region (n, H, W bool) at the IP-Adapter mask's resolution."""
        pipe = base.pipe
        latent_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        return region_masks(layout, size, latent_factor, len(pipe.unet.config.block_out_channels))

    def rank(self, candidates: list[np.ndarray], identities: list[Identity], masks: np.ndarray,
             min_similarity: float) -> list[GroupRanked]:
        """One-to-one face matching (the face filter off: each person's region stands in for their face)."""
        arcface = self._arcface
        assert arcface is not None

        def embed(image: np.ndarray, face: Any | None, person: int) -> np.ndarray:
            landmarks = landmarks_of(face) if face is not None else None
            if landmarks is not None:
                crop = align_face(image, landmarks)
            else:
                crop = np.asarray(Image.fromarray(region_crop(image, masks[person]))
                                  .resize((ARCFACE_SIZE, ARCFACE_SIZE), Image.BICUBIC))
            return arcface.embed([crop])[0]

        detector = self._detector if self._settings["face_filter"] else None
        embeddings = np.stack([i.embedding for i in identities])
        return rank_group(candidates, detector, embed, embeddings, min_similarity)


def ip_adapter_mask(masks: np.ndarray) -> torch.Tensor:
    """The masks as diffusers' IP-Adapter takes them for one adapter with several images: (1, n, H, W)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    height, width = masks.shape[1:]
    pictures = [Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
    processed = IPAdapterMaskProcessor().preprocess(pictures, height=height, width=width)
    return processed.reshape(1, len(masks), height, width)


def region_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part of `image` inside a person's band (the mask scaled to the image's size)."""
    cols = np.nonzero(mask.any(axis=0))[0]
    scale = image.shape[1] / mask.shape[1]
    x0, x1 = int(cols.min() * scale), int((cols.max() + 1) * scale)
    return image[:, x0:x1]


def keep_group_results(context: PipelineContext, params: dict[str, Any], candidates: list[np.ndarray],
                       ranked: list[GroupRanked], seeds: list[int], count: int) -> tuple[list[Path], dict[str, Any]]:
    """Safe mode over the ranked group pictures, then the labelled PNGs: the files and the meta every group
    result carries (seeds, similarities, no personal LoRAs, safety)."""
    if not ranked:
        raise UserFacingError("duo.no_good_candidates", candidates=len(candidates))
    screened = safety.screen(context, params, [candidates[r.index] for r in ranked], count)
    ranked = [ranked[i] for i in screened.kept]
    files = _write_pngs(Path(params["out_dir"]), [candidates[r.index] for r in ranked],
                        [seeds[r.index] for r in ranked], safety.service_name(context))
    meta = {"seeds": [seeds[r.index] for r in ranked], "similarity": [round(r.score, 4) for r in ranked],
            "similarities": [[round(s, 4) for s in r.similarities] for r in ranked],
            "lora_used": False, "personal_loras": "not applied", "safety": safety.safety_meta(screened),
            "file_meta": [{"seed": seeds[r.index]} for r in ranked]}
    return files, meta
