"""`holdfast.inventory.v1.InventoryService`: thin translation between the
proto and the engine's moves. Validation happens here, before a move is
built; state-dependent answers come from the move itself, inside its
transaction.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import grpc
from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast import (
    AppReason,
    Call,
    Engine,
    Move,
    Outcome,
    Reason,
    Service,
    Txn,
    current_call,
    failure,
    idempotency_key,
    shown_id,
    success,
)
from holdfast.apps import inventory_machine as machine
from holdfast.apps.inventory_machine import State
from holdfast.apps.inventory_store import (
    RESERVATIONS,
    STOCK,
    TABLES,
    Reservation,
    Stock,
    due_holds,
    intents,
    put_stock,
    reservation,
    save_reservation,
    settle_stock,
    stock,
    take_stock,
)

SERVICE = pb.DESCRIPTOR.services_by_name["InventoryService"]
ID_LENGTH_MAX = 128
REASON_LENGTH_MAX = 512
EXPIRED = "hold expired"
REAPER_METHOD = "holdfast.reaper/HoldExpiry"
RECOVERY_METHOD = "holdfast.recovery/Intent"


class InventoryReason(AppReason, domain="holdfast"):
    """Inventory's refusals (DESIGN.md's table), holdfast's own so in the domain
    `holdfast`; their names, statuses and bytes are those they had as members
    of `Reason`, and a recorded one is stored by its bare name, as before."""

    SKU_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, False)
    RESERVATION_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, False)
    INSUFFICIENT_STOCK = (grpc.StatusCode.FAILED_PRECONDITION, True)
    STOCK_BELOW_COMMITTED = (grpc.StatusCode.FAILED_PRECONDITION, True)
    # What fulfillment asks of a reservation before it creates a waybill; it
    # may be confirmed later, so the answer is not recorded.
    RESERVATION_NOT_CONFIRMED = (grpc.StatusCode.FAILED_PRECONDITION, False)


@dataclass(frozen=True, slots=True)
class Holds:
    """Hold durations: `hold_ms` 0 means `default_ms`; above `max_ms` is invalid."""

    default_ms: int = 15 * 60 * 1000
    max_ms: int = 7 * 24 * 60 * 60 * 1000

    def __post_init__(self) -> None:
        if not 0 < self.default_ms <= self.max_ms:
            raise ValueError(f"hold default must be within 1..{self.max_ms} ms, got {self.default_ms}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Holds:
        defaults = cls()
        default_ms = int(settings.get("hold_default_ms", defaults.default_ms))
        return cls(default_ms=default_ms, max_ms=max(default_ms, defaults.max_ms))


def reservation_id(key: bytes) -> str:
    """Derived from the Reserve key, so every instance names the same hold the same."""
    return "rsv_" + key.hex()[:24]


class Inventory(Service):
    """The servicer of InventoryService. Its moves work on its own tables
    (holdfast.apps.inventory_store: the lower level of holdfast.framework),
    not on generic entities: a Reserve is the hot path."""

    DESCRIPTOR = SERVICE
    MACHINE = machine.INVENTORY
    tables = TABLES
    admin_methods = ("PutStock",)  # setting a SKU's total is the operator's, not a shop's
    workload = "holdfast.apps.inventory_workload:InventoryWorkload"
    legacy_timeouts = {"expire": "reservation_id"}  # format 1 journaled a hold's expiry as an `expire` line

    def __init__(self, engine: Engine, holds: Holds = Holds()) -> None:
        super().__init__(engine)
        self.holds = holds

    @classmethod
    def from_settings(cls, engine: Engine, settings: Mapping[str, Any]) -> Inventory:
        """`hold_default_ms` (`holdfast serve --hold-default-ms`): the hold a
        Reserve asking for 0 gets; the longest allowed grows to it if needed."""
        return cls(engine, Holds.from_settings(settings))

    # -- RPCs ------------------------------------------------------------------

    async def PutStock(self, request: pb.PutStockRequest, context) -> Outcome:
        violations = [*_id_violations(request, "sku_id", "request_id")]
        if request.total < 0:
            violations.append(("total", f"total must be zero or more, got {request.total}"))
        if violations:
            return _invalid(violations)
        sku_id, total = request.sku_id, request.total

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _put_stock(txn, sku_id, total)

        return await self._move(current_call(), None, apply, skus=(sku_id,))

    async def GetStock(self, request: pb.GetStockRequest, context) -> Outcome:
        if not request.sku_id:
            return _invalid([("sku_id", "sku_id must be set")])
        sku_id = request.sku_id

        def read(txn: Txn, now_ms: int) -> Outcome:
            found = stock(txn, sku_id)
            return _sku_not_found(sku_id) if found is None else success(_stock_reply(found))

        return await self.engine.read(read, current_call().deadline)

    async def Reserve(self, request: pb.ReserveRequest, context) -> Outcome:
        violations = [*_id_violations(request, "order_id", "sku_id")]
        if request.quantity <= 0:
            violations.append(("quantity", f"quantity must be positive, got {request.quantity}"))
        if request.timestamp_ms < 0:
            violations.append(("timestamp_ms", f"timestamp_ms must not be negative, got {request.timestamp_ms}"))
        if not 0 <= request.hold_ms <= self.holds.max_ms:
            violations.append(("hold_ms", f"hold_ms must be within 0..{self.holds.max_ms}, got {request.hold_ms}"))
        if violations:
            return _invalid(violations)
        call = current_call()
        rid = reservation_id(call.key)
        hold_ms = request.hold_ms or self.holds.default_ms
        order_id, sku_id, quantity = request.order_id, request.sku_id, request.quantity

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _reserve(txn, rid, order_id, sku_id, quantity, now_ms + hold_ms)

        return await self._move(call, rid, apply, skus=(sku_id,))

    async def Confirm(self, request: pb.ConfirmRequest, context) -> Outcome:
        rid, expected = request.reservation_id, request.expected_version

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _confirm(txn, rid, expected, now_ms)

        return await self._move(current_call(), rid, apply)

    async def Release(self, request: pb.ReleaseRequest, context) -> Outcome:
        if len(request.reason) > REASON_LENGTH_MAX:
            return _invalid([("reason", f"reason must be at most {REASON_LENGTH_MAX} characters")])
        if any(ord(c) < 0x20 and c not in "\t\n" for c in request.reason):
            return _invalid([("reason", "reason must not contain control characters other than tab and newline")])
        rid, why = request.reservation_id, request.reason or "released"

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _release(txn, rid, why)

        return await self._move(current_call(), rid, apply)

    async def GetReservation(self, request: pb.GetReservationRequest, context) -> Outcome:
        if not request.reservation_id:
            return _invalid([("reservation_id", "reservation_id must be set")])
        rid = request.reservation_id

        def read(txn: Txn, now_ms: int) -> Outcome:
            found = reservation(txn, rid)
            return _reservation_not_found(rid) if found is None else success(_reservation_reply(found))

        return await self.engine.read(read, current_call().deadline)

    # -- timeout events, as ordinary moves ---------------------------------------

    # -- moves made by time and by recovery -------------------------------------

    async def reap(self, now_ms: int, batch: int) -> int:
        """Releases the holds due by `now_ms`, each by its own move."""
        due = await self.engine.store.transact(lambda txn: due_holds(txn, now_ms, batch))
        outcomes = await asyncio.gather(*(self.expire(hold) for hold in due))
        return sum(1 for outcome in outcomes if outcome.ok)

    async def expire(self, hold: Reservation) -> Outcome:
        """The reaper's move for one due hold."""
        return await self.timeout(hold.reservation_id, hold.version)

    async def timeout(self, entity_id: str, version: int) -> Outcome:
        """A hold's expiry, under its own idempotency key (the hold's id
        alone: a hold expires once, whatever its version). The move reads the
        hold in its transaction, so `version` only names what the reaper saw."""
        key = idempotency_key(REAPER_METHOD, (entity_id,))
        return await self.engine.move(
            Move(REAPER_METHOD, key, key, entity_id, lambda txn, now_ms: _expire(txn, entity_id, now_ms), RESERVATIONS)
        )

    async def recover(self, batch: int) -> int:
        """Resolves every intent a crashed writer left in the store."""
        moved = 0
        while left := await self.engine.store.transact(lambda txn: intents(txn, batch)):
            for intent in left:
                outcome = await self.recover_intent(intent)
                assert outcome.ok, f"recovery of {intent.reservation_id} failed: {outcome.reason}"
                moved += 1
        return moved

    async def recover_intent(self, intent: Reservation) -> Outcome:
        """Drives an intent left in the store forward or back (machine.RECOVERY)."""
        key = idempotency_key(RECOVERY_METHOD, (intent.reservation_id, intent.state.name, intent.retry_count))
        rid = intent.reservation_id
        return await self.engine.move(Move(RECOVERY_METHOD, key, key, rid, lambda txn, now_ms: _recover(txn, rid), RESERVATIONS))

    async def confirmation(self, reservation_id: str, deadline: float | None = None) -> Outcome | None:
        """None when `reservation_id` is CONFIRMED (terminal: it stays so);
        otherwise the refusal that says why not (not found, not confirmed, or
        the store's failure). What fulfillment asks before creating a waybill."""

        def read(txn: Txn, now_ms: int) -> Outcome | None:
            found = reservation(txn, reservation_id)
            if found is None:
                return _reservation_not_found(reservation_id)
            if found.state != State.CONFIRMED:
                return failure(
                    InventoryReason.RESERVATION_NOT_CONFIRMED,
                    f"reservation {reservation_id} is {found.state.name}, not CONFIRMED",
                    metadata={"reservation_id": reservation_id, "state": found.state.name},
                )
            return None

        return await self.engine.read(read, deadline)

    async def _move(self, call: Call, entity: str | None, apply, skus: tuple[str, ...] = ()) -> Outcome:
        prefetch = {STOCK.name: skus} if skus else {}
        move = Move(call.contract.method, call.key, call.fingerprint, entity, apply, RESERVATIONS, prefetch)
        return await self.engine.move(move, call.deadline)


# -- moves: run on the store's thread, inside the move's transaction -------------


def _put_stock(txn: Txn, sku_id: str, total: int) -> Outcome:
    current = stock(txn, sku_id)
    if current is None:
        row = Stock(sku_id, total, total, 0, 0, 1)
    else:
        committed = current.held + current.sold
        if total < committed:
            return failure(
                InventoryReason.STOCK_BELOW_COMMITTED,
                f"total {total} is below the {committed} units held or sold for {sku_id}",
                metadata={"sku_id": sku_id, "committed": str(committed)},
            )
        row = Stock(sku_id, total, total - committed, current.held, current.sold, current.version + 1)
    put_stock(txn, row)
    return success(_stock_reply(row))


def _reserve(txn: Txn, rid: str, order_id: str, sku_id: str, quantity: int, expires_at_ms: int) -> Outcome:
    existing = reservation(txn, rid)
    state = State.AVAILABLE if existing is None else existing.state
    version = 0 if existing is None else existing.version
    if machine.walk(state, machine.RESERVE) is None:
        return _invalid_transition(rid, state, "reserve")
    if not take_stock(txn, sku_id, quantity):
        # The conditional update found no row to take from; only now is it
        # worth a read to say which: no such SKU, or too little of it.
        if stock(txn, sku_id) is None:
            return _sku_not_found(sku_id)
        return failure(
            InventoryReason.INSUFFICIENT_STOCK,
            f"{sku_id} has fewer than {quantity} units available",
            metadata={"sku_id": sku_id, "quantity": str(quantity)},
        )
    retry_count = 0 if existing is None else existing.retry_count
    held = Reservation(rid, order_id, sku_id, quantity, State.RESERVED, version + 1, expires_at_ms, retry_count)
    save_reservation(txn, held, version)
    return success(_reservation_reply(held))


def _confirm(txn: Txn, rid: str, expected_version: int, now_ms: int) -> Outcome:
    found = reservation(txn, rid)
    if found is None:
        return _reservation_not_found(rid)
    if expected_version and expected_version != found.version:
        return failure(
            Reason.VERSION_CONFLICT,
            f"reservation {rid} is at version {found.version}, not the expected {expected_version}",
            metadata={"reservation_id": rid, "version": str(found.version)},
        )
    if _expired(found, now_ms):
        return failure(Reason.HOLD_EXPIRED, f"the hold of reservation {rid} expired at {found.expires_at_ms} ms", metadata={"reservation_id": rid})
    if machine.walk(found.state, machine.CONFIRM) is None:
        return _invalid_transition(rid, found.state, "confirm")
    return _settle(txn, found, State.CONFIRMED, sold=True, why="")


def _release(txn: Txn, rid: str, why: str) -> Outcome:
    found = reservation(txn, rid)
    if found is None:
        return _reservation_not_found(rid)
    if found.state == State.RELEASED and found.release_reason == EXPIRED:
        return failure(Reason.HOLD_EXPIRED, f"the hold of reservation {rid} already expired", metadata={"reservation_id": rid})
    if machine.walk(found.state, machine.RELEASE) is None:
        return _invalid_transition(rid, found.state, "release")
    return _settle(txn, found, State.RELEASED, sold=False, why=why)


def _expire(txn: Txn, rid: str, now_ms: int) -> Outcome:
    found = reservation(txn, rid)
    if found is None:  # a replayed expiry on an instance that never had the hold
        return _reservation_not_found(rid)
    if found.expires_at_ms > now_ms or machine.walk(found.state, machine.EXPIRE) is None:
        return _invalid_transition(rid, found.state, "expire")
    return _settle(txn, found, State.RELEASED, sold=False, why=EXPIRED)


def _recover(txn: Txn, rid: str) -> Outcome:
    """An intent holds the stock of the state it left; completing it applies
    the effect, abandoning a reserve returns it to AVAILABLE with nothing held."""
    found = reservation(txn, rid)
    assert found is not None and found.state in machine.RECOVERY, f"no intent to recover at {rid}"
    target = machine.walk(found.state, machine.RECOVERY[found.state])
    assert target is not None
    if found.state == State.RESERVING:
        back = replace(found, state=target, version=found.version + 1, retry_count=found.retry_count + 1)
        save_reservation(txn, back, found.version)
        return success(_reservation_reply(back))
    sold = found.state == State.CONFIRMING
    return _settle(txn, found, target, sold=sold, why="" if sold else found.release_reason or "recovered")


def _settle(txn: Txn, found: Reservation, target: State, sold: bool, why: str) -> Outcome:
    settle_stock(txn, found.sku_id, found.quantity, sold=sold)
    done = replace(found, state=target, version=found.version + 1, release_reason=why)
    save_reservation(txn, done, found.version)
    return success(_reservation_reply(done))


def _expired(found: Reservation, now_ms: int) -> bool:
    if found.state == State.RELEASED:
        return found.release_reason == EXPIRED
    return found.state == State.RESERVED and now_ms >= found.expires_at_ms


# -- replies and answers ---------------------------------------------------------


def _stock_reply(s: Stock) -> bytes:
    s.check()
    return pb.StockReply(
        sku_id=s.sku_id, total=s.total, available=s.available, held=s.held, sold=s.sold, version=s.version
    ).SerializeToString(deterministic=True)


def _reservation_reply(r: Reservation) -> bytes:
    return pb.ReservationReply(
        reservation_id=r.reservation_id,
        order_id=r.order_id,
        sku_id=r.sku_id,
        quantity=r.quantity,
        state=int(r.state),
        version=r.version,
        expires_at_ms=r.expires_at_ms,
    ).SerializeToString(deterministic=True)


def _invalid(violations: Iterable[tuple[str, str]]) -> Outcome:
    violations = list(violations)
    return failure(Reason.INVALID_REQUEST, "invalid request: " + "; ".join(why for _, why in violations), violations)


_CONTROL = re.compile("[\x00-\x1f\x7f]")  # one C scan per id instead of a Python loop per character


def _id_violations(request, *names: str) -> Iterable[tuple[str, str]]:
    for name in names:
        value = getattr(request, name)
        if len(value) > ID_LENGTH_MAX:
            yield name, f"{name} must be at most {ID_LENGTH_MAX} characters, got {len(value)}"
        elif _CONTROL.search(value):
            yield name, f"{name} must not contain control characters"


def _sku_not_found(sku_id: str) -> Outcome:
    shown = shown_id(sku_id)
    return failure(InventoryReason.SKU_NOT_FOUND, f"no stock is recorded for SKU {shown!r}", metadata={"sku_id": shown})


def _reservation_not_found(rid: str) -> Outcome:
    shown = shown_id(rid)
    return failure(InventoryReason.RESERVATION_NOT_FOUND, f"no reservation {shown!r}", metadata={"reservation_id": shown})


def _invalid_transition(rid: str, state: State, what: str) -> Outcome:
    return failure(
        Reason.INVALID_TRANSITION,
        f"cannot {what} reservation {rid} in state {state.name}",
        metadata={"reservation_id": rid, "state": state.name},
    )
