"""/imagine TEXT: the user's identity in a scene they describe, with the studio's controls.

The prompt passes the filter (``facechain_core.prompt_filter``) before anything else: the word lists, then,
where the operator installed it (``models pull imagine-classifier``, ``[imagine] classifier``), the text
classifier (``facechain_core.prompt_classifier``), which loads in this process on the first /imagine and runs
in a thread. A refused prompt gets the reason in the user's language and creates no job. An accepted one runs
as a portrait job whose style is built from the text (SD1.5, the sampler and weights below), so Vary, Again,
the seed line and safe mode work as for /style.
"""
from __future__ import annotations

import asyncio
import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

from facechain_core.errors import ModelNotInstalled, UserFacingError
from facechain_core.manifest import resolve
from facechain_core.prompt_filter import PromptFilter
from facechain_core.styles import Style
from handlers import cartoon, portrait, registry, studio
from handlers.messages import t
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

CLASSIFIER_MODEL = "text-moderation"  # the manifest's entry, pulled as the feature below
CLASSIFIER_FEATURE = "imagine-classifier"
MAX_CHARS = 300  # CLIP reads 77 tokens; longer scenes are cut by the tokenizer anyway
COUNT = 2
IMAGINE_STYLE = {
    "id": "imagine", "family": "sd15", "identity_weight": 0.9,
    "name": {"en": "Imagine", "zh": "想象"}, "description": {"en": "Your own scene.", "zh": "你描述的场景。"},
    "negative_prompt": "lowres, blurry, deformed face, asymmetric eyes, extra fingers, bad hands, watermark, text, "
                       "nsfw, nude",
    "sampler": {"scheduler": "dpmpp_2m_karras", "steps": 30, "guidance_scale": 7.0, "width": 512, "height": 768},
}


@cache
def prompt_filter() -> PromptFilter:
    """The word lists, loaded once."""
    return PromptFilter.load()


@cache
def _filter_with_classifier(folder: str, threshold: float) -> PromptFilter:
    """The word lists with the classifier saved in `folder` (loaded once per folder and threshold)."""
    from facechain_core.prompt_classifier import TextClassifier

    log.info("loading the /imagine text classifier from %s", folder)
    return PromptFilter(prompt_filter().lists, TextClassifier(Path(folder), threshold))


def classifier_folder(services: Services) -> Path | None:
    """Where the text classifier is, when the operator wants it and it is installed (blocking: file checks)."""
    settings: Any = services.settings
    if not settings.imagine.classifier or CLASSIFIER_FEATURE not in services.features_installed:
        return None
    try:
        return resolve(settings.models_dir, CLASSIFIER_MODEL, CLASSIFIER_FEATURE,
                       {k: str(v) for k, v in settings.model_paths.items()})
    except ModelNotInstalled:
        return None


def check_prompt(services: Services, scene: str) -> str | None:
    """The category `scene` is refused for, or None (blocking: run in a thread). The word lists decide first;
    the classifier, where installed, sees what they let through."""
    folder = classifier_folder(services)
    if folder is None:
        return prompt_filter().check(scene)
    try:
        checker = _filter_with_classifier(str(folder), float(services.settings.imagine.classifier_threshold))
    except (OSError, ValueError):
        log.exception("the /imagine text classifier at %s does not load; prompts pass the word lists only", folder)
        return prompt_filter().check(scene)
    return checker.check(scene)


def imagine_style(scene: str) -> Style:
    """A one-off style whose prompt is the user's scene around their identity."""
    clean = re.sub(r"[{}\s]+", " ", scene).strip()
    return Style.model_validate({**IMAGINE_STYLE, "prompt": f"photo of {{subject}}, {clean}, detailed face, "
                                                            "natural light, best quality"})


async def make_imagine(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Checks the scene against the prompt filter, then queues portraits of the user in it."""
    controls = studio.parse_controls(event.args)
    scene = " ".join(controls.words).strip()
    if not scene:
        raise UserFacingError("imagine.usage")
    if len(scene) > MAX_CHARS:
        raise UserFacingError("imagine.too_long", max=MAX_CHARS)
    category = await asyncio.to_thread(check_prompt, services, scene)
    if category is not None:
        log.info("/imagine refused for %s: %s", event.user.key, category)
        await channel.send_text(t("imagine.refused", event.language,
                                  reason=t(f"imagine.reason.{category}", event.language)))
        return
    pose_photo = None
    if controls.pose == studio.POSE_PHOTO:
        pose_photo = await cartoon.command_source_for(services, event, "pose")
        if pose_photo is None:
            raise UserFacingError("pose.send_photo")
    await portrait.submit_portrait(services, event, channel, imagine_style(scene), COUNT, controls, pose_photo,
                                   extra={"imagine": scene})


registry.register_command("imagine", make_imagine, "help.imagine")
