"""The engine: runs a move as one versioned, idempotent, double-checked step.

    1. key already recorded?  same fingerprint -> the stored outcome (replay)
                              other fingerprint -> IDEMPOTENCY_KEY_REUSED
                              pruned (a tombstone) -> IDEMPOTENCY_KEY_EXPIRED
    2. snapshot version == store version?  no -> compensation: the snapshot
       is set to the store's version; behind it (a move committed since the
       snapshot was read: a race the store already decided), the move runs
       again on the winner's state; ahead of it (a restored store, a foreign
       snapshot), VERSION_CONFLICT (a row the store does not hold has
       nothing to disagree with)
    3. the move itself: state check, effects, compare-and-set on the version
    4. outcome recorded under the key, in the same transaction
    5. snapshot advanced (after the commit; versions only move forward)

The snapshot is read once before the transaction and written once after it.
Steps 1-4 run in one store transaction, so a move is all or nothing.

A key already running on this instance is step 0, by the contract's
`on_duplicate`: REFUSE answers REQUEST_IN_FLIGHT at once; WAIT waits, within
the duplicate's own budget, for the running move and answers what it
recorded, exactly as a replay from the store would (the same bytes, marked
replayed, or IDEMPOTENCY_KEY_REUSED for another payload). A running move
that recorded nothing (BUDGET_EXCEEDED, DEPENDENCY_UNAVAILABLE, a refusal
that is not recorded) has no answer to give: the duplicate then runs its own
move, which replays from the store if the first did commit after all.
Across instances the store serializes duplicates (step 4's record is unique
under the key): the loser finds the record and replays it, or, when it
looked for a record before the winner committed and then found the entity
moved on, its run on the winner's state finds the winner's record first.

So a move's first answer is its final one: a race on one entity ends in the
outcome the move has on the state the race left, recorded like any other,
never in a conflict that a retry would answer differently. VERSION_CONFLICT
is left for a caller's `expected_version` precondition (an app's own
answer), for a snapshot ahead of the store, and for a move that lost
RERUNS races in a row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from holdfast import metrics, spans
from holdfast.call import current_call
from holdfast.clock import Clock
from holdfast.contracts.contract import OnDuplicate
from holdfast.outcome import Outcome, Reason, failure, reason_key, reason_named
from holdfast.snapshot import Snapshot
from holdfast.store import ENTITIES, BudgetSpent, Prefetch, Record, Store, StoreUnavailable, Txn
from holdfast.table import Table

Apply = Callable[[Txn, int], Outcome]
R = TypeVar("R")

# Runs of one move on the winner's state after a lost race, before it
# answers VERSION_CONFLICT: each lost race is another move committed on the
# entity, so the bound only matters on an entity under a storm of moves.
RERUNS = 4


@dataclass(frozen=True, slots=True)
class Move:
    """One state change, ready to run.

    `key` scopes idempotency (the method plus its declared key fields);
    `fingerprint` identifies the payload, so the same key with another payload
    is refused rather than silently replayed; `entity` is the key of the row
    of `table` whose version the snapshot double-checks (None when the move
    guards itself otherwise); `prefetch` the other rows it will read, by
    table name, so that its batch loads them with the rest (holdfast.batch);
    `on_duplicate` what a move of the same key does while this one runs on
    this instance: None is the contract's of the call being served when
    the move is that call's own (its key), else REFUSE, so the moves of
    time (reaper, recovery) and a call's other steps refuse as they did.
    """

    method: str
    key: bytes
    fingerprint: bytes
    entity: str | None
    apply: Apply
    table: Table[Any] = ENTITIES
    prefetch: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    on_duplicate: OnDuplicate | None = None


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
        # The keys running on this instance, each with what its move recorded
        # once it is done (None: nothing), which waiting duplicates read.
        self._in_flight: dict[bytes, asyncio.Future[Record | None]] = {}

    async def move(self, move: Move, deadline: float | None = None) -> Outcome:
        waits = _on_duplicate(move) is OnDuplicate.WAIT
        while (running := self._in_flight.get(move.key)) is not None:
            if not waits:
                return failure(Reason.REQUEST_IN_FLIGHT, "a call with this idempotency key is running now; retry shortly")
            answer = await self._wait(running, move, deadline)
            if answer is not None:
                return answer
            # Nothing recorded: run it ourselves, unless another waiter took the key first.
        done: asyncio.Future[Record | None] = asyncio.get_running_loop().create_future()
        self._in_flight[move.key] = done
        recorded: Record | None = None
        try:
            outcome = await self._move(move, deadline)
            recorded = _record_of(move, outcome)
            return outcome
        finally:
            del self._in_flight[move.key]
            done.set_result(recorded)

    async def _wait(self, running: asyncio.Future[Record | None], move: Move, deadline: float | None) -> Outcome | None:
        """Step 0 of a WAIT duplicate: the running move's recorded outcome as
        its replay, BUDGET_EXCEEDED when the duplicate's own budget ends
        first (it changed nothing; a retry replays), or None when the running
        move recorded nothing, so this one must run."""
        remaining = None if deadline is None else deadline - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            recorded = await asyncio.wait_for(asyncio.shield(running), remaining)
        except TimeoutError:
            return failure(
                Reason.BUDGET_EXCEEDED,
                "the call's budget ran out while it waited for the running call with this idempotency key;"
                " this call changed nothing, and a retry answers what that call recorded",
            )
        if recorded is None:
            return None
        outcome = _replay(recorded, move.fingerprint)
        if outcome.replayed:
            metrics.REPLAYS.labels(move.method).inc()
        return outcome

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
        """Steps 1-5, run again on the winner's state while a race is lost:
        the compensation moved the snapshot up to the store's version, so
        the next run double-checks against the state the race left."""
        conflict: _Conflict | None = None
        for _ in range(RERUNS + 1):
            result = await self._attempt(move, deadline)
            if not isinstance(result, _Conflict):
                return result
            conflict = result
            await self._compensate(conflict)
            if conflict.store_version < conflict.seen:
                break  # the snapshot ran ahead of the truth: that is no race to rerun
        assert conflict is not None, "the loop answers or conflicts at least once"
        return _conflicted(move.table, conflict)

    async def _attempt(self, move: Move, deadline: float | None) -> Outcome | _Conflict:
        # Each phase is a span when tracing is on (holdfast.spans); off, it costs one global read.
        seen = None
        if move.entity is not None:
            read = self.snapshot.version(move.entity)
            seen = await (read if spans.tracer is None else spans.tracer.phase(spans.SNAPSHOT_READ, read))
        try:
            rows = Prefetch((move.key,), _named(move))
            batch = self.store.transact(lambda txn: self._decide(txn, move, seen), deadline, rows)
            result = await (batch if spans.tracer is None else spans.tracer.phase(spans.STORE_TRANSACT, batch))
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
            return result
        outcome, written = result
        if written:
            committed = time.perf_counter()
            advance = self.snapshot.advance(written)
            await (advance if spans.tracer is None else spans.tracer.phase(spans.SNAPSHOT_ADVANCE, advance))
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
            # A row the store does not hold is not double-checked: the move
            # creates it (its compare-and-set expects version 0, so a racing
            # creator makes it conflict) or answers that it is not there. The
            # snapshot's entry may be another table's row of the same key, or
            # one pruned with its entity (holdfast.retention): neither is
            # reset, so a move naming the wrong kind of id changes nothing.
            current = txn.row(move.table, move.entity)
            if current is not None and (store_version := getattr(current, "version")) != seen:
                return _Conflict(move.entity, seen, store_version)
        now_ms = self.clock.now_ms()
        outcome = move.apply(txn, now_ms)
        if (record := _record_of(move, outcome)) is not None:
            txn.record(move.key, record, now_ms)
        else:
            assert not txn.written, "an unrecorded outcome must change nothing"
        return outcome, txn.written

    async def _compensate(self, conflict: _Conflict) -> None:
        """The snapshot disagreed with the store: trust the store and set the
        snapshot to its version. Never a blind retry: what runs next decides
        again, on the store's state."""
        metrics.COMPENSATIONS.inc()
        if conflict.store_version > conflict.seen:
            # Forward-only: a later move may already have advanced it further.
            await self.snapshot.advance({conflict.entity: conflict.store_version})
        else:  # the snapshot is ahead of the truth (a restored store, a foreign snapshot)
            await self.snapshot.reset(conflict.entity, conflict.store_version)


def _conflicted(table: Table[Any], conflict: _Conflict) -> Outcome:
    noun = table.noun or table.name
    return failure(
        Reason.VERSION_CONFLICT,
        f"{noun} {conflict.entity} moved concurrently (now at version {conflict.store_version}); re-read and retry",
        metadata={table.key_column: conflict.entity, "version": str(conflict.store_version)},
    )


def _on_duplicate(move: Move) -> OnDuplicate:
    if move.on_duplicate is not None:
        return move.on_duplicate
    try:
        call = current_call()
    except LookupError:  # no call is being served: a move of time, a tool's
        return OnDuplicate.REFUSE
    return call.contract.on_duplicate if call.key == move.key else OnDuplicate.REFUSE


def _record_of(move: Move, outcome: Outcome) -> Record | None:
    """What `outcome` records under the move's key (step 4), as the store
    holds it; a duplicate waiting on this instance replays it without a read."""
    if not outcome.recorded:
        return None  # and so nothing committed under the key: a waiter runs its own move
    reason = None if outcome.reason is None else reason_key(outcome.reason)
    return Record(move.fingerprint, reason, outcome.payload, _entity_of(move))


def _entity_of(move: Move) -> str:
    """What a record names as its move's row, "table:key": retention keeps
    the record while that row is there."""
    return "" if move.entity is None else f"{move.table.name}:{move.entity}"


def _named(move: Move) -> Mapping[str, tuple[str, ...]]:
    """The rows `move` names for its batch's prefetch: its own, and those it
    said it will read."""
    if move.entity is None:
        return move.prefetch
    if not move.prefetch:
        return {move.table.name: (move.entity,)}
    return {**move.prefetch, move.table.name: (move.entity,)}


def _replay(recorded: Record, fingerprint: bytes) -> Outcome:
    """Step 1: the stored outcome, or a refusal when the payload differs or
    the outcome was pruned."""
    if recorded.pruned:
        return failure(
            Reason.IDEMPOTENCY_KEY_EXPIRED,
            "this idempotency key was used longer ago than the server keeps outcomes (its retention); the call was"
            " not run again. Send a new request with a new key",
        )
    if recorded.fingerprint != fingerprint:
        return failure(Reason.IDEMPOTENCY_KEY_REUSED, "this idempotency key was used with another request")
    reason = None if recorded.reason is None else reason_named(recorded.reason)
    return Outcome(reason, recorded.payload, replayed=True)
