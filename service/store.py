"""The store of record, and its embedded backend on SQLite.

A move runs as one function over a `Txn` inside one store transaction: the
idempotency record, the version compare-and-set, the stock effect and the
outcome commit together or not at all. Concurrent moves share a transaction
(group commit): a dedicated thread drains the queue, runs each move under its
own SAVEPOINT so one move's failure never undoes another's, and commits once.
The event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, TypeVar

from service.machine import INTENTS, State

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store could not run or commit the transaction; nothing was changed."""


class BudgetSpent(Exception):
    """The call's budget ran out before its move started; nothing was changed."""


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


@dataclass(frozen=True, slots=True)
class Record:
    """A recorded outcome: `reason` None is success; `payload` the exact bytes."""

    fingerprint: bytes
    reason: str | None
    payload: bytes


class Txn(Protocol):
    """What a move may do inside its transaction. Every method is synchronous:
    it runs on the store's own thread, never on the event loop."""

    written: dict[str, int]

    def recorded(self, key: bytes) -> Record | None: ...
    def record(self, key: bytes, record: Record, now_ms: int) -> None: ...
    def stock(self, sku_id: str) -> Stock | None: ...
    def put_stock(self, stock: Stock) -> None: ...
    def take_stock(self, sku_id: str, quantity: int) -> bool: ...
    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None: ...
    def reservation(self, reservation_id: str) -> Reservation | None: ...
    def save_reservation(self, reservation: Reservation, expected_version: int) -> bool: ...
    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]: ...
    def intents(self, limit: int) -> list[Reservation]: ...
    def versions(self, after: str, limit: int) -> list[tuple[str, int]]: ...


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def transact(self, work: Callable[[Txn], T], deadline: float | None = None) -> T: ...
    def describe(self) -> str: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku_id TEXT PRIMARY KEY,
    total INTEGER NOT NULL CHECK (total >= 0),
    available INTEGER NOT NULL CHECK (available >= 0),
    held INTEGER NOT NULL CHECK (held >= 0),
    sold INTEGER NOT NULL CHECK (sold >= 0),
    version INTEGER NOT NULL,
    CHECK (available + held + sold = total)
);
CREATE TABLE IF NOT EXISTS reservation (
    reservation_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    sku_id TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    state INTEGER NOT NULL,
    version INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    release_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reservation_due ON reservation (state, expires_at_ms);
CREATE TABLE IF NOT EXISTS outcome (
    key BLOB PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    reason TEXT,
    payload BLOB NOT NULL,
    recorded_at_ms INTEGER NOT NULL
);
"""

_RESERVATION_COLUMNS = "reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms, retry_count, release_reason"


def _reservation(row: tuple) -> Reservation:
    return Reservation(row[0], row[1], row[2], row[3], State(row[4]), *row[5:])


class SqliteTxn:
    """`Txn` over one SQLite connection, inside the batch's transaction."""

    __slots__ = ("_db", "written")

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.written: dict[str, int] = {}

    def recorded(self, key: bytes) -> Record | None:
        row = self._db.execute("SELECT fingerprint, reason, payload FROM outcome WHERE key = ?", (key,)).fetchone()
        return None if row is None else Record(*row)

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        self._db.execute(
            "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms) VALUES (?, ?, ?, ?, ?)",
            (key, record.fingerprint, record.reason, record.payload, now_ms),
        )

    def stock(self, sku_id: str) -> Stock | None:
        row = self._db.execute(
            "SELECT sku_id, total, available, held, sold, version FROM stock WHERE sku_id = ?", (sku_id,)
        ).fetchone()
        return None if row is None else Stock(*row)

    def put_stock(self, stock: Stock) -> None:
        stock.check()
        self._db.execute(
            "INSERT INTO stock (sku_id, total, available, held, sold, version) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sku_id) DO UPDATE SET total = excluded.total, available = excluded.available,"
            " held = excluded.held, sold = excluded.sold, version = excluded.version",
            (stock.sku_id, stock.total, stock.available, stock.held, stock.sold, stock.version),
        )

    def take_stock(self, sku_id: str, quantity: int) -> bool:
        """Conditional hold: racing reserves of one SKU never conflict, the
        ones that find too little stock simply do not take it."""
        assert quantity > 0
        cursor = self._db.execute(
            "UPDATE stock SET available = available - ?1, held = held + ?1, version = version + 1"
            " WHERE sku_id = ?2 AND available >= ?1",
            (quantity, sku_id),
        )
        return cursor.rowcount == 1

    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None:
        column = "sold" if sold else "available"
        cursor = self._db.execute(
            f"UPDATE stock SET held = held - ?1, {column} = {column} + ?1, version = version + 1"
            " WHERE sku_id = ?2 AND held >= ?1",
            (quantity, sku_id),
        )
        assert cursor.rowcount == 1, f"settling {quantity} of {sku_id} that is not held"

    def reservation(self, reservation_id: str) -> Reservation | None:
        row = self._db.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservation WHERE reservation_id = ?", (reservation_id,)
        ).fetchone()
        return None if row is None else _reservation(row)

    def save_reservation(self, r: Reservation, expected_version: int) -> bool:
        """Compare-and-set on the version; a new reservation expects version 0."""
        assert r.version == expected_version + 1, "a move advances the version by exactly one"
        values = (r.order_id, r.sku_id, r.quantity, int(r.state), r.version, r.expires_at_ms, r.retry_count, r.release_reason, r.reservation_id)
        if expected_version == 0:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO reservation (order_id, sku_id, quantity, state, version, expires_at_ms,"
                " retry_count, release_reason, reservation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        else:
            cursor = self._db.execute(
                "UPDATE reservation SET order_id = ?, sku_id = ?, quantity = ?, state = ?, version = ?,"
                " expires_at_ms = ?, retry_count = ?, release_reason = ? WHERE reservation_id = ? AND version = ?",
                (*values, expected_version),
            )
        if cursor.rowcount != 1:
            return False
        self.written[r.reservation_id] = r.version
        return True

    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]:
        rows = self._db.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservation WHERE state = ? AND expires_at_ms <= ?"
            " ORDER BY expires_at_ms, reservation_id LIMIT ?",
            (int(State.RESERVED), now_ms, limit),
        ).fetchall()
        return [_reservation(row) for row in rows]

    def intents(self, limit: int) -> list[Reservation]:
        marks = ", ".join("?" * len(INTENTS))
        rows = self._db.execute(
            f"SELECT {_RESERVATION_COLUMNS} FROM reservation WHERE state IN ({marks}) ORDER BY reservation_id LIMIT ?",
            (*sorted(int(s) for s in INTENTS), limit),
        ).fetchall()
        return [_reservation(row) for row in rows]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        return self._db.execute(
            "SELECT reservation_id, version FROM reservation WHERE reservation_id > ? ORDER BY reservation_id LIMIT ?",
            (after, limit),
        ).fetchall()


@dataclass(slots=True)
class _Job:
    work: Callable[[Txn], object]
    deadline: float | None
    future: asyncio.Future


class SqliteStore:
    """SQLite in WAL mode with `synchronous=FULL`: a reply is sent only after
    its transaction is durable, so a crash never loses an acknowledged move."""

    def __init__(self, path: str, batch_max: int = 256) -> None:
        assert batch_max > 0
        self.path = path
        self._batch_max = batch_max
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        return f"sqlite:///{self.path}"  # the URL that opens this file again

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="holdfast-sqlite", daemon=True)
        self._thread.start()
        await ready

    async def close(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    async def transact(self, work: Callable[[Txn], T], deadline: float | None = None) -> T:
        assert self._loop is not None, "store not open"
        future = self._loop.create_future()
        self._jobs.put(_Job(work, deadline, future))
        return await future

    def _serve(self, ready: asyncio.Future) -> None:
        try:
            db = self._connect()
        except sqlite3.Error as error:
            self._loop.call_soon_threadsafe(_settle, ready, None, StoreUnavailable(f"{self.path}: {error}"))
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            while (batch := self._next_batch()) is not None:
                results = self._run(db, batch)
                self._loop.call_soon_threadsafe(_deliver, results)
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        db.executescript(SCHEMA)
        return db

    def _next_batch(self) -> list[_Job] | None:
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

    def _run(self, db: sqlite3.Connection, batch: list[_Job]) -> list[tuple[asyncio.Future, object, BaseException | None]]:
        results: list[tuple[asyncio.Future, object, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for job in batch:
                results.append((job.future, *self._run_one(db, job)))
            db.execute("COMMIT")
        except sqlite3.Error as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            failed = StoreUnavailable(f"{self.path}: {error}")
            return [(job.future, None, failed) for job in batch]
        return results

    def _run_one(self, db: sqlite3.Connection, job: _Job) -> tuple[object, BaseException | None]:
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return None, BudgetSpent()
        db.execute("SAVEPOINT move")
        try:
            value = job.work(SqliteTxn(db))
        except Exception as error:  # the move's own failure: undo it alone
            db.execute("ROLLBACK TO move")
            db.execute("RELEASE move")
            if isinstance(error, sqlite3.Error):
                error = StoreUnavailable(f"{self.path}: {error}")
            return None, error
        db.execute("RELEASE move")
        return value, None


def _settle(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled); the outcome stays recorded
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _deliver(results: list[tuple[asyncio.Future, object, BaseException | None]]) -> None:
    for future, value, error in results:
        _settle(future, value, error)


async def version_pages(store: Store, page: int = 1000) -> AsyncIterator[dict[str, int]]:
    """Every reservation's version, a page per transaction: what a snapshot is
    rebuilt from after it lost writes."""
    after = ""
    while rows := await store.transact(lambda txn: txn.versions(after, page)):
        yield dict(rows)
        after = rows[-1][0]


def open_store(url: str) -> Store:
    """A store for `url`: `sqlite:///relative.db`, `sqlite:////absolute.db`."""
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"store URL {url!r} names no file")
        return SqliteStore(path)
    raise ValueError(f"unsupported store URL {url!r} (expected sqlite:///PATH)")
