"""The store of record: what a move may do inside its transaction, and the
group-commit machinery every SQL backend shares.

A move runs as one function over a `Txn` inside one store transaction: the
idempotency record, the version compare-and-set, the stock effect and the
outcome commit together or not at all. Concurrent moves share a transaction
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
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from holdfast.machine import INTENTS, State
from holdfast.redaction import scrub

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
SCHEMA_VERSION = 2


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
    """Rows a transaction will read. A backend that runs batches buffered
    (holdfast.batch) loads every job's rows with one statement per table
    instead of one per read; others ignore it. A row not named is still read,
    just on its own."""

    keys: tuple[bytes, ...] = ()
    reservations: tuple[str, ...] = ()
    skus: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()


@dataclass(slots=True)
class Stock:
    sku_id: str
    total: int
    available: int
    held: int
    sold: int
    version: int

    def check(self) -> None:
        assert self.available + self.held + self.sold == self.total, f"stock of {self.sku_id} does not add up: {self}"
        assert min(self.available, self.held, self.sold) >= 0, f"negative stock for {self.sku_id}: {self}"


@dataclass(slots=True)
class Reservation:
    reservation_id: str
    order_id: str
    sku_id: str
    quantity: int
    state: State
    version: int
    expires_at_ms: int
    retry_count: int = 0
    # Why it was released: the client's reason, or "hold expired" for the reaper.
    release_reason: str = ""


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


@dataclass(frozen=True, slots=True)
class Record:
    """A recorded outcome: `reason` None is success; `payload` the exact bytes."""

    fingerprint: bytes
    reason: str | None
    payload: bytes


class Txn(Protocol):
    """What a move may do inside its transaction. Every method is synchronous:
    it runs on a store thread, never on the event loop."""

    written: dict[str, int]

    def recorded(self, key: bytes) -> Record | None: ...
    def record(self, key: bytes, record: Record, now_ms: int) -> None: ...
    def stock(self, sku_id: str) -> Stock | None: ...
    def put_stock(self, stock: Stock) -> None: ...
    def take_stock(self, sku_id: str, quantity: int) -> bool: ...
    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None: ...
    def reservation(self, reservation_id: str) -> Reservation | None: ...
    def save_reservation(self, reservation: Reservation, expected_version: int) -> None: ...
    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]: ...
    def intents(self, limit: int) -> list[Reservation]: ...
    def versions(self, after: str, limit: int) -> list[tuple[str, int]]: ...
    def entity(self, entity_id: str) -> Entity | None: ...
    def save_entity(self, entity: Entity, expected_version: int) -> None: ...
    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]: ...


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def transact(
        self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None
    ) -> T: ...
    def describe(self) -> str: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku_id TEXT PRIMARY KEY,
    total {integer} NOT NULL CHECK (total >= 0),
    available {integer} NOT NULL CHECK (available >= 0),
    held {integer} NOT NULL CHECK (held >= 0),
    sold {integer} NOT NULL CHECK (sold >= 0),
    version {integer} NOT NULL,
    CHECK (available + held + sold = total)
);
CREATE TABLE IF NOT EXISTS reservation (
    reservation_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    sku_id TEXT NOT NULL,
    quantity {integer} NOT NULL CHECK (quantity > 0),
    state INTEGER NOT NULL,
    version {integer} NOT NULL,
    expires_at_ms {integer} NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    release_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reservation_due ON reservation (state, expires_at_ms);
CREATE TABLE IF NOT EXISTS outcome (
    key {blob} PRIMARY KEY,
    fingerprint {blob} NOT NULL,
    reason TEXT,
    payload {blob} NOT NULL,
    recorded_at_ms {integer} NOT NULL
);
CREATE TABLE IF NOT EXISTS entity (
    entity_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state INTEGER NOT NULL,
    version {integer} NOT NULL CHECK (version > 0),
    data {blob} NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until_ms {integer} NOT NULL DEFAULT 0,
    due_at_ms {integer} NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entity_due ON entity (kind, due_at_ms);
CREATE TABLE IF NOT EXISTS holdfast_schema (version INTEGER NOT NULL);
"""


def schema(integer: str, blob: str) -> str:
    """The tables (the invariant is a CHECK, so even a bug cannot store stock
    that does not add up), in a backend's names for 64-bit integers and bytes."""
    return _SCHEMA.format(integer=integer, blob=blob)


RESERVATION_COLUMNS = "reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms, retry_count, release_reason"


def row_of_reservation(r: Reservation) -> Row:
    """A reservation as RESERVATION_COLUMNS lists them."""
    return (r.reservation_id, r.order_id, r.sku_id, r.quantity, int(r.state), r.version, r.expires_at_ms,
            r.retry_count, r.release_reason)


def reservation_of_row(row: Row) -> Reservation:
    return Reservation(row[0], row[1], row[2], row[3], State(row[4]), *row[5:])


ENTITY_COLUMNS = "entity_id, kind, state, version, data, lease_owner, lease_until_ms, due_at_ms"


def row_of_entity(e: Entity) -> Row:
    """An entity as ENTITY_COLUMNS lists them."""
    return (e.entity_id, e.kind, e.state, e.version, e.data, e.lease_owner, e.lease_until_ms, e.due_at_ms)


def entity_of_row(row: Sequence[Any]) -> Entity:
    """The inverse of `row_of_entity`; drivers may hand `data` back as a buffer, not bytes."""
    return Entity(row[0], row[1], row[2], row[3], bytes(row[4]), row[5], row[6], row[7])


class SqlTxn:
    """`Txn` over a DB-API cursor, inside the batch's transaction.

    The SQL is written once with `%s` placeholders; a backend's subclass sets
    its placeholder and whether reads inside a move lock the row they read.
    """

    PLACEHOLDER: ClassVar[str] = "%s"
    LOCK: ClassVar[str] = ""  # " FOR UPDATE" where concurrent writers exist
    _translated: ClassVar[dict[str, str]]

    __slots__ = ("_cursor", "written", "_reservations", "_entities")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._translated = {}

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.written: dict[str, int] = {}
        # Rows this move has read or written: the engine's version check and
        # the move itself read the same reservation, and one read (one round
        # trip, one row lock) serves both. A Txn lives for one move attempt.
        self._reservations: dict[str, Reservation | None] = {}
        self._entities: dict[str, Entity | None] = {}

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
            "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING",
            (key, record.fingerprint, record.reason, record.payload, now_ms),
        )
        if cursor.rowcount != 1:
            raise Contended("the idempotency key was recorded by a concurrent move")

    def stock(self, sku_id: str) -> Stock | None:
        row = self._execute(
            "SELECT sku_id, total, available, held, sold, version FROM stock WHERE sku_id = %s" + self.LOCK, (sku_id,)
        ).fetchone()
        return None if row is None else Stock(*row)

    def put_stock(self, stock: Stock) -> None:
        stock.check()
        self._execute(
            "INSERT INTO stock (sku_id, total, available, held, sold, version) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (sku_id) DO UPDATE SET total = excluded.total, available = excluded.available,"
            " held = excluded.held, sold = excluded.sold, version = excluded.version",
            (stock.sku_id, stock.total, stock.available, stock.held, stock.sold, stock.version),
        )

    def take_stock(self, sku_id: str, quantity: int) -> bool:
        """Conditional hold: racing reserves of one SKU never conflict, the
        ones that find too little stock simply do not take it."""
        assert quantity > 0
        cursor = self._execute(
            "UPDATE stock SET available = available - %s, held = held + %s, version = version + 1"
            " WHERE sku_id = %s AND available >= %s",
            (quantity, quantity, sku_id, quantity),
        )
        taken: bool = cursor.rowcount == 1
        return taken

    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None:
        column = "sold" if sold else "available"
        cursor = self._execute(
            f"UPDATE stock SET held = held - %s, {column} = {column} + %s, version = version + 1"
            " WHERE sku_id = %s AND held >= %s",
            (quantity, quantity, sku_id, quantity),
        )
        assert cursor.rowcount == 1, f"settling {quantity} of {sku_id} that is not held"

    def reservation(self, reservation_id: str) -> Reservation | None:
        if reservation_id in self._reservations:
            return self._reservations[reservation_id]
        row = self._execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservation WHERE reservation_id = %s" + self.LOCK, (reservation_id,)
        ).fetchone()
        found = None if row is None else reservation_of_row(row)
        self._reservations[reservation_id] = found
        return found

    def save_reservation(self, r: Reservation, expected_version: int) -> None:
        """Compare-and-set on the version; a new reservation expects version 0.
        A lost race raises `Contended`, so the move reruns on the winner's state."""
        assert r.version == expected_version + 1, "a move advances the version by exactly one"
        values = (r.order_id, r.sku_id, r.quantity, int(r.state), r.version, r.expires_at_ms, r.retry_count, r.release_reason, r.reservation_id)
        if expected_version == 0:
            cursor = self._execute(
                "INSERT INTO reservation (order_id, sku_id, quantity, state, version, expires_at_ms,"
                " retry_count, release_reason, reservation_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (reservation_id) DO NOTHING",
                values,
            )
        else:
            cursor = self._execute(
                "UPDATE reservation SET order_id = %s, sku_id = %s, quantity = %s, state = %s, version = %s,"
                " expires_at_ms = %s, retry_count = %s, release_reason = %s WHERE reservation_id = %s AND version = %s",
                (*values, expected_version),
            )
        if cursor.rowcount != 1:
            raise Contended(f"reservation {r.reservation_id} moved past version {expected_version}")
        self.written[r.reservation_id] = r.version
        self._reservations[r.reservation_id] = r

    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]:
        rows = self._execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservation WHERE state = %s AND expires_at_ms <= %s"
            " ORDER BY expires_at_ms, reservation_id LIMIT %s",
            (int(State.RESERVED), now_ms, limit),
        ).fetchall()
        return [reservation_of_row(row) for row in rows]

    def intents(self, limit: int) -> list[Reservation]:
        states = tuple(sorted(int(s) for s in INTENTS))
        rows = self._execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservation WHERE state IN (%s, %s, %s) ORDER BY reservation_id LIMIT %s",
            (*states, limit),
        ).fetchall()
        return [reservation_of_row(row) for row in rows]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        """Reservations' and entities' versions in one id order (their ids
        never collide: reservation ids start with "rsv_"), as the snapshot
        holds both."""
        rows = self._execute(
            "SELECT reservation_id, version FROM reservation WHERE reservation_id > %s"
            " UNION ALL SELECT entity_id, version FROM entity WHERE entity_id > %s ORDER BY 1 LIMIT %s",
            (after, after, limit),
        ).fetchall()
        return [(row_id, version) for row_id, version in rows]

    # -- entities of services built on the framework --

    def entity(self, entity_id: str) -> Entity | None:
        """One entity, locked like a reservation; one read serves the
        engine's version check and the move alike."""
        if entity_id in self._entities:
            return self._entities[entity_id]
        row = self._execute(f"SELECT {ENTITY_COLUMNS} FROM entity WHERE entity_id = %s" + self.LOCK, (entity_id,)).fetchone()
        found = None if row is None else entity_of_row(row)
        self._entities[entity_id] = found
        return found

    def save_entity(self, entity: Entity, expected_version: int) -> None:
        """Compare-and-set on the version, as `save_reservation`: a new
        entity expects version 0, a lost race raises `Contended`. The kind is
        written once, on insert: a machine never turns into another."""
        assert entity.version == expected_version + 1, "a move advances the version by exactly one"
        cached = self._entities.get(entity.entity_id)
        assert cached is None or cached.kind == entity.kind, f"entity {entity.entity_id} would change its kind"
        if expected_version == 0:
            cursor = self._execute(
                f"INSERT INTO entity ({ENTITY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (entity_id) DO NOTHING",
                row_of_entity(entity),
            )
        else:
            cursor = self._execute(
                "UPDATE entity SET state = %s, version = %s, data = %s, lease_owner = %s, lease_until_ms = %s,"
                " due_at_ms = %s WHERE entity_id = %s AND version = %s",
                (*row_of_entity(entity)[2:], entity.entity_id, expected_version),
            )
        if cursor.rowcount != 1:
            raise Contended(f"entity {entity.entity_id} moved past version {expected_version}")
        self.written[entity.entity_id] = entity.version
        self._entities[entity.entity_id] = entity

    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]:
        """The entities of `kind` whose timeout is due, oldest first: what a
        reaper fires timeout events for (due_at_ms 0 means no timeout)."""
        rows = self._execute(
            f"SELECT {ENTITY_COLUMNS} FROM entity WHERE kind = %s AND due_at_ms > 0 AND due_at_ms <= %s"
            " ORDER BY due_at_ms, entity_id LIMIT %s",
            (kind, now_ms, limit),
        ).fetchall()
        return [entity_of_row(row) for row in rows]


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
    # What would give the connection's password away in a driver's error
    # text (holdfast.redaction.secrets_of): a backend with one sets it.
    secrets: tuple[str, ...] = ()

    def __init__(self, workers: int = 1, batch_max: int = 256) -> None:
        assert workers > 0 and batch_max > 0
        self._workers = workers
        self._batch_max = batch_max
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._claims = threading.Lock()

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
            thread = threading.Thread(
                target=self._serve, args=(connection if n == 0 else None,), name=f"holdfast-store-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    async def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
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
            # Every step so far only adds tables (2: entity), which the
            # schema's CREATE ... IF NOT EXISTS has just made.
            cursor.execute(f"UPDATE holdfast_schema SET version = {SCHEMA_VERSION}")
        elif found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.describe()} has schema version {found}, newer than this holdfast's {SCHEMA_VERSION}; upgrade holdfast"
            )

    # -- the worker -------------------------------------------------------------------

    def _serve(self, connection: Any) -> None:
        loop = self._loop
        assert loop is not None, "workers start in open(), which sets the loop"
        try:
            while (batch := self._next_batch()) is not None:
                connection, results = self._run_batch(connection, batch)
                loop.call_soon_threadsafe(_deliver, results)
        finally:
            if connection is not None:
                connection.close()

    def _next_batch(self) -> list[Job] | None:
        first = self._jobs.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._batch_max:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close: finish this batch, then stop
                self._jobs.put(None)
                break
            batch.append(job)
        return batch

    def _run_batch(self, connection: Any, batch: list[Job]) -> tuple[Any, list[JobResult]]:
        for attempt in range(self.BATCH_RETRIES + 1):
            try:
                if connection is None:
                    connection = self._connect()
                return connection, self._transaction(connection, batch)
            except Exception as error:
                connection = self._after_failure(connection, error)
                if self._is_retryable(error) and attempt < self.BATCH_RETRIES:
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
        raise AssertionError("unreachable: the last attempt returns")

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

    def _transaction(self, connection: Any, batch: list[Job]) -> list[JobResult]:
        """Runs the batch the fast way; if any move fails, runs it again with
        a savepoint around each move so that the failure undoes that move alone."""
        cursor = connection.cursor()
        try:
            return self._fast(connection, batch)
        except Isolate:
            cursor.execute("ROLLBACK")
            return self._attempt(cursor, batch, isolated=True)

    def _fast(self, connection: Any, batch: list[Job]) -> list[JobResult]:
        """The batch in one transaction without savepoints (two round trips
        fewer per move). A backend may run it buffered instead (holdfast.batch)."""
        return self._attempt(connection.cursor(), batch, isolated=False)

    def _attempt(self, cursor: Any, batch: list[Job], isolated: bool) -> list[JobResult]:
        cursor.execute(self.BEGIN)
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
                return job.work(self.TXN(cursor)), None
            except Exception as error:
                if self._is_unavailable(error) or self._is_retryable(error):
                    raise  # the whole batch fails or reruns
                raise Isolate() from error
        for _ in range(self.CONTENDED_RERUNS):
            cursor.execute("SAVEPOINT move")
            try:
                value = job.work(self.TXN(cursor))
            except Contended:
                cursor.execute("ROLLBACK TO SAVEPOINT move")
                continue
            except Exception as error:
                if self._is_unavailable(error) or self._is_retryable(error):
                    raise
                cursor.execute("ROLLBACK TO SAVEPOINT move")  # the move's own failure: undo it alone
                return None, error
            cursor.execute("RELEASE SAVEPOINT move")
            return value, None
        cursor.execute("RELEASE SAVEPOINT move")
        return None, StoreUnavailable("the move lost every rerun to concurrent writers")


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
    """Every reservation's and entity's version, a page per transaction: what
    a snapshot is rebuilt from after it lost writes."""
    after = ""
    while rows := await store.transact(_versions_after(after, page)):
        yield dict(rows)
        after = rows[-1][0]


def _versions_after(after: str, page: int) -> Callable[[Txn], list[tuple[str, int]]]:
    return lambda txn: txn.versions(after, page)
