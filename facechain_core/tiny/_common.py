"""Helpers shared by the tiny-model builders: seeding, de-zeroing, a tiny CLIP tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# CLIP's byte-level BPE maps every byte to a printable character; the tiny vocabulary holds each
# one as a word piece and as a word end so any prompt tokenises without unknowns.
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer_files(out_dir: Path) -> int:
    """Write a tiny CLIP tokenizer (vocab.json, merges.txt, configs) and return its vocab size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode():
        vocab[ch + "</w>"] = len(vocab)
    # A few merges so the BPE path is exercised like the real 49k-token vocabulary.
    merges = ["t h", "th e</w>", "a n", "p o", "r t"]
    for pair in merges:
        vocab.setdefault(pair.replace(" ", ""), len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return len(vocab)


def special_ids(vocab_size: int) -> dict[str, int]:
    """Return bos/eos/pad ids of the tiny vocabulary (the last two entries, as in CLIP)."""
    return {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}


@torch.no_grad()
def randomise_zero_weights(module: nn.Module, std: float = 0.02) -> int:
    """Re-initialise every all-zero weight matrix so layers that train from zero still act in tests."""
    count = 0
    for name, param in module.named_parameters():
        if param.ndim >= 2 and not torch.any(param):
            param.normal_(0.0, std)
            count += 1
    return count
