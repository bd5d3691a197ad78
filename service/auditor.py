"""The auditor: what the store must hold, worked out only from the answers a
client saw, and checked against the store after every step of a simulation.

A client that loses a reply cannot know whether its move committed; neither
can the auditor. So every idempotency key is in one of three conditions:

* absent: no attempt committed (every answer so far said nothing changed);
* pending: an attempt may have committed (its reply was lost, or the store
  failed while committing); the key's reservation and SKU are *uncertain*
  until a retry answers;
* recorded: an attempt committed; every later answer under the key must be
  the identical bytes, flagged as a replay.

Effects are applied once, when a key becomes recorded. Reservation answers
carry the absolute state and version, and stock follows from the states, so
an effect learned late (a retry resolving a lost reply) lands in the right
place: a version older than the one the model holds is simply already
superseded. Uncertain entities are compared with the store again as soon as
their keys resolve; everything else is compared exactly, after every step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.machine import INTENTS, State
from holdfast.outcome import Outcome, Reason
from holdfast.store import Reservation, Stock

# Answers that say nothing about whether an earlier attempt committed.
TRANSIENT = frozenset({Reason.DEPENDENCY_UNAVAILABLE, Reason.BUDGET_EXCEEDED})
# The states a successful move of each kind may leave its reservation in
# (recovery drives an intent forward or back: machine.RECOVERY).
SETTLES_TO = {
    "Reserve": {State.RESERVED},
    "Confirm": {State.CONFIRMED},
    "Release": {State.RELEASED},
    "Expire": {State.RELEASED},
    "Recover": {State.AVAILABLE, State.CONFIRMED, State.RELEASED},
}
READS = frozenset({"GetStock", "GetReservation"})


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
    gateway's; `sku` and `rid` name what the move may touch (None: nothing)."""

    method: str
    message: object
    key: bytes
    fingerprint: bytes
    sku: str | None = None
    rid: str | None = None
    hold: Reservation | None = None  # the reaper's input, for Expire

    def wire(self) -> bytes:
        if self.message is None:
            return self.key
        return self.message.SerializeToString(deterministic=True)


class Truth(Protocol):
    """The store's committed state, read without faults."""

    def stock(self, sku_id: str) -> Stock | None: ...
    def reservation(self, reservation_id: str) -> Reservation | None: ...
    def all_stock(self) -> Iterable[Stock]: ...
    def all_reservations(self) -> Iterable[Reservation]: ...


class Kind(enum.Enum):
    ABSENT = "absent"
    PENDING = "pending"
    RECORDED = "recorded"


@dataclass(frozen=True, slots=True)
class _Recorded:
    fingerprint: bytes
    reason: Reason | None
    payload: bytes


@dataclass(slots=True)
class _Held:
    """The model's reservation: its latest known state and version."""

    sku_id: str
    quantity: int
    state: State
    version: int
    expires_at_ms: int
    expired: bool  # released by the reaper, not the client


@dataclass(slots=True)
class _Sku:
    total: int = 0
    total_version: int = 0  # the stock version of the PutStock answer `total` came from
    held: int = 0
    sold: int = 0


@dataclass
class Auditor:
    records: dict[bytes, _Recorded] = field(default_factory=dict)
    pending: dict[bytes, Request] = field(default_factory=dict)
    skus: dict[str, _Sku] = field(default_factory=dict)
    holds: dict[str, _Held] = field(default_factory=dict)
    # Highest version seen per entity: in fresh answers, and in the store.
    fresh_versions: dict[str, int] = field(default_factory=dict)
    store_versions: dict[str, int] = field(default_factory=dict)
    stock_versions: dict[str, int] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)  # the model's RESERVED holds
    # Business time while the answers being read were made: a move's now_ms is within.
    now_window_ms: tuple[int, int] = (0, 0)

    # -- answers ---------------------------------------------------------------------

    def condition(self, key: bytes) -> Kind:
        if key in self.records:
            return Kind.RECORDED
        return Kind.PENDING if key in self.pending else Kind.ABSENT

    def answered(self, request: Request, outcome: Outcome | None) -> None:
        """One answer, in the order the moves ran; None is a reply never seen."""
        if request.method in READS:
            self._read(request, outcome)
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

    def _first(self, request: Request, outcome: Outcome) -> None:
        """The first answer under a key that no attempt is known to have committed."""
        if request.key not in self.pending and request.sku not in self.uncertain_skus() and request.rid not in self.uncertain_rids():
            allowed = self._predict(request)
            require(
                allowed is None or outcome.reason in allowed,
                lambda: f"{request.method} of {request.rid or request.sku} answered {outcome.reason}, the model allows {allowed}",
            )
        if outcome.recorded:
            self._committed(request, outcome)
        else:
            # Checked after the record lookup, so no attempt ever committed.
            self.pending.pop(request.key, None)

    def _predict(self, request: Request) -> set[Reason | None] | None:
        """The answers a move may give, from the model alone (None: no opinion).
        Refusing what the model says is there is as wrong as overselling."""
        message = request.message
        if request.method == "PutStock":
            sku = self.skus.get(request.sku)
            committed = 0 if sku is None else sku.held + sku.sold
            return {None} if message.total >= committed else {Reason.STOCK_BELOW_COMMITTED}
        if request.method == "Reserve":
            if message.quantity <= 0:
                return {Reason.INVALID_REQUEST}
            sku = self.skus.get(request.sku)
            if sku is None or sku.total_version == 0:
                return {Reason.SKU_NOT_FOUND}
            available = sku.total - sku.held - sku.sold
            return {None} if available >= message.quantity else {Reason.INSUFFICIENT_STOCK}
        if request.method in ("Confirm", "Release"):
            held = self.holds.get(request.rid)
            if held is None:
                return {Reason.RESERVATION_NOT_FOUND}
            # A snapshot behind the store (a commit that failed after applying)
            # makes any move on the reservation compensate first.
            return {Reason.VERSION_CONFLICT} | self._settles(request, held)
        return None

    def _settles(self, request: Request, held: _Held) -> set[Reason | None]:
        if held.state is State.RELEASED and held.expired:
            return {Reason.HOLD_EXPIRED}
        if request.method == "Release":
            return {None} if held.state is State.RESERVED else {Reason.INVALID_TRANSITION}
        expected = request.message.expected_version
        if expected and expected != held.version:
            return {Reason.VERSION_CONFLICT}
        if held.state is not State.RESERVED:
            return {Reason.INVALID_TRANSITION}
        earliest_ms, latest_ms = self.now_window_ms
        if held.expires_at_ms <= earliest_ms:
            return {Reason.HOLD_EXPIRED}
        return {None} if held.expires_at_ms > latest_ms else {None, Reason.HOLD_EXPIRED}

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
        if outcome.ok:
            self._apply(request, outcome)

    def _apply(self, request: Request, outcome: Outcome) -> None:
        if request.method == "PutStock":
            reply = pb.StockReply.FromString(outcome.payload)
            _check_reply(reply)
            require(reply.sku_id == request.sku and reply.total == request.message.total, f"PutStock answered {reply}")
            sku = self.skus.setdefault(reply.sku_id, _Sku())
            if reply.version > sku.total_version:
                sku.total, sku.total_version = reply.total, reply.version
            return
        reply = pb.ReservationReply.FromString(outcome.payload)
        state = State(reply.state)
        require(reply.reservation_id == request.rid and reply.sku_id == request.sku, f"{request.method} answered for {reply.reservation_id}")
        require(state in SETTLES_TO[request.method], f"{request.method} of {request.rid} left it {state.name}")
        if not outcome.replayed:
            last = self.fresh_versions.get(request.rid, 0)
            require(reply.version > last, f"{request.rid}: version went from {last} to {reply.version}")
            self.fresh_versions[request.rid] = reply.version
        self._settle(request.rid, reply, request.method == "Expire")

    def _settle(self, rid: str, reply: pb.ReservationReply, expired: bool) -> None:
        """Moves the model's reservation to `state` unless it already knows a later version."""
        held = self.holds.get(rid)
        if held is not None and held.version >= reply.version:
            return
        state = State(reply.state)
        sku = self.skus.setdefault(reply.sku_id, _Sku())
        if held is not None:
            _count(sku, held.state, -held.quantity)
        _count(sku, state, reply.quantity)
        self.holds[rid] = _Held(reply.sku_id, reply.quantity, state, reply.version, reply.expires_at_ms, expired)
        (self.reserved.add if state is State.RESERVED else self.reserved.discard)(rid)

    def _read(self, request: Request, outcome: Outcome | None) -> None:
        if outcome is None or outcome.reason in TRANSIENT:
            return
        if request.method == "GetStock":
            self._read_stock(request.sku, outcome)
        elif request.rid not in self.uncertain_rids():
            held = self.holds.get(request.rid)
            if held is None:
                require(outcome.reason is Reason.RESERVATION_NOT_FOUND, f"GetReservation of unknown {request.rid}: {outcome.reason}")
            else:
                require(outcome.ok, f"GetReservation of {request.rid} answered {outcome.reason}")
                reply = pb.ReservationReply.FromString(outcome.payload)
                require((State(reply.state), reply.version) == (held.state, held.version), f"GetReservation of {request.rid}: {reply} vs {held}")

    def _read_stock(self, sku_id: str, outcome: Outcome) -> None:
        if outcome.ok:
            _check_reply(pb.StockReply.FromString(outcome.payload))
        if sku_id in self.uncertain_skus():
            return
        sku = self.skus.get(sku_id)
        if sku is None or sku.total_version == 0:
            require(outcome.reason is Reason.SKU_NOT_FOUND, f"GetStock of unknown {sku_id}: {outcome.reason}")
            return
        require(outcome.ok, f"GetStock of {sku_id} answered {outcome.reason}")
        reply = pb.StockReply.FromString(outcome.payload)
        require((reply.total, reply.held, reply.sold) == (sku.total, sku.held, sku.sold), f"GetStock of {sku_id}: {reply} vs {sku}")

    # -- the store ----------------------------------------------------------------------

    def uncertain_skus(self) -> set[str]:
        return {r.sku for r in self.pending.values() if r.sku is not None}

    def uncertain_rids(self) -> set[str]:
        return {r.rid for r in self.pending.values() if r.rid is not None}

    def check(self, truth: Truth, skus: Iterable[str], rids: Iterable[str]) -> None:
        """Every invariant, for the entities a step touched."""
        uncertain_skus, uncertain_rids = self.uncertain_skus(), self.uncertain_rids()
        for sku_id in skus:
            self._check_stock(truth.stock(sku_id), sku_id, exact=sku_id not in uncertain_skus)
        for rid in rids:
            self._check_reservation(truth.reservation(rid), rid, exact=rid not in uncertain_rids)

    def sweep(self, truth: Truth) -> None:
        """Every invariant, for every entity, including the store's own sums
        (held == RESERVED quantities, sold == CONFIRMED quantities)."""
        held: dict[str, int] = {}
        sold: dict[str, int] = {}
        rids = set(self.holds)
        for r in truth.all_reservations():
            rids.add(r.reservation_id)
            if r.state is State.RESERVED:
                held[r.sku_id] = held.get(r.sku_id, 0) + r.quantity
            elif r.state is State.CONFIRMED:
                sold[r.sku_id] = sold.get(r.sku_id, 0) + r.quantity
        skus = set(self.skus)
        for s in truth.all_stock():
            skus.add(s.sku_id)
            require((s.held, s.sold) == (held.get(s.sku_id, 0), sold.get(s.sku_id, 0)), f"stock of {s.sku_id} disagrees with its reservations: {s}")
        require(set(held) | set(sold) <= skus, "reservations hold stock of a SKU that has none")
        self.check(truth, sorted(skus), sorted(rids))

    def _check_stock(self, stock: Stock | None, sku_id: str, exact: bool) -> None:
        if stock is not None:
            require(stock.available + stock.held + stock.sold == stock.total, lambda: f"stock of {sku_id} does not add up: {stock}")
            require(min(stock.available, stock.held, stock.sold) >= 0, lambda: f"negative stock (oversold) for {sku_id}: {stock}")
            last = self.stock_versions.get(sku_id, 0)
            require(stock.version >= last, lambda: f"stock version of {sku_id} went back from {last} to {stock.version}")
            self.stock_versions[sku_id] = stock.version
        if not exact:
            return
        model = self.skus.get(sku_id)
        if model is None or model.total_version == 0:
            require(stock is None, lambda: f"the store has stock of {sku_id} that no answer created: {stock}")
            require(model is None or model.held == model.sold == 0, lambda: f"answers hold {sku_id} that was never stocked")
            return
        require(stock is not None, lambda: f"stock of {sku_id} vanished")
        expected = (model.total, model.total - model.held - model.sold, model.held, model.sold)
        require((stock.total, stock.available, stock.held, stock.sold) == expected, lambda: f"stock of {sku_id} is {stock}, answers say {expected}")

    def _check_reservation(self, found: Reservation | None, rid: str, exact: bool) -> None:
        if found is not None:
            require(found.state not in INTENTS, lambda: f"{rid} rests in intent {found.state.name}")
            last = self.store_versions.get(rid, 0)
            require(found.version >= last, lambda: f"{rid}: the store's version went back from {last} to {found.version}")
            self.store_versions[rid] = found.version
        if not exact:
            return
        held = self.holds.get(rid)
        if held is None:
            require(found is None, lambda: f"the store has reservation {rid} that no answer created")
            return
        require(found is not None, lambda: f"reservation {rid} vanished")
        actual = (found.sku_id, found.quantity, found.state, found.version)
        require(actual == (held.sku_id, held.quantity, held.state, held.version), lambda: f"{rid} is {actual}, answers say {held}")


def _count(sku: _Sku, state: State, quantity: int) -> None:
    if state is State.RESERVED:
        sku.held += quantity
    elif state is State.CONFIRMED:
        sku.sold += quantity


def _check_reply(reply: pb.StockReply) -> None:
    require(reply.available + reply.held + reply.sold == reply.total, f"a StockReply that does not add up: {reply}")
