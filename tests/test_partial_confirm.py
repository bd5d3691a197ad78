"""Partial confirm (issue 13, item 3): Confirm may sell fewer units than the
hold has; the rest returns to available in the same move, and the reply
says both (`confirmed_quantity`, `returned_quantity`). `quantity` 0 is the
whole hold, answered byte for byte as before partial confirms. Over real
gRPC, on the embedded pair, on PostgreSQL + Redis and on PostgreSQL +
Redis Cluster."""

from __future__ import annotations

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb

from tests.conftest import BACKENDS
from tests.support import raw_call
from tests.test_api import (
    ALREADY_EXISTS,
    CONFIRMED,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    REPLAYED,
    SKU,
    fails,
    reservation_of,
    reserve,
    stock_figures,
)

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


async def _held(stub, quantity: int = 5, order_id: str = "o1") -> pb.ReservationReply:
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="init"), timeout=10)
    return await stub.Reserve(reserve(order_id, quantity), timeout=10)


async def test_a_partial_confirm_sells_part_and_returns_the_rest_in_one_move(stub, channel):
    held = await _held(stub)
    assert await stock_figures(stub) == (10, 5, 5, 0)
    body, trailing = await raw_call(channel, "Confirm", pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=3))
    reply = pb.ReservationReply.FromString(body)
    assert (reply.state, reply.version, reply.quantity) == (CONFIRMED, 2, 5)
    assert (reply.confirmed_quantity, reply.returned_quantity) == (3, 2)
    assert await stock_figures(stub) == (10, 7, 0, 3)
    # What GetReservation reads is what Confirm answered, byte for byte.
    assert (await reservation_of(stub, held.reservation_id)).SerializeToString(deterministic=True) == body

    again, again_trailing = await raw_call(channel, "Confirm", pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=3))
    assert again == body and again_trailing.get(REPLAYED) == "true" and trailing.get(REPLAYED) != "true"
    # Another quantity under the same key (the fingerprint covers the field).
    for other in (2, 0):
        refused = await fails(stub.Confirm, pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=other))
        assert (refused.code, refused.reason) == (ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert await stock_figures(stub) == (10, 7, 0, 3)


async def test_quantity_zero_is_the_whole_hold_with_the_replies_bytes_of_before(stub, channel):
    held = await _held(stub)
    body, _ = await raw_call(channel, "Confirm", pb.ConfirmRequest(reservation_id=held.reservation_id, expected_version=1))
    before = pb.ReservationReply(
        reservation_id=held.reservation_id, order_id="o1", sku_id=SKU, quantity=5, state=CONFIRMED, version=2,
        expires_at_ms=held.expires_at_ms,
    ).SerializeToString(deterministic=True)
    assert body == before  # no confirmed_quantity / returned_quantity on the wire
    assert await stock_figures(stub) == (10, 5, 0, 5)


async def test_confirming_exactly_the_hold_names_it_and_returns_nothing(stub):
    held = await _held(stub)
    reply = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=5), timeout=10)
    assert (reply.state, reply.confirmed_quantity, reply.returned_quantity) == (CONFIRMED, 5, 0)
    assert await stock_figures(stub) == (10, 5, 0, 5)


@pytest.mark.parametrize(
    "quantity, violation",
    [
        (6, ("quantity", "quantity 6 is more than the 5 units reservation {rid} holds")),
        (-1, ("quantity", "quantity must be zero (the whole hold) or more, got -1")),
    ],
)
async def test_a_quantity_the_hold_cannot_give_is_an_invalid_request_that_burns_no_key(stub, quantity, violation):
    held = await _held(stub)
    refused = await fails(stub.Confirm, pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=quantity))
    assert (refused.code, refused.reason) == (INVALID_ARGUMENT, "INVALID_REQUEST")
    assert refused.violations == ((violation[0], violation[1].format(rid=held.reservation_id)),)
    assert await stock_figures(stub) == (10, 5, 5, 0)
    # Not recorded: the same key confirms a quantity that fits.
    reply = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=1), timeout=10)
    assert (reply.confirmed_quantity, reply.returned_quantity) == (1, 4)
    assert await stock_figures(stub) == (10, 9, 0, 1)


async def test_the_hold_state_comes_before_the_quantity(stub):
    """A released hold refuses a confirm by its state, whatever the quantity."""
    held = await _held(stub)
    await stub.Release(pb.ReleaseRequest(reservation_id=held.reservation_id), timeout=10)
    refused = await fails(stub.Confirm, pb.ConfirmRequest(reservation_id=held.reservation_id, quantity=99))
    assert (refused.code, refused.reason) == (FAILED_PRECONDITION, "INVALID_TRANSITION")
    assert await stock_figures(stub) == (10, 10, 0, 0)


async def test_an_unknown_reservation_is_not_found_whatever_the_quantity(stub):
    await _held(stub)
    refused = await fails(stub.Confirm, pb.ConfirmRequest(reservation_id="rsv_nope", quantity=2))
    assert (refused.code, refused.reason) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")
