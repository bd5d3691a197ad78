"""The engine's own guarantees: replay, in-flight refusal, budget, compensation."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest
import transitions

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import metrics
from holdfast.apps.inventory import InventoryReason
from holdfast.clock import ManualClock
from holdfast.engine import Move
from holdfast.apps.inventory_machine import State
from holdfast.outcome import Reason, failure, success
from holdfast.server import start
from holdfast.backends import open_store
from holdfast.apps.inventory_store import RESERVATIONS, TABLES, Reservation, Stock, put_stock, reservation, save_reservation, stock, take_stock
from tests.support import failure_of


def _move(key: bytes, apply, entity: str | None = None, fingerprint: bytes = b"fp") -> Move:
    return Move("/test/Move", hashlib.sha256(key).digest(), fingerprint, entity, apply, RESERVATIONS)


def _take(quantity: int):
    def apply(txn, now_ms):
        if not take_stock(txn, "sku", quantity):
            return failure(InventoryReason.INSUFFICIENT_STOCK, "short")
        return success(b"took %d" % quantity)

    return apply


async def _stocked(engine, total: int = 10) -> None:
    await engine.store.transact(lambda txn: put_stock(txn, Stock("sku", total, total, 0, 0, 1)))


async def _available(engine) -> int:
    return (await engine.store.transact(lambda txn: stock(txn, "sku"))).available


async def test_recorded_outcome_replays_with_the_same_payload(server):
    engine = server.engine
    await _stocked(engine)
    first = await engine.move(_move(b"k", _take(3)))
    again = await engine.move(_move(b"k", _take(3)))
    assert (first.ok, first.replayed, again.replayed) == (True, False, True)
    assert again.payload == first.payload == b"took 3"
    assert await _available(engine) == 7


async def test_same_key_with_another_fingerprint_is_refused(server):
    await _stocked(server.engine)
    await server.engine.move(_move(b"k", _take(3)))
    other = await server.engine.move(_move(b"k", _take(4), fingerprint=b"other"))
    assert other.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert await _available(server.engine) == 7


async def test_same_key_running_now_is_refused_as_in_flight(server):
    await _stocked(server.engine)
    outcomes = await asyncio.gather(*(server.engine.move(_move(b"k", _take(1))) for _ in range(2)))
    assert [o.reason for o in outcomes] == [None, Reason.REQUEST_IN_FLIGHT]
    assert await _available(server.engine) == 9


async def test_unrecorded_failure_lets_a_retry_succeed(server):
    engine = server.engine
    missing = await engine.move(_move(b"k", lambda txn, now: failure(InventoryReason.SKU_NOT_FOUND, "no sku")))
    assert missing.reason is InventoryReason.SKU_NOT_FOUND
    await _stocked(engine)
    assert (await engine.move(_move(b"k", _take(2)))).ok


async def test_spent_budget_answers_budget_exceeded_and_changes_nothing(server):
    engine = server.engine
    await _stocked(engine)
    late = await engine.move(_move(b"k", _take(2)), deadline=time.monotonic() - 0.01)
    assert late.reason is Reason.BUDGET_EXCEEDED
    assert await _available(engine) == 10
    assert (await engine.move(_move(b"k", _take(2)))).replayed is False  # nothing was recorded


async def test_snapshot_ahead_of_the_store_compensates_then_the_next_move_succeeds(server, stub):
    await stub.PutStock(pb.PutStockRequest(sku_id="sku", total=5, request_id="r"))
    held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku", quantity=2, timestamp_ms=1))
    await server.engine.snapshot.reset(held.reservation_id, 7)  # as after a restore of the store
    before = metrics.COMPENSATIONS._value.get()

    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    found = failure_of(conflict.value)
    assert (found.code, found.reason) == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT")
    assert metrics.COMPENSATIONS._value.get() == before + 1
    assert await server.engine.snapshot.version(held.reservation_id) == 1
    unchanged = await stub.GetReservation(pb.GetReservationRequest(reservation_id=held.reservation_id))
    assert (unchanged.state, unchanged.version) == (pb.RESERVATION_STATE_RESERVED, 1)

    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    assert (confirmed.state, confirmed.version) == (pb.RESERVATION_STATE_CONFIRMED, 2)


async def test_snapshot_behind_the_store_compensates_and_the_move_runs_on_the_stores_state(server, stub):
    """A snapshot that missed a committed move (it lagged, or another instance
    raced this one) is caught up, and the move decides on what the store
    holds: its first answer is final, and a retry replays it."""
    await stub.PutStock(pb.PutStockRequest(sku_id="sku", total=5, request_id="r"))
    held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku", quantity=2, timestamp_ms=1))
    await server.engine.snapshot.reset(held.reservation_id, 0)
    before = metrics.COMPENSATIONS._value.get()

    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    assert (confirmed.state, confirmed.version) == (pb.RESERVATION_STATE_CONFIRMED, 2)
    assert metrics.COMPENSATIONS._value.get() == before + 1
    assert await server.engine.snapshot.version(held.reservation_id) == 2
    call = stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    assert await call == confirmed
    assert ("holdfast-replayed", "true") in tuple(await call.trailing_metadata())

async def test_moves_never_build_a_state_machine(server, stub, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a transitions.Machine was built on the request path")

    monkeypatch.setattr(transitions.Machine, "__init__", refuse)
    await stub.PutStock(pb.PutStockRequest(sku_id="sku", total=5, request_id="r"))
    held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku", quantity=2, timestamp_ms=1))
    done = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    assert done.state == pb.RESERVATION_STATE_CONFIRMED


@pytest.mark.parametrize("elapsed_ms, reason", [(999, None), (1000, "HOLD_EXPIRED")])
async def test_hold_expires_exactly_at_expires_at(config, elapsed_ms, reason):
    clock = ManualClock()
    running = await start(config, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await stub.PutStock(pb.PutStockRequest(sku_id="sku", total=5, request_id="r"))
            held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku", quantity=2, timestamp_ms=1, hold_ms=1000))
            assert held.expires_at_ms == clock.now_ms() + 1000
            clock.advance(elapsed_ms)
            call = stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
            if reason is None:
                assert (await call).state == pb.RESERVATION_STATE_CONFIRMED
            else:
                with pytest.raises(grpc.aio.AioRpcError) as expired:
                    await call
                assert failure_of(expired.value).reason == reason
    finally:
        await running.stop(0)


async def test_recovery_resolves_intents_left_in_the_store(config):
    """A crashed writer that persisted intents: RESERVING goes back (nothing
    held), CONFIRMING and RELEASING go forward (their units were held)."""
    store = open_store(config.store, tables=TABLES)
    await store.open()
    intents = (("back", State.RESERVING, 1), ("sold", State.CONFIRMING, 2), ("freed", State.RELEASING, 3))

    def seed(txn):
        put_stock(txn, Stock("sku", 10, 5, 5, 0, 3))  # held: 2 confirming + 3 releasing
        for rid, state, quantity in intents:
            save_reservation(txn, Reservation(rid, "o", "sku", quantity, state, 1, 10**15), 0)

    await store.transact(seed)
    await store.close()

    running = await start(config)
    try:
        found = {
            rid: await running.engine.store.transact(lambda txn, rid=rid: reservation(txn, rid))
            for rid in ("back", "sold", "freed")
        }
        books = await running.engine.store.transact(lambda txn: stock(txn, "sku"))
    finally:
        await running.stop(0)
    assert (found["back"].state, found["back"].version, found["back"].retry_count) == (State.AVAILABLE, 2, 1)
    assert (found["sold"].state, found["sold"].version) == (State.CONFIRMED, 2)
    assert (found["freed"].state, found["freed"].version) == (State.RELEASED, 2)
    assert books == Stock("sku", 10, 8, 0, 2, 5)


async def test_reserve_out_of_budget_answers_budget_exceeded_and_changes_nothing(server, stub):
    """The store is busy past Reserve's 2,000 ms contract budget while the client
    would still wait: the server answers BUDGET_EXCEEDED and nothing is held."""
    await stub.PutStock(pb.PutStockRequest(sku_id="sku", total=5, request_id="r"))
    request = pb.ReserveRequest(order_id="o", sku_id="sku", quantity=2, timestamp_ms=1)
    busy = asyncio.create_task(server.engine.store.transact(lambda txn: time.sleep(2.5)))
    await asyncio.sleep(0.05)  # the store's thread is now inside the busy transaction

    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Reserve(request, timeout=30)
    found = failure_of(late.value)
    assert (found.code, found.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "BUDGET_EXCEEDED")
    await busy

    stock = await stub.GetStock(pb.GetStockRequest(sku_id="sku"))
    assert (stock.available, stock.held, stock.version) == (5, 0, 1)
    held = await stub.Reserve(request, timeout=30)
    assert (held.state, held.version) == (pb.RESERVATION_STATE_RESERVED, 1)
