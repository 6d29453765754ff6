"""The ReplyChannel for Discord: where each message goes, and buttons that survive restarts.

Messages with buttons (a job's progress message, the styles catalogue) and results are normal
channel/DM messages: their channel and message ids are all a later edit needs, also after the
interaction token expired (15 min) or the bot restarted. The interaction that started a request
carries what only its user should see: plain answers and errors, anything of a private command
(/status, /delete), ``Visibility.REQUESTER``; in a server those are ephemeral. When the token no
longer works (401 / 50027), those go to the user's DM instead, and everything else to the channel.
Buttons carry ``fc:<action>:<argument>`` and are routed by ``PayloadButton`` (a dynamic item), so
a press reaches the bot whatever message or restart it comes from.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
from PIL import Image

from bot.platforms.textsplit import split_text
from handlers.messages import t
from handlers.protocols import (
    Button,
    Chat,
    ChatUnreachable,
    Media,
    MessageRef,
    NotSupported,
    SentFile,
    User,
    Visibility,
)

log = logging.getLogger(__name__)

PLATFORM = "discord"
TEXT_MAX = 2000  # characters in one message
LABEL_MAX = 80  # characters on a button
ROW_MAX = 5  # buttons in a row
ROWS_MAX = 5  # rows under a message
FILES_MAX = 10  # attachments in a message
EMBEDS_MAX = 10  # embeds in a message
EMBED_TITLE_MAX = 256
CUSTOM_ID_PREFIX = "fc:"
DEFAULT_UPLOAD_LIMIT = discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES
# Error codes that mean the interaction's token can no longer be used: invalid webhook token,
# unknown webhook, unknown interaction, already acknowledged.
DEAD_TOKEN_CODES = frozenset({50027, 10015, 10062, 40060})
UNKNOWN_MESSAGE = 10008
UNKNOWN_CHANNEL = 10003
# Downscaling steps for a result over the upload limit: JPEG qualities per size, then smaller.
JPEG_QUALITIES = (90, 80, 70)
SCALE_STEP = 0.8
MIN_SIDE_PX = 64
# Users and chats an adapter remembers facts about (DM channel, upload limit, language); older ones are
# asked of Discord again or take the default.
REMEMBERED_MAX = 10_000


# -- buttons ------------------------------------------------------------------------------------
class PayloadButton(discord.ui.DynamicItem[discord.ui.Button], template=r"fc:(?P<payload>[a-z][a-z0-9_]{0,15}:.+)"):
    """A button whose custom id is ``fc:<action>:<argument>``; a press goes to the adapter's ``run_button``."""

    def __init__(self, payload: str, label: str = "", row: int | None = None) -> None:
        super().__init__(discord.ui.Button(label=(label or "·")[:LABEL_MAX], custom_id=CUSTOM_ID_PREFIX + payload,
                                           style=discord.ButtonStyle.secondary, row=row))
        self.payload = payload

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: Any) -> PayloadButton:
        return cls(match["payload"], item.label or "")

    async def callback(self, interaction: discord.Interaction) -> None:
        adapter = getattr(interaction.client, "adapter", None)
        if adapter is None:
            log.error("discord: a button press reached a client without an adapter")
            return
        await adapter.run_button(interaction, self.payload)


def keyboards(rows: list[list[Button]] | None) -> list[list[list[Button]]]:
    """Splits button rows into keyboards Discord accepts (5 rows of 5 under one message)."""
    fitted: list[list[Button]] = []
    for row in rows or []:
        fitted.extend(row[i:i + ROW_MAX] for i in range(0, len(row), ROW_MAX) if row[i:i + ROW_MAX])
    return [fitted[i:i + ROWS_MAX] for i in range(0, len(fitted), ROWS_MAX)]


def build_view(rows: list[list[Button]] | None) -> discord.ui.View | None:
    """A persistent view (no timeout) of payload buttons; None for no buttons."""
    if not rows:
        return None
    view = discord.ui.View(timeout=None)
    for number, row in enumerate(rows):
        for button in row:
            view.add_item(PayloadButton(button.payload, button.label, row=number))
    return view


# -- text and files -----------------------------------------------------------------------------


def fit_image(data: bytes, filename: str, limit: int) -> tuple[bytes, str]:
    """The image as is when within `limit` bytes, else recompressed (JPEG) and downscaled until it fits."""
    if len(data) <= limit:
        return data, filename
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image = opened.convert("RGBA") if opened.mode in ("RGBA", "LA", "P") else opened.convert("RGB")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    stem = Path(filename).stem or "image"
    scaled = image
    while True:
        for quality in JPEG_QUALITIES:
            out = io.BytesIO()
            scaled.save(out, format="JPEG", quality=quality, optimize=True)
            if out.tell() <= limit:
                return out.getvalue(), f"{stem}.jpg"
        width, height = round(scaled.width * SCALE_STEP), round(scaled.height * SCALE_STEP)
        if min(width, height) < MIN_SIDE_PX:
            raise NotSupported(f"{filename} does not fit in {limit} bytes")
        scaled = image.resize((width, height), Image.Resampling.LANCZOS)


def pack_files(files: list[tuple[bytes, str]], limit: int) -> list[list[int]]:
    """Groups file indexes into messages of at most 10 files and `limit` bytes."""
    groups: list[list[int]] = []
    size = 0
    for index, (data, _) in enumerate(files):
        if not groups or len(groups[-1]) >= FILES_MAX or size + len(data) > limit:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += len(data)
    return groups


async def _read_media(media: Media) -> tuple[bytes, str]:
    if media.path is None:
        # Discord has no reusable file ids: every send uploads the file again.
        raise ValueError("a Discord upload needs Media.path")
    return await asyncio.to_thread(media.path.read_bytes), media.path.name


def _dead_token(exc: discord.HTTPException) -> bool:
    return exc.status == 401 or exc.code in DEAD_TOKEN_CODES


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """Turns Discord's refusals for good (403: blocked, DMs closed, no access; Unknown Channel) into
    ChatUnreachable; other errors pass (they may pass by themselves)."""
    try:
        yield
    except discord.HTTPException as exc:
        if exc.status == 403 or (exc.status == 404 and exc.code == UNKNOWN_CHANNEL):
            raise ChatUnreachable(f"{exc.status} {exc.code}: {exc.text}") from exc
        raise


# -- the channel --------------------------------------------------------------------------------
class Recent(OrderedDict[str, Any]):
    """A dict of the `limit` entries written last: what an adapter learns per user or chat stays bounded."""

    def __init__(self, limit: int = REMEMBERED_MAX) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class DiscordLink:
    """What every channel of one adapter shares: the client and what was learned about chats and users."""

    client: discord.Client
    default_language: str = "en"
    upload_limits: Recent = field(default_factory=Recent)  # chat id -> bytes (from interactions)
    dm_channels: Recent = field(default_factory=Recent)  # user id -> DM channel id (else asked of Discord)
    # Server channels where a user and the bot may both post pictures (set by the adapter).
    post_targets: Callable[[User], Awaitable[list[Chat]]] | None = None

    def upload_limit(self, chat: Chat) -> int:
        return self.upload_limits.get(chat.id, DEFAULT_UPLOAD_LIMIT)

    def messageable(self, chat: Chat) -> discord.PartialMessageable:
        kind = discord.ChannelType.private if chat.is_private else discord.ChannelType.text
        return self.client.get_partial_messageable(int(chat.id), type=kind)

    async def dm_chat(self, user: User) -> Chat:
        """The user's DM with the bot (opened once, then remembered)."""
        channel_id = self.dm_channels.get(user.id)
        if channel_id is None:
            channel = await self.client.create_dm(discord.Object(int(user.id)))
            channel_id = self.dm_channels[user.id] = channel.id
        return Chat(platform=PLATFORM, id=str(channel_id), is_private=True)


class DiscordChannel:
    """A ReplyChannel into one Discord channel or DM, knowing the interaction that asked, if any."""

    def __init__(self, link: DiscordLink, chat: Chat, *, requester: User | None = None, language: str = "en",
                 interaction: discord.Interaction | None = None, private: bool = False,
                 usable: bool = True) -> None:
        self._link = link
        self.chat = chat
        self.requester = requester
        self.language = language
        self._interaction = interaction if usable else None
        self._component = interaction is not None and interaction.type is discord.InteractionType.component
        self._private = private  # every answer is for the requester only (/status, /delete)
        # A button press has no response message of its own to fill: answers are follow-ups.
        self._original_used = self._component
        self._own: set[int] = set()  # messages sent through the interaction (editable with its token)
        self._original_id: int | None = None  # the command's response message, once filled
        self._addressee: User | None = None  # named in public messages in a server (see address)
        self._replace: MessageRef | None = None  # the next public message edits this one (result_in_place)
        self.replaced = False
        self.answered = False

    # -- who a job's messages are for --------------------------------------------------------------
    def address(self, user: User) -> None:
        """Mentions `user` in this channel's public messages in a server (a job's progress and result),
        pinging them alone: the ephemeral "thinking…" that said who asked is gone by then."""
        self._addressee = user if user.platform == PLATFORM and user.id.isdecimal() else None

    def result_in_place(self, ref: MessageRef) -> None:
        """The next public message replaces `ref` (a job's progress message) instead of following it."""
        self._replace, self.replaced = ref, False

    def _public(self, content: str | None) -> tuple[str | None, discord.AllowedMentions | None]:
        """A public message's content, led by the addressee's mention in a server, and whom it may ping
        (None: the client's default, nobody)."""
        user = self._addressee
        if user is None or self.chat.is_private:
            return content, None
        mention = f"<@{user.id}>"
        text = f"{mention} {content}" if content else mention
        return text[:TEXT_MAX], discord.AllowedMentions(everyone=False, roles=False,
                                                        users=[discord.Object(int(user.id))])

    async def _replace_progress(self, content: str | None, buttons: list[list[Button]] | None,
                                files: list[tuple[bytes, str]] | tuple[()],
                                embeds: list[discord.Embed] | None = None) -> discord.Message | None:
        """Edits the result into the progress message; None when that message is gone (then it is posted)."""
        ref, self._replace = self._replace, None
        assert ref is not None
        content, mentions = self._public(content)
        try:
            with _refusals():
                message = await self._link.messageable(ref.chat).get_partial_message(int(ref.message_id)).edit(
                    content=content, attachments=_files(files), view=build_view(buttons), allowed_mentions=mentions,
                    **({"embeds": embeds} if embeds else {}))
        except discord.NotFound:
            log.info("discord: progress message %s in %s is gone; posting the result", ref.message_id, ref.chat.key)
            return None
        self.replaced = True
        return message

    # -- routing ---------------------------------------------------------------------------------
    def _for_requester(self, visibility: Visibility, buttons: list[list[Button]] | None, files: bool) -> bool:
        """Whether a message is the requester's answer rather than something for the chat."""
        if visibility is Visibility.REQUESTER:
            return True
        if files:
            return False  # results are never ephemeral
        return self._private or not buttons

    async def _send(self, content: str | None, buttons: list[list[Button]] | None, visibility: Visibility,
                    files: list[tuple[bytes, str]] = (),
                    embeds: list[discord.Embed] | None = None) -> tuple[Chat, discord.Message]:
        for_requester = self._for_requester(visibility, buttons, bool(files))
        extra: dict[str, Any] = {"embeds": embeds} if embeds else {}
        if for_requester and self._interaction is not None:
            try:
                return self.chat, await self._send_interaction(content, buttons, files, embeds)
            except discord.HTTPException as exc:
                if not _dead_token(exc):
                    raise
                log.info("discord: interaction %s expired (%s); answering outside it", self._interaction.id, exc.code)
                self._interaction = None
        if not self.chat.is_private and (visibility is Visibility.REQUESTER or (for_requester and self._private)):
            target = await self._requester_dm()
            with _refusals():
                message = await self._link.messageable(target).send(
                    content=content or None, files=_files(files) or None, view=build_view(buttons),  # type: ignore[arg-type]
                    **extra)
            return target, message
        if self._replace is not None:
            replaced = await self._replace_progress(content, buttons, files, embeds)
            if replaced is not None:
                return self.chat, replaced
        content, mentions = self._public(content)
        with _refusals():
            message = await self._link.messageable(self.chat).send(
                content=content or None, files=_files(files) or None, view=build_view(buttons),  # type: ignore[arg-type]
                allowed_mentions=mentions, **extra)
        return self.chat, message

    async def _send_interaction(self, content: str | None, buttons: list[list[Button]] | None,
                                files: list[tuple[bytes, str]],
                                embeds: list[discord.Embed] | None = None) -> discord.Message:
        interaction = self._interaction
        assert interaction is not None
        view = build_view(buttons)
        if not self._original_used:
            self._original_used = True
            kwargs: dict[str, Any] = {"content": content}
            if view is not None:
                kwargs["view"] = view
            if files:
                kwargs["attachments"] = _files(files)
            if embeds:
                kwargs["embeds"] = embeds
            try:
                message: discord.Message = await interaction.edit_original_response(**kwargs)
            except discord.NotFound as exc:
                # The user dismissed the ephemeral "thinking…": the token still takes follow-ups.
                if exc.code != UNKNOWN_MESSAGE:
                    raise
            else:
                self._original_id = message.id
                self._own.add(message.id)
                return message
        kwargs = {"ephemeral": not self.chat.is_private, "wait": True}
        if view is not None:
            kwargs["view"] = view
        if files:
            kwargs["files"] = _files(files)
        if embeds:
            kwargs["embeds"] = embeds
        message = await interaction.followup.send(content or discord.utils.MISSING, **kwargs)
        self._own.add(message.id)
        return message

    async def _requester_dm(self) -> Chat:
        if self.requester is None:
            raise NotSupported("no requester to reach privately")
        try:
            return await self._link.dm_chat(self.requester)
        except discord.HTTPException as exc:
            raise NotSupported("cannot open a DM with the user") from exc

    # -- ReplyChannel ----------------------------------------------------------------------------
    async def send_text(self, text: str, buttons: list[list[Button]] | None = None,
                        visibility: Visibility = Visibility.CHAT) -> MessageRef:
        parts = split_text(text, TEXT_MAX)
        groups = keyboards(buttons)
        ref: MessageRef | None = None
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            chat, message = await self._send(part, groups[0] if last and groups else None, visibility)
            ref = MessageRef(chat, str(message.id))
        for extra in groups[1:]:
            await self._send(t("core.more_actions", self.language), extra, visibility)
        assert ref is not None
        return ref

    async def edit_text(self, ref: MessageRef, text: str, buttons: list[list[Button]] | None = None) -> None:
        message_id = int(ref.message_id)
        groups = keyboards(buttons)
        view = build_view(groups[0] if groups else None)
        content = text[:TEXT_MAX]
        interaction = self._interaction
        if interaction is not None:
            pressed = self._component and interaction.message is not None and interaction.message.id == message_id
            try:
                if pressed or message_id == self._original_id:
                    await interaction.edit_original_response(content=content, view=view)
                    return
                if message_id in self._own:
                    await interaction.followup.edit_message(message_id, content=content, view=view)
                    return
            except discord.HTTPException as exc:
                if not _dead_token(exc):
                    raise
                self._interaction = None
        content, mentions = self._public(content)
        with _refusals():
            await self._link.messageable(ref.chat).get_partial_message(message_id).edit(
                content=content, view=view, allowed_mentions=mentions)

    async def delete_message(self, ref: MessageRef) -> None:
        try:
            await self._link.messageable(ref.chat).get_partial_message(int(ref.message_id)).delete()
        except discord.NotFound:
            log.info("discord: message %s in %s was already gone", ref.message_id, ref.chat.key)

    async def send_images(self, images: list[Media], caption: str | None = None,
                          buttons: list[list[Button]] | None = None,
                          visibility: Visibility = Visibility.CHAT) -> list[SentFile]:
        if not images:
            return []
        limit = self._link.upload_limit(self.chat)
        files = []
        for media in images:
            data, name = await _read_media(media)
            files.append(await asyncio.to_thread(fit_image, data, name, limit))
        groups = pack_files(files, limit)
        pads = keyboards(buttons)
        sent: list[SentFile] = []
        for number, group in enumerate(groups):
            first, last = number == 0, number == len(groups) - 1
            text = caption if first else None
            text = text or (images[group[0]].caption if len(group) == 1 else None)
            chat, message = await self._send(text[:TEXT_MAX] if text else None, pads[0] if last and pads else None,
                                             visibility, [files[i] for i in group])
            sent.extend(SentFile(MessageRef(chat, str(message.id)), None) for _ in group)
        for extra in pads[1:]:
            await self._send(t("core.more_actions", self.language), extra, visibility)
        return sent

    async def send_gallery(self, images: list[Media], text: str, buttons: list[list[Button]] | None = None,
                           visibility: Visibility = Visibility.CHAT) -> MessageRef:
        """One message: `text`, an embed per image titled with its caption (a gallery), and the buttons.
        Falls back to the pictures, then the text, when they do not fit one message."""
        limit = self._link.upload_limit(self.chat)
        files = []
        for index, media in enumerate(images[:EMBEDS_MAX]):
            data, name = await _read_media(media)
            data, name = await asyncio.to_thread(fit_image, data, name, limit)
            files.append((data, f"{index:02d}{Path(name).suffix or '.jpg'}"))
        pads = keyboards(buttons)
        if len(images) > EMBEDS_MAX or sum(len(d) for d, _ in files) > limit:
            await self.send_images(images)
            return await self.send_text(text, buttons, visibility)
        embeds = [discord.Embed(title=(media.caption or "")[:EMBED_TITLE_MAX] or None)
                  .set_image(url=f"attachment://{name}") for media, (_, name) in zip(images, files, strict=True)]
        chat, message = await self._send(text[:TEXT_MAX], pads[0] if pads else None, visibility, files, embeds)
        for extra in pads[1:]:  # Discord takes 5 rows of buttons a message
            await self._send(t("core.more_actions", self.language), extra, visibility)
        return MessageRef(chat, str(message.id))

    async def _send_file(self, media: Media, caption: str | None, buttons: list[list[Button]] | None = None) -> SentFile:
        data, name = await _read_media(media)
        if len(data) > self._link.upload_limit(self.chat):
            raise NotSupported(f"{name} is over the upload limit of this chat")
        text = caption or media.caption
        pads = keyboards(buttons)
        chat, message = await self._send(text[:TEXT_MAX] if text else None, pads[0] if pads else None,
                                          Visibility.CHAT, [(data, name)])
        return SentFile(MessageRef(chat, str(message.id)), None)

    async def send_video(self, video: Media, caption: str | None = None,
                         buttons: list[list[Button]] | None = None) -> SentFile:
        return await self._send_file(video, caption, buttons)

    async def send_video_note(self, video: Media) -> SentFile:
        raise NotSupported("Discord has no round video notes")

    async def send_audio(self, audio: Media, caption: str | None = None, voice: bool = False) -> SentFile:
        # A voice message needs a waveform upload flow; an audio file plays inline just as well.
        return await self._send_file(audio, caption)

    async def send_document(self, document: Media, caption: str | None = None) -> SentFile:
        return await self._send_file(document, caption)

    async def post_targets(self) -> list[Chat]:
        """Server channels where the requester and the bot may both post pictures ("Post to channel")."""
        if self.requester is None or self._link.post_targets is None:
            return []
        return await self._link.post_targets(self.requester)

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        """Shows `text` to the presser alone (the press itself was acknowledged on arrival)."""
        if not self._component or self.answered:
            return
        self.answered = True
        if not text or self._interaction is None:
            return
        try:
            await self._interaction.followup.send(text[:TEXT_MAX], ephemeral=True, wait=True)
        except discord.HTTPException as exc:
            # The work of the press still happened; only its short note is lost.
            log.info("discord: could not answer a button press: %s", exc)

    async def finish(self) -> None:
        """Removes the "thinking…" response of a command that answered only outside it."""
        interaction = self._interaction
        if interaction is None or self._original_used:
            return
        try:
            await interaction.delete_original_response()
        except discord.HTTPException as exc:
            log.debug("discord: could not remove the deferred response: %s", exc)


def _files(files: list[tuple[bytes, str]] | tuple[()]) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name) for data, name in files]
