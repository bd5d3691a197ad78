"""The reaper: turns the passing of time into ordinary moves.

Hold expiry is not a side channel: each due hold is released by a move with
its own idempotency key, recorded like any other, so two reapers (or a reaper
and a restart) can never release a hold twice. Recovery at start-up is the
same idea for intents a crashed writer left behind.
"""

from __future__ import annotations

import asyncio
import logging

from holdfast.framework import Service
from holdfast.apps.inventory import Inventory

log = logging.getLogger("holdfast.reaper")


class Reaper:
    def __init__(
        self, inventory: Inventory, interval_ms: int = 100, batch: int = 256, timed: tuple[Service, ...] = ()
    ) -> None:
        assert interval_ms > 0 and batch > 0
        self.inventory = inventory
        self.interval_ms = interval_ms
        self.batch = batch
        # Services built on the framework that declare timeout events.
        self.timed = tuple(service for service in timed if service.TIMEOUTS)

    async def recover(self) -> int:
        """Resolves every intent in the store; returns how many moves that took."""
        store = self.inventory.engine.store
        moved = 0
        while intents := await store.transact(lambda txn: txn.intents(self.batch)):
            for intent in intents:
                outcome = await self.inventory.recover(intent)
                assert outcome.ok, f"recovery of {intent.reservation_id} failed: {outcome.reason}"
                moved += 1
        return moved

    async def reap(self) -> int:
        """Releases the holds due now and fires the timeout events due now;
        returns how many moves that made."""
        engine = self.inventory.engine
        now_ms = engine.clock.now_ms()
        due = await engine.store.transact(lambda txn: txn.due_holds(now_ms, self.batch))
        outcomes = await asyncio.gather(*(self.inventory.expire(hold) for hold in due))
        fired = sum(1 for outcome in outcomes if outcome.ok)
        for service in self.timed:
            kind = service.MACHINE.name
            entities = await engine.store.transact(lambda txn: txn.due_entities(kind, now_ms, self.batch))
            outcomes = await asyncio.gather(*(service.fire_timeout(entity) for entity in entities))
            fired += sum(1 for outcome in outcomes if outcome.ok)
        return fired

    async def run(self) -> None:
        """Reaps until cancelled; a failed round is logged and tried again."""
        while True:
            try:
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store may be briefly unavailable; the next round retries
                log.exception("reaper round failed")
            await asyncio.sleep(self.interval_ms / 1000)
