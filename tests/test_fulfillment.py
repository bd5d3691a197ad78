"""DispatchService over real gRPC, on a real server with both services.

The dispatch contract in the proto (3 attempts, 1,200 ms apart, an 800 ms
lease) is read from the compiled descriptors here too, never restated.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from holdfast.fulfillment.v1 import fulfillment_pb2 as fpb
from holdfast.fulfillment.v1 import fulfillment_pb2_grpc as fpb_grpc
from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast.call import current_call
from holdfast.contracts.contract import of_service
from holdfast.apps.carrier import SimulatedCarrier
from holdfast.apps.fulfillment import SERVICE, Waybill
from holdfast.store import StoreUnavailable
from tests.support import failure_of

DISPATCH = of_service(SERVICE)[f"/{SERVICE.full_name}/Dispatch"]
MAX_ATTEMPTS = DISPATCH.retry.max_attempts
DELAY_MS = DISPATCH.retry.fixed_delay_ms
LEASE_MS = DISPATCH.lock_ttl_ms


def test_the_dispatch_contract_is_the_one_in_the_proto():
    assert (MAX_ATTEMPTS, DELAY_MS, LEASE_MS) == (3, 1200, 800)


@pytest.fixture
def dispatch(channel) -> fpb_grpc.DispatchServiceStub:
    return fpb_grpc.DispatchServiceStub(channel)


@pytest.fixture
def carrier(server) -> SimulatedCarrier:
    """The server's simulated carrier, replaced by one a test configures."""

    def use(**settings) -> SimulatedCarrier:
        chosen = SimulatedCarrier(**settings)
        server.services[SERVICE.full_name].carrier = chosen
        return chosen

    return use


async def confirmed_reservation(channel, order: str = "order-1") -> str:
    stub = pb_grpc.InventoryServiceStub(channel)
    await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=10, request_id=f"stock-{order}"))
    held = await stub.Reserve(pb.ReserveRequest(order_id=order, sku_id="sku-1", quantity=1, timestamp_ms=1))
    await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    return held.reservation_id


async def new_waybill(channel, dispatch, order: str = "order-1") -> fpb.WaybillReply:
    rid = await confirmed_reservation(channel, order)
    return await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id=rid, carrier="acme", address="1 Quay St"))


async def dispatch_with_retries(dispatch, waybill_id: str, dispatcher: str = "d1") -> list:
    """What a dispatcher does: attempts 1, 2, 3, waiting the contract's delay
    after each refusal. Returns every answer (reply or error)."""
    answers = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        request = fpb.DispatchRequest(waybill_id=waybill_id, dispatcher_id=dispatcher, attempt=attempt)
        try:
            answers.append(await dispatch.Dispatch(request))
            return answers
        except grpc.aio.AioRpcError as error:
            answers.append(error)
            if failure_of(error).reason != "CARRIER_REFUSED":
                return answers
        await asyncio.sleep(DELAY_MS / 1000)
    return answers


async def test_create_waybill_for_a_confirmed_reservation(channel, dispatch):
    rid = await confirmed_reservation(channel)
    created = await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id=rid, carrier="acme", address="a"))
    assert (created.state, created.version, created.reservation_id) == (fpb.WAYBILL_STATE_CREATED, 1, rid)
    assert created.waybill_id.startswith("wb_") and not created.attempts
    again = await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id=rid, carrier="acme", address="a"))
    assert again == created
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=created.waybill_id)) == created


async def test_a_waybill_needs_a_confirmed_reservation(channel, dispatch):
    stub = pb_grpc.InventoryServiceStub(channel)
    await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=10, request_id="s"))
    held = await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku-1", quantity=1, timestamp_ms=1))
    with pytest.raises(grpc.aio.AioRpcError) as held_only:
        await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id=held.reservation_id, carrier="acme"))
    assert (held_only.value.code(), failure_of(held_only.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_CONFIRMED")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id="rsv_nope", carrier="acme"))
    assert failure_of(unknown.value).reason == "RESERVATION_NOT_FOUND"
    # Confirmed later, the same call now succeeds: the refusals were not recorded.
    await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    created = await dispatch.CreateWaybill(fpb.CreateWaybillRequest(reservation_id=held.reservation_id, carrier="acme"))
    assert created.state == fpb.WAYBILL_STATE_CREATED


async def test_dispatch_failing_twice_succeeds_on_the_third_attempt_with_the_delays_honoured(channel, dispatch, carrier):
    used = carrier(refuse_first=2)
    waybill = await new_waybill(channel, dispatch)
    answers = await dispatch_with_retries(dispatch, waybill.waybill_id)

    assert [failure_of(a).reason for a in answers[:2]] == ["CARRIER_REFUSED", "CARRIER_REFUSED"]
    final = answers[2]
    assert isinstance(final, fpb.WaybillReply) and final.state == fpb.WAYBILL_STATE_DISPATCHED
    assert final.tracking_id.startswith("trk_")
    assert [(a.attempt, a.result, a.dispatcher_id) for a in final.attempts] == [
        (1, fpb.ATTEMPT_RESULT_REFUSED, "d1"), (2, fpb.ATTEMPT_RESULT_REFUSED, "d1"), (3, fpb.ATTEMPT_RESULT_ACCEPTED, "d1"),
    ]
    for before, after in zip(final.attempts, final.attempts[1:]):
        assert after.started_at_ms - before.ended_at_ms >= DELAY_MS, final.attempts
    assert [p.attempt for p in used.parcels] == [1, 2, 3]
    # claim + settle per attempt, on top of the creation
    assert final.version == 1 + 2 * MAX_ATTEMPTS


async def test_an_attempt_before_the_delay_is_refused_and_changes_nothing(channel, dispatch, carrier):
    carrier(refuse_first=1)
    waybill = await new_waybill(channel, dispatch)
    first = fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=1)
    with pytest.raises(grpc.aio.AioRpcError):
        await dispatch.Dispatch(first)
    early = fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=2)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatch.Dispatch(early)
    failure = failure_of(refused.value)
    assert (refused.value.code(), failure.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RETRY_TOO_SOON")
    after = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id))
    assert (after.state, len(after.attempts)) == (fpb.WAYBILL_STATE_CREATED, 1)
    await asyncio.sleep(DELAY_MS / 1000)
    # Not recorded: the same call succeeds once the delay has passed.
    done = await dispatch.Dispatch(early)
    assert done.state == fpb.WAYBILL_STATE_DISPATCHED and len(done.attempts) == 2


async def test_a_fourth_attempt_is_refused_by_the_contract(channel, dispatch, carrier):
    carrier(refuse_first=MAX_ATTEMPTS)
    waybill = await new_waybill(channel, dispatch)
    answers = await dispatch_with_retries(dispatch, waybill.waybill_id)
    assert [failure_of(a).reason for a in answers] == ["CARRIER_REFUSED"] * MAX_ATTEMPTS
    failed = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id))
    assert (failed.state, len(failed.attempts)) == (fpb.WAYBILL_STATE_FAILED, MAX_ATTEMPTS)
    assert failed.failure_reason == f"{MAX_ATTEMPTS} attempts refused"

    fourth = fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=MAX_ATTEMPTS + 1)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatch.Dispatch(fourth)
    failure = failure_of(refused.value)
    assert (refused.value.code(), failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "CONTRACT_VIOLATION")
    assert failure.violations == (("attempt", f"attempt must be within 1..{MAX_ATTEMPTS}"),)
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id)) == failed


async def test_two_concurrent_dispatchers_never_both_hold_the_lease(channel, dispatch, carrier):
    """Dispatchers race on each of several waybills with a slow carrier:
    exactly one claim per waybill gets the lease; the others are refused
    before any carrier call, and the carrier sees one parcel per waybill."""
    used = carrier(latency_ms=150)
    waybills = [await new_waybill(channel, dispatch, f"order-{n}") for n in range(4)]

    async def attempt(waybill_id: str, dispatcher: str):
        request = fpb.DispatchRequest(waybill_id=waybill_id, dispatcher_id=dispatcher, attempt=1)
        try:
            return await dispatch.Dispatch(request)
        except grpc.aio.AioRpcError as error:
            return error

    for waybill in waybills:
        answers = await asyncio.gather(*(attempt(waybill.waybill_id, f"d{n}") for n in range(3)))
        won = [a for a in answers if isinstance(a, fpb.WaybillReply)]
        lost = [a for a in answers if not isinstance(a, fpb.WaybillReply)]
        assert len(won) == 1, answers
        assert won[0].state == fpb.WAYBILL_STATE_DISPATCHED and len(won[0].attempts) == 1
        assert {failure_of(a).reason for a in lost} <= {"IDEMPOTENCY_KEY_REUSED", "REQUEST_IN_FLIGHT", "LEASE_HELD"}
    assert sorted(p.waybill_id for p in used.parcels) == sorted(w.waybill_id for w in waybills)


async def test_an_acknowledgement_before_the_dispatch_is_refused_until_it_has_committed(channel, dispatch, carrier):
    """A carrier's callback may race the settlement: an early Acknowledge is
    not recorded, so the same call succeeds once the waybill is DISPATCHED."""
    carrier()
    waybill = await new_waybill(channel, dispatch)
    early = fpb.AcknowledgeRequest(waybill_id=waybill.waybill_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatch.Acknowledge(early)
    assert (refused.value.code(), failure_of(refused.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "WAYBILL_NOT_DISPATCHED")
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id)) == waybill
    await dispatch.Dispatch(fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=1))
    acknowledged = await dispatch.Acknowledge(early)
    assert (acknowledged.state, acknowledged.version) == (fpb.WAYBILL_STATE_ACKNOWLEDGED, 4)


async def test_the_same_attempt_sent_twice_at_once_asks_the_carrier_once(channel, dispatch, carrier):
    used = carrier(latency_ms=150)
    waybill = await new_waybill(channel, dispatch)
    request = fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=1)
    first, second = await asyncio.gather(dispatch.Dispatch(request), dispatch.Dispatch(request), return_exceptions=True)
    replies = [a for a in (first, second) if isinstance(a, fpb.WaybillReply)]
    refused = [failure_of(a).reason for a in (first, second) if not isinstance(a, fpb.WaybillReply)]
    assert len(replies) == 1 and refused == ["REQUEST_IN_FLIGHT"], (first, second)
    assert [p.attempt for p in used.parcels] == [1]
    assert await dispatch.Dispatch(request) == replies[0]  # and a later retry replays it


async def test_a_held_lease_refuses_other_moves_until_it_runs_out(channel, dispatch, carrier):
    carrier(latency_ms=2000)  # answers after the lease: the attempt will be refused
    waybill = await new_waybill(channel, dispatch)
    running = asyncio.ensure_future(
        dispatch.Dispatch(fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=1))
    )
    await _until_state(dispatch, waybill.waybill_id, fpb.WAYBILL_STATE_DISPATCHING)
    with pytest.raises(grpc.aio.AioRpcError) as held:
        await dispatch.Fail(fpb.FailRequest(waybill_id=waybill.waybill_id, reason="changed my mind"))
    failure = failure_of(held.value)
    assert (held.value.code(), failure.reason) == (grpc.StatusCode.ABORTED, "LEASE_HELD")
    with pytest.raises(grpc.aio.AioRpcError) as answered:
        await running
    after = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id))
    assert after.state == fpb.WAYBILL_STATE_CREATED
    took_ms = after.attempts[0].ended_at_ms - after.attempts[0].started_at_ms
    if failure_of(answered.value).reason == "CARRIER_REFUSED":
        # The carrier gets the lease less a quarter; the rest is the settlement's.
        assert after.attempts[0].result == fpb.ATTEMPT_RESULT_REFUSED
        assert LEASE_MS * 3 // 4 <= took_ms < LEASE_MS, after.attempts
    else:  # the machine stalled past the lease: the reaper's timeout ended the attempt first
        assert failure_of(answered.value).reason in {"LEASE_LOST", "VERSION_CONFLICT"}, answered.value
        assert (after.attempts[0].result, took_ms) == (fpb.ATTEMPT_RESULT_LEASE_EXPIRED, LEASE_MS)
    failed = await dispatch.Fail(fpb.FailRequest(waybill_id=waybill.waybill_id, reason="changed my mind"))
    assert (failed.state, failed.failure_reason) == (fpb.WAYBILL_STATE_FAILED, "changed my mind")


@pytest.fixture
def config(request, config):
    """With the reaper off (a round an hour), the next attempt itself takes
    an expired lease over; with it on, the reaper's timeout event does first."""
    if getattr(request, "param", "") == "by the next attempt":
        return replace(config, reaper_interval_ms=3_600_000)
    return config


@pytest.mark.parametrize("config", ["by the next attempt", "by the reaper"], indirect=True)
async def test_an_expired_lease_is_taken_over(channel, dispatch, carrier, server):
    """A dispatcher that claims and then goes away (its call cancelled while
    the carrier is slow) leaves the waybill DISPATCHING under its lease; once
    the lease and the delay have passed, the next attempt takes it over and
    the stale attempt is recorded LEASE_EXPIRED; the stale dispatcher's own
    retry of its attempt is told it lost the lease. Either way, the record is
    the same."""
    used = carrier(latency_ms=5000)
    waybill = await new_waybill(channel, dispatch)
    stale = fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="gone", attempt=1)
    call = dispatch.Dispatch(stale)
    await _until_state(dispatch, waybill.waybill_id, fpb.WAYBILL_STATE_DISPATCHING)
    call.cancel()
    claimed = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id))
    assert claimed.attempts[0].result == fpb.ATTEMPT_RESULT_RUNNING

    carrier(latency_ms=0)
    await asyncio.sleep((LEASE_MS + DELAY_MS) / 1000 + 0.1)
    taken = await dispatch.Dispatch(fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d2", attempt=2))
    assert taken.state == fpb.WAYBILL_STATE_DISPATCHED
    assert [(a.attempt, a.dispatcher_id, a.result) for a in taken.attempts] == [
        (1, "gone", fpb.ATTEMPT_RESULT_LEASE_EXPIRED), (2, "d2", fpb.ATTEMPT_RESULT_ACCEPTED),
    ]
    assert taken.attempts[0].ended_at_ms == claimed.attempts[0].started_at_ms + LEASE_MS
    assert [p.attempt for p in used.parcels] == [1]

    with pytest.raises(grpc.aio.AioRpcError) as lost:
        await dispatch.Dispatch(stale)
    assert (lost.value.code(), failure_of(lost.value).reason) == (grpc.StatusCode.ABORTED, "LEASE_LOST")
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id)) == taken


async def test_the_reaper_fails_a_waybill_whose_last_attempt_vanished(channel, dispatch, carrier):
    """The third attempt's dispatcher goes away under its lease: no fourth
    attempt may take over, so the timeout event ends the waybill FAILED."""
    carrier(refuse_first=MAX_ATTEMPTS - 1)
    waybill = await new_waybill(channel, dispatch)
    for attempt in range(1, MAX_ATTEMPTS):
        with pytest.raises(grpc.aio.AioRpcError):
            await dispatch.Dispatch(fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=attempt))
        await asyncio.sleep(DELAY_MS / 1000)
    carrier(latency_ms=5000)
    last = dispatch.Dispatch(fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=MAX_ATTEMPTS))
    await _until_state(dispatch, waybill.waybill_id, fpb.WAYBILL_STATE_DISPATCHING)
    last.cancel()
    failed = await _until_state(dispatch, waybill.waybill_id, fpb.WAYBILL_STATE_FAILED, timeout_s=LEASE_MS / 1000 + 5)
    assert [a.result for a in failed.attempts] == [fpb.ATTEMPT_RESULT_REFUSED] * (MAX_ATTEMPTS - 1) + [
        fpb.ATTEMPT_RESULT_LEASE_EXPIRED]
    assert failed.failure_reason == f"{MAX_ATTEMPTS} attempts, the last one's lease ran out"
    assert failed.attempts[-1].ended_at_ms == failed.attempts[-1].started_at_ms + LEASE_MS


def _settlements_fail(monkeypatch, server) -> SimulatedCarrier:
    """The server's carrier, accepting every attempt, with a store that fails
    the transaction that follows each acceptance in the same call (the
    attempt's settlement) before it runs: the carrier has the parcel, the
    books still say RUNNING."""
    service = server.services[SERVICE.full_name]
    store, answered = service.engine.store, set()
    transact = store.transact

    class Accepting(SimulatedCarrier):
        async def dispatch(self, parcel):
            answer = await super().dispatch(parcel)
            answered.add(current_call().key)  # the call's context reaches the carrier, and its settlement
            return answer

    async def failing(*args, **kwargs):
        try:
            key = current_call().key
        except LookupError:  # the reaper's transactions serve no call
            key = None
        if key in answered:
            answered.discard(key)
            raise StoreUnavailable("injected: the store did not answer the settlement")
        return await transact(*args, **kwargs)

    monkeypatch.setattr(store, "transact", failing)
    service.carrier = Accepting()
    return service.carrier


# `config` (the reaper on, or off for an hour), and who ends the attempt the carrier accepted
AFTER_A_FAILED_SETTLEMENT = [
    ("by the reaper", "the reaper"),
    ("by the next attempt", "its own retry"),
    ("by the next attempt", "the next attempt"),
]


@pytest.mark.parametrize(("config", "ended_by"), AFTER_A_FAILED_SETTLEMENT, indirect=["config"],
                         ids=[ended_by for _, ended_by in AFTER_A_FAILED_SETTLEMENT])
async def test_a_parcel_the_carrier_accepted_is_not_handed_over_again_when_the_settlement_failed(
    channel, dispatch, server, monkeypatch, ended_by
):
    """The carrier accepts attempt 1 and the store then fails its settlement:
    the dispatcher hears UNAVAILABLE, and the waybill is left DISPATCHING
    with an attempt whose end only the carrier knows. Whoever ends it after
    its lease (the reaper, the dispatcher's retry, the next attempt) asks the
    carrier what it answered, and records the attempt ACCEPTED with the
    carrier's tracking id: no attempt hands the parcel over again."""
    used = _settlements_fail(monkeypatch, server)
    waybill = await new_waybill(channel, dispatch)
    wid = waybill.waybill_id
    first = fpb.DispatchRequest(waybill_id=wid, dispatcher_id="d1", attempt=1)
    second = fpb.DispatchRequest(waybill_id=wid, dispatcher_id="d2", attempt=2)
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await dispatch.Dispatch(first)
    assert (unavailable.value.code(), failure_of(unavailable.value).reason) == (
        grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
    stranded = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=wid))
    assert (stranded.state, [a.result for a in stranded.attempts]) == (
        fpb.WAYBILL_STATE_DISPATCHING, [fpb.ATTEMPT_RESULT_RUNNING])

    if ended_by == "the reaper":
        shipped = await _until_state(dispatch, wid, fpb.WAYBILL_STATE_DISPATCHED, timeout_s=LEASE_MS / 1000 + 5)
        with pytest.raises(grpc.aio.AioRpcError) as lost:  # the dispatcher's retry, after the lease
            await dispatch.Dispatch(first)
        assert (lost.value.code(), failure_of(lost.value).reason) == (grpc.StatusCode.ABORTED, "LEASE_LOST")
        assert "the carrier's acceptance of it is recorded already" in failure_of(lost.value).message
    elif ended_by == "its own retry":
        await asyncio.sleep(LEASE_MS / 1000 + 0.05)
        shipped = await dispatch.Dispatch(first)
        assert await dispatch.Dispatch(first) == shipped  # and replays
    else:
        await asyncio.sleep((LEASE_MS + DELAY_MS) / 1000 + 0.1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch.Dispatch(second)
        assert (refused.value.code(), failure_of(refused.value).reason) == (
            grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")
        shipped = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=wid))
    assert shipped.state == fpb.WAYBILL_STATE_DISPATCHED
    assert [(a.attempt, a.dispatcher_id, a.result) for a in shipped.attempts] == [(1, "d1", fpb.ATTEMPT_RESULT_ACCEPTED)]
    assert shipped.tracking_id == used.decided[(wid, 1)].tracking_id != ""

    await asyncio.sleep(DELAY_MS / 1000)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dispatch.Dispatch(second)
    assert failure_of(refused.value).reason == "INVALID_TRANSITION"
    assert [p.attempt for p in used.parcels] == [1] and used.handed_over() == [(wid, 1)]
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=wid)) == shipped


async def test_every_dispatch_move_replays_identically(channel, dispatch, carrier):
    """Create, each attempt's answer (refusal or reply), acknowledge and fail:
    the same call again gets the same bytes, flagged as a replay."""
    carrier(refuse_first=1)
    rid = await confirmed_reservation(channel)
    calls = [("CreateWaybill", fpb.CreateWaybillRequest(reservation_id=rid, carrier="acme", address="x"))]
    first = [await _raw(channel, *calls[0])]
    wid = fpb.WaybillReply.FromString(first[0][1]).waybill_id
    calls += [
        ("Dispatch", fpb.DispatchRequest(waybill_id=wid, dispatcher_id="d1", attempt=1)),
        ("Dispatch", fpb.DispatchRequest(waybill_id=wid, dispatcher_id="d1", attempt=2)),
        ("Acknowledge", fpb.AcknowledgeRequest(waybill_id=wid)),
        ("Fail", fpb.FailRequest(waybill_id=wid, reason="too late")),  # refused: ACKNOWLEDGED is terminal
    ]
    first.append(await _raw(channel, *calls[1]))
    await asyncio.sleep(DELAY_MS / 1000)
    first += [await _raw(channel, method, request) for method, request in calls[2:]]
    assert [f[2] for f in first] == ["false"] * 5
    assert [code for code, _, _ in first] == [grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.OK,
                                              grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION]
    again = [await _raw(channel, method, request) for method, request in calls]
    assert [(code, body) for code, body, _ in again] == [(code, body) for code, body, _ in first]
    assert [flag for _, _, flag in again] == ["true"] * 5


async def test_bad_dispatch_requests_get_field_violations_and_change_nothing(channel, dispatch):
    waybill = await new_waybill(channel, dispatch)
    cases = [
        (fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="", attempt=1), "dispatcher_id"),
        (fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d\x00", attempt=1), "dispatcher_id"),
        (fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=0), "attempt"),
        (fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d1", attempt=2), "attempt"),
        (fpb.DispatchRequest(waybill_id="x" * 1000, dispatcher_id="d1", attempt=1), "waybill_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch.Dispatch(request)
        failure = failure_of(refused.value)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, failure)
        assert [f for f, _ in failure.violations] == [field], failure
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await dispatch.Dispatch(fpb.DispatchRequest(waybill_id="wb_nope", dispatcher_id="d1", attempt=1))
    assert (unknown.value.code(), failure_of(unknown.value).reason) == (grpc.StatusCode.NOT_FOUND, "WAYBILL_NOT_FOUND")
    assert await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill.waybill_id)) == waybill


async def test_the_waybill_states_are_the_wire_values():
    assert {s.name: int(s) for s in Waybill} == {
        name.removeprefix("WAYBILL_STATE_"): value for name, value in fpb.WaybillState.items() if value
    }


async def _until_state(dispatch, waybill_id: str, state: int, timeout_s: float = 5.0) -> fpb.WaybillReply:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        found = await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=waybill_id))
        if found.state == state:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"{waybill_id} never reached {fpb.WaybillState.Name(state)}")


async def _raw(channel, method: str, request) -> tuple[grpc.StatusCode, bytes, str]:
    """The call's status, its exact reply or status-details bytes, and its replayed flag."""
    rpc = channel.unary_unary(f"/{SERVICE.full_name}/{method}", request_serializer=type(request).SerializeToString,
                              response_deserializer=None)
    call = rpc(request)
    try:
        body = await call
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        code = error.code()
        body = dict(error.trailing_metadata())["grpc-status-details-bin"]
    trailing = dict(await call.trailing_metadata())
    return code, body, trailing["holdfast-replayed"]


async def test_the_readme_dispatch_example_ships_a_waybill(channel, carrier):
    """The README's client code, run as written, against a carrier that
    refuses the first attempt."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Waybill dispatch", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    carrier(refuse_first=1)
    shipped = await namespace["ship"](channel, await confirmed_reservation(channel))
    assert shipped.state == fpb.WAYBILL_STATE_DISPATCHED
    assert [a.result for a in shipped.attempts] == [fpb.ATTEMPT_RESULT_REFUSED, fpb.ATTEMPT_RESULT_ACCEPTED]
