"""TableService over real gRPC, with holdfast's pytest plugin: its server
hosts this service alone (`holdfast_services`), on a manual clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from holdfast import derive_id, idempotency_key, refusal
from restaurant.tables.v1 import tables_pb2 as pb
from restaurant.tables.v1 import tables_pb2_grpc as pb_grpc
from tables import NO_SHOW_AFTER_MS, Tables

HOLDFAST = "holdfast"  # the ErrorInfo domain of holdfast's own reasons
TABLES = "tables.restaurant.example"  # and of TableService's (tables.TableReason)

NOW_MS = 1_700_000_000_000  # where the plugin's ManualClock starts
SLOT_MS = NOW_MS + 2 * 60 * 60 * 1000  # a table for two hours from now
BOOK = pb.BookRequest(table_id="table-4", slot_start_ms=SLOT_MS, party_size=2, guest="Ada")
BOOKING_ID = derive_id("bk", idempotency_key("/restaurant.tables.v1.TableService/Book", ("table-4", SLOT_MS)))
NO_SHOW_AT_MS = SLOT_MS + NO_SHOW_AFTER_MS


@pytest.fixture
def holdfast_services():
    """The plugin's server hosts TableService alone."""
    return [lambda engine: Tables(engine)]


@pytest.fixture
def holdfast_service_config() -> Path:
    """The plugin's channel applies TableService's contracts (deadlines, retries)."""
    return Path(__file__).resolve().parent / "service_config.json"


@pytest.fixture
def tables(holdfast_channel) -> pb_grpc.TableServiceStub:
    return pb_grpc.TableServiceStub(holdfast_channel)


def booked(version: int = 1, state: int = pb.BOOKING_STATE_BOOKED, cancel_reason: str = "") -> pb.BookingReply:
    """The reply for BOOK's booking in `state`."""
    return pb.BookingReply(
        booking_id=BOOKING_ID, table_id="table-4", slot_start_ms=SLOT_MS, party_size=2, guest="Ada",
        state=state, version=version, no_show_at_ms=NO_SHOW_AT_MS, cancel_reason=cancel_reason,
    )


async def refused(rpc, request) -> tuple[grpc.StatusCode, str, str, list[tuple[str, str]]]:
    """(status, ErrorInfo domain and reason, BadRequest field violations) of a refused call."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await rpc(request)
    said = refusal(failed.value)
    return said.code, said.domain, said.reason, list(said.violations)


async def test_booking_a_free_table_and_slot(tables):
    assert await tables.Book(BOOK) == booked(version=1)
    assert await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID)) == booked(version=1)


async def test_the_same_book_again_replays_the_same_bytes(holdfast_channel):
    book = holdfast_channel.unary_unary(
        "/restaurant.tables.v1.TableService/Book", request_serializer=pb.BookRequest.SerializeToString
    )  # no deserializer: the reply's bytes as they came over the wire
    first = book(BOOK)
    reply = await first
    again = book(BOOK)  # a client that timed out and retried
    assert await again == reply
    assert pb.BookingReply.FromString(reply) == booked(version=1)
    assert (await first.trailing_metadata()).get("holdfast-replayed") == "false"
    assert (await again.trailing_metadata()).get("holdfast-replayed") == "true"


async def test_another_guest_cannot_book_a_booked_table_and_slot(tables):
    await tables.Book(BOOK)
    other = pb.BookRequest(table_id="table-4", slot_start_ms=SLOT_MS, party_size=4, guest="Grace")
    assert await refused(tables.Book, other) == (grpc.StatusCode.ALREADY_EXISTS, HOLDFAST, "IDEMPOTENCY_KEY_REUSED", [])
    assert await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID)) == booked(version=1)


async def test_another_slot_of_the_same_table_is_another_booking(tables):
    await tables.Book(BOOK)
    later = await tables.Book(pb.BookRequest(table_id="table-4", slot_start_ms=SLOT_MS + 1, party_size=2, guest="Ada"))
    assert later.booking_id != BOOKING_ID and later.version == 1


async def test_seat_then_cancel_is_refused_and_changes_nothing(tables):
    await tables.Book(BOOK)
    assert await tables.Seat(pb.SeatRequest(booking_id=BOOKING_ID)) == booked(version=2, state=pb.BOOKING_STATE_SEATED)

    cancel = pb.CancelRequest(booking_id=BOOKING_ID, reason="changed plans")
    assert await refused(tables.Cancel, cancel) == (grpc.StatusCode.FAILED_PRECONDITION, HOLDFAST, "INVALID_TRANSITION", [])
    assert await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID)) == booked(
        version=2, state=pb.BOOKING_STATE_SEATED
    )
    # The refusal is recorded under Cancel's key: the same Cancel again replays it.
    call = tables.Cancel(cancel)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert (await call.trailing_metadata()).get("holdfast-replayed") == "true"


async def test_cancel_a_booking(tables):
    await tables.Book(BOOK)
    cancelled = await tables.Cancel(pb.CancelRequest(booking_id=BOOKING_ID, reason="changed plans"))
    assert cancelled == booked(version=2, state=pb.BOOKING_STATE_CANCELLED, cancel_reason="changed plans")
    assert await refused(tables.Seat, pb.SeatRequest(booking_id=BOOKING_ID)) == (
        grpc.StatusCode.FAILED_PRECONDITION, HOLDFAST, "INVALID_TRANSITION", [],
    )


async def wait_for_state(tables, state: int, timeout_s: float = 10.0) -> pb.BookingReply:
    """The booking once it reads `state` (the reaper runs every 20 ms)."""
    async with asyncio.timeout(timeout_s):
        while True:
            reply = await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID))
            if reply.state == state:
                return reply
            await asyncio.sleep(0.02)


async def test_a_guest_not_seated_in_time_becomes_a_no_show(holdfast_server, tables):
    await tables.Book(BOOK)
    holdfast_server.clock.advance(NO_SHOW_AT_MS - 1 - NOW_MS)
    await asyncio.sleep(0.2)  # ten reaper rounds: not due yet
    assert await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID)) == booked(version=1)

    holdfast_server.clock.advance(1)
    assert await wait_for_state(tables, pb.BOOKING_STATE_NO_SHOW) == booked(version=2, state=pb.BOOKING_STATE_NO_SHOW)
    assert await refused(tables.Seat, pb.SeatRequest(booking_id=BOOKING_ID)) == (
        grpc.StatusCode.FAILED_PRECONDITION, TABLES, "GUEST_NO_SHOW", [],
    )


async def test_a_late_seat_is_refused_whether_or_not_the_no_show_has_fired(holdfast_server, tables):
    await tables.Book(BOOK)
    holdfast_server.clock.advance(NO_SHOW_AT_MS - NOW_MS)
    # The reaper may fire NO_SHOW before this Seat or not: the answer is the same.
    assert await refused(tables.Seat, pb.SeatRequest(booking_id=BOOKING_ID)) == (
        grpc.StatusCode.FAILED_PRECONDITION, TABLES, "GUEST_NO_SHOW", [],
    )
    # Recorded under Seat's key, in TableService's own domain: the retry replays it.
    call = tables.Seat(pb.SeatRequest(booking_id=BOOKING_ID))
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await call
    assert (refusal(again.value).domain, refusal(again.value).reason) == (TABLES, "GUEST_NO_SHOW")
    assert (await call.trailing_metadata()).get("holdfast-replayed") == "true"
    assert await tables.GetBooking(pb.GetBookingRequest(booking_id=BOOKING_ID)) == booked(
        version=2, state=pb.BOOKING_STATE_NO_SHOW
    )


# (RPC, request) -> (status, reason, field violations); the gateway's refusals first.
INVALID = [
    ("Book", pb.BookRequest(slot_start_ms=SLOT_MS, party_size=2, guest="Ada"),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "CONTRACT_VIOLATION", [("table_id", "idempotency key field must be set")])),
    ("Seat", pb.SeatRequest(),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "CONTRACT_VIOLATION", [("booking_id", "idempotency key field must be set")])),
    ("Book", pb.BookRequest(table_id="table-4", slot_start_ms=SLOT_MS),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "INVALID_REQUEST",
      [("party_size", "party_size must be within 1..20"), ("guest", "guest must be set")])),
    ("Book", pb.BookRequest(table_id="table\n4", slot_start_ms=-1, party_size=21, guest="A" * 129),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "INVALID_REQUEST",
      [("table_id", "table_id must not contain control characters"),
       ("slot_start_ms", "slot_start_ms must be a time in ms since the epoch"),
       ("party_size", "party_size must be within 1..20"),
       ("guest", "guest is longer than 128 characters")])),
    ("Book", pb.BookRequest(table_id="table-4", slot_start_ms=NOW_MS - NO_SHOW_AFTER_MS, party_size=2, guest="Ada"),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "INVALID_REQUEST",
      [("slot_start_ms", f"the slot is over: a guest would be a no-show at {NOW_MS}")])),
    ("Cancel", pb.CancelRequest(booking_id=BOOKING_ID, reason="x" * 129),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "INVALID_REQUEST", [("reason", "reason is longer than 128 characters")])),
    ("GetBooking", pb.GetBookingRequest(),
     (grpc.StatusCode.INVALID_ARGUMENT, HOLDFAST, "INVALID_REQUEST", [("booking_id", "booking_id must be set")])),
    ("Seat", pb.SeatRequest(booking_id="bk_nobody"), (grpc.StatusCode.NOT_FOUND, TABLES, "BOOKING_NOT_FOUND", [])),
    ("Cancel", pb.CancelRequest(booking_id="bk_nobody"), (grpc.StatusCode.NOT_FOUND, TABLES, "BOOKING_NOT_FOUND", [])),
    ("GetBooking", pb.GetBookingRequest(booking_id="bk_nobody"), (grpc.StatusCode.NOT_FOUND, TABLES, "BOOKING_NOT_FOUND", [])),
    # An unknown id of any length is NOT_FOUND, quoted short enough to fit gRPC's metadata.
    ("GetBooking", pb.GetBookingRequest(booking_id="bk_" + "x" * 8000), (grpc.StatusCode.NOT_FOUND, TABLES, "BOOKING_NOT_FOUND", [])),
    ("Seat", pb.SeatRequest(booking_id="é" * 5000), (grpc.StatusCode.NOT_FOUND, TABLES, "BOOKING_NOT_FOUND", [])),
]
INVALID_IDS = [f"{rpc}-{index}" for index, (rpc, _, _) in enumerate(INVALID)]


@pytest.mark.parametrize(("rpc", "request_", "expected"), INVALID, ids=INVALID_IDS)
async def test_bad_input_and_unknown_bookings_are_refused(tables, rpc, request_, expected):
    assert await refused(getattr(tables, rpc), request_) == expected


async def test_the_journal_replays_every_call_and_the_no_show(holdfast_server, tables, replay_journal):
    """The plugin's server journals TableService's calls and the reaper's
    NO_SHOW; a fresh instance hosting the same service answers them alike."""
    await tables.Book(BOOK)
    holdfast_server.clock.advance(NO_SHOW_AT_MS - NOW_MS)
    await wait_for_state(tables, pb.BOOKING_STATE_NO_SHOW)
    await refused(tables.Seat, pb.SeatRequest(booking_id=BOOKING_ID))

    kinds = [json.loads(line)["kind"] for line in holdfast_server.journal.read_text().splitlines()]
    assert kinds.count("timeout") == 1  # the reaper's NO_SHOW, between the polls of wait_for_state
    report = replay_journal(holdfast_server.journal)
    assert (report.calls, report.timeouts, report.identical) == (kinds.count("call"), 1, True)


async def test_the_no_show_delay_is_a_setting(tmp_path):
    """`holdfast serve --app tables:Tables --setting no_show_after_ms=60000` makes it so."""
    from holdfast import Config, ManualClock, start

    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/tables.db", apps=("tables:Tables",),
                    settings={"no_show_after_ms": 60_000})
    running = await start(config, clock=ManualClock(NOW_MS))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await pb_grpc.TableServiceStub(channel).Book(BOOK)
    finally:
        await running.stop(0)
    assert reply.no_show_at_ms == SLOT_MS + 60_000
