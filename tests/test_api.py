"""The public API of `holdfast.inventory.v1.InventoryService`, over real gRPC.

Every test talks to a real server (tests/conftest.py) through a real channel
and pins exact figures: reservation states and versions, stock figures, error
codes and reasons, and reply / status-detail bytes. Nothing is mocked; time
appears only as generous timeouts around polling, never as a tight assertion.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.clock import ManualClock
from holdfast.server import Config, start
from tests.support import BUILT_IN_APPS, Failure, failure_of, raw_call

SERVICE = "/holdfast.inventory.v1.InventoryService"
SKU = "sku-1"
DEFAULT_HOLD_MS = 15 * 60 * 1000
MAX_HOLD_MS = 7 * 24 * 60 * 60 * 1000
CONTEXT_ID = "holdfast-context-id"
REPLAYED = "holdfast-replayed"
DETAILS = "grpc-status-details-bin"

RESERVED = pb.RESERVATION_STATE_RESERVED
CONFIRMED = pb.RESERVATION_STATE_CONFIRMED
RELEASED = pb.RESERVATION_STATE_RELEASED

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ABORTED = grpc.StatusCode.ABORTED

# DESIGN.md, "recorded under the key": these replay as themselves.
RECORDED = frozenset({"INSUFFICIENT_STOCK", "INVALID_TRANSITION", "HOLD_EXPIRED", "STOCK_BELOW_COMMITTED"})


# -- helpers ----------------------------------------------------------------------


def figures(stock: pb.StockReply) -> tuple[int, int, int, int]:
    """(total, available, held, sold), after checking the invariant."""
    assert stock.available + stock.held + stock.sold == stock.total, stock
    assert min(stock.available, stock.held, stock.sold) >= 0, stock
    return stock.total, stock.available, stock.held, stock.sold


async def stock_figures(stub, sku_id: str = SKU) -> tuple[int, int, int, int]:
    return figures(await stub.GetStock(pb.GetStockRequest(sku_id=sku_id), timeout=10))


async def fails(call: Callable, request, **kwargs) -> Failure:
    """Runs one call that must fail; returns its code, reason and violations."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, timeout=10, **kwargs)
    failure = failure_of(caught.value)
    assert failure.domain == "holdfast", failure
    return failure


async def fails_raw(channel, method: str, body: bytes) -> Failure:
    """Sends `body` as the request's wire bytes, unparsed by the client."""
    rpc = channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc(body, timeout=10)
    failure = failure_of(caught.value)
    assert failure.domain == "holdfast", failure
    return failure


async def reservation_of(stub, reservation_id: str) -> pb.ReservationReply:
    return await stub.GetReservation(pb.GetReservationRequest(reservation_id=reservation_id), timeout=10)


def reserve(order_id: str, quantity: int, timestamp_ms: int = 1, sku_id: str = SKU, hold_ms: int = 0) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order_id, sku_id=sku_id, quantity=quantity, timestamp_ms=timestamp_ms, hold_ms=hold_ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class World:
    """SKU `sku-1`: total 10; `reserved` holds 3 (RESERVED, v1); `confirmed`
    sold 2 (CONFIRMED, v2). So the stock reads 10 = 5 available + 3 held + 2 sold."""

    reserved: str
    confirmed: str


@pytest.fixture
async def world(stub) -> World:
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="init"))
    held = await stub.Reserve(reserve("order-held", 3, timestamp_ms=1))
    sold = await stub.Reserve(reserve("order-sold", 2, timestamp_ms=2))
    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=sold.reservation_id, expected_version=1))
    assert (held.state, held.version) == (RESERVED, 1)
    assert (confirmed.state, confirmed.version) == (CONFIRMED, 2)
    assert await stock_figures(stub) == (10, 5, 3, 2)
    return World(held.reservation_id, sold.reservation_id)


async def observe(channel, world: World, skus: tuple[str, ...] = ()) -> tuple:
    """Everything a bad call must leave alone, as exact bytes (or the error a
    read gives): the stock of `sku-1` and of any SKU the call named, and both
    reservations."""
    seen: list = []
    reads = [("GetStock", pb.GetStockRequest(sku_id=s)) for s in (SKU, *skus) if s]
    reads += [("GetReservation", pb.GetReservationRequest(reservation_id=r)) for r in (world.reserved, world.confirmed)]
    for method, request in reads:
        try:
            body, _ = await raw_call(channel, method, request)
            seen.append(body)
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            seen.append((failure.code, failure.reason))
    return tuple(seen)


# -- 1. lifecycle -------------------------------------------------------------------


async def test_lifecycle_moves_stock_with_exact_figures(stub, channel):
    stock_versions = []

    async def stock_is(expected: tuple[int, int, int, int]) -> None:
        stock = await stub.GetStock(pb.GetStockRequest(sku_id=SKU))
        assert figures(stock) == expected
        stock_versions.append(stock.version)

    async def reads_back(reply: pb.ReservationReply) -> None:
        body, _ = await raw_call(channel, "GetReservation", pb.GetReservationRequest(reservation_id=reply.reservation_id))
        assert body == reply.SerializeToString(deterministic=True)

    put = await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    assert (put.sku_id, *figures(put)) == (SKU, 10, 10, 0, 0)
    await stock_is((10, 10, 0, 0))

    before = now_ms()
    held = await stub.Reserve(reserve("order-1", 3, timestamp_ms=1000))
    after = now_ms()
    assert (held.order_id, held.sku_id, held.quantity, held.state, held.version) == ("order-1", SKU, 3, RESERVED, 1)
    assert held.reservation_id
    # hold_ms 0 is the default hold of 15 minutes, counted from the server's clock.
    assert before + DEFAULT_HOLD_MS <= held.expires_at_ms <= after + DEFAULT_HOLD_MS
    await reads_back(held)
    await stock_is((10, 7, 3, 0))

    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id, expected_version=1))
    assert (confirmed.reservation_id, confirmed.state, confirmed.version) == (held.reservation_id, CONFIRMED, 2)
    assert (confirmed.order_id, confirmed.sku_id, confirmed.quantity) == ("order-1", SKU, 3)
    assert confirmed.expires_at_ms == held.expires_at_ms
    await reads_back(confirmed)
    await stock_is((10, 7, 0, 3))

    other = await stub.Reserve(reserve("order-2", 4, timestamp_ms=2000, hold_ms=60_000))
    assert (other.state, other.version, other.quantity) == (RESERVED, 1, 4)
    assert other.reservation_id != held.reservation_id
    assert other.expires_at_ms > 0
    await reads_back(other)
    await stock_is((10, 3, 4, 3))

    released = await stub.Release(pb.ReleaseRequest(reservation_id=other.reservation_id, reason="customer cancelled"))
    assert (released.reservation_id, released.state, released.version) == (other.reservation_id, RELEASED, 2)
    assert (released.quantity, released.expires_at_ms) == (4, other.expires_at_ms)
    await reads_back(released)
    await stock_is((10, 7, 0, 3))

    # The confirmed one is untouched by the other's moves.
    await reads_back(confirmed)
    assert stock_versions == sorted(set(stock_versions)), "every stock change moves its version forward"


async def test_hold_ms_sets_expiry_from_the_server_clock(stub):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=5, request_id="r1"))
    before = now_ms()
    held = await stub.Reserve(reserve("order-1", 1, hold_ms=45_000))
    after = now_ms()
    assert before + 45_000 <= held.expires_at_ms <= after + 45_000
    longest = await stub.Reserve(reserve("order-2", 1, hold_ms=MAX_HOLD_MS))
    assert longest.state == RESERVED and longest.expires_at_ms >= before + MAX_HOLD_MS


# -- 2. replay ------------------------------------------------------------------------


async def test_replay_returns_identical_bytes(stub, channel):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    request = reserve("order-1", 3, timestamp_ms=42)

    first, first_trailing = await raw_call(channel, "Reserve", request)
    again, again_trailing = await raw_call(channel, "Reserve", request)

    assert again == first
    assert (first_trailing[REPLAYED], again_trailing[REPLAYED]) == ("false", "true")
    assert first_trailing[CONTEXT_ID] and again_trailing[CONTEXT_ID] == first_trailing[CONTEXT_ID]
    held = pb.ReservationReply.FromString(first)
    assert (held.state, held.version, held.quantity) == (RESERVED, 1, 3)
    assert await stock_figures(stub) == (10, 7, 3, 0), "the stock is held once"

    # A committed move replays forever after, even once the reservation moved on.
    await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    later, later_trailing = await raw_call(channel, "Reserve", request)
    assert later == first and later_trailing[REPLAYED] == "true"
    assert later_trailing[CONTEXT_ID] == first_trailing[CONTEXT_ID]
    assert await stock_figures(stub) == (10, 7, 0, 3)


async def test_replayed_put_stock_is_applied_once(stub, channel):
    request = pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1")
    first, first_trailing = await raw_call(channel, "PutStock", request)
    await stub.Reserve(reserve("order-1", 4))
    again, again_trailing = await raw_call(channel, "PutStock", request)
    assert again == first and (first_trailing[REPLAYED], again_trailing[REPLAYED]) == ("false", "true")
    assert await stock_figures(stub) == (10, 6, 4, 0), "the replay did not reset the stock"


# -- 3. key reuse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [{"quantity": 4}, {"hold_ms": 60_000}, {"hold_ms": DEFAULT_HOLD_MS}],
    ids=["other-quantity", "other-hold_ms", "explicit-default-hold_ms"],
)
async def test_same_key_other_payload_is_idempotency_key_reused(stub, channel, change):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    original = reserve("order-1", 3, timestamp_ms=7)
    first, _ = await raw_call(channel, "Reserve", original)

    changed = pb.ReserveRequest()
    changed.CopyFrom(original)
    for name, value in change.items():
        setattr(changed, name, value)
    failure = await fails(stub.Reserve, changed)
    assert (failure.code, failure.reason) == (ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert failure.trailing[REPLAYED] == "false"

    assert await stock_figures(stub) == (10, 7, 3, 0)
    # The original is still what the key replays.
    again, trailing = await raw_call(channel, "Reserve", original)
    assert again == first and trailing[REPLAYED] == "true"


async def test_put_stock_same_key_other_total_is_idempotency_key_reused(stub):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    failure = await fails(stub.PutStock, pb.PutStockRequest(sku_id=SKU, total=11, request_id="r1"))
    assert (failure.code, failure.reason) == (ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await stock_figures(stub) == (10, 10, 0, 0)


# -- 4. recorded failures -----------------------------------------------------------


async def test_insufficient_stock_replays_as_itself_after_restock(stub, channel):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=2, request_id="r1"))
    request = reserve("order-1", 3, timestamp_ms=5)

    first = await fails(stub.Reserve, request)
    assert (first.code, first.reason, first.violations) == (FAILED_PRECONDITION, "INSUFFICIENT_STOCK", ())
    assert first.trailing[REPLAYED] == "false"
    assert await stock_figures(stub) == (2, 2, 0, 0)

    restocked = await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r2"))
    assert figures(restocked) == (10, 10, 0, 0)

    second = await fails(stub.Reserve, request)
    assert (second.code, second.reason) == (FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert second.trailing[DETAILS] == first.trailing[DETAILS]
    assert second.message == first.message
    assert second.trailing[REPLAYED] == "true"
    assert second.trailing[CONTEXT_ID] == first.trailing[CONTEXT_ID]
    assert await stock_figures(stub) == (10, 10, 0, 0)

    fresh = await stub.Reserve(reserve("order-1", 3, timestamp_ms=6))
    assert (fresh.state, fresh.version, fresh.quantity) == (RESERVED, 1, 3)
    assert await stock_figures(stub) == (10, 7, 3, 0)


async def test_unrecorded_failure_is_not_replayed(stub):
    """SKU_NOT_FOUND says nothing happened, so the same call may succeed later."""
    request = reserve("order-1", 3, sku_id="late-sku")
    failure = await fails(stub.Reserve, request)
    assert (failure.code, failure.reason) == (NOT_FOUND, "SKU_NOT_FOUND")
    await stub.PutStock(pb.PutStockRequest(sku_id="late-sku", total=5, request_id="r1"))
    call = stub.Reserve(request)
    held = await call
    assert (held.state, held.version) == (RESERVED, 1)
    assert dict(await call.trailing_metadata())[REPLAYED] == "false"
    assert await stock_figures(stub, "late-sku") == (5, 2, 3, 0)


# -- 5. contention ------------------------------------------------------------------


async def test_concurrent_reserves_sell_exactly_the_stock(stub):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=50, request_id="r1"))

    async def one(i: int):
        try:
            return await stub.Reserve(reserve(f"order-{i}", 1, timestamp_ms=1), timeout=30)
        except grpc.aio.AioRpcError as error:
            return failure_of(error)

    results = await asyncio.gather(*(one(i) for i in range(300)))
    held = [r for r in results if isinstance(r, pb.ReservationReply)]
    failed = [r for r in results if isinstance(r, Failure)]
    assert {(f.code, f.reason, f.domain) for f in failed} <= {(FAILED_PRECONDITION, "INSUFFICIENT_STOCK", "holdfast")}, {
        (f.code, f.reason) for f in failed
    }
    assert (len(held), len(failed)) == (50, 250)
    assert {(r.state, r.version, r.quantity) for r in held} == {(RESERVED, 1, 1)}
    assert len({r.reservation_id for r in held}) == 50
    assert await stock_figures(stub) == (50, 0, 50, 0)


# -- 6. bad input -------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One bad call: method, request (built from the world; bytes are sent raw),
    and the exact answer: status, reason, and the fields the violations name."""

    id: str
    method: str
    request: Callable[[World], object]
    code: grpc.StatusCode
    reason: str
    fields: tuple[str, ...] = ()

    def param(self):
        return pytest.param(self, id=self.id)


LONG_ID = "x" * 129
UNKNOWN_IDS = {
    "random": "rsv_5f0c2a9e7d1b4c3a8e6f0d2b",
    "unicode": "rsv_ünïcødé_☃_予約_🧾",
    "10k-chars": "r" * 10_000,
    "sql-like": "' OR 1=1 --",
    "control-chars": "rsv\x00\x01\n\x7f",
}

BAD_CALLS = [
    # INVALID_REQUEST: key fields present, values out of range.
    Bad("reserve-quantity-0", "Reserve", lambda w: reserve("o-new", 0), INVALID_ARGUMENT, "INVALID_REQUEST", ("quantity",)),
    Bad("reserve-quantity-negative", "Reserve", lambda w: reserve("o-new", -1), INVALID_ARGUMENT, "INVALID_REQUEST", ("quantity",)),
    Bad("reserve-hold_ms-negative", "Reserve", lambda w: reserve("o-new", 1, hold_ms=-1), INVALID_ARGUMENT, "INVALID_REQUEST", ("hold_ms",)),
    Bad("reserve-hold_ms-above-max", "Reserve", lambda w: reserve("o-new", 1, hold_ms=MAX_HOLD_MS + 1), INVALID_ARGUMENT, "INVALID_REQUEST", ("hold_ms",)),
    Bad("reserve-timestamp_ms-negative", "Reserve", lambda w: reserve("o-new", 1, timestamp_ms=-5), INVALID_ARGUMENT, "INVALID_REQUEST", ("timestamp_ms",)),
    Bad("reserve-quantity-and-hold_ms", "Reserve", lambda w: reserve("o-new", 0, hold_ms=-1), INVALID_ARGUMENT, "INVALID_REQUEST", ("quantity", "hold_ms")),
    Bad("reserve-order_id-too-long", "Reserve", lambda w: reserve(LONG_ID, 1), INVALID_ARGUMENT, "INVALID_REQUEST", ("order_id",)),
    Bad("reserve-order_id-control-chars", "Reserve", lambda w: reserve("o\nnew", 1), INVALID_ARGUMENT, "INVALID_REQUEST", ("order_id",)),
    Bad("reserve-sku_id-too-long", "Reserve", lambda w: reserve("o-new", 1, sku_id=LONG_ID), INVALID_ARGUMENT, "INVALID_REQUEST", ("sku_id",)),
    Bad("reserve-sku_id-control-chars", "Reserve", lambda w: reserve("o-new", 1, sku_id="sku\x01"), INVALID_ARGUMENT, "INVALID_REQUEST", ("sku_id",)),
    Bad("put-stock-total-negative", "PutStock", lambda w: pb.PutStockRequest(sku_id=SKU, total=-1, request_id="r-new"), INVALID_ARGUMENT, "INVALID_REQUEST", ("total",)),
    Bad("put-stock-sku_id-too-long", "PutStock", lambda w: pb.PutStockRequest(sku_id=LONG_ID, total=5, request_id="r-new"), INVALID_ARGUMENT, "INVALID_REQUEST", ("sku_id",)),
    Bad("put-stock-sku_id-control-chars", "PutStock", lambda w: pb.PutStockRequest(sku_id="sku\x1b[2J", total=5, request_id="r-new"), INVALID_ARGUMENT, "INVALID_REQUEST", ("sku_id",)),
    Bad("put-stock-request_id-too-long", "PutStock", lambda w: pb.PutStockRequest(sku_id=SKU, total=5, request_id=LONG_ID), INVALID_ARGUMENT, "INVALID_REQUEST", ("request_id",)),
    Bad("release-reason-too-long", "Release", lambda w: pb.ReleaseRequest(reservation_id=w.reserved, reason="x" * 513), INVALID_ARGUMENT, "INVALID_REQUEST", ("reason",)),
    Bad("get-stock-empty-sku_id", "GetStock", lambda w: pb.GetStockRequest(sku_id=""), INVALID_ARGUMENT, "INVALID_REQUEST", ("sku_id",)),
    Bad("get-reservation-empty-id", "GetReservation", lambda w: pb.GetReservationRequest(reservation_id=""), INVALID_ARGUMENT, "INVALID_REQUEST", ("reservation_id",)),
    # CONTRACT_VIOLATION: an idempotency key field is missing.
    Bad("reserve-empty-order_id", "Reserve", lambda w: reserve("", 1), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("order_id",)),
    Bad("reserve-empty-sku_id", "Reserve", lambda w: reserve("o-new", 1, sku_id=""), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("sku_id",)),
    Bad("reserve-timestamp_ms-0", "Reserve", lambda w: reserve("o-new", 1, timestamp_ms=0), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("timestamp_ms",)),
    Bad("reserve-all-key-fields-empty", "Reserve", lambda w: pb.ReserveRequest(quantity=1), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("order_id", "sku_id", "timestamp_ms")),
    Bad("confirm-empty-reservation_id", "Confirm", lambda w: pb.ConfirmRequest(reservation_id=""), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("reservation_id",)),
    Bad("release-empty-reservation_id", "Release", lambda w: pb.ReleaseRequest(reservation_id="", reason="x"), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("reservation_id",)),
    Bad("put-stock-empty-request_id", "PutStock", lambda w: pb.PutStockRequest(sku_id=SKU, total=5, request_id=""), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("request_id",)),
    Bad("put-stock-empty-sku_id", "PutStock", lambda w: pb.PutStockRequest(sku_id="", total=5, request_id="r-new"), INVALID_ARGUMENT, "CONTRACT_VIOLATION", ("sku_id",)),
    # NOT_FOUND: unknown ids, however spelled.
    Bad("reserve-unknown-sku", "Reserve", lambda w: reserve("o-new", 1, sku_id="no-such-sku"), NOT_FOUND, "SKU_NOT_FOUND"),
    Bad("get-stock-unknown-sku", "GetStock", lambda w: pb.GetStockRequest(sku_id="no-such-sku"), NOT_FOUND, "SKU_NOT_FOUND"),
    Bad("get-stock-unknown-long-sku", "GetStock", lambda w: pb.GetStockRequest(sku_id="s" * 10_000), NOT_FOUND, "SKU_NOT_FOUND"),
    *(
        Bad(f"{method.lower()}-unknown-{name}", method, build, NOT_FOUND, "RESERVATION_NOT_FOUND")
        for name, rid in UNKNOWN_IDS.items()
        for method, build in (
            ("Confirm", lambda w, rid=rid: pb.ConfirmRequest(reservation_id=rid)),
            ("Release", lambda w, rid=rid: pb.ReleaseRequest(reservation_id=rid, reason="x")),
            ("GetReservation", lambda w, rid=rid: pb.GetReservationRequest(reservation_id=rid)),
        )
    ),
    # State-dependent answers.
    Bad("confirm-confirmed-with-new-expected_version", "Confirm", lambda w: pb.ConfirmRequest(reservation_id=w.confirmed, expected_version=2), ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    Bad("reserve-same-key-other-quantity", "Reserve", lambda w: reserve("order-held", 4, timestamp_ms=1), ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    Bad("release-after-confirm", "Release", lambda w: pb.ReleaseRequest(reservation_id=w.confirmed, reason="too late"), FAILED_PRECONDITION, "INVALID_TRANSITION"),
    Bad("confirm-wrong-expected_version", "Confirm", lambda w: pb.ConfirmRequest(reservation_id=w.reserved, expected_version=7), ABORTED, "VERSION_CONFLICT"),
    Bad("put-stock-below-held-plus-sold", "PutStock", lambda w: pb.PutStockRequest(sku_id=SKU, total=4, request_id="r-new"), FAILED_PRECONDITION, "STOCK_BELOW_COMMITTED"),
    Bad("reserve-more-than-available", "Reserve", lambda w: reserve("o-new", 6), FAILED_PRECONDITION, "INSUFFICIENT_STOCK"),
    # Bytes that are no request at all.
    *(
        Bad(f"{method.lower()}-garbage-bytes", method, lambda w: b"\xff\xff\xff", INVALID_ARGUMENT, "INVALID_REQUEST")
        for method in ("PutStock", "GetStock", "Reserve", "Confirm", "Release", "GetReservation")
    ),
    Bad("reserve-truncated-field", "Reserve", lambda w: b"\x0a\x10abc", INVALID_ARGUMENT, "INVALID_REQUEST"),
    Bad("reserve-invalid-utf8-string", "Reserve", lambda w: b"\x0a\x02\xff\xfe", INVALID_ARGUMENT, "INVALID_REQUEST"),
]


async def _call_bad(stub, channel, bad: Bad, world: World) -> Failure:
    request = bad.request(world)
    if isinstance(request, bytes):
        return await fails_raw(channel, bad.method, request)
    return await fails(getattr(stub, bad.method), request)


@pytest.mark.parametrize("bad", [b.param() for b in BAD_CALLS])
async def test_bad_call_answers_its_reason_and_changes_nothing(stub, channel, world, bad: Bad):
    request = bad.request(world)
    skus = (getattr(request, "sku_id", ""),) if not isinstance(request, bytes) else ()
    before = await observe(channel, world, skus)

    first = await _call_bad(stub, channel, bad, world)
    assert (first.code, first.reason) == (bad.code, bad.reason), first
    assert tuple(field for field, _ in first.violations) == bad.fields, first.violations
    assert all(why for _, why in first.violations), "every violation says why"
    assert first.trailing[REPLAYED] == "false"
    if bad.reason != "CONTRACT_VIOLATION" and not isinstance(request, bytes):
        assert len(first.trailing[CONTEXT_ID]) >= 16

    assert await observe(channel, world, skus) == before
    assert await stock_figures(stub) == (10, 5, 3, 2)

    # The same call again: the same answer, replayed only when the design records it.
    second = await _call_bad(stub, channel, bad, world)
    assert (second.code, second.reason, second.violations) == (first.code, first.reason, first.violations)
    assert second.trailing[DETAILS] == first.trailing[DETAILS]
    assert second.trailing[REPLAYED] == ("true" if bad.reason in RECORDED else "false")
    assert await observe(channel, world, skus) == before

    # The server still answers.
    assert (await reservation_of(stub, world.reserved)).state == RESERVED


async def test_version_conflict_then_right_version_confirms(stub, world):
    failure = await fails(stub.Confirm, pb.ConfirmRequest(reservation_id=world.reserved, expected_version=7))
    assert (failure.code, failure.reason) == (ABORTED, "VERSION_CONFLICT")
    assert await stock_figures(stub) == (10, 5, 3, 2)
    assert (await reservation_of(stub, world.reserved)).version == 1

    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=world.reserved, expected_version=1))
    assert (confirmed.state, confirmed.version) == (CONFIRMED, 2)
    assert await stock_figures(stub) == (10, 5, 0, 5)


async def test_release_after_confirm_is_recorded_invalid_transition(stub, world):
    request = pb.ReleaseRequest(reservation_id=world.confirmed, reason="too late")
    first = await fails(stub.Release, request)
    again = await fails(stub.Release, request)
    assert (first.code, first.reason) == (again.code, again.reason) == (FAILED_PRECONDITION, "INVALID_TRANSITION")
    assert (first.trailing[REPLAYED], again.trailing[REPLAYED]) == ("false", "true")
    assert again.trailing[DETAILS] == first.trailing[DETAILS]
    assert again.trailing[CONTEXT_ID] == first.trailing[CONTEXT_ID]
    reply = await reservation_of(stub, world.confirmed)
    assert (reply.state, reply.version) == (CONFIRMED, 2)


async def test_put_stock_at_exactly_held_plus_sold_is_allowed(stub, world):
    shrunk = await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=5, request_id="r-shrink"))
    assert figures(shrunk) == (5, 0, 3, 2)
    failure = await fails(stub.Reserve, reserve("o-new", 1))
    assert failure.reason == "INSUFFICIENT_STOCK"


# -- 7. expiry ------------------------------------------------------------------------


async def test_reaper_releases_expired_hold(stub, channel):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    held = await stub.Reserve(reserve("order-1", 3, hold_ms=300))
    assert (held.state, held.version) == (RESERVED, 1)

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while (current := await reservation_of(stub, held.reservation_id)).state != RELEASED:
        assert current.state == RESERVED, current
        assert loop.time() < give_up, "the reaper did not release a 300 ms hold within 10 s"
        await asyncio.sleep(0.02)

    assert (current.state, current.version, current.quantity) == (RELEASED, 2, 3)
    assert current.expires_at_ms == held.expires_at_ms
    assert await stock_figures(stub) == (10, 10, 0, 0)

    for method, request in (
        ("Confirm", pb.ConfirmRequest(reservation_id=held.reservation_id)),
        ("Release", pb.ReleaseRequest(reservation_id=held.reservation_id, reason="late")),
    ):
        first = await fails(getattr(stub, method), request)
        assert (first.code, first.reason) == (FAILED_PRECONDITION, "HOLD_EXPIRED"), method
        again = await fails(getattr(stub, method), request)
        assert (again.reason, again.trailing[REPLAYED]) == ("HOLD_EXPIRED", "true"), method
        assert again.trailing[DETAILS] == first.trailing[DETAILS]

    after = await reservation_of(stub, held.reservation_id)
    assert (after.state, after.version) == (RELEASED, 2)
    assert await stock_figures(stub) == (10, 10, 0, 0)


# -- 8. determinism across instances ------------------------------------------------


JOURNAL: list[tuple[str, object]] = [
    ("PutStock", pb.PutStockRequest(sku_id="sku-a", total=5, request_id="r1")),
    ("PutStock", pb.PutStockRequest(sku_id="sku-b", total=1, request_id="r1")),
    ("Reserve", reserve("order-1", 2, timestamp_ms=100, sku_id="sku-a")),
    ("Reserve", reserve("order-2", 3, timestamp_ms=101, sku_id="sku-a", hold_ms=60_000)),
    ("Reserve", reserve("order-3", 1, timestamp_ms=102, sku_id="sku-a")),  # insufficient
    ("Reserve", reserve("order-4", 1, timestamp_ms=103, sku_id="sku-b")),
    ("Reserve", reserve("order-1", 2, timestamp_ms=100, sku_id="sku-a")),  # replay
    ("Confirm", 2),  # the reservation made by journal entry 2
    ("Release", 3),
    ("Release", 2),  # after confirm: invalid transition
    ("Confirm", 3),  # after release: invalid transition
    ("GetStock", pb.GetStockRequest(sku_id="sku-a")),
    ("GetStock", pb.GetStockRequest(sku_id="sku-b")),
    ("GetReservation", 5),
]


async def _play(port: int) -> list[tuple]:
    """Plays JOURNAL against one server; each answer as (replayed, bytes | (code, details))."""
    answers: list[tuple] = []
    made: dict[int, str] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for index, (method, request) in enumerate(JOURNAL):
            if isinstance(request, int):
                rid = made[request]
                request = {
                    "Confirm": pb.ConfirmRequest(reservation_id=rid),
                    "Release": pb.ReleaseRequest(reservation_id=rid, reason="journal"),
                    "GetReservation": pb.GetReservationRequest(reservation_id=rid),
                }[method]
            try:
                body, trailing = await raw_call(channel, method, request)
                if method == "Reserve":
                    made[index] = pb.ReservationReply.FromString(body).reservation_id
                answers.append((method, trailing[REPLAYED], body))
            except grpc.aio.AioRpcError as error:
                failure = failure_of(error)
                answers.append((method, failure.trailing[REPLAYED], (failure.code, failure.reason, failure.trailing[DETAILS])))
    return answers


def _without_expiry(answer: tuple) -> tuple:
    method, replayed, body = answer
    if isinstance(body, bytes) and method in ("Reserve", "Confirm", "Release", "GetReservation"):
        reply = pb.ReservationReply.FromString(body)
        assert reply.expires_at_ms > 0
        reply.expires_at_ms = 0
        body = reply.SerializeToString(deterministic=True)
    return method, replayed, body


@pytest.mark.parametrize("clock", ["system", "manual"])
async def test_two_fresh_servers_give_same_answers(tmp_path, clock):
    servers = []
    try:
        for name in ("a", "b"):
            config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/{name}.db", snapshot="memory://",
                            reaper_interval_ms=20, apps=BUILT_IN_APPS)
            servers.append(await start(config, ManualClock() if clock == "manual" else None))
        first, second = [await _play(s.port) for s in servers]
    finally:
        for running in servers:
            await running.stop(0)

    # The reservations, states and versions the journal should produce.
    replies = [
        pb.ReservationReply.FromString(body)
        for method, _, body in first
        if isinstance(body, bytes) and method not in ("PutStock", "GetStock")
    ]
    assert [(r.order_id, r.state, r.version) for r in replies] == [
        ("order-1", RESERVED, 1),
        ("order-2", RESERVED, 1),
        ("order-4", RESERVED, 1),
        ("order-1", RESERVED, 1),
        ("order-1", CONFIRMED, 2),
        ("order-2", RELEASED, 2),
        ("order-4", RESERVED, 1),
    ]
    reasons = [body[1] for _, _, body in first if not isinstance(body, bytes)]
    assert reasons == ["INSUFFICIENT_STOCK", "INVALID_TRANSITION", "INVALID_TRANSITION"]
    assert [replayed for _, replayed, _ in first].count("true") == 1
    stocks = [figures(pb.StockReply.FromString(body)) for method, _, body in first if method == "GetStock"]
    assert stocks == [(5, 3, 0, 2), (1, 0, 1, 0)]

    # Same journal in, same answers out: ids, states, versions, figures, errors.
    if clock == "manual":
        assert second == first, "with the same clock, every byte is the same"
    else:
        assert [_without_expiry(a) for a in second] == [_without_expiry(a) for a in first]
    for a, b in zip(first, second):
        if isinstance(a[2], bytes) and a[0] in ("Reserve", "Confirm", "Release", "GetReservation"):
            assert pb.ReservationReply.FromString(a[2]).reservation_id == pb.ReservationReply.FromString(b[2]).reservation_id


# -- 9. deadlines and context ids ---------------------------------------------------


async def test_generous_deadline_calls_succeed(stub):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=4, request_id="r1"), timeout=30)
    stock = await stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=30)
    assert figures(stock) == (4, 4, 0, 0)
    held = await stub.Reserve(reserve("order-1", 1), timeout=30)
    assert (held.state, held.version) == (RESERVED, 1)
    assert await stock_figures(stub) == (4, 3, 1, 0)


async def test_reserve_with_spent_deadline_is_applied_once_or_not_at_all(stub):
    """Whatever a nearly spent deadline did, the stock is never half-moved and
    a retry under the same key lands exactly one hold."""
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    request = reserve("order-1", 3)
    try:
        await stub.Reserve(request, timeout=0.000_001)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert await stock_figures(stub) in ((10, 10, 0, 0), (10, 7, 3, 0))

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 10
    while True:  # the first call may still be running: REQUEST_IN_FLIGHT is "try again"
        try:
            held = await stub.Reserve(request, timeout=10)
            break
        except grpc.aio.AioRpcError as error:
            failure = failure_of(error)
            assert (failure.code, failure.reason) == (ABORTED, "REQUEST_IN_FLIGHT"), failure
            assert loop.time() < give_up
            await asyncio.sleep(0.02)
    assert (held.state, held.version, held.quantity) == (RESERVED, 1, 3)
    assert await stock_figures(stub) == (10, 7, 3, 0)


async def test_every_reply_carries_context_id(stub, channel):
    """Keyed methods: the id is derived from the key, so a replay (and only
    the same key) carries the same one; reads carry one too."""
    seen: dict[str, str] = {}

    async def call(label: str, method: str, request) -> bytes:
        body, trailing = await raw_call(channel, method, request)
        context_id = trailing[CONTEXT_ID]
        assert context_id and context_id.isascii() and context_id.isprintable()
        assert trailing[REPLAYED] in ("true", "false")
        seen[label] = context_id
        return body

    await call("put", "PutStock", pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    await call("put-again", "PutStock", pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    await call("put-other", "PutStock", pb.PutStockRequest(sku_id=SKU, total=10, request_id="r2"))
    body = await call("reserve", "Reserve", reserve("order-1", 1))
    rid = pb.ReservationReply.FromString(body).reservation_id
    await call("reserve-again", "Reserve", reserve("order-1", 1))
    await call("reserve-other", "Reserve", reserve("order-1", 1, timestamp_ms=2))
    await call("confirm", "Confirm", pb.ConfirmRequest(reservation_id=rid))
    await call("get-stock", "GetStock", pb.GetStockRequest(sku_id=SKU))
    await call("get-reservation", "GetReservation", pb.GetReservationRequest(reservation_id=rid))

    assert seen["put"] == seen["put-again"] != seen["put-other"]
    assert seen["reserve"] == seen["reserve-again"] != seen["reserve-other"]
    keyed = ("put", "put-other", "reserve", "reserve-other", "confirm")
    assert len({seen[label] for label in keyed}) == len(keyed)

    # A keyed method's recorded error carries it too.
    failure = await fails(stub.Reserve, reserve("order-2", 100))
    assert failure.reason == "INSUFFICIENT_STOCK" and failure.trailing[CONTEXT_ID]


# -- 10. method-scoped keys ---------------------------------------------------------


@pytest.mark.parametrize(
    "first, then, state",
    [("Confirm", "Release", CONFIRMED), ("Release", "Confirm", RELEASED)],
    ids=["release-after-confirm", "confirm-after-release"],
)
async def test_confirm_and_release_keys_are_method_scoped(stub, first, then, state):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
    held = await stub.Reserve(reserve("order-1", 3))
    requests = {
        "Confirm": pb.ConfirmRequest(reservation_id=held.reservation_id),
        "Release": pb.ReleaseRequest(reservation_id=held.reservation_id, reason="changed mind"),
    }
    call = getattr(stub, first)(requests[first])
    moved = await call
    assert (moved.state, moved.version) == (state, 2)
    first_context = dict(await call.trailing_metadata())[CONTEXT_ID]

    failure = await fails(getattr(stub, then), requests[then])
    assert (failure.code, failure.reason) == (FAILED_PRECONDITION, "INVALID_TRANSITION")
    assert failure.trailing[CONTEXT_ID] != first_context
    reply = await reservation_of(stub, held.reservation_id)
    assert (reply.state, reply.version) == (state, 2)
    assert await stock_figures(stub) == ((10, 7, 0, 3) if state == CONFIRMED else (10, 10, 0, 0))


async def test_release_reason_with_control_characters_is_invalid_and_changes_nothing(stub):
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=5, request_id="r"))
    held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id=SKU, quantity=2, timestamp_ms=1))
    found = await fails(stub.Release, pb.ReleaseRequest(reservation_id=held.reservation_id, reason="bad\x00reason"))
    assert (found.code, found.reason, [f for f, _ in found.violations]) == (INVALID_ARGUMENT, "INVALID_REQUEST", ["reason"])
    assert await stock_figures(stub) == (5, 3, 2, 0)
    released = await stub.Release(pb.ReleaseRequest(reservation_id=held.reservation_id, reason="customer\tcancelled\n"))
    assert (released.state, released.version) == (RELEASED, 2)
