"""The store of record: what a move may do inside its transaction, and the
group-commit machinery every SQL backend shares.

A move runs as one function over a `Txn` inside one store transaction: the
idempotency record, the version compare-and-set, the move's other effects
and the outcome commit together or not at all. The tables are the
framework's (holdfast.table declares them) and those of the hosted apps. Concurrent moves share a transaction
(group commit): worker threads, each with its own connection, drain one
queue and commit each batch once. A batch runs the fast way first (both
stores run it buffered: holdfast.batch); if a move fails, or memory cannot
tell what the database holds, the batch is rolled back and run again with a
SAVEPOINT around each move (`Isolate`), so one move's failure never undoes
another's. The event loop never blocks on the database. Backends
(holdfast.sqlite, holdfast.postgres) differ only in how they connect, how they
load and write a batch's rows, and in their SQL dialect.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import functools
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from holdfast import metrics
from holdfast.redaction import scrub
from holdfast.table import Column, Query, R, Table

T = TypeVar("T")
# A row as a DB-API driver hands it over, or as a statement takes it.
Row = tuple[Any, ...]
log = logging.getLogger("holdfast.store")


class StoreUnavailable(Exception):
    """The store could not run or commit the transaction."""


class BudgetSpent(Exception):
    """The call's budget ran out before its move started; nothing was changed."""


class SchemaTooNew(ValueError):
    """The database was written by a newer holdfast; this one must not touch it."""


# The tables' layout. Bump it with a migration step in each backend; a store
# stamped with a higher number than this code knows is refused at start-up.
# 2: the `entity` table (a version-1 store gains it when it opens).
# 3: tables may gain columns (`Table.added`: ALTER TABLE ... ADD COLUMN with
#    the column's DEFAULT, when the store opens); inventory's `reservation`
#    gains `confirmed_quantity` and `order_hold_id`, and the `order_hold`
#    table is new. A version-3 store refuses an older holdfast, which would
#    not write the new columns.
# 4: retention (holdfast.retention). An outcome record names the entity of
#    its move (`outcome.entity`, "table:key"), and a pruned record stays as
#    a tombstone for a while (empty fingerprint); the framework's entities
#    say when they last moved (`entity.updated_at_ms`, stamped with the
#    upgrade's time on the rows that were there); inventory's sales of
#    pruned reservations are kept per SKU (`pruned_sale`).
SCHEMA_VERSION = 4


class Contended(Exception):
    """Another transaction moved the same row first (another instance, or
    another worker): the move is undone and run again on the new state."""


class Isolate(Exception):
    """A batch run without savepoints cannot finish (a move failed, a buffered
    flush lost a race, a statement aborted the transaction): it is rolled back
    and run again with a savepoint around each move, so a failure undoes that
    move alone."""


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Rows a transaction will read: idempotency keys, and keys of rows by
    table name. A backend that runs batches buffered (holdfast.batch) loads
    every job's rows with one statement per table instead of one per read;
    others ignore it. A row not named is still read, just on its own."""

    keys: tuple[bytes, ...] = ()
    rows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class Entity:
    """A state-machine entity of a service built on the framework (a waybill, a table booking):
    the machine's state and the row's version, plus the service's own fields as opaque bytes.

    The store never looks inside `data`, so a service changes its fields
    without a schema migration; what the store does look at (the state, the
    lease, the timeout) has columns of its own."""

    entity_id: str  # globally unique; services prefix it (e.g. "wb_...")
    kind: str  # the machine's name, e.g. "fulfillment"; fixed when the entity is created
    state: int
    version: int
    data: bytes  # the service's own fields, serialized by the service
    lease_owner: str = ""  # who holds the entity's lease ("" = nobody)
    lease_until_ms: int = 0  # the lease ends at this clock time
    due_at_ms: int = 0  # when its timeout event fires; 0 = none
    updated_at_ms: int = 0  # when a move last wrote it: retention prunes a settled entity after its retention


def _entity_of(values: Sequence[Any]) -> Entity:
    """Drivers may hand `data` back as a buffer, not bytes."""
    return Entity(values[0], values[1], values[2], values[3], bytes(values[4]), values[5], values[6], values[7], values[8])


def _entity_refused(entity: Entity) -> str | None:
    return None if entity.version > 0 else f"entity {entity.entity_id!r}: version must be positive (CHECK version > 0)"


# The entities due for their timeout event, oldest first (due_at_ms 0: none).
DUE_ENTITIES: Query[Entity] = Query(
    where="kind = %s AND due_at_ms > 0 AND due_at_ms <= %s",
    order_by="due_at_ms, entity_id",
    matches=lambda e, params: e.kind == params[0] and 0 < e.due_at_ms <= params[1],
    order=lambda e: (e.due_at_ms, e.entity_id),
    candidate=lambda e: e.due_at_ms > 0,
)

# The framework's own table: every service built on holdfast.framework keeps
# its entities here, told apart by `kind`.
ENTITIES: Table[Entity] = Table(
    "entity",
    (
        Column("entity_id", "text"),
        Column("kind", "text", fixed=True),
        Column("state", "integer"),
        Column("version", "integer", "NOT NULL CHECK (version > 0)"),
        Column("data", "blob"),
        Column("lease_owner", "text", "NOT NULL DEFAULT ''"),
        Column("lease_until_ms", "integer", "NOT NULL DEFAULT 0"),
        Column("due_at_ms", "integer", "NOT NULL DEFAULT 0"),
        # Added by schema 4.
        Column("updated_at_ms", "integer", "NOT NULL DEFAULT 0"),
    ),
    Entity,
    snapshot=True,
    noun="entity",
    indexes=(("entity_due", "kind, due_at_ms"),),
    in_place=True,
    refused=_entity_refused,
    of_values=_entity_of,
    queries=(DUE_ENTITIES,),
)
ENTITY_COLUMNS = ", ".join(ENTITIES.names)
entity_of_row = ENTITIES.row


@dataclass(frozen=True, slots=True)
class Record:
    """A recorded outcome: `reason` None is success; `payload` the exact bytes.

    `entity` names the row the move was about, as "table:key" ("" for
    none): retention never prunes a record while that row is there. An
    empty `fingerprint` is a tombstone: the record was pruned, and a call
    with its key is told so rather than run again (holdfast.retention)."""

    fingerprint: bytes
    reason: str | None
    payload: bytes
    entity: str = field(default="", compare=False)

    @property
    def pruned(self) -> bool:
        return not self.fingerprint


# What a pruned record leaves under its key until the tombstone goes too.
TOMBSTONE = Record(b"", None, b"")


class Txn(Protocol):
    """What a move may do inside its transaction. Every method is synchronous:
    it runs on a store thread, never on the event loop.

    Rows are read and written by their `Table`: `save` is compare-and-set
    on a versioned row's version (a new row expects version 0; a lost race
    raises `Contended`, so the move reruns on the winner's state), `put`
    writes an unversioned row under the lock its read took. `written` holds
    the versions of the snapshot's tables this move wrote."""

    written: dict[str, int]

    def recorded(self, key: bytes) -> Record | None: ...
    def record(self, key: bytes, record: Record, now_ms: int) -> None: ...
    def row(self, table: Table[R], key: str) -> R | None: ...
    def save(self, table: Table[R], row: R, expected_version: int) -> None: ...
    def put(self, table: Table[R], row: R) -> None: ...
    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]: ...
    def versions(self, after: str, limit: int) -> list[tuple[str, int]]: ...
    # Retention (holdfast.retention): background work, never a call's move.
    def delete(self, table: Table[R], key: str) -> bool: ...
    def present(self, table: Table[R], keys: Collection[str]) -> set[str]: ...
    def aged_outcomes(self, before_ms: int, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, str]]: ...
    def bury_outcome(self, key: bytes, now_ms: int) -> None: ...
    def drop_tombstones(self, before_ms: int, limit: int) -> int: ...
    def entity(self, entity_id: str) -> Entity | None: ...
    def save_entity(self, entity: Entity, expected_version: int) -> None: ...
    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]: ...


class EntityRows:
    """The framework's entity rows as `Txn` methods of their own, over the
    generic ones: what holdfast.framework's moves call."""

    def row(self, table: Table[R], key: str) -> R | None:
        raise NotImplementedError

    def save(self, table: Table[R], row: R, expected_version: int) -> None:
        raise NotImplementedError

    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]:
        raise NotImplementedError

    def entity(self, entity_id: str) -> Entity | None:
        return self.row(ENTITIES, entity_id)

    def save_entity(self, entity: Entity, expected_version: int) -> None:
        """The kind is the one the entity was created with, forever."""
        self.save(ENTITIES, entity, expected_version)

    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]:
        """The entities of `kind` whose timeout is due, oldest first: what a
        reaper fires timeout events for (due_at_ms 0 means no timeout)."""
        return self.select(ENTITIES, DUE_ENTITIES, (kind, now_ms), limit)


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def transact(
        self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None
    ) -> T: ...
    def describe(self) -> str: ...


# The framework's tables, first in every store: an app's tables follow.
CORE_TABLES: tuple[Table[Any], ...] = (ENTITIES,)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcome (
    key {blob} PRIMARY KEY,
    fingerprint {blob} NOT NULL,
    reason TEXT,
    payload {blob} NOT NULL,
    recorded_at_ms {integer} NOT NULL,
    entity TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outcome_recorded ON outcome (recorded_at_ms);
CREATE TABLE IF NOT EXISTS holdfast_schema (version INTEGER NOT NULL);
"""
# The outcome table's columns added since it was first declared (schema 4).
_OUTCOME_ADDED = (("entity", "entity TEXT NOT NULL DEFAULT ''"),)


def tables_of(tables: Sequence[Table[Any]]) -> tuple[Table[Any], ...]:
    """The framework's tables and then `tables`, each once; two tables of one
    name must be one declaration (two apps sharing a table share its rows)."""
    found: dict[str, Table[Any]] = {}
    for table in (*CORE_TABLES, *tables):
        other = found.setdefault(table.name, table)
        if other is not table and other != table:
            raise ValueError(f"two different tables are declared as {table.name!r}")
    return tuple(found.values())


def added_columns(
    tables: Sequence[Table[Any]], columns_of: Callable[[str], Collection[str]], integer: str, blob: str
) -> list[str]:
    """The ALTER TABLE statements that bring tables made by an older
    declaration up to `tables` (`columns_of(name)`: the database's column
    names of a table, none when it has no such table), then every table's
    indexes (one may name an added column): run after `schema`, in the
    same schema transaction."""
    outcome = columns_of("outcome")
    statements = [f"ALTER TABLE outcome ADD COLUMN {sql}" for name, sql in _OUTCOME_ADDED if outcome and name not in outcome]
    statements += [statement for table in tables for statement in table.added(columns_of(table.name), integer, blob)]
    return statements + [statement for table in tables for statement in table.index_ddl()]


def schema(tables: Sequence[Table[Any]], integer: str, blob: str) -> str:
    """Every table (an app's CHECKs hold even against a bug), in a backend's
    names for 64-bit integers and bytes."""
    return "\n".join([_SCHEMA.format(integer=integer, blob=blob), *(t.ddl(integer, blob) for t in tables)])


class SqlTxn(EntityRows):
    """`Txn` over a DB-API cursor, inside the batch's transaction.

    The SQL is written once with `%s` placeholders; a backend's subclass sets
    its placeholder and whether reads inside a move lock the row they read.
    """

    PLACEHOLDER: ClassVar[str] = "%s"
    LOCK: ClassVar[str] = ""  # " FOR UPDATE" where concurrent writers exist
    _translated: ClassVar[dict[str, str]]

    __slots__ = ("_cursor", "_tables", "written", "_read")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._translated = {}

    def __init__(self, cursor: Any, tables: Sequence[Table[Any]] = CORE_TABLES) -> None:
        self._cursor = cursor
        self._tables = tables
        self.written: dict[str, int] = {}
        # Rows this move has read or written: the engine's version check and
        # the move itself read the same row, and one read (one round trip,
        # one row lock) serves both. A Txn lives for one move attempt.
        self._read: dict[tuple[str, str], Any] = {}

    def _execute(self, sql: str, params: Row = ()) -> Any:
        text = self._translated.get(sql)
        if text is None:
            text = self._translated[sql] = sql.replace("%s", self.PLACEHOLDER)
        return self._cursor.execute(text, params)

    def recorded(self, key: bytes) -> Record | None:
        row = self._execute("SELECT fingerprint, reason, payload FROM outcome WHERE key = %s", (key,)).fetchone()
        return None if row is None else Record(bytes(row[0]), row[1], bytes(row[2]))

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        cursor = self._execute(
            "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms, entity) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING",
            (key, record.fingerprint, record.reason, record.payload, now_ms, record.entity),
        )
        if cursor.rowcount != 1:
            raise Contended("the idempotency key was recorded by a concurrent move")

    def row(self, table: Table[R], key: str) -> R | None:
        cached = self._read.get((table.name, key), _UNREAD)
        if cached is not _UNREAD:
            return cached  # type: ignore[no-any-return]
        found = self._execute(_select(table) + self.LOCK, (key,)).fetchone()
        row = None if found is None else table.row(found)
        self._read[(table.name, key)] = row
        return row

    def save(self, table: Table[R], row: R, expected_version: int) -> None:
        version = table.advanced(row, expected_version)
        key = table.key(row)
        cached = self._read.get((table.name, key))
        assert (refixed := table.refixed(cached, row)) is None, refixed
        values = table.values(row)
        if expected_version == 0:
            cursor = self._execute(_insert(table), values)
        else:
            updated = tuple(value for column, value in zip(table.columns, values) if column.name in table.updated)
            cursor = self._execute(_update(table), (*updated, key, expected_version))
        if cursor.rowcount != 1:
            raise Contended(table.moved_past(key, expected_version))
        if table.snapshot:
            self.written[key] = version
        self._read[(table.name, key)] = row

    def put(self, table: Table[R], row: R) -> None:
        assert not table.versioned, f"table {table.name} is versioned: save its rows"
        self._execute(_upsert(table), table.values(row))
        self._read[(table.name, table.key(row))] = row

    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]:
        sql = f"SELECT {', '.join(table.names)} FROM {table.name} WHERE {query.where} ORDER BY {query.order_by} LIMIT %s"
        return [table.row(found) for found in self._execute(sql, (*params, limit)).fetchall()]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        """The snapshot tables' versions in one key order (their keys never
        collide: each app prefixes its ids), as the snapshot holds them all."""
        tables = [table for table in self._tables if table.snapshot]
        union = " UNION ALL ".join(f"SELECT {t.key_column}, version FROM {t.name} WHERE {t.key_column} > %s" for t in tables)
        rows = self._execute(f"{union} ORDER BY 1 LIMIT %s", (*[after] * len(tables), limit)).fetchall()
        return [(row_id, version) for row_id, version in rows]

    # -- retention --

    def delete(self, table: Table[R], key: str) -> bool:
        """False when there was no row to delete: another instance's
        retention deleted it first (its DELETE held the row's lock)."""
        cursor = self._execute(f"DELETE FROM {table.name} WHERE {table.key_column} = %s", (key,))
        self._read[(table.name, key)] = None
        return bool(cursor.rowcount == 1)

    def present(self, table: Table[R], keys: Collection[str]) -> set[str]:
        """Which of `keys` the table holds, without locking them."""
        if not keys:
            return set()
        marks = ", ".join(["%s"] * len(keys))
        sql = f"SELECT {table.key_column} FROM {table.name} WHERE {table.key_column} IN ({marks})"
        return {row[0] for row in self._execute(sql, tuple(keys)).fetchall()}

    def aged_outcomes(self, before_ms: int, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, str]]:
        """Records (not tombstones) made before `before_ms`, after the
        cursor `after` (recorded_at_ms, key) in that order."""
        at, key = after
        rows = self._execute(
            "SELECT recorded_at_ms, key, entity FROM outcome WHERE recorded_at_ms < %s AND fingerprint <> %s"
            " AND (recorded_at_ms > %s OR (recorded_at_ms = %s AND key > %s)) ORDER BY recorded_at_ms, key LIMIT %s",
            (before_ms, b"", at, at, key, limit),
        ).fetchall()
        return [(recorded_at, bytes(found), entity) for recorded_at, found, entity in rows]

    def bury_outcome(self, key: bytes, now_ms: int) -> None:
        self._execute(
            "UPDATE outcome SET fingerprint = %s, reason = NULL, payload = %s, entity = '', recorded_at_ms = %s"
            " WHERE key = %s", (b"", b"", now_ms, key),
        )

    def drop_tombstones(self, before_ms: int, limit: int) -> int:
        cursor = self._execute(
            "DELETE FROM outcome WHERE key IN (SELECT key FROM outcome WHERE fingerprint = %s AND recorded_at_ms < %s"
            " ORDER BY recorded_at_ms LIMIT %s)", (b"", before_ms, limit),
        )
        return int(cursor.rowcount)


_UNREAD = object()


# A table's statements, with `%s` placeholders, built once per table.
@functools.cache
def _select(table: Table[Any]) -> str:
    return f"SELECT {', '.join(table.names)} FROM {table.name} WHERE {table.key_column} = %s"


@functools.cache
def _insert(table: Table[Any]) -> str:
    marks = ", ".join(["%s"] * len(table.columns))
    return f"INSERT INTO {table.name} ({', '.join(table.names)}) VALUES ({marks}) ON CONFLICT ({table.key_column}) DO NOTHING"


@functools.cache
def _update(table: Table[Any]) -> str:
    sets = ", ".join(f"{name} = %s" for name in table.updated)
    return f"UPDATE {table.name} SET {sets} WHERE {table.key_column} = %s AND version = %s"


@functools.cache
def _upsert(table: Table[Any]) -> str:
    marks = ", ".join(["%s"] * len(table.columns))
    sets = ", ".join(f"{name} = excluded.{name}" for name in table.updated)
    return (f"INSERT INTO {table.name} ({', '.join(table.names)}) VALUES ({marks})"
            f" ON CONFLICT ({table.key_column}) DO UPDATE SET {sets}")


@dataclass(slots=True)
class Job:
    work: Callable[[Txn], object]
    deadline: float | None
    future: asyncio.Future[Any]
    prefetch: Prefetch | None
    # Decided once, under the store's claim lock: the worker starts the job,
    # or its caller (out of budget) abandons it. Never both.
    started: bool = False
    abandoned: bool = False


JobResult = tuple[asyncio.Future[Any], object, BaseException | None]

# How long the waiter waits for a busy row on behalf of moves with no budget
# of their own (the reaper's, retention's) before they are answered
# BudgetSpent (and run again on their next round).
BACKGROUND_BUDGET_S = 2.0


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a batch's transaction may take: until the last deadline of
    its moves, by when every caller has had its answer, whatever the
    transaction does; None when a move has no budget (the reaper's,
    retention's). `waits`: the batch is the waiter's, which waits for busy
    rows instead of handing their moves on (holdfast.postgres)."""

    seconds: float | None
    waits: bool = False

    # The least a bound is set to, so a batch whose last caller is about to
    # give up still gets to commit what it has (and a bound is never 0,
    # which a database reads as "no bound").
    FLOOR_S: ClassVar[float] = 0.1

    @classmethod
    def of(cls, batch: Sequence[Job], waits: bool = False) -> Budget:
        if any(job.deadline is None for job in batch):
            return cls(None, waits)
        last = max(job.deadline for job in batch if job.deadline is not None)
        return cls(max(cls.FLOOR_S, last - time.monotonic()), waits)

    def ms(self, unbudgeted_ms: int) -> int:
        """The budget in milliseconds; `unbudgeted_ms` when there is none."""
        return unbudgeted_ms if self.seconds is None else max(1, int(self.seconds * 1000))


class GroupCommitStore:
    """Worker threads, each with its own connection, run queued moves in
    shared transactions. A backend subclass says how to connect, which
    `SqlTxn` speaks its dialect, and which driver errors mean what."""

    TXN: ClassVar[type[SqlTxn]]
    BEGIN: ClassVar[str] = "BEGIN"
    # The driver's errors: what a move's statement or the database can raise.
    DATABASE_ERROR: ClassVar[type[BaseException] | tuple[type[BaseException], ...]] = ()
    CONTENDED_RERUNS: ClassVar[int] = 3  # a move rerun this often against new winners gives up
    BATCH_RETRIES: ClassVar[int] = 3  # a whole batch retried after a deadlock
    # Whether other sessions can hold a row this store's batches want (a
    # database server): then a waiter thread, on a connection of its own,
    # runs the moves whose rows were busy, so those never hold up a
    # batch's other moves (`_defer`).
    WAITER: ClassVar[bool] = False
    # What would give the connection's password away in a driver's error
    # text (holdfast.redaction.secrets_of): a backend with one sets it.
    secrets: tuple[str, ...] = ()

    def __init__(self, workers: int = 1, batch_max: int = 256, tables: Sequence[Table[Any]] = ()) -> None:
        assert workers > 0 and batch_max > 0
        self.tables = tables_of(tables)
        self._workers = workers
        self._batch_max = batch_max
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._waiting: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._claims = threading.Lock()

    def table(self, name: str) -> Table[Any]:
        """The declaration of the store's table `name`."""
        found = next((table for table in self.tables if table.name == name), None)
        assert found is not None, f"{self.describe()} has no table {name!r}"
        return found

    # -- what a backend supplies ----------------------------------------------------

    def describe(self) -> str:
        raise NotImplementedError

    def _connect(self) -> Any:
        """A new connection in autocommit mode (transactions are explicit)."""
        raise NotImplementedError

    def _create_schema(self, connection: Any) -> None:
        """Creates the tables and calls `_stamp_schema`, as one transaction."""
        raise NotImplementedError

    def _is_unavailable(self, error: BaseException) -> bool:
        """The connection or server failed: drop the connection, answer UNAVAILABLE."""
        raise NotImplementedError

    def _is_retryable(self, error: BaseException) -> bool:
        """A deadlock or serialization failure: the batch may simply run again."""
        return False

    def _is_lock_wait(self, error: BaseException) -> bool:
        """A statement gave up waiting for a row lock (or ran out of the
        batch's budget): nothing of the batch committed. A worker hands
        its moves to the waiter; the waiter answers that their time is up."""
        return False

    def _fails_batch(self, error: BaseException) -> bool:
        """An error no move's savepoint can contain: it is the batch's."""
        return self._is_unavailable(error) or self._is_retryable(error) or self._is_lock_wait(error)

    def _said(self, error: BaseException) -> str:
        """A driver's error as text for a log line or a client's answer,
        without the password (psycopg quotes a connection string whole)."""
        return scrub(str(error), self.secrets)

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"{self.describe()}: {self._said(error)}".strip())

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        connection = await asyncio.to_thread(self._first_connection)
        for n in range(self._workers):
            self._start(f"holdfast-store-{n}", connection if n == 0 else None, self._jobs, waits=False)
        if self.WAITER:
            self._start("holdfast-waiter", None, self._waiting, waits=True)

    def _start(self, name: str, connection: Any, jobs: queue.SimpleQueue[Job | None], waits: bool) -> None:
        thread = threading.Thread(target=self._serve, args=(connection, jobs, waits), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    async def close(self) -> None:
        for _ in range(self._workers):
            self._jobs.put(None)
        self._waiting.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads.clear()

    async def transact(
        self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None
    ) -> T:
        assert self._loop is not None, "store not open"
        if deadline is not None and time.monotonic() >= deadline:
            raise BudgetSpent()
        future: asyncio.Future[T] = self._loop.create_future()
        job = Job(work, deadline, future, prefetch)
        self._jobs.put(job)
        if deadline is None:
            return await future
        # One timer per call rather than wait_for(shield(...)), which costs a
        # task and two futures per call on the event loop.
        timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, job)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, job: Job) -> None:
        """The call's budget ran out before its batch answered."""
        if job.future.done():
            return
        with self._claims:
            job.abandoned = not job.started
        if job.abandoned:
            job.future.set_exception(BudgetSpent())
            return
        # A database that stopped answering mid-transaction: the move may
        # yet commit, so this is no "nothing changed" answer.
        job.future.set_exception(StoreUnavailable(
            f"{self.describe()} did not answer within the call's budget; the move may still commit,"
            " so retry with the same idempotency key to learn its outcome"
        ))

    def _first_connection(self) -> Any:
        try:
            connection = self._connect()
        except Exception as error:
            if self._is_unavailable(error):
                raise self._unavailable(error) from None
            raise
        try:
            self._create_schema(connection)
        except Exception as error:
            connection.close()
            if self._is_unavailable(error):
                raise self._unavailable(error) from None
            raise
        return connection

    def _stamp_schema(self, connection: Any) -> None:
        """Called by a backend's `_create_schema`, inside its schema transaction."""
        cursor = connection.cursor()
        found = cursor.execute("SELECT max(version) FROM holdfast_schema").fetchone()[0]
        if found is None:
            cursor.execute(f"INSERT INTO holdfast_schema (version) VALUES ({SCHEMA_VERSION})")
        elif found < SCHEMA_VERSION:
            # Every step so far only adds tables (2: entity) and columns
            # (3, 4), which the schema's CREATE ... IF NOT EXISTS and
            # `added_columns` have just made. 4: the entities already there
            # count as moved now, so none is pruned before its retention.
            if found < 4:
                cursor.execute(f"UPDATE entity SET updated_at_ms = {int(time.time() * 1000)} WHERE updated_at_ms = 0")
            cursor.execute(f"UPDATE holdfast_schema SET version = {SCHEMA_VERSION}")
        elif found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.describe()} has schema version {found}, newer than this holdfast's {SCHEMA_VERSION}; upgrade holdfast"
            )

    # -- the worker -------------------------------------------------------------------

    def _serve(self, connection: Any, jobs: queue.SimpleQueue[Job | None], waits: bool) -> None:
        loop = self._loop
        assert loop is not None, "workers start in open(), which sets the loop"
        name_os_thread()
        try:
            while (batch := self._next_batch(jobs)) is not None:
                connection, results = self._run_batch(connection, batch, waits)
                loop.call_soon_threadsafe(_deliver, results)
        finally:
            if connection is not None:
                connection.close()

    def _next_batch(self, jobs: queue.SimpleQueue[Job | None]) -> list[Job] | None:
        first = jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._batch_max:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close: finish this batch, then stop
                jobs.put(None)
                break
            batch.append(job)
        return batch

    def _defer(self, jobs: Sequence[Job]) -> None:
        """Hands moves that found a row busy to the waiter, unstarted: their
        batch committed without them (or rolled back), so nothing of theirs
        is in the store, and a caller whose budget runs out while they wait
        is told so (BudgetSpent). Only for a store with a waiter."""
        assert self.WAITER, f"{self.describe()} has no waiter to defer moves to"
        with self._claims:
            for job in jobs:
                job.started = False
        for job in jobs:
            if not job.future.done():
                metrics.MOVES_DEFERRED.inc()
                self._waiting.put(job)

    def _run_batch(self, connection: Any, batch: list[Job], waits: bool = False) -> tuple[Any, list[JobResult]]:
        budget = Budget.of(batch, waits).seconds
        gives_up = time.monotonic() + (BACKGROUND_BUDGET_S if budget is None else budget)
        retries = 0
        while True:
            try:
                if connection is None:
                    connection = self._connect()
                return connection, self._transaction(connection, batch, waits)
            except Exception as error:
                connection = self._after_failure(connection, error)
                if self._is_lock_wait(error):
                    if not waits:
                        self._defer(batch)  # rolled back: none of it committed
                        return connection, []
                    if time.monotonic() < gives_up and not all(job.future.done() for job in batch):
                        connection = self._end_stalled(connection)
                        continue  # a caller still waits: wait again
                    return connection, [(job.future, None, BudgetSpent()) for job in batch]
                if self._is_retryable(error) and retries < self.BATCH_RETRIES:
                    retries += 1
                    continue
                if isinstance(error, self.DATABASE_ERROR) and not self._is_unavailable(error):
                    # The database refused the batch in a way no move caused
                    # (the savepoint path would have caught a move's own):
                    # rolled back, so the callers may retry with their keys.
                    log.warning("a store batch failed: %s: %s", type(error).__name__, self._said(error))
                elif not self._is_unavailable(error) and not self._is_retryable(error):
                    # A bug, not an outage: every caller of the batch sees it,
                    # and the worker lives on to serve the next batch.
                    log.exception("a store batch failed")
                    return connection, [(job.future, None, error) for job in batch]
                failed = self._unavailable(error)
                return connection, [(job.future, None, failed) for job in batch]

    def _end_stalled(self, connection: Any) -> Any:
        """Called by the waiter between its waits for a busy row: a backend
        may end the sessions that hold rows while they have stopped talking
        (holdfast.postgres). Answers the connection to go on with."""
        return connection

    def _after_failure(self, connection: Any, error: BaseException) -> Any:
        if connection is None:
            return None
        if self._is_unavailable(error):
            log.warning("store connection lost: %s", self._said(error))
            try:
                connection.close()
            except Exception:  # already broken
                pass
            return None
        try:
            connection.execute("ROLLBACK")
        except Exception:
            connection.close()
            return None
        return connection

    def _transaction(self, connection: Any, batch: list[Job], waits: bool = False) -> list[JobResult]:
        """Runs the batch the fast way; if any move fails, runs it again with
        a savepoint around each move so that the failure undoes that move alone."""
        cursor = connection.cursor()
        try:
            return self._fast(connection, batch, waits)
        except Isolate:
            cursor.execute("ROLLBACK")
            return self._attempt(cursor, batch, isolated=True, waits=waits)

    def _fast(self, connection: Any, batch: list[Job], waits: bool = False) -> list[JobResult]:
        """The batch in one transaction without savepoints (two round trips
        fewer per move). A backend may run it buffered instead (holdfast.batch)."""
        return self._attempt(connection.cursor(), batch, isolated=False, waits=waits)

    def _begin(self, cursor: Any, budget: Budget) -> None:
        """Begins a batch's transaction; a backend may bound it by `budget`."""
        cursor.execute(self.BEGIN)

    def _attempt(self, cursor: Any, batch: list[Job], isolated: bool, waits: bool = False) -> list[JobResult]:
        self._begin(cursor, Budget.of(batch, waits))
        results = [(job.future, *self._run_one(cursor, job, isolated)) for job in batch]
        cursor.execute("COMMIT")
        return results

    def _claim(self, job: Job) -> bool:
        """True if the job may run: its caller still waits and has budget left.
        Once claimed, a job is seen through even if its batch is run again."""
        if not job.started:
            with self._claims:
                if not job.abandoned and (job.deadline is None or time.monotonic() < job.deadline):
                    job.started = True
        return job.started

    def _run_one(self, cursor: Any, job: Job, isolated: bool) -> tuple[object, BaseException | None]:
        if not self._claim(job):
            return None, BudgetSpent()
        if not isolated:
            try:
                return job.work(self.TXN(cursor, self.tables)), None
            except Exception as error:
                if self._fails_batch(error):
                    raise  # the whole batch fails, reruns or waits
                raise Isolate() from error
        for _ in range(self.CONTENDED_RERUNS):
            cursor.execute("SAVEPOINT move")
            try:
                value = job.work(self.TXN(cursor, self.tables))
            except Contended:
                cursor.execute("ROLLBACK TO SAVEPOINT move")
                continue
            except Exception as error:
                if self._fails_batch(error):
                    raise
                cursor.execute("ROLLBACK TO SAVEPOINT move")  # the move's own failure: undo it alone
                return None, error
            cursor.execute("RELEASE SAVEPOINT move")
            return value, None
        cursor.execute("RELEASE SAVEPOINT move")
        return None, StoreUnavailable("the move lost every rerun to concurrent writers")


def name_os_thread() -> None:
    """Gives the calling thread its Python name in the operating system too
    (Linux: /proc's `comm`, 15 characters), so per-thread CPU figures (`top
    -H`, holdfast bench's) tell the store's threads from the event loop's."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(threading.current_thread().name[:15])
    except OSError:  # not Linux, or /proc is not there: names are a nicety
        pass


def _settle(future: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled); the outcome stays recorded
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _deliver(results: list[JobResult]) -> None:
    for future, value, error in results:
        _settle(future, value, error)


async def version_pages(store: Store, page: int = 1000) -> AsyncIterator[dict[str, int]]:
    """Every version of the snapshot's tables, a page per transaction: what
    a snapshot is rebuilt from after it lost writes."""
    after = ""
    while rows := await store.transact(_versions_after(after, page)):
        yield dict(rows)
        after = rows[-1][0]


def _versions_after(after: str, page: int) -> Callable[[Txn], list[tuple[str, int]]]:
    return lambda txn: txn.versions(after, page)
