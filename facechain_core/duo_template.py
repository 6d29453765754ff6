"""Multi-face templates filled face by face: each face of a group template repainted with its own identity.

A template of the library showing two to four people (``TemplateEntry.faces``) goes through the template
pipeline's inpainting base (``facechain_core.template``), once per face: faces are found with YuNet and
taken left to right, matched to the identities in the job's order (the requester first); for each face an
ellipse over it is repainted with that person's FaceID embedding, and the template's pixels are put back
outside it, so the next face starts from the picture the previous one left. No pose is held (one body
skeleton of a group picture is no one's). Candidates are ranked by matching detected faces one-to-one
to the identities (``facechain_core.group_ranking``), screened by safe mode and labelled.

Job params: ``template`` (a picture path), ``template_id``, ``identities`` (one per face), ``count``,
``seed``, ``out_dir``; settings as the template pipeline's, plus ``duo_min_similarity`` (0.2).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facechain_core.duo import DUO_DEFAULTS, keep_group_results
from facechain_core.errors import UserFacingError
from facechain_core.faces import Face
from facechain_core.garment import feather_mask
from facechain_core.group_poses import MAX_PEOPLE, MIN_PEOPLE
from facechain_core.group_ranking import GroupRanked, rank_group
from facechain_core.identity import ARCFACE_SIZE, Identity, align_face, landmarks_of, load_identity
from facechain_core.pipeline import JobResult, Progress
from facechain_core.portrait import candidate_seeds, job_count
from facechain_core.template import DETECT_SIDE, TemplatePipeline, face_region
from facechain_core.tryon import REFERENCE_SIDE, composite, working_image

log = logging.getLogger(__name__)


class DuoTemplatePipeline(TemplatePipeline):
    """Job "duo_template": a group template + one identity per face -> everyone in the picture."""

    kind = "duo_template"

    def close(self) -> None:
        """Drop the models; the inpainting base stays for the template and try-on pipelines sharing it."""
        self._arcface = self._detector = self._pose = None

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Repaint each face of the template with its identity, seed by seed; rank, screen, write PNGs."""
        if self._arcface is None or self._detector is None:
            raise RuntimeError("DuoTemplatePipeline.run called before load")
        cfg = self._tryon
        settings = {**DUO_DEFAULTS, **self._settings}
        # 1. The job's numbers, the people and the template at the working size.
        count = job_count(params)
        paths = [Path(p) for p in params["identities"]]
        if not MIN_PEOPLE <= len(paths) <= MAX_PEOPLE:
            raise ValueError(f"a group template needs {MIN_PEOPLE}..{MAX_PEOPLE} identities, got {len(paths)}")
        if not all(p.is_file() for p in paths):
            raise UserFacingError("duo.no_identity")
        identities = [load_identity(p) for p in paths]
        seeds = candidate_seeds(params, count, settings["oversample"])
        picture = working_image(Path(params["template"]), int(cfg["side"]))
        # 2. Its faces, left to right, one per person, and the region of each.
        faces = self.template_faces(Path(params["template"]), picture.shape[:2], len(paths))
        scale = max(picture.shape[:2]) / REFERENCE_SIDE
        regions = []
        for face in faces:
            soft = feather_mask(face_region(face, picture.shape[:2], float(cfg["face_grow"])),
                                round(int(cfg["dilate_px"]) * scale), round(int(cfg["feather_px"]) * scale))
            regions.append(soft)
        # 3. Each face in turn: that person's identity on the base, their region repainted.
        base = self.base()
        weight = float(cfg["identity_weight"])
        total = int(cfg["steps"]) * len(seeds) * len(faces) + 1
        done = 0

        def counted(step: int, _: int) -> None:
            progress(done + step, total)

        candidates = []
        for seed in seeds:
            current = picture
            for identity, soft in zip(identities, regions, strict=True):
                current = self._fill_face(base, current, identity, soft, seed, counted, weight)
                done += int(cfg["steps"])
            candidates.append(current)
        # 4. Rank by one-to-one face matching; safe mode; labelled PNGs.
        ranked = self.rank(candidates, identities, faces, float(settings["duo_min_similarity"]))
        progress(total, total)
        files, meta = keep_group_results(self._context, params, candidates, ranked, seeds, count)
        height, width = picture.shape[:2]
        meta.update({"template": params.get("template_id") or "photo", "people": len(paths), "size": [width, height],
                     "face_boxes": [list(map(int, f.box)) for f in faces], "identity_weight": weight})
        log.info("duo template %s: %d people, kept %d of %d candidates", meta["template"], len(paths), len(files),
                 len(candidates))
        return JobResult(files=files, meta=meta)

    def template_faces(self, path: Path, shape: tuple[int, int], people: int) -> list[Face]:
        """The template's faces left to right (found at up to DETECT_SIDE px, mapped to the working `shape`);
        exactly one per person, or the template does not fit the group."""
        assert self._detector is not None
        with Image.open(path) as im:
            im.draft("RGB", (DETECT_SIDE, DETECT_SIDE))
            image = im.convert("RGB")
        image.thumbnail((DETECT_SIDE, DETECT_SIDE))
        faces = [f.scaled(shape[1] / image.width) for f in self._detector.detect(np.asarray(image))]
        if len(faces) != people:
            raise UserFacingError("duo.template_faces", faces=len(faces), people=people)
        return sorted(faces, key=lambda f: f.box[0])

    def _fill_face(self, base: Any, picture: np.ndarray, identity: Identity, soft: np.ndarray, seed: int,
                   progress: Progress, weight: float) -> np.ndarray:
        """One face repainted with `identity` (no pose: the ControlNets sit at weight 0), the rest kept."""
        cfg = self._tryon
        height, width = picture.shape[:2]
        repaint = Image.fromarray(((soft > 0) * 255).astype(np.uint8))
        black = Image.fromarray(np.zeros_like(picture))

        def set_up() -> None:
            self.activate_loras(base, [])
            base.pipe.set_ip_adapter_scale(weight)

        set_up()
        (generated,) = self.denoise_chunks(
            base, identity, [[seed]], progress, int(cfg["steps"]), set_up, float(cfg["guidance_scale"]),
            prompt=str(cfg["prompt"]).replace("{subject}", str(self._settings["subject"])),
            negative_prompt=cfg["negative_prompt"] or None, image=Image.fromarray(picture), mask_image=repaint,
            control_image=[black, black], height=height, width=width, strength=1.0,
            num_inference_steps=int(cfg["steps"]), controlnet_conditioning_scale=[0.0, 0.0])
        return composite(picture, generated, 1.0 - soft)

    def rank(self, candidates: list[np.ndarray], identities: list[Identity], faces: list[Face],
             min_similarity: float) -> list[GroupRanked]:
        """One-to-one face matching; with the face filter off each template face's box stands in for it."""
        arcface = self._arcface
        assert arcface is not None

        def embed(image: np.ndarray, face: Any | None, person: int) -> np.ndarray:
            found = face if face is not None else faces[person]
            landmarks = landmarks_of(found)
            if landmarks is not None:
                crop = align_face(image, landmarks)
            else:
                x, y, w, h = (int(v) for v in found.box)
                crop = np.asarray(Image.fromarray(image[max(0, y):y + h, max(0, x):x + w])
                                  .resize((ARCFACE_SIZE, ARCFACE_SIZE), Image.BICUBIC))
            return arcface.embed([crop])[0]

        detector = self._detector if self._settings["face_filter"] else None
        return rank_group(candidates, detector, embed, np.stack([i.embedding for i in identities]), min_similarity)
