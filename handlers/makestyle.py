"""StyleMaker in chat: /makestyle NAME [description] -> example pictures -> a trained, previewed style.

Usage (a private chat; bot admins, or everyone when ``[styles] makestyle = "everyone"``)::

    /makestyle inkwash ink wash painting, soft grey tones   # opens a set, asks for 5-30 pictures
    (pictures, one by one or as albums; each is checked: decodable, big enough, no near-duplicate)
    /makestyle done            # or the Train button: queues the "style_train" job
    /makestyle publish inkwash en:Ink wash zh:水墨   # admins: the style joins everyone's catalogue

The job checks the whole set in the worker (the safety checker; a face other than the maker's in more
than ``max_same_face`` examples refuses it), trains the LoRA and renders previews with the reference
identity and the maker's own. Until published the style is private: only its maker finds it with /style.
Files live as ``handlers.style_sources`` describes; /delete removes a maker's private styles.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facechain_core.errors import UserFacingError
from facechain_core.images import decode_image, encode_jpeg, to_rgb
from facechain_core.styles import ID_PATTERN, LOCAL_SOURCE, Style, StyleError
from handlers import buttons, registry, router, style_sources
from handlers.cartoon import fetch_image
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_with_progress
from handlers.protocols import Button, Event, ReplyChannel
from handlers.selfie import is_image
from handlers.services import Services

log = logging.getLogger(__name__)

COMMAND = "makestyle"
KIND = "style_train"
FEATURE = "train"  # style training runs on the SD1.5 training base
TRAIN_ACTION = "mkstyle_train"
META_FILE = "meta.json"
EXAMPLES = "examples"
TRAIN_FOLDER = "train"  # the job's out_dir: checkpoints, weights, previews
TRIGGER = "zwx style"  # rare tokens the style's look is tied to
MAX_DESCRIPTION_CHARS = 160  # with the trigger and a subject, well inside CLIP's 77 tokens
DEFAULT_WEIGHT = 0.8
STYLE_SORT = 900  # made styles come after the shipped ones in menus
NEGATIVE_PROMPT = "lowres, blurry, deformed, bad anatomy, watermark, text"
HASH_SIZE = 8  # dHash: 8x8 = 64 bits
STATE_COLLECTING, STATE_TRAINING, STATE_TRAINED = "collecting", "training", "trained"
_NAME_MARK = re.compile(r"\b(en|zh):", re.IGNORECASE)


# -- the command --------------------------------------------------------------------------------
async def make_style(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Opens a set (/makestyle NAME [description]), trains it (done) or publishes one (publish, admins)."""
    lang = event.language
    args = list(event.args)
    action = args[0].lower() if args else ""
    if action == "publish":
        await publish_style(services, event, channel, args[1:])
        return
    _require_maker(services, event)
    if action == "done":
        await train_style(services, event, channel)
        return
    if not args:
        await channel.send_text(t("makestyle.usage", lang, low=_settings(services).min_examples,
                                  high=_settings(services).max_examples))
        return
    await open_set(services, event, channel, args[0].lower(), " ".join(args[1:]))
    if event.attachments:
        await receive_examples(services, event, channel, None)


async def open_set(services: Services, event: Event, channel: ReplyChannel, name: str, description: str) -> None:
    """Starts a new example set named `name` (replacing the maker's unfinished one) and asks for pictures."""
    if not re.match(ID_PATTERN, name):
        raise UserFacingError("makestyle.bad_name", name=name[:48])
    await _check_name_free(services, event.user.key, name)
    await _refuse_while_training(services, event.user.key)
    description = _clean_description(description) or name.replace("_", " ").replace("-", " ")
    folder = style_sources.private_dir(services, event.user.key, name)
    await asyncio.to_thread(_reset_open_sets, style_sources.private_dir(services, event.user.key), name)
    meta = {"name": name, "description": description, "trigger": TRIGGER, "state": STATE_COLLECTING,
            "hashes": [], "created": time.time()}
    await asyncio.to_thread(_write_meta, folder, meta)
    await router.expect_input(services, event, COMMAND, {"name": name})
    settings = _settings(services)
    await channel.send_text(t("makestyle.send_examples", event.language, name=name, low=settings.min_examples,
                              high=settings.max_examples))


async def receive_examples(services: Services, event: Event, channel: ReplyChannel, pending: Any) -> None:
    """Checks and keeps each example picture of the open set, then waits for more."""
    _require_maker(services, event)
    folder, meta = await _open_set(services, event.user.key)
    images = [a for a in event.attachments if is_image(a)]
    if not images:
        await router.expect_input(services, event, COMMAND, {"name": meta["name"]})
        raise UserFacingError("makestyle.not_a_picture")
    settings = _settings(services)
    problems: list[str] = []
    for attachment in images:
        if len(meta["hashes"]) >= settings.max_examples:
            problems.append(t("makestyle.too_many", event.language, high=settings.max_examples))
            break
        try:
            data = await fetch_image(services, attachment)
            picture, digest = await asyncio.to_thread(_check_picture, services, data, meta["hashes"])
        except UserFacingError as exc:
            problems.append(router.message_for(exc, event.language))
            continue
        number = len(meta["hashes"]) + 1
        await asyncio.to_thread(_keep_example, folder / EXAMPLES / f"{number:02d}.jpg", picture)
        meta["hashes"].append(digest)
    await asyncio.to_thread(_write_meta, folder, meta)
    await router.expect_input(services, event, COMMAND, {"name": meta["name"]})
    count = len(meta["hashes"])
    text = "\n".join([*problems, t("makestyle.got", event.language, count=count, low=settings.min_examples,
                                   high=settings.max_examples)])
    keyboard = None
    if count >= settings.min_examples:
        keyboard = [[Button(t("makestyle.button_train", event.language), buttons.payload(TRAIN_ACTION, meta["name"]))]]
    await channel.send_text(text, keyboard)


async def press_train(services: Services, event: Event, channel: ReplyChannel, name: str) -> None:
    """The Train button: trains the presser's open set (stale when it is not theirs or not open)."""
    try:
        _, meta = await _open_set(services, event.user.key)
    except UserFacingError:
        meta = None
    if meta is None or meta["name"] != name:
        await channel.answer_button(t("button.stale", event.language))
        return
    await channel.answer_button()
    await train_style(services, event, channel)


async def train_style(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Queues the "style_train" job on the open set: captions, the style for previews, the identities."""
    key = event.user.key
    await _refuse_while_training(services, key)
    folder, meta = await _open_set(services, key)
    settings = _settings(services)
    examples = sorted((folder / EXAMPLES).glob("*.jpg"))
    if len(examples) < settings.min_examples:
        raise UserFacingError("makestyle.too_few", count=len(examples), low=settings.min_examples)
    services.require_feature(FEATURE)
    style = build_style(meta["name"], meta["description"], meta["trigger"])
    caption = f"{meta['trigger']}, {meta['description']}"
    params: dict[str, Any] = {
        "photos": [{"path": str(p.resolve())} for p in examples],
        "captions": [caption] * len(examples),  # an automatic captioner would vary these per picture
        "trigger": meta["trigger"],
        "out_dir": str((folder / TRAIN_FOLDER).resolve()),  # fixed: a restarted job resumes its checkpoint
        "max_same_face": settings.max_same_face,
        "maker_identity": await _maker_identity(services, key),
        "style": style.model_dump(mode="json"),
        "previews": await _previews(services, key),
        "style_id": meta["name"],
    }
    await submit_with_progress(services, event, channel, KIND, params)
    meta["state"] = STATE_TRAINING
    await asyncio.to_thread(_write_meta, folder, meta)
    await services.storage.take_pending(key, event.chat.key)  # no more pictures for this set
    log.info("style %s queued for training by %s (%d examples)", meta["name"], key, len(examples))


async def publish_style(services: Services, event: Event, channel: ReplyChannel, args: list[str]) -> None:
    """Publishes a trained style with its English and Chinese names (bot admins only)."""
    if not router.is_admin(services, event.user.key):
        raise UserFacingError("core.admin_only")
    if not args:
        raise UserFacingError("makestyle.publish_usage")
    name = args[0].lower()
    names = parse_names(" ".join(args[1:]))
    if not names.get("en") or not names.get("zh"):
        raise UserFacingError("makestyle.publish_usage")
    source = await asyncio.to_thread(_find_private, services, name)
    if source is None:
        raise UserFacingError("makestyle.not_found", name=name)
    try:
        catalogue = await asyncio.to_thread(_publish_files, services, source, names)
    except StyleError as exc:
        log.warning("publishing %s failed: %s", name, exc)
        raise UserFacingError("makestyle.publish_clash", name=name) from None
    services.styles = catalogue  # every chat sees it from the next command on
    log.info("style %s published by %s", name, event.user.key)
    await channel.send_text(t("makestyle.published", event.language, name=name,
                              title=names["zh" if event.language == "zh" else "en"]))


# -- the finished job ---------------------------------------------------------------------------
async def present_style(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                        lang: str) -> None:
    """Makes the trained style the maker's private one, then sends the previews and how to use it."""
    name = str(job.params.get("style_id", ""))
    weights = next((a for a in artifacts if a.path.endswith(".safetensors")), None)
    if weights is None or not name:
        log.error("style job %d finished without a LoRA", job.id)
        return
    folder = style_sources.private_dir(services, job.user_key, name)
    await asyncio.to_thread(_install_private, folder, name, Path(weights.path), job.params["style"])
    for artifact in artifacts:
        if artifact is weights and artifact.delivered_at is None:
            await services.storage.mark_delivered(artifact.id, channel.chat.platform, None)
    previews = [a for a in artifacts if a is not weights]
    meta = (job.result or {}).get("meta", {})
    curve = meta.get("loss_curve") or []
    caption = t("makestyle.trained", lang, name=name, steps=meta.get("steps", "?"),
                first=curve[0] if curve else "?", last=curve[-1] if curve else "?")
    if previews:
        await present_default(services, job, previews, channel, lang, caption=caption)
    else:
        await channel.send_text(caption)
    hint = "makestyle.try_admin" if router.is_admin(services, job.user_key) else "makestyle.try"
    await channel.send_text(t(hint, lang, name=name))


# -- checks and files ---------------------------------------------------------------------------
def _settings(services: Services) -> Any:
    return services.settings.styles


def _require_maker(services: Services, event: Event) -> None:
    who = _settings(services).makestyle
    admin = router.is_admin(services, event.user.key)
    if who == "off" or (who == "admins" and not admin):
        raise UserFacingError("makestyle.not_allowed")
    if not event.chat.is_private:
        raise UserFacingError("makestyle.private_only")


async def _check_name_free(services: Services, user_key: str, name: str) -> None:
    catalogue = services.styles
    if catalogue is not None:
        try:
            found = catalogue.find(name)
        except UserFacingError:
            found = None
        if found is not None:
            raise UserFacingError("makestyle.name_taken", name=name)
    owners = await asyncio.to_thread(_private_owners, services, name)
    if owners - {user_key}:
        raise UserFacingError("makestyle.name_taken", name=name)


def _private_owners(services: Services, name: str) -> set[str]:
    users = Path(services.data_dir) / "users"
    return {p.parent.parent.name for p in users.glob(f"*/{style_sources.PRIVATE_FOLDER}/{name}")} if users.is_dir() \
        else set()


def _clean_description(text: str) -> str:
    # Braces would be read as prompt placeholders; control characters have no place in a prompt.
    cleaned = "".join(c for c in text if c.isprintable() and c not in "{}")
    return " ".join(cleaned.split())[:MAX_DESCRIPTION_CHARS].strip(" ,")


def parse_names(text: str) -> dict[str, str]:
    """``en:Ink wash zh:水墨`` -> {"en": "Ink wash", "zh": "水墨"}."""
    parts = _NAME_MARK.split(text)
    return {parts[i].lower(): " ".join(parts[i + 1].split())[:48] for i in range(1, len(parts) - 1, 2)}


def build_style(name: str, description: str, trigger: str) -> Style:
    """The style record of a made style (validated as any shipped style is); named by its id until published."""
    data: dict[str, Any] = {
        "id": name, "family": "sd15", "identity_weight": 0.85, "tags": ["made"], "sort": STYLE_SORT,
        "prompt": f"{{subject}}, {trigger}, {description}", "negative_prompt": NEGATIVE_PROMPT,
        "name": {"en": name, "zh": name}, "description": {"en": description, "zh": description},
        "sampler": {"scheduler": "dpmpp_2m_karras", "steps": 30, "guidance_scale": 7.0, "width": 512, "height": 512},
        "lora": {"source": LOCAL_SOURCE, "file": f"{name}.safetensors", "weight": DEFAULT_WEIGHT},
    }
    return Style.model_validate(data)


def style_toml(style: dict[str, Any]) -> str:
    """A style (as JSON) written as a style TOML file (JSON strings are TOML basic strings)."""
    lines, tables = [], []
    for key, value in style.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()
                                     if v is not None]
    return "\n".join(lines) + "\n"


def _check_picture(services: Services, data: bytes, hashes: list[str]) -> tuple[Image.Image, str]:
    """Decodes one example; refuses it when too small or a near-duplicate of a kept one."""
    settings = _settings(services)
    picture = to_rgb(decode_image(data, max_bytes=services.max_upload_bytes,
                                  max_pixels=int(services.settings.limits.max_pixels)))
    if min(picture.size) < settings.min_side:
        raise UserFacingError("makestyle.too_small", width=picture.width, height=picture.height,
                              side=settings.min_side)
    digest = dhash(picture)
    for number, other in enumerate(hashes, start=1):
        if hamming(digest, other) <= settings.duplicate_distance:
            raise UserFacingError("makestyle.duplicate", number=number)
    return picture, digest


def dhash(picture: Image.Image) -> str:
    """A 64-bit difference hash (hex): near-identical pictures differ in a few bits."""
    grey = np.asarray(picture.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS),
                      dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _keep_example(path: Path, picture: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(encode_jpeg(picture))  # re-encoded: no metadata of the original kept
    tmp.replace(path)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    tmp.replace(folder / META_FILE)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _reset_open_sets(root: Path, name: str) -> None:
    """Drops the maker's unfinished sets and any earlier try named `name` (a maker collects one set at a
    time; other trained styles stay)."""
    for meta_path in root.glob(f"*/{META_FILE}") if root.is_dir() else []:
        meta = _read_meta(meta_path.parent)
        if meta_path.parent.name == name or (meta is not None and meta.get("state") != STATE_TRAINED):
            shutil.rmtree(meta_path.parent, ignore_errors=True)


async def _refuse_while_training(services: Services, user_key: str) -> None:
    storage: Any = services.storage
    if any(j.kind == KIND for j in await storage.user_jobs(user_key, ["queued", "running"])):
        raise UserFacingError("makestyle.already_training")


async def _open_set(services: Services, user_key: str) -> tuple[Path, dict[str, Any]]:
    """The maker's set still collecting pictures (or a set whose training failed), else makestyle.no_set."""
    root = style_sources.private_dir(services, user_key)

    def find() -> tuple[Path, dict[str, Any]] | None:
        found = []
        for meta_path in root.glob(f"*/{META_FILE}") if root.is_dir() else []:
            meta = _read_meta(meta_path.parent)
            if meta is not None and meta.get("state") != STATE_TRAINED:
                found.append((meta.get("created", 0), meta_path.parent, meta))
        return max(found, key=lambda f: f[0])[1:] if found else None

    found = await asyncio.to_thread(find)
    if found is None:
        raise UserFacingError("makestyle.no_set")
    return found


async def _maker_identity(services: Services, user_key: str) -> str | None:
    identity = await services.storage.identity(user_key)
    return str(Path(identity.path).resolve()) if identity is not None else None


async def _previews(services: Services, user_key: str) -> list[dict[str, Any]]:
    """The identities the previews show: the operator's reference photo, and the maker's own when known."""
    previews: list[dict[str, Any]] = []
    reference = _settings(services).reference_photo
    if reference is not None and Path(reference).is_file():
        previews.append({"name": "reference", "photo": str(Path(reference).resolve())})
    selfies = await services.storage.selfies(user_key)
    if selfies:
        previews.append({"name": "maker", "identity": str((services.user_dir(user_key) / "identity.npz").resolve()),
                         "selfies": [{"path": s.path, "face": s.face} for s in selfies]})
    return previews


def _install_private(folder: Path, name: str, weights: Path, style: dict[str, Any]) -> None:
    """Puts the LoRA beside the style's TOML in the maker's folder: from now on /style finds it (theirs only)."""
    shutil.copyfile(weights, folder / f"{name}.safetensors")
    (folder / f"{name}.toml").write_text(style_toml(style), encoding="utf-8")
    meta = _read_meta(folder) or {"name": name}
    meta["state"] = STATE_TRAINED
    _write_meta(folder, meta)


def _find_private(services: Services, name: str) -> Path | None:
    """The folder of the trained private style `name`, whoever made it."""
    users = Path(services.data_dir) / "users"
    for folder in users.glob(f"*/{style_sources.PRIVATE_FOLDER}/{name}") if users.is_dir() else []:
        if (folder / f"{name}.toml").is_file() and (folder / f"{name}.safetensors").is_file():
            return folder
    return None


def _publish_files(services: Services, source: Path, names: dict[str, str]) -> Any:
    """Writes the style file, LoRA and reference preview under data_dir/styles, reloads the catalogue, and
    removes the private copy; on a clash nothing is left behind. Returns the new catalogue."""
    name = source.name
    target = style_sources.published_dir(services.data_dir)
    target.mkdir(parents=True, exist_ok=True)
    private = (source / f"{name}.toml").read_text(encoding="utf-8")
    style = tomllib.loads(private)
    style["name"] = {"en": names["en"], "zh": names["zh"]}
    written = [target / f"{name}.safetensors", target / f"{name}.toml"]
    reference = next(iter(sorted((source / TRAIN_FOLDER / "previews" / "reference").glob("*.png"))), None)
    if reference is not None:
        written.append(target / "previews" / f"{name}.png")
        written[-1].parent.mkdir(exist_ok=True)
        shutil.copyfile(reference, written[-1])
        style["preview"] = f"previews/{name}.png"
    shutil.copyfile(source / f"{name}.safetensors", written[0])
    written[1].write_text(style_toml(style), encoding="utf-8")
    try:
        catalogue = style_sources.reload_catalogue(services)
    except StyleError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    shutil.rmtree(source, ignore_errors=True)  # the published copy is the style now
    return catalogue


registry.register_command(COMMAND, make_style, "help.makestyle")
registry.register_pending(COMMAND, receive_examples)
registry.register_user_data_folder(style_sources.PRIVATE_FOLDER)
buttons.register_core_button(TRAIN_ACTION, press_train)
register_presenter(KIND, present_style)
