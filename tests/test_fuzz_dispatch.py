"""Hostile input to DispatchService over real gRPC: every call gets a
defined answer, and a refused call changes nothing.

tests/test_fuzz.py does this for InventoryService; this suite reuses its
wire encoding, hostile values, malformed-body generator, backends and
verdict, and brings what is dispatch's own: the five RPCs, a world of real
waybills, and a judge that reads the `entity` table too. A seeded generator
(HOLDFAST_FUZZ_SEED, as test_fuzz) sends about 2,300 calls per backend, one
at a time, each as raw wire bytes, on the embedded pair and on PostgreSQL +
Redis. The seed fixes every request; which of them land inside Dispatch's
1,200 ms delay depends on the clock, so a rerun may answer a few
differently.

The server starts with real state, so hostile requests naming real ids
reach the engine: confirmed reservations with and without a waybill, a
reservation only held and one released, and waybills CREATED (one with a
refused attempt behind it), DISPATCHED, FAILED and ACKNOWLEDGED. The
simulated carrier answers at once (latency 0) and refuses half the
attempts, decided by (seed, waybill, attempt), so Dispatch's claim, the
carrier and the settlement all run.

For each call, on top of test_fuzz's checks (a defined status, never
INTERNAL or UNKNOWN and no hang; a holdfast ErrorInfo whose reason maps to
that status; undecodable bodies INVALID_REQUEST; a missing key field a
CONTRACT_VIOLATION), the store (stock, reservations, entities and recorded
outcomes, read inside a store transaction) is compared before and after:

* a replay changes nothing at all;
* a refusal that is not recorded changes nothing; a recorded one adds at
  most its own outcome record;
* CARRIER_REFUSED is the one refusal that writes, by design (the attempt is
  over): it changes only its waybill, by one REFUSED attempt, and adds at
  most two outcomes (the claim's and the call's);
* a success changes only the waybill it names (or creates), into the state
  the RPC promises, and never the inventory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from holdfast.fulfillment.v1 import fulfillment_pb2 as fpb
from holdfast.fulfillment.v1 import fulfillment_pb2_grpc as fpb_grpc
from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast.contracts.contract import of_service
from holdfast import decode_data
from holdfast.apps.fulfillment import SERVICE as DISPATCH_SERVICE
from holdfast.apps.fulfillment import WAYBILL, DispatchReason, Waybill
from holdfast.outcome import DOMAIN, AnyReason, Reason, reason_named
from holdfast.server import Running
from holdfast.store import ENTITY_COLUMNS, entity_of_row
from tests.support import failure_of
from tests.test_fulfillment import MAX_ATTEMPTS, carrier, confirmed_reservation, new_waybill  # noqa: F401  (carrier: a fixture)
from tests.test_fuzz import (  # noqa: F401  (backend and config are the fixtures: the same two backends)
    BAD_UTF8,
    FILLERS,
    SEED,
    SIZES,
    TIMEOUT_S,
    UNDECODABLE,
    WIRE_VARINT,
    Fuzzer,
    _changed,
    _short,
    backend,
    config,
    dump,
    field_number,
    hostile_value,
    length_delimited,
    malformed,
    tag,
    varint,
)

SERVICE = f"/{DISPATCH_SERVICE.full_name}"
KIND = WAYBILL.name

# method -> (request class, reply class, its fields as name -> kind). The
# kinds are test_fuzz's ("rid" an id, "text" free text), so its malformed
# bodies know the wire shape; `DispatchFuzzer.value` picks sane values by name.
METHODS: dict[str, tuple[type, type, dict[str, str]]] = {
    "CreateWaybill": (
        fpb.CreateWaybillRequest, fpb.WaybillReply, {"reservation_id": "rid", "carrier": "text", "address": "text"},
    ),
    "Dispatch": (
        fpb.DispatchRequest, fpb.WaybillReply, {"waybill_id": "rid", "dispatcher_id": "text", "attempt": "uint32"},
    ),
    "Acknowledge": (fpb.AcknowledgeRequest, fpb.WaybillReply, {"waybill_id": "rid"}),
    "Fail": (fpb.FailRequest, fpb.WaybillReply, {"waybill_id": "rid", "reason": "text"}),
    "GetWaybill": (fpb.GetWaybillRequest, fpb.WaybillReply, {"waybill_id": "rid"}),
}
# The contracts' idempotency_key fields, read from the compiled proto.
KEY_FIELDS = {
    path.rpartition("/")[2]: contract.idempotency_key
    for path, contract in of_service(DISPATCH_SERVICE).items() if contract.idempotency_key
}
# What a first success of each mutating RPC leaves its waybill in, and how
# many versions it walks (Dispatch: the claim, then the carrier's answer).
SUCCEEDS = {
    "CreateWaybill": (Waybill.CREATED, 1),
    "Dispatch": (Waybill.DISPATCHED, 2),
    "Acknowledge": (Waybill.ACKNOWLEDGED, 1),
    "Fail": (Waybill.FAILED, 1),
}
# Outcome records a first answer adds: Dispatch records its claim under a
# key of its own besides the call's.
RECORDS_MAX = {"Dispatch": 2}
ATTEMPT_EDGES = (0, 1, 2, 3, MAX_ATTEMPTS + 1, 5, 127, 128, 255, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1)
# A uint32 sent as a wider varint: protobuf keeps the low 32 bits, so some
# of these are attempt 1 in disguise.
WIDE_ATTEMPTS = (2**32, 2**32 + 1, 2**32 + MAX_ATTEMPTS, 2**63, 2**64 - 1, -1, -(2**63))
REFILL_EVERY = 50
WAYBILL_LOOKALIKES = ("wb_", "wb_" + "0" * 24, "WB_", "wb-", "rsv_" + "0" * 24)


def hostile_dispatch_value(rng: random.Random, kind: str) -> object:
    """test_fuzz's hostile_value, plus the uint32 attempt."""
    return rng.choice(ATTEMPT_EDGES) if kind == "uint32" else hostile_value(rng, kind)


def dump_all(txn) -> tuple[tuple, tuple, dict, dict]:
    """test_fuzz's dump (stock, reservations, outcomes) and every entity row,
    by id, read in the same store transaction."""
    rows = txn._execute(f"SELECT {ENTITY_COLUMNS} FROM entity ORDER BY entity_id").fetchall()
    entities = {entity.entity_id: entity for entity in map(entity_of_row, rows)}
    return (*dump(txn), entities)


# -- the world each run starts from ---------------------------------------------------


@dataclass
class Waybills:
    """Known ids, so a share of hostile calls names real reservations and waybills."""

    reservations: list[str] = field(default_factory=list)
    waybills: list[str] = field(default_factory=list)


@dataclass
class DispatchFuzzer(Fuzzer):
    """test_fuzz's Fuzzer (its text generator and verdict) with DispatchService's
    methods, world and judge in place of inventory's."""

    SERVICE_PATH = SERVICE

    world: Waybills = field(default_factory=Waybills)
    moved: dict[str, int] = field(default_factory=dict)  # first successes, by method

    async def state(self) -> tuple[tuple, tuple, dict, dict]:
        return await self.server.engine.store.transact(dump_all)

    async def setup(self, carrier) -> None:
        """Seven confirmed reservations, five with a waybill: CREATED,
        CREATED after a refused attempt, DISPATCHED, FAILED and ACKNOWLEDGED;
        one reservation only held and one released. Then the fuzz carrier."""
        dispatch = fpb_grpc.DispatchServiceStub(self.channel)
        inventory = pb_grpc.InventoryServiceStub(self.channel)
        created = [(await new_waybill(self.channel, dispatch, f"order-{n}")) for n in range(5)]
        self.world.waybills = [w.waybill_id for w in created]
        self.world.reservations = [w.reservation_id for w in created]
        for n in (5, 6):
            self.world.reservations.append(await confirmed_reservation(self.channel, f"order-{n}"))
        for order in ("order-held", "order-released"):
            held = await inventory.Reserve(pb.ReserveRequest(order_id=order, sku_id="sku-1", quantity=1, timestamp_ms=1))
            self.world.reservations.append(held.reservation_id)
        await inventory.Release(pb.ReleaseRequest(reservation_id=self.world.reservations[-1]))

        refused, dispatched, failed, acknowledged = self.world.waybills[1:]
        carrier(refuse_first=1)
        with pytest.raises(grpc.aio.AioRpcError):
            await dispatch.Dispatch(fpb.DispatchRequest(waybill_id=refused, dispatcher_id="d-0", attempt=1))
        carrier()
        for wid in (dispatched, acknowledged):
            await dispatch.Dispatch(fpb.DispatchRequest(waybill_id=wid, dispatcher_id="d-0", attempt=1))
        await dispatch.Acknowledge(fpb.AcknowledgeRequest(waybill_id=acknowledged))
        await dispatch.Fail(fpb.FailRequest(waybill_id=failed, reason="setup"))
        states = [(await self.state())[3][wid].state for wid in self.world.waybills]
        assert states == [Waybill.CREATED, Waybill.CREATED, Waybill.DISPATCHED, Waybill.FAILED, Waybill.ACKNOWLEDGED]
        # confirmed_reservation sets sku-1 to 10 units: refills take sku-2's.
        await inventory.PutStock(pb.PutStockRequest(sku_id="sku-2", total=1000, request_id="refills"))
        carrier(failure_rate=0.5, seed=SEED)

    async def refill(self) -> None:
        """A new confirmed reservation, and every other time its waybill: a
        fuzzed Fail or Dispatch soon ends a CREATED waybill, and without new
        ones Dispatch would meet only refusals after the first few calls."""
        n = len(self.world.reservations)
        inventory = pb_grpc.InventoryServiceStub(self.channel)
        held = await inventory.Reserve(pb.ReserveRequest(order_id=f"refill-{n}", sku_id="sku-2", quantity=1, timestamp_ms=1))
        await inventory.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
        self.world.reservations.append(held.reservation_id)
        if n % 2 == 0:
            dispatch = fpb_grpc.DispatchServiceStub(self.channel)
            created = await dispatch.CreateWaybill(
                fpb.CreateWaybillRequest(reservation_id=held.reservation_id, carrier="acme", address="1 Quay St")
            )
            self.world.waybills.append(created.waybill_id)

    async def fuzz(self, calls: int, body) -> None:
        """`calls` hostile calls of random methods, `body(method)` giving
        each one's (what, bytes), with a refill every REFILL_EVERY calls.
        Dispatch, the RPC with the most steps, gets twice the share."""
        methods = [*METHODS, "Dispatch"]
        for n in range(calls):
            if n % REFILL_EVERY == REFILL_EVERY - 1:
                await self.refill()
            method = self.rng.choice(methods)
            what, data = body(method)
            await self.send(method, data, what)

    def _judge(self, method, body, reply, error, before, after, trailing) -> str | None:
        request_class, reply_class, _ = METHODS[method]
        try:
            request = request_class.FromString(body)
        except DecodeError:
            request = None
        replayed = trailing.get("holdfast-replayed") == "true"
        if error is None:
            self.answers["OK"] = self.answers.get("OK", 0) + 1
            if request is None:
                return "an undecodable body was answered OK"
            try:
                answer = reply_class.FromString(reply)
            except DecodeError:
                return "the reply does not parse as " + reply_class.__name__
            missing = [n for n in KEY_FIELDS.get(method, ()) if getattr(request, n) in ("", 0)]
            if missing:
                return f"key fields {missing} missing, yet answered OK"
            if replayed or method == "GetWaybill":
                return _unchanged(before, after, outcomes_may_grow=False)
            if method == "CreateWaybill" and answer.waybill_id not in self.world.waybills:
                self.world.waybills.append(answer.waybill_id)
            self.moved[method] = self.moved.get(method, 0) + 1
            return _moved(method, request, answer, before, after)
        problem, reason = self._refusal(method, request, error, trailing)
        if problem is not None:
            return problem
        if replayed:
            return _unchanged(before, after, outcomes_may_grow=False)
        if reason is DispatchReason.CARRIER_REFUSED:
            return _attempt_refused(request, before, after)
        return _unchanged(before, after, outcomes_may_grow=reason.recorded)

    def _refusal(self, method, request, error, trailing) -> tuple[str | None, AnyReason | None]:
        """Whether an error answer is a defined one: test_fuzz's rules."""
        code = error.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return f"{code.name}: {error.details()!r}", None
        try:
            failure = failure_of(error)
        except AssertionError:
            return f"{code.name} without google.rpc.Status details (a client timeout is a hang): {error.details()!r}", None
        except ValueError as mismatch:  # the status details say another code than the call's
            return f"{code.name} carrying other status details ({mismatch}): {error.details()[:300]!r}", None
        self.answers[failure.reason] = self.answers.get(failure.reason, 0) + 1
        try:
            reason = reason_named(failure.reason) if failure.domain == DOMAIN else None
        except KeyError:
            reason = None
        if reason is None:
            return f"{code.name} with ErrorInfo {failure.domain!r}/{failure.reason!r}, not a holdfast reason", None
        if reason.code != code:
            return f"reason {reason.name} answered as {code.name}, the table says {reason.code.name}", None
        undecodable = reason is Reason.INVALID_REQUEST and UNDECODABLE in failure.message
        if (request is None) != undecodable:
            return (f"the client {'cannot' if request is None else 'can'} parse the body,"
                    f" the server said {reason.name}: {failure.message!r}"), None
        if request is not None:
            missing = [n for n in KEY_FIELDS.get(method, ()) if getattr(request, n) in ("", 0)]
            if missing and reason is not Reason.CONTRACT_VIOLATION:
                return f"key fields {missing} missing, answered {reason.name} instead of CONTRACT_VIOLATION", None
            if "holdfast-context-id" not in trailing:
                return "no holdfast-context-id on a decoded call", None
        if "holdfast-replayed" not in trailing:
            return "no holdfast-replayed trailer", None
        return None, reason

    async def survives(self, carrier) -> None:
        """The server is up, reads a waybill, and ships a new one end to end."""
        health = health_pb2_grpc.HealthStub(self.channel)
        for name in ("", DISPATCH_SERVICE.full_name):
            check = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
            assert check.status == health_pb2.HealthCheckResponse.SERVING, name
        dispatch = fpb_grpc.DispatchServiceStub(self.channel)
        known = self.world.waybills[0]
        assert (await dispatch.GetWaybill(fpb.GetWaybillRequest(waybill_id=known), timeout=TIMEOUT_S)).waybill_id == known
        carrier()
        waybill = await new_waybill(self.channel, dispatch, "order-survivor")
        shipped = await dispatch.Dispatch(
            fpb.DispatchRequest(waybill_id=waybill.waybill_id, dispatcher_id="d-survivor", attempt=1), timeout=TIMEOUT_S
        )
        assert shipped.state == fpb.WAYBILL_STATE_DISPATCHED and shipped.tracking_id

    # -- values -----------------------------------------------------------------

    def value(self, name: str, kind: str):
        return self.sane(name, kind) if self.rng.random() < 0.4 else self.hostile(name, kind)

    def sane(self, name: str, kind: str):
        rng = self.rng
        if kind == "uint32":  # most waybills have had no attempt yet
            return 1 if rng.random() < 0.6 else rng.randint(2, MAX_ATTEMPTS)
        if name == "reservation_id":
            return rng.choice(self.world.reservations)
        if name == "waybill_id":
            return rng.choice(self.world.waybills)
        if name == "carrier":
            return rng.choice(("acme", "acme", "parcelco"))
        if name == "address":
            return rng.choice(("1 Quay St", "1 Quay St", "", "Flat 2, 3 Rue d'Été"))
        if name == "dispatcher_id":
            return f"d-{rng.randrange(3)}"
        return rng.choice(("", "given up", f"reason-{rng.randrange(5)}"))

    def hostile(self, name: str, kind: str):
        if kind == "uint32":
            return self.rng.choice(ATTEMPT_EDGES)
        if name == "waybill_id" and self.rng.random() < 0.1:
            return self.rng.choice(WAYBILL_LOOKALIKES)
        return self.text()

    def request(self, method: str):
        """Each field sane or hostile by itself (and sometimes unset); or, a
        third of the time, a sane request with at most one hostile field, so
        that Dispatch's three key parts line up often enough to reach the
        claim, the carrier and the settlement."""
        request_class, _, fields = METHODS[method]
        rng = self.rng
        if rng.random() < 1 / 3:
            values = {name: self.sane(name, kind) for name, kind in fields.items()}
            spoiled = rng.choice([*fields, None])
            if spoiled is not None:
                values[spoiled] = self.hostile(spoiled, fields[spoiled])
        else:
            values = {name: self.value(name, kind) for name, kind in fields.items() if rng.random() < 0.9}
        return request_class(**values)


# -- what a call may change ----------------------------------------------------------------


def _unchanged(before, after, outcomes_may_grow: bool) -> str | None:
    """test_fuzz's rule (at most one outcome record, when recorded) with the entities too."""
    problem = _changed(before, after, outcomes_may_grow)
    if problem is not None:
        return problem
    if before[3] != after[3]:
        return "entity rows changed: " + _entity_diff(before[3], after[3])
    return None


def _moved(method: str, request, answer, before, after) -> str | None:
    """A first success: only its own waybill moved, into the promised state."""
    wid = answer.waybill_id if method == "CreateWaybill" else request.waybill_id
    state, steps = SUCCEEDS[method]
    problem = _only(wid, before, after, RECORDS_MAX.get(method, 1))
    if problem is not None:
        return problem
    old, new = before[3].get(wid), after[3][wid]
    version = 0 if old is None else old.version
    if (method == "CreateWaybill") != (old is None):
        return f"{method} answered OK on {'a new' if old is None else 'an existing'} waybill {wid}"
    if (new.kind, new.state, new.version) != (KIND, state, version + steps):
        return f"{wid} is {new.kind} {Waybill(new.state).name} v{new.version}, not {KIND} {state.name} v{version + steps}"
    if (answer.state, answer.version) != (new.state, new.version):
        return f"the reply says {fpb.WaybillState.Name(answer.state)} v{answer.version}, the store v{new.version}"
    fields = decode_data(new.data)
    if method == "Dispatch":
        last = fields["attempts"][-1]
        accepted = (request.attempt, request.dispatcher_id, "ATTEMPT_RESULT_ACCEPTED")
        if (last["attempt"], last["dispatcher_id"], last["result"]) != accepted:
            return f"the accepted attempt is recorded as {last}"
    if method == "Fail" and fields["failure_reason"] != (request.reason or "given up"):
        return f"failure_reason {fields['failure_reason']!r} for a Fail with reason {request.reason!r}"
    return None


def _attempt_refused(request, before, after) -> str | None:
    """CARRIER_REFUSED ends an attempt: its waybill gets one REFUSED attempt
    and is CREATED again, or FAILED after the last one."""
    wid = request.waybill_id
    problem = _only(wid, before, after, 2)
    if problem is not None:
        return problem
    old, new = before[3].get(wid), after[3].get(wid)
    if old is None or new is None:
        return f"CARRIER_REFUSED for waybill {wid!r}, which {'was' if old is None else 'is'} not in the store"
    state = Waybill.FAILED if request.attempt >= MAX_ATTEMPTS else Waybill.CREATED
    if (new.state, new.version) != (state, old.version + 2):
        return f"{wid} went {Waybill(old.state).name} v{old.version} -> {Waybill(new.state).name} v{new.version}"
    old_attempts, attempts = decode_data(old.data)["attempts"], decode_data(new.data)["attempts"]
    last = attempts[-1]
    refused = (request.attempt, "ATTEMPT_RESULT_REFUSED")
    if len(attempts) != len(old_attempts) + 1 or (last["attempt"], last["result"]) != refused:
        return f"attempts {old_attempts} -> {attempts} for a refused attempt {request.attempt}"
    return None


def _only(entity_id: str, before, after, records_max: int) -> str | None:
    """Nothing but `entity_id` changed, the inventory not at all, and at most
    `records_max` outcomes were added (none lost or rewritten)."""
    for table, old, new in (("stock", before[0], after[0]), ("reservation", before[1], after[1])):
        if old != new:
            return f"{table} rows changed by a dispatch call: {_short(sorted(set(old) ^ set(new)))}"
    if any(after[2].get(key) != value for key, value in before[2].items()):
        return "recorded outcomes were lost or rewritten"
    if len(after[2]) - len(before[2]) > records_max:
        return f"{len(after[2]) - len(before[2])} outcomes recorded by a call that may record {records_max}"
    others = {i for i in before[3].keys() | after[3].keys() if before[3].get(i) != after[3].get(i)} - {entity_id}
    if others:
        return f"entities other than {entity_id!r} changed: {sorted(others)}"
    if entity_id not in after[3]:
        return f"{entity_id!r} is not in the store"
    return None


def _entity_diff(old: dict, new: dict) -> str:
    changed = sorted(i for i in old.keys() | new.keys() if old.get(i) != new.get(i))
    return _short([(old.get(i), new.get(i)) for i in changed])


@pytest.fixture
async def fuzzer(server: Running, channel: grpc.aio.Channel, carrier, request: pytest.FixtureRequest) -> DispatchFuzzer:
    fuzzer = DispatchFuzzer(server, channel, random.Random(f"{SEED}:{request.node.name}"))
    await fuzzer.setup(carrier)
    return fuzzer


# -- 1. well-formed requests, hostile values -----------------------------------------------


async def test_hostile_field_values_get_defined_answers_and_refusals_change_nothing(fuzzer: DispatchFuzzer, carrier):
    await fuzzer.fuzz(1200, lambda method: ("hostile values", fuzzer.request(method).SerializeToString()))
    await fuzzer.survives(carrier)
    fuzzer.verdict(1200)
    # The mix reached past the first check: validation, the engine, the claim and the carrier all answered.
    assert {
        "OK", "CONTRACT_VIOLATION", "INVALID_REQUEST", "WAYBILL_NOT_FOUND", "RESERVATION_NOT_FOUND",
        "RESERVATION_NOT_CONFIRMED", "INVALID_TRANSITION", "IDEMPOTENCY_KEY_REUSED", "CARRIER_REFUSED",
    } <= fuzzer.answers.keys(), fuzzer.answers
    assert fuzzer.moved.keys() == SUCCEEDS.keys(), fuzzer.moved


# -- 2. malformed bodies -------------------------------------------------------------------


def malformed_dispatch(rng: random.Random, method: str, valid: bytes) -> tuple[str, bytes]:
    """test_fuzz's malformed bodies for dispatch's methods, and Dispatch's
    uint32 attempt sent as a wider varint."""
    if method == "Dispatch" and rng.random() < 0.15:
        wide = rng.choice(WIDE_ATTEMPTS)
        number = field_number(fpb.DispatchRequest, "attempt")
        return f"attempt {wide} as a 64-bit varint", valid + tag(number, WIRE_VARINT) + varint(wide)
    return malformed(rng, method, valid, methods=METHODS, hostile=hostile_dispatch_value)


async def test_malformed_bodies_are_invalid_requests_and_change_nothing(fuzzer: DispatchFuzzer, carrier):
    await fuzzer.fuzz(1000, lambda method: malformed_dispatch(fuzzer.rng, method, fuzzer.request(method).SerializeToString()))
    await fuzzer.survives(carrier)
    fuzzer.verdict(1000)
    assert fuzzer.answers.get("INVALID_REQUEST", 0) >= 300, fuzzer.answers


# -- 3. oversized strings ----------------------------------------------------------------------


async def test_oversized_strings_in_every_string_field_get_defined_answers(fuzzer: DispatchFuzzer, carrier):
    strings = 0
    for method, (request_class, _, fields) in METHODS.items():
        for name, kind in fields.items():
            if kind not in ("rid", "text"):
                continue
            strings += 1
            for size in SIZES:
                for fill in FILLERS:
                    request = fuzzer.request(method)
                    setattr(request, name, fill(size))
                    await fuzzer.send(method, request.SerializeToString(), f"{name} of {size} bytes")
                # The same size, ending in a byte that is not UTF-8.
                number = field_number(request_class, name)
                body = length_delimited(number, b"x" * (size - 1) + b"\xff")
                await fuzzer.send(method, body, f"{name} of {size} bytes, bad UTF-8 at the end")
            # Every bad UTF-8 sequence test_fuzz knows, alone in this field.
            for bad in BAD_UTF8:
                await fuzzer.send(method, length_delimited(field_number(request_class, name), bad), f"{name} {bad!r}")
        # A megabyte of unknown field next to a valid request.
        body = fuzzer.request(method).SerializeToString() + length_delimited(77, b"\x00" * 1_000_000)
        await fuzzer.send(method, body, "a 1 MB unknown field")
    await fuzzer.survives(carrier)
    assert strings == 9
    fuzzer.verdict(strings * (len(SIZES) * (len(FILLERS) + 1) + len(BAD_UTF8)) + len(METHODS))
