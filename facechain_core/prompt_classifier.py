"""The optional text classifier behind /imagine's word lists: a transformers sequence classifier whose labels map
onto the prompt filter's categories (``facechain_core.prompt_filter.CATEGORIES``).

The manifest's ``text-moderation`` (KoalaAI/Text-Moderation, ``models pull imagine-classifier``) labels a text
S (sexual), S3 (sexual/minors), H and H2 (hate), V and V2 (violence), SH (self-harm), HR (harassment) or OK.
The probabilities of the labels mapped to one category are added up; the most probable category refuses the
prompt when it reaches the threshold. Labels outside ``LABELS`` (OK, HR) refuse nothing: harassment of a
person is not what a picture of the user themself shows. transformers and torch are imported when a classifier
is loaded, never with this module.
"""
from __future__ import annotations

import threading
from pathlib import Path
from facechain_core.prompt_filter import CATEGORIES

LABELS: dict[str, str] = {
    "S": "sexual", "S3": "minors", "H": "hate", "H2": "hate", "V": "violence", "V2": "violence", "SH": "self_harm",
    # binary NSFW prompt classifiers
    "NSFW": "sexual", "UNSAFE": "sexual",
}
MAX_TOKENS = 128  # a prompt is at most imagine.MAX_CHARS characters
DEFAULT_THRESHOLD = 0.6


class TextClassifier:
    """A sequence classifier from a folder saved by ``save_pretrained``: ``classifier(text)`` -> category or None."""

    def __init__(self, folder: Path, threshold: float = DEFAULT_THRESHOLD) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no loading bars in the bot's log
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be within (0, 1], got {threshold}")
        self.threshold = threshold
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        labels = self._model.config.id2label
        self._categories = [LABELS.get(str(labels[i]).upper()) for i in range(len(labels))]
        unknown = sorted({c for c in self._categories if c is not None} - set(CATEGORIES))
        if unknown:
            raise ValueError(f"classifier labels map to unknown categories {unknown}")
        if not any(self._categories):
            raise ValueError(f"none of the classifier's labels {sorted(map(str, labels.values()))} is one of "
                             f"{sorted(LABELS)}: it could refuse nothing")
        self._lock = threading.Lock()  # one call at a time: the bot's threads share the model

    def scores(self, text: str) -> dict[str, float]:
        """The probability of each refused category for `text`."""
        import torch

        with self._lock, torch.inference_mode():
            inputs = self._tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)
            probabilities = self._model(**inputs).logits.float().softmax(dim=-1)[0].tolist()
        found: dict[str, float] = {}
        for category, probability in zip(self._categories, probabilities):
            if category is not None:
                found[category] = found.get(category, 0.0) + probability
        return found

    def __call__(self, text: str) -> str | None:
        """The category `text` is refused for, or None."""
        scores = self.scores(text)
        category = max(scores, key=scores.__getitem__)
        return category if scores[category] >= self.threshold else None

