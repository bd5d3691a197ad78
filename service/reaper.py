"""The reaper: turns the passing of time into ordinary moves.

Time's moves are not a side channel: each hosted service makes its own
(`Service.reap`: inventory's hold expiry, the framework's timeout events),
every one a move with its own idempotency key, recorded like any other, so
two reapers (or a reaper and a restart) can never make one twice. Recovery
at start-up is the same idea for what a crashed writer left behind
(`Service.recover`: inventory's intents). Retention (holdfast.retention)
runs on the same loop, at its own interval: pruning is time's work too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.retention import Retention

log = logging.getLogger("holdfast.reaper")


class Reaper:
    def __init__(
        self, engine: Engine, services: Sequence[Service], interval_ms: int = 100, batch: int = 256,
        retention: Retention | None = None,
    ) -> None:
        assert interval_ms > 0 and batch > 0
        self.engine = engine
        self.services = tuple(services)
        self.interval_ms = interval_ms
        self.batch = batch
        self.retention = retention
        self._pruned_at = 0.0  # monotonic time of the last retention round

    async def recover(self) -> int:
        """Resolves everything left half-done; returns how many moves that took."""
        moved = 0
        for service in self.services:
            moved += await service.recover(self.batch)
        return moved

    async def reap(self) -> int:
        """Makes every service's moves that are due now; returns how many
        moved. The time is read once per round (the engine's clock, which a
        journal pins), so every service reaps as of the same instant."""
        now_ms = self.engine.clock.now_ms()
        moved = 0
        for service in self.services:
            moved += await service.reap(now_ms, self.batch)
        return moved

    async def prune(self) -> None:
        """A retention round, when one is due (every `interval_ms` of its policy)."""
        retention = self.retention
        if retention is None or not retention.enabled:
            return
        now = time.monotonic()
        if now - self._pruned_at < retention.policy.interval_ms / 1000:
            return
        self._pruned_at = now
        await retention.prune()

    async def run(self) -> None:
        """Reaps (and prunes) until cancelled; a failed round is logged and tried again."""
        while True:
            try:
                await self.reap()
                await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store may be briefly unavailable; the next round retries
                log.exception("reaper round failed")
            await asyncio.sleep(self.interval_ms / 1000)
