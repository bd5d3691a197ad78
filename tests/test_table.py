"""An app's own tables (holdfast.table): what a team declares gets what the
built-in apps' rows get, on SQLite, PostgreSQL and the in-memory store
alike: its DDL, compare-and-set on its version, upserts under the row lock,
range queries in order, rows locked with another table's, the schema's
refusals, the snapshot's versions and a conflict answer in its own words.

The tables are a parking lot's: versioned holds of a spot (in the
snapshot), and per-lot counters written under their row lock."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from holdfast import Column, Move, Query, Table, Txn
from holdfast.backends import open_store
from holdfast.batch import Named
from holdfast.clock import ManualClock
from holdfast.engine import Engine
from holdfast.memory import MemoryStore, RowRefused
from holdfast.memory_snapshot import MemorySnapshot
from holdfast.outcome import Reason, success
from holdfast.store import Budget, Contended, Prefetch, Record, version_pages
from tests.test_entity_store import store_of
from tests.test_group_commit import in_one_batch, read_outside


@dataclass(slots=True)
class Spot:
    spot_id: str
    lot_id: str
    driver: str
    state: int
    version: int
    until_ms: int


@dataclass(slots=True)
class Lot:
    lot_id: str
    free: int
    taken: int


HELD = 2
EXPIRED_BY = Query(
    where="state = %s AND until_ms <= %s",
    order_by="until_ms, spot_id",
    matches=lambda s, params: s.state == params[0] and s.until_ms <= params[1],
    order=lambda s: (s.until_ms, s.spot_id),
    candidate=lambda s: s.state == HELD,
)
SPOTS: Table[Spot] = Table(
    "parking_spot",
    (
        Column("spot_id", "text"),
        Column("lot_id", "text", fixed=True),
        Column("driver", "text", "NOT NULL DEFAULT ''"),
        Column("state", "integer"),
        Column("version", "integer", "NOT NULL CHECK (version > 0)"),
        Column("until_ms", "integer", "NOT NULL DEFAULT 0"),
    ),
    Spot,
    snapshot=True,
    noun="spot",
    indexes=(("parking_spot_due", "state, until_ms"),),
    refused=lambda s: None if s.version > 0 else "version must be positive",
    queries=(EXPIRED_BY,),
)
LOTS: Table[Lot] = Table(
    "parking_lot",
    (
        Column("lot_id", "text"),
        Column("free", "integer", "NOT NULL CHECK (free >= 0)"),
        Column("taken", "integer", "NOT NULL CHECK (taken >= 0)"),
    ),
    Lot,
    versioned=False,
    locked_with=(("parking_spot", "lot_id"),),
    refused=lambda lot: None if min(lot.free, lot.taken) >= 0 else "CHECK (free >= 0, taken >= 0)",
)
TABLES = (SPOTS, LOTS)


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path):
    """Each store of record in turn, with the parking lot's tables."""
    opened = store_of(request, tmp_path, TABLES)
    await opened.open()
    yield opened
    await opened.close()


def _held(spot_id: str, until_ms: int = 1_000, version: int = 1, lot: str = "lot-a") -> Spot:
    return Spot(spot_id, lot, "driver-1", HELD, version, until_ms)


def _hold(txn: Txn, spot: Spot, expected: int) -> str:
    """A spot held, its lot's counters moved under the lot's row lock."""
    try:
        txn.save(SPOTS, spot, expected)
    except Contended:
        return "contended"
    lot = txn.row(LOTS, spot.lot_id)
    assert lot is not None
    txn.put(LOTS, Lot(lot.lot_id, lot.free - 1, lot.taken + 1))
    return "held"


async def _seeded(store, free: int = 5) -> None:
    await store.transact(lambda txn: txn.put(LOTS, Lot("lot-a", free, 0)))


async def test_a_saved_row_reads_back_and_its_version_is_compared_and_set(store):
    await _seeded(store)
    assert await store.transact(lambda txn: _hold(txn, _held("s1"), 0)) == "held"
    assert await store.transact(lambda txn: _hold(txn, _held("s1"), 0)) == "contended"
    moved = replace(_held("s1"), driver="driver-2", version=2)
    assert await store.transact(lambda txn: _hold(txn, moved, 1)) == "held"
    assert await store.transact(lambda txn: txn.row(SPOTS, "s1")) == moved
    assert await store.transact(lambda txn: txn.row(LOTS, "lot-a")) == Lot("lot-a", 3, 2)
    assert await store.transact(lambda txn: txn.row(SPOTS, "nowhere")) is None


async def test_a_fixed_column_never_changes(store):
    await _seeded(store)
    await store.transact(lambda txn: _hold(txn, _held("s1"), 0))

    def move_lot(txn: Txn) -> None:
        txn.row(SPOTS, "s1")
        txn.save(SPOTS, _held("s1", version=2, lot="lot-b"), 1)

    with pytest.raises(AssertionError, match="spot s1 would change its lot_id"):
        await store.transact(move_lot)


async def test_a_range_query_answers_in_order_within_its_limit(store):
    await _seeded(store)
    for spot_id, until in (("s3", 300), ("s1", 100), ("s2", 100), ("s4", 900)):
        await store.transact(lambda txn, s=_held(spot_id, until): txn.save(SPOTS, s, 0))
    released = replace(_held("s2", 100), state=3, version=2)
    await store.transact(lambda txn: txn.save(SPOTS, released, 1))
    due = await store.transact(lambda txn: txn.select(SPOTS, EXPIRED_BY, (HELD, 500), 10))
    assert [s.spot_id for s in due] == ["s1", "s3"]
    first = await store.transact(lambda txn: txn.select(SPOTS, EXPIRED_BY, (HELD, 500), 1))
    assert [s.spot_id for s in first] == ["s1"]


async def test_a_query_sees_the_moves_own_writes(store):
    def hold_then_ask(txn: Txn) -> list[str]:
        txn.save(SPOTS, _held("s9", 50), 0)
        return [s.spot_id for s in txn.select(SPOTS, EXPIRED_BY, (HELD, 100), 10)]

    assert await store.transact(hold_then_ask) == ["s9"]


async def test_a_spot_named_in_a_batch_brings_its_lot_locked_with_it(store):
    """The lot is never named: it is loaded (and on PostgreSQL locked) by
    the spot's prefetch, so every hold of the batch moves the one row."""
    await _seeded(store, free=4)
    holds = [store.transact(lambda txn, n=n: _hold(txn, _held(f"s{n}"), 0), prefetch=Prefetch(rows={"parking_spot": (f"s{n}",)}))
             for n in range(3)]
    assert await in_one_batch([store], holds) == ["held"] * 3
    assert await store.transact(lambda txn: txn.row(LOTS, "lot-a")) == Lot("lot-a", 1, 3)


async def test_a_prefetch_of_a_spot_loads_its_lot_in_the_same_statements(store_url):
    """What makes the batch above one set of statements: the SQL stores'
    prefetch of a spot selects (and on PostgreSQL locks) its lot too."""
    store = open_store(store_url, tables=TABLES)
    await store.open()
    try:
        await _seeded(store)
        await store.transact(lambda txn: _hold(txn, _held("s1"), 0))
        connection = store._connect()
        try:
            rows = store._load(connection, Named(frozenset(), {"parking_spot": frozenset({"s1", "s2"})}), Budget(None))
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    finally:
        await store.close()
    assert rows.tables == {
        "entity": {}, "parking_spot": {"s1": _held("s1"), "s2": None}, "parking_lot": {"lot-a": Lot("lot-a", 4, 1)},
    }


async def test_versions_list_every_snapshot_table(store):
    await _seeded(store)
    await store.transact(lambda txn: _hold(txn, _held("s1"), 0))
    await store.transact(lambda txn: txn.save_entity(_entity("wb_1"), 0))
    pages = [page async for page in version_pages(store.inner)]
    assert pages == [{"s1": 1, "wb_1": 1}]


async def test_the_schema_refuses_what_breaks_a_check_and_the_move_alone_fails(store):
    await _seeded(store, free=0)
    refused = RowRefused if isinstance(store.inner, MemoryStore) else Exception
    with pytest.raises(refused):
        await store.transact(lambda txn: _hold(txn, _held("s1"), 0))
    assert await store.transact(lambda txn: txn.row(SPOTS, "s1")) is None
    assert await store.transact(lambda txn: txn.row(LOTS, "lot-a")) == Lot("lot-a", 0, 0)


async def test_a_stale_snapshot_answers_a_conflict_in_the_tables_words(store):
    await _seeded(store)
    await store.transact(lambda txn: _hold(txn, _held("s1"), 0))
    snapshot = MemorySnapshot()
    await snapshot.open(lambda: version_pages(store.inner))
    await snapshot.reset("s1", 7)  # a snapshot ahead of the store
    engine = Engine(store.inner, snapshot, ManualClock(0))
    move = Move("/parking/Leave", b"k" * 32, b"fp", "s1", lambda txn, now_ms: success(b""), SPOTS)
    outcome = await engine.move(move)
    assert outcome.reason is Reason.VERSION_CONFLICT
    assert b"spot s1 moved concurrently (now at version 1)" in outcome.payload
    assert b"\n\x07spot_id\x12\x02s1" in outcome.payload


def test_the_tables_exist_after_open_with_their_columns(store_url):
    """The DDL is the declaration's, on both SQL stores."""

    async def opened() -> None:
        store = open_store(store_url, tables=TABLES)
        await store.open()
        await store.close()

    import asyncio

    asyncio.run(opened())
    if store_url.startswith("sqlite"):
        columns = [row[1] for row in read_outside(store_url, "PRAGMA table_info(parking_spot)")]
    else:
        columns = [row[0] for row in read_outside(
            store_url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'parking_spot' ORDER BY ordinal_position"
        )]
    assert columns == ["spot_id", "lot_id", "driver", "state", "version", "until_ms"]


async def test_retention_deletes_rows_and_turns_aged_records_into_tombstones_that_it_drops_later(store):
    await _seeded(store)
    for n in range(3):
        await store.transact(lambda txn, n=n: _hold(txn, _held(f"s{n}"), 0))
        record = Record(b"fp", None, b"reply", entity=f"parking_spot:s{n}")
        await store.transact(lambda txn, n=n, record=record: txn.record(b"key-%d" % n, record, 100 + n))

    assert await store.transact(lambda txn: txn.present(SPOTS, ["s0", "s2", "nowhere"])) == {"s0", "s2"}
    assert await store.transact(lambda txn: txn.delete(SPOTS, "s1")) is True
    assert await store.transact(lambda txn: txn.delete(SPOTS, "s1")) is False  # gone: another deleted it first
    assert await store.transact(lambda txn: txn.row(SPOTS, "s1")) is None
    assert await store.transact(lambda txn: txn.versions("", 10)) == [("s0", 1), ("s2", 1)]

    aged = await store.transact(lambda txn: txn.aged_outcomes(102, (0, b""), 10))
    assert aged == [(100, b"key-0", "parking_spot:s0"), (101, b"key-1", "parking_spot:s1")]
    assert await store.transact(lambda txn: txn.aged_outcomes(200, (100, b"key-0"), 1)) == [(101, b"key-1", "parking_spot:s1")]
    await store.transact(lambda txn: txn.bury_outcome(b"key-1", 500))
    tombstone = await store.transact(lambda txn: txn.recorded(b"key-1"))
    assert tombstone is not None and tombstone.pruned
    assert [key for _, key, _ in await store.transact(lambda txn: txn.aged_outcomes(10**6, (0, b""), 10))] == [b"key-0", b"key-2"]

    assert await store.transact(lambda txn: txn.drop_tombstones(500, 10)) == 0  # made at 500: not older than 500
    assert await store.transact(lambda txn: txn.drop_tombstones(501, 10)) == 1
    assert await store.transact(lambda txn: txn.recorded(b"key-1")) is None
    assert (await store.transact(lambda txn: txn.recorded(b"key-0"))) == Record(b"fp", None, b"reply")


async def test_the_memory_store_refuses_an_indexed_query_its_table_does_not_declare():
    """Its index would be empty, so the query would answer nothing."""
    store = MemoryStore(tables=TABLES)
    await store.open()
    undeclared = replace(EXPIRED_BY, where="until_ms <= %s")
    try:
        with pytest.raises(AssertionError, match="declare the query in its `queries`"):
            await store.transact(lambda txn: txn.select(SPOTS, undeclared, (500,), 10))
    finally:
        await store.close()


def test_two_different_tables_of_one_name_are_refused():
    other = Table("parking_lot", (Column("lot_id", "text"), Column("spaces", "integer")), Lot, versioned=False)
    with pytest.raises(ValueError, match="two different tables are declared as 'parking_lot'"):
        MemoryStore(tables=(LOTS, other))


def _entity(entity_id: str):
    from holdfast.store import Entity

    return Entity(entity_id, "fulfillment", 1, 1, b"", "", 0, 0)
