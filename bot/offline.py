"""The pipelines without a chat: `facechain-bot portrait` and `facechain-bot train`.

Same code as the workers run, in this process: photos are checked like selfies, then the
identity, portrait and training pipelines run with a progress line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bot.config import Settings
from facechain_core.errors import UserFacingError
from facechain_core.images import encode_jpeg
from facechain_core.pipeline import PipelineContext
from facechain_core.selfie import face_record


class PrintProgress:
    """A pipeline progress callback for the terminal."""

    def __call__(self, step: int, total: int, text: str | None = None) -> None:
        print(f"\r{step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    def yield_point(self) -> None:
        """Nothing else runs here."""


def pipeline_context(settings: Settings) -> PipelineContext:
    """The context a worker would build, for this process (the GPU when there is one)."""
    import torch

    cuda = torch.cuda.is_available()
    return PipelineContext(
        models_dir=settings.models_dir, device="cuda:0" if cuda else "cpu", dtype="float16" if cuda else "float32",
        settings={**settings.pipeline, "model_paths": {k: str(v) for k, v in settings.model_paths.items()}},
    )


def checked_photos(settings: Settings, photos: list[Path], out: Path) -> list[dict[str, Any]]:
    """Checks each photo as a selfie; writes the upright copies under out/selfies/."""
    from handlers.selfie_check import lazy_selfie_checker

    check = lazy_selfie_checker(settings)
    folder = out / "selfies"
    folder.mkdir(parents=True, exist_ok=True)
    accepted = []
    for index, photo in enumerate(photos, start=1):
        try:
            result = check(photo.read_bytes())
        except UserFacingError as exc:
            raise UserFacingError(exc.code, **{**exc.details, "photo": str(photo)}) from None
        path = folder / f"{index}.jpg"
        path.write_bytes(encode_jpeg(result.image))
        accepted.append({"path": str(path.resolve()), "face": face_record(result)})
    return accepted


def _identity(settings: Settings, context: PipelineContext, photos: list[Path], out: Path) -> Path:
    """Checks the photos as selfies and builds their identity under out/identity/; returns its file."""
    from facechain_core.identity import IdentityPipeline

    selfies = checked_photos(settings, photos, out)
    identity = out / "identity" / "identity.npz"
    identity.parent.mkdir(exist_ok=True)
    _run(IdentityPipeline(), context, {"selfies": selfies, "out": str(identity)})
    return identity


def _print_ranked(result: Any) -> None:
    for path, similarity in zip(result.files, result.meta.get("similarity", []), strict=False):
        print(f"{path}  similarity {similarity:.3f}")


def _run(pipeline: Any, context: PipelineContext, params: dict[str, Any]) -> Any:
    pipeline.load(context)
    try:
        return pipeline.run(params, PrintProgress())
    finally:
        pipeline.close()


def portrait(args: argparse.Namespace, settings: Settings) -> int:
    """Portraits of the people in --photo in --style, written to --out."""
    from facechain_core.portrait import PortraitPipeline
    from facechain_core.styles import load_styles

    style = load_styles(settings.styles_dir).find(args.style)
    args.out.mkdir(parents=True, exist_ok=True)
    context = pipeline_context(settings)
    identity = _identity(settings, context, args.photo, args.out)
    lora = args.lora / "pytorch_lora_weights.safetensors" if args.lora and args.lora.is_dir() else args.lora
    result = _run(PortraitPipeline(), context, {
        "style": style.model_dump(mode="json"), "identity": str(identity), "count": args.count, "seed": args.seed,
        "out_dir": str(args.out), "user_lora": str(lora) if lora else None,
    })
    _print_ranked(result)
    return 0


def train(args: argparse.Namespace, settings: Settings) -> int:
    """Trains a user LoRA on --photo, written to --out."""
    from facechain_core.train_lora import TrainLoraPipeline

    args.out.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {"photos": checked_photos(settings, args.photo, args.out), "out_dir": str(args.out)}
    if args.steps:
        params["max_steps"] = args.steps
        params["steps_per_photo"] = args.steps
    result = _run(TrainLoraPipeline(), pipeline_context(settings), params)
    print(f"{result.files[0]}: {result.meta['steps']} steps, final loss {result.meta['final_loss']:.4f}")
    return 0


def cartoon(args: argparse.Namespace, settings: Settings) -> int:
    """Cartoonises --image in --style, written to --out."""
    from facechain_core.cartoon import CartoonPipeline

    if not args.image.is_file():
        raise FileNotFoundError(f"{args.image} is not a file")
    result = _run(CartoonPipeline(), pipeline_context(settings),
                  {"image": str(args.image), "style": args.style, "out": str(args.out)})
    meta = result.meta
    scaled = f", downscaled from {meta['downscaled_from'][0]}x{meta['downscaled_from'][1]}" \
        if meta.get("downscaled_from") else ""
    print(f"{args.out}: {meta['style']}, {meta['size'][0]}x{meta['size'][1]}, {meta['faces']} face(s){scaled}")
    return 0


def tryon(args: argparse.Namespace, settings: Settings) -> int:
    """Dresses the person of --photo in the outfit of --outfit, written to --out."""
    from facechain_core.tryon import TryOnPipeline

    if not args.outfit.is_file():
        raise FileNotFoundError(f"{args.outfit} is not a file")
    args.out.mkdir(parents=True, exist_ok=True)
    context = pipeline_context(settings)
    identity = _identity(settings, context, args.photo, args.out)
    result = _run(TryOnPipeline(), context, {"outfit": str(args.outfit), "identity": str(identity),
                                             "count": args.count, "seed": args.seed, "out_dir": str(args.out)})
    _print_ranked(result)
    return 0


def talk(args: argparse.Namespace, settings: Settings) -> int:
    """Makes the portrait of --image say --text or --audio, written to --out (MP4)."""
    from facechain_core.talk import TalkPipeline

    for path in (args.image, args.audio):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
    params: dict[str, Any] = {"image": str(args.image), "language": args.language, "round": args.round,
                              "out": str(args.out)}
    if args.audio is not None:
        params["audio"] = str(args.audio)
    else:
        params["text"] = args.text
    meta = _run(TalkPipeline(), pipeline_context(settings), params).meta
    print(f"{args.out}: {meta['duration_s']:.2f} s, {meta['frames']} frames, {meta['size'][0]}x{meta['size'][1]}, "
          f"mouth by {meta['animator']}, speech by {meta['voice']}")
    return 0
