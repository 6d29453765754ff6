"""The controls of the portrait studio, shared by /style, /imagine and /template, and the Vary/Again buttons.

Controls come as ``key:value`` words after the command's own words (``/style hanfu 2 aspect:2:3 likeness:high
pose:seated seed:42``; Chinese keys and values too: ``比例:9:16 相似度:高 姿势:坐姿 种子:42``), on Discord as
slash-command options that the adapter turns into the same words, and on Telegram also as the buttons of the
options panel (``handlers.studio_panel``). Each control is one row of ``CONTROL_WORDS``: its keys, and how its
value is read; a feature adds its own with ``register_control_word``. Under each result, "Vary" queues the
same job around that picture's seed (small changes) and "Again" the same job with new seeds.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.numbers import ascii_int
from facechain_core.poses import PoseLibrary, load_poses
from facechain_core.studio import ASPECTS, LIKENESS
from handlers import buttons
from handlers.messages import t
from handlers.progress import submit_with_progress
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

SEED_MAX = 2**31 - 1
ASPECT_WORDS = {"square": "square", "1:1": "square", "方形": "square", "正方形": "square", "2:3": "2:3",
                "portrait": "2:3", "竖": "2:3", "9:16": "9:16", "story": "9:16", "3:2": "3:2", "landscape": "3:2",
                "横": "3:2"}
LIKENESS_WORDS = {"low": "low", "normal": "normal", "high": "high", "低": "low", "中": "normal", "正常": "normal",
                  "高": "high"}
POSE_PHOTO = "photo"  # pose:photo takes the pose of the photo the command carries or replies to
PANEL_LIST_ACTION = "optlist"  # optlist:<page>: "⚙ Options" under /styles (handlers.studio_panel)
OPTION_WORDS = ("options", "选项", "選項", "⚙", "⚙️")  # /style NAME options: the options panel


@dataclass
class Controls:
    """What the user asked for beyond the command's own words."""

    aspect: str | None = None
    likeness: str | None = None
    pose: str | None = None  # a pose library id, or POSE_PHOTO
    seed: int | None = None
    fast: str | None = None  # "on"/"off": fast mode (handlers.fast); None leaves it to the operator
    panel: bool = False  # the options panel asked for (a word of OPTION_WORDS)
    words: list[str] = field(default_factory=list)  # the command's own words, options taken out

    def job_controls(self) -> dict[str, Any]:
        """The ``params["controls"]`` the pipelines read (the pose is added by the caller)."""
        return {k: v for k, v in (("aspect", self.aspect), ("likeness", self.likeness), ("fast", self.fast))
                if v is not None}


@dataclass(frozen=True)
class ControlWord:
    """One control as words: the keys before the colon (any language), how the value after it is read (raising
    UserFacingError for a bad one), and bare words that set a value without a key (``fast``)."""

    name: str  # the Controls attribute it sets
    keys: tuple[str, ...]
    read: Callable[[str], Any]
    bare: tuple[tuple[str, Any], ...] = ()


CONTROL_WORDS: dict[str, ControlWord] = {}


_BARE_CONTROLS: list[ControlWord] = []


def register_control_word(control: ControlWord) -> None:
    """Adds a control's words to what ``parse_controls`` understands."""
    for word in control.keys:
        CONTROL_WORDS[word.casefold()] = control
    if control.bare:
        _BARE_CONTROLS.append(control)


@cache
def poses() -> PoseLibrary:
    """The pose library, read once."""
    return load_poses()


def _pick(words: dict[str, str], code: str, choices: list[str]) -> Callable[[str], str]:
    def read(value: str) -> str:
        found = words.get(value.casefold())
        if found is None:
            raise UserFacingError(code, value=value, choices=", ".join(choices))
        return found

    return read


def _read_seed(value: str) -> int:
    seed = ascii_int(value)
    if seed is None or seed > SEED_MAX:
        raise UserFacingError("studio.bad_seed", max=SEED_MAX)
    return seed


def _read_pose(value: str) -> str:
    if value.casefold() in (POSE_PHOTO, "照片"):
        return POSE_PHOTO
    entry = poses().find(value)
    if entry is None:
        raise UserFacingError("pose.unknown", name=value, poses=", ".join(p.id for p in poses()))
    return entry.id


for _control in (
        ControlWord("aspect", ("aspect", "ratio", "比例", "画幅"),
                    _pick(ASPECT_WORDS, "studio.bad_aspect", sorted(ASPECTS))),
        ControlWord("likeness", ("likeness", "相似度", "像"),
                    _pick(LIKENESS_WORDS, "studio.bad_likeness", sorted(LIKENESS))),
        ControlWord("pose", ("pose", "姿势", "姿勢"), _read_pose),
        ControlWord("seed", ("seed", "种子", "種子"), _read_seed),
        ControlWord("panel", (), bool, bare=tuple((word, True) for word in OPTION_WORDS))):
    register_control_word(_control)


def parse_controls(args: list[str]) -> Controls:
    """Splits ``key:value`` words (and a control's bare words) off `args`; an unknown value is a user-facing
    error, an unknown key leaves the word to the command."""
    controls = Controls()
    bare = {word.casefold(): (c.name, value) for c in _BARE_CONTROLS for word, value in c.bare}
    for word in args:
        key, sep, value = re.split("([:：])", word, maxsplit=1) if re.search("[:：]", word) else (word, "", "")
        if not sep and word.casefold() in bare:
            name, chosen = bare[word.casefold()]
            setattr(controls, name, chosen)
            continue
        control = CONTROL_WORDS.get(key.casefold()) if sep else None
        if control is None or not value:
            controls.words.append(word)
            continue
        setattr(controls, control.name, control.read(value.replace("：", ":").strip()))
    return controls


OptionsPanel = Callable[[Services, Event, ReplyChannel, Any], Awaitable[None]]
_options_panels: list[OptionsPanel] = []


def register_options_panel(opener: OptionsPanel) -> None:
    """Sets what ``/style NAME options`` opens: ``opener(services, event, channel, style)``."""
    _options_panels[:] = [opener]


async def open_options(services: Services, event: Event, channel: ReplyChannel, style: Any) -> bool:
    """Opens the options panel for `style`; False where no panel is registered."""
    if not _options_panels:
        return False
    await _options_panels[0](services, event, channel, style)
    return True


def new_seed(services: Services, fresh: bool = False) -> int:
    """The operator's fixed seed (reproducible runs) or, without one or when `fresh`, a new one."""
    seed = services.settings.portrait_seed
    return int(seed) if seed is not None and not fresh else secrets.randbelow(2**31)


def seeds_line(job: Any, lang: str) -> str:
    """"Seed 1234" (or "Seeds: 1 · 1234, 2 · 1240") for a finished job's pictures, in order."""
    meta = (job.result or {}).get("meta") or {}
    seeds = meta.get("seeds") or []
    if not seeds:
        return ""
    if len(seeds) == 1:
        return t("studio.seed", lang, seed=seeds[0])
    return t("studio.seeds", lang, seeds=", ".join(f"{i} · {s}" for i, s in enumerate(seeds, start=1)))


# -- the buttons under results ------------------------------------------------------------------
async def vary_result(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Queues the pressed picture's job again around its seed: the same picture with small changes."""
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    seed = (artifact.meta or {}).get("seed")
    if job is None or seed is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button(t("studio.varying", event.language, seed=seed))
    controls = {**(job.params.get("controls") or {}), "vary": {"seed": int(seed)}}
    await resubmit(services, event, channel, job, controls)


async def again_result(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Queues the pressed picture's job again with new seeds, every control kept."""
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    if job is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button(t("studio.again", event.language))
    controls = {k: v for k, v in (job.params.get("controls") or {}).items() if k != "vary"}
    await resubmit(services, event, channel, job, controls)


async def resubmit(services: Services, event: Event, channel: ReplyChannel, job: Any,
                   controls: dict[str, Any], changes: dict[str, Any] | None = None) -> None:
    """The job's params with new controls, a new seed and `changes`, queued as a new job of the same kind."""
    params = {**job.params, "controls": controls, "seed": new_seed(services), **(changes or {})}
    sources = [path for path in (params.get("template"), (controls.get("pose") or {}).get("image")) if path]
    for path in sources:
        if not await asyncio.to_thread(Path(path).is_file):
            raise UserFacingError("studio.source_gone")  # a photo copy went with /delete or its retention
    await submit_with_progress(services, event, channel, job.kind, params)


buttons.register_result_button("vary", "studio.button_vary", vary_result, applies_to={"portrait", "template"})
buttons.register_result_button("again", "studio.button_again", again_result, applies_to={"portrait", "template"})
