"""Fast mode as users and operators choose it: ``/style hanfu fast``, the panel's "Fast" row, Discord's option.

The user's choice is a studio control (``fast``, ``fast:off``; ``快速``, ``快速:关``) kept in the job's
controls; the operator's default is ``[pipeline] fast_mode`` ("off", "on", or "auto": fast while more than
``fast_auto_queue`` jobs wait). Both are settled when the job is queued, by an admission check that writes
``params["fast"]`` (true or false) for the kinds fast mode serves; the pipelines read nothing else
(``facechain_core.accelerators``). Where fast mode was wanted but cannot run (the style opts out, the
accelerator cannot inpaint for try-on and templates, its models are not installed) the job runs normally
and its caption says why; a job that ran fast says so too.
"""
from __future__ import annotations

import logging
from typing import Any

from facechain_core.accelerators import CHOICES, accelerators, decide_fast
from facechain_core.errors import UserFacingError
from handlers import hooks, studio, studio_panel
from handlers.messages import t
from handlers.protocols import Event
from handlers.services import Services

log = logging.getLogger(__name__)

# Job kind -> (needs an inpainting base, needs ControlNets); a portrait needs ControlNets only with a pose.
FAST_KINDS: dict[str, tuple[bool, bool]] = {"portrait": (False, False), "template": (True, True),
                                           "tryon": (True, True)}
FAST_WORDS = {"on": "on", "off": "off", "yes": "on", "no": "off", "开": "on", "开启": "on", "是": "on",
              "关": "off", "關": "off", "关闭": "off", "否": "off"}
BARE_WORDS = ("fast", "快速")
NOTE_KEY = "fast_note"  # params: the message code saying why a wanted fast mode did not run


def _read_fast(value: str) -> str:
    found = FAST_WORDS.get(value.casefold())
    if found is None:
        raise UserFacingError("studio.bad_fast")
    return found


def user_choice(params: dict[str, Any]) -> str | None:
    """The user's "on"/"off" for a job: a control, or the panel's choice on a result's job (a string in
    ``params["fast"]``; a true/false there is an earlier decision, not a choice)."""
    choice = (params.get("controls") or {}).get("fast")
    if choice is None and isinstance(params.get("fast"), str):
        choice = params["fast"]
    return choice if choice in CHOICES else None


def _queue_length(services: Services) -> int:
    length = getattr(services.jobs, "queue_length", None)
    return int(length()) if callable(length) else 0


def skip_reason(services: Services, kind: str, params: dict[str, Any]) -> str | None:
    """Why a job that wants fast mode runs normally (a message code), or None when it can run fast."""
    settings = services.settings.pipeline or {}
    accelerator = accelerators().get(settings.get("fast_accelerator"))
    style = params.get("style") or {}
    family = style.get("family", "sd15") if kind == "portrait" else "sd15"
    if kind == "portrait" and style.get("fast") is False:
        return "fast.skipped_style"
    inpainting, controlnet = FAST_KINDS[kind]
    controlnet = controlnet or bool((params.get("controls") or {}).get("pose"))
    if not accelerator.supports(family, inpainting=inpainting, controlnet=controlnet):
        return "fast.skipped_unsupported"
    if accelerator.features[family] not in services.features_installed:
        return "fast.skipped_not_installed"
    return None


async def settle_fast(services: Services, event: Event, kind: str, params: dict[str, Any]) -> hooks.Admission | None:
    """Writes the job's fast-mode decision (the user's choice, else the operator's default) into its params."""
    if kind not in FAST_KINDS:
        return None
    settings = services.settings.pipeline or {}
    wanted = decide_fast(settings, user_choice(params), _queue_length(services))
    reason = skip_reason(services, kind, params) if wanted else None
    if reason is not None:
        log.info("%s job of %s wanted fast mode but runs normally: %s", kind, event.user.key, reason)
    settled = {k: v for k, v in params.items() if k != NOTE_KEY}
    settled["fast"] = wanted and reason is None
    if reason is not None:
        settled[NOTE_KEY] = reason
    return hooks.Admission(settled)


def fast_caption(services: Services, job: Any, caption: str | None, lang: str) -> str | None:
    """Says under a result that it ran fast (with its steps), or why a wanted fast mode did not run."""
    params = getattr(job, "params", None) or {}
    meta = (getattr(job, "result", None) or {}).get("meta") or {}
    if meta.get("fast"):
        note = t("fast.caption", lang, steps=meta.get("steps", "?"))
    elif params.get(NOTE_KEY):
        note = t(str(params[NOTE_KEY]), lang)
    else:
        return caption
    return f"{caption}\n{note}" if caption else note


def _fast_choices(services: Services, state: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    return [(studio_panel.UNSET, t("panel.fast_default", lang)), ("on", t("panel.fast_on", lang)),
            ("off", t("panel.fast_off", lang))]


studio.register_control_word(studio.ControlWord("fast", ("fast", "快速"), _read_fast,
                                                bare=tuple((word, "on") for word in BARE_WORDS)))
studio_panel.register_panel_control(studio_panel.PanelControl("fast", "panel.fast", _fast_choices, per_row=3))
hooks.register_admission_check(settle_fast, hooks.AdmissionStage.CHAT)
hooks.register_caption_decorator(fast_caption)
