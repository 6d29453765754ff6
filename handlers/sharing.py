"""Sharing results: a Share button under each result, and a user's results in inline mode.

Telegram: the Share button opens inline mode (the adapter renders it as a switch_inline_query
button); typing ``@BotName`` in any chat lists the user's recent results as cached photos, sent
by file id (nothing is uploaded again). Answers are always personal and cached briefly, so one
user's results are never offered to another. Without inline mode, the button says how to forward.

Discord: the Share button on a result lists the server channels where both the user and the bot
may post pictures ("Post to channel"); picking one posts the picture there publicly, with the
user's name. Both presses are checked against the result's owner, and the channel is checked again
when it is picked.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from handlers import buttons, hooks, registry
from handlers.messages import t
from handlers.protocols import Button, Chat, Event, Media, MessageRef, ReplyChannel, Visibility
from handlers.services import Services

log = logging.getLogger(__name__)

SHARE_ACTION = "share"  # share:<artifact id>, under every picture result
POST_ACTION = "post"  # post:<artifact id>.<channel id>, a channel picked to post a result in
INLINE_RESULTS = 30  # newest results offered in inline mode (Telegram shows up to 50)
POST_TARGETS_MAX = 20  # channels offered as buttons (Discord shows 25 under a message)
START_PARAMETER = "share"  # the deep link of the "make your first portrait" inline button
# Kinds of picture results that get a Share button (a new picture feature adds its kind here).
SHARED_KINDS = frozenset({"portrait", "cartoon", "duo", "duo_template"})


@dataclass(frozen=True)
class InlinePhoto:
    """A result offered in inline mode: re-sent by the platform's file id, with the caption and buttons
    every result carries (the platform drops a photo's own metadata)."""

    id: str  # the artifact id
    file_id: str
    caption: str | None = None
    buttons: list[list[Button]] | None = None


@runtime_checkable
class InlineAnswering(Protocol):
    """A channel that answers one typed inline query (Telegram); the adapter makes answers personal."""

    async def answer_inline(self, results: list[InlinePhoto], start_label: str | None = None) -> None: ...


@runtime_checkable
class ChannelPosting(Protocol):
    """A channel whose platform can post a private result in a public channel (Discord)."""

    async def post_targets(self) -> list[Chat]:
        """Channels where both the requester and the bot may post pictures."""


# -- inline mode ----------------------------------------------------------------------------------
async def answer_inline_query(services: Services, event: Event, channel: ReplyChannel, allowed: bool) -> None:
    """Lists the querying user's own recent results (the one whose Share button was pressed first)."""
    if not isinstance(channel, InlineAnswering):
        return
    if not allowed:
        await channel.answer_inline([])
        return
    storage: Any = services.storage
    platform, key = event.user.platform, event.user.key
    found = [a for a in await storage.recent_results(key, platform, INLINE_RESULTS)
             if a.owned_by(key) and (a.file_ids or {}).get(platform)]
    wanted = (event.inline_query or "").strip()
    found.sort(key=lambda a: a.id != wanted)  # stable: the rest stay newest first
    results = [InlinePhoto(a.id, a.file_ids[platform], *await _shown_to_others(services, a, None, event.language))
               for a in found]
    log.info("inline query from %s: %d results", key, len(results))
    await channel.answer_inline(results, None if results else t("sharing.inline_start", event.language))


# -- the Share button -----------------------------------------------------------------------------
async def press_share(services: Services, event: Event, channel: ReplyChannel, artifact: Any) -> None:
    """Offers the channels to post the result in (Discord), else says how to forward it."""
    lang = event.language
    if not isinstance(channel, ChannelPosting) or not artifact.media_type.startswith("image/"):
        await channel.answer_button(t("sharing.forward_hint", lang), alert=True)
        return
    targets = (await channel.post_targets())[:POST_TARGETS_MAX]
    await channel.answer_button()
    if not targets:
        await channel.send_text(t("sharing.no_channels", lang), visibility=Visibility.REQUESTER)
        return
    keyboard = [[Button(target.title or target.id, buttons.payload(POST_ACTION, f"{artifact.id}.{target.id}"))]
                for target in targets]
    await channel.send_text(t("sharing.pick_channel", lang), keyboard, visibility=Visibility.REQUESTER)


async def press_post(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Posts the presser's result in the channel they picked, if both may still post there."""
    lang = event.language
    artifact_id, _, chat_id = argument.rpartition(".")
    artifact = await services.storage.artifact(artifact_id) if artifact_id else None
    if artifact is None or not isinstance(channel, ChannelPosting):
        await channel.answer_button(t("button.stale", lang))
        return
    if not artifact.owned_by(event.user.key):
        log.info("%s tried to post a result of someone else", event.user.key)
        await channel.answer_button(t("button.not_yours", lang), alert=True)
        return
    target = next((c for c in await channel.post_targets() if c.id == chat_id), None)
    if target is None:
        await channel.answer_button(t("sharing.channel_gone", lang), alert=True)
        return
    path = Path(artifact.path)
    if not await asyncio.to_thread(path.is_file):
        await channel.answer_button(t("sharing.result_gone", lang), alert=True)
        return
    await channel.answer_button()
    name = event.user.name or t("core.friend", lang)
    caption, keyboard = await _shown_to_others(services, artifact, t("sharing.caption", lang, name=name), lang)
    await services.channel_for(target).send_images([Media(path=path)], caption=caption, buttons=keyboard)
    log.info("%s posted result %s in %s", event.user.key, artifact.id, target.key)
    done = t("sharing.posted", lang, channel=target.title or target.id)
    if event.message_id is not None:
        await channel.edit_text(MessageRef(event.chat, event.message_id), done, None)
    else:
        await channel.send_text(done, visibility=Visibility.REQUESTER)


async def _shown_to_others(services: Services, artifact: Any, caption: str | None,
                           lang: str) -> tuple[str | None, list[list[Button]] | None]:
    """A result's caption and buttons where others see it: every decoration (AI note, Report), no owner buttons."""
    job = await services.storage.job(artifact.job_id) if artifact.job_id is not None else None
    return hooks.decorate_result(services, job, caption, [artifact], lang, owner_buttons=False)


registry.register_inline(answer_inline_query)
buttons.register_result_button(SHARE_ACTION, "sharing.button", press_share, applies_to=SHARED_KINDS)
buttons.register_core_button(POST_ACTION, press_post)
