"""The inventory's reservation state machine, declared once as a table
(holdfast.machine compiles it).

`-ING` states are write-ahead intents. A move walks from a resting state
through its intent to the next resting state inside one store transaction;
an intent found at start-up (left by a crash of a writer that persisted it)
is driven forward or back by recovery, as an ordinary move.
"""

from __future__ import annotations

import enum

from holdfast.machine import Machine


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


INVENTORY: Machine[State] = Machine(
    "inventory", State, TABLE, initial=State.AVAILABLE, terminal=TERMINAL, intents=INTENTS, recovery=RECOVERY
)
MACHINE = INVENTORY.compiled
walk = INVENTORY.walk
