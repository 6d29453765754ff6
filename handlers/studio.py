"""The controls of the portrait studio, shared by /style, /imagine and /template, and the Vary/Again buttons.

Controls come as ``key:value`` words after the command's own words (``/style hanfu 2 aspect:2:3 likeness:high
pose:seated seed:42``; Chinese keys and values too: ``比例:9:16 相似度:高 姿势:坐姿 种子:42``) or, on Discord,
as slash-command options that the adapter turns into the same words. Under each result, "Vary" queues the
same job around that picture's seed (small changes) and "Again" the same job with new seeds.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.poses import PoseLibrary, load_poses
from facechain_core.studio import ASPECTS, LIKENESS
from handlers import buttons
from handlers.messages import t
from handlers.progress import submit_with_progress
from handlers.protocols import Event, ReplyChannel
from handlers.services import Services

log = logging.getLogger(__name__)

SEED_MAX = 2**31 - 1
KEYS = {"aspect": "aspect", "ratio": "aspect", "比例": "aspect", "画幅": "aspect",
        "likeness": "likeness", "相似度": "likeness", "像": "likeness",
        "pose": "pose", "姿势": "pose", "姿勢": "pose",
        "seed": "seed", "种子": "seed", "種子": "seed"}
ASPECT_WORDS = {"square": "square", "1:1": "square", "方形": "square", "正方形": "square", "2:3": "2:3",
                "portrait": "2:3", "竖": "2:3", "9:16": "9:16", "story": "9:16", "3:2": "3:2", "landscape": "3:2",
                "横": "3:2"}
LIKENESS_WORDS = {"low": "low", "normal": "normal", "high": "high", "低": "low", "中": "normal", "正常": "normal",
                  "高": "high"}
POSE_PHOTO = "photo"  # pose:photo takes the pose of the photo the command carries or replies to


@dataclass
class Controls:
    """What the user asked for beyond the command's own words."""

    aspect: str | None = None
    likeness: str | None = None
    pose: str | None = None  # a pose library id, or POSE_PHOTO
    seed: int | None = None
    words: list[str] = field(default_factory=list)  # the command's own words, options taken out

    def job_controls(self) -> dict[str, Any]:
        """The ``params["controls"]`` the pipelines read (the pose is added by the caller)."""
        return {k: v for k, v in (("aspect", self.aspect), ("likeness", self.likeness)) if v is not None}


def poses() -> PoseLibrary:
    return load_poses()


def parse_controls(args: list[str]) -> Controls:
    """Splits ``key:value`` words off `args`; an unknown key or value is a user-facing error."""
    controls = Controls()
    for word in args:
        key, sep, value = re.split("([:：])", word, maxsplit=1) if re.search("[:：]", word) else (word, "", "")
        if not sep or key.casefold() not in KEYS or not value:
            controls.words.append(word)
            continue
        name = KEYS[key.casefold()]
        value = value.replace("：", ":").strip()
        if name == "aspect":
            controls.aspect = _pick(ASPECT_WORDS, value, "studio.bad_aspect", sorted(ASPECTS))
        elif name == "likeness":
            controls.likeness = _pick(LIKENESS_WORDS, value, "studio.bad_likeness", sorted(LIKENESS))
        elif name == "seed":
            if not value.isdigit() or int(value) > SEED_MAX:
                raise UserFacingError("studio.bad_seed", max=SEED_MAX)
            controls.seed = int(value)
        elif value.casefold() in (POSE_PHOTO, "照片"):
            controls.pose = POSE_PHOTO
        else:
            entry = poses().find(value)
            if entry is None:
                raise UserFacingError("pose.unknown", name=value, poses=", ".join(p.id for p in poses()))
            controls.pose = entry.id
    return controls


def _pick(words: dict[str, str], value: str, code: str, choices: list[str]) -> str:
    found = words.get(value.casefold())
    if found is None:
        raise UserFacingError(code, value=value, choices=", ".join(choices))
    return found


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
    await _resubmit(services, event, channel, job, controls)


async def again_result(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Queues the pressed picture's job again with new seeds, every control kept."""
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    if job is None:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button(t("studio.again", event.language))
    controls = {k: v for k, v in (job.params.get("controls") or {}).items() if k != "vary"}
    await _resubmit(services, event, channel, job, controls)


async def _resubmit(services: Services, event: Event, channel: ReplyChannel, job: Any,
                    controls: dict[str, Any]) -> None:
    """The job's params with new controls and a new seed, queued as a new job of the same kind."""
    params = {**job.params, "controls": controls, "seed": new_seed(services)}
    sources = [path for path in (params.get("template"), (controls.get("pose") or {}).get("image")) if path]
    for path in sources:
        if not await asyncio.to_thread(Path(path).is_file):
            raise UserFacingError("studio.source_gone")  # a photo copy went with /delete or its retention
    await submit_with_progress(services, event, channel, job.kind, params)


buttons.register_result_button("vary", "studio.button_vary", vary_result, applies_to={"portrait"})
buttons.register_result_button("again", "studio.button_again", again_result, applies_to={"portrait", "template"})
