"""A state machine, declared once as a table (an app declares its own: the
inventory's in holdfast.apps.inventory_machine, dispatch's in
holdfast.apps.fulfillment).

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
                destination = moves[0].dest
                assert destination is not None, f"{name}: {event_name} from {source} goes nowhere"
                self._next[(states[source], event_name)] = states[destination]
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
            following = self._next.get((state, event))
            if following is None:
                return None
            state = following
        return state
