"""IP-Adapter FaceID weights with the published key names, sized for a given UNet.

The published ``ip-adapter-faceid_sd15.bin`` holds ``{"image_proj": {...}, "ip_adapter": {...}}``:
``image_proj`` is ``proj.0/proj.2/norm`` (FaceID) or those plus ``perceiver_resampler.*`` (FaceID
Plus); ``ip_adapter`` has ``N.to_k_ip/to_v_ip`` for each cross-attention processor (odd N) and a
LoRA (``N.to_q_lora.down`` ...) on every attention processor, which diffusers loads as ``faceid_0``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from facechain_core.tiny.lora import unet_config_of

log = logging.getLogger(__name__)

ID_EMBEDDING_DIM = 512  # ArcFace
NUM_TOKENS = 4  # diffusers fixes FaceID adapters at four image tokens
PERCEIVER_DEPTH = 4
DIM_HEAD = 64


def _attention_shapes(unet_config: dict[str, Any]) -> list[tuple[str, int, int | None]]:
    """Return (processor name, hidden size, cross-attention dim or None) in the UNet's processor order."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    shapes = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        cross = None if name.endswith("attn1.processor") else attn.to_k.in_features
        shapes.append((name, attn.to_q.in_features, cross))
    return shapes


def _rand(*shape: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape) * std


def _layer_norm(prefix: str, dim: int, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"] = 1.0 + _rand(dim)
    out[f"{prefix}.bias"] = _rand(dim)


def _faceid_projection(cross_dim: int, inner: int) -> dict[str, torch.Tensor]:
    proj: dict[str, torch.Tensor] = {
        "proj.0.weight": _rand(inner, ID_EMBEDDING_DIM, std=0.05),
        "proj.0.bias": _rand(inner),
        "proj.2.weight": _rand(cross_dim * NUM_TOKENS, inner, std=0.05),
        "proj.2.bias": _rand(cross_dim * NUM_TOKENS),
    }
    _layer_norm("norm", cross_dim, proj)
    return proj


def _perceiver(cross_dim: int, clip_dim: int) -> dict[str, torch.Tensor]:
    """FacePerceiverResampler weights as IP-Adapter's ProjPlusModel names them."""
    heads = max(1, cross_dim // DIM_HEAD)
    inner = heads * DIM_HEAD
    p = "perceiver_resampler"
    # Wider than training's init so that, in tests, the face crop visibly steers the image.
    out: dict[str, torch.Tensor] = {
        f"{p}.proj_in.weight": _rand(cross_dim, clip_dim, std=0.3), f"{p}.proj_in.bias": _rand(cross_dim),
        f"{p}.proj_out.weight": _rand(cross_dim, cross_dim, std=0.3), f"{p}.proj_out.bias": _rand(cross_dim),
    }
    _layer_norm(f"{p}.norm_out", cross_dim, out)
    for i in range(PERCEIVER_DEPTH):
        layer = f"{p}.layers.{i}"
        _layer_norm(f"{layer}.0.norm1", cross_dim, out)
        _layer_norm(f"{layer}.0.norm2", cross_dim, out)
        out[f"{layer}.0.to_q.weight"] = _rand(inner, cross_dim, std=0.2)
        out[f"{layer}.0.to_kv.weight"] = _rand(2 * inner, cross_dim, std=0.2)
        out[f"{layer}.0.to_out.weight"] = _rand(cross_dim, inner, std=0.2)
        _layer_norm(f"{layer}.1.0", cross_dim, out)
        out[f"{layer}.1.1.weight"] = _rand(4 * cross_dim, cross_dim, std=0.1)
        out[f"{layer}.1.3.weight"] = _rand(cross_dim, 4 * cross_dim, std=0.1)
    return out


def _attention_weights(shapes: list[tuple[str, int, int | None]], lora_rank: int,
                       ip_std: float = 0.1) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key_id, (_, hidden, cross) in enumerate(shapes):
        if cross is not None:
            # Real training starts these from the text projections; random keeps them non-trivial.
            out[f"{key_id}.to_k_ip.weight"] = _rand(hidden, cross, std=ip_std)
            out[f"{key_id}.to_v_ip.weight"] = _rand(hidden, cross, std=ip_std)
        if lora_rank:
            kv_in = cross or hidden
            for proj, in_dim in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
                out[f"{key_id}.{proj}_lora.down.weight"] = _rand(lora_rank, in_dim, std=0.05)
                # Zero-initialised in training ("up"); random here so the LoRA path is exercised.
                out[f"{key_id}.{proj}_lora.up.weight"] = _rand(hidden, lora_rank, std=0.05)
    return out


def build_ip_adapter_faceid(out: Path, unet_config: dict[str, Any] | Path | str, *, plus: bool = False,
                            clip_dim: int = 1280, lora_rank: int = 4, full_size: bool = False,
                            seed: int = 0, ip_std: float = 0.1) -> Path:
    """Write IP-Adapter FaceID (or FaceID Plus v2) weights for the UNet and return the file path.

    ``ip_std`` spreads the image keys and values (to_k_ip/to_v_ip): wider, the identity steers more.

    ``out`` ending in ``.bin`` is a ``torch.save`` of the nested dict (the published format);
    ``.safetensors`` is the flat form with ``image_proj.``/``ip_adapter.`` prefixes.
    """
    out = Path(out)
    config = unet_config_of(unet_config)
    torch.manual_seed(seed)
    cross_dim = int(config["cross_attention_dim"])
    if plus:
        # diffusers builds the Plus ID projection with a fixed 2x (1024-wide) hidden layer.
        image_proj = {**_faceid_projection(cross_dim, 2 * ID_EMBEDDING_DIM), **_perceiver(cross_dim, clip_dim)}
    else:
        image_proj = _faceid_projection(cross_dim, (2 if full_size else 1) * ID_EMBEDDING_DIM)
    state = {"image_proj": image_proj, "ip_adapter": _attention_weights(_attention_shapes(config), lora_rank, ip_std)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".bin":
        torch.save(state, out)
    elif out.suffix == ".safetensors":
        flat = {f"{group}.{key}": value.contiguous()
                for group, tensors in state.items() for key, value in tensors.items()}
        save_file(flat, str(out))
    else:
        raise ValueError(f"out must end in .bin or .safetensors, got {out}")
    log.info("built IP-Adapter FaceID%s at %s", " Plus" if plus else "", out)
    return out
