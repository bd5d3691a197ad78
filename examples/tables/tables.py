"""`restaurant.tables.v1.TableService`: table reservations at a restaurant,
the service docs/build-a-service.md builds step by step. It uses holdfast's
public API (`import holdfast`), its own generated code, and nothing else of
holdfast's. Served with `holdfast serve --app tables:Tables`.

A booking is one table for one slot. Book makes it BOOKED; Seat (the guest
has arrived) or Cancel ends it; a guest not seated `no_show_after_ms` after
the slot starts is a NO_SHOW, fired by the server's reaper.
"""

from __future__ import annotations

from typing import Any, Mapping

import grpc

from holdfast import (
    AppReason,
    Change,
    Engine,
    Entity,
    Machine,
    Outcome,
    Service,
    current_call,
    decode_data,
    derive_id,
    failure,
    invalid,
    shown_id,
    states_of,
    text_violations,
)
from restaurant.tables.v1 import tables_pb2 as pb

NO_SHOW_AFTER_MS = 15 * 60 * 1000
PARTY_SIZE_MAX = 20
TEXT_LENGTH_MAX = 128


# The states are the proto's `BookingState` (NEW, BOOKED, SEATED, CANCELLED,
# NO_SHOW), numbered as on the wire. NEW is a booking not yet made: the
# state of an id with no row, never in a reply.
Booking = states_of(pb.BookingState, "Booking")


BOOKING: Machine[Booking] = Machine(
    "tables",
    Booking,
    (
        (Booking.NEW, "BOOK", Booking.BOOKED),
        (Booking.BOOKED, "SEAT", Booking.SEATED),
        (Booking.BOOKED, "CANCEL", Booking.CANCELLED),
        (Booking.BOOKED, "NO_SHOW", Booking.NO_SHOW),
    ),
    initial=Booking.NEW,
    terminal=(Booking.SEATED, Booking.CANCELLED, Booking.NO_SHOW),
)


class TableReason(AppReason, domain="tables.restaurant.example"):
    """TableService's own refusals, in its own ErrorInfo domain: `(gRPC
    status, recorded under the call's key)`, checked in this order."""

    # No booking has that id, however it is spelled; not recorded, as a
    # booking of that id may yet be made.
    BOOKING_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, False)
    # Seat or Cancel of a booking whose guest did not come in time: recorded,
    # since the booking will never be anything else.
    GUEST_NO_SHOW = (grpc.StatusCode.FAILED_PRECONDITION, True)


class Tables(Service):
    """The servicer of TableService."""

    DESCRIPTOR = pb.DESCRIPTOR.services_by_name["TableService"]
    MACHINE = BOOKING
    ID_PREFIX = "bk"
    # A booking still BOOKED when its `due_at_ms` passes gets NO_SHOW from the reaper.
    TIMEOUTS = {Booking.BOOKED: "NO_SHOW"}

    def __init__(self, engine: Engine, no_show_after_ms: int = NO_SHOW_AFTER_MS) -> None:
        super().__init__(engine)
        assert no_show_after_ms > 0, "a guest has some time to arrive"
        self.no_show_after_ms = no_show_after_ms

    @classmethod
    def from_settings(cls, engine: Engine, settings: Mapping[str, Any]) -> Tables:
        """As `holdfast serve --app tables:Tables --setting no_show_after_ms=600000` makes it."""
        return cls(engine, int(settings.get("no_show_after_ms", NO_SHOW_AFTER_MS)))

    # -- RPCs ------------------------------------------------------------------

    async def Book(self, request: pb.BookRequest, context) -> Outcome:
        violations = _book_violations(request)
        if violations:
            return invalid(violations)
        # The key is (table_id, slot_start_ms): one booking per table and slot.
        booking_id = derive_id(self.ID_PREFIX, current_call().key)
        no_show_at_ms = request.slot_start_ms + self.no_show_after_ms
        booking = pb.Booking(table_id=request.table_id, slot_start_ms=request.slot_start_ms,
                             party_size=request.party_size, guest=request.guest, no_show_at_ms=no_show_at_ms)

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            # A recorded key never gets here (the framework replays it, or refuses it
            # with another payload), so no booking has this id: `entity` is None.
            if no_show_at_ms <= now_ms:
                over = f"the slot is over: a guest would be a no-show at {no_show_at_ms}"
                return invalid([("slot_start_ms", over)])
            return Change(("BOOK",), booking, reply=_reply, due_at_ms=no_show_at_ms)

        return await self.move(booking_id, decide)

    async def Seat(self, request: pb.SeatRequest, context) -> Outcome:
        # Nothing to validate: the gateway has refused an empty booking_id (the
        # key), and any other spelling of an unknown id is BOOKING_NOT_FOUND.

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            if entity is None:
                return _not_found(request.booking_id)
            return _no_show(entity, now_ms) or Change(("SEAT",), entity.data, reply=_reply)

        return await self.move(request.booking_id, decide)

    async def Cancel(self, request: pb.CancelRequest, context) -> Outcome:
        violations = text_violations(request, optional=("reason",), length_max=TEXT_LENGTH_MAX)
        if violations:
            return invalid(violations)

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            if entity is None:
                return _not_found(request.booking_id)
            booking = decode_data(entity.data, pb.Booking)
            booking.cancel_reason = request.reason or "cancelled"
            return _no_show(entity, now_ms) or Change(("CANCEL",), booking, reply=_reply)

        return await self.move(request.booking_id, decide)

    async def GetBooking(self, request: pb.GetBookingRequest, context) -> Outcome:
        if not request.booking_id:  # no key here, so the gateway checks nothing
            return invalid([("booking_id", "booking_id must be set")])
        return await self.read(request.booking_id, _reply, _not_found(request.booking_id))

    # -- timeout events ------------------------------------------------------------

    def render(self, entity: Entity) -> pb.BookingReply:
        return _reply(entity)


# -- moves, replies and refusals --------------------------------------------------------


def _no_show(entity: Entity, now_ms: int) -> Change | Outcome | None:
    """A booked guest not seated by the no-show time is a no-show, whether
    or not the reaper has fired yet: the answer depends on the call's time
    alone, so it is the same on every instance and in every replay. If the
    reaper has not fired, the change records the no-show and refuses the
    call that found it; if it has, the refusal alone."""
    fired = entity.state == Booking.NO_SHOW
    if not fired and (entity.state != Booking.BOOKED or not 0 < entity.due_at_ms <= now_ms):
        return None
    no_show_at_ms = decode_data(entity.data, pb.Booking).no_show_at_ms
    refusal = failure(
        TableReason.GUEST_NO_SHOW,
        f"{entity.entity_id} is a no-show since {no_show_at_ms}",
        metadata={"booking_id": entity.entity_id, "no_show_at_ms": str(no_show_at_ms)},
    )
    return refusal if fired else Change(("NO_SHOW",), entity.data, refusal=refusal)


def _reply(entity: Entity) -> pb.BookingReply:
    booking = decode_data(entity.data, pb.Booking)
    return pb.BookingReply(
        booking_id=entity.entity_id, table_id=booking.table_id, slot_start_ms=booking.slot_start_ms,
        party_size=booking.party_size, guest=booking.guest, state=entity.state, version=entity.version,
        no_show_at_ms=booking.no_show_at_ms, cancel_reason=booking.cancel_reason,
    )


def _not_found(booking_id: str) -> Outcome:
    shown = shown_id(booking_id)  # any length reaches here: cut, it cannot overflow the error's metadata
    return failure(TableReason.BOOKING_NOT_FOUND, f"no booking {shown!r}", metadata={"booking_id": shown})


def _book_violations(request: pb.BookRequest) -> list[tuple[str, str]]:
    """In field order. The key fields (table_id, slot_start_ms) are set: the
    gateway refuses a call without them (CONTRACT_VIOLATION) before this runs."""
    violations = text_violations(request, required=("table_id",), length_max=TEXT_LENGTH_MAX)
    if request.slot_start_ms < 0:
        violations.append(("slot_start_ms", "slot_start_ms must be a time in ms since the epoch"))
    if not 1 <= request.party_size <= PARTY_SIZE_MAX:
        violations.append(("party_size", f"party_size must be within 1..{PARTY_SIZE_MAX}"))
    return violations + text_violations(request, required=("guest",), length_max=TEXT_LENGTH_MAX)
