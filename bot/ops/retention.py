"""Retention: a periodic cleanup that deletes user data past its expiry, with /delete's own code.

Each data class (``bot.storage.DATA_CLASSES``: selfies, identities, LoRAs, results) is kept for its
``[retention]`` days, counted from when it was made (0: until the user deletes it). A sweep finds the
users holding expired data and, per user and class, removes the files and then the rows through
``handlers.basic.delete_expired_data``. A user with a job in flight is left for the next sweep, so a
job never loses its input halfway. The clock is injectable (tests advance it).

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
from handlers.basic import delete_expired_data
from handlers.services import Services

log = logging.getLogger(__name__)

DAY_S = 86_400.0


def cutoffs(retention: RetentionSettings, now: float) -> dict[str, float]:
    """The Unix time before which each expiring data class goes (classes kept forever are left out)."""
    return {data_class: now - days * DAY_S for data_class, days in retention.days().items() if days > 0}


async def sweep(services: Services, retention: RetentionSettings, now: float) -> Counter[str]:
    """Deletes every user's data past its expiry at `now`; returns counts (rows per table, files, users)."""
    limits = cutoffs(retention, now)
    storage: Any = services.storage
    totals: Counter[str] = Counter()
    if not limits:
        return totals
    for user_key in await storage.users_with_expired(limits):
        if await services.jobs.user_jobs(user_key):
            log.info("retention: %s has a job in flight; their expired data waits for the next sweep", user_key)
            continue
        async with services.runtime.user_lock(user_key):
            for data_class, cutoff in limits.items():
                counts = await delete_expired_data(services, user_key, data_class, cutoff)
                totals.update(counts)
        totals["users"] += 1
    if totals:
        log.info("retention: deleted expired data (%s)", ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    return totals


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
