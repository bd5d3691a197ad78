"""The engine: runs a move as one versioned, idempotent, double-checked step.

    1. key already recorded?  same fingerprint -> the stored outcome (replay)
                              other fingerprint -> IDEMPOTENCY_KEY_REUSED
    2. snapshot version == store version?  no -> compensation, VERSION_CONFLICT
    3. the move itself: state check, effects, compare-and-set on the version
    4. outcome recorded under the key, in the same transaction
    5. snapshot advanced (after the commit; versions only move forward)

The snapshot is read once before the transaction and written once after it.
Steps 1-4 run in one store transaction, so a move is all or nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from holdfast import metrics
from holdfast.clock import Clock
from holdfast.outcome import Outcome, Reason, failure, reason_key, reason_named
from holdfast.snapshot import Snapshot
from holdfast.store import ENTITIES, BudgetSpent, Prefetch, Record, Store, StoreUnavailable, Txn
from holdfast.table import Table

Apply = Callable[[Txn, int], Outcome]
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Move:
    """One state change, ready to run.

    `key` scopes idempotency (the method plus its declared key fields);
    `fingerprint` identifies the payload, so the same key with another payload
    is refused rather than silently replayed; `entity` is the key of the row
    of `table` whose version the snapshot double-checks (None when the move
    guards itself otherwise); `prefetch` the other rows it will read, by
    table name, so that its batch loads them with the rest (holdfast.batch).
    """

    method: str
    key: bytes
    fingerprint: bytes
    entity: str | None
    apply: Apply
    table: Table[Any] = ENTITIES
    prefetch: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Conflict:
    entity: str
    seen: int
    store_version: int


class Engine:
    def __init__(self, store: Store, snapshot: Snapshot, clock: Clock) -> None:
        self.store = store
        self.snapshot = snapshot
        self.clock = clock
        self._in_flight: set[bytes] = set()

    async def move(self, move: Move, deadline: float | None = None) -> Outcome:
        if move.key in self._in_flight:
            return failure(Reason.REQUEST_IN_FLIGHT, "a call with this idempotency key is running now; retry shortly")
        self._in_flight.add(move.key)
        try:
            return await self._move(move, deadline)
        finally:
            self._in_flight.discard(move.key)

    async def read(self, work: Callable[[Txn, int], R], deadline: float | None = None) -> R | Outcome:
        """A read-only step: same transaction path, nothing recorded."""
        try:
            return await self.store.transact(lambda txn: work(txn, self.clock.now_ms()), deadline)
        except BudgetSpent:
            return failure(Reason.BUDGET_EXCEEDED, "the call's budget ran out before it could run")
        except StoreUnavailable as error:
            return failure(Reason.DEPENDENCY_UNAVAILABLE, f"store unavailable: {error}")

    async def recorded(self, key: bytes, fingerprint: bytes, deadline: float | None = None) -> Outcome | None:
        """What a move under `key` would replay, or None when none was
        recorded: lets a call made of several moves (a claim, a carrier's
        answer, a settlement) answer a retry before redoing any of them."""

        def read(txn: Txn, now_ms: int) -> Outcome | None:
            found = txn.recorded(key)
            return None if found is None else _replay(found, fingerprint)

        return await self.read(read, deadline)

    async def _move(self, move: Move, deadline: float | None) -> Outcome:
        seen = None if move.entity is None else await self.snapshot.version(move.entity)
        try:
            rows = Prefetch((move.key,), _named(move))
            result = await self.store.transact(lambda txn: self._decide(txn, move, seen), deadline, rows)
        except BudgetSpent:  # counted as a timeout fallback by the gateway, which answers it
            return failure(Reason.BUDGET_EXCEEDED, "the call's budget ran out before the move could start; nothing changed")
        except StoreUnavailable as error:
            # A lost connection can take the COMMIT with it, and a store that
            # stops answering mid-batch may yet commit: whether the move
            # happened is unknown, and a retry with the same key tells.
            return failure(
                Reason.DEPENDENCY_UNAVAILABLE,
                f"store unavailable; the move may or may not have committed, retry with the same idempotency key"
                f" to learn its outcome: {error}",
            )
        if isinstance(result, _Conflict):
            return await self._compensate(move.table, result)
        outcome, written = result
        if written:
            committed = time.perf_counter()
            await self.snapshot.advance(written)
            metrics.CONSISTENCY.observe(time.perf_counter() - committed)
        if outcome.replayed:
            metrics.REPLAYS.labels(move.method).inc()
        return outcome

    def _decide(self, txn: Txn, move: Move, seen: int | None) -> tuple[Outcome, dict[str, int]] | _Conflict:
        """Steps 1-4, on the store's thread inside the transaction."""
        recorded = txn.recorded(move.key)
        if recorded is not None:
            return _replay(recorded, move.fingerprint), {}
        if move.entity is not None and seen is not None:
            current = txn.row(move.table, move.entity)
            store_version = 0 if current is None else getattr(current, "version")
            if store_version != seen:
                return _Conflict(move.entity, seen, store_version)
        now_ms = self.clock.now_ms()
        outcome = move.apply(txn, now_ms)
        if outcome.recorded:
            reason = None if outcome.reason is None else reason_key(outcome.reason)
            txn.record(move.key, Record(move.fingerprint, reason, outcome.payload), now_ms)
        else:
            assert not txn.written, "an unrecorded outcome must change nothing"
        return outcome, txn.written

    async def _compensate(self, table: Table[Any], conflict: _Conflict) -> Outcome:
        """The snapshot disagreed with the store: trust the store, refresh the
        snapshot, and answer a conflict the client may retry. Never a blind
        retry here: the disagreement means someone else moved this entity."""
        metrics.COMPENSATIONS.inc()
        if conflict.store_version > conflict.seen:
            # Forward-only: a later move may already have advanced it further.
            await self.snapshot.advance({conflict.entity: conflict.store_version})
        else:  # the snapshot is ahead of the truth (a restored store, a foreign snapshot)
            await self.snapshot.reset(conflict.entity, conflict.store_version)
        noun = table.noun or table.name
        return failure(
            Reason.VERSION_CONFLICT,
            f"{noun} {conflict.entity} moved concurrently (now at version {conflict.store_version}); re-read and retry",
            metadata={table.key_column: conflict.entity, "version": str(conflict.store_version)},
        )


def _named(move: Move) -> Mapping[str, tuple[str, ...]]:
    """The rows `move` names for its batch's prefetch: its own, and those it
    said it will read."""
    if move.entity is None:
        return move.prefetch
    if not move.prefetch:
        return {move.table.name: (move.entity,)}
    return {**move.prefetch, move.table.name: (move.entity,)}


def _replay(recorded: Record, fingerprint: bytes) -> Outcome:
    """Step 1: the stored outcome, or a refusal when the payload differs."""
    if recorded.fingerprint != fingerprint:
        return failure(Reason.IDEMPOTENCY_KEY_REUSED, "this idempotency key was used with another request")
    reason = None if recorded.reason is None else reason_named(recorded.reason)
    return Outcome(reason, recorded.payload, replayed=True)
