"""The studio's options as buttons: a panel of aspect, likeness, pose and count, then "Go".

A panel opens from "⚙ Options" under a page of /styles (the presser gets the page's styles again, a tap on one
opening its panel instead of queuing it), from ``/style NAME options`` (``选项``, ``⚙``), and from "⚙ Options"
under portrait results (prefilled with that job's choices). Its choices live in a panel
row (``storage.open_panel``, ``PANEL_TTL_S``), never in the buttons: a button carries
``opt:<panel>.<control>.<value>`` and is checked against the panel's owner and chat before anything changes.
"Go" queues the portrait (a catalogue style through /style's own checks; a result's job again, as "Again"
does, with the new choices) and closes the panel. The rows come from ``PANEL_CONTROLS``; a feature adds its
own with ``register_panel_control``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.numbers import ascii_int
from handlers import buttons, hooks, portrait, studio
from handlers.messages import t
from handlers.protocols import Button, Event, MessageRef, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

KIND = "studio"  # panels.kind
PANEL_TTL_S = 3600.0
SET_ACTION, GO_ACTION, CLOSE_ACTION = "opt", "optgo", "optx"
RESULT_ACTION = "optres"  # optres:<artifact id>, under portrait results
STYLE_ACTION = "optstyle"  # optstyle:<style id>, a style of the options list
PAGE_ACTION = "optpage"  # optpage:<page>, the options list's pages
STYLES_PER_PAGE = 8
STYLE_BUTTONS_PER_ROW = 2
UNSET = "-"  # the choice that leaves a control to the style
COUNTS = (1, 2, 4)

Choices = Callable[[Services, dict[str, Any], str], list[tuple[str, str]]]


@dataclass(frozen=True)
class PanelControl:
    """One row of the panel: the state key it sets (a ``studio.Controls`` name, or "count"), the message of its
    line (``label_code``, with ``{value}``; ``<label_code>_unavailable`` when it has no choices for a panel), its
    choices as (value, button label) for a panel's state and language, and the value shown when the user chose
    nothing."""

    name: str
    label_code: str
    choices: Choices
    default: str = UNSET
    per_row: int = 4


def _aspects(services: Services, state: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    return [(UNSET, t("panel.aspect_style", lang)), ("square", "1:1"), ("2:3", "2:3"), ("9:16", "9:16"),
            ("3:2", "3:2")]


def _likeness(services: Services, state: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    return [(value, t(f"panel.likeness_{value}", lang)) for value in ("low", "normal", "high")]


def _poses(services: Services, state: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    if portrait.POSE_FEATURES.get(state.get("family", "sd15")) not in services.features_installed:
        return []
    found = [(UNSET, t("panel.pose_none", lang))] + [(p.id, p.display_name(lang)) for p in studio.poses()]
    if state.get("pose_image"):
        found.append((studio.POSE_PHOTO, t("panel.pose_photo", lang)))
    return found


def _counts(services: Services, state: dict[str, Any], lang: str) -> list[tuple[str, str]]:
    return [(str(n), str(n)) for n in COUNTS]


PANEL_CONTROLS: list[PanelControl] = [
    PanelControl("aspect", "panel.aspect", _aspects, per_row=5),
    PanelControl("likeness", "panel.likeness", _likeness, default="normal", per_row=3),
    PanelControl("pose", "panel.pose", _poses),
    PanelControl("count", "panel.count", _counts, default=str(portrait.DEFAULT_COUNT), per_row=3),
]


def register_panel_control(control: PanelControl) -> None:
    """Adds a row to every panel (above "Go")."""
    if any(c.name == control.name for c in PANEL_CONTROLS):
        raise ValueError(f"panel control {control.name!r} is already registered")
    PANEL_CONTROLS.append(control)


# -- rendering ----------------------------------------------------------------------------------
def _chosen(control: PanelControl, state: dict[str, Any]) -> str:
    value = state.get(control.name)
    return control.default if value is None else str(value)


def render(services: Services, panel_id: str, state: dict[str, Any], lang: str) -> tuple[str, list[list[Button]]]:
    """The panel's text (its title and one line per control) and its buttons, the chosen ones ticked."""
    lines = [t("panel.title", lang, style=_title(state, lang))]
    rows: list[list[Button]] = []
    for control in PANEL_CONTROLS:
        choices = control.choices(services, state, lang)
        chosen = _chosen(control, state)
        if not choices:
            lines.append(t(f"{control.label_code}_unavailable", lang))
            continue
        shown = dict(choices).get(chosen, chosen)
        lines.append(t(control.label_code, lang, value=shown))
        row = [Button(("✓ " if value == chosen else "") + label,
                      buttons.payload(SET_ACTION, f"{panel_id}.{control.name}.{value}")) for value, label in choices]
        rows.extend(row[i:i + control.per_row] for i in range(0, len(row), control.per_row))
    lines.append(t("panel.hint", lang))
    rows.append([Button(t("panel.go", lang), buttons.payload(GO_ACTION, panel_id)),
                 Button(t("panel.close", lang), buttons.payload(CLOSE_ACTION, panel_id))])
    return "\n".join(lines), rows


def _title(state: dict[str, Any], lang: str) -> str:
    names = state.get("name") or {}
    return str(names.get(lang) or names.get("en") or state.get("style_id") or "")


# -- opening ------------------------------------------------------------------------------------
def runnable_styles(services: Services, event: Event) -> Any:
    """The catalogue of styles the presser may run (the one /styles shows)."""
    return portrait._catalogue(services)


async def send_style_list(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Sends the presser a page of styles whose buttons open an options panel ("⚙ Options" under /styles)."""
    await _style_list(services, event, channel, argument, edit=False)


async def turn_style_list(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Turns the options list to another page, in place."""
    await _style_list(services, event, channel, argument, edit=event.message_id is not None)


async def _style_list(services: Services, event: Event, channel: ReplyChannel, argument: str, *, edit: bool) -> None:
    lang = event.language
    number = ascii_int(argument)
    try:
        if number is None:
            raise ValueError(f"not a page number: {argument!r}")
        page = runnable_styles(services, event).page(number, STYLES_PER_PAGE)
    except ValueError:
        await channel.answer_button(t("button.stale", lang))
        return
    rows = [[Button(s.display_name(lang), buttons.payload(STYLE_ACTION, s.id))
             for s in page.styles[i:i + STYLE_BUTTONS_PER_ROW]]
            for i in range(0, len(page.styles), STYLE_BUTTONS_PER_ROW)]
    nav = [Button(arrow, buttons.payload(PAGE_ACTION, page.number + step))
           for arrow, step, shown in (("◀", -1, page.has_previous), ("▶", 1, page.has_next)) if shown]
    rows += [nav] if nav else []
    text = t("panel.pick_style", lang, page=page.number + 1, pages=page.total_pages)
    await channel.answer_button()
    if edit:
        await channel.edit_text(MessageRef(event.chat, str(event.message_id)), text, rows)
    else:
        await channel.send_text(text, rows)


async def open_panel(services: Services, event: Event, channel: ReplyChannel, state: dict[str, Any]) -> None:
    """Stores a panel for the presser in this chat and sends it."""
    panel_id = await services.storage.open_panel(event.user.key, event.chat.key, KIND, state, PANEL_TTL_S)
    text, keyboard = render(services, panel_id, state, event.language)
    await channel.send_text(text, keyboard)


async def open_for_style(services: Services, event: Event, channel: ReplyChannel, style_id: str) -> None:
    """Opens a panel for a style tapped in /styles' options mode."""
    style = runnable_styles(services, event).get(style_id)
    if style is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button()
    await open_panel(services, event, channel, style_state(style))


async def open_for_command(services: Services, event: Event, channel: ReplyChannel, style: Any) -> None:
    """Opens a panel for ``/style NAME options``."""
    await open_panel(services, event, channel, style_state(style))


def style_state(style: Any) -> dict[str, Any]:
    """A new panel's state for a catalogue style (every control left to the style)."""
    return {"style_id": style.id, "family": style.family, "name": style.name.model_dump()}


async def open_for_result(services: Services, event: Event, channel: ReplyChannel, artifact_id: str) -> None:
    """Opens a panel prefilled with the choices of the pressed result's job (the presser's own)."""
    artifact = await buttons.owned_artifact(services, event, channel, artifact_id, {"portrait"})
    if artifact is None:
        return
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    if job is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    controls = job.params.get("controls") or {}
    pose = controls.get("pose") or {}
    style = job.params.get("style") or {}
    await channel.answer_button()
    await open_panel(services, event, channel, {
        "job_id": job.id, "family": style.get("family", "sd15"), "name": style.get("name") or {},
        "aspect": controls.get("aspect"), "likeness": controls.get("likeness"),
        "pose": studio.POSE_PHOTO if pose.get("image") else pose.get("id"), "pose_image": pose.get("image"),
        "count": int(job.params.get("count", portrait.DEFAULT_COUNT))})


def options_keyboard(services: Services, job: Any, keyboard: list[list[Button]] | None, artifacts: list[Any],
                     lang: str) -> list[list[Button]] | None:
    """Adds "⚙ Options" (one per job) under portrait results on Telegram (Discord has /style's options)."""
    if job.kind != "portrait" or not artifacts or job.chat.get("platform") != "telegram":
        return keyboard
    return (keyboard or []) + [[Button(t("panel.button", lang), buttons.payload(RESULT_ACTION, artifacts[0].id))]]


# -- pressing -----------------------------------------------------------------------------------
async def _own_panel(services: Services, event: Event, channel: ReplyChannel, panel_id: str) -> Any | None:
    """The panel when the presser owns it in this chat; otherwise answers the press and returns None."""
    panel = await services.storage.panel(panel_id)
    if panel is None or panel.kind != KIND or panel.chat_key != event.chat.key:
        await channel.answer_button(t("button.stale", event.language))
        return None
    if panel.user_key != event.user.key:
        log.info("%s pressed someone else's options panel", event.user.key)
        await channel.answer_button(t("button.not_yours", event.language), alert=True)
        return None
    return panel


async def press_choice(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Sets one control of the presser's panel and redraws it."""
    panel_id, _, rest = argument.partition(".")
    name, _, value = rest.partition(".")
    panel = await _own_panel(services, event, channel, panel_id)
    if panel is None:
        return
    control = next((c for c in PANEL_CONTROLS if c.name == name), None)
    if control is None or value not in dict(control.choices(services, panel.state, event.language)):
        await channel.answer_button(t("button.stale", event.language))
        return
    state = {**panel.state, name: None if value in (UNSET, control.default) else value}
    await services.storage.update_panel(panel.id, state)
    text, keyboard = render(services, panel.id, state, event.language)
    await channel.answer_button()
    if event.message_id is not None:
        await channel.edit_text(MessageRef(event.chat, event.message_id), text, keyboard)


async def press_go(services: Services, event: Event, channel: ReplyChannel, panel_id: str) -> None:
    """Queues the portrait with the panel's choices and closes the panel (kept open when the job is refused, so
    the user can change a choice and press Go again)."""
    panel = await _own_panel(services, event, channel, panel_id)
    if panel is None:
        return
    if not await services.storage.close_panel(panel.id):  # pressed twice: the first press took it
        await channel.answer_button(t("button.stale", event.language))
        return
    lang = event.language
    await channel.answer_button(t("panel.going", lang))
    try:
        await _submit(services, event, channel, panel.state)
    except UserFacingError:
        await services.storage.open_panel(panel.user_key, panel.chat_key, KIND, panel.state, PANEL_TTL_S,
                                          panel_id=panel.id)
        raise
    if event.message_id is not None:
        await channel.edit_text(MessageRef(event.chat, event.message_id), _summary(services, panel.state, lang))


async def _submit(services: Services, event: Event, channel: ReplyChannel, state: dict[str, Any]) -> None:
    """Queues a catalogue style's portrait through /style's checks (every panel control that is a
    ``studio.Controls`` field goes in), or a result's job again with the choices (a registered control beyond
    these four, when chosen, goes into the job's params under its name)."""
    count = ascii_int(str(state.get("count"))) or portrait.DEFAULT_COUNT
    pose = state.get("pose")
    if state.get("job_id") is not None:
        job = await services.storage.job(int(state["job_id"]))
        if job is None or job.user_key != event.user.key:
            raise UserFacingError("button.stale")
        controls = {k: state[k] for k in ("aspect", "likeness") if state.get(k)}
        if pose == studio.POSE_PHOTO and state.get("pose_image"):
            controls["pose"] = {"image": state["pose_image"]}
        elif pose:
            controls["pose"] = {"id": pose}
        extra = {c.name: state[c.name] for c in PANEL_CONTROLS
                 if c.name not in ("aspect", "likeness", "pose") and state.get(c.name) is not None}
        await studio.resubmit(services, event, channel, job, controls, {**extra, "count": count})
        return
    style = runnable_styles(services, event).get(str(state.get("style_id")))
    if style is None:
        raise UserFacingError("button.stale")
    names = {f.name for f in fields(studio.Controls)}
    controls = studio.Controls(**{c.name: state.get(c.name) for c in PANEL_CONTROLS if c.name in names})
    await portrait.submit_portrait(services, event, channel, style, count, controls)


async def press_close(services: Services, event: Event, channel: ReplyChannel, panel_id: str) -> None:
    """Closes the presser's panel without queuing anything."""
    panel = await _own_panel(services, event, channel, panel_id)
    if panel is None:
        return
    await services.storage.close_panel(panel.id)
    await channel.answer_button()
    if event.message_id is not None:
        await channel.edit_text(MessageRef(event.chat, event.message_id), t("panel.closed", event.language))


def _summary(services: Services, state: dict[str, Any], lang: str) -> str:
    """One line of what "Go" queued: the style and each control's choice."""
    parts = []
    for control in PANEL_CONTROLS:
        choices = dict(control.choices(services, state, lang))
        if choices:
            parts.append(choices.get(_chosen(control, state), _chosen(control, state)))
    return t("panel.queued", lang, style=_title(state, lang), choices=" · ".join(parts))


studio.register_options_panel(open_for_command)
hooks.register_keyboard_decorator(options_keyboard, owner_only=True)
buttons.register_core_button(SET_ACTION, press_choice)
buttons.register_core_button(GO_ACTION, press_go)
buttons.register_core_button(CLOSE_ACTION, press_close)
buttons.register_core_button(RESULT_ACTION, open_for_result)
buttons.register_core_button(STYLE_ACTION, open_for_style)
buttons.register_core_button(studio.PANEL_LIST_ACTION, send_style_list)
buttons.register_core_button(PAGE_ACTION, turn_style_list)
