"""Expired holds are reclaimed by the call that needs them (docs/reclaim.md):
a Reserve short of stock releases, in its own move, the SKU's lone holds
already expired at the call's time, oldest expiry first and no more than it
needs, each recorded under the reaper's key with the reaper's own bytes. So
its answer depends on the request and its time, never on how far behind
the reaper is: the reaper's later move of such a hold replays the record,
a Release of it answers HOLD_EXPIRED, and a journal of the run replays
identically. A hold not yet expired at the call's time is never touched.

Over real gRPC on the embedded pair, PostgreSQL + Redis and PostgreSQL +
Redis Cluster, with a manual clock; the reaper is held back (an interval
longer than any test) and run by the test when it should run at all."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import grpc
import psycopg
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import replay
from holdfast.apps.inventory import RECLAIM_MAX, Inventory, expiry_key
from holdfast.apps.inventory_machine import State
from holdfast.apps.inventory_store import EXPIRED_HOLDS, RESERVATIONS, TABLES
from holdfast.backends import open_store
from holdfast.clock import ManualClock
from holdfast.server import Config, Running, start
from holdfast.sqlite import SqliteStore
from holdfast.verify import verify
from tests.conftest import BACKENDS
from tests.test_api import FAILED_PRECONDITION, RELEASED, REPLAYED, RESERVED, fails, reservation_of, stock_figures

ACROSS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
HELD_BACK_MS = 10**9  # the reaper's interval: it never runs on its own during a test
SKU = "sku-reclaim"


@dataclasses.dataclass
class World:
    running: Running
    clock: ManualClock
    stub: pb_grpc.InventoryServiceStub
    journal: Path
    stopped: bool = False

    @property
    def inventory(self) -> Inventory:
        return next(s for s in self.running.services.values() if isinstance(s, Inventory))

    async def replayed(self) -> replay.Report:
        """Stops the server (its journal complete) and replays the journal on a fresh instance."""
        self.stopped = True
        await self.running.stop(0)
        return await asyncio.to_thread(replay.replay, self.journal)


@pytest.fixture
async def world(config: Config, tmp_path: Path) -> AsyncIterator[World]:
    """A journaled server on a manual clock whose reaper is held back."""
    clock = ManualClock()
    journal = tmp_path / "journal.jsonl"
    running = await start(dataclasses.replace(config, reaper_interval_ms=HELD_BACK_MS, journal=str(journal)), clock=clock)
    made: World | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            made = World(running, clock, pb_grpc.InventoryServiceStub(channel), journal)
            yield made
    finally:
        if made is None or not made.stopped:
            await running.stop(0)


def _reserve(order_id: str, quantity: int, hold_ms: int) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order_id, sku_id=SKU, quantity=quantity, timestamp_ms=1, hold_ms=hold_ms)


async def _put(stub: pb_grpc.InventoryServiceStub, total: int) -> None:
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=total, request_id="init"), timeout=10)


async def _clean_books(running: Running) -> None:
    report = await verify(running.engine.store, running.engine.snapshot, [type(s) for s in running.services.values()])
    assert report.findings == []


def _outcome_row(url: str, key: bytes) -> tuple | None:
    """The outcome table's row under `key`, as another client of the store reads it."""
    sql = "SELECT fingerprint, reason, payload, recorded_at_ms, entity FROM outcome WHERE key = "
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path)) as db:
            found = db.execute(sql + "?", (key,)).fetchone()
    else:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as pg:
            found = pg.execute(sql + "%s", (key,)).fetchone()
    return None if found is None else (bytes(found[0]), found[1], bytes(found[2]), found[3], found[4])


@ACROSS
async def test_a_reserve_after_the_holds_expired_reclaims_their_stock_while_the_reaper_is_held_back(world: World):
    stub, clock = world.stub, world.clock
    await _put(stub, 10)
    # Every unit held; three of the holds expire within 300 ms, the fourth long after.
    a = await stub.Reserve(_reserve("o-a", 2, hold_ms=300), timeout=10)
    b = await stub.Reserve(_reserve("o-b", 2, hold_ms=100), timeout=10)
    c = await stub.Reserve(_reserve("o-c", 3, hold_ms=200), timeout=10)
    d = await stub.Reserve(_reserve("o-d", 3, hold_ms=60_000), timeout=10)
    assert await stock_figures(stub, SKU) == (10, 0, 10, 0)

    clock.advance(300)  # a's expiry is now exactly: expired, by the reaper's rule too
    held = await stub.Reserve(_reserve("o-new", 3, hold_ms=60_000), timeout=10)
    assert (held.state, held.version) == (RESERVED, 1)
    # Oldest expiry first, no more than the 3 units needed: b (2) and c (3) went back, a waits for the reaper.
    assert await stock_figures(stub, SKU) == (10, 2, 8, 0)
    states = {r.order_id: (r.state, r.version) for r in [await reservation_of(stub, h.reservation_id) for h in (a, b, c, d)]}
    assert states == {"o-a": (RESERVED, 1), "o-b": (RELEASED, 2), "o-c": (RELEASED, 2), "o-d": (RESERVED, 1)}
    for reclaimed in (b, c):  # the snapshot was given their new versions with the Reserve's own
        assert await world.running.engine.snapshot.version(reclaimed.reservation_id) == 2

    # The reaper, late: its move of a reclaimed hold replays the Reserve's record of it and changes nothing.
    for reclaimed in (b, c):
        outcome = await world.inventory.timeout(reclaimed.reservation_id, 1)
        assert outcome.ok and outcome.replayed
        assert outcome.payload == (await reservation_of(stub, reclaimed.reservation_id)).SerializeToString()
    assert await stock_figures(stub, SKU) == (10, 2, 8, 0)
    assert await world.inventory.reap(clock.now_ms(), 256) == 1  # a alone was left to it
    assert await stock_figures(stub, SKU) == (10, 4, 6, 0)
    assert (await reservation_of(stub, b.reservation_id)).version == 2

    # A reclaimed hold expired, as one the reaper expired did.
    for reclaimed in (b, a):
        release = pb.ReleaseRequest(reservation_id=reclaimed.reservation_id, reason="late")
        first = await fails(stub.Release, release)
        assert (first.code, first.reason) == (FAILED_PRECONDITION, "HOLD_EXPIRED")
        assert (await fails(stub.Release, release)).trailing[REPLAYED] == "true"
    await _clean_books(world.running)

    report = await world.replayed()
    assert report.identical, "\n".join(d.describe() for d in report.differences)
    assert report.timeouts == 3  # the reaper's two replays and its one expiry, made again at their places


@ACROSS
async def test_a_hold_not_yet_expired_at_the_call_time_is_never_reclaimed(world: World):
    stub, clock = world.stub, world.clock
    await _put(stub, 4)
    hold = await stub.Reserve(_reserve("o-hold", 4, hold_ms=1_000), timeout=10)
    clock.advance(999)
    refused = await fails(stub.Reserve, _reserve("o-early", 1, hold_ms=0))
    assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert ((await reservation_of(stub, hold.reservation_id)).state, await stock_figures(stub, SKU)) == (RESERVED, (4, 0, 4, 0))

    clock.advance(1)  # expired now: a new call reclaims it, the refused one stays refused
    again = await fails(stub.Reserve, _reserve("o-early", 1, hold_ms=0))
    assert (again.reason, again.trailing[REPLAYED]) == ("INSUFFICIENT_STOCK", "true")
    assert ((await reservation_of(stub, hold.reservation_id)).state, await stock_figures(stub, SKU)) == (RESERVED, (4, 0, 4, 0))
    await stub.Reserve(_reserve("o-late", 1, hold_ms=0), timeout=10)
    assert ((await reservation_of(stub, hold.reservation_id)).state, await stock_figures(stub, SKU)) == (RELEASED, (4, 3, 1, 0))

    report = await world.replayed()
    assert report.identical, "\n".join(d.describe() for d in report.differences)


@ACROSS
async def test_a_reclaimed_hold_is_recorded_as_the_reaper_records_an_expiry(world: World, config: Config):
    stub, clock = world.stub, world.clock
    await _put(stub, 2)
    reaped = await stub.Reserve(_reserve("o-reaped", 1, hold_ms=100), timeout=10)
    reclaimed = await stub.Reserve(_reserve("o-reclaimed", 1, hold_ms=100), timeout=10)
    clock.advance(100)
    # One expiry by the reaper's move, one by a Reserve that needs the unit, at one instant.
    assert (await world.inventory.timeout(reaped.reservation_id, 1)).ok
    await stub.Reserve(_reserve("o-needs", 2, hold_ms=0), timeout=10)
    for hold in (reaped, reclaimed):
        key = expiry_key(hold.reservation_id)
        reply = (await reservation_of(stub, hold.reservation_id)).SerializeToString()
        assert _outcome_row(config.store, key) == (key, None, reply, clock.now_ms(), f"reservation:{hold.reservation_id}")


@ACROSS
async def test_a_reserve_reclaims_at_most_reclaim_max_holds_and_else_changes_nothing(world: World):
    stub, clock = world.stub, world.clock
    await _put(stub, RECLAIM_MAX + 1)
    for n in range(RECLAIM_MAX + 1):
        await stub.Reserve(_reserve(f"o-{n}", 1, hold_ms=100), timeout=10)
    clock.advance(100)
    refused = await fails(stub.Reserve, _reserve("o-all", RECLAIM_MAX + 1, hold_ms=0))
    assert refused.reason == "INSUFFICIENT_STOCK"
    assert await stock_figures(stub, SKU) == (RECLAIM_MAX + 1, 0, RECLAIM_MAX + 1, 0)
    await stub.Reserve(_reserve("o-most", RECLAIM_MAX, hold_ms=0), timeout=10)
    assert await stock_figures(stub, SKU) == (RECLAIM_MAX + 1, 0, RECLAIM_MAX + 1, 0)
    assert await world.inventory.reap(clock.now_ms(), 256) == 1  # the one it did not need
    assert await stock_figures(stub, SKU) == (RECLAIM_MAX + 1, 1, RECLAIM_MAX, 0)
    await _clean_books(world.running)


@ACROSS
async def test_racing_reserves_and_the_reaper_share_the_expired_stock_exactly(config: Config):
    """Many Reserves and a reaper round at once, sharing the store's batches
    (a reaper's expiry and a Reserve reclaiming the same hold may be
    batch-mates): each expired hold is released once, by whichever comes
    first, the stock goes to exactly as many Reserves as there are units,
    and the books add up. (On several store connections a reclaim and the
    reaper's move of the same hold can deadlock on PostgreSQL, which breaks
    the tie after its deadlock_timeout: docs/reclaim.md.)"""
    clock = ManualClock()
    running = await start(dataclasses.replace(config, reaper_interval_ms=HELD_BACK_MS), clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await _put(stub, 40)
            for n in range(40):
                await stub.Reserve(_reserve(f"o-{n}", 1, hold_ms=100), timeout=10)
            clock.advance(100)
            inventory = next(s for s in running.services.values() if isinstance(s, Inventory))

            async def one(n: int) -> str:
                try:
                    await stub.Reserve(_reserve(f"race-{n}", 1, hold_ms=60_000), timeout=30)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

            answers = await asyncio.gather(*(one(n) for n in range(50)), inventory.reap(clock.now_ms(), 256))
            assert sorted(answers[:-1]) == ["FAILED_PRECONDITION"] * 10 + ["OK"] * 40
            assert await stock_figures(stub, SKU) == (40, 0, 40, 0)
            assert not await running.engine.store.transact(
                lambda txn: txn.select(RESERVATIONS, EXPIRED_HOLDS, (SKU, int(State.RESERVED), clock.now_ms()), 1))
            await _clean_books(running)
    finally:
        await running.stop(0)


def _index_used(url: str) -> str:
    """The plan of the reclaim query (EXPIRED_HOLDS), as the database explains it."""
    sql = (f"SELECT reservation_id FROM reservation WHERE {EXPIRED_HOLDS.where} ORDER BY {EXPIRED_HOLDS.order_by} LIMIT 5")
    params = (SKU, int(State.RESERVED), 1)
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path)) as db:
            return " ".join(str(row) for row in db.execute("EXPLAIN QUERY PLAN " + sql.replace("%s", "?"), params))
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as pg:
        pg.execute("SET enable_seqscan = off")  # an empty table's cheapest plan is a scan; ask whether the index serves
        return " ".join(row[0] for row in pg.execute("EXPLAIN " + sql, params))


def _drop_index(url: str, name: str) -> None:
    if url.startswith("sqlite://"):
        with closing(sqlite3.connect(SqliteStore.from_url(url).path, isolation_level=None)) as db:
            db.execute(f"DROP INDEX {name}")
    else:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as pg:
            pg.execute(f"DROP INDEX {name}")


async def test_a_store_made_before_the_reclaim_index_gains_it_when_it_opens(store_url: str):
    """Its query is served by the index, and a store written before the index
    was declared (here: the index dropped) has it again once it opens."""
    store = open_store(store_url, tables=TABLES)
    await store.open()
    await store.close()
    assert "reservation_reclaim" in _index_used(store_url)
    _drop_index(store_url, "reservation_reclaim")
    assert "reservation_reclaim" not in _index_used(store_url)
    store = open_store(store_url, tables=TABLES)
    await store.open()
    await store.close()
    assert "reservation_reclaim" in _index_used(store_url)
