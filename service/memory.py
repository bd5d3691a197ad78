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
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from holdfast.store import (
    CORE_TABLES,
    BudgetSpent,
    Contended,
    EntityRows,
    GroupCommitStore,
    Prefetch,
    TOMBSTONE,
    Record,
    name_os_thread,
    StoreUnavailable,
    Txn,
    tables_of,
)
from holdfast.table import Query, R, Table

T = TypeVar("T")
CONTENDED_RERUNS = GroupCommitStore.CONTENDED_RERUNS


class RowRefused(ValueError):
    """A row the SQL schema's constraints would refuse (NOT NULL, CHECK, no
    NUL in PostgreSQL text): the move's own failure, never a conflict."""


@dataclass(slots=True)
class Changes:
    """What commits changed: the keys written, by table name; the rows a
    checker needs to look at."""

    keys: dict[str, set[str]] = field(default_factory=dict)

    def of(self, table: str) -> set[str]:
        """The keys of `table` written (an empty set when none)."""
        return self.keys.get(table, set())

    def update(self, other: Changes) -> None:
        for table, keys in other.keys.items():
            self.keys.setdefault(table, set()).update(keys)

    def take(self) -> Changes:
        """What was gathered so far, leaving this empty for what comes next."""
        taken = Changes(self.keys)
        self.keys = {}
        return taken


class Rows:
    """The committed rows, by table, and an index per range query that has
    a `candidate` condition (what an SQL store's indexes, such as
    `entity_due`, are for)."""

    def __init__(self) -> None:
        self.outcomes: dict[bytes, Record] = {}
        self.recorded_at: dict[bytes, int] = {}  # when each record (or tombstone) was made
        self.tables: dict[str, dict[str, Any]] = {}
        self.indexes: dict[int, set[str]] = {}  # id(query) -> keys of rows that meet its candidate condition

    def of(self, table: Table[R]) -> dict[str, R]:
        """`table`'s committed rows by key."""
        rows = self.tables.get(table.name)
        if rows is None:
            rows = self.tables[table.name] = {}
        return rows

    def index(self, query: Query[Any]) -> set[str]:
        return self.indexes.setdefault(id(query), set())


class MemTxn(EntityRows):
    """`Txn` over the committed rows, writing to an overlay that `commit`
    applies. Rows are copied in and out, so nothing uncommitted, and no
    change a move makes in place to a row it read, reaches the rows."""

    def __init__(self, rows: Rows, tables: Sequence[Table[Any]] = CORE_TABLES) -> None:
        self._rows = rows
        self._tables = tables
        self._outcomes: dict[bytes, tuple[Record, int]] = {}
        self._dropped: set[bytes] = set()
        self._deleted: dict[str, tuple[Table[Any], set[str]]] = {}  # table -> (its declaration, keys deleted)
        self._written: dict[str, tuple[Table[Any], dict[str, Any]]] = {}  # table -> (its declaration, key -> row)
        self.written: dict[str, int] = {}

    # -- idempotency records ------------------------------------------------------------

    def recorded(self, key: bytes) -> Record | None:
        if key in self._dropped:
            return None
        mine = self._outcomes.get(key)
        return mine[0] if mine is not None else self._rows.outcomes.get(key)

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        if self.recorded(key) is not None:
            raise Contended("the idempotency key was recorded by a concurrent move")
        self._outcomes[key] = (record, now_ms)

    # -- rows -----------------------------------------------------------------------------

    def row(self, table: Table[R], key: str) -> R | None:
        if key in self._deleted.get(table.name, (table, ()))[1]:
            return None
        written = self._written.get(table.name)
        found = written[1].get(key) if written is not None else None
        if found is None:
            found = self._rows.of(table).get(key)
        return None if found is None else table.copy(found)

    def save(self, table: Table[R], row: R, expected_version: int) -> None:
        """Compare-and-set on the version; a new row expects version 0."""
        version = table.advanced(row, expected_version)
        key = table.key(row)
        current = self.row(table, key)
        assert (refixed := table.refixed(current, row)) is None, refixed
        self._refuse(table, row)
        if table.stored(current) != expected_version:
            raise Contended(table.moved_past(key, expected_version))
        self._write(table, key, row)
        if table.snapshot:
            self.written[key] = version

    def put(self, table: Table[R], row: R) -> None:
        assert not table.versioned, f"table {table.name} is versioned: save its rows"
        self._refuse(table, row)
        self._write(table, table.key(row), row)

    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]:
        """The query's answer over the committed rows and this move's own;
        a query without a `candidate` index scans the table."""
        written = self._written.get(table.name)
        keys: Iterable[str]
        if query.candidate is not None:
            # Commits keep an index for each query the table declares; one it
            # does not would find an empty index and answer nothing.
            assert any(q is query for q in table.queries), f"table {table.name}: declare the query in its `queries`"
            keys = self._rows.index(query) | (set(written[1]) if written is not None else set())
        else:
            keys = {*self._rows.of(table), *(written[1] if written is not None else ())}
        found = [row for row in map(lambda key: self.row(table, key), keys) if row is not None and query.matches(row, params)]
        return sorted(found, key=query.order)[:limit]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        """The snapshot tables' versions in one key order, as SqlTxn's UNION."""
        found: list[tuple[str, int]] = []
        for table in self._tables:
            if table.snapshot:
                keys = {*self._rows.of(table), *(self._written.get(table.name, (table, {}))[1])}
                rows = ((key, self.row(table, key)) for key in keys if key > after)
                found += [(key, getattr(row, "version")) for key, row in rows if row is not None]
        return sorted(found)[:limit]

    # -- retention --------------------------------------------------------------------

    def delete(self, table: Table[R], key: str) -> bool:
        there = self.row(table, key) is not None
        deleted = self._deleted.get(table.name)
        if deleted is None:
            deleted = self._deleted[table.name] = (table, set())
        deleted[1].add(key)
        self._written.get(table.name, (table, {}))[1].pop(key, None)
        return there

    def present(self, table: Table[R], keys: Collection[str]) -> set[str]:
        return {key for key in keys if self.row(table, key) is not None}

    def aged_outcomes(self, before_ms: int, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, str]]:
        """As SqlTxn's, over the committed records (a scan: what the
        simulation's stores hold is small)."""
        at = self._rows.recorded_at
        found = [(at[key], key, record.entity) for key, record in self._rows.outcomes.items()
                 if not record.pruned and at[key] < before_ms and (at[key], key) > after]
        return sorted(found)[:limit]

    def bury_outcome(self, key: bytes, now_ms: int) -> None:
        self._outcomes[key] = (TOMBSTONE, now_ms)

    def drop_tombstones(self, before_ms: int, limit: int) -> int:
        at = self._rows.recorded_at
        old = sorted((at[key], key) for key, record in self._rows.outcomes.items() if record.pruned and at[key] < before_ms)
        self._dropped.update(key for _, key in old[:limit])
        return len(old[:limit])

    def _write(self, table: Table[R], key: str, row: R) -> None:
        self._deleted.get(table.name, (table, set()))[1].discard(key)
        written = self._written.get(table.name)
        if written is None:
            written = self._written[table.name] = (table, {})
        written[1][key] = table.copy(row)

    @staticmethod
    def _refuse(table: Table[R], row: R) -> None:
        refusal = table.refusal(row)
        if refusal is not None:
            raise RowRefused(refusal)

    # -- commit ---------------------------------------------------------------------------

    def commit(self) -> Changes:
        """Applies the overlay; returns what it changed."""
        rows = self._rows
        for outcome_key, (record, now_ms) in self._outcomes.items():
            rows.outcomes[outcome_key], rows.recorded_at[outcome_key] = record, now_ms
        for outcome_key in self._dropped:
            del rows.outcomes[outcome_key], rows.recorded_at[outcome_key]
        changes = Changes()
        for name, (table, deleted) in self._deleted.items():
            committed = rows.of(table)
            for key in deleted:
                committed.pop(key, None)
                for query in table.queries:
                    rows.index(query).discard(key)
            changes.keys.setdefault(name, set()).update(deleted)
        for name, (table, written) in self._written.items():
            rows.of(table).update(written)
            for query in table.queries:
                if query.candidate is not None:
                    index = rows.index(query)
                    for key, row in written.items():
                        (index.add if query.candidate(row) else index.discard)(key)
            changes.keys.setdefault(name, set()).update(written)
        return changes


def attempt(rows: Rows, work: Callable[[Txn], T], tables: Sequence[Table[Any]] = CORE_TABLES) -> tuple[MemTxn, T]:
    """Runs `work` on a fresh overlay, and again (on the rows as they are now)
    when it loses a compare-and-set; the caller commits the transaction it
    gets back. Any other failure undoes the move and is the caller's."""
    for _ in range(CONTENDED_RERUNS):
        txn = MemTxn(rows, tables)
        try:
            return txn, work(txn)
        except Contended:
            continue
    raise StoreUnavailable("the move lost every rerun to concurrent writers")


class MemoryStore:
    """A `Store` over `Rows`: one worker thread runs the transactions one at
    a time, in the order they were handed over, each committed on its own
    (so each sees every one before it, and one's failure undoes it alone).
    A thread, as the SQL stores have, so no move ever runs on the event loop."""

    def __init__(self, rows: Rows | None = None, tables: Sequence[Table[Any]] = ()) -> None:
        self.rows = Rows() if rows is None else rows
        self.tables = tables_of(tables)
        self._jobs: queue.SimpleQueue[tuple[Callable[[Txn], object], float | None, asyncio.Future[Any]] | None] = queue.SimpleQueue()
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
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((work, deadline, future))
        return await future

    def _serve(self) -> None:
        name_os_thread()
        while (job := self._jobs.get()) is not None:
            work, deadline, future = job
            if deadline is not None and time.monotonic() >= deadline:
                self._answer(future, None, BudgetSpent())  # queued past its budget: never started
                continue
            try:
                txn, value = attempt(self.rows, work, self.tables)
                txn.commit()
            except Exception as error:
                self._answer(future, None, error)
            else:
                self._answer(future, value, None)

    def _answer(self, future: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, future, value, error)


def _settle(future: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    if future.done():  # the caller went away; the move stays committed
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
