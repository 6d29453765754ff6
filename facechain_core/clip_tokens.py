"""Counting prompt tokens the way Stable Diffusion's CLIP text encoders do, without any model files.

The tiny test models carry a toy vocabulary, so a prompt's real length is measured with the real CLIP
BPE vocabulary, shipped as data (``data/bpe_simple_vocab_16e6.txt.gz``, OpenAI CLIP's file as the
open_clip_torch wheel carries it, MIT; see ``data/bpe_simple_vocab_16e6.LICENSE.txt``), fed to
transformers' ``CLIPTokenizer``. SD1.5's encoder and both of SDXL's use this vocabulary and a window of
77 tokens, two of which are the start and end markers; words past the window are cut off silently.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

BPE_VOCAB = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77  # CLIP's position embeddings: the text encoder's window
MARKERS = ("<|startoftext|>", "<|endoftext|>")
# OpenAI's tokenizer keeps the first 49152 - 256 - 2 merges of the file (after its version line), so
# that byte symbols, their end-of-word forms, merges and the two markers make 49408 ids.
MERGE_COUNT = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in CLIP's id order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


@lru_cache(maxsize=2)
def clip_tokenizer(vocab_file: Path = BPE_VOCAB) -> Any:
    """Returns a transformers ``CLIPTokenizer`` built from the CLIP BPE merges file."""
    from transformers import CLIPTokenizer

    with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    words = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + list(MARKERS)
    vocab = {word: index for index, word in enumerate(words)}
    if len(vocab) != len(words):
        raise ValueError(f"{vocab_file}: the merges repeat a token; not a CLIP BPE file")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


def count_tokens(text: str) -> int:
    """Returns how many tokens `text` takes in the window, the start and end markers included."""
    return len(clip_tokenizer()(text, truncation=False)["input_ids"])
