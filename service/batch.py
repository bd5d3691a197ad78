"""A batch's rows in memory: what lets group commit send set-based statements.

Group commit shares one store transaction between concurrent moves, but a
move that sends its own statements still pays one round trip per statement
(a Reserve is five on PostgreSQL), one move after another. Measured on the
Reserve transaction, 64 moves per transaction sent one statement at a time
reach about 3,000 moves/s against about 14,000 as set-based statements. So a
batch that a backend runs *buffered* goes:

    prefetch   every row the batch's moves named (their idempotency keys,
               the rows of each table): one statement per table, rows
               locked, one round trip
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
  row key) makes a multi-row insert affect fewer rows than it holds.
  The backend then answers False and the batch is run again on the
  savepoint path (`Isolate`), which finds the winner's rows and replays or
  reruns. So does a database error inside a move: it aborted the whole
  transaction, which only a savepoint could have contained.
* Range queries (`select`, `versions`) read the database, so the
  batch flushes before one. A move that has written and then asks one
  would see half of itself flushed; that cannot be undone in memory, so
  the batch goes to the savepoint path instead (no move does this today).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from holdfast.store import (
    Budget,
    BudgetSpent,
    Contended,
    EntityRows,
    GroupCommitStore,
    Isolate,
    Job,
    JobResult,
    Record,
    Row,
    SqlTxn,
    StoreUnavailable,
    Txn,
)
from holdfast.table import Query, R, Table

_MISSING = object()


@dataclass(slots=True)
class TableChanges:
    """What a flush writes to one table, whole rows, at most one per key."""

    table: Table[Any]
    inserted: list[Any] = field(default_factory=list)
    updated: list[tuple[Any, int]] = field(default_factory=list)  # (row, version the database holds)
    upserted: list[Any] = field(default_factory=list)  # an unversioned table's rows

    def __bool__(self) -> bool:
        return bool(self.inserted or self.updated or self.upserted)


@dataclass(slots=True)
class Changes:
    """What a flush writes: the new idempotency records, and each table's rows."""

    outcomes: list[tuple[bytes, Record, int]] = field(default_factory=list)
    tables: list[TableChanges] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.tables)

    def row_sets(self) -> list[tuple[str, Table[Any] | None, list[Row]]]:
        """The changes as one list of rows per statement a backend sends, in
        column order: ("outcomes", None, rows of key, fingerprint, reason,
        payload, recorded_at_ms, entity), then per table ("insert", table, rows),
        ("update", table, rows with the version the database holds last),
        ("upsert", table, rows). Empty ones are left out."""
        sets: list[tuple[str, Table[Any] | None, list[Row]]] = []
        if self.outcomes:
            sets.append(("outcomes", None, [(key, r.fingerprint, r.reason, r.payload, now_ms, r.entity) for key, r, now_ms in self.outcomes]))
        for changed in self.tables:
            values = changed.table.values
            for kind, rows in (("insert", [values(row) for row in changed.inserted]),
                               ("update", [(*values(row), stored) for row, stored in changed.updated]),
                               ("upsert", [values(row) for row in changed.upserted])):
                if rows:
                    sets.append((kind, changed.table, rows))
        return sets


class Rows:
    """Every row a batch has read or written, and what the database holds of
    each, so that a flush writes exactly the difference: of a versioned row
    its version (0: no row), of an unversioned one the row object read.
    `busy`: the rows named that another transaction holds locked, by table
    name (not loaded: the moves that name them are handed on)."""

    __slots__ = ("outcomes", "new_outcomes", "tables", "stored", "declared", "busy")

    def __init__(self, tables: Sequence[Table[Any]]) -> None:
        self.outcomes: dict[bytes, Record | None] = {}
        self.new_outcomes: dict[bytes, tuple[Record, int]] = {}  # recorded by this batch, not yet written
        # By table name, one dict for each of the store's tables: key -> row (None for none).
        self.tables: dict[str, dict[str, Any]] = {table.name: {} for table in tables}
        self.stored: dict[str, dict[str, Any]] = {table.name: {} for table in tables}
        self.declared: dict[str, Table[Any]] = {table.name: table for table in tables}
        self.busy: dict[str, set[str]] = {}

    def blocks(self, job: Job) -> bool:
        """Whether `job` names a busy row, or a row whose `locked_with` row
        is busy (a reservation whose stock another transaction holds)."""
        rows = {} if job.prefetch is None else job.prefetch.rows
        for name, keys in rows.items():
            busy = self.busy.get(name)
            if busy and not busy.isdisjoint(keys):
                return True
        for name, busy in self.busy.items():
            for other, column in self.declared[name].locked_with:
                loaded = self.tables.get(other, {})
                for key in rows.get(other, ()):
                    row = loaded.get(key)
                    if row is not None and getattr(row, column) in busy:
                        return True
        return False

    def loaded_outcome(self, key: bytes, record: Record | None) -> None:
        self.outcomes[key] = record

    def loaded(self, table: Table[Any], key: str, row: Any) -> None:
        self.of(table)[key] = row
        self.stored[table.name][key] = (0 if row is None else row.version) if table.versioned else row

    def of(self, table: Table[Any]) -> dict[str, Any]:
        """The batch's rows of `table` by key."""
        rows = self.tables.get(table.name)
        assert rows is not None, f"table {table.name} is not the store's: list it in the app's `tables`"
        return rows

    def changes(self) -> Changes:
        changes = Changes([(key, record, now_ms) for key, (record, now_ms) in self.new_outcomes.items()])
        for name, rows in self.tables.items():
            table, stored = self.declared[name], self.stored[name]
            changed = TableChanges(table)
            if table.versioned:
                changed.inserted, changed.updated = _versioned_changes(rows, stored)
            else:
                changed.upserted = [row for key, row in rows.items() if row is not None and row is not stored[key]]
            if changed:
                changes.tables.append(changed)
        return changes

    def flushed(self, changes: Changes) -> None:
        """The database now holds `changes`."""
        self.new_outcomes.clear()
        for changed in changes.tables:
            stored, key = self.stored[changed.table.name], changed.table.key
            for row in changed.inserted:
                stored[key(row)] = row.version
            for row, _ in changed.updated:
                stored[key(row)] = row.version
            for row in changed.upserted:
                stored[key(row)] = row


def _versioned_changes(rows: dict[str, Any], stored_versions: dict[str, int]) -> tuple[list[Any], list[tuple[Any, int]]]:
    """Of versioned rows by key: those to insert (the database holds none)
    and those to update, each with the version the database holds, which
    the update compares and sets."""
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


class BatchTxn(EntityRows):
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

    # -- rows --
    #
    # A table whose rows a move may change in place (`in_place`, as the
    # framework's entities) is copied in and out: the batch's rows, which
    # its batch-mates read and `undo` restores, must not change with it.

    def _current(self, table: Table[R], rows: dict[str, Any], key: str) -> R | None:
        """The batch's row of `table` under `key` (its dict `rows`), loaded
        (and locked) first if the prefetch missed it."""
        if key not in rows:
            self._rows.loaded(table, key, self._db.row(table, key))
        found: R | None = rows[key]
        return found

    def row(self, table: Table[R], key: str) -> R | None:
        found = self._current(table, self._rows.of(table), key)
        return table.copy(found) if found is not None and table.in_place else found

    def save(self, table: Table[R], row: R, expected_version: int) -> None:
        version = table.advanced(row, expected_version)
        key = table.key(row)
        rows = self._rows.of(table)
        current = self._current(table, rows, key)
        if table.stored(current) != expected_version:
            raise Contended(table.moved_past(key, expected_version))
        assert (refixed := table.refixed(current, row)) is None, refixed
        self._set(rows, key, table.copy(row) if table.in_place else row)
        if table.snapshot:
            self.written[key] = version

    def put(self, table: Table[R], row: R) -> None:
        assert not table.versioned, f"table {table.name} is versioned: save its rows"
        key = table.key(row)
        rows = self._rows.of(table)
        self._current(table, rows, key)  # loaded (and locked) first, so the flush knows what it replaces
        self._set(rows, key, table.copy(row) if table.in_place else row)

    # -- range queries: the database's answer, after the batch's writes --

    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]:
        self._before_range_query()
        return self._db.select(table, query, params, limit)

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        self._before_range_query()
        return self._db.versions(after, limit)

    # -- retention --
    #
    # Its reads see the batch's writes, as a range query does. Deleting rows
    # the batch may hold in memory, and burying records its moves may have
    # loaded, is left to the savepoint path: that comes only when a round
    # has something to prune, so buffering it would pay nothing.

    def delete(self, table: Table[R], key: str) -> bool:
        raise Isolate("retention's deletes run on the savepoint path")

    def present(self, table: Table[R], keys: Collection[str]) -> set[str]:
        self._before_range_query()
        return self._db.present(table, keys)

    def aged_outcomes(self, before_ms: int, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, str]]:
        self._before_range_query()
        return self._db.aged_outcomes(before_ms, after, limit)

    def bury_outcome(self, key: bytes, now_ms: int) -> None:
        raise Isolate("retention's burials run on the savepoint path")

    def drop_tombstones(self, before_ms: int, limit: int) -> int:
        """The database's delete; a tombstone the batch loaded is read again."""
        self._before_range_query()
        dropped = self._db.drop_tombstones(before_ms, limit)
        if dropped:
            outcomes = self._rows.outcomes
            for key in [key for key, record in outcomes.items() if record is not None and record.pruned]:
                del outcomes[key]
        return dropped

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
    """Every row a batch's jobs named in their `Prefetch`: keys, and keys by table."""

    keys: frozenset[bytes]
    rows: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, batch: list[Job]) -> Named:
        keys: set[bytes] = set()
        rows: dict[str, set[str]] = {}
        for job in batch:
            if job.prefetch is not None:
                keys.update(job.prefetch.keys)
                for table, named in job.prefetch.rows.items():
                    rows.setdefault(table, set()).update(named)
        return cls(frozenset(keys), {table: frozenset(named) for table, named in rows.items()})

    def __bool__(self) -> bool:
        return bool(self.keys or any(self.rows.values()))


class BufferedStore(GroupCommitStore):
    """A group-commit store whose batches run buffered: a backend says how
    to begin and load the named rows (`_load`) and how to write a batch's
    changes (`_write`); the rest, and the fall-back to savepoints, is here."""

    def _load(self, connection: Any, named: Named, budget: Budget) -> Rows:
        """Begins the batch's transaction, bounded by `budget`, and loads
        (and locks) the named rows; a backend whose rows other sessions can
        hold says in `Rows.busy` which it found locked, unless the budget
        `waits`, when it waits for them."""
        raise NotImplementedError

    def _write(self, connection: Any, changes: Changes) -> bool:
        """Writes `changes`; False when a statement affected fewer rows than
        it holds (another writer got there first)."""
        raise NotImplementedError

    def _fast(self, connection: Any, batch: list[Job], waits: bool = False) -> list[JobResult]:
        try:
            rows = self._load(connection, Named.of(batch), Budget.of(batch, waits))
        except self.DATABASE_ERROR as error:
            if self._fails_batch(error):
                raise
            raise Isolate() from error  # row by row, a failing read falls on its own move
        db = self.TXN(connection.cursor(), self.tables)

        def flush(changes: Changes) -> bool:
            return self._write(connection, changes)

        # A move that names a row another transaction holds waits for it on
        # the waiter, so the rest of its batch does not wait with it.
        deferred = [job for job in batch if rows.blocks(job)] if rows.busy else []
        skipped = {id(job) for job in deferred}
        results: list[JobResult] = []
        for job in batch:
            if id(job) in skipped:
                continue
            if not self._claim(job):
                results.append((job.future, None, BudgetSpent()))
                continue
            value, failed = run_move(
                rows, db, flush, job.work, self.CONTENDED_RERUNS,
                fails_batch=self._fails_batch,
                aborts_transaction=lambda e: isinstance(e, self.DATABASE_ERROR),
            )
            results.append((job.future, value, failed))
        try:
            committed = self._commit(connection, rows.changes())
        except self.DATABASE_ERROR as error:
            if self._fails_batch(error):
                raise
            raise Isolate() from error  # a CHECK a move broke: the savepoint path finds which
        if not committed:
            raise Isolate()
        if deferred:
            self._defer(deferred)
        return results

    def _commit(self, connection: Any, changes: Changes) -> bool:
        """Writes the batch's last changes and commits; False (nothing
        committed) when a write lost a race. A backend may do both at once."""
        if changes and not self._write(connection, changes):
            return False
        connection.execute("COMMIT")
        return True
