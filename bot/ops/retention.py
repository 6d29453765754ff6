"""Retention: a periodic cleanup that deletes user data past its expiry, with /delete's own code.

Each data class (``bot.storage.DATA_CLASSES``: selfies, identities, LoRAs, results) is kept for its
``[retention]`` days, counted from when it was made (0: until the user deletes it). A sweep finds the
users holding expired data and, per user and class, removes the files and then the rows through
``handlers.basic.delete_expired_data``. Every other file in a user's folder that no row names (inputs
of jobs that never delivered, a stopped training's checkpoints) goes ``inputs_hours`` after it was
written. A user with a job queued or running is left for the next sweep, so a job never loses its
input halfway; a result still waiting to be delivered does not hold the sweep up (it expires as any
result). The sweep takes the user's intake lock: it never races their uploads or /delete. The clock is
injectable (tests advance it).

Usage::

    task = asyncio.create_task(run_retention(services, settings.retention), name="retention")
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bot.config import RetentionSettings
from handlers.basic import delete_expired_data, other_files, remove_user_files
from handlers.services import Services

log = logging.getLogger(__name__)

DAY_S = 86_400.0
HOUR_S = 3600.0
ACTIVE_STATES = ("queued", "running")


def cutoffs(retention: RetentionSettings, now: float) -> dict[str, float]:
    """The Unix time before which each expiring data class goes (classes kept forever are left out)."""
    return {data_class: now - days * DAY_S for data_class, days in retention.days().items() if days > 0}


async def sweep(services: Services, retention: RetentionSettings, now: float) -> Counter[str]:
    """Deletes every user's data past its expiry at `now`; returns counts (rows per table, files, users)."""
    limits = cutoffs(retention, now)
    storage: Any = services.storage
    totals: Counter[str] = Counter()
    for user_key in await storage.users_with_expired(limits) if limits else []:
        if await _busy(services, user_key):
            log.info("retention: %s has a job in flight; their expired data waits for the next sweep", user_key)
            continue
        async with services.runtime.intake_lock(user_key), services.runtime.user_lock(user_key):
            for data_class, cutoff in limits.items():
                counts = await delete_expired_data(services, user_key, data_class, cutoff)
                totals.update(counts)
        totals["users"] += 1
    leftovers_before = now - retention.inputs_hours * HOUR_S
    for user_key in await asyncio.to_thread(_user_folders, services):
        if await _busy(services, user_key):
            continue
        async with services.runtime.intake_lock(user_key), services.runtime.user_lock(user_key):
            old = [f.path for f in await other_files(services, user_key, now)
                   if not f.needed and f.written < leftovers_before]
            if old:
                log.info("retention: %d file(s) of %s that no row names are older than %.0f h",
                         len(old), user_key, retention.inputs_hours)
                totals["files"] += await remove_user_files(services, user_key, old)
    if totals:
        log.info("retention: deleted expired data (%s)", ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    return totals


async def _busy(services: Services, user_key: str) -> bool:
    """Whether the user has a job queued or running (a result being delivered does not count)."""
    return any(view.state in ACTIVE_STATES for view in await services.jobs.user_jobs(user_key))


def _user_folders(services: Services) -> list[str]:
    """The user keys that have a folder under ``data_dir/users``."""
    users = services.data_dir / "users"
    keys = sorted(p.name for p in users.iterdir() if p.is_dir()) if users.is_dir() else []
    valid = []
    for key in keys:
        try:
            services.user_dir(key)
        except ValueError:
            continue
        valid.append(key)
    return valid


async def run_retention(services: Services, retention: RetentionSettings,
                        clock: Callable[[], float] = time.time) -> None:
    """Sweeps now and then every ``sweep_interval_s`` until cancelled; a failed sweep is logged and retried."""
    while True:
        try:
            await sweep(services, retention, clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention sweep failed; retrying in %.0f s", retention.sweep_interval_s)
        await asyncio.sleep(retention.sweep_interval_s)
