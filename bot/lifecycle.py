"""The start/stop shape the scheduler and the platform adapters share."""
from __future__ import annotations

from typing import Self


class StartStop:
    """Started on entering an ``async with`` block and stopped on leaving it, even after an error."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
