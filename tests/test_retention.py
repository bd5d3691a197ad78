"""Retention (holdfast.retention): settled entities and outcome records are
kept for the retention, then pruned in bounded batches; a key whose record
was pruned is answered IDEMPOTENCY_KEY_EXPIRED (never run again) until its
tombstone goes too; a live entity keeps its rows and records whatever
their age; the snapshot forgets what the store pruned; the books still add
up (`holdfast verify` finds nothing); a journal with pruning replays
identically. Over real gRPC on the embedded pair, PostgreSQL + Redis and
PostgreSQL + Redis Cluster, with a manual clock and rounds run by the test
(the reaper's own rounds are switched off by a long interval)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import replay
from holdfast.apps.fulfillment import WAYBILL, Waybill
from holdfast.apps.inventory import Inventory
from holdfast.apps.inventory_store import PRUNED_SALES, RESERVATIONS
from holdfast.clock import ManualClock
from holdfast.retention import Policy, Pruned
from holdfast.server import Config, Running, start
from holdfast.store import Entity
from holdfast.table import Query
from holdfast.verify import verify
from tests.conftest import BACKENDS
from tests.test_api import CONFIRMED, FAILED_PRECONDITION, NOT_FOUND, RESERVED, fails, stock_figures

ACROSS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
RETENTION_MS = 10_000
TOMBSTONE_MS = 5_000
HOLD_MS = 1_000
NEVER_MS = 10**12  # the reaper's own retention rounds: never, the test runs them
SKU = "sku-r"


@pytest.fixture
async def pruning(config: Config) -> AsyncIterator[tuple[Running, ManualClock, pb_grpc.InventoryServiceStub]]:
    clock = ManualClock()
    policy = Policy(retention_ms=RETENTION_MS, tombstone_ms=TOMBSTONE_MS, interval_ms=NEVER_MS, batch=2)
    running = await start(dataclasses.replace(config, retention=policy), clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, clock, pb_grpc.InventoryServiceStub(channel)
    finally:
        await running.stop(0)


def _reserve(order_id: str, quantity: int, hold_ms: int = HOLD_MS) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order_id, sku_id=SKU, quantity=quantity, timestamp_ms=1, hold_ms=hold_ms)


async def _settle_reaped(running: Running, clock: ManualClock) -> None:
    """Past every short hold's expiry, and the reaper has released them."""
    clock.advance(HOLD_MS)
    inventory = next(s for s in running.services.values() if isinstance(s, Inventory))
    while await inventory.reap(clock.now_ms(), 256):
        pass


async def _clean_books(running: Running) -> None:
    report = await verify(running.engine.store, running.engine.snapshot, [type(s) for s in running.services.values()])
    assert report.findings == []


@ACROSS
async def test_settled_holds_and_their_records_are_pruned_after_the_retention_and_a_retry_is_told_its_key_expired(pruning):
    running, clock, stub = pruning
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=20, request_id="init"), timeout=10)
    sold = await stub.Reserve(_reserve("o-sold", 3), timeout=10)
    await stub.Confirm(pb.ConfirmRequest(reservation_id=sold.reservation_id, quantity=2), timeout=10)
    released = await stub.Reserve(_reserve("o-released", 4), timeout=10)
    await stub.Release(pb.ReleaseRequest(reservation_id=released.reservation_id), timeout=10)
    expired = await stub.Reserve(_reserve("o-expired", 5), timeout=10)
    live = await stub.Reserve(_reserve("o-live", 6, hold_ms=10 * RETENTION_MS), timeout=10)
    await _settle_reaped(running, clock)
    assert await stock_figures(stub, SKU) == (20, 12, 6, 2)

    clock.advance(RETENTION_MS)  # the holds settled (by their expiry at the latest) exactly a retention ago: kept
    assert await running.retention.prune() == Pruned(records=1)  # PutStock's, which names no entity

    clock.advance(1)
    pruned = await running.retention.prune()
    # 3 holds; 5 records (3 Reserves, Confirm, Release), and the reaper's expiry record buried with its hold.
    assert pruned == Pruned(rows=3, records=5, tombstones=0)
    for gone in (sold, released, expired):
        assert (await fails(stub.GetReservation, pb.GetReservationRequest(reservation_id=gone.reservation_id))).reason \
            == "RESERVATION_NOT_FOUND"
        assert await running.engine.snapshot.version(gone.reservation_id) is None
    kept = await stub.GetReservation(pb.GetReservationRequest(reservation_id=live.reservation_id), timeout=10)
    assert (kept.state, kept.version) == (RESERVED, 1)
    assert await running.engine.snapshot.version(live.reservation_id) == 1

    # A retry of a pruned key is neither replayed nor run again; the live hold's replays.
    retried = await fails(stub.Reserve, _reserve("o-expired", 5))
    assert (retried.code, retried.reason) == (FAILED_PRECONDITION, "IDEMPOTENCY_KEY_EXPIRED")
    call = stub.Reserve(_reserve("o-live", 6, hold_ms=10 * RETENTION_MS), timeout=10)
    assert (await call).SerializeToString() == live.SerializeToString()
    assert dict(await call.trailing_metadata())["holdfast-replayed"] == "true"
    assert await stock_figures(stub, SKU) == (20, 12, 6, 2)
    assert (await running.engine.store.transact(lambda txn: txn.row(PRUNED_SALES, SKU))).sold == 2
    await _clean_books(running)

    # The tombstones go after their own window; then the key is a new request.
    clock.advance(TOMBSTONE_MS)
    assert (await running.retention.prune()).tombstones == 1  # PutStock's, a round earlier
    clock.advance(1)
    assert (await running.retention.prune()).tombstones == 6
    again = await stub.Reserve(_reserve("o-expired", 5), timeout=10)
    assert (again.reservation_id, again.state, again.version) == (expired.reservation_id, RESERVED, 1)
    assert await stock_figures(stub, SKU) == (20, 7, 11, 2)


@ACROSS
async def test_a_live_hold_keeps_its_rows_and_records_whatever_their_age(pruning):
    running, clock, stub = pruning
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=5, request_id="init"), timeout=10)
    live = await stub.Reserve(_reserve("o-long", 2, hold_ms=100 * RETENTION_MS), timeout=10)
    clock.advance(50 * RETENTION_MS)
    assert await running.retention.prune() == Pruned(records=1)  # PutStock's, which names no entity
    call = stub.Reserve(_reserve("o-long", 2, hold_ms=100 * RETENTION_MS), timeout=10)
    assert (await call).SerializeToString() == live.SerializeToString()
    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=live.reservation_id), timeout=10)
    assert (confirmed.state, confirmed.version) == (CONFIRMED, 2)
    assert await stock_figures(stub, SKU) == (5, 3, 0, 2)


async def test_a_round_scans_a_bounded_number_of_batches_and_the_next_goes_on_from_there(config: Config):
    clock = ManualClock()
    policy = Policy(retention_ms=RETENTION_MS, tombstone_ms=TOMBSTONE_MS, interval_ms=NEVER_MS, batch=2,
                    scans_per_round=1)
    running = await start(dataclasses.replace(config, retention=policy), clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            for n in range(5):  # records that name no entity: each is prunable
                await stub.PutStock(pb.PutStockRequest(sku_id=f"sku-{n}", total=1, request_id="init"), timeout=10)
        clock.advance(RETENTION_MS + 1)
        assert [(await running.retention.prune()).records for _ in range(4)] == [2, 2, 1, 0]
    finally:
        await running.stop(0)


@ACROSS
async def test_an_order_is_pruned_with_its_lines_and_its_sales_stay_counted(pruning):
    running, clock, stub = pruning
    for sku in ("sku-x", "sku-y"):
        await stub.PutStock(pb.PutStockRequest(sku_id=sku, total=10, request_id="init"), timeout=10)
    lines = [pb.OrderLine(sku_id="sku-x", quantity=2), pb.OrderLine(sku_id="sku-y", quantity=3)]
    order = await stub.ReserveOrder(pb.ReserveOrderRequest(order_id="o", lines=lines, timestamp_ms=1, hold_ms=HOLD_MS),
                                    timeout=10)
    await stub.ConfirmOrder(pb.ConfirmOrderRequest(order_hold_id=order.order_hold_id), timeout=10)
    clock.advance(HOLD_MS + RETENTION_MS + 1)
    assert (await running.retention.prune()).rows == 3  # the order hold and its two lines, in one batch
    assert (await fails(stub.GetOrder, pb.GetOrderRequest(order_hold_id=order.order_hold_id))).code == NOT_FOUND
    assert await stock_figures(stub, "sku-x") == (10, 8, 0, 2)
    assert await stock_figures(stub, "sku-y") == (10, 7, 0, 3)
    await _clean_books(running)


@ACROSS
async def test_a_framework_entity_is_pruned_once_it_rests_in_a_terminal_state_for_the_retention(pruning):
    running, clock, _ = pruning
    now = clock.now_ms()
    rows = {"wb_done": Waybill.ACKNOWLEDGED, "wb_failed": Waybill.FAILED, "wb_open": Waybill.CREATED}
    for entity_id, state in rows.items():
        entity = Entity(entity_id, WAYBILL.name, int(state), 1, b"{}", updated_at_ms=now)
        await running.engine.store.transact(lambda txn, e=entity: txn.save_entity(e, 0))
    clock.advance(RETENTION_MS)
    assert (await running.retention.prune()).rows == 0  # settled exactly a retention ago: kept
    clock.advance(1)
    assert (await running.retention.prune()).rows == 2
    left = await running.engine.store.transact(lambda txn: {k: txn.entity(k) for k in rows})
    assert [k for k, e in left.items() if e is not None] == ["wb_open"]


async def test_a_journal_with_pruning_replays_identically(tmp_path: Path, config: Config):
    """The recording prunes on its own (interval 1 ms, retention 1 ms); the
    replay prunes at each journaled round's time, so the retries of pruned
    keys answer IDEMPOTENCY_KEY_EXPIRED there too."""
    journal = tmp_path / "journal.jsonl"
    policy = Policy(retention_ms=1, tombstone_ms=60_000, interval_ms=1, batch=3)
    recording = dataclasses.replace(config, journal=str(journal), retention=policy)
    running = await start(recording)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=50, request_id="init"), timeout=10)
            for n in range(5):
                held = await stub.Reserve(_reserve(f"o{n}", 1), timeout=10)
                await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id), timeout=10)
            await _pruned_everything(running)
            expired = await fails(stub.Reserve, _reserve("o0", 1))
            assert expired.reason == "IDEMPOTENCY_KEY_EXPIRED"
    finally:
        await running.stop(0)
    lines = journal.read_text()
    assert '"kind":"prune"' in lines
    report = await asyncio.to_thread(replay.replay, journal)
    assert report.identical, report.differences
    assert report.prunes >= 1 and report.calls == 12


async def _pruned_everything(running: Running, timeout_s: float = 20.0) -> None:
    """Waits for the reaper's retention rounds to have pruned every settled hold."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await running.engine.store.transact(lambda txn: txn.select(RESERVATIONS, _ANY_RESERVATION, (), 1)):
        assert asyncio.get_running_loop().time() < deadline, "retention never pruned the settled holds"
        await asyncio.sleep(0.05)


_ANY_RESERVATION = Query(where="1 = 1", order_by="reservation_id", matches=lambda r, params: True,
                         order=lambda r: r.reservation_id)
