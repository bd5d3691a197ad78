"""TableService's workload for `holdfast simulate`: a seeded client that
books tables for quarter-hour slots around now, seats and cancels guests,
reads, and tries what must be refused; and the auditor of the books.
Run from this folder:

    holdfast simulate --app workload:TablesWorkload --seed 1 --ops 5000

The books must satisfy, after every answer and every step:

* one booking per table and slot: a booking's id is its table and slot's
  (the Book key's), no two bookings share a table and slot, and another
  guest's Book of a booked table and slot is refused;
* versions move forward, a terminal state is final, and nothing is stored
  that no answer made (holdfast's `EntityAuditor`);
* a no-show is never seated: Seat succeeds only before the no-show time,
  NO_SHOW fires only after it, and a booking past it is refused as a no-show;
* a BOOKED booking's timeout is due at its no-show time, and no other
  booking has one.
"""

from __future__ import annotations

from holdfast import Engine, Entity, Outcome, Reason, Service, decode_data, derive_id, idempotency_key
from holdfast.workload import (
    AppWorkload,
    Client,
    EntityAuditor,
    Kind,
    Request,
    Seen,
    call_of,
    contracts_of,
    observed,
    request_of,
    require,
    timeout_method,
)
from restaurant.tables.v1 import tables_pb2 as pb
from tables import NO_SHOW_AFTER_MS, BOOKING, Booking, TableReason, Tables

CONTRACTS = contracts_of(Tables)
BOOK = CONTRACTS["Book"].method
SLOT_MS = 15 * 60 * 1000  # bookings are for quarter hours
TABLE_IDS = tuple(f"table-{n}" for n in range(1, 17))
ODD_TABLE = "table-odd"  # only refused Books name it, so no valid Book shares their key
GUESTS = ("Ada", "Grace", "Edsger", "Barbara")
UNKNOWN = "bk_" + "0" * 24
# What a booked guest does: comes once the slot starts, cancels, or comes only
# after the no-show time (or never), in these proportions.
FATES = ("comes",) * 6 + ("cancels",) + ("late",) * 3


def booking_id(table_id: str, slot_start_ms: int) -> str:
    """The one booking a table and slot can have: the id its Book key derives."""
    return derive_id(Tables.ID_PREFIX, idempotency_key(BOOK, (table_id, slot_start_ms)))


class TablesWorkload(AppWorkload):
    """The client and the auditor of TableService. `SERVICE` is the servicer
    class hosted: a test swaps in a broken one to see the auditor catch it."""

    SERVICE: type[Tables] = Tables

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.auditor = BookingAuditor()
        self.bookings: list[str] = []  # the booking ids Books of slots not yet over named, in order
        self._slot_of: dict[str, int] = {}  # booking -> its slot
        self._slots: list[tuple[str, int]] = []  # the tables and slots booked, in order
        self._fate: dict[str, str] = {}  # booking -> what its guest does (FATES)

    def host(self, engine: Engine, seen: Seen) -> tuple[Service, ...]:
        self.services = (observed(self.SERVICE, seen)(engine),)
        return self.services

    def build(self, method: str, message: object) -> Request:
        call = call_of(CONTRACTS[method], message)
        touched = derive_id(Tables.ID_PREFIX, call.key) if method == "Book" else message.booking_id
        return request_of(call, message, (touched,))

    # -- the seeded client -------------------------------------------------------------

    def request(self) -> Request:
        rng = self.rng
        roll = rng.random()
        now_ms = self.clock.now_ms()
        recent = self.bookings[-160:]  # an hour and more of bookings
        open_ = [b for b in recent if self._state(b) in (None, Booking.BOOKED)]
        if roll < 0.45 or not open_:
            return self.book(rng.choice(TABLE_IDS), self._slot())
        if roll < 0.70:
            arrived = [b for b in open_ if self._fate[b] == "comes" and self._slot_of[b] <= now_ms]
            return self.seat(rng.choice(arrived)) if arrived else self.book(rng.choice(TABLE_IDS), self._slot())
        if roll < 0.74:
            # A guest who comes after the no-show time: mostly before the reaper has fired.
            late = [b for b in open_ if self._fate[b] == "late" and self._slot_of[b] + NO_SHOW_AFTER_MS <= now_ms]
            if late or rng.random() < 0.2:
                return self.seat(rng.choice(late or recent))
        elif roll < 0.80:
            cancelling = [b for b in open_ if self._fate[b] == "cancels"]
            if cancelling:
                booking = rng.choice(cancelling)
                reason = rng.choice(("", "changed plans"))
                return self.once(("Cancel", booking), lambda: self.build("Cancel", pb.CancelRequest(booking_id=booking, reason=reason)))
        return self._odd_request(rng.choice(open_))

    def book(self, table_id: str, slot_start_ms: int) -> Request:
        """The one Book the client sends for a table and slot, by whichever
        guest asks first, whose fate is drawn with it."""
        rng = self.rng

        def build() -> Request:
            message = pb.BookRequest(table_id=table_id, slot_start_ms=slot_start_ms, party_size=rng.randint(1, 6),
                                     guest=rng.choice(GUESTS))
            request = self.build("Book", message)
            booking = request.touches[0]
            if booking not in self._slot_of and slot_start_ms + NO_SHOW_AFTER_MS > self.clock.now_ms():
                self._slot_of[booking] = slot_start_ms
                self.bookings.append(booking)
                self._slots.append((table_id, slot_start_ms))
                self._fate[booking] = rng.choice(FATES)
            return request

        return self.once(("Book", table_id, slot_start_ms), build)

    def seat(self, booking: str) -> Request:
        return self.once(("Seat", booking), lambda: self.build("Seat", pb.SeatRequest(booking_id=booking)))

    def _slot(self) -> int:
        """A quarter hour from the one before this (too late to book, or
        nearly) to an hour ahead."""
        now_ms = self.clock.now_ms()
        return (now_ms // SLOT_MS + self.rng.randrange(-1, 5)) * SLOT_MS

    def _state(self, booking: str) -> Booking | None:
        state = self.auditor.state(booking)
        return None if state is None else Booking(state)

    def _odd_request(self, booking: str) -> Request:
        """Reads, unknown ids, bad input, another guest for a booked table and slot."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return self.build("GetBooking", pb.GetBookingRequest(booking_id=rng.choice((booking, UNKNOWN))))
        if roll < 0.5:
            if rng.random() < 0.5:
                return self.build("Seat", pb.SeatRequest(booking_id=UNKNOWN))
            return self.build("Cancel", pb.CancelRequest(booking_id=UNKNOWN))
        if roll < 0.6:
            party_size = rng.choice((0, 21))
            message = pb.BookRequest(table_id=ODD_TABLE, slot_start_ms=self._slot(), party_size=party_size, guest="Ada")
            return self.build("Book", message)
        table_id, slot_start_ms = rng.choice(self._slots[-48:])
        other = pb.BookRequest(table_id=table_id, slot_start_ms=slot_start_ms, party_size=2, guest="Someone Else")
        request = self.build("Book", other)
        if self.auditor.condition(request.key) is Kind.RECORDED:
            return request  # only a recorded key is reused: an unresolved one would stay ambiguous forever
        return self.build("GetBooking", pb.GetBookingRequest(booking_id=booking))


class BookingAuditor(EntityAuditor[pb.BookingReply]):
    """Bookings as the answers say they are, and what TableService promises of them."""

    READS = frozenset({"GetBooking"})
    TIMEOUT = timeout_method(Tables)

    def __init__(self) -> None:
        settles = {"Book": {Booking.BOOKED}, "Seat": {Booking.SEATED}, "Cancel": {Booking.CANCELLED},
                   self.TIMEOUT: {Booking.NO_SHOW}}
        super().__init__(BOOKING, pb.BookingReply, "booking_id", settles, TableReason.BOOKING_NOT_FOUND)
        self.no_show_at_ms: dict[str, int] = {}  # booking -> its no-show time, from the answers

    # -- answers ---------------------------------------------------------------------

    def predict(self, request: Request) -> set[object] | None:
        message = request.message
        if request.method == "Book":
            if not 1 <= message.party_size <= 20:
                return {Reason.INVALID_REQUEST}
            return self._by(message.slot_start_ms + NO_SHOW_AFTER_MS, before={None}, after={Reason.INVALID_REQUEST})
        if request.method not in ("Seat", "Cancel"):
            return None  # a timeout: its own checks are in `answer`
        booking = request.touches[0]
        known = self.known.get(booking)
        if known is None:
            return {TableReason.BOOKING_NOT_FOUND}
        no_show_at_ms = self.no_show_at_ms.get(booking)
        if not known.exact or no_show_at_ms is None:
            return None  # the model cannot tell (a move it saw no reply of; a booking it knows only from a read)
        state = Booking(known.state)
        if state is Booking.BOOKED:
            allowed = self._by(no_show_at_ms, before={None}, after={TableReason.GUEST_NO_SHOW})
        else:
            allowed = {TableReason.GUEST_NO_SHOW if state is Booking.NO_SHOW else Reason.INVALID_TRANSITION}
        # A snapshot behind the store (a commit that failed after applying)
        # makes any move on the booking compensate first.
        return allowed | {Reason.VERSION_CONFLICT}

    def _by(self, at_ms: int, before: set[object], after: set[object]) -> set[object]:
        """`after` if the move ran at or after `at_ms`, `before` if before it;
        both when the answers' time window straddles it."""
        earliest_ms, latest_ms = self.now_window_ms
        if at_ms <= earliest_ms:
            return after
        return before if at_ms > latest_ms else before | after

    def apply(self, request: Request, outcome: Outcome) -> None:
        booking = request.touches[0]
        if outcome.reason is TableReason.GUEST_NO_SHOW:
            at_ms = self.no_show_at_ms.get(booking)
            require(outcome.replayed or at_ms is None or at_ms <= self.now_window_ms[1],
                    lambda: f"{request.method} of {booking} answered GUEST_NO_SHOW before its no-show time {at_ms}")
            known = self.known.get(booking)
            if known is not None and known.exact and known.state == Booking.BOOKED:
                self.learned(booking, Booking.NO_SHOW, known.version + 1, fresh=True)  # the refusal wrote the no-show
            elif known is None or not known.exact or known.state != Booking.NO_SHOW:
                self.changed_unseen(request.touches)
            return
        if outcome.reason is Reason.INVALID_TRANSITION:
            return  # refused by the machine's table: nothing was written
        super().apply(request, outcome)

    def answer(self, request: Request, reply: pb.BookingReply, replayed: bool) -> None:
        booking = reply.booking_id
        self.no_show_at_ms[booking] = reply.no_show_at_ms
        if request.method == "Book":
            message = request.message
            require(booking == booking_id(message.table_id, message.slot_start_ms),
                    lambda: f"Book of {message.table_id} at {message.slot_start_ms} made {booking}, not the booking of that table and slot")
            asked = (message.table_id, message.slot_start_ms, message.party_size, message.guest)
            require((reply.table_id, reply.slot_start_ms, reply.party_size, reply.guest) == asked, lambda: f"Book of {asked} answered {reply}")
            require(reply.no_show_at_ms == reply.slot_start_ms + NO_SHOW_AFTER_MS, lambda: f"{booking} is a no-show at {reply.no_show_at_ms}")
        earliest_ms, latest_ms = self.now_window_ms
        if request.method == "Seat" and not replayed:
            require(reply.no_show_at_ms > earliest_ms,
                    lambda: f"{booking} was seated at {earliest_ms} or later, though a no-show since {reply.no_show_at_ms}")
        if request.method == self.TIMEOUT:
            require(reply.no_show_at_ms <= latest_ms, lambda: f"{booking} was made a no-show by {latest_ms}, before {reply.no_show_at_ms}")

    # -- the store ----------------------------------------------------------------------

    def row(self, entity: Entity) -> None:
        booking = decode_data(entity.data, pb.Booking)
        require(entity.entity_id == booking_id(booking.table_id, booking.slot_start_ms),
                lambda: f"{entity.entity_id} holds table {booking.table_id} at {booking.slot_start_ms}, whose booking has another id")
        require(booking.no_show_at_ms == booking.slot_start_ms + NO_SHOW_AFTER_MS, lambda: f"{entity.entity_id}: {booking}")
        due_ms = booking.no_show_at_ms if entity.state == Booking.BOOKED else 0
        require((entity.due_at_ms, entity.lease_owner) == (due_ms, ""),
                lambda: f"{entity.entity_id} is {Booking(entity.state).name} with its timeout due at {entity.due_at_ms}, not {due_ms}")

    def rows(self, entities: list[Entity]) -> None:
        """One booking per table and slot, whatever the ids."""
        taken: dict[tuple[str, int], str] = {}
        for entity in entities:
            booking = decode_data(entity.data, pb.Booking)
            slot = (booking.table_id, booking.slot_start_ms)
            other = taken.setdefault(slot, entity.entity_id)
            require(other == entity.entity_id, lambda: f"{booking.table_id} at {booking.slot_start_ms} is booked twice: {other} and {entity.entity_id}")
