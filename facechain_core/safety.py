"""Safe mode and the AI-generated label, for every pipeline that writes pictures or videos.

Safe mode runs diffusers' ``StableDiffusionSafetyChecker`` (CLIP ViT-L/14 with learned concept
embeddings; manifest model ``sd-safety-checker``, feature ``safety``) on each output before it is
written. Flagged pictures are dropped; when none is left the job fails with ``safety.flagged``.
The checker is opened once per worker and shared by the pipelines (``PipelineContext.shared``).

Pipeline settings: ``safe_mode`` (True; a job's ``params["safe_mode"] = True`` turns it on even
when the operator turned it off, never the other way), ``safety_checker_path`` (a folder; default:
the manifest's place), ``safety_required`` (False: without an installed checker pictures are sent
unchecked and a warning is logged, except for a job whose chat asked for safe mode, which is refused
with ``safety.checker_missing``; True: they are all refused), ``label_service`` (the service named
in the AI label, "FaceChain Bot").

The label (``label_image``, ``save_labelled``, ``label_video``) is written into the file itself:
PNG ``tEXt``/``iTXt`` chunks (Description, Software, AI-Generated, an XMP packet), JPEG EXIF
ImageDescription and Software plus XMP, WebP EXIF and XMP, and the MP4 ``comment`` tag. The XMP
packet carries IPTC's digital source type for media made by a trained model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.pipeline import PipelineContext

log = logging.getLogger(__name__)

FEATURE = "safety"
MODEL_NAME = "sd-safety-checker"
SHARED_KEY = "safety"  # the worker's open checker in PipelineContext.shared
FLAGGED = "safety.flagged"  # message code when every output was flagged
DEFAULT_SERVICE = "FaceChain Bot"
DEFAULTS: dict[str, Any] = {"safe_mode": True, "safety_required": False, "label_service": DEFAULT_SERVICE}
# IPTC NewsCodes "digital source type" of media created by a trained algorithmic model.
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
XMP_KEYWORD = "XML:com.adobe.xmp"  # the iTXt keyword of an XMP packet in PNG
JPEG_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
_NOT_INSTALLED = object()  # remembered in shared when the checker is missing (looked up once)


# -- the label ------------------------------------------------------------------------------------
def label_text(service: str, medium: str = "image") -> str:
    """The sentence every result carries, in English (machine-readable metadata is not translated)."""
    return f"AI-generated {medium} made by {service}"


def xmp_packet(service: str) -> str:
    """An XMP packet: description, creator tool and IPTC's digital source type."""
    text, tool = escape(label_text(service)), escape(service)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description>'
        f"<xmp:CreatorTool>{tool}</xmp:CreatorTool>"
        f"<Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )


def _exif(service: str) -> bytes:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = label_text(service)
    exif[EXIF_SOFTWARE] = service
    return exif.tobytes()


def label_options(service: str) -> dict[str, Any]:
    """The ``Image.save`` keywords that write the label: PNG text chunks and XMP (``pnginfo``), EXIF
    (JPEG, WebP, PNG eXIf) and XMP (JPEG, WebP); each writer ignores the keywords of the others."""
    info = PngInfo()
    info.add_text("Description", label_text(service))
    info.add_text("Software", service)
    info.add_text("AI-Generated", "true")
    info.add_text("DigitalSourceType", DIGITAL_SOURCE_TYPE)
    info.add_itxt(XMP_KEYWORD, xmp_packet(service))
    return {"pnginfo": info, "exif": _exif(service), "xmp": xmp_packet(service).encode()}


def _format_of(path: Path) -> str:
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"no AI label for {path.name}: expected .png, .jpg, .jpeg or .webp")
    return fmt


def save_labelled(image: Image.Image, path: Path, service: str, image_format: str | None = None,
                  **options: Any) -> Path:
    """Save `image` to `path` (format from its suffix unless given) with the AI label, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    image.save(tmp, format=image_format or _format_of(path), **{**options, **label_options(service)})
    os.replace(tmp, path)
    return path


def label_image(target: Path | Image.Image, service: str) -> Image.Image | None:
    """Label a picture as AI-generated: a PNG or JPEG file in place (PNG re-saved losslessly, JPEG
    segments inserted without re-encoding), or a PIL image, whose next ``save`` writes the label."""
    if isinstance(target, Image.Image):
        target.encoderinfo = {**getattr(target, "encoderinfo", {}), **label_options(service)}
        return target
    path = Path(target)
    fmt = _format_of(path)
    if fmt == "JPEG":
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(_jpeg_with_label(path.read_bytes(), service))
        os.replace(tmp, path)
    elif fmt == "PNG":
        with Image.open(path) as opened:
            image = opened.copy()
        save_labelled(image, path, service)
    else:
        raise ValueError(f"label {path.name} when saving it (save_labelled): re-encoding it would lose quality")
    return None


def _jpeg_with_label(data: bytes, service: str) -> bytes:
    """`data` (a JPEG) with APP1 Exif and XMP segments after its SOI/APP0, old Exif and XMP dropped."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG file")
    kept: list[bytes] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos:pos + 2 + length]
        body = segment[4:]
        is_label = segment[1] == 0xE1 and (body.startswith(b"Exif\x00\x00") or body.startswith(JPEG_XMP_HEADER))
        if not is_label:
            kept.append(segment)
        pos += 2 + length
    app0 = [s for s in kept if s[1] == 0xE0]
    rest = [s for s in kept if s[1] != 0xE0]
    label = [_app1(_exif(service)), _app1(JPEG_XMP_HEADER + xmp_packet(service).encode())]
    return b"\xff\xd8" + b"".join(app0 + label + rest) + data[pos:]


def _app1(body: bytes) -> bytes:
    if len(body) + 2 > 0xFFFF:
        raise ValueError("label segment too long")
    return b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body


def read_label(path: Path) -> dict[str, str]:
    """The label fields a file carries (none: empty): description, software, ai_generated, xmp; a video's comment."""
    path = Path(path)
    if path.suffix.lower() in (".mp4", ".m4v", ".mov", ".webm", ".mkv"):
        import av

        with av.open(str(path)) as container:
            meta = dict(container.metadata)
        return {"comment": meta["comment"]} if meta.get("comment") else {}
    found: dict[str, str] = {}
    with Image.open(path) as image:
        info = dict(image.info)
        exif = image.getexif()
    if exif.get(EXIF_IMAGE_DESCRIPTION):
        found["description"] = str(exif[EXIF_IMAGE_DESCRIPTION])
    if exif.get(EXIF_SOFTWARE):
        found["software"] = str(exif[EXIF_SOFTWARE])
    for key, name in (("Description", "description"), ("Software", "software"), ("AI-Generated", "ai_generated")):
        if isinstance(info.get(key), str):
            found[name] = info[key]
    xmp = info.get(XMP_KEYWORD) or info.get("xmp")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    if xmp:
        found["xmp"] = str(xmp)
    return found


def label_video(path: Path, service: str) -> Path:
    """Write the label into a video's ``comment`` tag (MP4: ``©cmt``), remuxed in place without re-encoding."""
    import av

    path = Path(path)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    with av.open(str(path)) as source, av.open(str(tmp), "w", format=source.format.name.split(",")[0]) as target:
        target.metadata.update({**source.metadata, "comment": label_text(service, "video")})
        streams = {}
        for stream in source.streams:
            if stream.type in ("video", "audio"):
                streams[stream.index] = target.add_stream_from_template(stream)
        for packet in source.demux(*[s for s in source.streams if s.index in streams]):
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            target.mux(packet)
    os.replace(tmp, path)
    return path


# -- the classifier -------------------------------------------------------------------------------
class SafetyChecker:
    """diffusers' StableDiffusionSafetyChecker and its CLIP image processor, on one device."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu") -> None:
        self.model = model
        self.processor = processor
        self.device = device

    @classmethod
    def open(cls, folder: Path, device: str = "cpu", dtype: str = "float32") -> SafetyChecker:
        """Load a checker folder (``config.json``, weights, ``preprocessor_config.json``)."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = Path(folder)
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
        model = StableDiffusionSafetyChecker.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        model.to(device).eval()
        log.info("opened the safety checker from %s on %s", folder, device)
        return cls(model, processor, device)

    def flags(self, images: Sequence[np.ndarray | Image.Image]) -> list[bool]:
        """Whether each RGB picture shows a flagged concept."""
        if not images:
            return []
        import torch

        pictures = [np.asarray(i.convert("RGB")) if isinstance(i, Image.Image) else np.asarray(i) for i in images]
        pixels = self.processor(images=pictures, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        placeholders = [np.zeros(1, dtype=np.uint8) for _ in pictures]  # the model blanks these, not our images
        with torch.no_grad():
            _, flagged = self.model(clip_input=pixels, images=placeholders)
        return [bool(f) for f in flagged]


@dataclass
class Screened:
    """What safe mode made of a list of candidates, best first."""

    kept: list[int]  # indexes into the candidates, in their order
    flagged: int  # candidates looked at and flagged
    checked: bool  # False: safe mode off, or no checker installed (and not required)


def settings_of(context: PipelineContext) -> dict[str, Any]:
    """The pipeline settings over the safety defaults."""
    return {**DEFAULTS, **context.settings}


def safe_mode_on(settings: dict[str, Any], params: dict[str, Any]) -> bool:
    """On unless the operator turned it off; a job's ``safe_mode: True`` (a group's choice) wins over off."""
    return bool(settings.get("safe_mode", True)) or params.get("safe_mode") is True


def service_name(context: PipelineContext) -> str:
    """The service the AI label names."""
    return str(settings_of(context)["label_service"] or DEFAULT_SERVICE)


def checker_for(context: PipelineContext, chat_asked: bool = False) -> SafetyChecker | None:
    """The worker's checker, opened on first use; None when it is not installed and not required.

    Required by the operator (``safety_required``: ModelNotInstalled), or by a chat whose admins
    turned safe mode on (`chat_asked`: ``safety.checker_missing``, whatever the operator's default).
    """
    settings = settings_of(context)
    cached = context.shared.get(SHARED_KEY)
    if isinstance(cached, SafetyChecker):
        return cached
    if cached is _NOT_INSTALLED and not (settings["safety_required"] or chat_asked):
        return None
    try:
        if settings.get("safety_checker_path"):
            folder = Path(settings["safety_checker_path"])
            folder = folder if folder.is_absolute() else context.models_dir / folder
            if not folder.exists():
                raise ModelNotInstalled(MODEL_NAME, FEATURE, f"fix safety_checker_path ({folder})")
        else:
            folder = context.model_path(MODEL_NAME, FEATURE)
    except ModelNotInstalled as missing:
        if settings["safety_required"]:
            raise
        if chat_asked:
            # This chat's admins asked for checked pictures: never send them unchecked there.
            raise UserFacingError("safety.checker_missing", pull_command=missing.details["pull_command"]) from None
        log.warning("safe mode is on but the safety checker is not installed: generated pictures go out "
                    "UNCHECKED (run `facechain-bot models pull %s`, or set safety_required = true to refuse them)",
                    FEATURE)
        context.shared[SHARED_KEY] = _NOT_INSTALLED
        return None
    checker = SafetyChecker.open(folder, context.device, context.dtype)
    context.shared[SHARED_KEY] = checker
    return checker


def screen(context: PipelineContext, params: dict[str, Any], candidates: Sequence[np.ndarray | Image.Image],
           want: int) -> Screened:
    """Pick the first `want` candidates (best first) that safe mode lets out, checking as few as needed.

    Raises ``UserFacingError("safety.flagged")`` when candidates were flagged and none is left.
    """
    if want < 1:
        raise ValueError(f"want must be at least 1, got {want}")
    order = list(range(len(candidates)))
    if not safe_mode_on(settings_of(context), params):
        return Screened(order[:want], 0, False)
    checker = checker_for(context, chat_asked=params.get("safe_mode") is True)
    if checker is None:
        return Screened(order[:want], 0, False)
    kept: list[int] = []
    flagged = 0
    start = 0
    while len(kept) < want and start < len(order):
        batch = order[start:start + want - len(kept)]
        start += len(batch)
        for index, bad in zip(batch, checker.flags([candidates[i] for i in batch]), strict=True):
            if bad:
                flagged += 1
            else:
                kept.append(index)
    if flagged:
        log.info("safe mode flagged %d of %d checked pictures (job %s)", flagged, start, params.get("job_id"))
    if not kept and flagged:
        raise UserFacingError(FLAGGED, count=flagged)
    return Screened(kept, flagged, True)


def safety_meta(screened: Screened) -> dict[str, Any]:
    """What a job result says about safe mode (the presenter tells the user about dropped pictures)."""
    return {"checked": screened.checked, "dropped": screened.flagged}
