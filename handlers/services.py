"""The one object every handler gets: settings, storage, the job queue, channels and a clock.

``bot/app.py`` builds one with ``Services.build`` and hands it to the adapters. Handlers keep their
in-memory state (rate-limit windows, progress throttling, per-user locks) in ``Services.runtime``,
never in module globals, so two services in one process (tests) never share it.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from facechain_core.errors import UserFacingError
from handlers.protocols import Chat, JobQueue, MessageRef, ReplyChannel, User
from handlers.selfie_check import MB, lazy_selfie_checker

log = logging.getLogger(__name__)


class StorageLike(Protocol):
    """The part of ``bot.storage.Storage`` that handlers use (duck-typed, rows as dataclasses)."""

    async def ensure_user(self, key: str, platform: str, language: str) -> bool: ...
    async def user_language(self, key: str) -> str | None: ...
    async def delete_user(self, key: str) -> dict[str, int]: ...
    async def add_selfie(self, user_key: str, path: str, face: dict[str, Any]) -> int: ...
    async def selfies(self, user_key: str) -> list[Any]: ...
    async def remove_selfie(self, selfie_id: int) -> None: ...
    async def identity(self, user_key: str) -> Any | None: ...
    async def job(self, job_id: int) -> Any | None: ...
    async def artifact(self, artifact_id: str) -> Any | None: ...
    async def mark_delivered(self, artifact_id: str, platform: str, file_id: str | None) -> None: ...
    async def set_pending(self, user_key: str, chat_key: str, command: str, payload: dict[str, Any],
                          ttl_s: float) -> None: ...
    async def take_pending(self, user_key: str, chat_key: str) -> Any | None: ...
    async def update_seen(self, update_key: str) -> bool: ...


@dataclass
class ProgressMemo:
    """What the progress message of one job showed last, for throttling and the ETA."""

    started: float  # clock time of the first progress report
    first_step: int
    last_edit: float | None = None
    last_text: str | None = None
    ref: MessageRef | None = None  # the progress message, once known
    language: str | None = None


# In-memory entries (rate windows, warnings, group hints, /delete confirmations, progress memos) untouched
# this long are dropped: they only throttle or remember for minutes, and each user or job adds one.
STALE_AFTER_S = 3600.0
SWEEP_INTERVAL_S = 60.0  # how often the maps are swept (on the next event or progress report)


@dataclass
class RuntimeState:
    """In-memory state of the handlers; lost on restart by design, bounded by ``sweep``."""

    rate_windows: dict[str, deque[float]] = field(default_factory=dict)
    rate_warned_until: dict[str, float] = field(default_factory=dict)
    progress: dict[int, ProgressMemo] = field(default_factory=dict)
    # Held by the coroutines using them: a lock nobody holds or awaits goes away by itself.
    user_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)
    # One user's updates are handled one at a time (the router), and so are their /delete and the
    # retention sweep of their data: nothing a user sent is written after their /delete finished.
    intake_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = field(default_factory=weakref.WeakValueDictionary)
    # /delete confirmations: nonce -> (user key, expiry clock time).
    delete_confirms: dict[str, tuple[str, float]] = field(default_factory=dict)
    # Last time a user was told (in a group) to send selfies privately.
    group_hints: dict[str, float] = field(default_factory=dict)
    # Background timers handlers start (a duo request's answer time); the service cancels them on stop.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    swept_at: float | None = None

    def user_lock(self, user_key: str) -> asyncio.Lock:
        return _lock_of(self.user_locks, user_key)

    def intake_lock(self, user_key: str) -> asyncio.Lock:
        """Taken around each of the user's events, their /delete and their retention sweep (before user_lock)."""
        return _lock_of(self.intake_locks, user_key)

    def forget_user(self, user_key: str) -> None:
        """Drops what memory holds about a user (after /delete)."""
        self.rate_windows.pop(user_key, None)
        self.rate_warned_until.pop(user_key, None)
        self.group_hints.pop(user_key, None)
        for nonce, (owner, _) in list(self.delete_confirms.items()):
            if owner == user_key:
                del self.delete_confirms[nonce]

    def maybe_sweep(self, now: float) -> None:
        """Sweeps at most once per ``SWEEP_INTERVAL_S`` of clock time."""
        if self.swept_at is None or now - self.swept_at >= SWEEP_INTERVAL_S:
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Drops entries untouched for ``STALE_AFTER_S`` (progress of forgotten jobs included)."""
        self.swept_at = now
        old = now - STALE_AFTER_S
        for key, window in list(self.rate_windows.items()):
            if not window or window[-1] < old:
                del self.rate_windows[key]
        for key, until in list(self.rate_warned_until.items()):
            if until < now:
                del self.rate_warned_until[key]
        for key, told in list(self.group_hints.items()):
            if told < old:
                del self.group_hints[key]
        for nonce, (_, expires) in list(self.delete_confirms.items()):
            if expires < now:
                del self.delete_confirms[nonce]
        for job_id, memo in list(self.progress.items()):
            if (memo.last_edit if memo.last_edit is not None else memo.started) < old:
                del self.progress[job_id]


def _lock_of(locks: weakref.WeakValueDictionary[str, asyncio.Lock], key: str) -> asyncio.Lock:
    lock = locks.get(key)
    if lock is None:
        lock = locks[key] = asyncio.Lock()
    return lock


async def same_id_private_chat(user: User) -> Chat:
    """The private chat whose id is the user's own (Telegram's way)."""
    return Chat(platform=user.platform, id=user.id, is_private=True)


@dataclass
class Services:
    """Everything a handler needs, passed to every handler.

    `settings` is ``bot.config.Settings`` (duck-typed: handlers read ``limits``, ``access``,
    ``scheduler.progress_interval_s`` and ``language``). `check_selfie` judges uploaded bytes
    (blocking: handlers run it in a thread) and returns a ``facechain_core.selfie.SelfieResult``
    or raises ``UserFacingError``. `channel_for` reaches any chat, also after a restart;
    `private_chat` finds a user's private chat with the bot (on Discord a DM has its own id).
    """

    settings: Any
    storage: StorageLike
    jobs: JobQueue
    data_dir: Path
    check_selfie: Callable[[bytes], Any]
    channel_for: Callable[[Chat], ReplyChannel]
    private_chat: Callable[[User], Awaitable[Chat]] = same_id_private_chat
    features_installed: set[str] = field(default_factory=set)
    styles: Any = None  # facechain_core.styles.StyleCatalog, loaded once at start
    clock: Callable[[], float] = time.monotonic
    runtime: RuntimeState = field(default_factory=RuntimeState)

    @classmethod
    def build(cls, settings: Any, storage: StorageLike, *, channel_for: Callable[[Chat], ReplyChannel],
              private_chat: Callable[[User], Awaitable[Chat]] | None = None, jobs: JobQueue | None = None, check_selfie: Callable[[bytes], Any] | None = None,
              features_installed: Iterable[str] = (), styles: Any = None) -> Services:
        """Services from the settings; `jobs` may be set later (the scheduler needs the services first).

        Without `check_selfie`, the detector named in ``settings.selfie`` is loaded on first use.
        """
        if check_selfie is None:
            check_selfie = lazy_selfie_checker(settings)
        return cls(settings=settings, storage=storage, jobs=jobs or _NoQueue(), data_dir=Path(settings.data_dir),
                   check_selfie=check_selfie, channel_for=channel_for, private_chat=private_chat or same_id_private_chat,
                   features_installed=set(features_installed), styles=styles)

    def require_feature(self, feature: str) -> None:
        """Refuses with ``feature.not_installed`` unless `feature`'s models are installed; logs how to pull them."""
        if feature not in self.features_installed:
            log.warning("%s requested but its models are not installed: run `facechain-bot models pull %s`",
                        feature, feature)
            raise UserFacingError("feature.not_installed", feature=feature)

    def user_dir(self, user_key: str) -> Path:
        """Returns ``data_dir/users/<user key>``, refusing keys that could escape it."""
        if not user_key or "/" in user_key or "\\" in user_key or user_key in (".", "..") or "\0" in user_key:
            raise ValueError(f"unsafe user key: {user_key!r}")
        return Path(self.data_dir) / "users" / user_key

    @property
    def max_upload_bytes(self) -> int:
        return int(self.settings.limits.max_upload_mb * MB)

    @property
    def default_language(self) -> str:
        return str(getattr(self.settings, "language", "en"))


class _NoQueue:
    """Stands in until the scheduler is attached; using it is a wiring bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"Services.jobs is not set (JobQueue.{name} called before the scheduler was attached)")
