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
from typing import Generic, Iterable, Mapping, TypeVar

from transitions import Machine as TransitionsMachine


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


S = TypeVar("S", bound=enum.IntEnum)


class Machine(Generic[S]):
    """A state machine declared once as a table of (source, event, destination).

    Compiled into a `transitions.Machine` once (which validates the table and
    can draw it: holdfast.graph) and into a `(state, event) -> state` map that
    moves consult in microseconds. `initial` is the state of an entity that
    has no row yet; `terminal` states allow no event; `intents` are
    write-ahead states that `recovery` walks forward or back.
    """

    def __init__(
        self,
        name: str,
        states: type[S],
        table: Iterable[tuple[S, str, S]],
        initial: S,
        terminal: Iterable[S] = (),
        intents: Iterable[S] = (),
        recovery: Mapping[S, tuple[str, ...]] | None = None,
    ) -> None:
        self.name = name
        self.states = states
        self.table: tuple[tuple[S, str, S], ...] = tuple(table)
        self.initial = initial
        self.terminal: frozenset[S] = frozenset(terminal)
        self.intents: frozenset[S] = frozenset(intents)
        self.recovery: dict[S, tuple[str, ...]] = dict(recovery or {})
        self.compiled = Machine._build(states, self.table, initial)
        self._next: dict[tuple[S, str], S] = {}
        for event_name, event in self.compiled.events.items():
            for source, moves in event.transitions.items():
                assert len(moves) == 1, f"{name}: {event_name} from {source} must be deterministic"
                self._next[(states[source], event_name)] = states[moves[0].dest]
        leaving = {source for source, _ in self._next}
        assert not leaving & self.terminal, f"{name}: terminal states {sorted(leaving & self.terminal)} have moves"
        for intent, events in self.recovery.items():
            assert intent in self.intents, f"{name}: recovery of {intent.name}, which is no intent"
            assert self.walk(intent, events) is not None, f"{name}: recovery of {intent.name} is not a walk"

    @staticmethod
    def _build(states: type[S], table: tuple[tuple[S, str, S], ...], initial: S) -> TransitionsMachine:
        return TransitionsMachine(
            model=None,
            states=[s.name for s in states],
            transitions=[{"trigger": e, "source": s.name, "dest": d.name} for s, e, d in table],
            initial=initial.name,
            auto_transitions=False,
        )

    @property
    def events(self) -> tuple[str, ...]:
        """Every event of the table, in the order first declared."""
        return tuple(dict.fromkeys(event for _, event, _ in self.table))

    def next(self, state: S, event: str) -> S | None:
        """The state `event` leads to from `state`, or None when not allowed."""
        return self._next.get((state, event))

    def walk(self, state: S, events: Iterable[str]) -> S | None:
        """The state after `events` from `state`, or None when a step is not allowed."""
        for event in events:
            state = self._next.get((state, event))
            if state is None:
                return None
        return state


INVENTORY: Machine[State] = Machine(
    "inventory", State, TABLE, initial=State.AVAILABLE, terminal=TERMINAL, intents=INTENTS, recovery=RECOVERY
)
MACHINE = INVENTORY.compiled
walk = INVENTORY.walk
