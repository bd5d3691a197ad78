"""The reservation state machine, declared once as a table.

The table is compiled into a `transitions.Machine` once per process (which
validates it and can draw it) and into a `(state, event) -> state` map that
moves consult. No `Machine` is built per request: construction costs hundreds
of microseconds and leaves reference cycles for the garbage collector.

`-ING` states are write-ahead intents. A move walks from a resting state
through its intent to the next resting state inside one store transaction;
an intent found at start-up (left by a crash of a writer that persisted it)
is driven forward or back by recovery, as an ordinary move.
"""

from __future__ import annotations

import enum
from typing import Iterable

from transitions import Machine


class State(enum.IntEnum):
    """Values equal the wire's `ReservationState` numbers."""

    AVAILABLE = 1
    RESERVING = 2
    RESERVED = 3
    CONFIRMING = 4
    CONFIRMED = 5
    RELEASING = 6
    RELEASED = 7


TERMINAL = frozenset({State.CONFIRMED, State.RELEASED})
INTENTS = frozenset({State.RESERVING, State.CONFIRMING, State.RELEASING})

# (source, event, destination). The first two rows are the design's required moves.
TABLE: tuple[tuple[State, str, State], ...] = (
    (State.AVAILABLE, "RESERVE_REQUEST", State.RESERVING),
    (State.RESERVING, "CONFIRM_TIMEOUT", State.AVAILABLE),
    (State.RESERVING, "HOLD_GRANTED", State.RESERVED),
    (State.RESERVING, "STOCK_SHORT", State.AVAILABLE),
    (State.RESERVED, "CONFIRM_REQUEST", State.CONFIRMING),
    (State.CONFIRMING, "SALE_RECORDED", State.CONFIRMED),
    (State.RESERVED, "RELEASE_REQUEST", State.RELEASING),
    (State.RESERVED, "HOLD_EXPIRY", State.RELEASING),
    (State.RELEASING, "STOCK_RETURNED", State.RELEASED),
)

# Each move is a walk of events through one intent, taken in one transaction.
RESERVE = ("RESERVE_REQUEST", "HOLD_GRANTED")
CONFIRM = ("CONFIRM_REQUEST", "SALE_RECORDED")
RELEASE = ("RELEASE_REQUEST", "STOCK_RETURNED")
EXPIRE = ("HOLD_EXPIRY", "STOCK_RETURNED")
# Recovery of an intent: a reserve that never took stock goes back, a confirm
# or release that had decided goes forward (its stock effect is in the same
# transaction as the intent, so it has happened).
RECOVERY: dict[State, tuple[str, ...]] = {
    State.RESERVING: ("CONFIRM_TIMEOUT",),
    State.CONFIRMING: ("SALE_RECORDED",),
    State.RELEASING: ("STOCK_RETURNED",),
}


def _compile(table: Iterable[tuple[State, str, State]]) -> tuple[Machine, dict[tuple[State, str], State]]:
    machine = Machine(
        model=None,
        states=[s.name for s in State],
        transitions=[{"trigger": e, "source": s.name, "dest": d.name} for s, e, d in table],
        initial=State.AVAILABLE.name,
        auto_transitions=False,
    )
    compiled: dict[tuple[State, str], State] = {}
    for name, event in machine.events.items():
        for source, moves in event.transitions.items():
            assert len(moves) == 1, f"{name} from {source} must be deterministic"
            compiled[(State[source], name)] = State[moves[0].dest]
    return machine, compiled


MACHINE, _NEXT = _compile(TABLE)


def walk(state: State, events: Iterable[str]) -> State | None:
    """The state after `events` from `state`, or None when a step is not allowed."""
    for event in events:
        state = _NEXT.get((state, event))
        if state is None:
            return None
    return state
