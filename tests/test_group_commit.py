"""Group commit keeps every guarantee a move has on its own.

`GroupCommitStore` drains the moves queued while its worker was busy into one
batch: one transaction, one commit. These tests pin, through public APIs only
(`Store.transact`, the `Txn` methods, `Engine.move`, a real `holdfast serve`),
what batching must never change, whatever the batch does inside (how it reads
rows, how it flushes writes):

* a batch commits as a whole, and each move sees the moves queued before it;
* one move's failure undoes that move alone;
* a recorded key replays its exact bytes, inside a batch or across batches,
  and a key submitted twice in one batch is applied once;
* a crash mid-batch loses only unacknowledged moves, never part of a batch.

Forming a batch without reaching inside: a first transaction holds the worker
(its work waits on a `threading.Event`), the moves under test are submitted
meanwhile (the store is wrapped to count what it was handed), then the worker
is released and drains them together. Stores run one worker, as by default.

Reading the database from outside the store (a plain connection, like
tests/load.py) is the one thing here below the public API: it is how "not
visible until the batch commits" and "no partial batch after a crash" can be
seen at all. It reads the tables, never the batch machinery.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, replace

import grpc
import psycopg
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast import metrics
from holdfast.clock import ManualClock
from holdfast.engine import Engine, Move
from holdfast.apps.inventory import InventoryReason, reservation_id
from holdfast.backends import open_snapshot, open_store
from holdfast.apps.inventory_machine import State
from holdfast.outcome import AnyReason, Outcome, Reason, failure, success
from holdfast.sqlite import SqliteStore
from holdfast.store import (
    Contended,
    Record,
    Store,
    StoreUnavailable,
    Txn,
    version_pages,
)
from holdfast.apps.inventory_store import RESERVATIONS, TABLES, Reservation, Stock, put_stock, reservation, save_reservation, settle_stock, stock, take_stock
from tests.load import Answer, invoke
from tests.process import ServerProcess, start_server

SKU = "sku-batch"
TOTAL = 100
HELD = "rsv-held"  # a reservation made before the batch under test, holding 2 units
NOW_MS = 1_700_000_000_000
HOLD_MS = 60_000
TIMEOUT_S = 30.0  # generous: a wait that takes this long is a hang, not slowness


# -- forming one batch through the public API ------------------------------------


class CountingStore:
    """A `Store` that hands everything to another and counts the transactions
    it was given: `transact` queues its job before its first await, so once
    the count is reached, every job is queued."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.submitted = 0

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        return self.inner.describe()

    async def transact(self, work, deadline=None, prefetch=None):
        self.submitted += 1
        return await self.inner.transact(work, deadline, prefetch)


class _Busy:
    """A transaction whose work holds the store's worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    def work(self, txn: Txn) -> None:
        self.entered.set()
        if not self.released.wait(TIMEOUT_S):
            raise TimeoutError("the test never released the store's worker")


async def in_one_batch(stores: Sequence[CountingStore], calls: Sequence[Awaitable], submits: Sequence[int] | None = None) -> list:
    """Runs `calls` (coroutines that use `stores`) while each store's worker is
    held, so that each store drains them as one batch; returns their results
    (or exceptions) in order.

    They queue in the order given: a call starts once the one before it has
    handed over its transactions (an engine move reads the snapshot first, and
    Redis answers concurrent reads in any order). `submits`: how many
    transactions each call hands over (default 1; 0 for a call refused before
    it reaches the store)."""
    submits = [1] * len(calls) if submits is None else submits
    busy = [_Busy() for _ in stores]
    holding: list[asyncio.Task] = []
    tasks: list[asyncio.Task] = []

    def submitted() -> int:
        return sum(store.submitted for store in stores)

    try:
        for store, gate in zip(stores, busy):
            holding.append(asyncio.create_task(store.transact(gate.work)))
            assert await asyncio.to_thread(gate.entered.wait, TIMEOUT_S), "the store's worker never started"
        start = submitted()
        for call, n in zip(calls, submits):
            queued = submitted() + n
            tasks.append(task := asyncio.create_task(call))
            async with asyncio.timeout(TIMEOUT_S):
                while submitted() < queued and not task.done():
                    await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # a refused call (submits 0) answers on its first turn
        handed = submitted() - start
        assert handed == sum(submits), f"the calls handed over {handed} transactions, not {sum(submits)}"
    finally:
        for gate in busy:
            gate.released.set()
        for call in calls[len(tasks):]:
            call.close()  # never started
        await asyncio.gather(*holding, return_exceptions=True)
    async with asyncio.timeout(TIMEOUT_S):  # a worker that died leaves its batch unanswered: fail, never hang
        return await asyncio.gather(*tasks, return_exceptions=True)


# -- the database, read from outside the store ------------------------------------------


def read_outside(url: str, sql: str) -> list[tuple]:
    """Rows of `sql` over a plain connection of its own: what other clients see."""
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path)) as db:
            return db.execute(sql).fetchall()
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as db:
        return db.execute(sql).fetchall()


@dataclass(frozen=True)
class Books:
    stock: tuple[int, int, int, int, int]  # total, available, held, sold, version
    reservations: dict[str, tuple[str, int, int, int]]  # id -> sku, quantity, state, version
    outcome_keys: frozenset[bytes]


BOOKS_QUERIES = (
    "SELECT total, available, held, sold, version FROM stock WHERE sku_id = {sku}",
    "SELECT reservation_id, sku_id, quantity, state, version FROM reservation",
    "SELECT key FROM outcome",
)


def read_books(url: str, sku_id: str) -> Books:
    """The three tables in one snapshot: read one by one, a commit landing
    between two reads would show a batch half done that never was."""
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path, isolation_level=None)) as db:
            db.execute("BEGIN")
            stock, rows, keys = (db.execute(q.format(sku="?"), (sku_id,) if "{sku}" in q else ()).fetchall()
                                 for q in BOOKS_QUERIES)
            db.execute("COMMIT")
    else:
        with psycopg.connect(url, connect_timeout=10) as db:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            stock, rows, keys = (db.execute(q.format(sku="%s"), (sku_id,) if "{sku}" in q else ()).fetchall()
                                 for q in BOOKS_QUERIES)
    return Books(
        tuple(stock[0]) if stock else (),
        {row[0]: tuple(row[1:]) for row in rows},
        frozenset(bytes(key) for (key,) in keys),
    )


def wait_sessions_gone(url: str) -> None:
    """Waits until no other session is connected to the database. A killed
    server's PostgreSQL session still runs what it had received, a pipelined
    COMMIT included, until it notices the socket is gone."""
    if url.startswith("sqlite://"):
        return  # in-process: the writes died with the server
    deadline = time.monotonic() + TIMEOUT_S
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    while read_outside(url, query)[0][0]:
        assert time.monotonic() < deadline, "the killed server's sessions did not end"
        time.sleep(0.05)


# -- stores ------------------------------------------------------------------------------


@pytest.fixture
async def store(store_url):
    opened = CountingStore(open_store(store_url, tables=TABLES))
    await opened.open()
    await opened.transact(lambda txn: put_stock(txn, Stock(SKU, TOTAL, TOTAL, 0, 0, 1)))
    yield opened
    await opened.close()


def _key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def _hold(rid: str, quantity: int = 1, version: int = 1, state: State = State.RESERVED) -> Reservation:
    return Reservation(rid, f"order-{rid}", SKU, quantity, state, version, NOW_MS + HOLD_MS)


def _reserving(rid: str) -> Callable[[Txn], str]:
    """A move's work as the engine would do it: take one unit, save the
    reservation, record its outcome under its key."""

    def work(txn: Txn) -> str:
        assert take_stock(txn, SKU, 1)
        save_reservation(txn, _hold(rid), 0)
        txn.record(_key(rid), Record(b"fp", None, rid.encode()), NOW_MS)
        return rid

    return work


async def _stock(store) -> Stock:
    return await store.transact(lambda txn: stock(txn, SKU))


async def _reservations(store, rids) -> dict[str, Reservation | None]:
    return await store.transact(lambda txn: {rid: reservation(txn, rid) for rid in rids})


async def _records(store, keys) -> list[Record | None]:
    return await store.transact(lambda txn: [txn.recorded(key) for key in keys])


# -- store: a batch is one transaction --------------------------------------------------


async def test_queued_moves_commit_together_as_one_batch(store, store_url):
    """The last move of a batch sees every move before it, while a client
    outside sees none of them: they share one transaction, uncommitted until
    the batch commits. Then all of them are there."""
    rids = [f"r{n}" for n in range(12)]
    inside, looked = threading.Event(), threading.Event()
    seen_inside: list[int] = []

    def last(txn: Txn) -> str:
        seen_inside.append(stock(txn, SKU).available)
        inside.set()
        if not looked.is_set():
            assert looked.wait(TIMEOUT_S)
        return "last"

    batch = asyncio.create_task(in_one_batch([store], [*(store.transact(_reserving(r)) for r in rids), store.transact(last)]))
    try:
        assert await asyncio.to_thread(inside.wait, TIMEOUT_S), "the batch's last move never ran"
        during = await asyncio.to_thread(read_books, store_url, SKU)
    finally:
        looked.set()
    results = await batch
    after = await asyncio.to_thread(read_books, store_url, SKU)

    assert results == [*rids, "last"]
    assert seen_inside == [TOTAL - len(rids)]
    assert (during.stock, during.reservations, during.outcome_keys) == ((TOTAL, TOTAL, 0, 0, 1), {}, frozenset())
    assert after.stock == (TOTAL, TOTAL - len(rids), len(rids), 0, 1 + len(rids))
    assert set(after.reservations) == set(rids)
    assert after.outcome_keys == {_key(r) for r in rids}


async def test_batch_of_moves_takes_one_postgresql_transaction(postgres_url):
    """Thirty-two moves in one batch take one transaction id, not thirty-two.

    Measured by transaction ids (txid_current() from outside, before and
    after), not by pg_stat_database.xact_commit: backends flush those counters
    lazily (PostgreSQL 15 waits up to a second, an idle backend up to ten),
    so a before/after read races the flush and can even miss the batch.
    A transaction id is taken when the batch first writes, whatever the
    statistics do. The counter is cluster-wide; the slack of two covers an
    autovacuum ANALYZE that happens to take one meanwhile.
    """
    store = CountingStore(open_store(postgres_url, tables=TABLES))
    await store.open()
    try:
        await store.transact(lambda txn: put_stock(txn, Stock(SKU, TOTAL, TOTAL, 0, 0, 1)))
        rids = [f"r{n}" for n in range(32)]
        before = (await asyncio.to_thread(read_outside, postgres_url, "SELECT txid_current()"))[0][0]
        results = await in_one_batch([store], [store.transact(_reserving(r)) for r in rids])
        after = (await asyncio.to_thread(read_outside, postgres_url, "SELECT txid_current()"))[0][0]
        assert results == rids
        assert await _stock(store) == Stock(SKU, TOTAL, TOTAL - 32, 32, 0, 33)
    finally:
        await store.close()
    taken = after - before - 1  # the second txid_current() takes one itself
    assert 1 <= taken <= 3, f"{len(rids)} moves in one batch took {taken} transaction ids"


async def test_each_move_in_a_batch_sees_the_moves_queued_before_it(store):
    """Writes of earlier moves in the batch are what later moves read: stock
    taken, a reservation created then advanced, a key recorded then found,
    even when a move before them read the same rows (a read must never be
    served from before the writes that precede it)."""
    record = Record(b"fp", None, b"reply")

    def create(txn: Txn) -> str:
        save_reservation(txn, _hold("r1", quantity=3), 0)
        txn.record(_key("r1"), record, NOW_MS)
        return "created"

    def advance(txn: Txn) -> int:
        found = reservation(txn, "r1")
        save_reservation(txn, replace(found, state=State.RELEASING, version=2), 1)
        return found.version

    works = [
        lambda txn: stock(txn, SKU),
        lambda txn: reservation(txn, "r1"),
        lambda txn: txn.recorded(_key("r1")),
        lambda txn: take_stock(txn, SKU, 40),
        lambda txn: take_stock(txn, SKU, 40),
        create,
        lambda txn: take_stock(txn, SKU, 15),
        lambda txn: take_stock(txn, SKU, 15),  # only 5 are left
        advance,
        lambda txn: txn.recorded(_key("r1")),
        lambda txn: stock(txn, SKU),
    ]
    results = await in_one_batch([store], [store.transact(w) for w in works])
    assert results == [
        Stock(SKU, TOTAL, TOTAL, 0, 0, 1), None, None,
        True, True, "created", True, False, 1, record, Stock(SKU, TOTAL, 5, 95, 0, 4),
    ]
    assert await _stock(store) == Stock(SKU, TOTAL, 5, 95, 0, 4)
    assert (await _reservations(store, ["r1"]))["r1"] == _hold("r1", quantity=3, version=2, state=State.RELEASING)


# -- store: one move's failure undoes that move alone -----------------------------------


def _raises(txn: Txn) -> None:
    assert take_stock(txn, SKU, 4)
    raise RuntimeError("the move's own failure")


def _loses_every_compare_and_set(txn: Txn) -> None:
    assert take_stock(txn, SKU, 4)
    save_reservation(txn, _hold(HELD, quantity=2, version=4, state=State.CONFIRMED), 3)  # it is at version 1


def _records_a_recorded_key(txn: Txn) -> None:
    assert take_stock(txn, SKU, 4)
    txn.record(_key(HELD), Record(b"other", None, b"other reply"), NOW_MS)


def _settles_what_nobody_holds(txn: Txn) -> None:
    assert take_stock(txn, SKU, 4)
    settle_stock(txn, SKU, TOTAL * 2, sold=True)


def _violates_a_check_constraint(txn: Txn) -> None:
    assert take_stock(txn, SKU, 4)
    save_reservation(txn, _hold("r-empty", quantity=0), 0)  # the table says quantity > 0


# One row per way a move's work fails, after taking stock in the shared transaction,
# with what its caller receives.
FAILING_WORK = [
    pytest.param(_raises, RuntimeError, id="raises-in-its-work"),
    pytest.param(_settles_what_nobody_holds, AssertionError, id="trips-a-store-assertion"),
    pytest.param(_loses_every_compare_and_set, StoreUnavailable, id="loses-every-compare-and-set"),
    pytest.param(_records_a_recorded_key, StoreUnavailable, id="records-a-key-already-recorded"),
    pytest.param(_violates_a_check_constraint, Exception, id="violates-a-check-constraint"),
]


@pytest.mark.parametrize("fail, raised", FAILING_WORK)
async def test_batch_with_one_failing_move_commits_the_others(store, store_url, fail, raised):
    held_record = Record(b"fp", None, b"held reply")

    def seed(txn: Txn) -> None:
        assert take_stock(txn, SKU, 2)
        save_reservation(txn, _hold(HELD, quantity=2), 0)
        txn.record(_key(HELD), held_record, NOW_MS)

    await store.transact(seed)
    rids = [f"r{n}" for n in range(6)]
    works = [_reserving(r) for r in rids[:3]] + [fail] + [_reserving(r) for r in rids[3:]]
    results = await in_one_batch([store], [store.transact(w) for w in works])

    assert isinstance(results[3], raised), results[3]
    assert results[:3] + results[4:] == rids
    assert await _stock(store) == Stock(SKU, TOTAL, TOTAL - 2 - 6, 2 + 6, 0, 2 + 6)
    found = await _reservations(store, [HELD, "r-empty", *rids])
    assert found == {HELD: _hold(HELD, quantity=2), "r-empty": None, **{r: _hold(r) for r in rids}}
    assert await _records(store, [_key(HELD), *map(_key, rids)]) == [
        held_record, *(Record(b"fp", None, r.encode()) for r in rids)
    ]


async def test_move_that_loses_races_in_a_batch_reruns_and_commits_once(store):
    """A compare-and-set lost twice in a row (other instances moved first)
    reruns the move on the new state: its lost attempts' effects are undone,
    the third commits, and the batch's other moves commit exactly once."""
    attempts: list[int] = []

    def loses_two_races(txn: Txn) -> str:
        assert take_stock(txn, SKU, 10)
        attempts.append(stock(txn, SKU).available)
        if len(attempts) <= 2:
            raise Contended("a concurrent writer won")
        return "won"

    rids = [f"r{n}" for n in range(4)]
    works = [_reserving(r) for r in rids[:2]] + [loses_two_races] + [_reserving(r) for r in rids[2:]]
    results = await in_one_batch([store], [store.transact(w) for w in works])

    assert results == [*rids[:2], "won", *rids[2:]]
    assert len(attempts) >= 3 and attempts[-1] == TOTAL - 2 - 10  # earlier moves once, its own take once
    assert await _stock(store) == Stock(SKU, TOTAL, TOTAL - 14, 14, 0, 6)
    assert await _records(store, [_key(r) for r in rids]) == [Record(b"fp", None, r.encode()) for r in rids]


# -- engine: moves, replays and conflicts inside a batch ------------------------------------


@pytest.fixture(params=["sqlite-memory", "sqlite-redis", "postgresql-memory", "postgresql-redis"])
def backends(request, tmp_path) -> tuple[str, str]:
    store_kind, snapshot_kind = request.param.split("-")
    store_url = f"sqlite:///{tmp_path}/store.db" if store_kind == "sqlite" else request.getfixturevalue("postgres_url")
    snapshot_url = "memory://" if snapshot_kind == "memory" else request.getfixturevalue("redis_url")
    return store_url, snapshot_url


async def _open_engine(store_url: str, snapshot_url: str) -> Engine:
    store = CountingStore(open_store(store_url, tables=TABLES))
    snapshot = open_snapshot(snapshot_url)
    await store.open()
    await snapshot.open(lambda: version_pages(store))
    return Engine(store, snapshot, ManualClock(NOW_MS))


async def _close_engine(engine: Engine) -> None:
    await engine.snapshot.close()
    await engine.store.close()


@pytest.fixture
async def engine(backends):
    """An engine with stock of SKU and the reservation HELD (2 units) made
    through it, so its snapshot knows HELD at version 1."""
    opened = await _open_engine(*backends)
    try:
        await opened.store.transact(lambda txn: put_stock(txn, Stock(SKU, TOTAL, TOTAL, 0, 0, 1)))
        made = await opened.move(reserve("held", 2))
        assert made.ok and await opened.snapshot.version(HELD) == 1
        yield opened
    finally:
        await _close_engine(opened)


def reserve(name: str, quantity: int = 1) -> Move:
    rid = f"rsv-{name}"

    def apply(txn: Txn, now_ms: int) -> Outcome:
        if not take_stock(txn, SKU, quantity):
            return failure(InventoryReason.INSUFFICIENT_STOCK, f"{SKU} has fewer than {quantity} units available")
        save_reservation(txn, Reservation(rid, name, SKU, quantity, State.RESERVED, 1, now_ms + HOLD_MS), 0)
        return success(f"{rid} holds {quantity} until {now_ms + HOLD_MS}".encode())

    return Move("/test/Reserve", _key(f"reserve:{name}"), b"quantity=%d" % quantity, rid, apply, RESERVATIONS)


def settle(rid: str, sold: bool) -> Move:
    """Confirm (sold) or Release a reservation, double-checked on its version."""
    method, target = ("/test/Confirm", State.CONFIRMED) if sold else ("/test/Release", State.RELEASED)

    def apply(txn: Txn, now_ms: int) -> Outcome:
        found = reservation(txn, rid)
        if found is None or found.state != State.RESERVED:
            return failure(Reason.INVALID_TRANSITION, f"{rid} is not held")
        settle_stock(txn, found.sku_id, found.quantity, sold=sold)
        save_reservation(txn, replace(found, state=target, version=found.version + 1), found.version)
        return success(f"{rid} {target.name} at version {found.version + 1}".encode())

    return Move(method, _key(f"{method}:{rid}"), method.encode(), rid, apply, RESERVATIONS)


def _raising_move() -> Move:
    def apply(txn: Txn, now_ms: int) -> Outcome:
        assert take_stock(txn, SKU, 4)
        raise RuntimeError("the move's own failure")

    return Move("/test/Broken", _key("broken"), b"fp", None, apply)


def _stale_move() -> Move:
    """Writes HELD at a version it never read: loses every compare-and-set."""

    def apply(txn: Txn, now_ms: int) -> Outcome:
        assert take_stock(txn, SKU, 4)
        save_reservation(txn, _hold(HELD, quantity=2, version=4, state=State.CONFIRMED), 3)
        return success(b"never")

    return Move("/test/Stale", _key("stale"), b"fp", None, apply)


@dataclass(frozen=True)
class Failing:
    move: Callable[[], Move]
    answer: AnyReason | type[Exception]
    recorded: bool  # its outcome is recorded under its key
    snapshot_ahead: bool = False  # HELD's snapshot entry set past the store's version first


# One row per way a move of the batch fails, in the order of the engine's steps.
FAILING_MOVES = {
    "version-conflict-snapshot-ahead": Failing(lambda: settle(HELD, sold=True), Reason.VERSION_CONFLICT, False, True),
    "raises-in-its-work": Failing(_raising_move, RuntimeError, False),
    "loses-every-compare-and-set": Failing(_stale_move, Reason.DEPENDENCY_UNAVAILABLE, False),
    "insufficient-stock": Failing(lambda: reserve("greedy", TOTAL * 10), InventoryReason.INSUFFICIENT_STOCK, True),
}


async def _engine_books(engine: Engine, moves: Sequence[Move]) -> tuple[Stock, dict, list]:
    rids = [HELD, *(m.entity for m in moves if m.entity)]
    return (
        await _stock(engine.store),
        await _reservations(engine.store, rids),
        await _records(engine.store, [m.key for m in moves]),
    )


@pytest.mark.parametrize("row", FAILING_MOVES.values(), ids=FAILING_MOVES.keys())
async def test_batch_with_one_failing_engine_move_commits_the_others(engine, row):
    if row.snapshot_ahead:
        await engine.snapshot.reset(HELD, 7)  # ahead of the store, as after a restore of the store
    good = [reserve(f"good-{n}") for n in range(6)]
    bad = row.move()
    outcomes = await in_one_batch([engine.store], [engine.move(m) for m in [*good[:3], bad, *good[3:]]])
    answer = outcomes.pop(3)

    if isinstance(row.answer, AnyReason):
        assert answer.reason is row.answer, answer
    else:
        assert isinstance(answer, row.answer), answer
    assert all(o.ok and not o.replayed for o in outcomes), outcomes
    stock, found, records = await _engine_books(engine, [*good, bad])
    assert stock == Stock(SKU, TOTAL, TOTAL - 2 - 6, 2 + 6, 0, 2 + 6)
    assert found[HELD] == Reservation(HELD, "held", SKU, 2, State.RESERVED, 1, NOW_MS + HOLD_MS)
    assert all(found[m.entity].version == 1 for m in good)
    assert [r.payload for r in records[:6]] == [o.payload for o in outcomes]
    if row.recorded:
        assert records[6] == Record(bad.fingerprint, answer.reason.name, answer.payload)
        assert found[bad.entity] is None
    else:
        assert records[6] is None
    assert await engine.snapshot.version(HELD) == 1  # compensated, or never touched
    again = await asyncio.gather(*(engine.move(m) for m in good))
    assert [(o.replayed, o.payload) for o in again] == [(True, o.payload) for o in outcomes]


async def test_second_move_on_one_reservation_in_a_batch_answers_on_the_winners_state(engine):
    """Confirm and Release of one reservation in one batch (both double-checked
    against version 1): the first commits; the second finds the store moved
    on, the compensation catches the snapshot up and the move runs again on
    the confirmed hold. Its first answer is its final one, recorded: a retry
    replays it rather than learning something new."""
    good = [reserve(f"good-{n}") for n in range(4)]
    confirm, release = settle(HELD, sold=True), settle(HELD, sold=False)
    compensations = metrics.COMPENSATIONS._value.get()
    outcomes = await in_one_batch([engine.store], [engine.move(m) for m in [good[0], confirm, good[1], release, *good[2:]]])

    assert outcomes[1].ok and outcomes[3].reason is Reason.INVALID_TRANSITION, outcomes
    assert all(o.ok for o in outcomes[:1] + outcomes[2:3] + outcomes[4:])
    assert metrics.COMPENSATIONS._value.get() == compensations + 1
    stock, found, records = await _engine_books(engine, [*good, confirm, release])
    assert stock == Stock(SKU, TOTAL, TOTAL - 2 - 4, 4, 2, 1 + 1 + 4 + 1)
    assert (found[HELD].state, found[HELD].version) == (State.CONFIRMED, 2)
    assert records[4] == Record(confirm.fingerprint, None, outcomes[1].payload)
    assert records[5] == Record(release.fingerprint, "INVALID_TRANSITION", outcomes[3].payload)
    again = await engine.move(release)
    assert (again.reason, again.payload, again.replayed) == (Reason.INVALID_TRANSITION, outcomes[3].payload, True)
    assert await engine.snapshot.version(HELD) == 2


async def test_same_key_twice_in_a_batch_on_one_engine_runs_once_and_refuses_the_other_in_flight(engine):
    dup = reserve("dup", 3)
    others = [reserve(f"other-{n}") for n in range(4)]
    calls = [engine.move(dup), engine.move(dup), *(engine.move(m) for m in others)]
    outcomes = await in_one_batch([engine.store], calls, submits=[1, 0, *[1] * len(others)])  # refused: never queues

    assert (outcomes[0].ok, outcomes[0].replayed) == (True, False)
    assert outcomes[1].reason is Reason.REQUEST_IN_FLIGHT
    assert all(o.ok and not o.replayed for o in outcomes[2:])
    later = await engine.move(dup)
    assert (later.replayed, later.reason, later.payload) == (True, None, outcomes[0].payload)
    assert await _stock(engine.store) == Stock(SKU, TOTAL, TOTAL - 2 - 3 - 4, 2 + 3 + 4, 0, 2 + 1 + 4)


def _once_and_a_replay(first: Outcome, second: Outcome) -> Outcome:
    """Of two answers to one key: exactly one committed, the other replayed its bytes."""
    applied, replayed = sorted([first, second], key=lambda o: o.replayed)
    assert (applied.ok, applied.replayed, replayed.replayed) == (True, False, True), (first, second)
    assert (replayed.reason, replayed.payload) == (None, applied.payload)
    return applied


async def test_same_key_from_two_engines_in_one_batch_commits_once_and_replays_the_stored_bytes(engine):
    """Two engines on one store (no shared in-flight guard): both moves reach
    the same batch; the second finds the first's record in the batch's own
    transaction and replays it."""
    twin = Engine(engine.store, engine.snapshot, engine.clock)
    dup = reserve("dup", 3)
    others = [reserve(f"other-{n}") for n in range(4)]
    calls = [engine.move(dup), *(engine.move(m) for m in others[:2]), twin.move(dup), *(twin.move(m) for m in others[2:])]
    outcomes = await in_one_batch([engine.store], calls)

    applied = _once_and_a_replay(outcomes[0], outcomes[3])
    assert all(o.ok and not o.replayed for o in outcomes[1:3] + outcomes[4:])
    assert await _records(engine.store, [dup.key]) == [Record(dup.fingerprint, None, applied.payload)]
    assert await _stock(engine.store) == Stock(SKU, TOTAL, TOTAL - 2 - 3 - 4, 2 + 3 + 4, 0, 2 + 1 + 4)


async def test_same_key_from_two_instances_commits_once_and_replays_the_stored_bytes(postgres_url, redis_url):
    """Two instances on one PostgreSQL database (and one Redis), each draining
    its own batch at the same moment, each batch holding the same two keys in
    opposite orders: every key commits once, the losing instance replays the
    winner's bytes, and both batches' other moves commit."""
    first = await _open_engine(postgres_url, redis_url)
    second = await _open_engine(postgres_url, redis_url)
    try:
        await first.store.transact(lambda txn: put_stock(txn, Stock(SKU, TOTAL, TOTAL, 0, 0, 1)))
        dup_a, dup_b = reserve("dup-a", 3), reserve("dup-b", 5)
        mine = [reserve(f"first-{n}") for n in range(3)]
        theirs = [reserve(f"second-{n}") for n in range(3)]
        calls = [
            *(first.move(m) for m in [dup_a, *mine, dup_b]),
            *(second.move(m) for m in [dup_b, *theirs, dup_a]),
        ]
        outcomes = await in_one_batch([first.store, second.store], calls)

        applied_a = _once_and_a_replay(outcomes[0], outcomes[9])
        applied_b = _once_and_a_replay(outcomes[4], outcomes[5])
        assert all(o.ok and not o.replayed for o in outcomes[1:4] + outcomes[6:9]), outcomes
        records = await _records(first.store, [dup_a.key, dup_b.key])
        assert records == [Record(dup_a.fingerprint, None, applied_a.payload), Record(dup_b.fingerprint, None, applied_b.payload)]
        assert await _stock(first.store) == Stock(SKU, TOTAL, TOTAL - 3 - 5 - 6, 3 + 5 + 6, 0, 1 + 2 + 6)
    finally:
        await _close_engine(second)
        await _close_engine(first)


@pytest.mark.parametrize("first_answer", ["committed", "refused"])
async def test_key_recorded_in_an_earlier_batch_replays_inside_a_later_batch(engine, first_answer):
    """A key's first answer, success or a recorded refusal, is what a later
    batch replays, byte for byte, even when the stock would now allow it;
    the later batch's other moves commit."""
    early = reserve("early", 3 if first_answer == "committed" else TOTAL)
    first = await engine.move(early)
    assert first.ok == (first_answer == "committed") and not first.replayed

    def restock(txn: Txn) -> None:  # enough for anything now
        s = stock(txn, SKU)
        put_stock(txn, Stock(SKU, s.total + TOTAL, s.available + TOTAL, s.held, s.sold, s.version + 1))

    await engine.store.transact(restock)
    others = [reserve(f"later-{n}") for n in range(4)]
    outcomes = await in_one_batch([engine.store], [engine.move(m) for m in [*others[:2], early, *others[2:]]])

    replay = outcomes.pop(2)
    assert (replay.replayed, replay.reason, replay.payload) == (True, first.reason, first.payload)
    assert all(o.ok and not o.replayed for o in outcomes), outcomes
    taken = 2 + (3 if first.ok else 0) + 4
    versions = 1 + 1 + (1 if first.ok else 0) + 1 + 4
    assert await _stock(engine.store) == Stock(SKU, 2 * TOTAL, 2 * TOTAL - taken, taken, 0, versions)


# -- a real server killed mid-batch -----------------------------------------------------


CRASH_SKU = "sku-crash-batch"
CRASH_TOTAL = 1_000_000
CRASH_CLIENTS = 96  # calls in flight: the batches are as large as the load makes them
ACKED_BEFORE_KILL = 400
CALL_TIMEOUT_S = 20.0
# A first answer that says "nothing was done" or "may have been done": the
# call counts as unacknowledged, and its retry must replay or commit it once.
INCONCLUSIVE = {"BUDGET_EXCEEDED", "DEPENDENCY_UNAVAILABLE"}


async def reserve_until_killed(channel: grpc.aio.Channel, server: ServerProcess) -> tuple[list[Answer], int]:
    """Concurrent Reserves until enough are acknowledged, then SIGKILL with
    calls in flight. Returns every answer and how many calls were in flight."""
    answers: list[Answer] = []
    enough = asyncio.Event()
    killed = False
    in_flight = acked = 0

    async def client(c: int) -> None:
        nonlocal in_flight, acked
        rng = random.Random(c)
        n = 0
        while not killed:
            n += 1
            request = pb.ReserveRequest(
                order_id=f"order-{c}-{n}", sku_id=CRASH_SKU, quantity=rng.randint(1, 3), timestamp_ms=NOW_MS + n
            )
            in_flight += 1
            answer = await invoke(channel, server.target, "Reserve", request, CALL_TIMEOUT_S)
            in_flight -= 1
            answers.append(answer)
            acked += answer.ok
            if acked >= ACKED_BEFORE_KILL:
                enough.set()

    clients = [asyncio.create_task(client(c)) for c in range(CRASH_CLIENTS)]
    try:
        await asyncio.wait_for(enough.wait(), TIMEOUT_S)
        at_kill = in_flight
        killed = True
        server.send(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*clients), TIMEOUT_S)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return answers, at_kill


def check_no_partial_batch(books: Books) -> None:
    """Every reservation has its outcome record and every record its
    reservation (besides PutStock's); the stock counts each exactly once."""
    total, available, held, sold, version = books.stock
    assert available + held + sold == total == CRASH_TOTAL, books.stock
    assert sold == 0 and held == sum(q for _, q, _, _ in books.reservations.values()), books.stock
    assert all((sku, state, v) == (CRASH_SKU, int(State.RESERVED), 1) for sku, _, state, v in books.reservations.values())
    assert version == 1 + len(books.reservations), (books.stock, len(books.reservations))
    recorded_ids = {reservation_id(key) for key in books.outcome_keys}
    missing = set(books.reservations) - recorded_ids
    assert not missing, f"reservations without their outcome record: {sorted(missing)[:5]}"
    assert len(books.outcome_keys) == len(books.reservations) + 1, "an outcome record without its reservation"


@pytest.mark.parametrize("backend_pair", ["sqlite+memory", "postgresql+redis"])
async def test_sigkill_mid_batch_loses_only_unacknowledged_moves(backend_pair, tmp_path, request):
    """`holdfast serve` under many concurrent Reserves (large batches), SIGKILLed
    mid-load: the store then holds whole batches only, every acknowledged move
    among them; after a restart on the same store every acknowledged reply
    replays byte for byte and every other call commits exactly once."""
    if backend_pair == "sqlite+memory":
        store_url, snapshot_url, extra = f"sqlite:///{tmp_path}/h.db", "memory://", ()
    else:
        store_url, snapshot_url = request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url")
        extra = ("--store-pool", "2")  # two writers: two batches in flight at the kill
    servers: list[ServerProcess] = []
    try:
        first = start_server(store_url, snapshot=snapshot_url, extra=extra)
        servers.append(first)
        async with grpc.aio.insecure_channel(first.target) as channel:
            put = await invoke(channel, first.target, "PutStock",
                               pb.PutStockRequest(sku_id=CRASH_SKU, total=CRASH_TOTAL, request_id="stock"), CALL_TIMEOUT_S)
            assert put.ok, put.describe()
            answers, at_kill = await reserve_until_killed(channel, first)
        assert first.wait() == -signal.SIGKILL, first.output()
        assert at_kill > 0, "the kill must land while calls are in flight"

        acked = [a for a in answers if a.ok]
        unacked = [a for a in answers if not a.ok]
        assert all(not a.replayed for a in acked), "a first call answered as a replay"
        early = [a for a in unacked if a.reason and a.reason not in INCONCLUSIVE]
        assert not early, [a.describe() for a in early[:5]]

        await asyncio.to_thread(wait_sessions_gone, store_url)
        at_crash = await asyncio.to_thread(read_books, store_url, CRASH_SKU)
        check_no_partial_batch(at_crash)
        for answer in acked:
            reply = answer.parsed()
            assert at_crash.reservations.get(reply.reservation_id) == (CRASH_SKU, reply.quantity, int(State.RESERVED), 1)

        second = start_server(store_url, snapshot=snapshot_url, extra=extra)
        servers.append(second)
        async with grpc.aio.insecure_channel(second.target) as channel:
            await _check_replays_after_restart(channel, second.target, acked, unacked, at_crash)
        final = await asyncio.to_thread(read_books, store_url, CRASH_SKU)
        check_no_partial_batch(final)
        assert len(final.reservations) == len(answers), "every Reserve sent committed exactly once"

        assert second.stop() == 0, second.output()
        assert "Traceback" not in second.stderr.text(), second.output()
    finally:
        for server in servers:
            server.close()


async def _check_replays_after_restart(channel, target: str, acked: list[Answer], unacked: list[Answer], at_crash: Books) -> None:
    """Acknowledged replies replay byte for byte under the same context id;
    an unacknowledged call replays exactly when its move was in the store at
    the crash, commits now otherwise, and replays from then on."""
    again = await _reserve_all(channel, target, acked)
    for first, replay in zip(acked, again):
        assert (replay.ok, replay.replayed, replay.reply) == (True, True, first.reply), replay.describe()
        assert replay.context_id == first.context_id

    retried = await _reserve_all(channel, target, unacked)
    for answer in retried:
        assert answer.ok, answer.describe()
        reply = answer.parsed()
        assert (reply.state, reply.version, reply.quantity) == (pb.RESERVATION_STATE_RESERVED, 1, answer.request.quantity)
        assert answer.replayed == (reply.reservation_id in at_crash.reservations), answer.describe()
    twice = await _reserve_all(channel, target, unacked)
    for first, replay in zip(retried, twice):
        assert (replay.replayed, replay.reply) == (True, first.reply), replay.describe()


async def _reserve_all(channel, target: str, answers: list[Answer], concurrency: int = 16) -> list[Answer]:
    """Sends each answer's request again, a few at a time: a retry storm of
    hundreds at once could spend Reserve's budget, which is not under test here."""
    gate = asyncio.Semaphore(concurrency)

    async def one(answer: Answer) -> Answer:
        async with gate:
            return await invoke(channel, target, "Reserve", answer.request, CALL_TIMEOUT_S)

    return await asyncio.gather(*(one(a) for a in answers))
