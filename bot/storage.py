"""SQLite storage: every SQL statement of the service lives in this module.

WAL journal, ``secure_delete`` on (deleted rows are zeroed on disk), migrations recorded in a
version table. Timestamps are Unix seconds (float). JSON columns hold dicts.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger(__name__)
T = TypeVar("T")

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
]

# Tables holding a user's rows, and the column naming the user: /delete empties all of them.
USER_TABLES: dict[str, str] = {
    "pending_inputs": "user_key",
    "artifacts": "owner_key",
    "jobs": "user_key",
    "identities": "user_key",
    "selfies": "user_key",
    "users": "key",
}


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
class Identity:
    user_key: str
    path: str
    photos: int
    lora_path: str | None
    updated_at: float


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _job(row: aiosqlite.Row) -> Job:
    return Job(
        id=row["id"], user_key=row["user_key"], kind=row["kind"], state=row["state"],
        priority=row["priority"], params=json.loads(row["params"]), chat=json.loads(row["chat"]),
        progress_ref=_loads(row["progress_ref"]), result=_loads(row["result"]), error=_loads(row["error"]),
        attempts=row["attempts"], max_tries=row["max_tries"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"],
    )


def _artifact(row: aiosqlite.Row) -> Artifact:
    return Artifact(
        id=row["id"], job_id=row["job_id"], owner_key=row["owner_key"], kind=row["kind"], path=row["path"],
        media_type=row["media_type"], meta=json.loads(row["meta"]), file_ids=json.loads(row["file_ids"]),
        created_at=row["created_at"], delivered_at=row["delivered_at"],
    )


def _serialised(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Runs a write method alone: on the one shared connection, another coroutine's commit
    landing inside a BEGIN ... COMMIT would commit half a transaction."""

    @functools.wraps(method)
    async def wrapper(self: Storage, *args: Any, **kwargs: Any) -> T:
        async with self._write_lock:
            return await method(self, *args, **kwargs)

    return wrapper


def new_artifact_id() -> str:
    """A short unguessable id; ``action:id`` fits Telegram's 64-byte callback data."""
    return secrets.token_urlsafe(9)


class Storage:
    """The service's database. Use as ``async with Storage(path) as db``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

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
        for pragma in ("journal_mode=WAL", "secure_delete=ON", "foreign_keys=ON", "synchronous=NORMAL"):
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
    async def set_language(self, key: str, language: str) -> None:
        await self.db.execute("UPDATE users SET language = ? WHERE key = ?", (language, key))
        await self.db.commit()

    async def user_language(self, key: str) -> str | None:
        async with self.db.execute("SELECT language FROM users WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return row["language"] if row else None

    @_serialised
    async def delete_user(self, key: str) -> dict[str, int]:
        """Deletes every row of the user in one transaction; returns counts per table."""
        counts: dict[str, int] = {}
        await self.db.execute("BEGIN")
        try:
            for table, column in USER_TABLES.items():
                cur = await self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
                counts[table] = cur.rowcount
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
        await self.db.execute(
            "UPDATE identities SET lora_path = ?, updated_at = ? WHERE user_key = ?",
            (lora_path, time.time(), user_key),
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
        self, user_key: str, kind: str, priority: int, params: dict[str, Any], chat: dict[str, Any], max_tries: int
    ) -> Job:
        now = time.time()
        cur = await self.db.execute(
            "INSERT INTO jobs (user_key, kind, state, priority, params, chat, max_tries, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (user_key, kind, JobState.QUEUED, priority, json.dumps(params), json.dumps(chat), max_tries, now),
        )
        await self.db.commit()
        job = await self.job(int(cur.lastrowid))
        assert job is not None
        return job

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

    @_serialised
    async def mark_running(self, job_id: int) -> None:
        """Counts the attempt before the job runs (a worker death mid-job is an attempt)."""
        await self.db.execute(
            "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
            (JobState.RUNNING, time.time(), job_id),
        )
        await self.db.commit()

    @_serialised
    async def requeue(self, job_id: int) -> None:
        await self.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (JobState.QUEUED, job_id))
        await self.db.commit()

    @_serialised
    async def release_job(self, job_id: int) -> None:
        """Puts a job that was stopped by us (shutdown, a neighbour's timeout) back, refunding its attempt."""
        await self.db.execute(
            "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), started_at = NULL WHERE id = ?",
            (JobState.QUEUED, job_id),
        )
        await self.db.commit()

    @_serialised
    async def set_progress_ref(self, job_id: int, ref: dict[str, Any]) -> None:
        await self.db.execute("UPDATE jobs SET progress_ref = ? WHERE id = ?", (json.dumps(ref), job_id))
        await self.db.commit()

    @_serialised
    async def finish_job(self, job_id: int, result: dict[str, Any], artifacts: list[Artifact]) -> None:
        """Stores the result and its artifacts in one transaction: the job is never generated twice."""
        await self.db.execute("BEGIN")
        try:
            await self.db.execute(
                "UPDATE jobs SET state = ?, result = ?, finished_at = ? WHERE id = ?",
                (JobState.DONE, json.dumps(result), time.time(), job_id),
            )
            for a in artifacts:
                await self.db.execute(
                    "INSERT INTO artifacts (id, job_id, owner_key, kind, path, media_type, meta, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.id, job_id, a.owner_key, a.kind, a.path, a.media_type, json.dumps(a.meta), a.created_at or time.time()),
                )
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    @_serialised
    async def end_job(self, job_id: int, state: str, error: dict[str, Any] | None = None) -> None:
        await self.db.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
            (state, json.dumps(error) if error else None, time.time(), job_id),
        )
        await self.db.commit()

    @_serialised
    async def mark_job_delivered(self, job_id: int) -> None:
        """Marks the job and every artifact of it not yet marked as delivered, in one transaction."""
        now = time.time()
        await self.db.execute("BEGIN")
        try:
            await self.db.execute(
                "UPDATE artifacts SET delivered_at = ? WHERE job_id = ? AND delivered_at IS NULL", (now, job_id)
            )
            await self.db.execute("UPDATE jobs SET state = ? WHERE id = ?", (JobState.DELIVERED, job_id))
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

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
        async with self.db.execute("SELECT * FROM artifacts WHERE id = ?", (artifact_id,)) as cur:
            row = await cur.fetchone()
        return _artifact(row) if row else None

    async def job_artifacts(self, job_id: int) -> list[Artifact]:
        async with self.db.execute("SELECT * FROM artifacts WHERE job_id = ? ORDER BY rowid", (job_id,)) as cur:
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
