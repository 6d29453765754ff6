"""Likeness: how much portraits look like the person, per style, train-free and with the person's own LoRA.

For a folder of selfies with one person per subfolder, the first half of each person's photos build their
identity (and train their LoRA); the other half are held out as references. Each portrait is scored by the
cosine between its face and the references' faces under SFace (OpenCV's ``FaceRecognizerSF``, manifest
``sface``: `facechain-bot models pull likeness-bench`), a recognizer other than the ArcFace that conditions and
ranks the portraits, so the figure is not the one they were optimised for. It prints the mean cosine per style
and mode; the published figures of other methods (ArcFace, other protocols) follow as context only.

    python bench/bench_likeness.py --faces selfies/ --models models/ --styles hanfu,business_headshot
    python bench/bench_likeness.py --faces selfies/ --tiny   # tiny random models: end to end, numbers meaningless

With real weights a person needs at least 2 photos (4 or more give steadier figures).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facechain_core.identity import ArcFace, build_identity, save_identity  # noqa: E402
from facechain_core.pipeline import JobResult, PipelineContext, QuietProgress  # noqa: E402
from facechain_core.styles import load_styles  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
MODES = ("train-free", "lora")
DETECT_MAX_SIDE = 640
# Published identity similarity (ArcFace cosine) of other methods, each on its own protocol: context only.
PUBLISHED = (("PuLID", 0.733), ("InstantID", 0.725), ("IP-Adapter", 0.619))
TINY_SAMPLER = {"steps": 2, "width": 64, "height": 64}
TINY_TRAIN = {"steps_per_photo": 4, "max_steps": 8, "resolution": 32, "checkpoint_every": 4}


class SFaceScorer:
    """SFace features of the largest YuNet face of a picture (the whole picture, resized, when none is found)."""

    def __init__(self, recognizer_path: Path, detector_path: Path) -> None:
        self.recognizer = cv2.FaceRecognizerSF.create(str(recognizer_path), "")
        self.detector = cv2.FaceDetectorYN.create(str(detector_path), "", (320, 320))

    def feature(self, path: Path) -> tuple[np.ndarray, bool]:
        """The picture's face feature, and whether a face was found."""
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read {path}")
        row = self.face_row(bgr)
        if row is None:
            return self.recognizer.feature(cv2.resize(bgr, (112, 112), interpolation=cv2.INTER_AREA)), False
        return self.recognizer.feature(self.recognizer.alignCrop(bgr, row)), True

    def face_row(self, bgr: np.ndarray) -> np.ndarray | None:
        height, width = bgr.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        small = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))))
        self.detector.setInputSize((small.shape[1], small.shape[0]))
        _, faces = self.detector.detect(small)
        if faces is None or not len(faces):
            return None
        row = max(faces, key=lambda f: f[2] * f[3]).copy()
        row[:14] /= scale
        return row

    def cosine(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(self.recognizer.match(a, b, cv2.FaceRecognizerSF_FR_COSINE))


@dataclass
class Person:
    name: str
    conditioning: list[Path]
    references: list[Path]
    selfies: list[dict[str, Any]] = field(default_factory=list)  # the conditioning photos with their faces


@dataclass
class Tally:
    cosines: list[float] = field(default_factory=list)
    faces: int = 0

    def line(self) -> str:
        if not self.cosines:
            return "-"
        return f"{statistics.fmean(self.cosines):.3f} ({self.faces}/{len(self.cosines)} faces)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, required=True, help="a folder with one subfolder of photos per person")
    parser.add_argument("--models", type=Path, default=Path("models"), help="models_dir (ignored with --tiny)")
    parser.add_argument("--styles", default="", help="style ids, comma-separated (default: the first two SD1.5 styles)")
    parser.add_argument("--modes", default=",".join(MODES), help="train-free, lora, or both")
    parser.add_argument("--count", type=int, default=2, help="portraits per person, style and mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float16 on a GPU")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tiny", action="store_true", help="tiny random models built on the fly (a smoke run)")
    parser.add_argument("--tiny-dir", type=Path,
                        help="with --tiny: a folder `facechain-bot models tiny DIR` filled (default: build anew)")
    parser.add_argument("--yunet", type=Path, help="the YuNet detector (default: models_dir's, or ../shared/models)")
    parser.add_argument("--scratch", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must name {' and/or '.join(MODES)}, got {args.modes!r}")
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    args.modes = modes
    return args


def people(folder: Path) -> list[Person]:
    """One person per subfolder with at least two photos: the first half condition, the rest are references."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(p for p in sub.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if len(photos) < 2:
            print(f"skipped {sub.name}: needs at least 2 photos, has {len(photos)}")
            continue
        half = (len(photos) + 1) // 2
        found.append(Person(sub.name, photos[:half], photos[half:]))
    return found


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # its DNN engine warns on every model
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_setup(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], Path, Path, Path]:
    """Pipeline settings, then the paths of YuNet, SFace and ArcFace (tiny ones built into `scratch`)."""
    from facechain_core.manifest import resolve

    yunet = args.yunet or next((p for p in (args.models / "yunet_s_640_640.onnx",
                                            ROOT.parent / "shared" / "models" / "yunet_s_640_640.onnx")
                                if p.is_file()), None)
    if yunet is None:
        raise SystemExit("no YuNet detector: pass --yunet or `facechain-bot models pull selfie`")
    if not args.tiny:
        settings = {"detector_path": str(yunet)}
        return (settings, yunet, resolve(args.models, "sface", "likeness-bench"),
                resolve(args.models, "arcface", "portrait"))
    from facechain_core.tiny import TINY_LAYOUT, build_all
    from facechain_core.tiny.sface import build_sface

    if args.tiny_dir is not None:
        tiny = {name: args.tiny_dir / rel for name, rel in TINY_LAYOUT.items()}
    else:
        tiny = build_all(scratch / "tiny")
    settings = {"sd15_path": str(tiny["sd15"]), "ip_adapter_path": str(tiny["ip_adapter_faceid_sd15"]),
                "sdxl_path": str(tiny["sdxl"]), "sdxl_ip_adapter_path": str(tiny["ip_adapter_faceid_sdxl"]),
                "arcface_path": str(tiny["arcface"]), "detector_path": str(yunet), "face_filter": False,
                "oversample": 1, "sampler_override": TINY_SAMPLER, "train": TINY_TRAIN,
                "model_paths": {"sd15": str(tiny["sd15"]), "sdxl": str(tiny["sdxl"])}}
    return settings, yunet, build_sface(scratch / "sface.onnx"), tiny["arcface"]


def find_faces(person: Person, detector: Any) -> None:
    """The conditioning photos' faces, as /train and the identity job receive them."""
    from facechain_core.identity import load_rgb

    for path in person.conditioning:
        faces = detector.detect(load_rgb(path))
        if faces:
            face = faces[0]
            person.selfies.append({"path": str(path), "face": {"box": list(face.box), "score": face.score,
                                                               "landmarks": [list(p) for p in face.landmarks]}})


def train_loras(person: Person, families: set[str], context: PipelineContext, folder: Path) -> dict[str, str]:
    """The person's LoRA per family, trained on their conditioning photos."""
    from facechain_core.train_lora import TrainLoraPipeline
    from facechain_core.train_lora_sdxl import SdxlTrainLoraPipeline

    loras = {}
    for family in sorted(families):
        trainer = TrainLoraPipeline() if family == "sd15" else SdxlTrainLoraPipeline()
        trainer.load(context)
        result = trainer.run({"photos": person.selfies, "out_dir": str(folder / "lora")}, QuietProgress())
        loras[family] = str(result.files[0])
        trainer.close()
    return loras


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from facechain_core.faces import create_detector
    from facechain_core.portrait import PortraitPipeline

    catalogue = load_styles(ROOT / "styles")
    wanted = [s.strip() for s in args.styles.split(",") if s.strip()]
    if wanted:
        styles = [catalogue.get(s) for s in wanted]
        if any(s is None for s in styles):
            raise SystemExit(f"unknown style in {wanted}")
    else:
        styles = [s for s in catalogue.only(["sd15"]) if s.lora is None][:2]
    persons = people(args.faces)
    if not persons:
        raise SystemExit(f"no person with at least 2 photos under {args.faces}")
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.scratch or Path(temporary)
        settings, yunet, sface, arcface_path = model_setup(args, scratch)
        context = PipelineContext(models_dir=args.models, device=args.device, dtype=args.dtype, settings=settings)
        scorer = SFaceScorer(sface, yunet)
        detector = create_detector("yunet", yunet)
        arcface = ArcFace(arcface_path)
        portraits = PortraitPipeline()
        portraits.load(context)
        tallies: dict[tuple[str, str], Tally] = {}
        for person in persons:
            find_faces(person, detector)
            if not person.selfies:
                print(f"skipped {person.name}: no face found in its conditioning photos")
                continue
            folder = scratch / "people" / person.name
            identity = save_identity(build_identity([(s["path"], s["face"]) for s in person.selfies], arcface),
                                     folder / "identity.npz")
            references = [scorer.feature(p)[0] for p in person.references]
            loras = train_loras(person, {s.family for s in styles}, context, folder) if "lora" in args.modes else {}
            for style in styles:
                for mode in args.modes:
                    result: JobResult = portraits.run({
                        "style": style.model_dump(mode="json"), "identity": str(identity), "count": args.count,
                        "seed": args.seed, "out_dir": str(folder / style.id / mode),
                        "user_lora": loras.get(style.family) if mode == "lora" else None}, QuietProgress())
                    tally = tallies.setdefault((style.id, mode), Tally())
                    for path in result.files:
                        feature, found = scorer.feature(path)
                        tally.cosines.append(statistics.fmean(scorer.cosine(feature, r) for r in references))
                        tally.faces += found
        portraits.close()
    report(styles, args, tallies, len(persons))
    return 0


def report(styles: list[Any], args: argparse.Namespace, tallies: dict[tuple[str, str], Tally], persons: int) -> None:
    print(f"likeness: mean SFace cosine to each person's held-out photos ({persons} people, {args.count} portraits "
          f"per person, style and mode{'; tiny random models, numbers meaningless' if args.tiny else ''})")
    width = max(len(s.id) for s in styles) + 2
    print("style".ljust(width) + "".join(mode.ljust(28) for mode in args.modes))
    for style in styles:
        print(style.id.ljust(width) + "".join(tallies.get((style.id, m), Tally()).line().ljust(28) for m in args.modes))
    published = ", ".join(f"{name} {value:.3f}" for name, value in PUBLISHED)
    print(f"context only (ArcFace cosine, each on its own protocol; not comparable): {published}")


if __name__ == "__main__":
    raise SystemExit(main())
