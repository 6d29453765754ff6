"""Tiny models of the real formats: each builds and loads through the stock loaders."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from facechain_core.identity import ArcFace
from facechain_core.tiny import build_ip_adapter_faceid, sd15_unet_config
from facechain_core.tiny._common import randomise_zero_weights
from tests.fixtures.tiny_models import one_torch_thread, tiny_models, tiny_models_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FACEID_PROJ_KEYS = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
IP_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
PERCEIVER_KEY = re.compile(
    r"^perceiver_resampler\.(proj_in|proj_out|norm_out)\.(weight|bias)$"
    r"|^perceiver_resampler\.layers\.[0-3]\.0\.(norm1|norm2)\.(weight|bias)$"
    r"|^perceiver_resampler\.layers\.[0-3]\.0\.(to_q|to_kv|to_out)\.weight$"
    r"|^perceiver_resampler\.layers\.[0-3]\.1\.0\.(weight|bias)$"
    r"|^perceiver_resampler\.layers\.[0-3]\.1\.[13]\.weight$"
)


def _generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe("a portrait", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images[0]


def test_sd15_folder_has_real_layout_and_generates(tiny_models):
    from diffusers import StableDiffusionPipeline

    folder = tiny_models["sd15"]
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    assert not (folder / "tokenizer" / "tokenizer.json").exists()  # the published layout has none
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ids = pipe.tokenizer("a portrait of the man").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1]
    image = _generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_sdxl_folder_generates(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"])
    assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
    image = _generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_arcface_onnx_is_named_and_shaped_like_w600k_r50(tiny_models):
    session = onnxruntime.InferenceSession(str(tiny_models["arcface"]), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "input.1" and model_input.shape[1:] == [3, 112, 112]
    batch = np.random.default_rng(0).standard_normal((3, 3, 112, 112)).astype(np.float32)
    (out,) = session.run(None, {"input.1": batch})
    assert out.shape == (3, 512)
    assert not np.allclose(out[0], out[1])  # the output depends on the input
    embeddings = ArcFace(tiny_models["arcface"]).embed([np.zeros((112, 112, 3), np.uint8)] * 2)
    assert embeddings.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


def _cross_attention_count(unet_config: dict) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    return sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))


def test_ip_adapter_faceid_uses_published_key_names(tiny_models):
    state = torch.load(tiny_models["ip_adapter_faceid_sd15"], weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert set(state["image_proj"]) == FACEID_PROJ_KEYS
    proj0 = state["image_proj"]["proj.0.weight"]
    assert proj0.shape[1] == 512 and proj0.shape[0] % 512 == 0
    keys = set(state["ip_adapter"])
    ip_ids = sorted({int(m.group(1)) for k in keys if (m := IP_KEY.match(k))})
    assert all(IP_KEY.match(k) or IP_LORA_KEY.match(k) for k in keys), sorted(keys)[:5]
    crosses = _cross_attention_count(sd15_unet_config())
    # Cross-attention processors come second in each pair: keys 1, 3, 5, ...
    assert ip_ids == list(range(1, 2 * crosses, 2))
    for key_id in ip_ids:
        assert state["ip_adapter"][f"{key_id}.to_k_ip.weight"].abs().sum() > 0


def test_ip_adapter_faceid_plus_uses_published_key_names(tiny_models):
    state = torch.load(tiny_models["ip_adapter_faceid_plus_sd15"], weights_only=True)
    proj = set(state["image_proj"])
    assert FACEID_PROJ_KEYS <= proj
    others = proj - FACEID_PROJ_KEYS
    assert others and all(PERCEIVER_KEY.match(k) for k in others), sorted(others)[:5]
    assert state["image_proj"]["proj.0.weight"].shape == (1024, 512)


def test_full_size_ip_adapter_has_published_shapes(tmp_path):
    out = build_ip_adapter_faceid(tmp_path / "ip-adapter-faceid_sd15.bin", sd15_unet_config(full_size=True),
                                  full_size=True, lora_rank=0)
    state = torch.load(out, weights_only=True)
    # ip-adapter-faceid_sd15.bin: proj.0 [1024, 512], proj.2 [3072, 1024], 16 cross-attention layers.
    assert state["image_proj"]["proj.0.weight"].shape == (1024, 512)
    assert state["image_proj"]["proj.2.weight"].shape == (3072, 1024)
    assert state["ip_adapter"]["1.to_k_ip.weight"].shape == (320, 768)
    widths = Counter(v.shape[0] for k, v in state["ip_adapter"].items() if k.endswith("to_k_ip.weight"))
    assert widths == {320: 5, 640: 5, 1280: 6}
    assert {v.shape[1] for v in state["ip_adapter"].values()} == {768}


def test_ip_adapters_load_through_stock_load_ip_adapter(tiny_models):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_models["image_encoder"])
    cases = [
        (StableDiffusionPipeline, "sd15", "ip_adapter_faceid_sd15", IPAdapterFaceIDImageProjection, {}),
        (StableDiffusionPipeline, "sd15", "ip_adapter_faceid_plus_sd15", IPAdapterFaceIDPlusImageProjection,
         {"image_encoder": encoder}),
        (StableDiffusionXLPipeline, "sdxl", "ip_adapter_faceid_sdxl", IPAdapterFaceIDImageProjection, {}),
    ]
    for cls, base, adapter, projection, extra in cases:
        pipe = cls.from_pretrained(tiny_models[base], **extra)
        path = tiny_models[adapter]
        pipe.load_ip_adapter(str(path.parent), subfolder=None, weight_name=path.name, image_encoder_folder=None)
        assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], projection), adapter
    # The FaceID LoRA inside the published file becomes the faceid_0 adapter.
    assert "faceid_0" in pipe.get_list_adapters()["unet"]


def test_ip_adapter_safetensors_form_loads(tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = build_ip_adapter_faceid(tmp_path / "faceid.safetensors", tiny_models["sd15"])
    assert all(k.startswith(("image_proj.", "ip_adapter.")) for k in load_file(out))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"])
    pipe.load_ip_adapter(str(tmp_path), subfolder=None, weight_name=out.name, image_encoder_folder=None)
    embeds = torch.nn.functional.normalize(torch.ones(1, 1, 512), dim=-1)
    image = _generate(pipe, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])])
    assert np.isfinite(image).all()


def test_lora_has_training_script_format_and_changes_the_image(tiny_models):
    from diffusers import StableDiffusionPipeline

    state = load_file(tiny_models["lora_sd15_a"])
    # What diffusers' LoRA training scripts write: convert_state_dict_to_diffusers(peft state dict).
    assert state and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in state)
    assert all(v.abs().sum() > 0 for k, v in state.items() if k.endswith(".lora.up.weight"))  # not zero-init
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"])
    plain = _generate(pipe)
    pipe.load_lora_weights(str(tiny_models["lora_sd15_a"]), adapter_name="a")
    assert np.abs(_generate(pipe) - plain).max() > 1e-3


def test_randomise_zero_weights_only_touches_zero_matrices():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    torch.nn.init.zeros_(layer[1].weight)
    torch.nn.init.zeros_(layer[1].bias)
    kept = layer[0].weight.detach().clone()
    assert randomise_zero_weights(layer) == 1
    assert layer[1].weight.abs().sum() > 0
    assert torch.equal(layer[0].weight, kept)
    assert not layer[1].bias.any()  # zero biases are a normal start, left alone


def test_build_all_returns_every_layout_entry(tiny_models):
    from facechain_core.tiny import TINY_LAYOUT

    assert set(tiny_models) == set(TINY_LAYOUT)
    assert all(Path(p).exists() for p in tiny_models.values())


def test_tiny_layout_matches_the_model_manifest_paths():
    import tomllib

    from facechain_core.tiny import TINY_LAYOUT

    manifest = Path(__file__).resolve().parent.parent / "facechain_core" / "models.toml"
    if not manifest.is_file():
        pytest.skip("no model manifest")
    paths = {m["name"]: m["path"] for m in tomllib.loads(manifest.read_text(encoding="utf-8"))["model"]}
    same = {"sd15": "sd15", "sdxl": "sdxl", "ip-adapter-faceid-sd15": "ip_adapter_faceid_sd15",
            "ip-adapter-faceid-plusv2-sd15": "ip_adapter_faceid_plus_sd15",
            "ip-adapter-faceid-sdxl": "ip_adapter_faceid_sdxl", "ip-adapter-image-encoder": "image_encoder",
            "arcface": "arcface", "real-esrgan-x2-onnx": "upscaler_x2", "real-esrgan-x4-onnx": "upscaler_x4"}
    assert {name: paths.get(name) for name in same} == {name: TINY_LAYOUT[key] for name, key in same.items()}
