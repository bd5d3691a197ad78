"""`holdfast.fulfillment.v1.DispatchService`: waybill dispatch, the second
service of the design's users, built only on the framework's public API
(holdfast.framework).

A waybill is created for a CONFIRMED reservation, handed to its carrier by
dispatchers, and acknowledged when the carrier has the parcel. Dispatch is
the move that once took an outage: its contract allows 3 attempts, 1,200 ms
apart, each under an 800 ms lease on the waybill. All three numbers are read
from the proto, never restated here.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import replace
from typing import Any, Mapping, Protocol

import grpc
from google.protobuf.message import Message

from holdfast.fulfillment.v1 import fulfillment_pb2 as pb

from holdfast.apps.carrier import Answer, Carrier, Parcel, SimulatedCarrier
from holdfast import (
    AppReason,
    Call,
    Change,
    Engine,
    Entity,
    Machine,
    Outcome,
    Reason,
    Service,
    Txn,
    current_call,
    decode_data,
    derive_id,
    encode_data,
    failure,
    idempotency_key,
    lease_held,
    shown_id,
)

SERVICE = pb.DESCRIPTOR.services_by_name["DispatchService"]
ID_LENGTH_MAX = 128


class DispatchReason(AppReason, domain="holdfast"):
    """Dispatch's refusals, holdfast's own so in the domain `holdfast`; their
    names, statuses and bytes are those they had as members of `Reason`, and
    a recorded one is stored by its bare name, as before."""

    WAYBILL_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, False)
    # A carrier refused the attempt (or did not answer within the lease);
    # the next attempt, with the next number, may succeed.
    CARRIER_REFUSED = (grpc.StatusCode.ABORTED, True)
    # An acknowledgement that came before its dispatch had committed (a
    # carrier's callback racing the settlement): not recorded, so the same
    # call succeeds once the waybill is DISPATCHED.
    WAYBILL_NOT_DISPATCHED = (grpc.StatusCode.FAILED_PRECONDITION, False)


class Waybill(enum.IntEnum):
    """Values equal the wire's `WaybillState` numbers. NEW is a waybill not
    yet created; it is never in a reply."""

    NEW = 1
    CREATED = 2
    DISPATCHING = 3
    DISPATCHED = 4
    ACKNOWLEDGED = 5
    FAILED = 6


WAYBILL: Machine[Waybill] = Machine(
    "fulfillment",
    Waybill,
    (
        (Waybill.NEW, "CREATE", Waybill.CREATED),
        (Waybill.CREATED, "DISPATCH_START", Waybill.DISPATCHING),
        (Waybill.DISPATCHING, "CARRIER_ACCEPTED", Waybill.DISPATCHED),
        (Waybill.DISPATCHING, "CARRIER_REFUSED", Waybill.CREATED),
        (Waybill.DISPATCHING, "ATTEMPTS_EXHAUSTED", Waybill.FAILED),
        (Waybill.DISPATCHING, "LEASE_EXPIRED", Waybill.CREATED),
        (Waybill.DISPATCHED, "CARRIER_ACKNOWLEDGED", Waybill.ACKNOWLEDGED),
        (Waybill.CREATED, "GIVE_UP", Waybill.FAILED),
    ),
    initial=Waybill.NEW,
    terminal=(Waybill.ACKNOWLEDGED, Waybill.FAILED),
)


class Reservations(Protocol):
    """What dispatch needs of inventory (holdfast.apps.inventory.Inventory): None
    when the reservation is CONFIRMED, which is terminal, so the answer
    cannot go stale before the waybill is created; otherwise the refusal."""

    async def confirmation(self, reservation_id: str, deadline: float | None = None) -> Outcome | None: ...


class Dispatch(Service):
    """The servicer of DispatchService."""

    DESCRIPTOR = SERVICE
    MACHINE = WAYBILL
    ID_PREFIX = "wb"
    workload = "holdfast.apps.fulfillment_workload:DispatchWorkload"
    # A dispatcher that claims and vanishes: when its lease runs out, the
    # reaper ends the attempt (and the waybill, after the last attempt), as
    # the carrier answered it: the dispatcher may have vanished after the
    # carrier took the parcel (`timeout`).
    TIMEOUTS = {Waybill.DISPATCHING: "LEASE_EXPIRED"}

    def __init__(self, engine: Engine, reservations: Reservations, carrier: Carrier) -> None:
        super().__init__(engine)
        self.reservations = reservations
        self.carrier = carrier
        dispatch = self.contract("Dispatch")
        self.max_attempts = dispatch.retry.max_attempts
        self.delay_ms = dispatch.retry.fixed_delay_ms
        # The carrier gets the lease less a quarter, which is kept for the
        # settlement: settled at the lease's very end, the attempt would race
        # the reaper's LEASE_EXPIRED timeout for the same waybill.
        self.carrier_ms = dispatch.lock_ttl_ms - dispatch.lock_ttl_ms // 4
        self._running: set[bytes] = set()  # keys of the attempts running on this instance
        self._timing: set[tuple[str, int]] = set()  # (waybill, version) of the timeouts running here
        # What the carrier answered the attempt each of them ends, once asked: for `on_timeout`.
        self._recalled: dict[tuple[str, int], Answer | None] = {}
        assert self.max_attempts >= 1 and dispatch.lock_ttl_ms > 0, "Dispatch's contract declares attempts and a lease"

    @classmethod
    def from_settings(cls, engine: Engine, settings: Mapping[str, Any]) -> Dispatch:
        """Reads reservations through inventory's moves (on the same store,
        whether or not inventory is hosted here) and hands waybills to the
        simulated carrier: `carrier_failure_rate`, `carrier_latency_ms`
        (`holdfast serve --carrier-failure-rate`, `--carrier-latency-ms`)."""
        from holdfast.apps.inventory import Inventory

        carrier = SimulatedCarrier(
            float(settings.get("carrier_failure_rate", 0.0)), int(settings.get("carrier_latency_ms", 0))
        )
        return cls(engine, Inventory.from_settings(engine, settings), carrier)

    # -- RPCs ------------------------------------------------------------------

    async def CreateWaybill(self, request: pb.CreateWaybillRequest, context) -> Outcome:
        violations = _text_violations(request, ("reservation_id", "carrier"), ("address",))
        if violations:
            return _invalid(violations)
        call = current_call()
        refusal = await self.reservations.confirmation(request.reservation_id, call.deadline)
        if refusal is not None:
            return refusal
        wid = derive_id(self.ID_PREFIX, call.key)
        fields = {"reservation_id": request.reservation_id, "carrier": request.carrier, "address": request.address,
                  "attempts": [], "tracking_id": "", "failure_reason": ""}

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            return Change(("CREATE",), encode_data(fields), reply=_reply)

        return await self.move(wid, decide)

    async def Dispatch(self, request: pb.DispatchRequest, context) -> Outcome:
        violations = _text_violations(request, ("waybill_id", "dispatcher_id"), ())
        if violations:
            return _invalid(violations)
        if request.attempt > self.max_attempts:
            return failure(
                Reason.CONTRACT_VIOLATION,
                f"Dispatch allows {self.max_attempts} attempts per waybill (its contract's retry.max_attempts);"
                f" attempt {request.attempt} is refused",
                [("attempt", f"attempt must be within 1..{self.max_attempts}")],
                metadata={"max_attempts": str(self.max_attempts)},
            )
        call = current_call()
        # An attempt is three steps (claim, carrier, settle): a second call
        # with its key while it runs here would ask the carrier twice.
        if call.key in self._running:
            return failure(Reason.REQUEST_IN_FLIGHT, "this attempt is running now; retry shortly")
        self._running.add(call.key)
        try:
            return await self._attempt(call, request)
        finally:
            self._running.discard(call.key)

    async def Acknowledge(self, request: pb.AcknowledgeRequest, context) -> Outcome:
        violations = _text_violations(request, ("waybill_id",), ())
        if violations:
            return _invalid(violations)

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            if entity is None:
                return _not_found(request.waybill_id)
            if entity.state in (Waybill.CREATED, Waybill.DISPATCHING):
                # Not yet, rather than never: the key is the waybill's alone,
                # so a recorded refusal would refuse the real acknowledgement.
                return failure(DispatchReason.WAYBILL_NOT_DISPATCHED,
                               f"waybill {request.waybill_id} is {Waybill(entity.state).name}, not yet DISPATCHED",
                               metadata={"waybill_id": request.waybill_id, "state": Waybill(entity.state).name})
            return Change(("CARRIER_ACKNOWLEDGED",), entity.data, reply=_reply)

        return await self.move(request.waybill_id, decide)

    async def Fail(self, request: pb.FailRequest, context) -> Outcome:
        violations = _text_violations(request, ("waybill_id",), ("reason",))
        if violations:
            return _invalid(violations)
        why = request.reason or "given up"

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            if entity is None:
                return _not_found(request.waybill_id)
            fields = decode_data(entity.data)
            fields["failure_reason"] = why
            return Change(("GIVE_UP",), encode_data(fields), reply=_reply)

        return await self.move(request.waybill_id, decide)

    async def GetWaybill(self, request: pb.GetWaybillRequest, context) -> Outcome:
        if not request.waybill_id:
            return _invalid([("waybill_id", "waybill_id must be set")])
        return await self.read(request.waybill_id, _reply, _not_found(request.waybill_id))

    # -- timeout events ------------------------------------------------------------

    def render(self, entity: Entity) -> pb.WaybillReply:
        return _reply(entity)

    async def timeout(self, entity_id: str, version: int) -> Outcome:
        """The framework's timeout move, made once the carrier has said what
        it answered the attempt whose lease ran out: its dispatcher may have
        had the carrier's acceptance and then failed to record it (the store
        unavailable, the process gone). Recorded expired, that attempt would
        send the next one to hand the parcel over again. The carrier is asked
        what it answered, never asked again (holdfast.apps.carrier)."""
        key = (entity_id, version)
        if key in self._timing:
            # The answer waits here for the move's `on_timeout`; a second run
            # of the same move would take it away from the first.
            return failure(Reason.REQUEST_IN_FLIGHT, "this timeout is being made now; retry shortly")
        self._timing.add(key)
        try:
            parcel = await self._expired_attempt(entity_id, version)
            if isinstance(parcel, Outcome):
                return parcel
            if parcel is not None:
                recalled = await self._recall(parcel)
                if isinstance(recalled, Outcome):
                    return recalled
                self._recalled[key] = recalled
            return await super().timeout(entity_id, version)
        finally:
            self._timing.discard(key)
            self._recalled.pop(key, None)

    def on_timeout(self, entity: Entity, event: str, now_ms: int) -> Change | Outcome:
        """The lease of a running attempt ran out with nobody settling it: the
        attempt ends as the carrier answered it (asked by `timeout`). Accepted,
        it is settled as its dispatcher would have; otherwise it expired."""
        assert event == "LEASE_EXPIRED"
        key = (entity.entity_id, entity.version)
        if key not in self._recalled:  # the lease had not run out when `timeout` read the waybill
            return failure(Reason.VERSION_CONFLICT, f"{entity.entity_id} was not due when its carrier could be asked")
        fields = decode_data(entity.data)
        answer = self._recalled[key]
        if answer is not None and answer.accepted:
            # It ended when the carrier answered, within the lease: by its end,
            # whoever settles it and whenever, so the record is the same.
            dispatcher = fields["attempts"][-1]["dispatcher_id"]
            return _accept(fields, answer, entity.lease_until_ms, f"accepted; settled after the lease of {dispatcher} ran out")
        _expire_attempt(fields["attempts"], entity)
        if len(fields["attempts"]) >= self.max_attempts:
            fields["failure_reason"] = f"{self.max_attempts} attempts, the last one's lease ran out"
            return Change(("ATTEMPTS_EXHAUSTED",), encode_data(fields), reply=_reply)
        return Change(("LEASE_EXPIRED",), encode_data(fields), reply=_reply)

    # -- the steps of one Dispatch attempt ----------------------------------------

    async def _attempt(self, call: Call, request: pb.DispatchRequest) -> Outcome:
        answered = await self.recorded(call)
        if answered is not None:
            return answered
        claimed = await self._claim(call, request)
        if not claimed.ok:
            return claimed
        claim = pb.WaybillReply.FromString(claimed.payload)
        parcel = Parcel(claim.waybill_id, request.attempt, claim.carrier, claim.address)
        left_ms = claim.attempts[-1].started_at_ms + self.carrier_ms - self.engine.clock.now_ms()
        if left_ms > 0:
            answer = await self._ask_carrier(parcel, left_ms)
        else:
            # The carrier's share of the lease is spent: this is a retry whose
            # settlement failed, or the claim stalled. The carrier may have
            # answered the first try, and asking it now could hand the parcel
            # over after the lease, so it is only asked what it answered.
            recalled = await self._recall(parcel)
            if isinstance(recalled, Outcome):
                return recalled
            answer = recalled or _unanswered(parcel)
        return await self._settle(call, request, answer)

    async def _claim(self, call: Call, request: pb.DispatchRequest) -> Outcome:
        """Takes the lease and records the attempt as RUNNING, under a key of
        its own: a retry after a crash finds the claim made and goes on. An
        attempt before it that outlived its lease unsettled is ended first,
        by its timeout, which asks the carrier how it ended."""
        attempt, dispatcher = request.attempt, request.dispatcher_id
        max_attempts, delay_ms, lease_ms = self.max_attempts, self.delay_ms, call.contract.lock_ttl_ms
        unsettled: list[int] = []  # the version at which the attempt before this one outlived its lease

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            unsettled.clear()
            if entity is None:
                return _not_found(request.waybill_id)
            fields = decode_data(entity.data)
            attempts = fields["attempts"]
            outlived = entity.state == Waybill.DISPATCHING and not lease_held(entity, now_ms)
            if attempt != len(attempts) + 1:
                return _invalid([("attempt", f"the next attempt of {request.waybill_id} is {len(attempts) + 1}")])
            # An attempt that outlived its lease was over when the lease ran out, however its timeout records it.
            ended_ms = entity.lease_until_ms if outlived else attempts[-1]["ended_at_ms"] if attempts else 0
            if attempts and now_ms < ended_ms + delay_ms:
                wait_ms = ended_ms + delay_ms - now_ms
                return failure(Reason.RETRY_TOO_SOON,
                               f"attempt {attempt} may start {delay_ms} ms after attempt {attempt - 1} ended;"
                               f" retry in {wait_ms} ms", metadata={"retry_after_ms": str(wait_ms)})
            if outlived:
                # Its holder never settled it, and only the carrier knows how
                # it ended: the timeout asks, and ends it, before this claim.
                unsettled.append(entity.version)
                return failure(Reason.LEASE_HELD,
                               f"attempt {attempt - 1} on {request.waybill_id} outlived its lease unsettled; retry shortly",
                               metadata={"lease_owner": entity.lease_owner, "lease_until_ms": str(entity.lease_until_ms)})
            assert attempt <= max_attempts
            attempts.append({"attempt": attempt, "dispatcher_id": dispatcher, "started_at_ms": now_ms,
                             "ended_at_ms": 0, "result": RESULT[pb.ATTEMPT_RESULT_RUNNING], "detail": ""})
            return Change(("DISPATCH_START",), encode_data(fields), reply=_reply, lease_owner=dispatcher,
                          due_at_ms=now_ms + lease_ms)

        step = _step(call, "claim")
        claimed = await self.move(request.waybill_id, decide, owner=dispatcher, call=step)
        if not unsettled:
            return claimed
        ended = await self.timeout(request.waybill_id, unsettled[0])
        if ended.reason in (Reason.DEPENDENCY_UNAVAILABLE, Reason.BUDGET_EXCEEDED):
            return ended  # it may have ended the attempt: this call is retried to learn
        claimed = await self.move(request.waybill_id, decide, owner=dispatcher, call=step)
        # Still unsettled: the timeout did not fire (nothing changed), and says why.
        return ended if unsettled and not ended.ok else claimed

    async def _ask_carrier(self, parcel: Parcel, within_ms: int) -> Answer:
        try:
            return await asyncio.wait_for(self.carrier.dispatch(parcel), within_ms / 1000)
        except asyncio.TimeoutError:
            return _unanswered(parcel)

    async def _recall(self, parcel: Parcel) -> Answer | None | Outcome:
        """What the carrier answered `parcel`'s attempt (None: it never
        decided it), or why it could not say: then nobody may end the
        attempt, and the caller retries."""
        try:
            return await asyncio.wait_for(self.carrier.answered(parcel), self.carrier_ms / 1000)
        except asyncio.TimeoutError:
            return failure(Reason.DEPENDENCY_UNAVAILABLE,
                           f"{parcel.carrier} did not say what it answered attempt {parcel.attempt} of"
                           f" {parcel.waybill_id}; retry shortly")

    async def _expired_attempt(self, entity_id: str, version: int) -> Parcel | None | Outcome:
        """The parcel of the attempt running on the waybill at `version` if
        its lease has run out, so that the carrier cannot be asked for it any
        more; None when there is none (the timeout then does not fire)."""

        def read(txn: Txn, now_ms: int) -> Entity | None:
            found = txn.entity(entity_id)
            expired = (found is not None and found.kind == WAYBILL.name and found.version == version
                       and found.state == Waybill.DISPATCHING and not lease_held(found, now_ms))
            return found if expired else None

        found = await self.engine.read(read)
        if found is None or isinstance(found, Outcome):
            return found
        fields = decode_data(found.data)
        return Parcel(entity_id, fields["attempts"][-1]["attempt"], fields["carrier"], fields["address"])

    async def _settle(self, call: Call, request: pb.DispatchRequest, answer: Answer) -> Outcome:
        """Records the carrier's answer and answers the call, if the lease is
        still this attempt's."""
        attempt, dispatcher, max_attempts = request.attempt, request.dispatcher_id, self.max_attempts

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            assert entity is not None, "a claimed waybill exists"
            fields = decode_data(entity.data)
            attempts = fields["attempts"]
            mine = (entity.state == Waybill.DISPATCHING and entity.lease_owner == dispatcher
                    and len(attempts) == attempt)
            if not mine:
                ended = attempts[attempt - 1]["result"] if len(attempts) >= attempt else ""
                if ended == RESULT[pb.ATTEMPT_RESULT_ACCEPTED]:  # by its timeout, which asked the carrier
                    why = "ran out of lease; the carrier's acceptance of it is recorded already"
                else:
                    why = "lost its lease to another attempt; the carrier's answer is dropped"
                return failure(Reason.LEASE_LOST, f"attempt {attempt} on {request.waybill_id} {why}",
                               metadata={"attempt": str(attempt)})
            if answer.accepted:
                return _accept(fields, answer, now_ms, answer.detail)
            attempts[-1].update(result=RESULT[pb.ATTEMPT_RESULT_REFUSED], ended_at_ms=now_ms, detail=answer.detail)
            last = attempt >= max_attempts
            if last:
                fields["failure_reason"] = f"{max_attempts} attempts refused"
            refusal = failure(
                DispatchReason.CARRIER_REFUSED,
                f"attempt {attempt} of {max_attempts} refused: {answer.detail}",
                metadata={"attempt": str(attempt), "attempts_left": str(max_attempts - attempt)},
            )
            event = "ATTEMPTS_EXHAUSTED" if last else "CARRIER_REFUSED"
            return Change((event,), encode_data(fields), refusal=refusal)

        return await self.move(request.waybill_id, decide, owner=dispatcher, call=call)


# -- replies and refusals ---------------------------------------------------------------


RESULT = {value: pb.AttemptResult.Name(value) for value in pb.AttemptResult.values()}


def _reply(entity: Entity) -> pb.WaybillReply:
    fields = decode_data(entity.data)
    attempts = [
        pb.DispatchAttempt(attempt=a["attempt"], dispatcher_id=a["dispatcher_id"], started_at_ms=a["started_at_ms"],
                           ended_at_ms=a["ended_at_ms"], result=pb.AttemptResult.Value(a["result"]), detail=a["detail"])
        for a in fields["attempts"]
    ]
    return pb.WaybillReply(
        waybill_id=entity.entity_id, reservation_id=fields["reservation_id"], carrier=fields["carrier"],
        address=fields["address"], state=entity.state, version=entity.version, attempts=attempts,
        tracking_id=fields["tracking_id"], failure_reason=fields["failure_reason"],
    )


def _accept(fields: dict, answer: Answer, ended_at_ms: int, detail: str) -> Change:
    """The running attempt ends accepted: the carrier has the parcel."""
    fields["attempts"][-1].update(result=RESULT[pb.ATTEMPT_RESULT_ACCEPTED], ended_at_ms=ended_at_ms, detail=detail)
    fields["tracking_id"] = answer.tracking_id
    return Change(("CARRIER_ACCEPTED",), encode_data(fields), reply=_reply)


def _unanswered(parcel: Parcel) -> Answer:
    """A carrier that did not answer within the lease: the attempt is refused."""
    return Answer(False, detail=f"{parcel.carrier} did not answer within the lease")


def _expire_attempt(attempts: list[dict], entity: Entity) -> None:
    """Ends the running attempt at the moment its lease ran out."""
    assert attempts and attempts[-1]["result"] == RESULT[pb.ATTEMPT_RESULT_RUNNING]
    attempts[-1].update(result=RESULT[pb.ATTEMPT_RESULT_LEASE_EXPIRED], ended_at_ms=entity.lease_until_ms,
                        detail=f"lease of {attempts[-1]['dispatcher_id']} ran out")


def _step(call: Call, step: str) -> Call:
    """The call as seen by one of its inner steps: the same budget, a key of its own."""
    key = idempotency_key(f"{call.contract.method}#{step}", (call.key.hex(),))
    return replace(call, key=key)


def _not_found(waybill_id: str) -> Outcome:
    shown = shown_id(waybill_id)
    return failure(DispatchReason.WAYBILL_NOT_FOUND, f"no waybill {shown!r}", metadata={"waybill_id": shown})


def _invalid(violations: list[tuple[str, str]]) -> Outcome:
    return failure(Reason.INVALID_REQUEST, "; ".join(why for _, why in violations), violations)


def _text_violations(request: Message, required: tuple[str, ...], optional: tuple[str, ...]) -> list[tuple[str, str]]:
    """Ids set, short and printable; free text short and printable."""
    violations = []
    for name in (*required, *optional):
        value = getattr(request, name)
        if name in required and not value:
            violations.append((name, f"{name} must be set"))
        elif len(value) > ID_LENGTH_MAX * (4 if name in optional else 1):
            violations.append((name, f"{name} is too long"))
        elif any(ord(c) < 0x20 or c == "\x7f" for c in value):
            violations.append((name, f"{name} must not contain control characters"))
    return violations
