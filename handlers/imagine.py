"""/imagine TEXT: the user's identity in a scene they describe, with the studio's controls.

The prompt passes the filter (``facechain_core.prompt_filter``) before anything else: a refused prompt gets
the reason in the user's language and creates no job. An accepted one runs as a portrait job whose style is
built from the text (SD1.5, the sampler and weights below), so Vary, Again, the seed line and safe mode work
as for /style.
"""
from __future__ import annotations

import logging
import re
from functools import cache

from facechain_core.errors import UserFacingError
from facechain_core.prompt_filter import PromptFilter
from facechain_core.styles import Style
from handlers import portrait, registry, studio
from handlers.messages import t
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

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
    category = prompt_filter().check(scene)
    if category is not None:
        log.info("/imagine refused for %s: %s", event.user.key, category)
        await channel.send_text(t("imagine.refused", event.language,
                                  reason=t(f"imagine.reason.{category}", event.language)))
        return
    pose_photo = await portrait.pose_source(services, event) if controls.pose == studio.POSE_PHOTO else None
    if controls.pose == studio.POSE_PHOTO and pose_photo is None:
        raise UserFacingError("pose.send_photo")
    await portrait.submit_portrait(services, event, channel, imagine_style(scene), COUNT, controls, pose_photo,
                                   extra={"imagine": scene})


registry.register_command("imagine", make_imagine, "help.imagine")
