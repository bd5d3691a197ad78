"""TableService under `holdfast simulate` (workload.py), run as a team runs
it: the command, from this folder. Seeded runs with faults find nothing;
the same seed gives the same trace; and broken TableServices (one that
double-books, one that seats no-shows, one whose no-shows never fire) are
caught with the seed and step that reproduce them."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from holdfast import Change, Entity, Outcome, current_call, derive_id, encode_data, failure, idempotency_key, shown_id
from holdfast.workload import Violation
from restaurant.tables.v1 import tables_pb2 as pb
from tables import NO_SHOW_AFTER_MS, TableReason, Tables
from workload import BookingAuditor, TablesWorkload, booking_id

HERE = Path(__file__).resolve().parent
OPS = 4000


def simulate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`holdfast simulate ARGS` in this folder, where `workload:...` imports."""
    return subprocess.run(
        [sys.executable, "-m", "holdfast.cli", "simulate", *args],
        cwd=HERE, capture_output=True, text=True, timeout=300, env=env,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_books_hold_under_faults(seed: int):
    done = simulate("--app", "workload:TablesWorkload", "--seed", str(seed), "--ops", str(OPS))
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    assert done.stdout.startswith(f"seed={seed} ops={OPS} app=workload:TablesWorkload faults=store=0.03,")


def test_one_seed_gives_one_trace_in_any_process():
    """No set order, no hash seed and no wall clock reach a choice."""
    outputs = {
        simulate("--app", "workload:TablesWorkload", "--seed", "5", "--ops", "1500",
                 env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1 and "trace=" in outputs.pop()


# -- broken services the auditor must catch -------------------------------------------------


class DoubleBooking(Tables):
    """Keys a booking by guest as well as table and slot: another guest's
    Book of a booked table and slot books it again."""

    async def Book(self, request: pb.BookRequest, context) -> Outcome:
        call = current_call()
        values = (request.table_id, request.slot_start_ms, request.guest)
        mine = replace(call, key=idempotency_key(call.contract.method, values))
        no_show_at_ms = request.slot_start_ms + NO_SHOW_AFTER_MS
        booking = pb.Booking(table_id=request.table_id, slot_start_ms=request.slot_start_ms,
                             party_size=request.party_size, guest=request.guest, no_show_at_ms=no_show_at_ms)

        def decide(entity: Entity | None, now_ms: int) -> Change:
            return Change(("BOOK",), booking, reply=self.render, due_at_ms=no_show_at_ms)

        return await self.move(derive_id(self.ID_PREFIX, mine.key), decide, call=mine)


class SeatsNoShows(Tables):
    """Seats a guest whatever the time: the no-show check is forgotten."""

    async def Seat(self, request: pb.SeatRequest, context) -> Outcome:
        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            if entity is None:
                return failure(TableReason.BOOKING_NOT_FOUND, f"no booking {shown_id(request.booking_id)!r}")
            return Change(("SEAT",), entity.data, reply=self.render)

        return await self.move(request.booking_id, decide)


class NeverNoShows(Tables):
    """Declares no timeout event: a guest who never comes stays BOOKED."""

    TIMEOUTS = {}


class NeverNoShowsWorkload(TablesWorkload):
    SERVICE = NeverNoShows


class DoubleBookingWorkload(TablesWorkload):
    SERVICE = DoubleBooking


class SeatsNoShowsWorkload(TablesWorkload):
    SERVICE = SeatsNoShows


@pytest.mark.parametrize(("workload", "caught"), [
    # A second guest's Book of a booked table and slot is answered with another booking.
    ("DoubleBookingWorkload", "Book of bk_"),
    # A no-show's Seat gets past the no-show check, where the answers say GUEST_NO_SHOW.
    ("SeatsNoShowsWorkload", "GUEST_NO_SHOW"),
    # No NO_SHOW ever fires: a booking past its no-show time is still due after a reaper round.
    ("NeverNoShowsWorkload", "did not fire it"),
])
def test_a_broken_service_is_caught_with_its_seed_and_step(workload: str, caught: str):
    done = simulate("--app", f"test_workload:{workload}", "--seed", "1", "--ops", str(OPS))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("FAILED seed=1 step="), done.stdout
    assert caught in done.stdout.splitlines()[0], done.stdout
    assert f"reproduce: holdfast simulate --seed 1 --ops {OPS} --faults " in done.stdout
    assert done.stdout.rstrip().endswith(f"--app test_workload:{workload}")


def test_two_bookings_of_one_table_and_slot_are_caught_whatever_their_ids():
    """The books' own check, for a service that would name a second booking
    of a table and slot some other way than DoubleBooking does."""
    slot_ms = 1_700_000_000_000
    data = encode_data(pb.Booking(table_id="table-1", slot_start_ms=slot_ms, party_size=2, guest="Ada",
                                  no_show_at_ms=slot_ms + NO_SHOW_AFTER_MS))
    first = Entity(booking_id("table-1", slot_ms), "tables", pb.BOOKING_STATE_BOOKED, 1, data, "", 0, slot_ms + NO_SHOW_AFTER_MS)
    auditor = BookingAuditor()
    auditor.rows([first])
    with pytest.raises(Violation, match="table-1 at 1700000000000 is booked twice"):
        auditor.rows([first, replace(first, entity_id="bk_another")])
    with pytest.raises(Violation, match="whose booking has another id"):
        auditor.row(replace(first, entity_id="bk_another"))
