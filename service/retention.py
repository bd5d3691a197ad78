"""Retention: the store and the snapshot hold what is live, plus a window of time.

Every call leaves an outcome record under its key, and every entity a row;
left alone both grow for ever, and the snapshot with them. Retention prunes
them in bounded background batches, each an ordinary store transaction:

1. each hosted service's settled rows (`Service.prune`: rows no move will
   change again, settled a retention ago); their snapshot entries leave
   with them (`Snapshot.forget`);
2. outcome records older than the retention whose row is gone, never one
   whose entity the store still holds. Each leaves a tombstone: a call with
   its key is answered IDEMPOTENCY_KEY_EXPIRED, neither replayed nor run
   again (a re-run would hold stock a second time);
3. tombstones older than their own window: after it, a key is new again.

So the store holds the live entities, a retention of settled ones and of
outcomes, and a tombstone window of keys (a key and two timestamps each).

Why the defaults. A live entity keeps its rows and its records whatever
its age, so a hold of a week (the longest inventory allows) is safe under
any retention; the retention must outlive the longest a client keeps
retrying one request after its entity settled (or after a call that made
none, such as a refusal). 24 hours is the window payment APIs give their
keys (Stripe's), far past any contract's retry policy (seconds) and the
reconnect loops of clients that went offline. Tombstones are kept for
another 24 hours: a client retrying for over a day is told its key
expired, not served a second hold.

A round's time is the engine's clock, which the journal pins: `holdfast
serve --journal` writes each round that pruned anything as a `prune` line
(holdfast.recorder), and `holdfast replay` prunes again at the same place
with the same time, so a retried key answers the same in the replay.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from holdfast import metrics
from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.store import Txn, tables_of
from holdfast.table import Table

log = logging.getLogger("holdfast.retention")

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Policy:
    """How long settled rows and outcome records are kept, how long a pruned
    key's tombstone is, how much one batch (one transaction) prunes, and how
    many batches of aged records a round scans at most: the records of live
    entities stay behind the scan, so a store of long holds would otherwise
    have every round read all of them; the scan goes on from there in the
    next round. `retention_ms` 0 keeps everything for ever (no pruning)."""

    retention_ms: int = DAY_MS
    tombstone_ms: int = DAY_MS
    interval_ms: int = 1000
    batch: int = 500
    scans_per_round: int = 20

    def __post_init__(self) -> None:
        assert self.retention_ms >= 0 and self.tombstone_ms >= 0, "a retention is a duration"
        assert self.interval_ms > 0 and self.batch > 0 and self.scans_per_round > 0


@dataclass(slots=True)
class Pruned:
    """What one round pruned."""

    rows: int = 0
    records: int = 0
    tombstones: int = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.records or self.tombstones)


class Retention:
    """Prunes what the hosted `services` and the framework keep, by `policy`."""

    def __init__(self, engine: Engine, services: Sequence[Service], policy: Policy = Policy()) -> None:
        self.engine = engine
        self.services = tuple(services)
        self.policy = policy
        self._tables = {table.name: table for table in tables_of([t for s in services for t in s.tables])}
        # Where the scan of aged records goes on (recorded_at_ms, key): the
        # records of live rows it passes stay behind it until the scan ends.
        self._cursor: tuple[int, bytes] = (0, b"")

    @property
    def enabled(self) -> bool:
        return self.policy.retention_ms > 0

    async def prune(self, now_ms: int | None = None) -> Pruned:
        """One round as of `now_ms` (the engine's clock by default): every
        batch that is due, until one comes back short."""
        if not self.enabled:
            return Pruned()
        now_ms = self.engine.clock.now_ms() if now_ms is None else now_ms
        before_ms = now_ms - self.policy.retention_ms
        pruned = Pruned()
        while (rows := await self._batch_of_rows(now_ms, before_ms)) >= self.policy.batch:
            pruned.rows += rows
        pruned.rows += rows
        for _ in range(self.policy.scans_per_round):
            scanned, buried, cursor = await self.engine.store.transact(
                lambda txn: self._records(txn, before_ms, now_ms, self._cursor))
            pruned.records += buried
            self._cursor = cursor
            if scanned < self.policy.batch:
                self._cursor = (0, b"")  # the scan reached the end: the next round starts over
                break
        drop_before_ms = now_ms - self.policy.tombstone_ms
        while (dropped := await self.engine.store.transact(lambda txn: txn.drop_tombstones(drop_before_ms, self.policy.batch))):
            pruned.tombstones += dropped
            if dropped < self.policy.batch:
                break
        metrics.PRUNED.labels("rows").inc(pruned.rows)
        metrics.PRUNED.labels("records").inc(pruned.records)
        metrics.PRUNED.labels("tombstones").inc(pruned.tombstones)
        return pruned

    async def _batch_of_rows(self, now_ms: int, before_ms: int) -> int:
        """One transaction of the services' settled rows; then the snapshot
        forgets those it held versions of."""
        gone = await self.engine.store.transact(lambda txn: self._rows(txn, now_ms, before_ms))
        forgotten = [key for table, key in gone if table.snapshot]
        if forgotten:
            await self.engine.snapshot.forget(forgotten)
        return len(gone)

    def _rows(self, txn: Txn, now_ms: int, before_ms: int) -> list[tuple[Table[Any], str]]:
        gone: list[tuple[Table[Any], str]] = []
        for service in self.services:
            left = self.policy.batch - len(gone)
            if left <= 0:
                break
            gone += service.prune(txn, now_ms, before_ms, left)
        return gone

    def _records(self, txn: Txn, before_ms: int, now_ms: int, after: tuple[int, bytes]) -> tuple[int, int, tuple[int, bytes]]:
        """One batch of aged records after the cursor `after`: those whose
        row is gone become tombstones. Returns the records scanned, those
        buried, and the cursor past them."""
        aged = txn.aged_outcomes(before_ms, after, self.policy.batch)
        if not aged:
            return 0, 0, after
        live = self._live(txn, (entity for _, _, entity in aged))
        buried = 0
        for _, key, entity in aged:
            if entity not in live:
                txn.bury_outcome(key, now_ms)
                buried += 1
        return len(aged), buried, aged[-1][:2]

    def _live(self, txn: Txn, entities: Iterable[str]) -> set[str]:
        """Which of the records' rows ("table:key") the store still holds; a
        table no hosted app declares holds nothing anyone can move."""
        wanted: dict[str, set[str]] = {}
        for entity in entities:
            name, colon, key = entity.partition(":")
            if colon and name in self._tables:
                wanted.setdefault(name, set()).add(key)
        return {f"{name}:{key}" for name, keys in wanted.items() for key in txn.present(self._tables[name], keys)}

