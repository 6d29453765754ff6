"""The Discord adapter: discord.py interactions and DMs in, platform-neutral events out.

``DiscordAdapter`` owns one ``discord.Client`` with a command tree (``bot.platforms.discord_commands``) and
runs beside other adapters on the service's event loop (``async with adapter:``), never with
``client.run``. Every interaction is answered within Discord's 3 s: a slash command is deferred
("thinking…") before its handler runs, a button press is acknowledged at once. The interaction
then becomes an ``Event`` and a ``DiscordChannel`` (``bot.platforms.discord_channel``) handed to the dispatch
callable (``router.handle_event`` bound to the services). Images sent to the bot in a DM are taken
like Telegram photos. The gateway reconnects by itself; jobs never depend on it: results and
progress edits go over REST to stored channel and message ids.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import discord
from discord import app_commands

from bot.config import Settings
from bot.platforms.discord_channel import PLATFORM, DiscordChannel, DiscordLink, PayloadButton, Recent
from bot.platforms.discord_commands import PRIVATE_COMMANDS, CatalogueTranslator, build_commands
from bot.lifecycle import StartStop
from facechain_core.errors import UserFacingError
from handlers import router
from handlers.messages import normalise_language, t
from handlers.protocols import Attachment, Chat, Event, ReplyChannel, User
from handlers.services import MB, Services

log = logging.getLogger(__name__)

Dispatch = Callable[[Event, ReplyChannel], Awaitable[None]]

# How long start() waits for the gateway's READY before going on (it keeps reconnecting).
READY_TIMEOUT_S = 30.0
# How long stop() lets handlers that are running finish before closing the connection.
STOP_GRACE_S = 10.0
# Channels offered for "Post to channel" at most (Discord shows 25 buttons under a message); the
# search stops there, as each server asks Discord once whether the user is a member.
POST_TARGETS_MAX = 25


def to_user(user: discord.abc.User, locale: discord.Locale | None = None) -> User:
    return User(platform=PLATFORM, id=str(user.id), name=user.display_name or user.name or "",
                language=locale.value if locale is not None else None)


def _may_post(permissions: discord.Permissions) -> bool:
    return permissions.view_channel and permissions.send_messages and permissions.attach_files


def _admin_check(interaction: discord.Interaction) -> Callable[[], Awaitable[bool]] | None:
    """In a server: whether the user may manage it (Discord resolved their permissions in the interaction)."""
    if interaction.guild_id is None:
        return None
    allowed = bool(interaction.permissions.manage_guild)

    async def check() -> bool:
        return allowed

    return check


def parse_command(text: str) -> tuple[str | None, list[str]]:
    """Splits a typed ``/name arg ...`` in a DM (slash commands need no parsing)."""
    if not text.startswith("/") or len(text) < 2:
        return None, []
    head, *args = text.split()
    return head[1:].lower() or None, args


def attachment_kind(attachment: discord.Attachment) -> tuple[str, str | None]:
    """``(kind, MIME type)`` of a file a user sent: photo, voice, audio, video or document."""
    mime = (attachment.content_type or "").split(";")[0].strip().lower() or None
    if mime and mime.startswith("image/"):
        return "photo", mime
    if attachment.is_voice_message():
        return "voice", mime or "audio/ogg"
    if mime and mime.startswith("audio/"):
        return "audio", mime
    if mime and mime.startswith("video/"):
        return "video", mime
    return "document", mime


class FaceChainClient(discord.Client):
    """The discord.py client: registers the buttons and commands at login, forwards DMs."""

    def __init__(self, adapter: DiscordAdapter) -> None:
        # The bot never joins voice: no warning about voice libraries it does not need.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.none()
        # Guilds for interactions in servers; DMs for photos sent privately (their content needs no
        # privileged intent). Server messages are not read: slash commands are the way in there.
        intents.guilds = True
        intents.dm_messages = True
        # Text users typed is echoed (a style name, a shared result's caption): no message may ping anyone
        # but whom it names on purpose (a job's requester, see DiscordChannel.address).
        super().__init__(intents=intents, max_messages=None, chunk_guilds_at_startup=False,
                         allowed_mentions=discord.AllowedMentions.none())
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(PayloadButton)
        await self.adapter.sync_commands()

    async def on_connect(self) -> None:
        self.adapter.connected.set()
        log.info("discord: connected to the gateway as %s", self.user)

    async def on_resumed(self) -> None:
        log.info("discord: gateway session resumed")

    async def on_disconnect(self) -> None:
        if not self.is_closed():
            log.info("discord: gateway disconnected; reconnecting")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.run_message(message)


class DiscordAdapter(StartStop):
    """Runs the bot on Discord: ``async with DiscordAdapter(settings, services) as dc: ...``.

    Events go to ``router.handle_event(services, ...)``, or to `dispatch` when given (tests).
    """

    def __init__(self, settings: Settings, services: Services | None = None, *,
                 dispatch: Dispatch | None = None) -> None:
        if not settings.discord.enabled:
            raise ValueError("discord.token is empty: set it in the config or FACECHAIN_DISCORD_TOKEN")
        if dispatch is None:
            if services is None:
                raise ValueError("DiscordAdapter needs the services (or a dispatch callable)")
            dispatch = functools.partial(router.handle_event, services)
        self.settings = settings.discord
        self.services = services
        self._dispatch = dispatch
        self._default_language = settings.language
        self._max_download = int(settings.limits.max_upload_mb * MB)
        self.client = FaceChainClient(self)
        self.link = DiscordLink(self.client, default_language=settings.language)
        self.link.post_targets = self.post_targets
        self.connected = asyncio.Event()
        self._languages = Recent()  # user id -> language of their last interaction
        self._gateway: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._started = False

    @property
    def styles(self) -> Any:
        return self.services.styles if self.services is not None else None

    @property
    def features(self) -> set[str]:
        return self.services.features_installed if self.services is not None else set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Logs in (which syncs the slash commands), then connects to the gateway in the background."""
        if self._started:
            return
        self._started = True
        try:
            await self.client.login(self.settings.token.get_secret_value())
            self._gateway = asyncio.create_task(self.client.connect(reconnect=True), name="discord-gateway")
            self._gateway.add_done_callback(self._gateway_ended)
            ready = asyncio.create_task(self.connected.wait(), name="discord-ready")
            done, _ = await asyncio.wait({self._gateway, ready}, timeout=READY_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if self._gateway in done:
                self._gateway.result()  # raises what ended the connection
                raise RuntimeError("the Discord gateway connection ended during start")
            if not done:
                log.warning("discord: no gateway session after %.0f s; still trying in the background",
                            READY_TIMEOUT_S)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Lets running handlers finish (within a grace period), then closes the connection. Idempotent."""
        if not self._started:
            return
        self._started = False
        if self._running:
            await asyncio.wait(set(self._running), timeout=STOP_GRACE_S)
        await self.client.close()
        if self._gateway is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._gateway, timeout=5.0)
        log.info("discord: stopped")

    def _gateway_ended(self, task: asyncio.Task[None]) -> None:
        """Logs a connection that ended for good (a bad token, missing intents) while the bot runs."""
        if self._started and not task.cancelled() and task.exception() is not None:
            log.error("discord: the gateway connection ended; Discord is offline until a restart",
                      exc_info=task.exception())

    async def sync_commands(self) -> None:
        """Publishes the slash commands: to `guild_ids` at once when set (and only there), else globally.

        Not both: a server with guild and global copies shows every command twice."""
        tree = self.client.tree
        await tree.set_translator(CatalogueTranslator())
        for command in build_commands():
            tree.add_command(command, override=True)
        scopes: list[discord.Object | None] = [discord.Object(g) for g in self.settings.guild_ids] or [None]
        if self.settings.guild_ids:
            log.warning("discord: slash commands go to the %d server(s) of guild_ids only: direct messages and "
                        "other servers have none (leave guild_ids empty to publish them globally)",
                        len(self.settings.guild_ids))
        for guild in scopes:
            if guild is not None:
                tree.copy_global_to(guild=guild)
            try:
                await tree.sync(guild=guild)
            except discord.HTTPException as exc:
                # Commands synced earlier keep working; new options appear after the next good sync.
                log.warning("discord: could not sync the slash commands (%s): %s",
                            f"guild {guild.id}" if guild else "global", exc)

    def channel_for(self, chat: Chat, language: str | None = None) -> DiscordChannel:
        """A channel into any chat from its ids alone, e.g. to deliver a job's result after a restart."""
        return DiscordChannel(self.link, chat, language=language or self._default_language)

    async def private_chat(self, user: User) -> Chat:
        """The user's DM with the bot (Discord gives it its own id; opened once, then remembered)."""
        return await self.link.dm_chat(user)

    # -- interactions ----------------------------------------------------------------------------
    async def run_command(self, interaction: discord.Interaction, name: str | None, args: list[str],
                          attachments: list[discord.Attachment],
                          mentions: Sequence[discord.abc.User] = ()) -> None:
        """Defers the interaction, then hands the command (or, name None, the files) to the dispatch."""
        with self._tracked():
            lang = self._language(interaction)
            if await self._refused(interaction, lang):
                return
            chat = self._chat(interaction)
            usable = await self._acknowledge(interaction, ephemeral=not chat.is_private, thinking=True)
            user = to_user(interaction.user, interaction.locale)
            text = " ".join([f"/{name}"] + args) if name else ""
            event = Event(user=user, chat=chat, text=text, command=name, args=args,
                          attachments=[self._attachment(a) for a in attachments], language=lang,
                          chat_admin=_admin_check(interaction), update_key=f"{PLATFORM}:i{interaction.id}",
                          mentions=[to_user(m) for m in mentions if not m.bot and (
                              interaction.guild is None or isinstance(m, discord.Member))])  # a member here only
            channel = DiscordChannel(self.link, chat, requester=user, language=lang, interaction=interaction,
                                     private=name in PRIVATE_COMMANDS, usable=usable)
            try:
                await self._dispatch(event, channel)
            finally:
                await channel.finish()

    async def run_button(self, interaction: discord.Interaction, payload: str) -> None:
        """Acknowledges a button press, then hands it to the dispatch."""
        with self._tracked():
            lang = self._language(interaction)
            if await self._refused(interaction, lang):
                return
            chat = self._chat(interaction)
            usable = await self._acknowledge(interaction)
            user = to_user(interaction.user, interaction.locale)
            message_id = str(interaction.message.id) if interaction.message is not None else None
            event = Event(user=user, chat=chat, button_payload=payload, message_id=message_id, language=lang,
                          chat_admin=_admin_check(interaction), update_key=f"{PLATFORM}:i{interaction.id}")
            channel = DiscordChannel(self.link, chat, requester=user, language=lang, interaction=interaction,
                                     usable=usable)
            await self._dispatch(event, channel)

    async def run_message(self, message: discord.Message) -> None:
        """Takes a message a user sent the bot in a DM (server messages are not for the bot)."""
        if message.author.bot or message.guild is not None:
            return
        if not message.content and not message.attachments:
            return
        with self._tracked():
            user = to_user(message.author)
            lang = self._languages.get(user.id, self._default_language)
            chat = Chat(platform=PLATFORM, id=str(message.channel.id), is_private=True)
            self.link.dm_channels[user.id] = message.channel.id
            command, args = parse_command(message.content)
            event = Event(user=user, chat=chat, text=message.content, command=command, args=args,
                          attachments=[self._attachment(a) for a in message.attachments],
                          message_id=str(message.id), language=lang, update_key=f"{PLATFORM}:m{message.id}")
            await self._dispatch(event, DiscordChannel(self.link, chat, requester=user, language=lang))

    async def _acknowledge(self, interaction: discord.Interaction, **defer: Any) -> bool:
        """Defers within Discord's 3 s; False when the interaction can no longer be answered."""
        try:
            await interaction.response.defer(**defer)
        except discord.HTTPException as exc:
            log.warning("discord: could not acknowledge interaction %s in time: %s", interaction.id, exc)
            return False
        return True

    async def _refused(self, interaction: discord.Interaction, lang: str) -> bool:
        """Refuses interactions from servers or channels the config does not allow (ephemerally)."""
        if self.refuses(interaction):
            log.info("discord: refused an interaction in guild %s channel %s", interaction.guild_id,
                     interaction.channel_id)
            with contextlib.suppress(discord.HTTPException):
                await interaction.response.send_message(t("core.chat_denied", lang), ephemeral=True)
            return True
        return False

    def refuses(self, interaction: discord.Interaction) -> bool:
        """Whether the config keeps the bot out of this interaction's server or channel (autocomplete)."""
        if interaction.guild_id is None:
            return False
        guilds, channels = self.settings.allowed_guilds, self.settings.allowed_channels
        return bool((guilds and interaction.guild_id not in guilds) or
                    (channels and interaction.channel_id not in channels))

    async def post_targets(self, user: User) -> list[Chat]:
        """Server text channels where both `user` and the bot may post pictures (that the config allows)."""
        guilds, channels = self.settings.allowed_guilds, self.settings.allowed_channels
        targets: list[Chat] = []
        for guild in self.client.guilds:
            me = guild.me
            if me is None or (guilds and guild.id not in guilds):
                continue
            try:
                member = guild.get_member(int(user.id)) or await guild.fetch_member(int(user.id))
            except discord.NotFound:
                continue  # not a member of that server
            except discord.HTTPException as exc:
                log.warning("discord: could not look up a member of guild %s: %s", guild.id, exc)
                continue
            for channel in guild.text_channels:
                if channels and channel.id not in channels:
                    continue
                if _may_post(channel.permissions_for(me)) and _may_post(channel.permissions_for(member)):
                    targets.append(Chat(platform=PLATFORM, id=str(channel.id), is_private=False,
                                        title=f"#{channel.name} ({guild.name})"))
                    if len(targets) >= POST_TARGETS_MAX:
                        return targets
        return targets

    def _chat(self, interaction: discord.Interaction) -> Chat:
        channel_id = interaction.channel_id
        if channel_id is None:
            raise RuntimeError(f"interaction {interaction.id} names no channel")
        if interaction.guild_id is None:
            self.link.dm_channels[str(interaction.user.id)] = channel_id
            chat = Chat(platform=PLATFORM, id=str(channel_id), is_private=True)
        else:
            title = getattr(interaction.channel, "name", None) or ""
            chat = Chat(platform=PLATFORM, id=str(channel_id), is_private=False, title=title)
        self.link.upload_limits[chat.id] = interaction.filesize_limit
        return chat

    def _language(self, interaction: discord.Interaction) -> str:
        lang = normalise_language(interaction.locale.value)
        self._languages[str(interaction.user.id)] = lang
        return lang

    def _attachment(self, attachment: discord.Attachment) -> Attachment:
        kind, mime = attachment_kind(attachment)
        limit = self._max_download

        async def fetch() -> bytes:
            if attachment.size > limit:
                raise UserFacingError("file.too_large", size_mb=f"{attachment.size / MB:.1f}",
                                      max_mb=f"{limit / MB:.1f}")
            return await attachment.read()

        return Attachment(kind=kind, size=attachment.size, mime_type=mime, filename=attachment.filename, fetch=fetch)

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Counts the current handler as running, so stop() can let it finish."""
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._running.discard(task)
