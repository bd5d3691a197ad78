"""A batch's rows in memory: what lets group commit send set-based statements.

Group commit shares one store transaction between concurrent moves, but a
move that sends its own statements still pays one round trip per statement
(a Reserve is five on PostgreSQL), one move after another. Measured on the
Reserve transaction, 64 moves per transaction sent one statement at a time
reach about 3,000 moves/s against about 14,000 as set-based statements. So a
batch that a backend runs *buffered* goes:

    prefetch   every row the batch's moves named (their keys, reservations,
               entities, SKUs): one statement per table, rows locked, one
               round trip
    moves      each runs against `Rows` in memory; a read the prefetch
               missed is loaded (and locked) on the spot
    flush      what the moves changed, one multi-row statement per table
    commit

The guarantees are the savepoint path's, kept in memory:

* A move that fails is undone alone: every write a `BatchTxn` makes goes
  through `_set`, which logs the previous value, and `undo()` restores them
  newest first. Its batch-mates' rows are untouched.
* Compare-and-set stays exact: every row a move reads is locked for the
  whole transaction, so the version in memory is the version in the
  database; a move that expects another one gets `Contended` and reruns on
  the state in memory, as it would on the savepoint path.
* What memory cannot know is settled by the flush: a row inserted by
  another instance after the prefetch (the same idempotency key, the same
  reservation or entity id) makes a multi-row insert affect fewer rows than it holds.
  The backend then answers False and the batch is run again on the
  savepoint path (`Isolate`), which finds the winner's rows and replays or
  reruns. So does a database error inside a move: it aborted the whole
  transaction, which only a savepoint could have contained.
* Range queries (due holds, due entities, intents, versions) read the database, so the
  batch flushes before one. A move that has written and then asks one
  would see half of itself flushed; that cannot be undone in memory, so
  the batch goes to the savepoint path instead (no move does this today).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from holdfast.store import (
    BudgetSpent,
    Contended,
    Entity,
    GroupCommitStore,
    Isolate,
    Job,
    JobResult,
    Record,
    Reservation,
    Row,
    SqlTxn,
    Stock,
    StoreUnavailable,
    Txn,
    row_of_entity,
    row_of_reservation,
)

_MISSING = object()


@dataclass(slots=True)
class Changes:
    """What a flush writes: each list holds whole rows, at most one per key."""

    outcomes: list[tuple[bytes, Record, int]] = field(default_factory=list)
    inserted: list[Reservation] = field(default_factory=list)
    updated: list[tuple[Reservation, int]] = field(default_factory=list)  # (row, version the database holds)
    stocks: list[Stock] = field(default_factory=list)
    inserted_entities: list[Entity] = field(default_factory=list)
    updated_entities: list[tuple[Entity, int]] = field(default_factory=list)  # (row, version the database holds)

    def __bool__(self) -> bool:
        return bool(
            self.outcomes or self.inserted or self.updated or self.stocks or self.inserted_entities or self.updated_entities
        )

    def row_sets(self) -> list[tuple[str, list[Row]]]:
        """The changes as one list of rows per statement a backend sends, in
        column order: `outcomes` (key, fingerprint, reason, payload,
        recorded_at_ms), `inserted` (RESERVATION_COLUMNS), `updated`
        (RESERVATION_COLUMNS, then the version the database holds),
        `inserted_entities` (ENTITY_COLUMNS), `updated_entities`
        (ENTITY_COLUMNS, then the version the database holds), `stocks`
        (sku_id, total, available, held, sold, version). Empty ones are left out."""
        sets = [
            ("outcomes", [(key, r.fingerprint, r.reason, r.payload, now_ms) for key, r, now_ms in self.outcomes]),
            ("inserted", [row_of_reservation(r) for r in self.inserted]),
            ("updated", [(*row_of_reservation(r), stored) for r, stored in self.updated]),
            ("inserted_entities", [row_of_entity(e) for e in self.inserted_entities]),
            ("updated_entities", [(*row_of_entity(e), stored) for e, stored in self.updated_entities]),
            ("stocks", [(s.sku_id, s.total, s.available, s.held, s.sold, s.version) for s in self.stocks]),
        ]
        return [(kind, rows) for kind, rows in sets if rows]


class Rows:
    """Every row a batch has read or written, and what the database holds of
    each, so that a flush writes exactly the difference."""

    __slots__ = ("outcomes", "reservations", "entities", "stocks", "_stored_versions", "_stored_entity_versions",
                 "_stored_stocks", "new_outcomes")

    def __init__(self) -> None:
        self.outcomes: dict[bytes, Record | None] = {}
        self.reservations: dict[str, Reservation | None] = {}
        self.entities: dict[str, Entity | None] = {}
        self.stocks: dict[str, Stock | None] = {}
        self._stored_versions: dict[str, int] = {}  # 0: no row in the database
        self._stored_entity_versions: dict[str, int] = {}  # 0: no row in the database
        self._stored_stocks: dict[str, Stock | None] = {}
        self.new_outcomes: dict[bytes, tuple[Record, int]] = {}  # recorded by this batch, not yet written

    def loaded_outcome(self, key: bytes, record: Record | None) -> None:
        self.outcomes[key] = record

    def loaded_reservation(self, rid: str, row: Reservation | None) -> None:
        self.reservations[rid] = row
        self._stored_versions[rid] = 0 if row is None else row.version

    def loaded_entity(self, entity_id: str, row: Entity | None) -> None:
        self.entities[entity_id] = row
        self._stored_entity_versions[entity_id] = 0 if row is None else row.version

    def loaded_stock(self, sku_id: str, row: Stock | None) -> None:
        self.stocks[sku_id] = row
        self._stored_stocks[sku_id] = row

    def changes(self) -> Changes:
        changes = Changes([(key, record, now_ms) for key, (record, now_ms) in self.new_outcomes.items()])
        changes.inserted, changes.updated = _versioned_changes(self.reservations, self._stored_versions)
        changes.inserted_entities, changes.updated_entities = _versioned_changes(self.entities, self._stored_entity_versions)
        changes.stocks = [row for sku, row in self.stocks.items() if row is not None and row != self._stored_stocks[sku]]
        for row in changes.stocks:
            row.check()
        return changes

    def flushed(self, changes: Changes) -> None:
        """The database now holds `changes`."""
        self.new_outcomes.clear()
        for row in changes.inserted:
            self._stored_versions[row.reservation_id] = row.version
        for row, _ in changes.updated:
            self._stored_versions[row.reservation_id] = row.version
        for entity in changes.inserted_entities:
            self._stored_entity_versions[entity.entity_id] = entity.version
        for entity, _ in changes.updated_entities:
            self._stored_entity_versions[entity.entity_id] = entity.version
        for written in changes.stocks:
            self._stored_stocks[written.sku_id] = written


def _versioned_changes(rows: dict[str, Any], stored_versions: dict[str, int]) -> tuple[list[Any], list[tuple[Any, int]]]:
    """Of versioned rows (reservations, entities) by id: those to insert (the
    database holds none) and those to update, each with the version the
    database holds, which the update compares and sets."""
    inserted: list[Any] = []
    updated: list[tuple[Any, int]] = []
    for row_id, row in rows.items():
        stored = stored_versions[row_id]
        if row is None or row.version == stored:
            continue
        assert row.version > stored, f"{row_id} would move back from version {stored} to {row.version}"
        if stored == 0:
            inserted.append(row)
        else:
            updated.append((row, stored))
    return inserted, updated


Flush = Callable[[Changes], bool]


class BatchTxn:
    """`Txn` for one move attempt over its batch's `Rows`. Reads the rows
    missed through `db` (the backend's plain `SqlTxn`, which locks them);
    `flush` writes the batch's changes before a range query."""

    __slots__ = ("_rows", "_db", "_flush", "_undo", "written")

    def __init__(self, rows: Rows, db: SqlTxn, flush: Flush) -> None:
        self._rows = rows
        self._db = db
        self._flush = flush
        self._undo: list[tuple[dict[Any, Any], Any, Any]] = []
        self.written: dict[str, int] = {}

    def undo(self) -> None:
        """Puts back every row this attempt wrote, newest first."""
        for rows, key, before in reversed(self._undo):
            if before is _MISSING:
                del rows[key]
            else:
                rows[key] = before
        self._undo.clear()
        self.written.clear()

    def _set(self, rows: dict[Any, Any], key: Any, value: Any) -> None:
        self._undo.append((rows, key, rows.get(key, _MISSING)))
        rows[key] = value

    # -- idempotency records --

    def recorded(self, key: bytes) -> Record | None:
        if key not in self._rows.outcomes:
            self._rows.loaded_outcome(key, self._db.recorded(key))
        return self._rows.outcomes[key]

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        if self.recorded(key) is not None:
            raise Contended("the idempotency key was recorded by a concurrent move")
        self._set(self._rows.outcomes, key, record)
        self._set(self._rows.new_outcomes, key, (record, now_ms))

    # -- stock --

    def stock(self, sku_id: str) -> Stock | None:
        if sku_id not in self._rows.stocks:
            self._rows.loaded_stock(sku_id, self._db.stock(sku_id))
        return self._rows.stocks[sku_id]

    def put_stock(self, stock: Stock) -> None:
        stock.check()
        self.stock(stock.sku_id)  # loaded (and locked) first, so the flush knows what it replaces
        self._set(self._rows.stocks, stock.sku_id, stock)

    def take_stock(self, sku_id: str, quantity: int) -> bool:
        assert quantity > 0
        found = self.stock(sku_id)
        if found is None or found.available < quantity:
            return False
        taken = Stock(sku_id, found.total, found.available - quantity, found.held + quantity, found.sold, found.version + 1)
        taken.check()
        self._set(self._rows.stocks, sku_id, taken)
        return True

    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None:
        found = self.stock(sku_id)
        assert found is not None and found.held >= quantity, f"settling {quantity} of {sku_id} that is not held"
        available = found.available if sold else found.available + quantity
        settled = Stock(sku_id, found.total, available, found.held - quantity, found.sold + (quantity if sold else 0), found.version + 1)
        settled.check()
        self._set(self._rows.stocks, sku_id, settled)

    # -- reservations --

    def reservation(self, reservation_id: str) -> Reservation | None:
        if reservation_id not in self._rows.reservations:
            self._rows.loaded_reservation(reservation_id, self._db.reservation(reservation_id))
        return self._rows.reservations[reservation_id]

    def save_reservation(self, r: Reservation, expected_version: int) -> None:
        assert r.version == expected_version + 1, "a move advances the version by exactly one"
        current = self.reservation(r.reservation_id)
        if (0 if current is None else current.version) != expected_version:
            raise Contended(f"reservation {r.reservation_id} moved past version {expected_version}")
        self._set(self._rows.reservations, r.reservation_id, r)
        self.written[r.reservation_id] = r.version

    # -- entities --
    #
    # Entities are copied in and out: a service built on the framework may
    # change the one it read in place, and the batch's rows (which its
    # batch-mates read, and `undo` restores) must not change with it.

    def entity(self, entity_id: str) -> Entity | None:
        if entity_id not in self._rows.entities:
            self._rows.loaded_entity(entity_id, self._db.entity(entity_id))
        found = self._rows.entities[entity_id]
        return None if found is None else replace(found)

    def save_entity(self, entity: Entity, expected_version: int) -> None:
        assert entity.version == expected_version + 1, "a move advances the version by exactly one"
        current = self.entity(entity.entity_id)
        if (0 if current is None else current.version) != expected_version:
            raise Contended(f"entity {entity.entity_id} moved past version {expected_version}")
        assert current is None or current.kind == entity.kind, f"entity {entity.entity_id} would change its kind"
        self._set(self._rows.entities, entity.entity_id, replace(entity))
        self.written[entity.entity_id] = entity.version

    # -- range queries: the database's answer, after the batch's writes --

    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]:
        self._before_range_query()
        return self._db.due_holds(now_ms, limit)

    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]:
        self._before_range_query()
        return self._db.due_entities(kind, now_ms, limit)

    def intents(self, limit: int) -> list[Reservation]:
        self._before_range_query()
        return self._db.intents(limit)

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        self._before_range_query()
        return self._db.versions(after, limit)

    def _execute(self, sql: str, params: Row = ()) -> Any:
        """Raw SQL, as `SqlTxn` offers it to tools and tests that inspect
        the database: it sees the batch's writes, like a range query."""
        self._before_range_query()
        return self._db._execute(sql, params)

    def _before_range_query(self) -> None:
        if self._undo:
            raise Isolate("a move wrote, then asked a range query")
        changes = self._rows.changes()
        if changes:
            if not self._flush(changes):
                raise Isolate("a flush lost a race to another writer")
            self._rows.flushed(changes)


def run_move(
    rows: Rows,
    db: SqlTxn,
    flush: Flush,
    work: Callable[[Txn], object],
    reruns: int,
    fails_batch: Callable[[BaseException], bool],
    aborts_transaction: Callable[[BaseException], bool],
) -> tuple[object, BaseException | None]:
    """One job of a buffered batch: its value, or its own error with its
    writes undone. A lost compare-and-set reruns it on the rows in memory;
    a lost connection or a deadlock (`fails_batch`) goes to the batch."""
    for _ in range(reruns):
        txn = BatchTxn(rows, db, flush)
        try:
            return work(txn), None
        except Contended:
            txn.undo()
            continue
        except Isolate:
            raise
        except Exception as error:
            if fails_batch(error):
                raise
            if aborts_transaction(error):
                raise Isolate() from error  # the transaction is aborted: only savepoints help now
            txn.undo()
            return None, error
    return None, StoreUnavailable("the move lost every rerun to concurrent writers")


@dataclass(frozen=True, slots=True)
class Named:
    """Every row a batch's jobs named in their `Prefetch`."""

    keys: frozenset[bytes]
    reservations: frozenset[str]
    skus: frozenset[str]
    entities: frozenset[str] = frozenset()

    @classmethod
    def of(cls, batch: list[Job]) -> Named:
        keys: set[bytes] = set()
        rids: set[str] = set()
        skus: set[str] = set()
        entities: set[str] = set()
        for job in batch:
            if job.prefetch is not None:
                keys.update(job.prefetch.keys)
                rids.update(job.prefetch.reservations)
                skus.update(job.prefetch.skus)
                entities.update(job.prefetch.entities)
        return cls(frozenset(keys), frozenset(rids), frozenset(skus), frozenset(entities))

    def __bool__(self) -> bool:
        return bool(self.keys or self.reservations or self.skus or self.entities)


class BufferedStore(GroupCommitStore):
    """A group-commit store whose batches run buffered: a backend says how
    to begin and load the named rows (`_load`) and how to write a batch's
    changes (`_write`); the rest, and the fall-back to savepoints, is here."""

    def _load(self, connection: Any, named: Named) -> Rows:
        """Begins the batch's transaction and loads (and locks) the named rows."""
        raise NotImplementedError

    def _write(self, connection: Any, changes: Changes) -> bool:
        """Writes `changes`; False when a statement affected fewer rows than
        it holds (another writer got there first)."""
        raise NotImplementedError

    def _fast(self, connection: Any, batch: list[Job]) -> list[JobResult]:
        try:
            rows = self._load(connection, Named.of(batch))
        except self.DATABASE_ERROR as error:
            if self._is_unavailable(error) or self._is_retryable(error):
                raise
            raise Isolate() from error  # row by row, a failing read falls on its own move
        db = self.TXN(connection.cursor())

        def flush(changes: Changes) -> bool:
            return self._write(connection, changes)

        results: list[JobResult] = []
        for job in batch:
            if not self._claim(job):
                results.append((job.future, None, BudgetSpent()))
                continue
            value, failed = run_move(
                rows, db, flush, job.work, self.CONTENDED_RERUNS,
                fails_batch=lambda e: self._is_unavailable(e) or self._is_retryable(e),
                aborts_transaction=lambda e: isinstance(e, self.DATABASE_ERROR),
            )
            results.append((job.future, value, failed))
        try:
            committed = self._commit(connection, rows.changes())
        except self.DATABASE_ERROR as error:
            if self._is_unavailable(error) or self._is_retryable(error):
                raise
            raise Isolate() from error  # a CHECK a move broke: the savepoint path finds which
        if not committed:
            raise Isolate()
        return results

    def _commit(self, connection: Any, changes: Changes) -> bool:
        """Writes the batch's last changes and commits; False (nothing
        committed) when a write lost a race. A backend may do both at once."""
        if changes and not self._write(connection, changes):
            return False
        connection.execute("COMMIT")
        return True
