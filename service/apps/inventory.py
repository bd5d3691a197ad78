"""`holdfast.inventory.v1.InventoryService`: thin translation between the
proto and the engine's moves. Validation happens here, before a move is
built; state-dependent answers come from the move itself, inside its
transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

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
    Table,
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
    ORDER_HOLDS,
    RESERVATIONS,
    STOCK,
    TABLES,
    OrderHold,
    Reservation,
    Stock,
    due_holds,
    expired_holds,
    intents,
    order_hold,
    prune_settled,
    put_stock,
    record_expiry,
    reservation,
    save_order_hold,
    save_reservation,
    split_stock,
    stock,
    take_stock,
)

SERVICE = pb.DESCRIPTOR.services_by_name["InventoryService"]
ID_LENGTH_MAX = 128
REASON_LENGTH_MAX = 512
LINES_MAX = 100  # an order's lines: one move locks a stock row per line
EXPIRED = "hold expired"
REAPER_METHOD = "holdfast.reaper/HoldExpiry"
RECOVERY_METHOD = "holdfast.recovery/Intent"
# The expired holds one Reserve short of stock may reclaim (docs/reclaim.md):
# each is a row locked and a record written in its move, so a call's cost
# stays bounded, as LINES_MAX bounds an order's.
RECLAIM_MAX = 100


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


def order_hold_id(key: bytes) -> str:
    """Derived from the ReserveOrder key, as a reservation's id is from Reserve's."""
    return "ord_" + key.hex()[:24]


def expiry_key(entity_id: str) -> bytes:
    """The reaper's key for the expiry of a hold (or of an order hold): its
    id alone, so a hold expires once, whoever expires it."""
    return idempotency_key(REAPER_METHOD, (entity_id,))


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """An expired hold a Reserve released in its own move: the hold as the
    move found it, and its expiry's outcome, recorded under its expiry key
    as the reaper's move would have recorded it."""

    hold: Reservation
    outcome: Outcome


def line_reservation_id(key: bytes, sku_id: str) -> str:
    """The reservation of an order's line: the order's key and the line's
    SKU (one line per SKU), so the same journal names the same lines."""
    return "rsv_" + hashlib.sha256(b"order line\x00" + key + sku_id.encode()).hexdigest()[:24]


class Inventory(Service):
    """The servicer of InventoryService. Its moves work on its own tables
    (holdfast.apps.inventory_store: the lower level of holdfast.framework),
    not on generic entities: a Reserve is the hot path."""

    DESCRIPTOR = SERVICE
    MACHINE = machine.INVENTORY
    tables = TABLES
    admin_methods = ("PutStock",)  # setting a SKU's total is the operator's, not a shop's
    workload = "holdfast.apps.inventory_workload:InventoryWorkload"
    verifier = "holdfast.apps.inventory_verify:InventoryVerifier"  # `holdfast verify`'s stock and reservation checks
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

        reclaimed: list[Reclaimed] = []  # what the move's last run reclaimed

        def apply(txn: Txn, now_ms: int) -> Outcome:
            reclaimed.clear()
            return _reserve(txn, rid, order_id, sku_id, quantity, now_ms, now_ms + hold_ms, reclaimed)

        outcome = await self._move(call, rid, apply, skus=(sku_id,))
        if reclaimed:
            self.reclaimed(reclaimed, outcome)
        return outcome

    def reclaimed(self, holds: Sequence[Reclaimed], outcome: Outcome) -> None:
        """Told, after a Reserve's move answered `outcome`, which expired
        holds its last run reclaimed. They committed with it when `outcome`
        is its own recorded answer (not a replay), may have when the store
        answered DEPENDENCY_UNAVAILABLE, and did not otherwise. Nothing to
        do here: the simulation's observer reports them as the reaper's
        answers (holdfast.apps.inventory_workload)."""

    async def Confirm(self, request: pb.ConfirmRequest, context) -> Outcome:
        if request.quantity < 0:
            return _invalid([("quantity", f"quantity must be zero (the whole hold) or more, got {request.quantity}")])
        rid, expected, quantity = request.reservation_id, request.expected_version, request.quantity

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _confirm(txn, rid, expected, quantity, now_ms)

        return await self._move(current_call(), rid, apply)

    async def Release(self, request: pb.ReleaseRequest, context) -> Outcome:
        violations = _reason_violations(request.reason)
        if violations:
            return _invalid(violations)
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

    async def ReserveOrder(self, request: pb.ReserveOrderRequest, context) -> Outcome:
        violations = [*_id_violations(request, "order_id"), *_line_violations(request.lines)]
        if request.timestamp_ms < 0:
            violations.append(("timestamp_ms", f"timestamp_ms must not be negative, got {request.timestamp_ms}"))
        if not 0 <= request.hold_ms <= self.holds.max_ms:
            violations.append(("hold_ms", f"hold_ms must be within 0..{self.holds.max_ms}, got {request.hold_ms}"))
        if violations:
            return _invalid(violations)
        call = current_call()
        oid = order_hold_id(call.key)
        hold_ms = request.hold_ms or self.holds.default_ms
        order_id = request.order_id
        lines = tuple((line.sku_id, line.quantity) for line in request.lines)
        line_ids = tuple(line_reservation_id(call.key, sku_id) for sku_id, _ in lines)

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _reserve_order(txn, oid, order_id, lines, line_ids, now_ms + hold_ms)

        prefetch = {STOCK.name: tuple(sorted(sku_id for sku_id, _ in lines)), RESERVATIONS.name: tuple(sorted(line_ids))}
        move = Move(call.contract.method, call.key, call.fingerprint, oid, apply, ORDER_HOLDS, prefetch)
        return await self.engine.move(move, call.deadline)

    async def ConfirmOrder(self, request: pb.ConfirmOrderRequest, context) -> Outcome:
        oid, expected = request.order_hold_id, request.expected_version

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _confirm_order(txn, oid, expected, now_ms)

        call = current_call()
        return await self._order_move(call.contract.method, call.key, call.fingerprint, oid, apply, call.deadline)

    async def ReleaseOrder(self, request: pb.ReleaseOrderRequest, context) -> Outcome:
        violations = _reason_violations(request.reason)
        if violations:
            return _invalid(violations)
        oid, why = request.order_hold_id, request.reason or "released"

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _release_order(txn, oid, why)

        call = current_call()
        return await self._order_move(call.contract.method, call.key, call.fingerprint, oid, apply, call.deadline)

    async def GetOrder(self, request: pb.GetOrderRequest, context) -> Outcome:
        if not request.order_hold_id:
            return _invalid([("order_hold_id", "order_hold_id must be set")])
        oid = request.order_hold_id

        def read(txn: Txn, now_ms: int) -> Outcome:
            found = order_hold(txn, oid)
            return _order_not_found(oid) if found is None else success(_order_reply(found, _lines(txn, found)))

        return await self.engine.read(read, current_call().deadline)

    async def _order_move(
        self, method: str, key: bytes, fingerprint: bytes, oid: str, apply, deadline: float | None = None
    ) -> Outcome:
        """A move on a whole order hold. Its lines are fixed when it is made,
        so a read before the move learns which reservation and stock rows it
        will lock, and the batch's prefetch locks them all, in key order, with
        the order hold: concurrent orders sharing SKUs never wait in a cycle."""

        def rows(txn: Txn, now_ms: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
            found = order_hold(txn, oid)
            if found is None:
                return (), ()
            lines = [reservation(txn, rid) for rid in found.lines]
            return found.lines, tuple(line.sku_id for line in lines if line is not None)

        named = await self.engine.read(rows, deadline)
        if isinstance(named, Outcome):
            return named
        line_ids, skus = named
        prefetch = {RESERVATIONS.name: tuple(sorted(line_ids)), STOCK.name: tuple(sorted(skus))} if line_ids else {}
        return await self.engine.move(Move(method, key, fingerprint, oid, apply, ORDER_HOLDS, prefetch), deadline)

    # -- timeout events, as ordinary moves ---------------------------------------

    # -- moves made by time and by recovery -------------------------------------

    async def reap(self, now_ms: int, batch: int) -> int:
        """Releases the holds due by `now_ms`, each by its own move; the lines
        of one order (due together) by one move of their order. Cleanup: a
        Reserve that needs a lone hold's stock reclaims it itself, under the
        same key, so how far behind the reaper is never changes an answer."""
        due = await self.engine.store.transact(lambda txn: due_holds(txn, now_ms, batch))
        lone = [hold for hold in due if not hold.order_hold_id]
        orders = {hold.order_hold_id: hold for hold in due if hold.order_hold_id}
        outcomes = await asyncio.gather(*(self.expire(hold) for hold in (*lone, *orders.values())))
        return sum(1 for outcome in outcomes if outcome.ok)

    async def expire(self, hold: Reservation) -> Outcome:
        """The reaper's move for one due hold: its order's, for a line of one
        (a line moves with its order, and has the order's version)."""
        return await self.timeout(hold.order_hold_id or hold.reservation_id, hold.version)

    async def timeout(self, entity_id: str, version: int) -> Outcome:
        """A hold's (or an order hold's) expiry, under its own idempotency
        key (the hold's id alone: a hold expires once, whatever its version).
        The move reads the hold in its transaction, so `version` only names
        what the reaper saw."""
        key = expiry_key(entity_id)
        if entity_id.startswith("ord_"):
            return await self._order_move(
                REAPER_METHOD, key, key, entity_id, lambda txn, now_ms: _expire_order(txn, entity_id, now_ms)
            )
        return await self.engine.move(
            Move(REAPER_METHOD, key, key, entity_id, lambda txn, now_ms: _expire(txn, entity_id, now_ms), RESERVATIONS)
        )

    def prune(self, txn: Txn, now_ms: int, before_ms: int, limit: int) -> list[tuple[Table[Any], str]]:
        """Settled holds and order holds, with what they sold kept per SKU.
        A hold the reaper expired has a record made after it settled (the
        reaper's, keyed by the hold alone): it is buried with the hold, so
        no record outlives its entity."""
        gone = prune_settled(txn, before_ms, limit)
        for _, key in gone:  # an order's line has no expiry record of its own: its burial writes nothing
            txn.bury_outcome(expiry_key(key), now_ms)
        return gone

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


def _reserve(
    txn: Txn, rid: str, order_id: str, sku_id: str, quantity: int, now_ms: int, expires_at_ms: int,
    reclaimed: list[Reclaimed],
) -> Outcome:
    existing = reservation(txn, rid)
    state = State.AVAILABLE if existing is None else existing.state
    version = 0 if existing is None else existing.version
    if machine.walk(state, machine.RESERVE) is None:
        return _invalid_transition(rid, state, "reserve")
    if not take_stock(txn, sku_id, quantity) and not _reclaim(txn, sku_id, quantity, now_ms, reclaimed):
        # The conditional update found no row to take from, and no expired
        # holds give enough back; only now is it worth a read to say which:
        # no such SKU, or too little of it.
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


def _reclaim(txn: Txn, sku_id: str, quantity: int, now_ms: int, reclaimed: list[Reclaimed]) -> bool:
    """Stock held by lone holds already expired at `now_ms` taken back, each
    hold released and recorded exactly as the reaper's expiry of it would
    be, until `quantity` units are available; then taken: True. False, with
    nothing changed, when the SKU has no stock or its oldest RECLAIM_MAX
    expired holds cannot give enough back. Which holds depends on the
    store and `now_ms` alone (the journal pins it): docs/reclaim.md."""
    found = stock(txn, sku_id)
    if found is None or quantity - found.available > found.held:
        return False  # not even every held unit back would be enough: nothing to look for
    holds = _reclaimable(txn, sku_id, quantity - found.available, now_ms)
    if not holds:
        return False
    for hold in holds:
        outcome = _expire(txn, hold.reservation_id, now_ms)
        assert outcome.ok, f"reclaiming {hold.reservation_id}, which its expiry refuses: {outcome.reason}"
        record_expiry(txn, expiry_key(hold.reservation_id), hold.reservation_id, outcome.payload, now_ms)
        reclaimed.append(Reclaimed(hold, outcome))
    taken = take_stock(txn, sku_id, quantity)
    assert taken, f"{sku_id} was given back enough for {quantity} units, and they cannot be taken"
    return True


def _reclaimable(txn: Txn, sku_id: str, short: int, now_ms: int) -> list[Reservation]:
    """The fewest of `sku_id`'s lone holds expired by `now_ms`, oldest expiry
    first (then by id), whose units make up `short`, each read (and locked)
    by the move; none when the first RECLAIM_MAX of them do not, since
    releasing those would not let the Reserve take its stock. The query
    reads the store while the move holds the SKU's stock row, which every
    move of a hold of the SKU must lock too, so what it finds stays so."""
    chosen: list[Reservation] = []
    units = 0
    for candidate in expired_holds(txn, sku_id, now_ms, RECLAIM_MAX):
        hold = reservation(txn, candidate.reservation_id)
        if hold is None or hold.order_hold_id or not _due(hold, now_ms):
            continue  # not what the query read: the move's own read decides
        if txn.recorded(expiry_key(hold.reservation_id)) is not None:
            continue  # its expiry was answered otherwise, and a key answers once
        chosen.append(hold)
        units += hold.quantity
        if units >= short:
            return chosen
    return []


def _confirm(txn: Txn, rid: str, expected_version: int, quantity: int, now_ms: int) -> Outcome:
    """`quantity` 0 sells the whole hold; fewer units than held sell those
    and return the rest to available, in the same write of the stock."""
    found = reservation(txn, rid)
    if found is None:
        return _reservation_not_found(rid)
    if found.order_hold_id:
        return _line_of_order(found, "confirm")
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
    if quantity > found.quantity:
        # The client's mistake, not the hold's state: nothing recorded, so
        # the same key may confirm a quantity that fits.
        return _invalid([("quantity", f"quantity {quantity} is more than the {found.quantity} units reservation {rid} holds")])
    # The confirmed quantity rides on the row into the settlement (0: all).
    return _settle(txn, replace(found, confirmed_quantity=quantity), State.CONFIRMED, sold=True, why="")


def _release(txn: Txn, rid: str, why: str) -> Outcome:
    found = reservation(txn, rid)
    if found is None:
        return _reservation_not_found(rid)
    if found.order_hold_id:
        return _line_of_order(found, "release")
    if found.state == State.RELEASED and found.release_reason == EXPIRED:
        return failure(Reason.HOLD_EXPIRED, f"the hold of reservation {rid} already expired", metadata={"reservation_id": rid})
    if machine.walk(found.state, machine.RELEASE) is None:
        return _invalid_transition(rid, found.state, "release")
    return _settle(txn, found, State.RELEASED, sold=False, why=why)


def _expire(txn: Txn, rid: str, now_ms: int) -> Outcome:
    found = reservation(txn, rid)
    if found is None:  # a replayed expiry on an instance that never had the hold
        return _reservation_not_found(rid)
    if found.order_hold_id:
        return _line_of_order(found, "expire")
    if not _due(found, now_ms):
        return _invalid_transition(rid, found.state, "expire")
    return _settle(txn, found, State.RELEASED, sold=False, why=EXPIRED)


def _due(found: Reservation, now_ms: int) -> bool:
    """Its expiry releases it at `now_ms`: the reaper's rule, and a reclaiming Reserve's."""
    return found.expires_at_ms <= now_ms and machine.walk(found.state, machine.EXPIRE) is not None


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
    why = "" if sold else found.release_reason or "recovered"
    return _settle(txn, found, target, sold=sold, why=why)


def _settle(txn: Txn, found: Reservation, target: State, sold: bool, why: str) -> Outcome:
    """The hold leaves: when `sold`, its `confirmed_quantity` sold (0: all)
    and the rest back to available; otherwise all back to available."""
    done = _settled(txn, found, target, sold, why, found.confirmed_quantity if sold else 0)
    return success(_reservation_reply(done))


def _settled(txn: Txn, found: Reservation, target: State, sold: bool, why: str, confirmed: int = 0) -> Reservation:
    assert 0 <= confirmed <= found.quantity
    split_stock(txn, found.sku_id, found.quantity, (confirmed or found.quantity) if sold else 0)
    done = replace(found, state=target, version=found.version + 1, release_reason=why,
                   confirmed_quantity=confirmed if sold else 0)
    save_reservation(txn, done, found.version)
    return done


# -- an order's moves: all its lines in one transaction, read in lock order --------


def _reserve_order(
    txn: Txn, oid: str, order_id: str, lines: tuple[tuple[str, int], ...], line_ids: tuple[str, ...], expires_at_ms: int
) -> Outcome:
    """Every line held, or none: each line's stock is checked before any is
    taken, so a refusal (the first failing line, in the request's order)
    changes nothing. Stock rows are read in SKU order, as the prefetch locks them."""
    existing = order_hold(txn, oid)
    state = State.AVAILABLE if existing is None else existing.state
    version = 0 if existing is None else existing.version
    if machine.walk(state, machine.RESERVE) is None:
        return _order_invalid_transition(oid, state, "reserve")
    found = {sku_id: stock(txn, sku_id) for sku_id in sorted(sku_id for sku_id, _ in lines)}
    for n, (sku_id, quantity) in enumerate(lines):
        row = found[sku_id]
        if row is None:
            shown = shown_id(sku_id)
            return failure(InventoryReason.SKU_NOT_FOUND, f"no stock is recorded for SKU {shown!r} (lines[{n}])",
                           metadata={"sku_id": shown, "line": str(n)})
        if row.available < quantity:
            return failure(
                InventoryReason.INSUFFICIENT_STOCK,
                f"{sku_id} has fewer than {quantity} units available (lines[{n}]); nothing of the order is held",
                metadata={"sku_id": sku_id, "quantity": str(quantity), "line": str(n)},
            )
    for sku_id, quantity in sorted(lines):
        taken = take_stock(txn, sku_id, quantity)
        assert taken, f"{sku_id} was checked to have {quantity} units available"
    held = [
        Reservation(rid, order_id, sku_id, quantity, State.RESERVED, version + 1, expires_at_ms, order_hold_id=oid)
        for (sku_id, quantity), rid in zip(lines, line_ids)
    ]
    for line in sorted(held, key=lambda line: line.reservation_id):
        save_reservation(txn, line, version)
    hold = OrderHold(oid, order_id, State.RESERVED, version + 1, expires_at_ms, ",".join(line_ids))
    save_order_hold(txn, hold, version)
    return success(_order_reply(hold, held))


def _confirm_order(txn: Txn, oid: str, expected_version: int, now_ms: int) -> Outcome:
    found = order_hold(txn, oid)
    if found is None:
        return _order_not_found(oid)
    if expected_version and expected_version != found.version:
        return failure(
            Reason.VERSION_CONFLICT,
            f"order hold {oid} is at version {found.version}, not the expected {expected_version}",
            metadata={"order_hold_id": oid, "version": str(found.version)},
        )
    if _order_expired(found, now_ms):
        return failure(Reason.HOLD_EXPIRED, f"the hold of order hold {oid} expired at {found.expires_at_ms} ms",
                       metadata={"order_hold_id": oid})
    if machine.walk(found.state, machine.CONFIRM) is None:
        return _order_invalid_transition(oid, found.state, "confirm")
    return _settle_order(txn, found, State.CONFIRMED, sold=True, why="")


def _release_order(txn: Txn, oid: str, why: str) -> Outcome:
    found = order_hold(txn, oid)
    if found is None:
        return _order_not_found(oid)
    if found.state == State.RELEASED and found.release_reason == EXPIRED:
        return failure(Reason.HOLD_EXPIRED, f"the hold of order hold {oid} already expired", metadata={"order_hold_id": oid})
    if machine.walk(found.state, machine.RELEASE) is None:
        return _order_invalid_transition(oid, found.state, "release")
    return _settle_order(txn, found, State.RELEASED, sold=False, why=why)


def _expire_order(txn: Txn, oid: str, now_ms: int) -> Outcome:
    found = order_hold(txn, oid)
    if found is None:  # a replayed expiry on an instance that never had the order
        return _order_not_found(oid)
    if found.expires_at_ms > now_ms or machine.walk(found.state, machine.EXPIRE) is None:
        return _order_invalid_transition(oid, found.state, "expire")
    return _settle_order(txn, found, State.RELEASED, sold=False, why=EXPIRED)


def _settle_order(txn: Txn, found: OrderHold, target: State, sold: bool, why: str) -> Outcome:
    """Every line leaves its hold: reservations in id order, then their
    stock in SKU order (the prefetch's lock order)."""
    lines = _lines(txn, found)
    done: dict[str, Reservation] = {}
    for line in sorted(lines, key=lambda line: line.sku_id):
        assert (line.state, line.version) == (found.state, found.version), f"line {line.reservation_id} left its order"
        done[line.reservation_id] = _settled(txn, line, target, sold, why)
    hold = replace(found, state=target, version=found.version + 1, release_reason=why)
    save_order_hold(txn, hold, found.version)
    return success(_order_reply(hold, [done[line.reservation_id] for line in lines]))


def _lines(txn: Txn, found: OrderHold) -> list[Reservation]:
    """The order's line reservations in the request's order, read in id order."""
    read = {rid: reservation(txn, rid) for rid in sorted(found.lines)}
    lines = [read[rid] for rid in found.lines]
    assert all(line is not None for line in lines), f"order hold {found.order_hold_id} lost a line"
    return [line for line in lines if line is not None]


def _order_expired(found: OrderHold, now_ms: int) -> bool:
    if found.state == State.RELEASED:
        return found.release_reason == EXPIRED
    return found.state == State.RESERVED and now_ms >= found.expires_at_ms


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


def _reservation_message(r: Reservation) -> pb.ReservationReply:
    """`confirmed_quantity` and `returned_quantity` are set only by a Confirm
    that named a quantity (0 is unset on the wire): every other reply's
    bytes are those it had before partial confirms."""
    return pb.ReservationReply(
        reservation_id=r.reservation_id,
        order_id=r.order_id,
        sku_id=r.sku_id,
        quantity=r.quantity,
        state=int(r.state),
        version=r.version,
        expires_at_ms=r.expires_at_ms,
        confirmed_quantity=r.confirmed_quantity,
        returned_quantity=r.quantity - r.confirmed_quantity if r.confirmed_quantity else 0,
    )


def _reservation_reply(r: Reservation) -> bytes:
    return _reservation_message(r).SerializeToString(deterministic=True)


def _order_reply(o: OrderHold, lines: list[Reservation]) -> bytes:
    return pb.OrderReply(
        order_hold_id=o.order_hold_id,
        order_id=o.order_id,
        state=int(o.state),
        version=o.version,
        expires_at_ms=o.expires_at_ms,
        lines=[_reservation_message(line) for line in lines],
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


def _reason_violations(reason: str) -> list[tuple[str, str]]:
    if len(reason) > REASON_LENGTH_MAX:
        return [("reason", f"reason must be at most {REASON_LENGTH_MAX} characters")]
    if any(ord(c) < 0x20 and c not in "\t\n" for c in reason):
        return [("reason", "reason must not contain control characters other than tab and newline")]
    return []


# An order's bad lines named one by one, at most this many violations; the
# rest are counted. One per bad line, unbounded, passes gRPC's 8 KiB metadata
# limit (the message and the BadRequest both carry them) and the client reads
# RESOURCE_EXHAUSTED instead of what is wrong with its request.
LINE_VIOLATIONS_SHOWN_MAX = 10


def _line_violations(lines) -> list[tuple[str, str]]:
    """An order's lines: at least one, at most LINES_MAX, each a SKU and a
    positive quantity, one line per SKU. Two lines of one SKU are refused,
    not merged: a client that sends them has a bug the server must not hide
    (the second line names the first)."""
    if not lines:
        return [("lines", "an order must have at least one line")]
    if len(lines) > LINES_MAX:
        return [("lines", f"an order may have at most {LINES_MAX} lines, got {len(lines)}")]
    return _first_bad_lines(_bad_lines(lines), LINE_VIOLATIONS_SHOWN_MAX)


def _bad_lines(lines) -> list[list[tuple[str, str]]]:
    """The violations of each line that has any, in the request's order."""
    first: dict[str, int] = {}
    found = [_one_line_violations(n, line, first) for n, line in enumerate(lines)]
    return [violations for violations in found if violations]


def _one_line_violations(n: int, line, first: dict[str, int]) -> list[tuple[str, str]]:
    """Line `n`'s violations; `first` maps each SKU seen so far to its first
    line, so a repeat names it."""
    name = f"lines[{n}].sku_id"
    violations: list[tuple[str, str]] = []
    if not line.sku_id:
        violations.append((name, f"{name} must be set"))
    elif len(line.sku_id) > ID_LENGTH_MAX:
        violations.append((name, f"{name} must be at most {ID_LENGTH_MAX} characters, got {len(line.sku_id)}"))
    elif _CONTROL.search(line.sku_id):
        violations.append((name, f"{name} must not contain control characters"))
    elif line.sku_id in first:
        violations.append((name, f"{name} repeats the SKU of lines[{first[line.sku_id]}]: one line per SKU"))
    else:
        first[line.sku_id] = n
    if line.quantity <= 0:
        violations.append((f"lines[{n}].quantity", f"lines[{n}].quantity must be positive, got {line.quantity}"))
    return violations


def _first_bad_lines(bad_lines: list[list[tuple[str, str]]], shown_max: int) -> list[tuple[str, str]]:
    """Whole bad lines' violations while at most `shown_max` of them are
    named, then one violation of `lines` counting the bad lines left: the
    answer stays small enough to reach the client whatever the order holds,
    and a line is never half named."""
    shown: list[tuple[str, str]] = []
    for n, violations in enumerate(bad_lines):
        if len(shown) + len(violations) > shown_max:
            more = len(bad_lines) - n
            return [*shown, ("lines", f"and {more} more {'line is' if more == 1 else 'lines are'} invalid")]
        shown.extend(violations)
    return shown


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


def _order_not_found(oid: str) -> Outcome:
    """An order hold is a reservation of several lines: its unknown id is
    RESERVATION_NOT_FOUND, named as the request names it."""
    shown = shown_id(oid)
    return failure(InventoryReason.RESERVATION_NOT_FOUND, f"no order hold {shown!r}", metadata={"order_hold_id": shown})


def _order_invalid_transition(oid: str, state: State, what: str) -> Outcome:
    return failure(
        Reason.INVALID_TRANSITION,
        f"cannot {what} order hold {oid} in state {state.name}",
        metadata={"order_hold_id": oid, "state": state.name},
    )


def _line_of_order(found: Reservation, what: str) -> Outcome:
    """A line moves only with its order: moving one alone would leave the
    order half confirmed, which it promises never to be."""
    return failure(
        Reason.INVALID_TRANSITION,
        f"cannot {what} reservation {found.reservation_id} alone: it is a line of order hold {found.order_hold_id}",
        metadata={"reservation_id": found.reservation_id, "state": found.state.name, "order_hold_id": found.order_hold_id},
    )
