"""SQLite storage: every SQL statement of the service lives in this module.

WAL journal, ``secure_delete`` on (deleted rows are zeroed on disk), migrations recorded in a
version table. Timestamps are Unix seconds (float). JSON columns hold dicts.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger(__name__)
T = TypeVar("T")

# A write that finds the database locked (another connection: a backup, the CLI) or the disk full
# waits and tries again, for up to WRITE_RETRY_S; SQLite itself waits BUSY_TIMEOUT_MS for a lock first.
WRITE_RETRY_S = 30.0
BUSY_TIMEOUT_MS = 5000
RETRY_DELAYS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
TRANSIENT_MESSAGES = ("locked", "busy", "disk is full", "disk i/o error")

MIGRATIONS: list[str] = [
    # 1: the foundation.
    """
    CREATE TABLE users (
        key TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT 'en',
        created_at REAL NOT NULL
    );
    CREATE TABLE selfies (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_key TEXT NOT NULL REFERENCES users(key) ON DELETE CASCADE,
        path TEXT NOT NULL,
        face TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX selfies_user ON selfies(user_key);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL,
        params TEXT NOT NULL,
        chat TEXT NOT NULL,
        progress_ref TEXT,
        result TEXT,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_tries INTEGER NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_user ON jobs(user_key);
    CREATE TABLE artifacts (
        id TEXT PRIMARY KEY,
        job_id INTEGER,
        owner_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        media_type TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        file_ids TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX artifacts_owner ON artifacts(owner_key);
    CREATE INDEX artifacts_job ON artifacts(job_id);
    CREATE TABLE pending_inputs (
        user_key TEXT NOT NULL,
        chat_key TEXT NOT NULL,
        command TEXT NOT NULL,
        payload TEXT NOT NULL DEFAULT '{}',
        expires_at REAL NOT NULL,
        PRIMARY KEY (user_key, chat_key)
    );
    CREATE TABLE kind_stats (
        kind TEXT PRIMARY KEY,
        avg_seconds REAL NOT NULL,
        samples INTEGER NOT NULL
    );
    CREATE TABLE identities (
        user_key TEXT PRIMARY KEY REFERENCES users(key) ON DELETE CASCADE,
        path TEXT NOT NULL,
        photos INTEGER NOT NULL,
        lora_path TEXT,
        updated_at REAL NOT NULL
    );
    """,
    # 2: a reply language the user chose (/language) wins over the one their app reports.
    """
    ALTER TABLE users ADD COLUMN language_chosen INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: groups: settings a group's admins chose (/settings), and jobs per member per day in a group.
    """
    CREATE TABLE chat_settings (
        chat_key TEXT PRIMARY KEY,
        settings TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL
    );
    CREATE TABLE chat_usage (
        chat_key TEXT NOT NULL,
        user_key TEXT NOT NULL,
        day TEXT NOT NULL,
        jobs INTEGER NOT NULL,
        PRIMARY KEY (chat_key, user_key, day)
    );
    CREATE INDEX chat_usage_user ON chat_usage(user_key);
    """,
    # 4: safety: bans (kept through /delete, or deleting would lift them), reports of results (one per
    # artifact, its reporters apart so each side's /delete removes only their own rows), when a LoRA
    # was trained (it expires on its own), and the index of the daily quota count.
    """
    CREATE TABLE bans (
        user_key TEXT PRIMARY KEY,
        reason TEXT NOT NULL DEFAULT '',
        banned_by TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE reports (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        artifact_id TEXT NOT NULL UNIQUE,
        owner_key TEXT NOT NULL,
        chat_key TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX reports_owner ON reports(owner_key);
    CREATE TABLE report_reporters (
        report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
        reporter_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (report_id, reporter_key)
    );
    CREATE INDEX report_reporters_key ON report_reporters(reporter_key);
    ALTER TABLE identities ADD COLUMN lora_at REAL;
    UPDATE identities SET lora_at = updated_at WHERE lora_path IS NOT NULL;
    CREATE INDEX jobs_user_created ON jobs(user_key, created_at);
    """,
    # 5: the voice the user chose for /talk (/voice); NULL: the default for their language.
    """
    ALTER TABLE users ADD COLUMN voice TEXT;
    """,
    # 6: panels: a message of buttons (the studio's options) whose choices are kept here, not in the
    # buttons' payloads, until its user sends it or it expires.
    """
    CREATE TABLE panels (
        id TEXT PRIMARY KEY,
        user_key TEXT NOT NULL,
        chat_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT '{}',
        expires_at REAL NOT NULL
    );
    CREATE INDEX panels_user ON panels(user_key);
    """,
    # 7: the job lifecycle: the chat update that created a job (unique: a re-sent update makes no second
    # job), how delivery of its outcome went (tries, when to try next, the user told it is late), and
    # when the user was told it failed (jobs that failed before this migration count as told).
    """
    ALTER TABLE jobs ADD COLUMN update_key TEXT;
    CREATE UNIQUE INDEX jobs_update_key ON jobs(update_key) WHERE update_key IS NOT NULL;
    ALTER TABLE jobs ADD COLUMN delivery_tries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN deliver_after REAL;
    ALTER TABLE jobs ADD COLUMN late_notice_at REAL;
    ALTER TABLE jobs ADD COLUMN notified_at REAL;
    UPDATE jobs SET notified_at = COALESCE(finished_at, created_at) WHERE state = 'failed';
    """,
    # 8: duo and group portraits: a request waits for every partner's consent (one row each); a partner
    # may block a requester; a result belongs to everyone in it (artifact_owners: owners beside the
    # requester, who stays artifacts.owner_key).
    """
    CREATE TABLE duo_requests (
        id TEXT PRIMARY KEY,
        requester_key TEXT NOT NULL,
        chat TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX duo_requests_requester ON duo_requests(requester_key);
    CREATE TABLE duo_consents (
        request_id TEXT NOT NULL REFERENCES duo_requests(id) ON DELETE CASCADE,
        partner_key TEXT NOT NULL,
        answer TEXT,
        PRIMARY KEY (request_id, partner_key)
    );
    CREATE INDEX duo_consents_partner ON duo_consents(partner_key);
    CREATE TABLE duo_blocks (
        blocker_key TEXT NOT NULL,
        blocked_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (blocker_key, blocked_key)
    );
    CREATE INDEX duo_blocks_blocked ON duo_blocks(blocked_key);
    CREATE TABLE artifact_owners (
        artifact_id TEXT NOT NULL,
        owner_key TEXT NOT NULL,
        PRIMARY KEY (artifact_id, owner_key)
    );
    CREATE INDEX artifact_owners_owner ON artifact_owners(owner_key);
    """,
]

# Tables holding a user's rows, and the column naming the user: /delete empties all of them.
# (``bans`` is left out on purpose: a ban outlives the banned user's /delete.)
USER_TABLES: dict[str, str] = {
    "artifact_owners": "owner_key",
    "duo_consents": "partner_key",
    "duo_requests": "requester_key",
    "duo_blocks": "blocker_key",
    "report_reporters": "reporter_key",
    "reports": "owner_key",
    "chat_usage": "user_key",
    "pending_inputs": "user_key",
    "panels": "user_key",
    "artifacts": "owner_key",
    "jobs": "user_key",
    "identities": "user_key",
    "selfies": "user_key",
    "users": "key",
}

# Columns holding a file path, and JSON columns whose strings may be paths: restore moves them.
PATH_COLUMNS: dict[str, tuple[str, ...]] = {
    "selfies": ("path",), "artifacts": ("path",), "identities": ("path", "lora_path"),
}
JSON_PATH_COLUMNS: dict[str, tuple[str, ...]] = {
    "jobs": ("params", "result"), "artifacts": ("meta",), "pending_inputs": ("payload",), "panels": ("state",),
    "duo_requests": ("params",),
}

# What a user's /delete removes besides their own rows, in this order: duo results they are in (reports of
# those too), every duo job naming them, requests they were asked in, blocks naming them.
_CO_OWNED = "SELECT artifact_id FROM artifact_owners WHERE owner_key = ?"
_DUO_JOBS_NAMING = "SELECT j.id FROM jobs j, json_each(j.params, '$.owners') o WHERE o.value = ?"
_DUO_DELETIONS: tuple[tuple[str, str], ...] = (
    ("reports", f"DELETE FROM reports WHERE artifact_id IN ({_CO_OWNED}) "
                f"OR artifact_id IN (SELECT id FROM artifacts WHERE job_id IN ({_DUO_JOBS_NAMING}))"),
    ("artifacts", f"DELETE FROM artifacts WHERE id IN ({_CO_OWNED}) OR job_id IN ({_DUO_JOBS_NAMING})"),
    ("jobs", f"DELETE FROM jobs WHERE id IN ({_DUO_JOBS_NAMING})"),
    ("duo_requests", "DELETE FROM duo_requests WHERE id IN (SELECT request_id FROM duo_consents WHERE partner_key = ?)"),
    ("duo_blocks", "DELETE FROM duo_blocks WHERE blocked_key = ?"),
)
_ORPHAN_OWNERS = "DELETE FROM artifact_owners WHERE artifact_id NOT IN (SELECT id FROM artifacts)"


def _moved(value: Any, old_roots: tuple[str, ...], new_root: str) -> Any:
    """`value` with every string under one of `old_roots` re-rooted at `new_root` (JSON values walked)."""
    if isinstance(value, str):
        for root in old_roots:
            if value == root or value.startswith(root + "/"):
                return new_root + value[len(root):]
        return value
    if isinstance(value, list):
        return [_moved(v, old_roots, new_root) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, old_roots, new_root) for k, v in value.items()}
    return value


class JobState:
    """Job states; a job moves queued -> running -> done -> delivered, or ends failed/cancelled."""

    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # handed to a worker
    DONE = "done"  # generated, artifacts stored, not all delivered yet
    DELIVERED = "delivered"  # every artifact sent
    FAILED = "failed"  # gave up; `error` says why
    CANCELLED = "cancelled"  # the user cancelled it

    ACTIVE = (QUEUED, RUNNING)
    FINAL = (DELIVERED, FAILED, CANCELLED)


@dataclass
class Job:
    id: int
    user_key: str
    kind: str
    state: str
    priority: int
    params: dict[str, Any]
    chat: dict[str, Any]
    progress_ref: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    max_tries: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    update_key: str | None = None  # the chat update that created it (see insert_job)
    delivery_tries: int = 0  # failed tries to send its outcome
    deliver_after: float | None = None  # no try before this (capped backoff, kept across restarts)
    late_notice_at: float | None = None  # when the user was told its result is late
    notified_at: float | None = None  # when the user was told it failed (None: not yet, or not failed)


@dataclass
class Artifact:
    id: str
    job_id: int | None
    owner_key: str
    kind: str
    path: str
    media_type: str
    meta: dict[str, Any] = field(default_factory=dict)
    file_ids: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    delivered_at: float | None = None
    co_owners: tuple[str, ...] = ()  # a duo result's other people (artifact_owners)

    def owned_by(self, user_key: str) -> bool:
        """Whether `user_key` owns this result (its requester, or anyone else in a duo picture)."""
        return user_key == self.owner_key or user_key in self.co_owners


@dataclass
class DuoRequest:
    """A duo or group portrait waiting for consent: its partners' answers (None: not yet)."""

    id: str
    requester_key: str
    chat: dict[str, Any]
    params: dict[str, Any]
    state: str  # "waiting", "accepted", "declined", "expired"
    created_at: float
    expires_at: float
    answers: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Selfie:
    id: int
    user_key: str
    path: str
    face: dict[str, Any]
    created_at: float


@dataclass
class PendingInput:
    user_key: str
    chat_key: str
    command: str
    payload: dict[str, Any]
    expires_at: float


@dataclass
class Panel:
    id: str
    user_key: str
    chat_key: str
    kind: str
    state: dict[str, Any]
    expires_at: float


@dataclass
class Identity:
    user_key: str
    path: str
    photos: int
    lora_path: str | None
    updated_at: float


@dataclass
class Ban:
    user_key: str
    reason: str
    banned_by: str
    created_at: float


@dataclass
class Report:
    id: int
    artifact_id: str
    owner_key: str
    chat_key: str
    created_at: float
    reporters: int


# What expires on its own (retention): a selfie by upload time, an identity (and the LoRA trained on
# it) by when it was built, a LoRA by when it was trained, a result (a picture, video or audio sent to
# the chat) by when it was made. Job rows go once they are final, past the cutoff and hold no artifact.
DATA_CLASSES = ("selfies", "identities", "loras", "results")
_RESULT_MEDIA = "(media_type LIKE 'image/%' OR media_type LIKE 'video/%' OR media_type LIKE 'audio/%')"
_FINAL_STATES = "('delivered', 'failed', 'cancelled')"
_EXPIRED_USERS = {
    "selfies": "SELECT user_key FROM selfies WHERE created_at < :cutoff",
    "identities": "SELECT user_key FROM identities WHERE updated_at < :cutoff",
    "loras": "SELECT user_key FROM identities WHERE lora_path IS NOT NULL AND COALESCE(lora_at, updated_at) < :cutoff",
    "results": f"SELECT owner_key FROM artifacts WHERE created_at < :cutoff AND {_RESULT_MEDIA}",
}
_EXPIRED_FILES = {
    "selfies": "SELECT path FROM selfies WHERE user_key = ? AND created_at < ?",
    "identities": "SELECT path FROM identities WHERE user_key = ? AND updated_at < ? "
                  "UNION ALL SELECT lora_path FROM identities WHERE user_key = ? AND updated_at < ? "
                  "AND lora_path IS NOT NULL",
    "loras": "SELECT lora_path FROM identities WHERE user_key = ? AND lora_path IS NOT NULL "
             "AND COALESCE(lora_at, updated_at) < ?",
    "results": f"SELECT path FROM artifacts WHERE owner_key = ? AND created_at < ? AND {_RESULT_MEDIA}",
}


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _job(row: aiosqlite.Row) -> Job:
    return Job(
        id=row["id"], user_key=row["user_key"], kind=row["kind"], state=row["state"],
        priority=row["priority"], params=json.loads(row["params"]), chat=json.loads(row["chat"]),
        progress_ref=_loads(row["progress_ref"]), result=_loads(row["result"]), error=_loads(row["error"]),
        attempts=row["attempts"], max_tries=row["max_tries"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], update_key=row["update_key"],
        delivery_tries=row["delivery_tries"], deliver_after=row["deliver_after"],
        late_notice_at=row["late_notice_at"], notified_at=row["notified_at"],
    )


# A column of the other owners of an artifact row (artifacts a), as a JSON array.
_CO_OWNERS = ("(SELECT json_group_array(o.owner_key) FROM artifact_owners o WHERE o.artifact_id = artifacts.id) "
              "AS co_owners")


def _artifact(row: aiosqlite.Row) -> Artifact:
    co_owners = tuple(json.loads(row["co_owners"])) if "co_owners" in row.keys() and row["co_owners"] else ()
    return Artifact(
        id=row["id"], job_id=row["job_id"], owner_key=row["owner_key"], kind=row["kind"], path=row["path"],
        media_type=row["media_type"], meta=json.loads(row["meta"]), file_ids=json.loads(row["file_ids"]),
        created_at=row["created_at"], delivered_at=row["delivered_at"], co_owners=co_owners,
    )


class DuplicateKey(Exception):
    """A job row for this chat update exists already (the update was sent again)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a database error passes by itself: the database is locked or busy, or the disk is full."""
    if isinstance(exc, sqlite3.OperationalError):
        message = str(exc).lower()
        return any(word in message for word in TRANSIENT_MESSAGES)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EAGAIN, errno.EIO)


async def retry_transient(call: Callable[[], Awaitable[T]], what: str, budget_s: float | None,
                          give_up: Callable[[], bool] = lambda: False) -> T:
    """Runs `call`, again after each transient error (``is_transient``) with capped backoff, for up to
    `budget_s` seconds (None: until `give_up()` says so); then the last error propagates."""
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or give_up() or (
                    budget_s is not None and time.monotonic() - started >= budget_s):
                raise
            delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
            attempt += 1
            (log.warning if attempt in (1, 10) or attempt % 100 == 0 else log.debug)(
                "%s: %s; trying again in %.2f s (try %d)", what, exc, delay, attempt)
            await asyncio.sleep(delay)


def _serialised(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Runs a write method alone (on the one shared connection, another coroutine's commit landing
    inside a BEGIN ... COMMIT would commit half a transaction), retrying it after a transient error
    for up to ``Storage.write_retry_s``, to its end even when the caller is cancelled; a failed try
    leaves no transaction open."""

    @functools.wraps(method)
    async def wrapper(self: Storage, *args: Any, **kwargs: Any) -> T:
        async def attempt() -> T:
            try:
                return await method(self, *args, **kwargs)
            except BaseException:
                if self._db is not None and self._db.in_transaction:
                    try:
                        await self._db.rollback()
                    except Exception:
                        log.warning("rolling back after a failed %s failed too", method.__name__, exc_info=True)
                raise

        async def locked() -> T:
            async with self._write_lock:
                return await retry_transient(attempt, method.__name__, self.write_retry_s)

        # A write once started finishes even if its caller is cancelled (a result marked delivered stays so).
        task = asyncio.ensure_future(locked())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await task
            raise

    return wrapper


async def snapshot_database(source: Path, target: Path) -> None:
    """Copies the database at `source` to a new file `target` with SQLite's online backup API in one
    step: one consistent snapshot while the service keeps writing (WAL). Migrates nothing."""
    if Path(target).exists():
        raise FileExistsError(target)
    if not Path(source).is_file():
        raise FileNotFoundError(source)
    async with aiosqlite.connect(source) as db:
        dest = sqlite3.connect(target, check_same_thread=False)  # aiosqlite uses it from its own thread
        try:
            await db.backup(dest, pages=0)
        finally:
            dest.close()


def new_artifact_id() -> str:
    """A short unguessable id; ``action:id`` fits Telegram's 64-byte callback data."""
    return secrets.token_urlsafe(9)


class Storage:
    """The service's database. Use as ``async with Storage(path) as db``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self.write_retry_s = WRITE_RETRY_S

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("storage is not open")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        self._db.row_factory = aiosqlite.Row
        for pragma in ("journal_mode=WAL", "secure_delete=ON", "foreign_keys=ON", "synchronous=NORMAL",
                       f"busy_timeout={BUSY_TIMEOUT_MS}"):
            await self._db.execute(f"PRAGMA {pragma}")
        await self._migrate()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        await self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with self.db.execute("SELECT MAX(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        current = row[0] or 0
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            log.info("applying database migration %d", version)
            await self.db.executescript(f"BEGIN;\n{script}\nINSERT INTO schema_version VALUES ({version});\nCOMMIT;")

    async def checkpoint(self) -> None:
        """Folds the WAL into the main file and truncates it."""
        await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- users ---------------------------------------------------------------------------
    @_serialised
    async def ensure_user(self, key: str, platform: str, language: str) -> bool:
        """Creates the user row if missing; returns True when it was new."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO users (key, platform, language, created_at) VALUES (?, ?, ?, ?)",
            (key, platform, language, time.time()),
        )
        await self.db.commit()
        return cur.rowcount == 1

    @_serialised
    async def set_language(self, key: str, language: str, chosen: bool = True) -> None:
        """Stores the user's reply language: their own choice, or (`chosen` False) what their app reports."""
        await self.db.execute("UPDATE users SET language = ?, language_chosen = ? WHERE key = ?",
                              (language, int(chosen), key))
        await self.db.commit()

    async def language_choice(self, key: str) -> tuple[str, bool] | None:
        """The user's stored language and whether they chose it; None for an unknown user."""
        async with self.db.execute("SELECT language, language_chosen FROM users WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return (row["language"], bool(row["language_chosen"])) if row else None

    @_serialised
    async def set_voice(self, key: str, voice: str | None) -> None:
        """Stores the /talk voice the user chose (None: back to the default)."""
        await self.db.execute("UPDATE users SET voice = ? WHERE key = ?", (voice, key))
        await self.db.commit()

    async def user_voice(self, key: str) -> str | None:
        """The /talk voice the user chose, or None."""
        async with self.db.execute("SELECT voice FROM users WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return row["voice"] if row else None

    async def user_language(self, key: str) -> str | None:
        async with self.db.execute("SELECT language FROM users WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return row["language"] if row else None

    @_serialised
    async def delete_user(self, key: str) -> dict[str, int]:
        """Deletes every row of the user in one transaction; returns counts per table.

        A duo result goes for everyone in it, with the duo jobs naming the user, the requests they were
        asked in and the blocks naming them (``shared_results`` lists those results' files first)."""
        counts: dict[str, int] = {}
        await self.db.execute("BEGIN")
        try:
            for table, sql in _DUO_DELETIONS:
                cur = await self.db.execute(sql, (key,) * sql.count("?"))
                counts[table] = counts.get(table, 0) + max(cur.rowcount, 0)
            for table, column in USER_TABLES.items():
                cur = await self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
                counts[table] = counts.get(table, 0) + cur.rowcount
            await self.db.execute(_ORPHAN_OWNERS)
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        await self.checkpoint()
        return counts

    # -- selfies -------------------------------------------------------------------------
    @_serialised
    async def add_selfie(self, user_key: str, path: str, face: dict[str, Any]) -> int:
        cur = await self.db.execute(
            "INSERT INTO selfies (user_key, path, face, created_at) VALUES (?, ?, ?, ?)",
            (user_key, path, json.dumps(face), time.time()),
        )
        await self.db.commit()
        return int(cur.lastrowid)

    async def selfies(self, user_key: str) -> list[Selfie]:
        async with self.db.execute(
            "SELECT * FROM selfies WHERE user_key = ? ORDER BY id", (user_key,)
        ) as cur:
            rows = await cur.fetchall()
        return [Selfie(r["id"], r["user_key"], r["path"], json.loads(r["face"]), r["created_at"]) for r in rows]

    @_serialised
    async def remove_selfie(self, selfie_id: int) -> None:
        await self.db.execute("DELETE FROM selfies WHERE id = ?", (selfie_id,))
        await self.db.commit()

    # -- identities ----------------------------------------------------------------------
    @_serialised
    async def set_identity(self, user_key: str, path: str, photos: int) -> None:
        await self.db.execute(
            "INSERT INTO identities (user_key, path, photos, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user_key) DO UPDATE SET path = excluded.path, photos = excluded.photos, "
            "updated_at = excluded.updated_at",
            (user_key, path, photos, time.time()),
        )
        await self.db.commit()

    @_serialised
    async def set_lora(self, user_key: str, lora_path: str | None) -> None:
        """Records the user's LoRA and when it was trained (its own retention clock; the identity's stays)."""
        await self.db.execute(
            "UPDATE identities SET lora_path = ?, lora_at = ? WHERE user_key = ?",
            (lora_path, time.time() if lora_path else None, user_key),
        )
        await self.db.commit()

    async def identity(self, user_key: str) -> Identity | None:
        async with self.db.execute("SELECT * FROM identities WHERE user_key = ?", (user_key,)) as cur:
            r = await cur.fetchone()
        if r is None:
            return None
        return Identity(r["user_key"], r["path"], r["photos"], r["lora_path"], r["updated_at"])

    # -- jobs ----------------------------------------------------------------------------
    @_serialised
    async def insert_job(
        self, user_key: str, kind: str, priority: int, params: dict[str, Any], chat: dict[str, Any], max_tries: int,
        update_key: str | None = None,
    ) -> Job:
        """Writes a queued job; with `update_key` (the chat update that asked for it) in the same row, under
        a unique index: raises DuplicateKey when a job of that update exists."""
        now = time.time()
        try:
            cur = await self.db.execute(
                "INSERT INTO jobs (user_key, kind, state, priority, params, chat, max_tries, created_at, update_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (user_key, kind, JobState.QUEUED, priority, json.dumps(params), json.dumps(chat), max_tries, now,
                 update_key),
            )
        except sqlite3.IntegrityError as exc:
            if update_key is not None and "update_key" in str(exc):
                raise DuplicateKey(update_key) from None
            raise
        await self.db.commit()
        job = await self.job(int(cur.lastrowid))
        assert job is not None
        return job

    async def update_seen(self, update_key: str) -> bool:
        """Whether a job was created by this chat update already."""
        async with self.db.execute("SELECT 1 FROM jobs WHERE update_key = ?", (update_key,)) as cur:
            return await cur.fetchone() is not None

    async def job(self, job_id: int) -> Job | None:
        async with self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    async def jobs_in_states(self, states: Iterable[str]) -> list[Job]:
        states = list(states)
        marks = ",".join("?" * len(states))
        async with self.db.execute(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states
        ) as cur:
            return [_job(r) for r in await cur.fetchall()]

    async def user_jobs(self, user_key: str, states: Iterable[str]) -> list[Job]:
        states = list(states)
        marks = ",".join("?" * len(states))
        async with self.db.execute(
            f"SELECT * FROM jobs WHERE user_key = ? AND state IN ({marks}) ORDER BY id", [user_key, *states]
        ) as cur:
            return [_job(r) for r in await cur.fetchall()]

    # Writes by job id return False when the row is gone (its user deleted everything): a late write of a
    # deleted user's job is refused, not turned into new rows.
    async def _update_job(self, sql: str, args: tuple[Any, ...]) -> bool:
        cur = await self.db.execute(sql, args)
        await self.db.commit()
        return cur.rowcount == 1

    @_serialised
    async def mark_running(self, job_id: int) -> bool:
        """Counts the attempt before the job runs (a worker death mid-job is an attempt)."""
        return await self._update_job("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
                                      (JobState.RUNNING, time.time(), job_id))

    @_serialised
    async def requeue(self, job_id: int) -> bool:
        return await self._update_job("UPDATE jobs SET state = ? WHERE id = ?", (JobState.QUEUED, job_id))

    @_serialised
    async def release_job(self, job_id: int) -> bool:
        """Puts a job that was stopped by us (shutdown, a neighbour's timeout) back, refunding its attempt."""
        return await self._update_job(
            "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), started_at = NULL WHERE id = ?",
            (JobState.QUEUED, job_id))

    @_serialised
    async def set_progress_ref(self, job_id: int, ref: dict[str, Any]) -> bool:
        return await self._update_job("UPDATE jobs SET progress_ref = ? WHERE id = ?", (json.dumps(ref), job_id))

    @_serialised
    async def finish_job(self, job_id: int, result: dict[str, Any], artifacts: list[Artifact]) -> bool:
        """Stores the result and its artifacts in one transaction: the job is never generated twice.
        Returns False, writing nothing, when the job row is gone."""
        await self.db.execute("BEGIN")
        try:
            cur = await self.db.execute(
                "UPDATE jobs SET state = ?, result = ?, finished_at = ? WHERE id = ?",
                (JobState.DONE, json.dumps(result), time.time(), job_id),
            )
            if cur.rowcount != 1:
                await self.db.rollback()
                return False
            for a in artifacts:
                await self.db.execute(
                    "INSERT INTO artifacts (id, job_id, owner_key, kind, path, media_type, meta, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.id, job_id, a.owner_key, a.kind, a.path, a.media_type, json.dumps(a.meta), a.created_at or time.time()),
                )
                # A duo result belongs to everyone in it: the job's owners besides its requester.
                await self.db.execute(
                    "INSERT OR IGNORE INTO artifact_owners (artifact_id, owner_key) SELECT ?, o.value FROM jobs j, "
                    "json_each(j.params, '$.owners') o WHERE j.id = ? AND o.value != j.user_key",
                    (a.id, job_id))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        return True

    @_serialised
    async def end_job(self, job_id: int, state: str, error: dict[str, Any] | None = None, *,
                      notify: bool = False) -> bool:
        """Ends a job in `state`; with `notify`, the user is still to be told why (see mark_notified)."""
        now = time.time()
        return await self._update_job(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, notified_at = ? WHERE id = ?",
            (state, json.dumps(error) if error else None, now, None if notify else now, job_id))

    @_serialised
    async def mark_notified(self, job_id: int) -> bool:
        """Records that the user was told how their failed job ended."""
        return await self._update_job("UPDATE jobs SET notified_at = ? WHERE id = ?", (time.time(), job_id))

    @_serialised
    async def delivery_failed(self, job_id: int, retry_at: float) -> int:
        """Counts a failed try to send a job's outcome and when to try next; returns the tries so far."""
        async with self.db.execute(
            "UPDATE jobs SET delivery_tries = delivery_tries + 1, deliver_after = ? WHERE id = ? "
            "RETURNING delivery_tries", (retry_at, job_id)
        ) as cur:
            row = await cur.fetchone()
        await self.db.commit()
        return int(row[0]) if row else 0

    @_serialised
    async def set_late_notice(self, job_id: int) -> bool:
        """Records that the user was told their result is late."""
        return await self._update_job("UPDATE jobs SET late_notice_at = ? WHERE id = ?", (time.time(), job_id))

    async def unsent_outcomes(self) -> list[Job]:
        """Jobs whose outcome has not reached the user: results not delivered, failures not told."""
        async with self.db.execute(
            "SELECT * FROM jobs WHERE state = ? OR (state = ? AND notified_at IS NULL) ORDER BY id",
            (JobState.DONE, JobState.FAILED),
        ) as cur:
            return [_job(r) for r in await cur.fetchall()]

    @_serialised
    async def mark_job_delivered(self, job_id: int) -> bool:
        """Marks the job and every artifact of it not yet marked as delivered, in one transaction."""
        now = time.time()
        await self.db.execute("BEGIN")
        try:
            await self.db.execute(
                "UPDATE artifacts SET delivered_at = ? WHERE job_id = ? AND delivered_at IS NULL", (now, job_id)
            )
            cur = await self.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (JobState.DELIVERED, job_id))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        return cur.rowcount == 1

    # -- artifacts -----------------------------------------------------------------------
    @_serialised
    async def add_artifact(self, artifact: Artifact) -> None:
        await self.db.execute(
            "INSERT INTO artifacts (id, job_id, owner_key, kind, path, media_type, meta, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (artifact.id, artifact.job_id, artifact.owner_key, artifact.kind, artifact.path, artifact.media_type,
             json.dumps(artifact.meta), artifact.created_at or time.time()),
        )
        await self.db.commit()

    async def artifact(self, artifact_id: str) -> Artifact | None:
        async with self.db.execute(f"SELECT *, {_CO_OWNERS} FROM artifacts WHERE id = ?", (artifact_id,)) as cur:
            row = await cur.fetchone()
        return _artifact(row) if row else None

    async def job_artifacts(self, job_id: int) -> list[Artifact]:
        async with self.db.execute(f"SELECT *, {_CO_OWNERS} FROM artifacts WHERE job_id = ? ORDER BY rowid",
                                   (job_id,)) as cur:
            return [_artifact(r) for r in await cur.fetchall()]

    async def shared_results(self, user_key: str) -> list[Artifact]:
        """The duo results the user is in (as requester or partner) that name anyone else: /delete removes
        them for everyone, so their files (in the requester's folder) go first and the others are told."""
        async with self.db.execute(
            f"SELECT *, {_CO_OWNERS} FROM artifacts WHERE id IN ({_CO_OWNED}) OR (owner_key = ? AND id IN "
            "(SELECT artifact_id FROM artifact_owners)) ORDER BY rowid", (user_key, user_key),
        ) as cur:
            return [_artifact(r) for r in await cur.fetchall()]

    @_serialised
    async def mark_delivered(self, artifact_id: str, platform: str, file_id: str | None) -> None:
        """Records that an artifact reached its chat (and its platform file id for re-sharing)."""
        art = await self.artifact(artifact_id)
        if art is None:
            return
        if file_id:
            art.file_ids[platform] = file_id
        await self.db.execute(
            "UPDATE artifacts SET delivered_at = ?, file_ids = ? WHERE id = ?",
            (time.time(), json.dumps(art.file_ids), artifact_id),
        )
        await self.db.commit()

    # -- pending inputs ------------------------------------------------------------------
    @_serialised
    async def set_pending(self, user_key: str, chat_key: str, command: str, payload: dict[str, Any], ttl_s: float) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO pending_inputs (user_key, chat_key, command, payload, expires_at) VALUES (?, ?, ?, ?, ?)",
            (user_key, chat_key, command, json.dumps(payload), time.time() + ttl_s),
        )
        await self.db.commit()

    @_serialised
    async def take_pending(self, user_key: str, chat_key: str) -> PendingInput | None:
        """Removes and returns the user's unexpired pending input in that chat."""
        async with self.db.execute(
            "DELETE FROM pending_inputs WHERE user_key = ? AND chat_key = ? RETURNING *", (user_key, chat_key)
        ) as cur:
            row = await cur.fetchone()
        await self.db.commit()
        if row is None or row["expires_at"] < time.time():
            return None
        return PendingInput(row["user_key"], row["chat_key"], row["command"], json.loads(row["payload"]), row["expires_at"])

    # -- panels --------------------------------------------------------------------------
    @_serialised
    async def open_panel(self, user_key: str, chat_key: str, kind: str, state: dict[str, Any], ttl_s: float,
                         panel_id: str | None = None) -> str:
        """Stores a panel of the user in that chat, new or (`panel_id`) again; expired panels go. Returns its id."""
        panel_id = panel_id or secrets.token_urlsafe(6)
        now = time.time()
        await self.db.execute("DELETE FROM panels WHERE expires_at < ?", (now,))
        await self.db.execute(
            "INSERT OR REPLACE INTO panels (id, user_key, chat_key, kind, state, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
            (panel_id, user_key, chat_key, kind, json.dumps(state), now + ttl_s))
        await self.db.commit()
        return panel_id

    async def panel(self, panel_id: str) -> Panel | None:
        """The panel, unless it is gone or expired."""
        async with self.db.execute("SELECT * FROM panels WHERE id = ? AND expires_at >= ?",
                                   (panel_id, time.time())) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return Panel(row["id"], row["user_key"], row["chat_key"], row["kind"], json.loads(row["state"]),
                     row["expires_at"])

    @_serialised
    async def update_panel(self, panel_id: str, state: dict[str, Any]) -> None:
        await self.db.execute("UPDATE panels SET state = ? WHERE id = ?", (json.dumps(state), panel_id))
        await self.db.commit()

    @_serialised
    async def close_panel(self, panel_id: str) -> bool:
        """Removes the panel; True when it was there (a second press of "Go" finds it gone)."""
        cur = await self.db.execute("DELETE FROM panels WHERE id = ?", (panel_id,))
        await self.db.commit()
        return cur.rowcount == 1

    # -- groups and sharing --------------------------------------------------------------
    async def chat_settings(self, chat_key: str) -> dict[str, Any]:
        """The settings a group's admins stored ({} when none)."""
        async with self.db.execute("SELECT settings FROM chat_settings WHERE chat_key = ?", (chat_key,)) as cur:
            row = await cur.fetchone()
        return json.loads(row["settings"]) if row else {}

    @_serialised
    async def set_chat_settings(self, chat_key: str, settings: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO chat_settings (chat_key, settings, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(chat_key) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at",
            (chat_key, json.dumps(settings), time.time()),
        )
        await self.db.commit()

    @_serialised
    async def take_chat_quota(self, chat_key: str, user_key: str, day: str, limit: int) -> bool:
        """Counts one job of the member in the group that `day`, unless `limit` is reached; True when counted."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        await self.db.execute("DELETE FROM chat_usage WHERE day < ?", (day,))
        cur = await self.db.execute(
            "INSERT INTO chat_usage (chat_key, user_key, day, jobs) VALUES (?, ?, ?, 1) "
            "ON CONFLICT(chat_key, user_key, day) DO UPDATE SET jobs = jobs + 1 WHERE jobs < ?",
            (chat_key, user_key, day, limit),
        )
        await self.db.commit()
        return cur.rowcount == 1

    @_serialised
    async def refund_chat_quota(self, chat_key: str, user_key: str, day: str) -> None:
        """Gives back a job counted by take_chat_quota (the job was refused after all)."""
        await self.db.execute(
            "UPDATE chat_usage SET jobs = jobs - 1 WHERE chat_key = ? AND user_key = ? AND day = ? AND jobs > 0",
            (chat_key, user_key, day),
        )
        await self.db.commit()

    async def chat_jobs_today(self, chat_key: str, user_key: str, day: str) -> int:
        async with self.db.execute(
            "SELECT jobs FROM chat_usage WHERE chat_key = ? AND user_key = ? AND day = ?", (chat_key, user_key, day)
        ) as cur:
            row = await cur.fetchone()
        return int(row["jobs"]) if row else 0

    async def recent_results(self, owner_key: str, platform: str, limit: int) -> list[Artifact]:
        """The owner's newest delivered pictures that `platform` holds a file id of (to re-send without upload)."""
        async with self.db.execute(
            f"SELECT *, {_CO_OWNERS} FROM artifacts WHERE (owner_key = ? OR id IN ({_CO_OWNED})) "
            "AND media_type LIKE 'image/%' AND delivered_at IS NOT NULL "
            "AND json_extract(file_ids, ?) IS NOT NULL ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (owner_key, owner_key, f'$."{platform}"', limit),
        ) as cur:
            return [_artifact(r) for r in await cur.fetchall()]

    # -- duo and group portraits ---------------------------------------------------------
    @_serialised
    async def open_duo_request(self, request_id: str, requester_key: str, chat: dict[str, Any],
                               params: dict[str, Any], partners: list[str], ttl_s: float) -> None:
        """A request waiting for each partner's answer until ``ttl_s`` from now."""
        now = time.time()
        await self.db.execute("BEGIN")
        try:
            await self.db.execute(
                "INSERT INTO duo_requests (id, requester_key, chat, params, state, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, 'waiting', ?, ?)",
                (request_id, requester_key, json.dumps(chat), json.dumps(params), now, now + ttl_s))
            await self.db.executemany("INSERT INTO duo_consents (request_id, partner_key) VALUES (?, ?)",
                                      [(request_id, p) for p in partners])
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def duo_request(self, request_id: str) -> DuoRequest | None:
        async with self.db.execute("SELECT * FROM duo_requests WHERE id = ?", (request_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        async with self.db.execute("SELECT partner_key, answer FROM duo_consents WHERE request_id = ? ORDER BY rowid",
                                   (request_id,)) as cur:
            answers = {r["partner_key"]: r["answer"] for r in await cur.fetchall()}
        return DuoRequest(id=row["id"], requester_key=row["requester_key"], chat=json.loads(row["chat"]),
                          params=json.loads(row["params"]), state=row["state"], created_at=row["created_at"],
                          expires_at=row["expires_at"], answers=answers)

    @_serialised
    async def answer_duo(self, request_id: str, partner_key: str, answer: str) -> bool:
        """Records a partner's yes or no on a waiting, unexpired request; False when it is not theirs or over."""
        cur = await self.db.execute(
            "UPDATE duo_consents SET answer = ? WHERE request_id = ? AND partner_key = ? AND answer IS NULL "
            "AND EXISTS (SELECT 1 FROM duo_requests r WHERE r.id = ? AND r.state = 'waiting' AND r.expires_at > ?)",
            (answer, request_id, partner_key, request_id, time.time()))
        await self.db.commit()
        return cur.rowcount == 1

    @_serialised
    async def close_duo_request(self, request_id: str, state: str) -> bool:
        """Moves a waiting request to `state` (accepted, declined, expired); False when it was not waiting."""
        cur = await self.db.execute("UPDATE duo_requests SET state = ? WHERE id = ? AND state = 'waiting'",
                                    (state, request_id))
        await self.db.commit()
        return cur.rowcount == 1

    async def waiting_duo_requests(self) -> list[str]:
        """Ids of requests still waiting (the expiry timers to set again after a restart)."""
        async with self.db.execute("SELECT id FROM duo_requests WHERE state = 'waiting' ORDER BY expires_at") as cur:
            return [r[0] for r in await cur.fetchall()]

    async def duo_waiting_between(self, requester_key: str, partner_key: str) -> bool:
        """Whether the requester already has a request waiting for this partner's answer."""
        async with self.db.execute(
            "SELECT 1 FROM duo_requests r JOIN duo_consents c ON c.request_id = r.id WHERE r.requester_key = ? "
            "AND c.partner_key = ? AND r.state = 'waiting' AND r.expires_at > ?",
            (requester_key, partner_key, time.time())) as cur:
            return await cur.fetchone() is not None

    @_serialised
    async def block_duo(self, blocker_key: str, blocked_key: str, blocked: bool = True) -> bool:
        """Blocks (or unblocks) duo requests from `blocked_key` to `blocker_key`; False when nothing changed."""
        if blocked:
            cur = await self.db.execute(
                "INSERT OR IGNORE INTO duo_blocks (blocker_key, blocked_key, created_at) VALUES (?, ?, ?)",
                (blocker_key, blocked_key, time.time()))
        else:
            cur = await self.db.execute("DELETE FROM duo_blocks WHERE blocker_key = ? AND blocked_key = ?",
                                        (blocker_key, blocked_key))
        await self.db.commit()
        return cur.rowcount == 1

    async def duo_blocked(self, blocker_key: str, blocked_key: str) -> bool:
        async with self.db.execute("SELECT 1 FROM duo_blocks WHERE blocker_key = ? AND blocked_key = ?",
                                   (blocker_key, blocked_key)) as cur:
            return await cur.fetchone() is not None

    # -- safety: bans, reports, quotas, retention ------------------------------------------
    @_serialised
    async def ban_user(self, user_key: str, reason: str, banned_by: str) -> bool:
        """Bans a user; False when they already were (the first ban and its reason stay)."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO bans (user_key, reason, banned_by, created_at) VALUES (?, ?, ?, ?)",
            (user_key, reason, banned_by, time.time()),
        )
        await self.db.commit()
        return cur.rowcount == 1

    @_serialised
    async def unban_user(self, user_key: str) -> bool:
        """Lifts a ban; False when there was none."""
        cur = await self.db.execute("DELETE FROM bans WHERE user_key = ?", (user_key,))
        await self.db.commit()
        return cur.rowcount == 1

    async def ban(self, user_key: str) -> Ban | None:
        async with self.db.execute("SELECT * FROM bans WHERE user_key = ?", (user_key,)) as cur:
            r = await cur.fetchone()
        return Ban(r["user_key"], r["reason"], r["banned_by"], r["created_at"]) if r else None

    async def bans(self) -> list[Ban]:
        async with self.db.execute("SELECT * FROM bans ORDER BY created_at") as cur:
            return [Ban(r["user_key"], r["reason"], r["banned_by"], r["created_at"]) for r in await cur.fetchall()]

    @_serialised
    async def add_report(self, artifact_id: str, owner_key: str, reporter_key: str,
                         chat_key: str) -> tuple[Report, bool]:
        """Records that `reporter_key` reported the artifact; returns its report and whether this reporter is new."""
        now = time.time()
        await self.db.execute("BEGIN")
        try:
            await self.db.execute(
                "INSERT OR IGNORE INTO reports (artifact_id, owner_key, chat_key, created_at) VALUES (?, ?, ?, ?)",
                (artifact_id, owner_key, chat_key, now),
            )
            async with self.db.execute("SELECT id FROM reports WHERE artifact_id = ?", (artifact_id,)) as cur:
                report_id = (await cur.fetchone())["id"]
            cur = await self.db.execute(
                "INSERT OR IGNORE INTO report_reporters (report_id, reporter_key, created_at) VALUES (?, ?, ?)",
                (report_id, reporter_key, now),
            )
            new = cur.rowcount == 1
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        report = await self.report(report_id)
        assert report is not None
        return report, new

    async def report(self, report_id: int) -> Report | None:
        async with self.db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM report_reporters p WHERE p.report_id = r.id) AS reporters "
            "FROM reports r WHERE r.id = ?", (report_id,)
        ) as cur:
            r = await cur.fetchone()
        return Report(r["id"], r["artifact_id"], r["owner_key"], r["chat_key"], r["created_at"], r["reporters"]) \
            if r else None

    async def jobs_per_kind(self, user_key: str, since: float) -> dict[str, int]:
        """The user's jobs per kind created since `since`; one cancelled before it started is not counted."""
        async with self.db.execute(
            "SELECT kind, COUNT(*) AS n FROM jobs WHERE user_key = ? AND created_at >= ? "
            "AND NOT (state = 'cancelled' AND started_at IS NULL) GROUP BY kind", (user_key, since)
        ) as cur:
            return {r["kind"]: r["n"] for r in await cur.fetchall()}

    async def stats(self) -> dict[str, Any]:
        """Counts for operators: users, jobs per state, bans, reports."""
        out: dict[str, Any] = {}
        for name, table in (("users", "users"), ("bans", "bans"), ("reports", "reports")):
            async with self.db.execute(f"SELECT COUNT(*) FROM {table}") as cur:
                out[name] = (await cur.fetchone())[0]
        async with self.db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state") as cur:
            out["jobs"] = {r["state"]: r["n"] for r in await cur.fetchall()}
        return out

    async def stored_summary(self, user_key: str) -> dict[str, Any]:
        """What is stored about the user, per data class: counts and the times their expiry counts from."""
        async def one(sql: str) -> aiosqlite.Row:
            async with self.db.execute(sql, (user_key,)) as cur:
                row = await cur.fetchone()
            assert row is not None
            return row

        selfies = await one("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM selfies WHERE user_key = ?")
        results = await one(f"SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM artifacts "
                            f"WHERE owner_key = ? AND {_RESULT_MEDIA}")
        jobs = await one("SELECT COUNT(*) AS n FROM jobs WHERE user_key = ?")
        reported = await one("SELECT COUNT(*) AS n FROM report_reporters WHERE reporter_key = ?")
        async with self.db.execute(
            "SELECT COUNT(DISTINCT artifact_id) AS n FROM artifact_owners WHERE owner_key = ? OR artifact_id IN "
            "(SELECT id FROM artifacts WHERE owner_key = ?)", (user_key, user_key)) as cur:
            duo = await cur.fetchone()
        identity = await self.identity(user_key)
        lora_at = None
        if identity is not None and identity.lora_path:
            lora_at = (await one("SELECT COALESCE(lora_at, updated_at) AS at FROM identities WHERE user_key = ?"))["at"]
        return {
            "selfies": {"count": selfies["n"], "oldest": selfies["oldest"]},
            "identities": {"count": int(identity is not None), "oldest": identity.updated_at if identity else None},
            "loras": {"count": int(lora_at is not None), "oldest": lora_at},
            "results": {"count": results["n"], "oldest": results["oldest"]},
            "jobs": jobs["n"],
            "reports_made": reported["n"],
            "duo_results": duo["n"],
        }

    async def named_paths(self, user_key: str, now: float) -> tuple[list[str], list[str]]:
        """What the user's rows name: (1) the paths of their data (selfies, identity, LoRA, artifacts), and
        (2) every string in the params of their jobs still to run or deliver and in a command's unexpired
        wait for a file (the inputs and output folders those still need). A file under the user's folder
        that neither names is a leftover."""
        keys = (user_key,) * 4
        async with self.db.execute(
            "SELECT path FROM selfies WHERE user_key = ? UNION ALL SELECT path FROM identities WHERE user_key = ? "
            "UNION ALL SELECT lora_path FROM identities WHERE user_key = ? AND lora_path IS NOT NULL "
            "UNION ALL SELECT path FROM artifacts WHERE owner_key = ?", keys
        ) as cur:
            data = [r[0] for r in await cur.fetchall()]
        needed: list[str] = []
        async with self.db.execute(
            "SELECT params FROM jobs WHERE user_key = ? AND state IN (?, ?, ?) "
            "UNION ALL SELECT payload FROM pending_inputs WHERE user_key = ? AND expires_at > ?",
            (user_key, JobState.QUEUED, JobState.RUNNING, JobState.DONE, user_key, now),
        ) as cur:
            for row in await cur.fetchall():
                needed += _strings(json.loads(row[0]))
        return data, needed

    async def users_with_expired(self, cutoffs: dict[str, float]) -> list[str]:
        """Users holding data of a class older than its cutoff (``{data class: unix time}``)."""
        parts, args = [], []
        for data_class, cutoff in cutoffs.items():
            parts.append(_EXPIRED_USERS[data_class].replace(":cutoff", "?"))
            args.append(cutoff)
        if "results" in cutoffs:  # job history whose results are gone
            parts.append(f"SELECT user_key FROM jobs WHERE state IN {_FINAL_STATES} AND created_at < ? "
                         "AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.job_id = jobs.id)")
            args.append(cutoffs["results"])
        if not parts:
            return []
        async with self.db.execute(f"SELECT DISTINCT * FROM ({' UNION '.join(parts)}) ORDER BY 1", args) as cur:
            return [r[0] for r in await cur.fetchall()]

    async def expired_files(self, user_key: str, data_class: str, cutoff: float) -> list[str]:
        """The files (paths as stored) of the user's data of `data_class` older than `cutoff`."""
        sql = _EXPIRED_FILES[data_class]
        args = (user_key, cutoff) * (sql.count("?") // 2)
        async with self.db.execute(sql, args) as cur:
            return [r[0] for r in await cur.fetchall() if r[0]]

    @_serialised
    async def delete_expired(self, user_key: str, data_class: str, cutoff: float) -> dict[str, int]:
        """Deletes the rows of the user's `data_class` data older than `cutoff` (and what hangs on them:
        artifact rows of those files, reports of deleted results, final job rows left without artifacts)
        in one transaction; returns counts per table."""
        if data_class not in DATA_CLASSES:
            raise ValueError(f"unknown data class {data_class!r}, expected one of {DATA_CLASSES}")
        counts: dict[str, int] = {}

        async def run(table: str, sql: str, args: tuple[Any, ...]) -> None:
            cur = await self.db.execute(sql, args)
            counts[table] = counts.get(table, 0) + max(cur.rowcount, 0)

        files = await self.expired_files(user_key, data_class, cutoff)
        await self.db.execute("BEGIN")
        try:
            if data_class in ("identities", "loras") and files:
                marks = ",".join("?" * len(files))
                await run("artifacts", f"DELETE FROM artifacts WHERE owner_key = ? AND path IN ({marks})",
                          (user_key, *files))
            if data_class == "selfies":
                await run("selfies", "DELETE FROM selfies WHERE user_key = ? AND created_at < ?", (user_key, cutoff))
            elif data_class == "identities":
                await run("identities", "DELETE FROM identities WHERE user_key = ? AND updated_at < ?",
                          (user_key, cutoff))
            elif data_class == "loras":
                await run("identities", "UPDATE identities SET lora_path = NULL, lora_at = NULL WHERE user_key = ? "
                          "AND lora_path IS NOT NULL AND COALESCE(lora_at, updated_at) < ?", (user_key, cutoff))
            else:
                await run("artifacts", "DELETE FROM artifacts WHERE owner_key = ? AND created_at < ? "
                          f"AND {_RESULT_MEDIA}", (user_key, cutoff))
                await run("reports", "DELETE FROM reports WHERE owner_key = ? "
                          "AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.id = reports.artifact_id)", (user_key,))
                await run("artifact_owners", _ORPHAN_OWNERS, ())
            await run("jobs", f"DELETE FROM jobs WHERE user_key = ? AND state IN {_FINAL_STATES} AND created_at < ? "
                      "AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.job_id = jobs.id)", (user_key, cutoff))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        await self.checkpoint()
        return {table: n for table, n in counts.items() if n}

    # -- statistics ----------------------------------------------------------------------
    @_serialised
    async def record_duration(self, kind: str, seconds: float, alpha: float = 0.2) -> None:
        """Updates the running average (EWMA) of a kind's run time."""
        await self.db.execute(
            "INSERT INTO kind_stats (kind, avg_seconds, samples) VALUES (?, ?, 1) "
            "ON CONFLICT(kind) DO UPDATE SET avg_seconds = avg_seconds * (1 - ?) + ? * ?, samples = samples + 1",
            (kind, seconds, alpha, alpha, seconds),
        )
        await self.db.commit()

    async def kind_averages(self) -> dict[str, float]:
        async with self.db.execute("SELECT kind, avg_seconds FROM kind_stats") as cur:
            return {r["kind"]: r["avg_seconds"] for r in await cur.fetchall()}

    # -- backup and restore --------------------------------------------------------------
    async def file_paths(self) -> list[str]:
        """Every file or folder path that a row names (selfies, identities, LoRAs, artifacts)."""
        parts = [f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"
                 for table, columns in PATH_COLUMNS.items() for column in columns]
        async with self.db.execute(" UNION ALL ".join(parts)) as cur:
            return [row[0] for row in await cur.fetchall()]

    async def table_counts(self) -> dict[str, int]:
        """Rows per table of user data (for backup summaries)."""
        counts: dict[str, int] = {}
        for table in USER_TABLES:
            async with self.db.execute(f"SELECT COUNT(*) FROM {table}") as cur:
                counts[table] = (await cur.fetchone())[0]
        return counts

    @_serialised
    async def relocate_paths(self, old_roots: Iterable[str], new_root: str) -> int:
        """Re-roots every stored path under one of `old_roots` at `new_root` (a restored data dir).

        Returns how many values changed."""
        roots = tuple(sorted({r.rstrip("/") for r in old_roots if r.rstrip("/")}, key=len, reverse=True))
        new_root = new_root.rstrip("/")
        changed = 0
        await self.db.execute("BEGIN")
        try:
            for is_json, spec in ((False, PATH_COLUMNS), (True, JSON_PATH_COLUMNS)):
                for table, columns in spec.items():
                    for column in columns:
                        select = f"SELECT rowid, {column} FROM {table} WHERE {column} IS NOT NULL"
                        async with self.db.execute(select) as cur:
                            rows = await cur.fetchall()
                        for rowid, stored in rows:
                            value = json.loads(stored) if is_json else stored
                            moved = _moved(value, roots, new_root)
                            if moved != value:
                                await self.db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                                                      (json.dumps(moved) if is_json else moved, rowid))
                                changed += 1
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise
        return changed
