"""The auditor: what the store must hold, worked out only from the answers a
client saw, and checked against the store after every step of a simulation.

A client that loses a reply cannot know whether its move committed; neither
can the auditor. So every idempotency key is in one of three conditions:

* absent: no attempt committed (every answer so far said nothing changed);
* pending: an attempt may have committed (its reply was lost, or the store
  failed while committing); what the key's call may touch is *uncertain*
  until a retry answers;
* recorded: an attempt committed; every later answer under the key must be
  the identical bytes, flagged as a replay.

That ledger is the same for every app and lives in `Auditor`. What an app's
moves do is its own model: an app's auditor subclasses `Auditor` and fills
in the hooks (`predict`, `apply`, `read`, `check`, `sweep`). Effects are
applied once, when a key becomes recorded; uncertain rows are compared with
the store again as soon as their keys resolve, everything else exactly,
after every step.

`EntityAuditor` is that model for a service built on the framework, whose
entities are versioned rows of one machine's kind: it knows each entity's
state and version from the replies, and checks what holds for any machine
(versions move forward, terminal states are final, nothing appears that no
answer made); an app adds its own invariants on top.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Iterable, Mapping, Protocol, TypeVar

from google.protobuf.message import Message

from holdfast.call import Call
from holdfast.machine import Machine
from holdfast.memory import Changes, Rows
from holdfast.outcome import AnyReason, Outcome, Reason
from holdfast.store import ENTITIES, Entity

# Answers that say nothing about whether an earlier attempt committed.
TRANSIENT = frozenset({Reason.DEPENDENCY_UNAVAILABLE, Reason.BUDGET_EXCEEDED})


class Violation(AssertionError):
    """An invariant the store or the answers broke; the simulation stops on it."""


def require(condition: bool, message: str | Callable[[], str]) -> None:
    """An invariant check that stays on under `python -O`: finding these is the
    point. A message that is costly to format is passed as a function."""
    if not condition:
        raise Violation(message if isinstance(message, str) else message())


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the client built it. `key` and `fingerprint` are the
    gateway's (`call` is the gateway's whole `Call`, None for a move made by
    time); `touches` names the rows the move may change, so that they are
    uncertain while its key is pending; `subject` is what a move made by
    time was made for (so it can be made again), as its workload keeps it."""

    method: str
    message: Message | None
    key: bytes
    fingerprint: bytes
    touches: tuple[str, ...] = ()
    subject: Any = None
    call: Call | None = field(default=None, compare=False)

    def wire(self) -> bytes:
        if self.message is None:
            return self.key
        return self.message.SerializeToString(deterministic=True)

    def named(self) -> str:
        """What the request is about, for a message."""
        return self.touches[0] if self.touches else self.method


class Books(Protocol):
    """The store's committed rows, read without faults: the framework's
    entities, and `rows`, every table as committed, where an app that keeps
    tables of its own reads them (holdfast.apps.inventory_workload reads
    its stock and holds there)."""

    rows: Rows

    def entity(self, entity_id: str) -> Entity | None: ...
    def all_entities(self) -> Iterable[Entity]: ...


class Kind(enum.Enum):
    ABSENT = "absent"
    PENDING = "pending"
    RECORDED = "recorded"


@dataclass(frozen=True, slots=True)
class _Recorded:
    fingerprint: bytes
    reason: AnyReason | None
    payload: bytes


@dataclass
class Auditor:
    """The ledger of idempotency keys, and the hooks an app's model fills in."""

    records: dict[bytes, _Recorded] = field(default_factory=dict)
    pending: dict[bytes, Request] = field(default_factory=dict)
    # Business time while the answers being read were made: a move's now_ms is within.
    now_window_ms: tuple[int, int] = (0, 0)
    # Methods that only read: their answers are checked, never recorded.
    READS: ClassVar[frozenset[str]] = frozenset()

    # -- answers ---------------------------------------------------------------------

    def condition(self, key: bytes) -> Kind:
        if key in self.records:
            return Kind.RECORDED
        return Kind.PENDING if key in self.pending else Kind.ABSENT

    def answered(self, request: Request, outcome: Outcome | None) -> None:
        """One answer, in the order the moves ran; None is a reply never seen."""
        if request.method in self.READS:
            self.read(request, outcome)
            return
        recorded = self.records.get(request.key)
        if outcome is None or outcome.reason in TRANSIENT:
            if recorded is None:
                self.pending[request.key] = request
        elif outcome.reason is Reason.REQUEST_IN_FLIGHT:
            pass  # another attempt of this key is running; its own answer tells
        elif outcome.reason is Reason.IDEMPOTENCY_KEY_REUSED and recorded is None:
            # Another payload holds the key: only a committed attempt could.
            require(request.key in self.pending, f"{request.method}: key reused, but no attempt under it committed")
        elif recorded is not None:
            self._replayed(request, recorded, outcome)
        else:
            self._first(request, outcome)

    def uncertain(self) -> set[str]:
        """The rows a pending key's call may have changed."""
        return {row for r in self.pending.values() for row in r.touches}

    def _first(self, request: Request, outcome: Outcome) -> None:
        """The first answer under a key that no attempt is known to have committed."""
        if request.key not in self.pending and self.uncertain().isdisjoint(request.touches):
            allowed = self.predict(request)
            require(
                allowed is None or outcome.reason in allowed,
                lambda: f"{request.method} of {request.named()} answered {outcome.reason}, the model allows {allowed}",
            )
        if outcome.recorded:
            self._committed(request, outcome)
        else:
            # Checked after the record lookup, so no attempt ever committed.
            self.pending.pop(request.key, None)
            self.refused(request, outcome)

    def _replayed(self, request: Request, recorded: _Recorded, outcome: Outcome) -> None:
        if request.fingerprint != recorded.fingerprint:
            require(outcome.reason is Reason.IDEMPOTENCY_KEY_REUSED, f"{request.method}: another payload under a recorded key answered {outcome.reason}")
            return
        require(outcome.recorded and outcome.replayed, f"{request.method}: a recorded key answered {outcome.reason} (replayed={outcome.replayed})")
        require(
            (outcome.reason, outcome.payload) == (recorded.reason, recorded.payload),
            f"{request.method}: a replay differs from the first answer ({recorded.reason} -> {outcome.reason})",
        )

    def _committed(self, request: Request, outcome: Outcome) -> None:
        maybe_earlier = self.pending.pop(request.key, None) is not None
        require(not outcome.replayed or maybe_earlier, f"{request.method}: a replay of a key no attempt committed")
        self.records[request.key] = _Recorded(request.fingerprint, outcome.reason, outcome.payload)
        self.apply(request, outcome)

    # -- the app's model: what its moves may answer and what they change ------------------

    def predict(self, request: Request) -> set[AnyReason | None] | None:
        """The answers a move may give, from the model alone (None: no opinion);
        asked only when nothing it touches is uncertain. Refusing what the
        model says is there is as wrong as overselling."""
        return None

    def apply(self, request: Request, outcome: Outcome) -> None:
        """A first answer recorded under its key (a success or a recorded
        refusal); `outcome.replayed` when it was learned late, by a retry."""

    def refused(self, request: Request, outcome: Outcome) -> None:
        """A first answer not recorded: a one-move call changed nothing."""

    def read(self, request: Request, outcome: Outcome | None) -> None:
        """An answer of a read-only method (one of READS)."""

    # -- the store ----------------------------------------------------------------------

    def check(self, books: Books, changes: Changes, requests: Iterable[Request]) -> None:
        """Every invariant, for the rows a step's commits and requests touched."""

    def sweep(self, books: Books) -> None:
        """Every invariant, for every row: every few hundred steps, and at the end."""

    def reaped(self, books: Books, now_ms: int, limit: int) -> None:
        """A reaper round as of `now_ms` read what was due (at most `limit`
        rows per service) and made its moves; their answers have been read."""


# -- services built on the framework ----------------------------------------------------


@dataclass(slots=True)
class _Known:
    """The model's entity: its latest known state and version. Not `exact`
    when a move may have changed it without a reply saying how (a refusal
    that writes, a call of several moves answered before its last): the
    store then only has to be no older."""

    state: int | None
    version: int
    exact: bool


R = TypeVar("R", bound=Message)


class EntityAuditor(Auditor, Generic[R]):
    """The model of one framework service's entities, from its replies.

    `reply` is the service's reply message, whose `id_field`, `state` and
    `version` name the entity as stored; `settles` the states a success of
    each method (and of each move made by time, named as its workload names
    it) may leave. `not_found` is the service's refusal for an unknown id.

    Checked, for every entity: its kind; its state one of the machine's,
    never the initial one (no row is ever in it); the store's version never
    goes back, and is never behind a version an answer showed; a terminal
    state is final (the row never changes again); a fresh reply's version
    is above every earlier one of the entity; nothing is in the store that
    no answer made; where no key is pending, state and version equal the
    model's. An app adds `answer` (a success's reply), `row` (one entity as
    stored) and `rows` (all of them together).
    """

    def __init__(
        self, machine: Machine, reply: type[R], id_field: str, settles: Mapping[str, Iterable[int]], not_found: AnyReason
    ) -> None:
        Auditor.__init__(self)
        self.machine = machine
        self.reply = reply
        self.id_field = id_field
        self.settles = {method: frozenset(states) for method, states in settles.items()}
        self.not_found = not_found
        self.known: dict[str, _Known] = {}
        self.fresh_versions: dict[str, int] = {}
        self.store_versions: dict[str, tuple[int, int]] = {}  # entity -> (version, state) as last read from the store
        self.timed: dict[str, int] = {}  # entity -> its due_at_ms, as last read from the store
        self._timeouts_refused: set[str] = set()  # entities whose timeout this round was answered with a refusal

    def state(self, entity_id: str) -> int | None:
        """The entity's state as the answers last showed it (None: not known),
        what a workload's client picks its next call by."""
        known = self.known.get(entity_id)
        return None if known is None else known.state

    # -- answers ---------------------------------------------------------------------

    def apply(self, request: Request, outcome: Outcome) -> None:
        if not outcome.ok:
            self.changed_unseen(request.touches)
            return
        reply = self.reply.FromString(outcome.payload)
        entity_id = getattr(reply, self.id_field)
        require(entity_id in request.touches, lambda: f"{request.method} of {request.named()} answered for {entity_id}, another entity")
        allowed = self.settles.get(request.method)
        require(allowed is None or reply.state in allowed,
                lambda: f"{request.method} of {entity_id} left it {self._name(reply.state)}")
        if not outcome.replayed:
            last = self.fresh_versions.get(entity_id, 0)
            require(reply.version > last, lambda: f"{entity_id}: version went from {last} to {reply.version}")
            self.fresh_versions[entity_id] = reply.version
        self.learned(entity_id, reply.state, reply.version, fresh=not outcome.replayed)
        self.answer(request, reply, outcome.replayed)

    def learned(self, entity_id: str, state: int, version: int, fresh: bool) -> None:
        """An answer showed `entity_id` at (state, version). A fresh answer is
        the latest word on it; one learned late (a replay) is news only if the
        model knows no later version, and leaves it no more exact than it was."""
        known = self.known.get(entity_id)
        if known is None:
            self.known[entity_id] = _Known(state, version, True)
        elif version > known.version or (fresh and version == known.version):
            self.known[entity_id] = _Known(state, version, fresh or known.exact)

    def changed_unseen(self, entity_ids: Iterable[str]) -> None:
        """The entities may have moved on with no reply saying how."""
        for entity_id in entity_ids:
            known = self.known.get(entity_id)
            if known is None:
                self.known[entity_id] = _Known(None, 0, False)
            else:
                known.exact = False

    def refused(self, request: Request, outcome: Outcome) -> None:
        if request.call is None:  # a timeout that did not fire (the entity moved on, or the snapshot was behind)
            self._timeouts_refused.update(request.touches)

    def read(self, request: Request, outcome: Outcome | None) -> None:
        if outcome is None or outcome.reason in TRANSIENT or not request.touches:
            return
        entity_id = request.touches[0]
        known = self.known.get(entity_id)
        certain = entity_id not in self.uncertain()
        if outcome.ok:
            reply = self.reply.FromString(outcome.payload)
            require(getattr(reply, self.id_field) == entity_id, lambda: f"a read of {entity_id} answered {reply}")
            require(known is not None or not certain, lambda: f"a read found {entity_id}, which no answer created")
            if known is None:
                return
            require(reply.version >= known.version, lambda: f"a read of {entity_id} found version {reply.version}, answers showed {known.version}")
            if certain and known.exact:
                require((reply.state, reply.version) == (known.state, known.version),
                        lambda: f"a read of {entity_id} found {self._name(reply.state)} v{reply.version}, answers say {self._name(known.state)} v{known.version}")
            elif certain:
                self.known[entity_id] = _Known(reply.state, reply.version, True)  # the store's word, nothing pending
        elif outcome.reason is self.not_found and certain:
            require(known is None or known.state is None, lambda: f"{entity_id} vanished: a read answered {outcome.reason}")

    # -- the store ----------------------------------------------------------------------

    def check(self, books: Books, changes: Changes, requests: Iterable[Request]) -> None:
        ids = set(changes.of(ENTITIES.name))
        for request in requests:
            ids.update(request.touches)
        uncertain = self.uncertain()
        for entity_id in sorted(ids):
            self._check(books.entity(entity_id), entity_id, exact=entity_id not in uncertain)

    def reaped(self, books: Books, now_ms: int, limit: int) -> None:
        """Timeouts fire: after a round, no entity is still due by the round's
        time, unless its timeout's answer is not known yet or said it did not
        fire (another move got there first)."""
        refused, self._timeouts_refused = self._timeouts_refused, set()
        due = sorted(entity_id for entity_id, due_at_ms in self.timed.items() if due_at_ms <= now_ms)
        if len(due) > limit:
            return  # more than one round's worth: the next rounds take the rest
        excused = self.uncertain() | refused
        for entity_id in due:
            found = books.entity(entity_id)
            still_due = found is not None and 0 < found.due_at_ms <= now_ms and entity_id not in excused
            require(not still_due, lambda: f"{entity_id}'s timeout was due at {found.due_at_ms}; the reaper's round at {now_ms} did not fire it")

    def sweep(self, books: Books) -> None:
        mine = [e for e in books.all_entities() if e.kind == self.machine.name]
        uncertain = self.uncertain()
        for entity_id in sorted({e.entity_id for e in mine} | set(self.known)):
            self._check(books.entity(entity_id), entity_id, exact=entity_id not in uncertain)
        self.rows(sorted(mine, key=lambda e: e.entity_id))

    def _check(self, found: Entity | None, entity_id: str, exact: bool) -> None:
        if found is not None:
            require(found.kind == self.machine.name, lambda: f"{entity_id} is a {found.kind} entity, not {self.machine.name}")
            states = {int(s) for s in self.machine.states}
            require(found.state in states and found.state != self.machine.initial,
                    lambda: f"{entity_id} rests in state {found.state}, which is no state a {self.machine.name} entity rests in")
            last_version, last_state = self.store_versions.get(entity_id, (0, 0))
            require(found.version >= last_version, lambda: f"{entity_id}: the store's version went back from {last_version} to {found.version}")
            if last_version and self.machine.states(last_state) in self.machine.terminal:
                require((found.state, found.version) == (last_state, last_version),
                        lambda: f"{entity_id} left terminal {self._name(last_state)} for {self._name(found.state)} v{found.version}")
            answered = self.fresh_versions.get(entity_id, 0)
            require(found.version >= answered, lambda: f"{entity_id}: the store has version {found.version}, an answer showed {answered}")
            self.store_versions[entity_id] = (found.version, found.state)
            if found.due_at_ms > 0:
                self.timed[entity_id] = found.due_at_ms
            else:
                self.timed.pop(entity_id, None)
            self.row(found)
        else:
            self.timed.pop(entity_id, None)
        if not exact:
            return
        known = self.known.get(entity_id)
        if known is None:
            require(found is None, lambda: f"the store has {entity_id}, which no answer created")
            return
        if known.state is None:
            return
        require(found is not None, lambda: f"{entity_id} vanished")
        if known.exact:
            require((found.state, found.version) == (known.state, known.version),
                    lambda: f"{entity_id} is {self._name(found.state)} v{found.version}, answers say {self._name(known.state)} v{known.version}")

    def _name(self, state: int | None) -> str:
        return "unknown" if state is None else self.machine.states(state).name

    # -- what an app adds -----------------------------------------------------------------

    def answer(self, request: Request, reply: R, replayed: bool) -> None:
        """A success's reply, after the generic checks."""

    def row(self, entity: Entity) -> None:
        """One entity as stored, whenever it is checked."""

    def rows(self, entities: list[Entity]) -> None:
        """Every entity of the machine together, in id order (a sweep)."""
