"""`facechain-bot styles previews`: one picture per style of a reference identity, cached by the style's hash.

The identity is the operator's --face photos, or the public-domain photo shipped with the bot
(``facechain_core/data/reference_face.jpg``, see its .txt). Each preview lands in
``data_dir/previews/<id>-<content hash>.jpg``; a cached one is kept until the style changes (or --force),
and older previews of the same style are removed. Previews pass safe mode as the operator set it for
portraits ([pipeline] safe_mode), as every user may see them. `/styles` shows them (handlers/portrait.py).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image

from bot.config import Settings
from bot.offline import PrintProgress, _identity, pipeline_context
from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.images import downscale, encode_jpeg
from facechain_core.styles import Style, load_styles, preview_path

REFERENCE_FACE = Path(__file__).resolve().parent.parent / "facechain_core" / "data" / "reference_face.jpg"
PREVIEW_SIDE = 512  # long side of a cached preview: album thumbnails, not prints
PREVIEW_QUALITY = 88


def _chosen(settings: Settings, ids: list[str] | None) -> list[Style]:
    catalogue = load_styles(settings.styles_dir)
    return [catalogue.find(query) for query in ids] if ids else list(catalogue)


def _store(png: Path, target: Path) -> None:
    """Writes the portrait as the style's preview (atomically) and drops the style's older previews."""
    with Image.open(png) as image:
        data = encode_jpeg(downscale(image, PREVIEW_SIDE), PREVIEW_QUALITY)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    os.replace(partial, target)
    style_id = target.stem.rsplit("-", 1)[0]
    for old in target.parent.glob(f"{style_id}-*.jpg"):
        if old != target and old.stem.rsplit("-", 1)[0] == style_id:
            old.unlink()


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Renders the missing previews; prints one line per style; exit 1 when a style failed for another
    reason than its models not being installed."""
    from facechain_core.portrait import PortraitPipeline

    styles = _chosen(settings, args.style)
    todo = [s for s in styles if args.force or not preview_path(settings.data_dir, s).is_file()]
    for style in styles:
        if style not in todo:
            print(f"cached    {style.id:<28} {preview_path(settings.data_dir, style)}")
    if not todo:
        print(f"all {len(styles)} previews are cached under {settings.data_dir / 'previews'}")
        return 0
    faces = args.face or [REFERENCE_FACE]
    context = pipeline_context(settings)
    failed = skipped = 0
    with tempfile.TemporaryDirectory(prefix="previews-") as scratch:
        work = Path(scratch)
        identity = _identity(settings, context, faces, work)
        pipeline = PortraitPipeline()
        pipeline.load(context)
        try:
            for style in todo:
                target = preview_path(settings.data_dir, style)
                try:
                    result = pipeline.run({"style": style.model_dump(mode="json"), "identity": str(identity),
                                           "count": 1, "seed": args.seed, "out_dir": str(work / style.id)},
                                          PrintProgress())
                except ModelNotInstalled as exc:
                    skipped += 1
                    print(f"skipped   {style.id:<28} not installed: {exc.details.get('model')} "
                          f"({exc.details.get('pull_command')})")
                    continue
                except UserFacingError as exc:
                    failed += 1
                    print(f"failed    {style.id:<28} [{exc.code}]")
                    continue
                _store(result.files[0], target)
                print(f"rendered  {style.id:<28} {target}")
        finally:
            pipeline.close()
    rendered = len(todo) - failed - skipped
    print(f"{rendered} rendered, {len(styles) - len(todo)} cached, {skipped} skipped, {failed} failed")
    return 1 if failed else 0
