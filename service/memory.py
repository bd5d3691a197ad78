"""The store of record in memory: every table of the SQL schema as a dict,
with the same `Txn` semantics as `SqlTxn` (holdfast.store), checked by the
same contract suites (tests/test_store.py, tests/test_entity_store.py).

What `holdfast simulate` runs on: a move runs on an overlay of the
committed rows and commits by applying it, so a move that fails leaves no
trace, and the rows outlive any process over them (a simulated crash keeps
them). Nothing here survives the Python process itself.

A move is run again when it loses a compare-and-set (`Contended`), as the
SQL stores' savepoint path does, and given up after as many reruns. Rows
the SQL schema would refuse (a NULL, a NUL byte in text, a version of 0)
are refused with `RowRefused`, the move's own failure, as a database's
integrity error is.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, TypeVar

from holdfast.machine import INTENTS, State
from holdfast.store import (
    BudgetSpent,
    Contended,
    Entity,
    GroupCommitStore,
    Prefetch,
    Record,
    Reservation,
    Stock,
    StoreUnavailable,
    Txn,
)

T = TypeVar("T")
CONTENDED_RERUNS = GroupCommitStore.CONTENDED_RERUNS


class RowRefused(ValueError):
    """A row the SQL schema's constraints would refuse (NOT NULL, CHECK, no
    NUL in PostgreSQL text): the move's own failure, never a conflict."""


@dataclass(slots=True)
class Changes:
    """What commits changed, by table: the rows a checker needs to look at."""

    skus: set[str] = field(default_factory=set)
    reservations: set[str] = field(default_factory=set)
    entities: set[str] = field(default_factory=set)

    def update(self, other: Changes) -> None:
        self.skus |= other.skus
        self.reservations |= other.reservations
        self.entities |= other.entities

    def take(self) -> Changes:
        """What was gathered so far, leaving this empty for what comes next."""
        taken = Changes(self.skus, self.reservations, self.entities)
        self.skus, self.reservations, self.entities = set(), set(), set()
        return taken


class Rows:
    """The committed rows, by table, and two indexes the reaper's queries use
    (what an SQL store's indexes `reservation_due` and `entity_due` are for)."""

    def __init__(self) -> None:
        self.stock: dict[str, Stock] = {}
        self.reservations: dict[str, Reservation] = {}
        self.outcomes: dict[bytes, Record] = {}
        self.entities: dict[str, Entity] = {}
        self.reserved: set[str] = set()  # reservations RESERVED: the holds that may fall due
        self.timed: set[str] = set()  # entities with a timeout (due_at_ms > 0)


class MemTxn:
    """`Txn` over the committed rows, writing to an overlay that `commit`
    applies. Rows are copied in and out, so nothing uncommitted, and no
    change a move makes in place to a row it read, reaches the rows."""

    def __init__(self, rows: Rows) -> None:
        self._rows = rows
        self._stock: dict[str, Stock] = {}
        self._reservations: dict[str, Reservation] = {}
        self._outcomes: dict[bytes, Record] = {}
        self._entities: dict[str, Entity] = {}
        self.written: dict[str, int] = {}

    # -- idempotency records ------------------------------------------------------------

    def recorded(self, key: bytes) -> Record | None:
        return self._outcomes.get(key) or self._rows.outcomes.get(key)

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        if self.recorded(key) is not None:
            raise Contended("the idempotency key was recorded by a concurrent move")
        self._outcomes[key] = record

    # -- stock ----------------------------------------------------------------------------

    def stock(self, sku_id: str) -> Stock | None:
        found = self._stock.get(sku_id) or self._rows.stock.get(sku_id)
        return None if found is None else _copy_stock(found)

    def put_stock(self, stock: Stock) -> None:
        stock.check()
        self._stock[stock.sku_id] = _copy_stock(stock)

    def take_stock(self, sku_id: str, quantity: int) -> bool:
        """The conditional hold (`available >= quantity`) of SqlTxn."""
        assert quantity > 0
        s = self.stock(sku_id)
        if s is None or s.available < quantity:
            return False
        self.put_stock(replace(s, available=s.available - quantity, held=s.held + quantity, version=s.version + 1))
        return True

    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None:
        s = self.stock(sku_id)
        assert s is not None and s.held >= quantity, f"settling {quantity} of {sku_id} that is not held"
        back = 0 if sold else quantity
        self.put_stock(replace(s, held=s.held - quantity, available=s.available + back, sold=s.sold + quantity - back, version=s.version + 1))

    # -- reservations -------------------------------------------------------------------

    def reservation(self, reservation_id: str) -> Reservation | None:
        found = self._reservations.get(reservation_id) or self._rows.reservations.get(reservation_id)
        return None if found is None else _copy_reservation(found)

    def save_reservation(self, r: Reservation, expected_version: int) -> None:
        """Compare-and-set on the version; a new reservation expects version 0."""
        assert r.version == expected_version + 1, "a move advances the version by exactly one"
        if r.quantity <= 0:
            raise RowRefused(f"reservation {r.reservation_id}: quantity must be positive (CHECK quantity > 0)")
        current = self.reservation(r.reservation_id)
        if (0 if current is None else current.version) != expected_version:
            raise Contended(f"reservation {r.reservation_id} moved past version {expected_version}")
        self._reservations[r.reservation_id] = _copy_reservation(r)
        self.written[r.reservation_id] = r.version

    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]:
        candidates = (self.reservation(rid) for rid in sorted(self._rows.reserved | set(self._reservations)))
        due = [r for r in candidates if r.state is State.RESERVED and r.expires_at_ms <= now_ms]
        return sorted(due, key=lambda r: (r.expires_at_ms, r.reservation_id))[:limit]

    def intents(self, limit: int) -> list[Reservation]:
        found = [_copy_reservation(r) for r in self._all_reservations() if r.state in INTENTS]
        return sorted(found, key=lambda r: r.reservation_id)[:limit]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        """Reservations' and entities' versions in one id order, as SqlTxn's UNION."""
        found = [(r.reservation_id, r.version) for r in self._all_reservations() if r.reservation_id > after]
        found += [(e.entity_id, e.version) for e in self._all_entities() if e.entity_id > after]
        return sorted(found)[:limit]

    def _all_reservations(self) -> Iterable[Reservation]:
        """Every row as this transaction sees it; a full scan, which only recovery makes."""
        return {**self._rows.reservations, **self._reservations}.values()

    # -- entities of services built on the framework ----------------------------------------

    def entity(self, entity_id: str) -> Entity | None:
        found = self._entities.get(entity_id) or self._rows.entities.get(entity_id)
        return None if found is None else replace(found)

    def save_entity(self, entity: Entity, expected_version: int) -> None:
        """Compare-and-set on the version, as `save_reservation`; the kind is
        the one the entity was created with, forever."""
        assert entity.version == expected_version + 1, "a move advances the version by exactly one"
        current = self.entity(entity.entity_id)
        assert current is None or current.kind == entity.kind, f"entity {entity.entity_id} would change its kind"
        _check_entity_row(entity)
        if (0 if current is None else current.version) != expected_version:
            raise Contended(f"entity {entity.entity_id} moved past version {expected_version}")
        self._entities[entity.entity_id] = replace(entity)
        self.written[entity.entity_id] = entity.version

    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]:
        """The entities of `kind` whose timeout is due, oldest first (due_at_ms 0: none)."""
        ids = self._rows.timed | set(self._entities)
        due = [e for e in map(self.entity, ids) if e is not None and e.kind == kind and 0 < e.due_at_ms <= now_ms]
        return sorted(due, key=lambda e: (e.due_at_ms, e.entity_id))[:limit]

    def _all_entities(self) -> Iterable[Entity]:
        return {**self._rows.entities, **self._entities}.values()

    # -- commit ---------------------------------------------------------------------------

    def commit(self) -> Changes:
        """Applies the overlay; returns what it changed."""
        rows = self._rows
        rows.stock.update(self._stock)
        rows.reservations.update(self._reservations)
        for r in self._reservations.values():
            (rows.reserved.add if r.state is State.RESERVED else rows.reserved.discard)(r.reservation_id)
        rows.outcomes.update(self._outcomes)
        rows.entities.update(self._entities)
        for e in self._entities.values():
            (rows.timed.add if e.due_at_ms > 0 else rows.timed.discard)(e.entity_id)
        return Changes(set(self._stock), set(self._reservations), set(self._entities))


def attempt(rows: Rows, work: Callable[[Txn], T]) -> tuple[MemTxn, T]:
    """Runs `work` on a fresh overlay, and again (on the rows as they are now)
    when it loses a compare-and-set; the caller commits the transaction it
    gets back. Any other failure undoes the move and is the caller's."""
    for _ in range(CONTENDED_RERUNS):
        txn = MemTxn(rows)
        try:
            return txn, work(txn)
        except Contended:
            continue
    raise StoreUnavailable("the move lost every rerun to concurrent writers")


def _check_entity_row(e: Entity) -> None:
    """The entity table's constraints, as SQLite and PostgreSQL enforce them."""
    texts = {"entity_id": e.entity_id, "kind": e.kind, "lease_owner": e.lease_owner}
    for name, value in texts.items():
        if not isinstance(value, str):
            raise RowRefused(f"entity {e.entity_id!r}: {name} must be text (NOT NULL), got {value!r}")
        if "\x00" in value:
            raise RowRefused(f"entity {e.entity_id!r}: {name} holds a NUL byte, which PostgreSQL text cannot")
    for name in ("state", "version", "lease_until_ms", "due_at_ms"):
        if not isinstance(getattr(e, name), int):
            raise RowRefused(f"entity {e.entity_id!r}: {name} must be an integer (NOT NULL), got {getattr(e, name)!r}")
    if not isinstance(e.data, bytes):
        raise RowRefused(f"entity {e.entity_id!r}: data must be bytes (NOT NULL), got {type(e.data).__name__}")
    if e.version <= 0:
        raise RowRefused(f"entity {e.entity_id!r}: version must be positive (CHECK version > 0)")


def _copy_stock(s: Stock) -> Stock:
    """A copy, so a move never edits a committed row in place (dataclasses.replace is slow)."""
    return Stock(s.sku_id, s.total, s.available, s.held, s.sold, s.version)


def _copy_reservation(r: Reservation) -> Reservation:
    return Reservation(r.reservation_id, r.order_id, r.sku_id, r.quantity, r.state, r.version, r.expires_at_ms, r.retry_count, r.release_reason)


class MemoryStore:
    """A `Store` over `Rows`: one worker thread runs the transactions one at
    a time, in the order they were handed over, each committed on its own
    (so each sees every one before it, and one's failure undoes it alone).
    A thread, as the SQL stores have, so no move ever runs on the event loop."""

    def __init__(self, rows: Rows | None = None) -> None:
        self.rows = Rows() if rows is None else rows
        self._jobs: queue.SimpleQueue[tuple[Callable[[Txn], object], float | None, asyncio.Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return "memory://"

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="holdfast-memory-store", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def transact(self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None) -> T:
        """`prefetch` is ignored: every row is one dict lookup away."""
        assert self._loop is not None, "store not open"
        if deadline is not None and time.monotonic() >= deadline:
            raise BudgetSpent()
        future = self._loop.create_future()
        self._jobs.put((work, deadline, future))
        return await future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, deadline, future = job
            if deadline is not None and time.monotonic() >= deadline:
                self._answer(future, None, BudgetSpent())  # queued past its budget: never started
                continue
            try:
                txn, value = attempt(self.rows, work)
                txn.commit()
            except Exception as error:
                self._answer(future, None, error)
            else:
                self._answer(future, value, None)

    def _answer(self, future: asyncio.Future, value: object, error: BaseException | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, future, value, error)


def _settle(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():  # the caller went away; the move stays committed
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
