"""A tiny Kokoro: the real ``kokoro.model.KModel`` at a reduced configuration, exported to ONNX as the
published exports are (``KModelForONNX``, ``torch.onnx.export(dynamo=False)``: inputs ``input_ids``,
``style``, ``speed`` int32; outputs ``waveform`` and ``duration``), with random weights.

What shrinks is what Kokoro's ``config.json`` sizes: PL-BERT (32 wide, one layer), the depth of the
text and duration encoders (``n_layer`` 1), the resblocks of the vocoder (one kernel instead of three)
and ``max_dur`` (4 instead of 50, so random weights predict about two frames a token rather than 25,
and a test sentence lasts a second, not a minute). The decoder's own widths (1024 and 512 channels,
and through them ``hidden_dim`` and ``upsample_initial_channel``) are written into Kokoro's classes,
not its config, so they stay full size: the file is about 235 MB. Building needs the ``kokoro``
package (the dev extra); the service only reads the files.

Beside the model: voice packs (NPZ, float32 [510, 1, 256] a voice) and a ``config.json`` whose
``vocab`` covers the symbols our English or Mandarin phoneme paths write.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ENGLISH_VOICES = ("af_heart", "am_michael", "bf_emma")
CHINESE_VOICES = ("zf_001", "zm_009")
_PUNCTUATION = ';:,.!?—…"()“” '
_ENGLISH_SYMBOLS = (_PUNCTUATION + "AIOQTWYabcdefhijklmnopqrstuvwxyzæçðŋɐɑɔəɛɜɡɪɹɾʃʊʌʒʔʤʧˈˌθᵊ")
_CHINESE_SYMBOLS = (_PUNCTUATION + "/12345R" + "ㄅㄆㄇㄈㄉㄊㄋㄌㄍㄎㄏㄐㄑㄒㄓㄔㄕㄖㄗㄘㄙㄚㄛㄜㄝㄞㄟㄠㄡㄢㄣㄤㄥㄦㄧㄨㄩㄭ"
                    "十月压言阳要阴应用又中穵外万王为文瓮我元云" + "AIOTWbdfhklmnpstuwzæðŋəɛɪɹʃʊʌʤʧˈˌ")


def tiny_config(vocab: dict[str, int]) -> dict:
    """Kokoro v1.0's config.json with the reduced sizes (see the module docstring)."""
    return {
        "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                     "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
                     "upsample_initial_channel": 512},
        "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 4, "multispeaker": True,
        "n_layer": 1, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
        "plbert": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                   "max_position_embeddings": 512, "num_hidden_layers": 1, "dropout": 0.1},
        "vocab": vocab,
    }


def vocab_of(symbols: str) -> dict[str, int]:
    unique = list(dict.fromkeys(symbols))
    if len(unique) >= 178:
        raise ValueError(f"{len(unique)} symbols do not fit Kokoro's 178 tokens")
    return {symbol: i + 1 for i, symbol in enumerate(unique)}  # 0 is the boundary token


def build_kokoro_onnx(out_path: Path, seed: int = 0) -> Path:
    """Export the reduced KModel with random weights to `out_path`."""
    import tempfile
    import warnings

    import torch
    from kokoro.model import KModel, KModelForONNX

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Kokoro's own: weight_norm's deprecation, LSTM dropout with one layer
        empty = Path(tmp) / "random.pth"
        torch.save({}, empty)  # KModel loads its weights from a file; none: it keeps its random init
        model = KModel(repo_id="hexgrad/Kokoro-82M", config=tiny_config(vocab_of(_ENGLISH_SYMBOLS)),
                       model=str(empty), disable_complex=True).eval()
    example = (torch.LongTensor([[0, 1, 2, 3, 4, 0]]), torch.randn(1, 256), torch.tensor([1], dtype=torch.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes: the durations
        torch.onnx.export(KModelForONNX(model).eval(), example, str(out_path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "style", "speed"], output_names=["waveform", "duration"],
                          dynamic_axes={"input_ids": {1: "tokens"}, "waveform": {0: "samples"},
                                        "duration": {0: "tokens"}})
    return out_path


def build_voices(out_path: Path, voices: tuple[str, ...], seed: int = 0) -> Path:
    """Random voice packs in Kokoro's NPZ layout: float32 [510, 1, 256] per voice."""
    rng = np.random.default_rng(seed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        np.savez(f, **{v: rng.normal(0, 0.3, (510, 1, 256)).astype(np.float32) for v in voices})
    return out_path


def build_kokoro_models(out_dir: Path, onnx_path: Path | None = None) -> dict[str, Path]:
    """Both languages' files under their manifest names; they share one ONNX (the graph is language-blind).

    `onnx_path` reuses an export already built (it takes the longest)."""
    out_dir = Path(out_dir)
    onnx_path = onnx_path or build_kokoro_onnx(out_dir / "kokoro-tiny.onnx")
    files = {"kokoro-v1.0-onnx": onnx_path, "kokoro-v1.1-zh-onnx": onnx_path,
             "kokoro-v1.0-voices": build_voices(out_dir / "voices-v1.0.bin", ENGLISH_VOICES),
             "kokoro-v1.1-zh-voices": build_voices(out_dir / "voices-v1.1-zh.bin", CHINESE_VOICES, seed=1)}
    for name, symbols in (("kokoro-v1.0-config", _ENGLISH_SYMBOLS), ("kokoro-v1.1-zh-config", _CHINESE_SYMBOLS)):
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(tiny_config(vocab_of(symbols)), ensure_ascii=False), encoding="utf-8")
        files[name] = path
    return files
