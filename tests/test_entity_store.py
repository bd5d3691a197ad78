"""Generic entity rows in the store of record, on SQLite, PostgreSQL and
the in-memory store `holdfast simulate` runs on (holdfast.memory).

A service built on the framework (the waybills of fulfillment, a user's
table bookings) keeps each of its state machines' entities as one versioned
row: `Txn.entity`, `Txn.save_entity` (a compare-and-set on the version, like
a reservation's) and `Txn.due_entities` (what a reaper fires timeouts for).
These tests pin that contract through the public API (`Store.transact`, the
`Txn` methods), on both ways a batch runs: buffered (rows in memory, one
statement per table) and, when a move fails in a way memory cannot undo, a
savepoint per move. Batches are formed as tests/test_group_commit.py forms
them. Reading or writing the database from outside the store is done only to
show what another client sees, or to build a database an older holdfast left;
those tests, and the schema's, are the SQL stores' alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace

import psycopg
import pytest

from holdfast.backends import open_store
from holdfast.apps.inventory_machine import State
from holdfast.memory import MemoryStore, RowRefused
from holdfast.sqlite import SqliteStore
from holdfast.store import (
    SCHEMA_VERSION,
    Contended,
    Entity,
    Prefetch,
    SchemaTooNew,
    StoreUnavailable,
    Txn,
    version_pages,
)
from holdfast.apps.inventory_store import TABLES, Reservation, reservation, save_reservation
from tests.test_group_commit import CountingStore, in_one_batch, read_outside

KIND = "fulfillment"
# Bytes a service may serialize: a NUL, invalid UTF-8, and UTF-8 for "é".
DATA = b"\x00waybill caf\xc3\xa9 \xff\xfe"


def store_of(request: pytest.FixtureRequest, tmp_path, tables) -> CountingStore:
    """The store of record `request.param` names (the SQL ones as
    tests/conftest.py's `store_url` opens them), with `tables`, counting
    what it is handed."""
    if request.param == "memory":
        return CountingStore(MemoryStore(tables=tables))
    if request.param == "sqlite":
        return CountingStore(open_store(f"sqlite:///{tmp_path}/store.db", tables=tables))
    return CountingStore(open_store(request.getfixturevalue("postgres_url"), tables=tables))


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path):
    """Each store of record in turn."""
    opened = store_of(request, tmp_path, TABLES)
    await opened.open()
    yield opened
    await opened.close()


def _waybill(entity_id: str = "wb_1", version: int = 1, state: int = 1, due_at_ms: int = 0, kind: str = KIND) -> Entity:
    return Entity(entity_id, kind, state, version, DATA, "", 0, due_at_ms)


def _advanced(entity: Entity, **changes) -> Entity:
    """The entity one move later: its version one higher."""
    return replace(entity, version=entity.version + 1, **changes)


def _saving(entity: Entity, expected_version: int) -> Callable[[Txn], str]:
    def work(txn: Txn) -> str:
        try:
            txn.save_entity(entity, expected_version)
        except Contended:
            return "contended"
        return "saved"

    return work


async def _entity(store, entity_id: str) -> Entity | None:
    return await store.transact(lambda txn: txn.entity(entity_id))


async def _seed(store, *entities: Entity) -> None:
    """Each entity saved as new, at version 1."""
    for entity in entities:
        assert entity.version == 1
        assert await store.transact(_saving(entity, 0)) == "saved"


# -- one entity: reading it back, compare-and-set ---------------------------------


async def test_saved_entity_reads_back_exactly_every_field(store):
    entity = Entity("wb_é1", KIND, 7, 1, DATA, "dispatcher-é", 1_700_000_000_123, 1_700_000_060_000)
    written = await store.transact(lambda txn: (txn.save_entity(entity, 0), dict(txn.written))[1])

    assert written == {"wb_é1": 1}  # what the engine advances the snapshot with
    assert await _entity(store, "wb_é1") == entity
    assert type((await _entity(store, "wb_é1")).data) is bytes
    assert await _entity(store, "wb_other") is None


async def test_saving_an_entity_is_a_compare_and_set_on_its_version(store):
    first = _waybill()
    assert await store.transact(_saving(first, 0)) == "saved"  # a new entity expects version 0
    assert await store.transact(_saving(replace(first, state=9), 0)) == "contended"  # the id exists
    second = _advanced(first, state=2, data=b"second", lease_owner="me", lease_until_ms=5, due_at_ms=6)
    assert await store.transact(_saving(second, 1)) == "saved"
    stale = _advanced(first, state=3, data=b"stale")
    assert await store.transact(_saving(stale, 1)) == "contended"  # it is at version 2 now
    assert await store.transact(_saving(_waybill("wb_never", version=5), 4)) == "contended"  # no such row

    assert await _entity(store, "wb_1") == second
    assert await _entity(store, "wb_never") is None


async def test_a_save_that_skips_a_version_is_a_bug_not_a_conflict(store):
    with pytest.raises(AssertionError, match="exactly one"):
        await store.transact(lambda txn: txn.save_entity(_waybill(version=3), 1))
    assert await _entity(store, "wb_1") is None


async def test_an_entity_never_changes_its_kind(store):
    await _seed(store, _waybill())

    def turn_into_a_booking(txn: Txn) -> None:
        found = txn.entity("wb_1")
        txn.save_entity(_advanced(found, kind="booking"), found.version)

    with pytest.raises(AssertionError, match="kind"):
        await store.transact(turn_into_a_booking)
    assert await _entity(store, "wb_1") == _waybill()


async def test_an_entity_id_with_a_nul_byte_is_simply_not_found(store):
    """PostgreSQL text cannot hold NUL, so no stored id has one; SQLite agrees."""
    await _seed(store, _waybill("wb_1"))
    assert await _entity(store, "wb_1\x00") is None
    assert await store.transact(lambda txn: txn.entity("wb_1\x00"), prefetch=Prefetch(rows={"entity": ("wb_1\x00", "wb_1")})) is None
    assert await store.transact(lambda txn: txn.due_entities(KIND + "\x00", 10, 10)) == []


# -- entities in a shared batch ---------------------------------------------------------


def _advancing(entity_id: str, expected_version: int) -> Callable[[Txn], int]:
    """A move as a service makes it: read the entity, move it on by one."""

    def work(txn: Txn) -> int:
        found = txn.entity(entity_id)
        txn.save_entity(_advanced(found, state=found.state + 1), expected_version)
        return found.version + 1

    return work


async def test_moves_on_entities_in_one_batch_commit_and_one_that_loses_a_compare_and_set_fails_alone(store):
    """Two moves on two entities commit in one batch; a third, which created
    an entity and then lost a compare-and-set (its snapshot saw version 1 of
    wb_a, the batch-mate before it made 2), fails alone: its own write is
    undone, its batch-mates' are not."""
    await _seed(store, _waybill("wb_a"), _waybill("wb_b"))

    def creates_then_loses(txn: Txn) -> None:
        txn.save_entity(_waybill("wb_c"), 0)
        txn.save_entity(_advanced(_waybill("wb_a"), state=99), 1)

    works = [_advancing("wb_a", 1), _advancing("wb_b", 1), creates_then_loses]
    prefetches = [Prefetch(rows={"entity": ("wb_a",)}), Prefetch(rows={"entity": ("wb_b",)}), Prefetch(rows={"entity": ("wb_a", "wb_c")})]
    results = await in_one_batch([store], [store.transact(w, prefetch=p) for w, p in zip(works, prefetches)])

    assert results[:2] == [2, 2]
    assert isinstance(results[2], StoreUnavailable)  # lost every rerun: wb_a stays at version 2
    assert await _entity(store, "wb_a") == _waybill("wb_a", version=2, state=2)
    assert await _entity(store, "wb_b") == _waybill("wb_b", version=2, state=2)
    assert await _entity(store, "wb_c") is None


async def test_a_batch_that_creates_and_advances_entities_runs_each_move_once(store):
    """The buffered flush inserts and compare-and-sets the batch's entities
    itself: no move is run a second time, as it would be if a flush
    statement came up short and the batch fell back to the savepoint path."""
    await _seed(store, _waybill("wb_a"), _waybill("wb_b"))
    runs: list[str] = []

    def counted(name: str, work: Callable[[Txn], object]) -> Callable[[Txn], object]:
        def run(txn: Txn) -> object:
            runs.append(name)
            return work(txn)

        return run

    works = [
        counted("advance a", _advancing("wb_a", 1)),
        counted("advance b", _advancing("wb_b", 1)),
        counted("create c", lambda txn: txn.save_entity(_waybill("wb_c"), 0)),
    ]
    prefetch = Prefetch(rows={"entity": ("wb_a", "wb_b", "wb_c")})
    results = await in_one_batch([store], [store.transact(w, prefetch=prefetch) for w in works])

    assert results == [2, 2, None]
    assert runs == ["advance a", "advance b", "create c"]
    found = await store.transact(lambda txn: [txn.entity(eid) for eid in ("wb_a", "wb_b", "wb_c")])
    assert found == [_waybill("wb_a", version=2, state=2), _waybill("wb_b", version=2, state=2), _waybill("wb_c")]


async def test_each_move_in_a_batch_sees_the_entity_writes_queued_before_it(store):
    works = [
        lambda txn: txn.entity("wb_new"),
        lambda txn: txn.save_entity(_waybill("wb_new"), 0),
        _advancing("wb_new", 1),
        _advancing("wb_new", 2),
        lambda txn: txn.entity("wb_new"),
    ]
    results = await in_one_batch([store], [store.transact(w, prefetch=Prefetch(rows={"entity": ("wb_new",)})) for w in works])

    assert results == [None, None, 2, 3, _waybill("wb_new", version=3, state=3)]
    assert await _entity(store, "wb_new") == _waybill("wb_new", version=3, state=3)


async def test_an_entity_changed_in_place_by_a_failing_move_is_read_unchanged_by_its_batch_mates(store):
    """Entities are mutable dataclasses: a move may change the one it read
    before it fails. Its batch-mates, and the row, must not see that."""
    await _seed(store, _waybill("wb_a"))

    def changes_in_place_then_fails(txn: Txn) -> None:
        found = txn.entity("wb_a")
        found.state, found.data = 42, b"half done"
        raise RuntimeError("the move's own failure")

    prefetch = Prefetch(rows={"entity": ("wb_a",)})
    results = await in_one_batch(
        [store], [store.transact(changes_in_place_then_fails, prefetch=prefetch), store.transact(_advancing("wb_a", 1), prefetch=prefetch)]
    )

    assert isinstance(results[0], RuntimeError) and results[1] == 2
    assert await _entity(store, "wb_a") == _waybill("wb_a", version=2, state=2)


async def test_an_entity_write_the_database_refuses_fails_that_move_alone(store):
    """A NOT NULL the flush breaks aborts the buffered batch; the batch runs
    again with a savepoint per move, where the refused insert undoes its
    move alone and its batch-mates commit once. (The in-memory store refuses
    the row as the schema would, with RowRefused.)"""
    await _seed(store, _waybill("wb_a"))

    def refused(txn: Txn) -> None:
        txn.save_entity(_waybill("wb_c"), 0)
        txn.save_entity(_waybill("wb_kindless", kind=None), 0)  # the table says kind NOT NULL

    works = [_advancing("wb_a", 1), refused, lambda txn: txn.save_entity(_waybill("wb_b"), 0)]
    results = await in_one_batch([store], [store.transact(w) for w in works])

    assert results[0] == 2 and results[2] is None
    assert isinstance(results[1], (sqlite3.IntegrityError, psycopg.errors.NotNullViolation, RowRefused)), results[1]
    found = await store.transact(lambda txn: {eid: txn.entity(eid) for eid in ("wb_a", "wb_b", "wb_c", "wb_kindless")})
    assert found == {"wb_a": _waybill("wb_a", version=2, state=2), "wb_b": _waybill("wb_b"), "wb_c": None, "wb_kindless": None}


async def test_an_entity_created_elsewhere_after_the_prefetch_loses_the_compare_and_set(postgres_url):
    """Another instance inserts the id between our prefetch and our flush:
    the flush writes fewer rows than it holds, the batch reruns on the
    savepoint path, and the move sees their row. (PostgreSQL alone: SQLite's
    file lock keeps a second writer out of a batch.)"""
    store = open_store(postgres_url, tables=TABLES)
    await store.open()
    attempts: list[str] = []

    def create(txn: Txn) -> str:
        if txn.entity("wb_race") is not None:
            attempts.append("exists")
            return "exists"
        if not attempts:
            with psycopg.connect(postgres_url, autocommit=True) as other:
                other.execute(
                    "INSERT INTO entity (entity_id, kind, state, version, data) VALUES ('wb_race', %s, 5, 1, %s)",
                    (KIND, b"theirs"),
                )
        attempts.append("created")
        txn.save_entity(_waybill("wb_race"), 0)
        return "created"

    try:
        assert await store.transact(create, prefetch=Prefetch(rows={"entity": ("wb_race",)})) == "exists"
        assert attempts == ["created", "exists"]
        assert await _entity(store, "wb_race") == Entity("wb_race", KIND, 5, 1, b"theirs")
    finally:
        await store.close()


async def test_a_prefetched_entity_is_loaded_and_locked_before_its_move_reads_it(postgres_url):
    """The batch's prefetch loads (and locks) the entities its jobs named, so
    the move's read needs no statement of its own; an entity not named is
    read, and locked, only when the move asks for it. Seen from another
    client: the named row is locked before the move has read anything."""
    store = open_store(postgres_url, tables=TABLES)
    await store.open()

    def locked_elsewhere(entity_id: str) -> bool:
        with psycopg.connect(postgres_url, autocommit=True) as other:
            try:
                other.execute("SELECT 1 FROM entity WHERE entity_id = %s FOR UPDATE NOWAIT", (entity_id,))
            except psycopg.errors.LockNotAvailable:
                return True
        return False

    def work(txn: Txn) -> dict[str, bool]:
        before = {eid: locked_elsewhere(eid) for eid in ("wb_named", "wb_unnamed")}
        assert txn.entity("wb_named") is not None and txn.entity("wb_unnamed") is not None
        return before

    try:
        await _seed(store, _waybill("wb_named"), _waybill("wb_unnamed"))
        locked = await store.transact(work, prefetch=Prefetch(rows={"entity": ("wb_named",)}))
        assert locked == {"wb_named": True, "wb_unnamed": False}
    finally:
        await store.close()


# -- due entities -----------------------------------------------------------------------


async def test_due_entities_are_the_due_ones_of_the_kind_in_order_up_to_the_limit(store):
    await _seed(
        store,
        _waybill("wb_b", due_at_ms=50),
        _waybill("wb_a", due_at_ms=50),
        _waybill("wb_c", due_at_ms=100),
        _waybill("wb_later", due_at_ms=101),
        _waybill("wb_never", due_at_ms=0),  # no timeout at all
        _waybill("bk_1", due_at_ms=10, kind="booking"),
    )

    def due(kind: str, now_ms: int, limit: int) -> Callable[[Txn], list[str]]:
        return lambda txn: [e.entity_id for e in txn.due_entities(kind, now_ms, limit)]

    assert await store.transact(due(KIND, 100, 10)) == ["wb_a", "wb_b", "wb_c"]
    assert await store.transact(due(KIND, 100, 2)) == ["wb_a", "wb_b"]
    assert await store.transact(due(KIND, 49, 10)) == []
    assert await store.transact(due("booking", 100, 10)) == ["bk_1"]
    found = await store.transact(lambda txn: txn.due_entities(KIND, 50, 1))
    assert found == [_waybill("wb_a", due_at_ms=50)]  # whole rows, every field


async def test_due_entities_inside_a_batch_see_the_entity_writes_of_earlier_moves(store):
    """A range query flushes the batch's buffered writes first: a new entity
    that is due, and one whose timeout an earlier move cleared."""
    await _seed(store, _waybill("wb_cleared", due_at_ms=10))

    def clear_timeout(txn: Txn) -> None:
        found = txn.entity("wb_cleared")
        txn.save_entity(_advanced(found, due_at_ms=0), 1)

    works = [
        lambda txn: txn.save_entity(_waybill("wb_due", due_at_ms=20), 0),
        clear_timeout,
        lambda txn: [e.entity_id for e in txn.due_entities(KIND, 100, 10)],
    ]
    prefetch = Prefetch(rows={"entity": ("wb_due", "wb_cleared")})
    results = await in_one_batch([store], [store.transact(w, prefetch=prefetch) for w in works])

    assert results == [None, None, ["wb_due"]]


async def test_a_move_that_saves_an_entity_then_asks_for_due_ones_sees_its_own_write(store):
    def write_then_query(txn: Txn) -> list[str]:
        txn.save_entity(_waybill("wb_due", due_at_ms=20), 0)
        return [e.entity_id for e in txn.due_entities(KIND, 100, 10)]

    assert await store.transact(write_then_query) == ["wb_due"]
    assert await _entity(store, "wb_due") == _waybill("wb_due", due_at_ms=20)


# -- versions: what the snapshot is rebuilt from ----------------------------------------


async def test_versions_merge_entity_and_reservation_versions_in_id_order(store):
    hold = Reservation("rsv_1", "o1", "sku", 1, State.RESERVED, 1, 1_000)
    await store.transact(lambda txn: save_reservation(txn, hold, 0))
    await store.transact(lambda txn: save_reservation(txn, replace(hold, version=2, state=State.CONFIRMED), 1))
    await store.transact(lambda txn: save_reservation(txn, Reservation("rsv_2", "o2", "sku", 1, State.RESERVED, 1, 1), 0))
    await _seed(store, _waybill("bk_1", kind="booking"), _waybill("wb_1"), _waybill("rsv_0x"))
    await store.transact(_advancing("wb_1", 1))
    await store.transact(_advancing("wb_1", 2))

    everything = [("bk_1", 1), ("rsv_0x", 1), ("rsv_1", 2), ("rsv_2", 1), ("wb_1", 3)]
    assert await store.transact(lambda txn: txn.versions("", 10)) == everything
    assert await store.transact(lambda txn: txn.versions("bk_1", 2)) == everything[1:3]
    assert await store.transact(lambda txn: txn.versions("rsv_2", 10)) == everything[4:]
    pages = [page async for page in version_pages(store, page=2)]
    assert pages == [dict(everything[:2]), dict(everything[2:4]), dict(everything[4:])]


# -- the schema: a version-1 store gains the entity table -------------------------------

# The tables as holdfast's schema version 1 made them, before the entity table.
SCHEMA_1 = """
CREATE TABLE stock (
    sku_id TEXT PRIMARY KEY,
    total {integer} NOT NULL CHECK (total >= 0),
    available {integer} NOT NULL CHECK (available >= 0),
    held {integer} NOT NULL CHECK (held >= 0),
    sold {integer} NOT NULL CHECK (sold >= 0),
    version {integer} NOT NULL,
    CHECK (available + held + sold = total)
);
CREATE TABLE reservation (
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
CREATE INDEX reservation_due ON reservation (state, expires_at_ms);
CREATE TABLE outcome (
    key {blob} PRIMARY KEY,
    fingerprint {blob} NOT NULL,
    reason TEXT,
    payload {blob} NOT NULL,
    recorded_at_ms {integer} NOT NULL
);
CREATE TABLE holdfast_schema (version INTEGER NOT NULL);
INSERT INTO reservation (reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms)
    VALUES ('rsv_old', 'o1', 'sku', 1, 1, 1, 5);
"""


def _made_by_an_older_holdfast(url: str, stamp: int) -> None:
    """The version-1 tables, by hand, stamped `stamp`."""
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path, isolation_level=None)) as db:
            db.executescript(SCHEMA_1.format(integer="INTEGER", blob="BLOB"))
            db.execute("INSERT INTO holdfast_schema (version) VALUES (?)", (stamp,))
    else:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(SCHEMA_1.format(integer="BIGINT", blob="BYTEA"))
            db.execute("INSERT INTO holdfast_schema (version) VALUES (%s)", (stamp,))


def _has_entity_table(url: str) -> bool:
    if url.startswith("sqlite://"):
        return bool(read_outside(url, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'entity'"))
    return read_outside(url, "SELECT to_regclass('entity') IS NOT NULL")[0][0]


async def test_a_version_1_store_gains_the_entity_table_and_is_stamped_current(store_url):
    _made_by_an_older_holdfast(store_url, stamp=1)
    assert not _has_entity_table(store_url)

    store = open_store(store_url, tables=TABLES)
    await store.open()
    try:
        assert await store.transact(_saving(_waybill(), 0)) == "saved"
        assert await _entity(store, "wb_1") == _waybill()
        assert (await store.transact(lambda txn: reservation(txn, "rsv_old"))).version == 1  # its rows are kept
    finally:
        await store.close()
    assert _has_entity_table(store_url)
    assert read_outside(store_url, "SELECT version FROM holdfast_schema") == [(SCHEMA_VERSION,)]


async def test_a_store_stamped_newer_is_refused(store_url):
    newer = SCHEMA_VERSION + 1
    _made_by_an_older_holdfast(store_url, stamp=newer)
    with pytest.raises(SchemaTooNew, match=f"schema version {newer}"):
        await open_store(store_url, tables=TABLES).open()
    assert read_outside(store_url, "SELECT version FROM holdfast_schema") == [(newer,)]
