"""StyleMaker: a style LoRA from a maker's example pictures, then previews of the new style.

Job "style_train" (``StyleLoraPipeline``) runs in three stages:

1. **Check the set**: safe mode's checker (``facechain_core.safety``) flags none of the examples, and no
   face other than the maker's appears in more than ``max_same_face`` examples (ArcFace embeddings,
   ``facechain_core.identity``): a style must not become someone's likeness.
2. **Train** an SD1.5 LoRA on the whole pictures, each with its caption (the trigger plus the maker's
   description), through ``TrainLoraPipeline`` (resumable checkpoints, yields, cancel, progress). SDXL
   style training plugs in here: a second trainer class picked by ``params["family"]``.
3. **Previews**: the new style rendered by the portrait pipeline for each identity given (a reference
   identity the operator ships, and the maker's own).

Params::

    {"photos": [{"path": "..."}], "captions": ["zqx style, ..."], "trigger": "zqx style", "out_dir": "...",
     "max_same_face": 3, "maker_identity": "...identity.npz" | None,
     "style": {...Style as JSON...}, "previews": [{"name": "reference", "photo": "...jpg"},
                                                 {"name": "maker", "identity": "...npz", "selfies": [...]}],
     "seed": 0, ...TrainParams overrides}

Settings: ``style_train`` (defaults for the training params), ``detector_path``, ``arcface_path``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facechain_core import safety
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.identity import ArcFace, load_identity, open_arcface
from facechain_core.pipeline import JobResult, PipelineContext, Progress
from facechain_core.train_data import load_photo
from facechain_core.train_lora import TrainLoraPipeline

log = logging.getLogger(__name__)

STAGE_CHECKING = "makestyle.stage.checking"
STAGE_PREVIEWS = "makestyle.stage.previews"
SAME_PERSON = 0.45  # ArcFace cosine similarity above which two faces are taken for one person
DEFAULT_MAX_SAME_FACE = 3
DETECT_MAX_SIDE = 640  # YuNet finds faces best at moderate sizes
PREVIEW_FOLDER = "previews"
JOB_ONLY_KEYS = ("max_same_face", "maker_identity", "style", "previews", "family")


class StyleLoraPipeline(TrainLoraPipeline):
    """Job "style_train": example pictures -> a checked set -> a style LoRA -> previews."""

    kind = "style_train"
    settings_key = "style_train"

    def __init__(self) -> None:
        super().__init__()
        self._arcface: ArcFace | None = None
        self._detector: Any | None = None
        self._portrait: Any | None = None

    def load(self, context: PipelineContext) -> None:
        """Make the SD1.5 base resident and open ArcFace (the face check needs it)."""
        super().load(context)
        self._arcface = open_arcface(context)

    def run(self, params: dict[str, Any], progress: Progress) -> JobResult:
        """Check the set, train the LoRA, render the previews; return the LoRA and the preview files."""
        assert self._context is not None
        if params.get("family", "sd15") != "sd15":
            raise ValueError(f"style training runs on the sd15 family only, got {params.get('family')!r}")
        photos = list(params.get("photos") or [])
        # 1. Check the set: safe, and not one person's likeness.
        progress(0, len(photos), STAGE_CHECKING)
        images = [load_photo(Path(p["path"]), i) for i, p in enumerate(photos)]
        self._check_safety(images)
        self._check_faces(images, params.get("maker_identity"),
                          int(params.get("max_same_face", DEFAULT_MAX_SAME_FACE)))
        # 2. Train on whole pictures with per-picture captions (checkpoints, yields and cancel as identity training).
        train = {k: v for k, v in params.items() if k not in JOB_ONLY_KEYS}
        trained = super().run({**train, "crop": "whole"}, progress)
        weights = trained.files[0]
        # 3. Previews of the new style with each identity given.
        previews = self._render_previews(params, weights, progress)
        meta = {**trained.meta, "previews": [name for name, _ in previews]}
        return JobResult(files=[weights, *(path for _, path in previews)], meta=meta)

    # -- 1. checks -------------------------------------------------------------------------------
    def _check_safety(self, images: list[Image.Image]) -> None:
        assert self._context is not None
        checker = safety.checker_for(self._context)
        if checker is None:
            return
        flagged = [i + 1 for i, bad in enumerate(checker.flags(images)) if bad]
        if flagged:
            log.info("style set refused: %d example(s) flagged by the safety checker", len(flagged))
            raise UserFacingError("makestyle.unsafe", pictures=", ".join(map(str, flagged)))

    def _check_faces(self, images: list[Image.Image], maker_identity: str | None, max_same_face: int) -> None:
        """Refuse the set when one face other than the maker's is in more than `max_same_face` examples."""
        maker = None
        if maker_identity and Path(maker_identity).is_file():
            maker = load_identity(maker_identity).embedding
        faces: list[tuple[int, np.ndarray]] = []  # (example index, embedding) of every face not the maker's
        for index, image in enumerate(images):
            for embedding in self._embed_faces(image):
                if maker is not None and float(embedding @ maker) >= SAME_PERSON:
                    continue
                faces.append((index, embedding))
        worst = count_same_person(faces)
        if worst > max_same_face:
            log.info("style set refused: one face in %d examples (limit %d)", worst, max_same_face)
            raise UserFacingError("makestyle.one_person", count=worst, limit=max_same_face)

    def _embed_faces(self, image: Image.Image) -> list[np.ndarray]:
        assert self._arcface is not None
        rgb = np.asarray(image.convert("RGB"))
        return [self._arcface.embed_face(rgb, face.landmarks) for face in self.detect(image)]

    def detect(self, image: Image.Image) -> list[Any]:
        """The faces of a picture in its own pixels (detected on a copy scaled to a moderate size)."""
        scale = min(1.0, DETECT_MAX_SIDE / max(image.size))
        small = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        return [face.scaled(1 / scale) for face in self.detector().detect(np.asarray(small))]

    def detector(self) -> Any:
        """The face detector (YuNet from the manifest, or the ``detector_path`` setting), opened once."""
        if self._detector is None:
            from facechain_core.faces import create_detector

            assert self._context is not None
            path = self._context.settings.get("detector_path") or self._context.model_path("yunet", "portrait")
            if not Path(path).is_file():
                raise ModelNotInstalled("yunet", "portrait", "facechain-bot models pull yunet")
            self._detector = create_detector(self._context.settings.get("detector_kind", "yunet"), path)
        return self._detector

    # -- 3. previews -----------------------------------------------------------------------------
    def _render_previews(self, params: dict[str, Any], weights: Path, progress: Progress) -> list[tuple[str, Path]]:
        wanted = [p for p in params.get("previews") or [] if p.get("identity") or p.get("photo")]
        if not wanted or not params.get("style"):
            return []
        try:
            portrait = self._portrait_pipeline()
        except ModelNotInstalled as missing:  # the style is made all the same; its previews wait for the models
            log.warning("style previews skipped: %s is not installed", missing.details.get("model"))
            return []
        out_dir = Path(params["out_dir"]) / PREVIEW_FOLDER
        made = []
        for number, preview in enumerate(wanted):
            progress(number, len(wanted), STAGE_PREVIEWS)
            try:
                identity, selfies = self._preview_identity(preview, out_dir)
                job = {"style": params["style"], "style_id": params["style"].get("id"), "count": 1,
                       "seed": int(params.get("seed", 0)), "controls": {}, "identity": str(identity),
                       "selfies": selfies, "user_lora": None, "style_lora": str(weights),
                       "out_dir": str(out_dir / preview["name"])}
                result = portrait.run(job, _Quiet(progress))
            except UserFacingError as exc:  # no good candidate: the style stands, its preview is missing
                log.info("style preview %s not made: %s", preview["name"], exc.code)
                continue
            made.extend((preview["name"], path) for path in result.files[:1])
        progress(len(wanted), len(wanted), STAGE_PREVIEWS)
        return made

    def _preview_identity(self, preview: dict[str, Any], out_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
        """The identity file to render (built from the reference photo's largest face when needed)."""
        if preview.get("identity"):
            return Path(preview["identity"]), list(preview.get("selfies") or [])
        photo = Path(preview["photo"])
        faces = self.detect(load_photo(photo, 0))
        if not faces:
            raise UserFacingError("makestyle.reference_no_face")
        face = max(faces, key=lambda f: f.area)
        selfie = {"path": str(photo), "face": {"box": list(face.box), "landmarks": [list(p) for p in face.landmarks],
                                               "score": face.score}}
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir / f"{preview['name']}_identity.npz", [selfie]

    def _portrait_pipeline(self) -> Any:
        if self._portrait is None:
            from facechain_core.portrait import PortraitPipeline

            assert self._context is not None
            portrait = PortraitPipeline()
            portrait.load(self._context)
            self._portrait = portrait
        return self._portrait

    def close(self) -> None:
        """Close the preview pipeline and evict the training base."""
        if self._portrait is not None:
            self._portrait.close()
        self._portrait = self._arcface = self._detector = None
        super().close()


class _Quiet:
    """Passes cancel checks through during previews, without the portrait's own step counts."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        self._progress(step, total, STAGE_PREVIEWS)

    def yield_point(self) -> None:
        self._progress.yield_point()


def count_same_person(faces: list[tuple[int, np.ndarray]]) -> int:
    """The most examples any one face appears in (faces within SAME_PERSON of it, counted once per example)."""
    worst = 0
    for _, embedding in faces:
        examples = {index for index, other in faces if float(embedding @ other) >= SAME_PERSON}
        worst = max(worst, len(examples))
    return worst

