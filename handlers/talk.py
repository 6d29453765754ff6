"""Talking portraits in chat: ``/talk Hello everyone`` speaks the words with the user's portrait;
``/talk`` alone asks for a voice message and uses the user's own voice; ``/talk round ...`` (or
``--round``) asks for a round video note (a plain video where the platform has none); ``--still``,
``--natural`` or ``--lively`` set how much the head moves where the animated mode runs.

The portrait is, in this order: a photo sent with the command, the photo or result the command
replies to (only the requester's own, as for /cartoon), the user's latest image result, their latest
selfie (private chats only). "Make it talk" under a result asks for a voice message for that
result. Each job gets a copy of its inputs in the user's own folder
(``data_dir/users/<key>/talk/jobs/<token>/``), so /delete removes them; they go once delivered.

``/voice`` lists the voices by language (English, then Mandarin) as buttons: Kokoro's natural offline
voices (where ``models pull talk-voices`` installed them), edge-tts's (only where the operator put "edge"
in ``[pipeline] talk_tts``) and the robotic espeak-ng voice; ▶ beside each queues a short sample
(a ``voice_sample`` job) that comes back as a voice message. The choice is stored with the user and
text /talk jobs carry it as ``voice``: it speaks texts in its own language, and the text's language
picks the default otherwise (``facechain_core.tts.speak``).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

from facechain_core import kokoro
from facechain_core.errors import UserFacingError
from facechain_core.talk import DEFAULTS as TALK_DEFAULTS
from facechain_core.tts import MAX_TEXT_CHARS  # noqa: F401  (re-exported: the Discord /talk option's limit)
from facechain_core.tts import OFFLINE_VOICE, EdgeTTS, check_text_length, edge_enabled, edge_voice_language
from handlers import buttons, cartoon, hooks, registry, router
from handlers.messages import t
from handlers.progress import register_presenter, submit_staged, submit_with_progress
from handlers.protocols import Attachment, Button, Event, Media, NotSupported, ReplyChannel
from handlers.services import MB, Services

log = logging.getLogger(__name__)

KIND = "talk"
RESULT_ACTION = "talk"  # talk:<artifact id> under portraits and cartoons
VOICE_ACTION = "voice"  # voice:<Kokoro or edge-tts voice, or "espeak"> under /voice
SAMPLE_ACTION = "voicetry"  # voicetry:<voice>: a short sample of it
SAMPLE_KIND = "voice_sample"
VOICE_LANGUAGES = ("en", "zh")
FOLDER = "talk"  # under the user's folder: jobs/<token>/input.jpg and input.audio
ROUND_WORDS = ("round", "--round")
MOTION_FLAGS = {"--still": "still", "--natural": "natural", "--lively": "lively"}  # the animated mode's head motion
INPUT_TTL_S = 24 * 3600.0
AUDIO_KINDS = ("voice", "audio")
DONE_STATES = ("delivered", "done")


async def make_talk(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Queues the portrait speaking the text; without text, asks for a voice message."""
    args = list(event.args)
    round_video, motion = False, None
    while args and (args[0].lower() in ROUND_WORDS or args[0].lower() in MOTION_FLAGS):
        word = args.pop(0).lower()
        if word in ROUND_WORDS:
            round_video = True
        else:
            motion = MOTION_FLAGS[word]
    text = " ".join(args).strip()
    check_text_length(text)
    source = await portrait_source(services, event)
    folder = await stage_portrait(services, event.user.key, source)
    if not text:
        await router.expect_input(services, event, KIND, {"folder": str(folder), "round": round_video,
                                                          **({"motion": motion} if motion else {})})
        await channel.send_text(t("talk.send_voice", event.language, max_seconds=max_seconds(services)))
        return
    speech: dict[str, Any] = {"text": text, "language": event.language, **({"motion": motion} if motion else {})}
    voice = await services.storage.user_voice(event.user.key)  # type: ignore[attr-defined]
    if voice:
        speech["voice"] = voice
    await submit_talk(services, event, channel, folder, speech, round_video)


async def receive_voice(services: Services, event: Event, channel: ReplyChannel, pending: Any) -> None:
    """Makes the portrait /talk kept say the voice message (or audio file) the user sent."""
    audio = next((a for a in event.attachments if is_audio(a)), None)
    if audio is None:
        raise UserFacingError("talk.not_voice")
    payload = pending.payload or {}
    folder = Path(str(payload.get("folder", "")))
    own = services.user_dir(event.user.key) / FOLDER
    inside = folder.resolve().is_relative_to(own.resolve())
    if not inside or not await asyncio.to_thread((folder / "input.jpg").is_file):
        raise UserFacingError("talk.photo_gone")
    limit = services.max_upload_bytes
    if audio.size is not None and audio.size > limit:
        raise UserFacingError("talk.audio_too_large", size_mb=f"{audio.size / MB:.1f}", max_mb=f"{limit / MB:.1f}")
    data = await audio.fetch()
    if len(data) > limit:
        raise UserFacingError("talk.audio_too_large", size_mb=f"{len(data) / MB:.1f}", max_mb=f"{limit / MB:.1f}")
    path = folder / "input.audio"
    await asyncio.to_thread(path.write_bytes, data)
    speech = {"audio": str(path.resolve()), **({"motion": payload["motion"]} if payload.get("motion") else {})}
    await submit_talk(services, event, channel, folder, speech, bool(payload.get("round")))


async def submit_talk(services: Services, event: Event, channel: ReplyChannel, folder: Path,
                      speech: dict[str, Any], round_video: bool) -> None:
    """Queues the "talk" job on the staged portrait and speech."""
    params = {"image": str((folder / "input.jpg").resolve()), **speech, "round": round_video,
              "out_dir": str(folder.resolve())}
    await submit_staged(services, event, channel, KIND, params, folder)
    log.info("talk queued for %s (%s%s)", event.user.key, "audio" if "audio" in speech else "text",
             ", round" if round_video else "")


def max_seconds(services: Services) -> int:
    """The longest speech the pipeline takes (``[pipeline] talk_max_seconds``), for the words asking for it."""
    pipeline = getattr(services.settings, "pipeline", None) or {}
    return round(float(pipeline.get("talk_max_seconds", TALK_DEFAULTS["talk_max_seconds"])))


# -- /voice --------------------------------------------------------------------------------------
def talk_settings(services: Services) -> dict[str, Any]:
    return getattr(services.settings, "pipeline", None) or {}


def online_speech(services: Services) -> bool:
    """Whether the operator lets /talk text go to Microsoft's online speech service (edge-tts)."""
    return edge_enabled(talk_settings(services))


def voices_for(services: Services) -> list[str]:
    """The voices /voice offers, by language (English, then Mandarin): Kokoro's where its files are
    installed, edge-tts's where enabled, then espeak-ng."""
    offered: list[str] = []
    for language in VOICE_LANGUAGES:
        if kokoro.FEATURE in services.features_installed:
            offered += [v.id for v in kokoro.voices_of(language)]
        if online_speech(services):
            offered += list(EdgeTTS.LANGUAGE_VOICES.get(language, ()))
    return [*offered, OFFLINE_VOICE]


def voice_label(voice: str, lang: str) -> str:
    """``EN · Heart (US, female)`` for Kokoro, ``Emma (en-US) · online`` for edge-tts, the catalogue's words for espeak."""
    if voice == OFFLINE_VOICE:
        return t("talk.voice_offline", lang)
    known = next((v for v in kokoro.VOICES if v.id == voice), None)
    if known is not None:
        gender = t("talk.voice_female" if known.female else "talk.voice_male", lang)
        if known.language == "zh":
            return t("talk.voice_kokoro_zh", lang, name=known.name, gender=gender)
        return t("talk.voice_kokoro_en", lang, name=known.name, accent=known.accent, gender=gender)
    locale, _, name = voice.partition("-")[2].partition("-")
    name = name.removesuffix("Neural").removesuffix("Multilingual")
    return f"{name} ({voice.split('-')[0]}-{locale}) · {t('talk.voice_online', lang)}"


def voice_language(voice: str, fallback: str) -> str:
    """The language a voice speaks (its samples are in it)."""
    return kokoro.voice_language(voice) or edge_voice_language(voice) or fallback


async def choose_voice(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows the voices by language as buttons (the current one ticked), each with a ▶ sample button."""
    lang = event.language
    voices = voices_for(services)
    if voices == [OFFLINE_VOICE]:
        await channel.send_text(t("talk.voice_offline_only", lang))
        return
    current = await services.storage.user_voice(event.user.key)  # type: ignore[attr-defined]
    current = current if current in voices else voices[0]
    sample = t("talk.voice_sample_button", lang)
    keyboard = [[Button(("✓ " if v == current else "") + voice_label(v, lang), buttons.payload(VOICE_ACTION, v)),
                 Button(sample, buttons.payload(SAMPLE_ACTION, v))] for v in voices]
    await channel.send_text(t("talk.voice_choose", lang), keyboard)


async def press_voice(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Stores the presser's /talk voice (anyone may press: it sets their own)."""
    lang = event.language
    if argument not in voices_for(services):
        await channel.answer_button(t("button.stale", lang))
        return
    await services.storage.set_voice(event.user.key, argument)  # type: ignore[attr-defined]
    log.info("%s chose the voice %s", event.user.key, argument)
    await buttons.answer_choice(event, channel, t("talk.voice_set", lang, voice=voice_label(argument, lang)), "/voice")


async def press_sample(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Queues a short sample of a voice, spoken in its own language, for the presser."""
    lang = event.language
    if argument not in voices_for(services):
        await channel.answer_button(t("button.stale", lang))
        return
    await channel.answer_button()
    spoken = voice_language(argument, lang)
    folder = services.user_dir(event.user.key) / FOLDER / "samples" / secrets.token_hex(6)
    params = {"sample": True, "voice": argument, "language": spoken, "text": t("talk.voice_sample_text", spoken),
              "out_dir": str(folder.resolve())}
    await submit_with_progress(services, event, channel, SAMPLE_KIND, params)


async def present_sample(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel,
                         lang: str) -> None:
    """Sends the sample as a voice message captioned with the voice's name."""
    caption = t("talk.voice_sample_caption", lang, voice=voice_label(str(job.params.get("voice")), lang))
    for artifact in artifacts:
        if artifact.delivered_at is not None:
            continue
        file_id = (artifact.file_ids or {}).get(channel.chat.platform)
        media = Media(file_id=file_id) if file_id else Media(path=Path(artifact.path))
        sent = await channel.send_audio(media, caption=caption, voice=True)
        await services.storage.mark_delivered(artifact.id, channel.chat.platform, sent.file_id)


def is_audio(attachment: Attachment) -> bool:
    return attachment.kind in AUDIO_KINDS or (attachment.mime_type or "").startswith("audio/")


# -- the portrait --------------------------------------------------------------------------------
async def portrait_source(services: Services, event: Event) -> cartoon.Source:
    """The picture to animate (see the module docstring); refuses someone else's."""
    source = await cartoon.command_source_for(services, event, "talk")
    if source is None:
        source = await latest_result(services, event.user.key)
    if source is None:
        source = await cartoon.latest_selfie(services, event)
    if source is None:
        raise UserFacingError("talk.no_portrait")
    return source


async def latest_result(services: Services, user_key: str) -> cartoon.Source | None:
    """The user's newest image result that is still on disk."""
    storage: Any = services.storage
    for job in sorted(await storage.user_jobs(user_key, DONE_STATES), key=lambda j: j.id, reverse=True):
        for artifact in await storage.job_artifacts(job.id):
            if artifact.owner_key == user_key and artifact.media_type.startswith("image/") \
                    and await asyncio.to_thread(Path(artifact.path).is_file):
                return cartoon.Source(path=Path(artifact.path), artifact_id=artifact.id)
    return None


async def stage_portrait(services: Services, user_key: str, source: cartoon.Source) -> Path:
    """Copies the portrait into a new job folder of the user's own; returns the folder."""
    jobs = services.user_dir(user_key) / FOLDER / "jobs"
    folder = jobs / secrets.token_hex(6)
    await asyncio.to_thread(_prune_folders, jobs, INPUT_TTL_S)
    await asyncio.to_thread(cartoon._stage, source, folder / "input.jpg", services.max_upload_bytes,
                            int(services.settings.limits.max_pixels))
    return folder


async def press_result(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Makes the presser's result talk: asks for the voice message (ownership was checked by the registry)."""
    path = Path(artifact.path)
    if not await asyncio.to_thread(path.is_file):
        raise UserFacingError("talk.photo_gone")
    folder = await stage_portrait(services, event.user.key, cartoon.Source(path=path, artifact_id=artifact.id))
    await channel.answer_button()
    await router.expect_input(services, event, KIND, {"folder": str(folder), "round": False})
    await channel.send_text(t("talk.send_voice", event.language, max_seconds=max_seconds(services)))


# -- the finished job ---------------------------------------------------------------------------
async def present_talk(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel, lang: str) -> None:
    """Sends the video (a round note when asked and possible), says which animator ran, drops the inputs.

    The caption and each video's buttons get the registered decorations (``handlers.hooks``), as every result."""
    meta = (job.result or {}).get("meta") or {}
    what = t("talk.caption_lipsync" if meta.get("animator") == "wav2lip" else "talk.caption_landmarks", lang)
    caption = hooks.decorate_caption(services, job, what, lang)
    platform = channel.chat.platform
    for artifact in artifacts:
        if artifact.delivered_at is not None:
            continue
        file_id = (artifact.file_ids or {}).get(platform)
        media = Media(file_id=file_id) if file_id else Media(path=Path(artifact.path))
        keyboard = hooks.result_keyboard(services, job, [artifact], lang)
        if job.params.get("round"):
            try:
                note = await channel.send_video_note(media)
            except NotSupported:
                log.info("job %d: no round videos on %s; sending a plain video", job.id, platform)
            else:
                await services.storage.mark_delivered(artifact.id, platform, note.file_id)
                await channel.send_text(caption, keyboard)  # a video note carries no caption or buttons
                continue
        sent = await channel.send_video(media, caption=caption, buttons=keyboard)
        await services.storage.mark_delivered(artifact.id, platform, sent.file_id)
    folder = Path(str(job.params.get("out_dir", "")))
    if FOLDER in folder.parts:
        for name in ("input.jpg", "input.audio"):
            await asyncio.to_thread((folder / name).unlink, True)


def _prune_folders(jobs: Path, max_age_s: float) -> None:
    """Removes the inputs of jobs that never delivered (failed, cancelled, never answered) after a day."""
    if jobs.is_dir():
        cartoon._prune([*jobs.glob("*/input.jpg"), *jobs.glob("*/input.audio")], max_age_s)


registry.register_command("talk", make_talk, "help.talk")
registry.register_command("voice", choose_voice, "help.voice")
buttons.register_core_button(VOICE_ACTION, press_voice)
buttons.register_core_button(SAMPLE_ACTION, press_sample)
register_presenter(SAMPLE_KIND, present_sample)
registry.register_pending(KIND, receive_voice)
buttons.register_result_button(RESULT_ACTION, "talk.button", press_result, applies_to={"portrait", "cartoon"})
register_presenter(KIND, present_talk)
