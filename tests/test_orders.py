"""Multi-line orders (issue 13, item 2): ReserveOrder holds several
(SKU, quantity) lines in one move, all or nothing; ConfirmOrder,
ReleaseOrder and the reaper move the whole order. Over real gRPC on the
embedded pair, on PostgreSQL + Redis and on PostgreSQL + Redis Cluster:
exact figures, exact stock under contention with overlapping orders,
replay identity through the journal, and no deadlock between orders naming
their lines in opposite orders."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import grpc
import psycopg
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import replay
from holdfast.apps.inventory_store import due_holds
from holdfast.clock import ManualClock
from holdfast.server import Config, start
from tests.conftest import BACKENDS
from tests.support import BUILT_IN_APPS, raw_call
from tests.test_api import (
    ALREADY_EXISTS,
    CONFIRMED,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RELEASED,
    REPLAYED,
    RESERVED,
    fails,
    reservation_of,
    stock_figures,
)

# Every backend pair of tests/conftest.py, through its `backend` -> `config` ->
# `server` fixtures: SQLite + memory, PostgreSQL + Redis, PostgreSQL + Redis Cluster.
ACROSS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
SKUS = ("sku-a", "sku-b", "sku-c")


def order(order_id: str, *lines: tuple[str, int], timestamp_ms: int = 1, hold_ms: int = 0) -> pb.ReserveOrderRequest:
    return pb.ReserveOrderRequest(
        order_id=order_id, lines=[pb.OrderLine(sku_id=s, quantity=q) for s, q in lines], timestamp_ms=timestamp_ms,
        hold_ms=hold_ms,
    )


async def _stocked(stub, total: int = 10) -> None:
    for sku in SKUS:
        await stub.PutStock(pb.PutStockRequest(sku_id=sku, total=total, request_id="init"), timeout=10)


async def _all_figures(stub) -> dict[str, tuple[int, int, int, int]]:
    return {sku: await stock_figures(stub, sku) for sku in SKUS}


# -- one order, exactly -----------------------------------------------------------------


@ACROSS
async def test_an_order_holds_every_line_in_one_move_and_replays_its_bytes(stub, channel):
    await _stocked(stub)
    request = order("o1", ("sku-b", 2), ("sku-a", 3))
    body, trailing = await raw_call(channel, "ReserveOrder", request)
    reply = pb.OrderReply.FromString(body)
    assert reply.order_hold_id.startswith("ord_") and (reply.order_id, reply.state, reply.version) == ("o1", RESERVED, 1)
    assert [(line.sku_id, line.quantity, line.state, line.version) for line in reply.lines] == [
        ("sku-b", 2, RESERVED, 1), ("sku-a", 3, RESERVED, 1)]  # in the request's order
    assert all(line.expires_at_ms == reply.expires_at_ms > 0 and line.order_id == "o1" for line in reply.lines)
    assert await _all_figures(stub) == {"sku-a": (10, 7, 3, 0), "sku-b": (10, 8, 2, 0), "sku-c": (10, 10, 0, 0)}
    # Each line is a reservation of its own; GetOrder reads what ReserveOrder answered.
    assert (await reservation_of(stub, reply.lines[0].reservation_id)) == reply.lines[0]
    got, _ = await raw_call(channel, "GetOrder", pb.GetOrderRequest(order_hold_id=reply.order_hold_id))
    assert got == body

    again, again_trailing = await raw_call(channel, "ReserveOrder", request)
    assert again == body and again_trailing.get(REPLAYED) == "true" and trailing.get(REPLAYED) != "true"
    other = order("o1", ("sku-b", 2), ("sku-a", 4))
    refused = await fails(stub.ReserveOrder, other)
    assert (refused.code, refused.reason) == (ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert (await stock_figures(stub, "sku-a")) == (10, 7, 3, 0)


@ACROSS
async def test_confirm_and_release_act_on_the_whole_order(stub, channel):
    await _stocked(stub)
    sold = await stub.ReserveOrder(order("sold", ("sku-a", 3), ("sku-b", 1)), timeout=10)
    back = await stub.ReserveOrder(order("back", ("sku-b", 4), ("sku-c", 5)), timeout=10)
    body, _ = await raw_call(channel, "ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=sold.order_hold_id, expected_version=1))
    confirmed = pb.OrderReply.FromString(body)
    assert (confirmed.state, confirmed.version) == (CONFIRMED, 2)
    assert [(line.state, line.version) for line in confirmed.lines] == [(CONFIRMED, 2)] * 2
    released = await stub.ReleaseOrder(pb.ReleaseOrderRequest(order_hold_id=back.order_hold_id, reason="cart emptied"), timeout=10)
    assert (released.state, released.version) == (RELEASED, 2)
    assert [line.state for line in released.lines] == [RELEASED] * 2
    assert await _all_figures(stub) == {"sku-a": (10, 7, 0, 3), "sku-b": (10, 9, 0, 1), "sku-c": (10, 10, 0, 0)}

    again, trailing = await raw_call(channel, "ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=sold.order_hold_id, expected_version=1))
    assert again == body and trailing.get(REPLAYED) == "true"
    refused = await fails(stub.ReleaseOrder, pb.ReleaseOrderRequest(order_hold_id=sold.order_hold_id))
    assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "INVALID_TRANSITION")
    stale = await stub.ReserveOrder(order("stale", ("sku-c", 1)), timeout=10)
    refused = await fails(stub.ConfirmOrder, pb.ConfirmOrderRequest(order_hold_id=stale.order_hold_id, expected_version=7))
    assert (refused.code, refused.reason) == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT")
    refused = await fails(stub.ConfirmOrder, pb.ConfirmOrderRequest(order_hold_id="ord_unknown"))
    assert (refused.code, refused.reason) == (NOT_FOUND, "RESERVATION_NOT_FOUND")


@ACROSS
async def test_a_line_never_moves_without_its_order(stub):
    await _stocked(stub)
    held = await stub.ReserveOrder(order("o1", ("sku-a", 1), ("sku-b", 1)), timeout=10)
    line, other = held.lines[0].reservation_id, held.lines[1].reservation_id
    for call, request in ((stub.Confirm, pb.ConfirmRequest(reservation_id=line)),
                          (stub.Confirm, pb.ConfirmRequest(reservation_id=other, quantity=1)),
                          (stub.Release, pb.ReleaseRequest(reservation_id=line))):
        refused = await fails(call, request)
        assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "INVALID_TRANSITION")
        assert held.order_hold_id in refused.message
    assert (await reservation_of(stub, line)).state == RESERVED
    assert await stock_figures(stub, "sku-a") == (10, 9, 1, 0)


# -- refusals: all or nothing ---------------------------------------------------------------


@ACROSS
async def test_a_line_short_of_stock_holds_nothing_and_is_recorded_naming_its_sku(stub):
    await _stocked(stub)
    request = order("o1", ("sku-a", 2), ("sku-c", 11), ("sku-b", 1))
    for _ in range(2):  # recorded: the retry answers the same
        refused = await fails(stub.ReserveOrder, request)
        assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
        assert "sku-c" in refused.message and "lines[1]" in refused.message
    assert await _all_figures(stub) == {sku: (10, 10, 0, 0) for sku in SKUS}


@ACROSS
async def test_an_unknown_sku_holds_nothing_and_is_not_recorded(stub):
    await _stocked(stub)
    request = order("o1", ("sku-a", 2), ("sku-zz", 1))
    refused = await fails(stub.ReserveOrder, request)
    assert (refused.code, refused.reason) == (NOT_FOUND, "SKU_NOT_FOUND")
    assert "sku-zz" in refused.message
    assert await _all_figures(stub) == {sku: (10, 10, 0, 0) for sku in SKUS}
    await stub.PutStock(pb.PutStockRequest(sku_id="sku-zz", total=1, request_id="late"), timeout=10)
    assert (await stub.ReserveOrder(request, timeout=10)).state == RESERVED  # the same key, now that it exists


@pytest.mark.parametrize(
    "lines, violations",
    [
        ([("sku-a", 1), ("sku-b", 1), ("sku-a", 2)],
         [("lines[2].sku_id", "lines[2].sku_id repeats the SKU of lines[0]: one line per SKU")]),
        ([], [("lines", "an order must have at least one line")]),
        ([("", 1), ("sku-b", 0)],
         [("lines[0].sku_id", "lines[0].sku_id must be set"), ("lines[1].quantity", "lines[1].quantity must be positive, got 0")]),
        ([(f"s{n}", 1) for n in range(101)], [("lines", "an order may have at most 100 lines, got 101")]),
    ],
)
async def test_bad_lines_are_invalid_requests_naming_the_line(stub, lines, violations):
    await _stocked(stub)
    refused = await fails(stub.ReserveOrder, order("o1", *lines))
    assert (refused.code, refused.reason) == (INVALID_ARGUMENT, "INVALID_REQUEST")
    assert list(refused.violations) == violations
    assert await _all_figures(stub) == {sku: (10, 10, 0, 0) for sku in SKUS}


# -- time ---------------------------------------------------------------------------------


async def test_the_reaper_expires_the_whole_order_at_once(tmp_path):
    clock = ManualClock()
    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/o.db", snapshot="memory://",
                    reaper_interval_ms=10, apps=BUILT_IN_APPS)
    running = await start(config, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await _stocked(stub)
            held = await stub.ReserveOrder(order("o1", ("sku-a", 2), ("sku-b", 3), hold_ms=1_000), timeout=10)
            clock.advance(1_000)
            for _ in range(500):
                found = await stub.GetOrder(pb.GetOrderRequest(order_hold_id=held.order_hold_id), timeout=10)
                if found.state == RELEASED:
                    break
                await asyncio.sleep(0.01)
            assert (found.state, found.version) == (RELEASED, 2)
            assert [(line.state, line.version) for line in found.lines] == [(RELEASED, 2)] * 2
            assert await _all_figures(stub) == {sku: (10, 10, 0, 0) for sku in SKUS}
            for call, request in ((stub.ConfirmOrder, pb.ConfirmOrderRequest(order_hold_id=held.order_hold_id)),
                                  (stub.ReleaseOrder, pb.ReleaseOrderRequest(order_hold_id=held.order_hold_id))):
                refused = await fails(call, request)
                assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "HOLD_EXPIRED")
    finally:
        await running.stop(0)


# -- contention ------------------------------------------------------------------------------


async def _overlapping_orders(stubs, orders: int, seed: int) -> dict[str, int]:
    """`orders` concurrent ReserveOrders of 1-3 lines over three SKUs in a
    random line order, spread over `stubs`; half confirmed and a quarter
    released afterwards, concurrently too. Returns the units each SKU must
    then have sold, from the answers alone."""
    rng = random.Random(seed)
    requests = []
    for n in range(orders):
        skus = rng.sample(SKUS, rng.randint(1, 3))
        requests.append(order(f"o{n}", *((sku, rng.randint(1, 3)) for sku in skus)))

    async def one(n: int, request: pb.ReserveOrderRequest) -> pb.OrderReply | None:
        try:
            return await stubs[n % len(stubs)].ReserveOrder(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            assert error.code() == FAILED_PRECONDITION, error  # INSUFFICIENT_STOCK, never a conflict
            return None

    held = [reply for reply in await asyncio.gather(*(one(n, r) for n, r in enumerate(requests))) if reply is not None]
    assert held, "some order must have been held"
    sold: dict[str, int] = dict.fromkeys(SKUS, 0)
    moves = []
    for n, reply in enumerate(held):
        stub = stubs[n % len(stubs)]
        if n % 4 < 2:
            moves.append(stub.ConfirmOrder(pb.ConfirmOrderRequest(order_hold_id=reply.order_hold_id), timeout=30))
            for line in reply.lines:
                sold[line.sku_id] += line.quantity
        elif n % 4 == 2:
            moves.append(stub.ReleaseOrder(pb.ReleaseOrderRequest(order_hold_id=reply.order_hold_id), timeout=30))
    for done in await asyncio.gather(*moves):
        assert done.state in (CONFIRMED, RELEASED) and all(line.state == done.state for line in done.lines)
    held_left = dict.fromkeys(SKUS, 0)
    for n, reply in enumerate(held):
        if n % 4 == 3:
            for line in reply.lines:
                held_left[line.sku_id] += line.quantity
    for sku in SKUS:
        total, available, held_now, sold_now = await stock_figures(stubs[0], sku)
        assert (held_now, sold_now) == (held_left[sku], sold[sku]), sku
    return sold


@ACROSS
async def test_overlapping_orders_take_exact_stock(stub):
    await _stocked(stub, total=20)
    await _overlapping_orders([stub], orders=40, seed=7)


def _deadlocks(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        return int(db.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()[0])


async def test_orders_in_opposite_line_orders_never_deadlock_on_postgresql(postgres_url, redis_url):
    """Two instances, two store connections each, on one PostgreSQL: every
    order holds sku-a and sku-b, half naming them a-then-b, half b-then-a,
    all at once, and then all confirmed or released at once. The prefetch
    locks each table's rows in key order, so PostgreSQL never finds a cycle."""
    config = Config(listen="127.0.0.1:0", store=postgres_url, snapshot=redis_url, store_pool=2, apps=BUILT_IN_APPS)
    servers = [await start(config), await start(config)]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
        stubs = [pb_grpc.InventoryServiceStub(c) for c in channels]
        await _stocked(stubs[0], total=1_000)
        before = _deadlocks(postgres_url)
        lines = [(("sku-a", 1), ("sku-b", 2)), (("sku-b", 2), ("sku-a", 1))]
        requests = [order(f"o{n}", *lines[n % 2]) for n in range(120)]
        held = await asyncio.gather(*(stubs[n % 2].ReserveOrder(r, timeout=30) for n, r in enumerate(requests)))
        assert await stock_figures(stubs[0], "sku-a") == (1_000, 880, 120, 0)
        assert await stock_figures(stubs[1], "sku-b") == (1_000, 760, 240, 0)
        settled = await asyncio.gather(*(
            stubs[(n + 1) % 2].ConfirmOrder(pb.ConfirmOrderRequest(order_hold_id=h.order_hold_id), timeout=30) if n % 3
            else stubs[n % 2].ReleaseOrder(pb.ReleaseOrderRequest(order_hold_id=h.order_hold_id), timeout=30)
            for n, h in enumerate(held)
        ))
        confirmed = sum(1 for s in settled if s.state == CONFIRMED)
        assert confirmed == 80
        assert await stock_figures(stubs[0], "sku-a") == (1_000, 1_000 - confirmed, 0, confirmed)
        assert await stock_figures(stubs[0], "sku-b") == (1_000, 1_000 - 2 * confirmed, 0, 2 * confirmed)
        assert _deadlocks(postgres_url) == before
        for channel in channels:
            await channel.close()
    finally:
        for s in servers:
            await s.stop(0)


@pytest.mark.parametrize("snapshot", ["redis_url", "redis_cluster_url"])
async def test_overlapping_orders_on_two_instances_of_postgresql_and_redis(postgres_url, snapshot, request):
    snapshot_url = request.getfixturevalue(snapshot)
    config = Config(listen="127.0.0.1:0", store=postgres_url, snapshot=snapshot_url, store_pool=2, apps=BUILT_IN_APPS)
    servers = [await start(config), await start(config)]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
        stubs = [pb_grpc.InventoryServiceStub(c) for c in channels]
        await _stocked(stubs[0], total=25)
        await _overlapping_orders(stubs, orders=60, seed=11)
        for channel in channels:
            await channel.close()
    finally:
        for s in servers:
            await s.stop(0)


# -- the journal ---------------------------------------------------------------------------


async def _record_orders(folder: Path, config: Config) -> Path:
    """Orders, partial confirms and expiries recorded on `config`'s backend pair."""
    clock = ManualClock()
    journal = folder / "journal.jsonl"
    config = dataclasses.replace(config, reaper_interval_ms=10, journal=str(journal))
    running = await start(config, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            await _stocked(stub, total=30)
            rng = random.Random(5)
            holds: list[str] = []
            for n in range(60):
                kind = rng.random()
                try:
                    if kind < 0.5 or not holds:
                        skus = rng.sample(SKUS, rng.randint(1, 3))
                        lines = [(sku, rng.randint(1, 4)) for sku in skus]
                        if rng.random() < 0.1:
                            lines.append(lines[0])  # a duplicate line: refused
                        reply = await stub.ReserveOrder(order(f"o{n}", *lines, timestamp_ms=n, hold_ms=200), timeout=10)
                        holds.append(reply.order_hold_id)
                    elif kind < 0.7:
                        await stub.ConfirmOrder(pb.ConfirmOrderRequest(order_hold_id=rng.choice(holds)), timeout=10)
                    elif kind < 0.85:
                        await stub.ReleaseOrder(pb.ReleaseOrderRequest(order_hold_id=rng.choice(holds)), timeout=10)
                    else:
                        held = await stub.Reserve(pb.ReserveRequest(order_id=f"r{n}", sku_id=rng.choice(SKUS), quantity=3, timestamp_ms=n), timeout=10)
                        await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=rng.randint(1, 3)), timeout=10)
                except grpc.aio.AioRpcError:
                    pass
                if n % 10 == 9:
                    clock.advance(250)
                    now_ms = clock.now_ms()
                    while await running.engine.store.transact(lambda txn: due_holds(txn, now_ms, 1)):
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.05)
    finally:
        await running.stop(0)
    return journal


@ACROSS
def test_a_recorded_load_of_orders_replays_identically(tmp_path: Path, config: Config) -> None:
    """Recorded on each backend pair, replayed on a fresh embedded instance:
    the same answers, byte for byte, whatever the store and snapshot."""
    journal = asyncio.run(_record_orders(tmp_path, config))
    report = replay.replay(journal)
    assert report.identical, "\n".join(d.describe() for d in report.differences[:5])
    assert report.calls > 60
    assert report.timeouts >= 1  # an order's expiry, replayed as one move
