"""The Telegram adapter: python-telegram-bot updates in, platform-neutral events out.

``TelegramAdapter`` owns one PTB ``Application`` (long polling, concurrent updates, a rate
limiter that retries 429s) and runs beside other adapters on the service's event loop: it is
started and stopped explicitly (``async with adapter:``), never with ``run_polling``. Each update
becomes an ``Event`` and a ``TelegramChannel`` for its chat, handed to the dispatch callable
(``router.handle_event`` bound to the services). Handlers return fast: they only submit jobs.

Groups: answers and a job's results reply to the requester's message (``Chat.reply_to``), and
sends into one group wait their turn, in order, under the group rate limit from the config
(``GroupSendQueue``). An inline query ("@bot ..." typed in any chat) becomes an Event with
``inline_query`` set, answered only with that user's own results (``TelegramChannel.answer_inline``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dtm
import functools
import itertools
import logging
from urllib.parse import urlsplit
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from telegram import (
    BotCommand,
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InlineQuery,
    InlineQueryResultCachedPhoto,
    InlineQueryResultsButton,
    InputMediaPhoto,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram import Chat as TgChat
from telegram import User as TgUser
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, TelegramError
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes, TypeHandler

from bot.config import Settings
from bot.lifecycle import StartStop
from bot.platforms.textsplit import split_text
from facechain_core.errors import UserFacingError
from handlers import router
from handlers.messages import normalise_language, t
from handlers.protocols import (
    BOT_SENDER,
    Attachment,
    Button,
    Chat,
    ChatUnreachable,
    Event,
    Media,
    MessageRef,
    NotSupported,
    RepliedMessage,
    ReplyChannel,
    SentFile,
    User,
    Visibility,
)
from handlers.services import Services
from handlers.sharing import SHARE_ACTION, START_PARAMETER, InlinePhoto

log = logging.getLogger(__name__)

PLATFORM = "telegram"
MEDIA_GROUP_MAX = 10  # Telegram's album limit
TEXT_MAX = 4096  # characters in one message
CAPTION_MAX = 1024
COMMAND_DESCRIPTION_MAX = 256
# The Bot API serves files up to 20 MB to bots.
BOT_API_DOWNLOAD_MAX = 20_000_000
MENU_LANGUAGES = ("zh",)  # besides the default (English) menu
ALLOWED_UPDATES = ("message", "callback_query", "inline_query")
ADMIN_STATUSES = frozenset({"creator", "administrator"})
# Bad Request answers meaning the chat is gone for good (a 403 Forbidden always means so).
CONNECT_RETRY_S = (1, 2, 5, 10, 30, 60)  # waits between getMe tries while the Bot API cannot be reached
GONE_CHAT = ("chat not found", "user not found", "not enough rights", "have no rights to send")

Dispatch = Callable[[Event, ReplyChannel], Awaitable[None]]


def parse_command(text: str, bot_username: str | None) -> tuple[str | None, list[str], bool]:
    """Splits ``/name@bot arg ...``; returns (name, args, for_us). Commands for another bot aren't for us."""
    if not text.startswith("/") or len(text) < 2:
        return None, [], True
    head, *args = text.split()
    name, _, target = head[1:].partition("@")
    if target and bot_username and target.lower() != bot_username.lower():
        return None, [], False
    if not name:
        return None, [], True
    return name.lower(), args, True


def to_chat(chat: TgChat) -> Chat:
    return Chat(platform=PLATFORM, id=str(chat.id), is_private=chat.type == TgChat.PRIVATE,
                title=chat.title or chat.full_name or "")


def to_user(user: TgUser) -> User:
    return User(platform=PLATFORM, id=str(user.id), name=user.first_name or user.username or "",
                language=user.language_code)


def _mentioned(message: Message) -> list[User]:
    """The people a message names by a tap on their name (text_mention entities carry the user; an
    @username does not), bots left out, each once."""
    found: dict[str, User] = {}
    for entity in (message.entities or ()) + (message.caption_entities or ()):
        if entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and not entity.user.is_bot:
            person = to_user(entity.user)
            found.setdefault(person.key, person)
    return list(found.values())


def _keyboard(buttons: list[list[Button]] | None, share_inline: bool = False) -> InlineKeyboardMarkup | None:
    if not buttons:
        return None
    return InlineKeyboardMarkup([[_button(b, share_inline) for b in row] for row in buttons if row])


def _button(button: Button, share_inline: bool) -> InlineKeyboardButton:
    action, _, argument = button.payload.partition(":")
    if share_inline and action == SHARE_ACTION:
        # Telegram shares through inline mode: the user picks a chat and "@bot <result id>" is typed there.
        return InlineKeyboardButton(button.label, switch_inline_query=argument)
    return InlineKeyboardButton(button.label, callback_data=button.payload)


class GroupSendQueue:
    """Sends into one group go out one at a time, in the order they were asked for.

    The rate limiter makes a group's sends wait (and retries a 429 after its retry_after); under a
    FIFO lock per group those waits never let a later result overtake an earlier one. Edits of one
    message asked while an earlier edit of it waits are merged into that one (the newest text wins),
    so progress updates never pile up in front of results.
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}  # chat id -> coroutines holding or waiting for its lock
        self._edits: dict[tuple[str, str], Any] = {}  # (chat id, message id) -> newest content of a waiting edit

    @contextlib.asynccontextmanager
    async def turn(self, chat: Chat) -> AsyncIterator[None]:
        """Holds the group's turn to send (private chats send at once)."""
        if chat.is_private:
            yield
            return
        lock = self._locks.setdefault(chat.id, asyncio.Lock())
        self._holders[chat.id] = self._holders.get(chat.id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[chat.id] -= 1
            if not self._holders[chat.id]:  # nobody holds or waits: the lock can go
                del self._holders[chat.id], self._locks[chat.id]

    async def edit(self, chat: Chat, message_id: str, content: Any, send: Callable[[Any], Awaitable[None]]) -> None:
        """Calls ``send(content)`` in the group's turn, with the newest content asked for that message by then."""
        key = (chat.id, message_id)
        if key in self._edits:
            self._edits[key] = content  # the waiting edit sends this instead
            return
        self._edits[key] = content
        taken = False
        try:
            async with self.turn(chat):
                content, taken = self._edits.pop(key), True
                await send(content)
        finally:
            if not taken:
                self._edits.pop(key, None)


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    """What every channel of one adapter shares."""

    queue: GroupSendQueue | None = None
    share_inline: bool = False  # render the Share button as an inline-mode switch
    inline_cache_s: int = 10


def _ref(message: Message) -> MessageRef:
    return MessageRef(chat=to_chat(message.chat), message_id=str(message.message_id))




def _album_chunks(items: list[Any]) -> list[list[Any]]:
    """Chunks of at most 10 (a chunk of one cannot be an album: the caller sends it as a photo)."""
    return [items[i:i + MEDIA_GROUP_MAX] for i in range(0, len(items), MEDIA_GROUP_MAX)]


class TelegramChannel:
    """A ReplyChannel for one Telegram chat (and the button press it answers, if any)."""

    def __init__(self, bot: Any, chat: Chat, *, requester: User | None = None, language: str = "en",
                 query: CallbackQuery | None = None, inline_query: InlineQuery | None = None,
                 options: ChannelOptions | None = None) -> None:
        self._bot = bot
        self.chat = chat
        self.requester = requester
        self.language = language
        self._query = query
        self._inline_query = inline_query
        self._options = options or ChannelOptions()
        self.answered = False

    def _keyboard(self, buttons: list[list[Button]] | None) -> InlineKeyboardMarkup | None:
        return _keyboard(buttons, self._options.share_inline)

    @contextlib.asynccontextmanager
    async def _turn(self, chat: Chat) -> AsyncIterator[None]:
        if self._options.queue is None:
            yield
        else:
            async with self._options.queue.turn(chat):
                yield

    def _target(self, visibility: Visibility) -> Chat:
        if visibility is Visibility.CHAT or self.chat.is_private:
            return self.chat
        # Telegram has no ephemeral messages: "only the requester" means their private chat.
        if self.requester is None:
            raise NotSupported("no requester to reach privately")
        return Chat(platform=PLATFORM, id=self.requester.id, is_private=True)

    async def _to(self, target: Chat, call: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        if target is self.chat and self.chat.reply_to is not None and not self.chat.is_private:
            # In a group, answers and results reply to the requester's message (sent anyway if it's gone).
            kwargs["reply_parameters"] = ReplyParameters(int(self.chat.reply_to), allow_sending_without_reply=True)
        try:
            async with self._turn(target):
                return await call(chat_id=int(target.id), **kwargs)
        except Forbidden as exc:
            if target is not self.chat:
                raise NotSupported("the user has not started a private chat with the bot") from exc
            raise ChatUnreachable(str(exc)) from exc
        except (BadRequest, ChatMigrated) as exc:
            _raise_if_gone(exc)
            raise

    async def send_text(self, text: str, buttons: list[list[Button]] | None = None,
                        visibility: Visibility = Visibility.CHAT) -> MessageRef:
        target = self._target(visibility)
        parts = split_text(text, TEXT_MAX)
        message = None
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            message = await self._to(target, self._bot.send_message, text=part,
                                     reply_markup=self._keyboard(buttons) if last else None)
        assert message is not None
        return _ref(message)

    async def edit_text(self, ref: MessageRef, text: str, buttons: list[list[Button]] | None = None) -> None:
        async def edit(content: tuple[str, list[list[Button]] | None]) -> None:
            try:
                await self._bot.edit_message_text(text=content[0][:TEXT_MAX], chat_id=int(ref.chat.id),
                                                  message_id=int(ref.message_id),
                                                  reply_markup=self._keyboard(content[1]))
            except Forbidden as exc:
                raise ChatUnreachable(str(exc)) from exc
            except (BadRequest, ChatMigrated) as exc:
                _raise_if_gone(exc)
                if "not modified" not in str(exc).lower():
                    raise

        if self._options.queue is None or ref.chat.is_private:
            await edit((text, buttons))
        else:
            await self._options.queue.edit(ref.chat, ref.message_id, (text, buttons), edit)

    async def delete_message(self, ref: MessageRef) -> None:
        try:
            await self._bot.delete_message(chat_id=int(ref.chat.id), message_id=int(ref.message_id))
        except BadRequest as exc:
            log.info("could not delete message %s in %s: %s", ref.message_id, ref.chat.key, exc)

    async def send_images(self, images: list[Media], caption: str | None = None,
                          buttons: list[list[Button]] | None = None,
                          visibility: Visibility = Visibility.CHAT) -> list[SentFile]:
        if not images:
            return []
        target = self._target(visibility)
        sources = [await _source(m) for m in images]
        captions = [(caption if i == 0 and caption else m.caption) for i, m in enumerate(images)]
        captions = [c[:CAPTION_MAX] if c else None for c in captions]
        if len(images) == 1:
            content, filename = sources[0]
            message = await self._to(target, self._bot.send_photo, photo=content, filename=filename,
                                     caption=captions[0], reply_markup=self._keyboard(buttons))
            return [SentFile(_ref(message), _photo_id(message))]
        sent: list[SentFile] = []
        for chunk in _album_chunks(list(zip(sources, captions, strict=True))):
            if len(chunk) == 1:
                (content, filename), text = chunk[0]
                message = await self._to(target, self._bot.send_photo, photo=content, filename=filename, caption=text)
                sent.append(SentFile(_ref(message), _photo_id(message)))
                continue
            media = [InputMediaPhoto(media=content, filename=filename, caption=text)
                     for (content, filename), text in chunk]
            messages = await self._to(target, self._bot.send_media_group, media=media)
            sent.extend(SentFile(_ref(m), _photo_id(m)) for m in messages)
        if buttons:
            # An album cannot carry buttons: they follow in a message of their own.
            await self.send_text(t("core.more_actions", self.language), buttons, visibility)
        return sent

    async def send_video(self, video: Media, caption: str | None = None,
                         buttons: list[list[Button]] | None = None) -> SentFile:
        content, filename = await _source(video)
        message = await self._to(self.chat, self._bot.send_video, video=content, filename=filename,
                                 caption=_caption(caption or video.caption), reply_markup=self._keyboard(buttons))
        file = message.video or message.document or message.animation
        return SentFile(_ref(message), file.file_id if file else None)

    async def send_video_note(self, video: Media) -> SentFile:
        content, filename = await _source(video)
        message = await self._to(self.chat, self._bot.send_video_note, video_note=content, filename=filename)
        return SentFile(_ref(message), message.video_note.file_id if message.video_note else None)

    async def send_audio(self, audio: Media, caption: str | None = None, voice: bool = False) -> SentFile:
        content, filename = await _source(audio)
        if voice:
            message = await self._to(self.chat, self._bot.send_voice, voice=content, filename=filename,
                                     caption=_caption(caption or audio.caption))
            file = message.voice
        else:
            message = await self._to(self.chat, self._bot.send_audio, audio=content, filename=filename,
                                     caption=_caption(caption or audio.caption))
            file = message.audio
        file = file or message.document
        return SentFile(_ref(message), file.file_id if file else None)

    async def send_document(self, document: Media, caption: str | None = None) -> SentFile:
        content, filename = await _source(document)
        message = await self._to(self.chat, self._bot.send_document, document=content, filename=filename,
                                 caption=_caption(caption or document.caption))
        return SentFile(_ref(message), message.document.file_id if message.document else None)

    async def answer_inline(self, results: list[InlinePhoto], start_label: str | None = None) -> None:
        """Answers the inline query with cached photos; always personal, cached briefly (one user's only)."""
        if self._inline_query is None:
            raise NotSupported("no inline query to answer")
        button = InlineQueryResultsButton(start_label, start_parameter=START_PARAMETER) if start_label else None
        # The caption carries the AI note (Telegram drops a photo's metadata); the buttons, Report.
        photos = [InlineQueryResultCachedPhoto(r.id, r.file_id, caption=_caption(r.caption),
                                               reply_markup=_keyboard(r.buttons)) for r in results]
        try:
            await self._inline_query.answer(photos, cache_time=self._options.inline_cache_s, is_personal=True,
                                            button=button)
        except BadRequest as exc:
            # A query answered too late (the user typed on) is refused by Telegram; a newer one follows.
            log.info("could not answer an inline query: %s", exc)

    async def answer_button(self, text: str | None = None, alert: bool = False) -> None:
        if self._query is None or self.answered:
            return
        self.answered = True
        try:
            await self._query.answer(text=text, show_alert=alert)
        except BadRequest as exc:
            # A press answered too late (over ~15 s) is refused by Telegram; the work still happened.
            log.info("could not answer a button press: %s", exc)


def _raise_if_gone(exc: TelegramError) -> None:
    """Raises ChatUnreachable when Telegram says the chat is gone for good (not found, or upgraded)."""
    if isinstance(exc, ChatMigrated) or any(words in str(exc).lower() for words in GONE_CHAT):
        raise ChatUnreachable(str(exc)) from exc


async def _source(media: Media) -> tuple[str | bytes, str | None]:
    """A file id to re-send, or the file's bytes read off the event loop."""
    if media.file_id:
        return media.file_id, None
    if media.path is None:
        raise ValueError("Media needs a path or a file_id")
    data = await asyncio.to_thread(media.path.read_bytes)
    return data, media.path.name


def _caption(text: str | None) -> str | None:
    return text[:CAPTION_MAX] if text else None


def _photo_id(message: Message) -> str | None:
    if message.photo:
        return max(message.photo, key=lambda p: p.width * p.height).file_id
    return message.document.file_id if message.document else None


class TelegramAdapter(StartStop):
    """Runs the bot on Telegram: ``async with TelegramAdapter(settings, services) as tg: ...``.

    Events go to ``router.handle_event(services, ...)``, or to `dispatch` when given (tests).
    """

    def __init__(self, settings: Settings, services: Services | None = None, *, dispatch: Dispatch | None = None,
                 command_menu: Callable[[str], list[tuple[str, str]]] = router.command_menu) -> None:
        if not settings.telegram.enabled:
            raise ValueError("telegram.token is empty: set it in the config or FACECHAIN_TELEGRAM_TOKEN")
        if dispatch is None:
            if services is None:
                raise ValueError("TelegramAdapter needs the services (or a dispatch callable)")
            dispatch = functools.partial(router.handle_event, services)
        self.settings = settings.telegram
        self._dispatch = dispatch
        self._default_language = settings.language
        self._max_download = min(int(settings.limits.max_upload_mb * 1_000_000), BOT_API_DOWNLOAD_MAX)
        self._command_menu = command_menu
        self._queue = GroupSendQueue()
        self.application: Application = self._build()
        self._started = False

    def _build(self) -> Application:
        s = self.settings
        builder = (
            ApplicationBuilder()
            .token(s.token.get_secret_value())
            .base_url(s.base_url)
            .base_file_url(s.base_file_url)
            .rate_limiter(AIORateLimiter(group_max_rate=s.group_max_rate, group_time_period=s.group_time_period,
                                         max_retries=s.max_retries))
            .concurrent_updates(True)
            .job_queue(None)
        )
        if s.request_timeout_s is not None:
            timeout = s.request_timeout_s
            builder = builder.connect_timeout(timeout).read_timeout(timeout).write_timeout(timeout)
            builder = builder.media_write_timeout(timeout)
        application = builder.build()
        application.add_handler(TypeHandler(Update, self._on_update))
        application.add_error_handler(self._on_error)
        return application

    @property
    def bot(self) -> Any:
        return self.application.bot

    async def start(self) -> None:
        """Connects (getMe), publishes the command menu and starts long polling."""
        if self._started:
            return
        await self._connect()
        self._started = True
        try:
            await self.publish_commands()
            await self.application.start()
            await self._start_updates()
        except BaseException:
            await self.stop()
            raise
        log.info("telegram: %s as @%s", "webhook" if self.settings.webhook_url else "polling", self.bot.username)
        if not self.bot.supports_inline_queries:
            log.warning("telegram: inline mode is off for @%s, so Share buttons explain forwarding instead; "
                        "switch it on with @BotFather /setinline", self.bot.username)

    async def _connect(self) -> None:
        """getMe until the Bot API answers. A network that is down at start (DNS, a proxy, an outage, a 5xx)
        is waited out with one line a try, as the service would after it started; a refused token
        (InvalidToken, not a NetworkError) ends the start at once."""
        for attempt in itertools.count():
            try:
                await self.application.initialize()
                return
            except NetworkError as exc:  # TimedOut is one too
                delay = CONNECT_RETRY_S[min(attempt, len(CONNECT_RETRY_S) - 1)]
                log.warning("telegram: cannot reach the Bot API at %s (%s); trying again in %d s",
                            self.settings.base_url, exc, delay)
                await asyncio.sleep(delay)

    async def _start_updates(self) -> None:
        """Long polling by default; with ``webhook_url``, PTB's webhook server (setWebhook with the secret
        token; a request without it is refused with 403). Either way an update is confirmed to Telegram
        before it is handled: one in flight when the process dies is not sent again by Telegram, and one
        it does send again (a retried webhook, an unconfirmed poll) is dropped by the update-key check."""
        updater = self.application.updater
        assert updater is not None
        s = self.settings
        if not s.webhook_url:
            await updater.start_polling(timeout=dtm.timedelta(seconds=s.poll_timeout),
                                        allowed_updates=list(ALLOWED_UPDATES), drop_pending_updates=False)
            return
        await updater.start_webhook(
            listen=s.webhook_listen, port=s.webhook_port, url_path=urlsplit(s.webhook_url).path.lstrip("/"),
            webhook_url=s.webhook_url, secret_token=s.webhook_secret_token.get_secret_value(),
            allowed_updates=list(ALLOWED_UPDATES), drop_pending_updates=False,
        )

    async def stop(self) -> None:
        """Stops polling, lets running handlers finish, and closes the connections. Idempotent."""
        if not self._started:
            return
        self._started = False
        updater = self.application.updater
        if updater is not None and updater.running:
            await updater.stop()
        if self.application.running:
            await self.application.stop()
        await self.application.shutdown()
        log.info("telegram: stopped")

    async def publish_commands(self) -> None:
        """Sets the command menu, in English by default and per language where translated."""
        for language in (None, *MENU_LANGUAGES):
            commands = commands_for(self._command_menu(language or "en"))
            try:
                await self.bot.set_my_commands(commands, language_code=language)
            except TelegramError as exc:
                log.warning("telegram: could not set the %s command menu: %s", language or "default", exc)

    def channel_for(self, chat: Chat, language: str | None = None) -> TelegramChannel:
        """A channel into any chat, e.g. to deliver a job's result after a restart."""
        return TelegramChannel(self.bot, chat, language=language or self._default_language, options=self._options())

    async def private_chat(self, user: User) -> Chat:
        """The user's private chat with the bot: on Telegram its id is the user's."""
        return Chat(platform=PLATFORM, id=user.id, is_private=True)

    def _options(self) -> ChannelOptions:
        share_inline = self._started and bool(self.bot.supports_inline_queries)
        return ChannelOptions(self._queue, share_inline, self.settings.inline_cache_s)

    # -- updates ---------------------------------------------------------------------------------
    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        converted = self.to_event(update)
        if converted is None:
            return
        event, query = converted
        channel = TelegramChannel(self.bot, event.chat, requester=event.user, language=event.language,
                                  query=query if isinstance(query, CallbackQuery) else None,
                                  inline_query=query if isinstance(query, InlineQuery) else None,
                                  options=self._options())
        await self._dispatch(event, channel)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        update_id = update.update_id if isinstance(update, Update) else None
        log.error("telegram: update %s failed", update_id, exc_info=context.error)

    def to_event(self, update: Update) -> tuple[Event, CallbackQuery | InlineQuery | None] | None:
        """Converts an update into an Event (and the button press or inline query it carries); None to ignore it."""
        if update.callback_query is not None:
            return self._button_event(update.callback_query)
        if update.inline_query is not None:
            return self._inline_event(update.inline_query)
        message = update.message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return None
        user = to_user(message.from_user)
        text = message.text or message.caption or ""
        command, args, for_us = parse_command(text, self.bot.username if self._started else None)
        if not for_us:
            return None
        mentions = _mentioned(message)
        if mentions:  # the tapped names are people, not arguments: /duo hanfu Bob -> ["hanfu"]
            named = text
            for entity, words in message.parse_entities([MessageEntity.TEXT_MENTION]).items():
                named = named.replace(words, " ", 1)
            command, args, _ = parse_command(named, self.bot.username if self._started else None)
        chat = to_chat(message.chat)
        if not chat.is_private:
            chat = dataclasses.replace(chat, reply_to=str(message.message_id))
        event = Event(user=user, chat=chat, text=text, command=command, args=args,
                      attachments=self._attachments(message), message_id=str(message.message_id),
                      language=self._language(message.from_user), reply_to=self._replied(message),
                      chat_admin=self._admin_check(chat, user), update_key=f"{chat.key}:{message.message_id}",
                      mentions=mentions)
        return event, None

    def _replied(self, message: Message) -> RepliedMessage | None:
        """What the message replies to: its sender ("bot" for ours) and its picture, if any."""
        replied = message.reply_to_message
        if replied is None:
            return None
        sender = replied.from_user
        if sender is None:
            key = ""  # a channel post or an anonymous admin
        elif sender.is_bot and self._started and sender.id == self.bot.id:
            key = BOT_SENDER
        else:
            key = to_user(sender).key
        image, file_id = None, None
        document = replied.document
        if replied.photo:
            largest = max(replied.photo, key=lambda p: p.width * p.height)
            file_id = largest.file_id
            image = self._attachment("photo", file_id, largest.file_size, "image/jpeg", None)
        elif document is not None and (document.mime_type or "").startswith("image/"):
            file_id = document.file_id
            image = self._attachment("document", file_id, document.file_size, document.mime_type, document.file_name)
        person = to_user(sender) if sender is not None and not sender.is_bot else None
        return RepliedMessage(message_id=str(replied.message_id), sender=key, image=image, file_id=file_id,
                              sender_user=person)

    def _button_event(self, query: CallbackQuery) -> tuple[Event, CallbackQuery] | None:
        message = query.message
        if query.from_user is None:
            return None
        user = to_user(query.from_user)
        if message is None:
            if query.inline_message_id is None:
                return None
            # A button under a result shared in inline mode (Report): the bot is in no chat there, so
            # the press is answered to the presser and anything more goes to their private chat.
            private = Chat(platform=PLATFORM, id=user.id, is_private=True)
            return Event(user=user, chat=private, button_payload=query.data or "",
                         language=self._language(query.from_user)), query
        chat = to_chat(message.chat)
        event = Event(user=user, chat=chat, button_payload=query.data or "", message_id=str(message.message_id),
                      language=self._language(query.from_user), chat_admin=self._admin_check(chat, user),
                      update_key=f"{PLATFORM}:q{query.id}")
        return event, query

    def _inline_event(self, query: InlineQuery) -> tuple[Event, InlineQuery]:
        """An inline query: from the user, answered to them alone (its chat is their private one)."""
        user = to_user(query.from_user)
        chat = Chat(platform=PLATFORM, id=user.id, is_private=True)
        event = Event(user=user, chat=chat, text=query.query, inline_query=query.query,
                      language=self._language(query.from_user))
        return event, query

    def _admin_check(self, chat: Chat, user: User) -> Callable[[], Awaitable[bool]] | None:
        """Asks Telegram, when a handler wants to know, whether the user administers the group."""
        if chat.is_private:
            return None

        async def check() -> bool:
            member = await self.bot.get_chat_member(chat_id=int(chat.id), user_id=int(user.id))
            return member.status in ADMIN_STATUSES

        return check

    def _language(self, user: TgUser) -> str:
        return normalise_language(user.language_code) if user.language_code else self._default_language

    def _attachments(self, message: Message) -> list[Attachment]:
        found: list[Attachment] = []
        if message.photo:
            largest = max(message.photo, key=lambda p: p.width * p.height)
            found.append(self._attachment("photo", largest.file_id, largest.file_size, "image/jpeg", None))
        if message.document:
            d = message.document
            found.append(self._attachment("document", d.file_id, d.file_size, d.mime_type, d.file_name))
        if message.voice:
            v = message.voice
            found.append(self._attachment("voice", v.file_id, v.file_size, v.mime_type or "audio/ogg", None))
        if message.audio:
            a = message.audio
            found.append(self._attachment("audio", a.file_id, a.file_size, a.mime_type, a.file_name))
        if message.video:
            v = message.video
            found.append(self._attachment("video", v.file_id, v.file_size, v.mime_type, v.file_name))
        if message.video_note:
            n = message.video_note
            found.append(self._attachment("video", n.file_id, n.file_size, "video/mp4", None))
        return found

    def _attachment(self, kind: str, file_id: str, size: int | None, mime: str | None,
                    filename: str | None) -> Attachment:
        async def fetch() -> bytes:
            return await self.download(file_id, size)

        return Attachment(kind=kind, size=size, mime_type=mime, filename=filename, fetch=fetch)

    async def download(self, file_id: str, size: int | None = None) -> bytes:
        """Fetches a file's bytes through getFile and the file URL, refusing files over the cap."""
        if size is not None and size > self._max_download:
            raise self._too_large(size)
        try:
            file = await self.bot.get_file(file_id)
        except BadRequest as exc:
            if "too big" in str(exc).lower():
                raise self._too_large(size or self._max_download + 1) from exc
            raise
        if file.file_size is not None and file.file_size > self._max_download:
            raise self._too_large(file.file_size)
        return bytes(await file.download_as_bytearray())

    def _too_large(self, size: int) -> UserFacingError:
        return UserFacingError("file.too_large", size_mb=f"{size / 1_000_000:.1f}",
                               max_mb=f"{self._max_download / 1_000_000:.1f}")


def commands_for(menu: Sequence[tuple[str, str]]) -> list[BotCommand]:
    """BotCommand objects for a ``(name, description)`` menu (descriptions cut to Telegram's limit)."""
    return [BotCommand(name, description[:COMMAND_DESCRIPTION_MAX]) for name, description in menu]
