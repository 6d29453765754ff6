"""What handlers see of the world: platform-neutral events, a reply channel, and services.

Adapters in ``bot/`` turn platform updates into an ``Event`` and implement ``ReplyChannel``;
``bot`` implements ``JobQueue`` and passes everything in through ``Services``.
Handlers import nothing of telegram, discord or bot.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class NotSupported(Exception):
    """The platform cannot do this (e.g. a round video note on Discord); handlers fall back."""


class ChatUnreachable(Exception):
    """The platform refused for good to reach the chat: the user blocked the bot, the bot was removed, the
    chat is gone (Telegram 403 or "chat not found"; Discord 403 or Unknown Channel). Trying again is useless."""


class DuplicateUpdate(Exception):
    """This chat update made a job already (the platform sent it again, e.g. after a crash): do nothing."""


class Visibility(str, Enum):
    """Who sees a message."""

    CHAT = "chat"  # everyone in the chat
    REQUESTER = "requester"  # only the user who asked, where the platform can (Discord ephemeral)


@dataclass(frozen=True)
class User:
    platform: str  # "telegram", "discord"
    id: str
    name: str = ""
    language: str | None = None

    @property
    def key(self) -> str:
        """The user key used in rows, paths, access lists and logs: ``telegram:123``."""
        return f"{self.platform}:{self.id}"


@dataclass(frozen=True)
class Chat:
    platform: str
    id: str
    is_private: bool
    title: str = ""
    # In a group: the requester's message that answers (and a job's results) reply to. Not part of
    # the chat's identity: two Chats differing only here are equal.
    reply_to: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.id}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"platform": self.platform, "id": self.id, "is_private": self.is_private}
        if self.reply_to is not None:
            data["reply_to"] = self.reply_to
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chat:
        reply_to = data.get("reply_to")
        return cls(platform=data["platform"], id=str(data["id"]), is_private=bool(data["is_private"]),
                   reply_to=str(reply_to) if reply_to is not None else None)


@dataclass(frozen=True)
class Button:
    """An inline button; `payload` is ``action:id`` (<= 64 bytes) resolved against the database."""

    label: str
    payload: str

    def __post_init__(self) -> None:
        if len(self.payload.encode()) > 64:
            raise ValueError(f"button payload over 64 bytes: {self.payload!r}")


@dataclass
class Attachment:
    """A file the user sent; its bytes are fetched lazily (and capped by the adapter)."""

    kind: str  # "photo", "document", "voice", "audio", "video"
    size: int | None
    mime_type: str | None
    filename: str | None
    fetch: Callable[[], Awaitable[bytes]]


BOT_SENDER = "bot"  # RepliedMessage.sender of the bot's own messages


@dataclass
class RepliedMessage:
    """The message an event replies to: its id, who sent it and its picture (fetched lazily), if any."""

    message_id: str
    sender: str  # the sender's user key, or "bot" for this bot's own messages ("" when unknown)
    image: Attachment | None = None
    file_id: str | None = None  # the platform's id of that picture, to find the bot's own result by
    sender_user: User | None = None  # the sender as a user (a person, not a bot), where the platform says


    @property
    def from_bot(self) -> bool:
        return self.sender == BOT_SENDER


@dataclass
class Event:
    """One incoming message or button press, platform-neutral."""

    user: User
    chat: Chat
    text: str = ""
    command: str | None = None  # "style" for "/style hanfu 2"
    args: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    message_id: str | None = None
    button_payload: str | None = None  # set for a button press
    language: str = "en"  # the catalogue language for replies
    reply_to: RepliedMessage | None = None  # the message this one replies to, where the platform says
    # Set for a typed inline query (Telegram's "@bot ..." in any chat): the text typed so far.
    inline_query: str | None = None
    # Whether the user administers this group chat (asked of the platform lazily); None where unknown.
    chat_admin: Callable[[], Awaitable[bool]] | None = None
    # The platform's identity of this update (chat and message id, or a button press's query id): the
    # same when the platform sends the update again. Jobs it creates carry it (see submission_key).
    update_key: str | None = None
    # People the message names so that the platform says who they are (Telegram's text_mention, a
    # Discord user option): the partners of /duo and /group.
    mentions: list[User] = field(default_factory=list)
    _submissions: int = field(default=0, repr=False, compare=False)

    def submission_key(self) -> str | None:
        """The key of the next job this event submits: the update's key, then ``key#2``, ``key#3``...
        (handling the same update again submits the same sequence, so each job exists once)."""
        if self.update_key is None:
            return None
        self._submissions += 1
        return self.update_key if self._submissions == 1 else f"{self.update_key}#{self._submissions}"


@dataclass(frozen=True)
class MessageRef:
    """Where a sent message lives, JSON-able so a job can edit it after a restart."""

    chat: Chat
    message_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"chat": self.chat.to_dict(), "message_id": self.message_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MessageRef:
        return cls(chat=Chat.from_dict(data["chat"]), message_id=str(data["message_id"]))


@dataclass(frozen=True)
class SentFile:
    """A file that reached the chat, with the platform's id for re-sending without upload."""

    message: MessageRef
    file_id: str | None


@dataclass(frozen=True)
class Media:
    """A file to send: a local path, or a platform file id from an earlier send."""

    path: Path | None = None
    file_id: str | None = None
    caption: str | None = None


class ReplyChannel(Protocol):
    """Sends into one chat. Implemented by each adapter."""

    chat: Chat

    async def send_text(
        self, text: str, buttons: list[list[Button]] | None = None, visibility: Visibility = Visibility.CHAT
    ) -> MessageRef: ...

    async def edit_text(self, ref: MessageRef, text: str, buttons: list[list[Button]] | None = None) -> None: ...

    async def delete_message(self, ref: MessageRef) -> None: ...

    async def send_images(
        self, images: list[Media], caption: str | None = None, buttons: list[list[Button]] | None = None,
        visibility: Visibility = Visibility.CHAT,
    ) -> list[SentFile]:
        """Sends one photo or an album (the adapter splits albums at the platform's limit)."""

    async def send_video(self, video: Media, caption: str | None = None,
                         buttons: list[list[Button]] | None = None) -> SentFile: ...

    async def send_video_note(self, video: Media) -> SentFile:
        """A round video; raises NotSupported where the platform has none."""

    async def send_audio(self, audio: Media, caption: str | None = None, voice: bool = False) -> SentFile: ...

    async def send_document(self, document: Media, caption: str | None = None) -> SentFile: ...

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        """Acknowledges the button press that produced this event (no-op elsewhere)."""


@runtime_checkable
class Addressing(Protocol):
    """A channel that can name whom a job's messages are for (Discord mentions them in a server)."""

    def address(self, user: User) -> None:
        """Names `user` in this channel's public messages from now on."""


@runtime_checkable
class ResultInPlace(Protocol):
    """A channel that can turn a job's progress message into its result (Discord edits the files in)."""

    replaced: bool  # whether the last result_in_place message was replaced

    def result_in_place(self, ref: MessageRef) -> None:
        """The next public message this channel sends replaces `ref` instead of following it."""


@runtime_checkable
class Gallery(Protocol):
    """A channel that can show pictures and a text with buttons as one message (Discord: embeds)."""

    async def send_gallery(self, images: list[Media], text: str, buttons: list[list[Button]] | None = None,
                           visibility: Visibility = Visibility.CHAT) -> MessageRef:
        """Sends `text`, a titled picture per image (its caption) and the buttons together."""


@dataclass
class Submitted:
    """A job the queue accepted."""

    job_id: int
    position: int  # 1: next to run (0: running)
    eta_s: float | None


@dataclass
class JobView:
    """What a handler may know of a job."""

    id: int
    kind: str
    state: str
    position: int | None
    eta_s: float | None
    progress: float | None  # 0..1 while running


class JobQueue(Protocol):
    """The scheduler as handlers see it."""

    async def submit(self, user_key: str, kind: str, params: dict[str, Any], chat: Chat,
                     progress_ref: MessageRef | None = None, update_key: str | None = None) -> Submitted:
        """Writes the job row and queues it; raises UserFacingError("queue.*") when refused, and
        DuplicateUpdate when the update `update_key` (``Event.submission_key``) made a job already."""

    async def attach_progress(self, job_id: int, ref: MessageRef) -> None:
        """Records the message that shows the job's progress."""

    async def cancel(self, user_key: str, job_id: int | None = None) -> list[int]:
        """Cancels the user's job (or all of them); returns the ids cancelled."""

    async def user_jobs(self, user_key: str) -> list[JobView]: ...

    def queue_length(self) -> int:
        """Jobs waiting for a worker now."""

    async def forget_user(self, user_key: str) -> None:
        """Cancels and drops every job of the user (before /delete removes their files)."""
