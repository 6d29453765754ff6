"""Runs the whole service for tests/test_faults.py (and bench/bench_faults.py) in its own process, so a
test can SIGKILL it: ``python tests/fault_driver.py CONFIG.json``.

CONFIG: ``settings`` (``bot.config.Settings`` fields), ``ledger`` and ``pause_dir`` (the /render job's
params), ``seed`` and ``sqlite_faults`` (the probability that a write statement or commit of the service
fails with "database is locked" or "database or disk is full", below the storage's own retry). Prints
``READY <pid>`` once the service runs; SIGTERM stops it gracefully, then it prints ``STOPPED``.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bot.app as app  # noqa: E402
from bot.config import Settings  # noqa: E402
from bot.ops.logsetup import configure_logging  # noqa: E402
from bot.storage import Storage  # noqa: E402
from tests.fixtures.faults import SQLiteFaults  # noqa: E402
from tests.fixtures.render import RENDER_KIND, register_render  # noqa: E402


def faulty_storage(rng: random.Random, probability: float) -> type[Storage]:
    """A Storage whose connection fails writes with `probability` once it is open (migrations pass)."""

    class FaultyStorage(Storage):
        async def open(self) -> None:
            await super().open()
            self._db = SQLiteFaults(self._db, rng, probability)  # type: ignore[assignment]

    return FaultyStorage


async def main(config: dict[str, Any]) -> None:
    settings = Settings.model_validate(config["settings"])
    configure_logging(settings)
    register_render(ledger=config["ledger"], pause_dir=config["pause_dir"])
    app.Storage = faulty_storage(random.Random(config["seed"]), float(config.get("sqlite_faults", 0)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with app.open_service(settings, extra_kinds=[RENDER_KIND]):
        print("READY", os.getpid(), flush=True)
        await stop.wait()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
