"""The reservation machine's table: what each walk of events reaches."""

import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.apps import inventory_machine as machine
from holdfast.apps.inventory_machine import State


def test_machine_has_the_seven_states_of_the_wire_enum():
    assert [s.name for s in State] == [
        "AVAILABLE", "RESERVING", "RESERVED", "CONFIRMING", "CONFIRMED", "RELEASING", "RELEASED",
    ]
    for state in State:
        assert pb.ReservationState.Value(f"RESERVATION_STATE_{state.name}") == state.value


def test_design_required_moves_are_in_the_table():
    assert (State.AVAILABLE, "RESERVE_REQUEST", State.RESERVING) in machine.TABLE
    assert (State.RESERVING, "CONFIRM_TIMEOUT", State.AVAILABLE) in machine.TABLE


@pytest.mark.parametrize(
    "start, events, end",
    [
        (State.AVAILABLE, machine.RESERVE, State.RESERVED),
        (State.RESERVED, machine.CONFIRM, State.CONFIRMED),
        (State.RESERVED, machine.RELEASE, State.RELEASED),
        (State.RESERVED, machine.EXPIRE, State.RELEASED),
        (State.AVAILABLE, ("RESERVE_REQUEST", "STOCK_SHORT"), State.AVAILABLE),
        (State.RESERVING, machine.RECOVERY[State.RESERVING], State.AVAILABLE),
        (State.CONFIRMING, machine.RECOVERY[State.CONFIRMING], State.CONFIRMED),
        (State.RELEASING, machine.RECOVERY[State.RELEASING], State.RELEASED),
        (State.CONFIRMED, machine.RELEASE, None),
        (State.CONFIRMED, machine.CONFIRM, None),
        (State.RELEASED, machine.CONFIRM, None),
        (State.RELEASED, machine.EXPIRE, None),
        (State.RESERVED, machine.RESERVE, None),
        (State.AVAILABLE, machine.CONFIRM, None),
        (State.RESERVED, ("NO_SUCH_EVENT",), None),
    ],
)
def test_walk_reaches_the_table_destination(start, events, end):
    assert machine.walk(start, events) == end


def test_terminal_states_have_no_way_out():
    for source, _, _ in machine.TABLE:
        assert source not in machine.TERMINAL


def test_every_intent_has_a_recovery():
    assert set(machine.RECOVERY) == set(machine.INTENTS)

