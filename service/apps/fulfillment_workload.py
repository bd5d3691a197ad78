"""Dispatch's workload for `holdfast simulate` (holdfast.workload): a client
that creates waybills for confirmed reservations and has three dispatchers
race to hand them to a simulated carrier that refuses a share of attempts,
acknowledges and gives up on some, and reads; and `WaybillAuditor`, which
holds every answer and every stored waybill to what dispatch promises.

The books must satisfy, for every waybill, at every step:

* attempts bounded by the contract: at most Dispatch's `retry.max_attempts`
  (read from the proto), numbered 1, 2, ...; only the last may be running,
  and it is exactly while the waybill is DISPATCHING;
* lease exclusivity: a DISPATCHING waybill is leased to the dispatcher of
  its running attempt, for the contract's `lock_ttl_ms` from the attempt's
  start, with its timeout due when the lease ends (and no lease, no timeout
  otherwise); an attempt starts only after the one before it ended, and the
  contract's `fixed_delay_ms` later; an attempt whose lease ran out ended
  exactly when it did;
* one parcel per waybill: at most one accepted attempt, the last, exactly
  when the waybill is DISPATCHED or ACKNOWLEDGED, with the carrier's
  tracking id; the carrier is only ever asked for an attempt the waybill
  records;
* and what holds for any framework entity (holdfast.auditor.EntityAuditor).

Inventory is not simulated here (its own workload does that): the
reservations dispatch asks about are a stand-in that reads through the same
store, so the question fails when the store does. Like dispatch itself,
this uses only what a team's workload can: `holdfast` and `holdfast.workload`.
"""

from __future__ import annotations

from typing import Sequence

from holdfast.fulfillment.v1 import fulfillment_pb2 as pb

from holdfast import AppReason, Engine, Entity, Outcome, Reason, Service, decode_data, derive_id, failure
from holdfast.apps.carrier import Answer, Parcel, SimulatedCarrier
from holdfast.apps.fulfillment import WAYBILL, Dispatch, DispatchReason, Waybill
from holdfast.apps.inventory import InventoryReason
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

CONTRACTS = contracts_of(Dispatch)
MAX_ATTEMPTS = CONTRACTS["Dispatch"].retry.max_attempts
DELAY_MS = CONTRACTS["Dispatch"].retry.fixed_delay_ms
LEASE_MS = CONTRACTS["Dispatch"].lock_ttl_ms
CONFIRMED = "rsv_confirmed_"  # the stand-in's confirmed reservations: this, then a number
HELD = "rsv_held_"  # and reservations that are only held
DISPATCHERS = ("d-0", "d-1", "d-2")
CARRIERS = ("acme", "parcelco")
RUNNING, ACCEPTED, LEASE_EXPIRED = (pb.AttemptResult.Name(r) for r in
                                    (pb.ATTEMPT_RESULT_RUNNING, pb.ATTEMPT_RESULT_ACCEPTED, pb.ATTEMPT_RESULT_LEASE_EXPIRED))


class Reservations:
    """Inventory as dispatch sees it (holdfast.apps.fulfillment.Reservations),
    asked through the engine, so a store that fails fails the question."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def confirmation(self, reservation_id: str, deadline: float | None = None) -> Outcome | None:
        def read(txn: object, now_ms: int) -> Outcome | None:
            if reservation_id.startswith(CONFIRMED):
                return None
            if reservation_id.startswith(HELD):
                return failure(InventoryReason.RESERVATION_NOT_CONFIRMED, f"reservation {reservation_id} is RESERVED, not CONFIRMED")
            return failure(InventoryReason.RESERVATION_NOT_FOUND, f"no reservation {reservation_id!r}")

        return await self.engine.read(read, deadline)


class Carrier(SimulatedCarrier):
    """The simulated carrier, keeping every answer it gave: what the auditor
    checks "one parcel per waybill" against. It outlives the process, as a
    carrier does."""

    def __init__(self, seed: int) -> None:
        super().__init__(failure_rate=0.3, seed=seed)
        self.answers: list[tuple[Parcel, Answer]] = []

    async def dispatch(self, parcel: Parcel) -> Answer:
        answer = await super().dispatch(parcel)
        self.answers.append((parcel, answer))
        return answer


# -- the auditors ----------------------------------------------------------------------------


class WaybillAuditor(EntityAuditor[pb.WaybillReply]):
    """Waybills as the answers say they are, and what dispatch promises of them."""

    READS = frozenset({"GetWaybill"})

    def __init__(self, carrier: Carrier) -> None:
        settles = {
            "CreateWaybill": {Waybill.CREATED},
            "Dispatch": {Waybill.DISPATCHED},
            "Acknowledge": {Waybill.ACKNOWLEDGED},
            "Fail": {Waybill.FAILED},
            # A lease that ran out ends its attempt as the carrier answered it: expired, or accepted.
            timeout_method(Dispatch): {Waybill.CREATED, Waybill.FAILED, Waybill.DISPATCHED},
        }
        super().__init__(WAYBILL, pb.WaybillReply, "waybill_id", settles, DispatchReason.WAYBILL_NOT_FOUND)
        self.carrier = carrier
        self.tried: dict[str, int] = {}  # waybill -> the highest attempt an answer showed
        self.created: dict[str, str] = {}  # waybill -> its reservation, from CreateWaybill's answers

    # -- answers ---------------------------------------------------------------------

    def predict(self, request: Request) -> set[Reason | AppReason | None] | None:
        message = request.message
        if request.method == "Dispatch" and message.attempt > MAX_ATTEMPTS:
            return {Reason.CONTRACT_VIOLATION}
        if request.method == "CreateWaybill":
            if message.reservation_id.startswith(CONFIRMED):
                return {None}
            return {InventoryReason.RESERVATION_NOT_CONFIRMED if message.reservation_id.startswith(HELD) else InventoryReason.RESERVATION_NOT_FOUND}
        if request.method not in ("Dispatch", "Acknowledge", "Fail"):
            return None  # a timeout: its own checks are in `answer`
        known = self.known.get(request.touches[0])
        if known is None:
            return {DispatchReason.WAYBILL_NOT_FOUND}
        if not known.exact or request.method not in ("Acknowledge", "Fail"):
            return None
        # Each answer below may also be VERSION_CONFLICT: a snapshot behind the
        # store (a commit that failed after applying) makes any move compensate first.
        state = Waybill(known.state)
        if state is Waybill.DISPATCHING:  # leased, unless the lease ran out and nobody has taken over yet
            then = DispatchReason.WAYBILL_NOT_DISPATCHED if request.method == "Acknowledge" else Reason.INVALID_TRANSITION
            return {Reason.VERSION_CONFLICT, Reason.LEASE_HELD, then}
        if request.method == "Acknowledge":
            answers = {Waybill.DISPATCHED: None, Waybill.CREATED: DispatchReason.WAYBILL_NOT_DISPATCHED}
            return {Reason.VERSION_CONFLICT, answers.get(state, Reason.INVALID_TRANSITION)}
        return {Reason.VERSION_CONFLICT, None if state is Waybill.CREATED else Reason.INVALID_TRANSITION}

    def apply(self, request: Request, outcome: Outcome) -> None:
        super().apply(request, outcome)
        if request.method == "Dispatch" and outcome.reason in (DispatchReason.CARRIER_REFUSED, Reason.LEASE_LOST):
            self._tried(request.touches[0], request.message.attempt)

    def refused(self, request: Request, outcome: Outcome) -> None:
        """A Dispatch is three moves (claim, carrier, settlement): whatever it
        answered, its claim may have committed."""
        super().refused(request, outcome)
        if request.method == "Dispatch":
            self.changed_unseen(request.touches)

    def answer(self, request: Request, reply: pb.WaybillReply, replayed: bool) -> None:
        waybill_id = reply.waybill_id
        if request.method == "CreateWaybill":
            require(waybill_id == derive_id(Dispatch.ID_PREFIX, request.key), lambda: f"CreateWaybill named {waybill_id}, not the id its key derives")
            require((reply.reservation_id, reply.carrier) == (request.message.reservation_id, request.message.carrier),
                    lambda: f"CreateWaybill of {request.message.reservation_id} answered {reply}")
            self.created[waybill_id] = reply.reservation_id
        elif request.method == "Dispatch":
            last = reply.attempts[-1] if reply.attempts else None
            require(last is not None and (last.attempt, last.dispatcher_id, last.result) == (
                request.message.attempt, request.message.dispatcher_id, pb.ATTEMPT_RESULT_ACCEPTED,
            ), lambda: f"Dispatch attempt {request.message.attempt} of {waybill_id} answered OK with attempts {list(reply.attempts)}")
        elif request.method == "Fail":
            require(reply.failure_reason == (request.message.reason or "given up"), lambda: f"Fail of {waybill_id} recorded {reply.failure_reason!r}")
        self._tried(waybill_id, len(reply.attempts))
        attempts = [{"attempt": a.attempt, "dispatcher_id": a.dispatcher_id, "started_at_ms": a.started_at_ms,
                     "ended_at_ms": a.ended_at_ms, "result": pb.AttemptResult.Name(a.result)} for a in reply.attempts]
        _check_waybill(waybill_id, Waybill(reply.state), attempts, reply.tracking_id, reply.failure_reason)

    def _tried(self, waybill_id: str, attempt: int) -> None:
        self.tried[waybill_id] = max(self.tried.get(waybill_id, 0), attempt)

    # -- the store ----------------------------------------------------------------------

    def row(self, entity: Entity) -> None:
        fields = decode_data(entity.data)
        attempts, state = fields["attempts"], Waybill(entity.state)
        _check_waybill(entity.entity_id, state, attempts, fields["tracking_id"], fields["failure_reason"])
        if state is Waybill.DISPATCHING:
            last = attempts[-1]
            ends_ms = last["started_at_ms"] + LEASE_MS
            require((entity.lease_owner, entity.lease_until_ms, entity.due_at_ms) == (last["dispatcher_id"], ends_ms, ends_ms),
                    lambda: f"{entity.entity_id} is DISPATCHING with lease {entity.lease_owner!r} until {entity.lease_until_ms},"
                            f" due {entity.due_at_ms}; attempt {last['attempt']} by {last['dispatcher_id']!r} holds it until {ends_ms}")
        else:
            require((entity.lease_owner, entity.lease_until_ms, entity.due_at_ms) == ("", 0, 0),
                    lambda: f"{entity.entity_id} is {state.name} yet leased to {entity.lease_owner!r} until {entity.lease_until_ms}, due {entity.due_at_ms}")

    def rows(self, entities: list[Entity]) -> None:
        """The carrier was asked only for attempts the waybills record."""
        attempts = {e.entity_id: len(decode_data(e.data)["attempts"]) for e in entities}
        for parcel, _ in self.carrier.answers:
            require(parcel.attempt <= attempts.get(parcel.waybill_id, 0),
                    lambda: f"the carrier was asked for attempt {parcel.attempt} of {parcel.waybill_id}, which the waybill does not record")


def _check_waybill(waybill_id: str, state: Waybill, attempts: list[dict], tracking_id: str, failure_reason: str) -> None:
    """What dispatch promises of one waybill, as stored or as answered."""
    numbers = [a["attempt"] for a in attempts]
    require(len(attempts) <= MAX_ATTEMPTS, lambda: f"{waybill_id} has {len(attempts)} attempts; the contract allows {MAX_ATTEMPTS}")
    require(numbers == list(range(1, len(attempts) + 1)), lambda: f"{waybill_id}'s attempts are numbered {numbers}")
    running = [a["attempt"] for a in attempts if a["result"] == RUNNING]
    require(running == ([len(attempts)] if state is Waybill.DISPATCHING else []),
            lambda: f"{waybill_id} is {state.name} with attempts {running} running")
    for before, after in zip(attempts, attempts[1:]):
        require(after["started_at_ms"] >= before["ended_at_ms"] + DELAY_MS,
                lambda: f"{waybill_id}: attempt {after['attempt']} started at {after['started_at_ms']}, attempt"
                        f" {before['attempt']} ended at {before['ended_at_ms']} (the contract's delay is {DELAY_MS} ms)")
    for a in attempts:
        if a["result"] != RUNNING:
            require(a["ended_at_ms"] >= a["started_at_ms"], lambda: f"{waybill_id}: attempt {a['attempt']} ended before it started")
        if a["result"] == LEASE_EXPIRED:
            require(a["ended_at_ms"] == a["started_at_ms"] + LEASE_MS,
                    lambda: f"{waybill_id}: attempt {a['attempt']}'s lease ran out at {a['ended_at_ms']}, not {a['started_at_ms'] + LEASE_MS}")
    accepted = [a["attempt"] for a in attempts if a["result"] == ACCEPTED]
    shipped = state in (Waybill.DISPATCHED, Waybill.ACKNOWLEDGED)
    require(accepted == ([len(attempts)] if shipped else []), lambda: f"{waybill_id} is {state.name} with attempts {accepted} accepted")
    require(bool(tracking_id) == shipped, lambda: f"{waybill_id} is {state.name} with tracking id {tracking_id!r}")
    require((state is Waybill.FAILED) == bool(failure_reason), lambda: f"{waybill_id} is {state.name}, failure reason {failure_reason!r}")


class ParcelAuditor(WaybillAuditor):
    """`WaybillAuditor`, and one parcel per waybill as the carrier saw it:
    an attempt the carrier accepted is, once settled, the attempt the books
    record accepted. Otherwise the books say refused (or lease expired) and
    a later attempt hands the carrier the same parcel again."""

    def rows(self, entities: list[Entity]) -> None:
        super().rows(entities)
        accepted: dict[str, set[int]] = {}
        for parcel, answer in self.carrier.answers:
            if answer.accepted:
                accepted.setdefault(parcel.waybill_id, set()).add(parcel.attempt)
        for entity in entities:
            for a in decode_data(entity.data)["attempts"]:
                if a["attempt"] in accepted.get(entity.entity_id, ()) and a["result"] != RUNNING:
                    require(a["result"] == ACCEPTED,
                            lambda: f"the carrier accepted attempt {a['attempt']} of {entity.entity_id}, which the books record"
                                    f" {a['result']} ({a.get('detail', '')}): the parcel is handed over again by the next attempt")


# -- the workloads ---------------------------------------------------------------------------


class DispatchWorkload(AppWorkload):
    """The client and the auditor of DispatchService. `SERVICE` is the
    servicer class hosted (a test swaps in a broken one), `AUDITOR` the
    auditor of its books."""

    SERVICE: type[Dispatch] = Dispatch
    AUDITOR: type[WaybillAuditor] = WaybillAuditor

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.carrier = Carrier(seed=self.rng.getrandbits(32))
        self.auditor = self.AUDITOR(self.carrier)
        self.waybills: list[str] = []  # every waybill id a CreateWaybill of a confirmed reservation named, in order
        self._named: set[str] = set()
        self._reservations = 0

    def host(self, engine: Engine, seen: Seen) -> Sequence[Service]:
        self.services = (observed(self.SERVICE, seen)(engine, Reservations(engine), self.carrier),)
        return self.services

    # -- the seeded client -------------------------------------------------------------

    def request(self) -> Request:
        rng = self.rng
        roll = rng.random()
        if roll < 0.2 or not self.waybills:
            return self.create(f"{CONFIRMED}{self._next_reservation()}", rng.choice(CARRIERS))
        moving = [w for w in self.waybills[-16:] if self._state(w) not in (Waybill.ACKNOWLEDGED, Waybill.FAILED)]
        if not moving:
            return self.create(f"{CONFIRMED}{self._next_reservation()}", rng.choice(CARRIERS))
        shipped = [w for w in moving if self._state(w) is Waybill.DISPATCHED]
        waiting = [w for w in moving if self._state(w) is not Waybill.DISPATCHED]
        waybill_id = rng.choice(moving)
        if roll < 0.65 and waiting:
            waybill_id = rng.choice(waiting)
            return self.dispatch(waybill_id, self._next_attempt(waybill_id))
        if roll < 0.75:
            waybill_id = rng.choice(shipped) if shipped and rng.random() < 0.8 else waybill_id
            return self.once(("Acknowledge", waybill_id), lambda: self.build("Acknowledge", pb.AcknowledgeRequest(waybill_id=waybill_id)))
        if roll < 0.80:
            reason = rng.choice(("", "address unknown"))
            return self.once(("Fail", waybill_id), lambda: self.build("Fail", pb.FailRequest(waybill_id=waybill_id, reason=reason)))
        return self._odd_request(waybill_id)

    def create(self, reservation_id: str, carrier: str) -> Request:
        message = pb.CreateWaybillRequest(reservation_id=reservation_id, carrier=carrier, address="1 Quay St")
        request = self.build("CreateWaybill", message)
        if request.touches[0] not in self._named and reservation_id.startswith(CONFIRMED):
            self._named.add(request.touches[0])
            self.waybills.append(request.touches[0])
        return request

    def dispatch(self, waybill_id: str, attempt: int) -> Request:
        """One attempt, by whichever dispatcher sends it first."""
        dispatcher = self.rng.choice(DISPATCHERS)
        message = pb.DispatchRequest(waybill_id=waybill_id, dispatcher_id=dispatcher, attempt=attempt)
        return self.once(("Dispatch", waybill_id, attempt), lambda: self.build("Dispatch", message))

    def build(self, method: str, message: object) -> Request:
        call = call_of(CONTRACTS[method], message)
        waybill_id = derive_id(Dispatch.ID_PREFIX, call.key) if method == "CreateWaybill" else message.waybill_id
        return request_of(call, message, (waybill_id,))

    def _next_reservation(self) -> int:
        self._reservations += 1
        return self._reservations

    def _state(self, waybill_id: str) -> Waybill | None:
        """The waybill's state as the answers last showed it (None: not known)."""
        state = self.auditor.state(waybill_id)
        return None if state is None else Waybill(state)

    def _next_attempt(self, waybill_id: str) -> int:
        """The attempt after the last one the answers showed; now and then one
        further, which the waybill refuses until its turn."""
        attempt = self.auditor.tried.get(waybill_id, 0) + 1
        return min(MAX_ATTEMPTS, attempt + (self.rng.random() < 0.1))

    def _odd_request(self, waybill_id: str) -> Request:
        """Reads, unknown ids, attempts past the contract, unconfirmed reservations, a reused key."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.4:
            return self.build("GetWaybill", pb.GetWaybillRequest(waybill_id=rng.choice((waybill_id, "wb_" + "0" * 24))))
        if roll < 0.55:
            return self.dispatch(waybill_id, MAX_ATTEMPTS + 1)
        if roll < 0.65:
            return self.build("Acknowledge", pb.AcknowledgeRequest(waybill_id="wb_" + "0" * 24))
        if roll < 0.8:
            return self.create(rng.choice((f"{HELD}{rng.randrange(5)}", "rsv_unknown")), "acme")
        reservation_id = self.auditor.created.get(waybill_id)
        if reservation_id is not None:
            other = self.build("CreateWaybill", pb.CreateWaybillRequest(reservation_id=reservation_id, carrier="other"))
            if self.auditor.condition(other.key) is Kind.RECORDED:
                return other  # only a recorded key is reused: an unresolved one would stay ambiguous forever
        return self.build("GetWaybill", pb.GetWaybillRequest(waybill_id=waybill_id))


class CarrierWorkload(DispatchWorkload):
    """Dispatch's workload with its books held against the carrier's too
    (`ParcelAuditor`): `holdfast simulate --app holdfast.apps.fulfillment_workload:CarrierWorkload`."""

    AUDITOR = ParcelAuditor

