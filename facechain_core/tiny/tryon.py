"""Tiny models of the try-on formats: SD1.5 inpainting, ControlNets, a SegFormer clothes parser (the
DWPose-shaped pose model is ``tiny.pose``).

* ``build_sd15_inpaint`` - a ``StableDiffusionInpaintPipeline`` folder whose UNet takes 9 input channels
  (latents 4 + mask 1 + masked-image latents 4), the layout of stable-diffusion-inpainting.
* ``build_controlnet`` - a ``ControlNetModel`` folder for that UNet (the layout of the SD1.5 depth and
  openpose ControlNets); its zero convolutions are random so the control image acts in tests.
* ``build_clothes_parser`` - ``SegformerForSemanticSegmentation`` + ``SegformerImageProcessor`` with
  the 18 labels of mattmdjaga/segformer_b2_clothes. Random weights would segment noise, so the
  classifier (a 1x1 conv over the decode head's fused features) is fitted for a few hundred steps to
  label the flat colours of ``draw_outfit`` pictures: the parsing code path then yields a real,
  predictable garment region on synthetic photos.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionInpaintPipeline, UNet2DConditionModel

from facechain_core.tiny._common import randomise_zero_weights
from facechain_core.tiny.pose import build_pose
from facechain_core.tiny.sd import build_sd15, sd15_unet_config

log = logging.getLogger(__name__)

# The id2label of mattmdjaga/segformer_b2_clothes (its config.json, as its model card lists them).
CLOTHES_LABELS: dict[int, str] = {
    0: "Background", 1: "Hat", 2: "Hair", 3: "Sunglasses", 4: "Upper-clothes", 5: "Skirt", 6: "Pants",
    7: "Dress", 8: "Belt", 9: "Left-shoe", 10: "Right-shoe", 11: "Face", 12: "Left-leg", 13: "Right-leg",
    14: "Left-arm", 15: "Right-arm", 16: "Bag", 17: "Scarf",
}
# draw_outfit's flat colours and the label each stands for.
PALETTE: dict[str, tuple[tuple[int, int, int], int]] = {
    "background": ((120, 170, 120), 0),
    "hair": ((40, 25, 15), 2),
    "face": ((225, 180, 150), 11),
    "upper": ((200, 30, 40), 4),
    "pants": ((30, 50, 170), 6),
    "arm": ((215, 170, 140), 14),
}
PARSER_SIZE = 128  # the tiny processor's input side (the real one resizes to 512x512)


def build_sd15_inpaint(out_dir: Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """Build an SD1.5-inpainting-layout folder (9-channel UNet) with random weights (full_size: real dimensions)."""
    out_dir = Path(out_dir)
    base = out_dir.with_name(out_dir.name + ".base")
    build_sd15(base, full_size=full_size, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**{**sd15_unet_config(full_size), "in_channels": 9})
    randomise_zero_weights(unet)
    from diffusers import StableDiffusionPipeline

    text2img = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe = StableDiffusionInpaintPipeline(
        vae=text2img.vae, text_encoder=text2img.text_encoder, tokenizer=text2img.tokenizer, unet=unet,
        scheduler=text2img.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    import shutil

    shutil.rmtree(out_dir / "tokenizer")
    shutil.copytree(base / "tokenizer", out_dir / "tokenizer")
    shutil.rmtree(base)
    log.info("built SD1.5 inpainting layout at %s", out_dir)
    return out_dir


def build_controlnet(out_dir: Path, unet_folder: Path, *, seed: int = 0, std: float = 0.5) -> Path:
    """Build a ControlNet for the UNet in `unet_folder` (a pipeline folder or its unet/) and return its path."""
    out_dir = Path(out_dir)
    folder = Path(unet_folder)
    folder = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = UNet2DConditionModel.from_pretrained(folder)
    torch.manual_seed(seed)
    # The real ControlNets downsample the control image 8x to the latent size; the tiny VAE halves it.
    levels = len(AutoencoderKL.load_config(folder.parent / "vae")["block_out_channels"]) \
        if (folder.parent / "vae").is_dir() else 4
    channels = (16, 32, 96, 256)[:levels]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    if controlnet.config.in_channels != 4:
        controlnet = ControlNetModel(**{**controlnet.config, "in_channels": 4})
    randomise_zero_weights(controlnet, std=std)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    log.info("built ControlNet at %s", out_dir)
    return out_dir


def draw_outfit(side: int = 64, *, arm_angle: float = 0.0, shift: int = 0, seed: int = 0) -> np.ndarray:
    """Draw a flat-colour person (hair, face, shirt, trousers, arms) on grey; returns RGB uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    colour = {name: c for name, (c, _) in PALETTE.items()}
    image = np.empty((side, side, 3), np.uint8)
    image[:] = colour["background"]
    s = side / 64.0
    cx = side // 2 + shift

    def pt(x: float, y: float) -> tuple[int, int]:
        return int(round(cx + x * s)), int(round(y * s))

    for sign in (-1, 1):  # arms from the shoulders, raised by arm_angle (radians)
        angle = np.pi / 2 - sign * arm_angle
        end = (sign * 11 + sign * 20 * np.cos(angle) * 0.5, 22 + 20 * np.sin(angle))
        cv2.line(image, pt(sign * 11, 22), pt(*end), colour["arm"], max(2, int(4 * s)))
    cv2.rectangle(image, pt(-10, 20), pt(10, 40), colour["upper"], -1)
    cv2.rectangle(image, pt(-9, 40), pt(9, 60), colour["pants"], -1)
    cv2.rectangle(image, pt(-1, 46), pt(1, 60), colour["background"], -1)  # between the legs
    cv2.ellipse(image, pt(0, 13), (int(7 * s), int(9 * s)), 0, 0, 360, colour["hair"], -1)
    cv2.ellipse(image, pt(0, 14), (int(6 * s), int(7 * s)), 0, 0, 360, colour["face"], -1)
    noise = rng.normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _outfit_labels(image: np.ndarray) -> np.ndarray:
    """Label each pixel of a draw_outfit picture by its nearest palette colour."""
    colours = np.array([c for c, _ in PALETTE.values()], np.float32)
    labels = np.array([label for _, label in PALETTE.values()])
    dist = ((image[:, :, None, :].astype(np.float32) - colours[None, None]) ** 2).sum(-1)
    return labels[dist.argmin(-1)]


def build_clothes_parser(out_dir: Path, *, seed: int = 0, fit_steps: int = 300) -> Path:
    """Build a tiny SegFormer clothes parser (real label layout) fitted to draw_outfit colours."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1],
        hidden_sizes=[16, 32, 32, 32], num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32,
        id2label={i: n for i, n in CLOTHES_LABELS.items()}, label2id={n: i for i, n in CLOTHES_LABELS.items()},
    )
    model = SegformerForSemanticSegmentation(config).eval()
    processor = SegformerImageProcessor(size={"height": PARSER_SIZE, "width": PARSER_SIZE}, do_reduce_labels=False)
    _fit_classifier(model, processor, fit_steps, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    log.info("built clothes parser at %s", out_dir)
    return out_dir


def _fit_classifier(model: torch.nn.Module, processor: object, steps: int, seed: int) -> None:
    """Fit the decode head's 1x1 classifier so the parser labels draw_outfit pictures by colour."""
    import torch.nn.functional as F

    pictures = [draw_outfit(PARSER_SIZE, arm_angle=a, shift=sh, seed=seed + i)
                for i, (a, sh) in enumerate([(0.0, 0), (0.8, -6), (-0.5, 5), (1.2, 3), (0.3, -3), (0.6, 8)])]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]  # type: ignore[operator]
    features: list[torch.Tensor] = []
    head = model.decode_head  # type: ignore[attr-defined]
    handle = head.classifier.register_forward_hook(lambda mod, inp, out: features.append(inp[0].detach()))
    with torch.no_grad():
        model(pixel_values=pixels)
    handle.remove()
    fused = features[0]
    side = fused.shape[-1]
    targets = torch.from_numpy(np.stack([_outfit_labels(p) for p in pictures])).long()
    targets = F.interpolate(targets[:, None].float(), size=(side, side), mode="nearest")[:, 0].long()
    classifier = head.classifier
    # Small parts (face, arms) would drown in the background: weigh classes by inverse frequency.
    counts = torch.bincount(targets.flatten(), minlength=len(CLOTHES_LABELS)).float()
    weights = torch.where(counts > 0, counts.sum() / (counts * (counts > 0).sum()).clamp(min=1), 0.0)
    optimiser = torch.optim.Adam(classifier.parameters(), lr=0.05)
    loss = torch.zeros(())
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(classifier(fused), targets, weight=weights)
        loss.backward()
        optimiser.step()
    log.debug("clothes parser fitted, loss %.3f", loss.item())


# Where build_tryon_models puts each model: the manifest's paths (models.toml), as tiny.TINY_LAYOUT.
TRYON_LAYOUT: dict[str, str] = {
    "sd15-inpainting": "sd15-inpainting",
    "controlnet-openpose-sd15": "controlnet/control_v11p_sd15_openpose",
    "controlnet-depth-sd15": "controlnet/control_v11f1p_sd15_depth",
    "dwpose-wholebody": "dwpose/dw-ll_ucoco_384.onnx",
    "segformer-clothes": "segformer_b2_clothes",
}


def build_tryon_models(out_dir: Path, *, full_size: bool = False) -> dict[str, Path]:
    """Build the tiny try-on models under out_dir at their manifest paths; returns {model name: path}.

    The IP-Adapter FaceID and ArcFace of the portraits (``tiny.build_all``) serve try-on too.
    ``full_size`` gives the inpainting base and the ControlNets the real dimensions (for timing).
    """
    out_dir = Path(out_dir)
    at = {name: out_dir / rel for name, rel in TRYON_LAYOUT.items()}
    build_sd15_inpaint(at["sd15-inpainting"], full_size=full_size)
    build_controlnet(at["controlnet-openpose-sd15"], at["sd15-inpainting"], seed=1)
    build_controlnet(at["controlnet-depth-sd15"], at["sd15-inpainting"])
    build_pose(at["dwpose-wholebody"])
    build_clothes_parser(at["segformer-clothes"])
    return at
