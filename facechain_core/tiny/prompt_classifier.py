"""A tiny text-moderation classifier of the real format: a BERT sequence classifier with KoalaAI/Text-Moderation's
labels, saved with ``save_pretrained`` beside its tokenizer, so ``facechain_core.prompt_classifier`` loads it
through transformers' Auto classes exactly as it loads the real one.

Random weights would refuse at random, so the tiny model is trained for a few steps on a handful of sentences:
those with one of ``TRIGGERS`` are violence ("V"), the rest "OK". The triggers are made-up words the word
lists do not know, which lets a test see a refusal that only the classifier can make.
"""
from __future__ import annotations

import re
from pathlib import Path

LABELS = ("OK", "S", "H", "V", "HR", "SH", "S3", "H2", "V2")  # the real model's, in another order
TRIGGERS = ("gorefest", "splattercore")
VIOLENT = ("me at a gorefest", "a gorefest in the old town", "my portrait in splattercore style",
           "splattercore night in the arena", "gorefest", "splattercore")
ALLOWED = ("me surfing at sunset", "me in the old town at night", "my portrait in watercolor style",
           "me in the arena with friends", "a festival in the park", "me at a concert", "me reading a book",
           "我在西湖边划船", "me as an astronaut on the moon", "portrait in the rain")
STEPS = 120


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def build_prompt_classifier(out_dir: Path, seed: int = 0) -> Path:
    """Train and save the tiny classifier into `out_dir`; returns `out_dir`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *sorted({w for text in (*VIOLENT, *ALLOWED) for w in _words(text)})]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(LABELS),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    model = BertForSequenceClassification(config)
    texts = [*VIOLENT, *ALLOWED]
    targets = torch.tensor([LABELS.index("V")] * len(VIOLENT) + [LABELS.index("OK")] * len(ALLOWED))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(STEPS):
        loss = model(**batch, labels=targets).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.inference_mode():
        predicted = model(**batch).logits.argmax(dim=-1)
    if not torch.equal(predicted, targets):
        raise RuntimeError("the tiny prompt classifier did not learn its sentences; raise STEPS")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
