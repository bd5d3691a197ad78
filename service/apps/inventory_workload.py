"""Inventory's workload for `holdfast simulate` (holdfast.workload): a
client of six SKUs that stocks, reserves, confirms (the whole hold or part
of it) and releases, holds multi-line orders over overlapping SKUs and
confirms or releases them whole, with reads, unknown ids, bad input and
reused keys among them; and `StockAuditor`, the model of stock, holds and
order holds every answer and row is checked against.

The books must satisfy, at every step: each SKU's `available + held + sold
== total`, none of them negative (never oversold), `held` equal to the
quantities of its RESERVED holds and `sold` to what its CONFIRMED holds
sold (a partial confirm sells its `confirmed_quantity`, the rest of the
hold went back to available); a version (of a hold, an order hold or of
stock) never goes back; no hold rests in an intent (recovery settles what a
crash left); an order hold's lines exist exactly while it does, each a line
of it, in its state and at its version (an order holds every line or none,
and its lines move together); and, where no key is pending, stock, holds
and order holds are exactly what the answers say. A refusal the model says
is wrong (stock refused that is there, a hold confirmed after it expired)
is as much a violation as an oversale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.apps.inventory import (
    LINES_MAX,
    RECLAIM_MAX,
    RECOVERY_METHOD,
    Holds,
    Inventory,
    InventoryReason,
    Reclaimed,
    expiry_key,
    line_reservation_id,
    order_hold_id,
    reservation_id,
)
from holdfast.auditor import TRANSIENT, Auditor, Books, Kind, Request, require
from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.call import current_call, idempotency_key, serving
from holdfast.apps.inventory_machine import INTENTS, State
from holdfast.memory import Changes, MemTxn, Rows
from holdfast.outcome import AnyReason, Outcome, Reason
from holdfast.apps.inventory_store import (
    ORDER_HOLDS,
    RESERVATIONS,
    STOCK,
    TABLES,
    OrderHold,
    Reservation,
    Stock,
    save_reservation,
)
from holdfast.workload import Client, Seen, call_of, contracts_of

CONTRACTS = contracts_of(Inventory)
SKUS = tuple(f"sku-{n}" for n in range(6))
# The states a successful move of each kind may leave its reservation in
# (recovery drives an intent forward or back: machine.RECOVERY).
SETTLES_TO = {
    "Reserve": {State.RESERVED},
    "Confirm": {State.CONFIRMED},
    "Release": {State.RELEASED},
    "Expire": {State.RELEASED},
    "Recover": {State.AVAILABLE, State.CONFIRMED, State.RELEASED},
    "ReserveOrder": {State.RESERVED},
    "ConfirmOrder": {State.CONFIRMED},
    "ReleaseOrder": {State.RELEASED},
    "ExpireOrder": {State.RELEASED},
}
ORDER_METHODS = frozenset({"ReserveOrder", "ConfirmOrder", "ReleaseOrder", "ExpireOrder"})


@dataclass(frozen=True, slots=True)
class StockRequest(Request):
    """A request of inventory's: the SKU and the reservation it may touch
    (None: none); for an order's, the order hold and its lines, as
    (reservation id, SKU, quantity) in the request's order."""

    sku: str | None = None
    rid: str | None = None
    oid: str | None = None
    lines: tuple[tuple[str, str, int], ...] = ()


# -- the workload -------------------------------------------------------------------------


class InventoryWorkload:
    """The client and the auditor of InventoryService."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.rng = client.rng
        self.clock = client.clock
        self.auditor = StockAuditor()
        self.inventory: Inventory | None = None
        self._orders = 0
        self._sku_of: dict[str, str | None] = {}  # reservation id -> the SKU its Reserve named
        self._reserves: list[str] = []  # every reservation id a Reserve named, in order
        self._order_holds: list[str] = []  # every order hold id a ReserveOrder named, in order
        # order hold id -> its lines (reservation id, SKU, quantity), as its ReserveOrder named them
        self._lines_of: dict[str, tuple[tuple[str, str, int], ...]] = {}
        self._decided: dict[tuple[str, str], StockRequest] = {}

    def host(self, engine: Engine, seen: Seen) -> Sequence[Service]:
        self.inventory = _ObservedInventory(engine, seen, self._lines_of, self.auditor.reclaims)
        return (self.inventory,)

    async def call(self, request: Request) -> Outcome:
        assert self.inventory is not None, "hosted before it is called"
        if request.method in ("Expire", "ExpireOrder"):
            return await self.inventory.expire(request.subject)
        with serving(request.call):
            return await getattr(self.inventory, request.method)(request.message, None)

    def tear(self, rows: Rows) -> Changes:
        """A RESERVED hold whose state the answers fix exactly is left CONFIRMING
        or RELEASING (stock still held, as the intent's contract says). Not a
        line of an order: an order's moves write no intents, they move every
        line in one transaction."""
        uncertain = self.auditor.uncertain()
        candidates = sorted(rid for rid in self.auditor.reserved if rid not in uncertain and rid not in self.auditor.lines)
        if not candidates:
            return Changes()
        found = rows.of(RESERVATIONS)[self.rng.choice(candidates)]
        intent = self.rng.choice((State.CONFIRMING, State.RELEASING))
        txn = MemTxn(rows, TABLES)
        save_reservation(txn, replace(found, state=intent, version=found.version + 1), found.version)
        return txn.commit()

    # -- requests, built as a client would ---------------------------------------------

    def build(self, method: str, message: object) -> StockRequest:
        """A request with the gateway's key and fingerprint, and what it may touch."""
        call = call_of(CONTRACTS[method], message)
        if method in ORDER_METHODS or method == "GetOrder":
            return self._build_order(method, message, call)
        sku = getattr(message, "sku_id", None) or None
        rid = getattr(message, "reservation_id", None) or None
        if method == "Reserve":
            rid = reservation_id(call.key)
        elif rid is not None:
            sku = self._sku_of.get(rid)
        if method == "Reserve" and rid not in self._sku_of:
            self._sku_of[rid] = sku
            self._reserves.append(rid)
        touches = tuple(row for row in (rid, sku) if row is not None)
        return StockRequest(method, message, call.key, call.fingerprint, touches, call=call, sku=sku, rid=rid)

    def _build_order(self, method: str, message, call) -> StockRequest:
        """An order's request touches its order hold, every line's reservation and every line's SKU."""
        if method == "ReserveOrder":
            oid = order_hold_id(call.key)
            lines = tuple((line_reservation_id(call.key, line.sku_id), line.sku_id, line.quantity) for line in message.lines)
            if oid not in self._lines_of:
                self._lines_of[oid] = lines
                if 0 < len(lines) <= LINES_MAX:  # one the client may later confirm, release or read
                    self._order_holds.append(oid)
                for rid, sku_id, _ in lines:
                    self._sku_of.setdefault(rid, sku_id)
        else:
            oid = message.order_hold_id
            lines = self._lines_of.get(oid, ())
        return StockRequest(method, message, call.key, call.fingerprint, _order_touches(oid, lines), call=call, oid=oid, lines=lines)

    def put_stock(self, sku_id: str, total: int) -> StockRequest:
        self._orders += 1
        return self.build("PutStock", pb.PutStockRequest(sku_id=sku_id, total=total, request_id=f"put-{self._orders}"))

    def reserve(self, sku_id: str, quantity: int, hold_ms: int = 0) -> StockRequest:
        self._orders += 1
        message = pb.ReserveRequest(
            order_id=f"ord-{self._orders}", sku_id=sku_id, quantity=quantity, timestamp_ms=self.clock.now_ms(), hold_ms=hold_ms
        )
        return self.build("Reserve", message)

    def confirm(self, rid: str, expected_version: int = 0, quantity: int = 0) -> StockRequest:
        return self.build("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=expected_version, quantity=quantity))

    def release(self, rid: str, reason: str = "") -> StockRequest:
        return self.build("Release", pb.ReleaseRequest(reservation_id=rid, reason=reason))

    def reserve_order(self, lines: Sequence[tuple[str, int]], hold_ms: int = 0) -> StockRequest:
        self._orders += 1
        message = pb.ReserveOrderRequest(
            order_id=f"ord-{self._orders}", lines=[pb.OrderLine(sku_id=s, quantity=q) for s, q in lines],
            timestamp_ms=self.clock.now_ms(), hold_ms=hold_ms,
        )
        return self.build("ReserveOrder", message)

    def confirm_order(self, oid: str, expected_version: int = 0) -> StockRequest:
        return self.build("ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=oid, expected_version=expected_version))

    def release_order(self, oid: str, reason: str = "") -> StockRequest:
        return self.build("ReleaseOrder", pb.ReleaseOrderRequest(order_hold_id=oid, reason=reason))

    # -- the seeded client ---------------------------------------------------------------

    def request(self) -> StockRequest:
        rng = self.rng
        roll = rng.random()
        known = sorted(rid for rid in self.auditor.reserved if rid not in self.auditor.lines)
        orders = sorted(self.auditor.reserved_orders)
        if roll < 0.10 or not self.auditor.skus:
            sku_id = rng.choice(SKUS)
            held = self.auditor.skus.get(sku_id)
            floor = 0 if held is None else held.held + held.sold
            return self.put_stock(sku_id, max(0, floor + rng.randrange(-3, 40)))
        if roll < 0.40:
            return self.reserve(rng.choice(SKUS), rng.choice((1, 1, 2, 3, 5, 8)), self._hold_ms())
        if roll < 0.52:
            return self.reserve_order(self._order_lines(), self._hold_ms())
        if roll < 0.66 and known:
            rid = rng.choice(known)
            return self._once(("Confirm", rid), lambda: self.confirm(rid, self._expected(rid), self._quantity(rid)))
        if roll < 0.76 and known:
            rid = rng.choice(known)
            return self._once(("Release", rid), lambda: self.release(rid, rng.choice(("", "customer cancelled"))))
        if roll < 0.87 and orders:
            oid = rng.choice(orders)
            if rng.random() < 0.6:
                return self._once(("ConfirmOrder", oid), lambda: self.confirm_order(oid, self._expected_order(oid)))
            return self._once(("ReleaseOrder", oid), lambda: self.release_order(oid, rng.choice(("", "cart emptied"))))
        return self._odd_request()

    def _hold_ms(self) -> int:
        return self.rng.choice((0, 0, 500, 5_000, 30_000, 120_000))

    def _order_lines(self) -> list[tuple[str, int]]:
        """One to four lines over the first four SKUs (so orders overlap each
        other and lone holds); now and then a SKU twice (refused), or a line
        no stock can give."""
        rng = self.rng
        lines = [(sku, rng.choice((1, 1, 2, 3, 5))) for sku in rng.sample(SKUS[:4], rng.randint(1, 4))]
        roll = rng.random()
        if roll < 0.05:
            lines.append((lines[0][0], 1))  # the same SKU twice: INVALID_REQUEST, nothing held
        elif roll < 0.08:
            lines.insert(rng.randrange(len(lines) + 1), (rng.choice(SKUS), 2**40))  # never there: INSUFFICIENT_STOCK
        return lines

    def _quantity(self, rid: str) -> int:
        """The units a Confirm names: mostly 0 (the whole hold), often part of
        it, sometimes exactly all of it, now and then more than it has."""
        held = self.auditor.holds.get(rid)
        quantity = held.quantity if held is not None else 1
        roll = self.rng.random()
        if roll < 0.55:
            return 0
        if roll < 0.85 and quantity > 1:
            return self.rng.randrange(1, quantity)
        if roll < 0.95:
            return quantity
        return quantity + self.rng.randint(1, 3)

    def _once(self, what: tuple[str, str], build: Callable[[], StockRequest]) -> StockRequest:
        """A client's Confirm (or Release) of a reservation is one request, sent
        again as it is: two payloads under one unresolved key could never be told apart."""
        request = self._decided.get(what)
        if request is None:
            request = self._decided[what] = build()
        return request

    def _expected(self, rid: str) -> int:
        held = self.auditor.holds.get(rid)
        return held.version if held is not None and self.rng.random() < 0.3 else 0

    def _expected_order(self, oid: str) -> int:
        found = self.auditor.orders.get(oid)
        return found.version if found is not None and self.rng.random() < 0.3 else 0

    def _odd_request(self) -> StockRequest:
        """Reads, unknown ids, bad input, a line moved alone, a key reused with another payload."""
        rng = self.rng
        roll = rng.random()
        rids = self._reserves
        if roll < 0.2:
            return self.build("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS + ("sku-unknown",))))
        if roll < 0.35 and rids:
            return self.build("GetReservation", pb.GetReservationRequest(reservation_id=rng.choice(rids)))
        if roll < 0.45 and self._order_holds:
            return self.build("GetOrder", pb.GetOrderRequest(order_hold_id=rng.choice(self._order_holds)))
        if roll < 0.5:
            return self.confirm("rsv_" + "0" * 24)
        if roll < 0.55:
            return self.confirm_order("ord_" + "0" * 24)
        if roll < 0.6:
            return self.reserve(rng.choice(SKUS), -1)
        if roll < 0.65:
            return self.reserve_order(rng.choice(([], [(SKUS[0], 0)], [(f"s{n}", 1) for n in range(LINES_MAX + 1)])))
        if roll < 0.7 and self._order_holds:
            lines = self._lines_of[rng.choice(self._order_holds)]
            rid = rng.choice(lines)[0]  # a line alone: INVALID_TRANSITION whatever its order's state
            if rng.random() < 0.5:
                return self._once(("Release", rid), lambda: self.release(rid))
            return self._once(("Confirm", rid), lambda: self.confirm(rid, quantity=rng.choice((0, 1))))
        sent = self.client.sent
        if roll < 0.8 and rids:
            reused = self.release(rng.choice(rids), "again")
        else:
            reused = self._reuse(rng.choice(sent)) if sent else None
        if reused is not None and self.auditor.condition(reused.key) is Kind.RECORDED:
            return reused  # only a recorded key is reused: an unresolved one would stay ambiguous forever
        return self.build("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS)))

    def _reuse(self, sent: Request) -> StockRequest | None:
        """The same key with another payload: another quantity, of a hold, a
        confirm or a line, or another reason."""
        if sent.method == "Reserve":
            other = pb.ReserveRequest()
            other.CopyFrom(sent.message)
            other.quantity += 1
        elif sent.method == "Confirm":
            other = pb.ConfirmRequest()
            other.CopyFrom(sent.message)
            other.quantity += 1
        elif sent.method == "ReserveOrder" and sent.message.lines:
            other = pb.ReserveOrderRequest()
            other.CopyFrom(sent.message)
            other.lines[-1].quantity += 1
        elif sent.method == "ReleaseOrder":
            other = pb.ReleaseOrderRequest()
            other.CopyFrom(sent.message)
            other.reason += " again"
        else:
            return None
        return self.build(sent.method, other)


def _order_touches(oid: str, lines: Iterable[tuple[str, str, int]]) -> tuple[str, ...]:
    lines = tuple(lines)
    return (oid, *dict.fromkeys(rid for rid, _, _ in lines), *dict.fromkeys(sku for _, sku, _ in lines))


# The expiries a Reserve reclaimed, by the Reserve's key, each as the
# reaper's request and the answer it stands for: the auditor takes them in
# just before the Reserve's own answer, whether or not the client heard it.
Reclaims = dict[bytes, list[tuple[StockRequest, Outcome]]]


class _ObservedInventory(Inventory):
    """The real servicer, with the reaper's answers (expiry, recovery) reported
    to the simulation: they change reservations as much as a client's moves do.
    A line's expiry is its order's, one move under the order hold's key. The
    holds a Reserve reclaims expire in its move, under the reaper's keys:
    they go to the auditor with the Reserve's answer (`reclaims`)."""

    def __init__(
        self, engine: Engine, seen: Seen, lines_of: dict[str, tuple[tuple[str, str, int], ...]], reclaims: Reclaims
    ) -> None:
        super().__init__(engine, Holds())
        self._seen = seen
        self._lines_of = lines_of
        self._reclaims = reclaims

    def reclaimed(self, holds: Sequence[Reclaimed], outcome: Outcome) -> None:
        """Each reclaimed hold's expiry, answered as it committed: with its
        own outcome when the Reserve's did, with the Reserve's transient
        answer when that may have (its key pending until a retry of the
        expiry tells), not at all when the run's writes were undone."""
        if outcome.recorded and not outcome.replayed:
            answers = [(_background("Expire", expiry_key(r.hold.reservation_id), r.hold), r.outcome) for r in holds]
        elif outcome.reason in TRANSIENT:
            answers = [(_background("Expire", expiry_key(r.hold.reservation_id), r.hold), outcome) for r in holds]
        else:
            return
        self._reclaims.setdefault(current_call().key, []).extend(answers)

    async def expire(self, hold: Reservation) -> Outcome:
        outcome = await super().expire(hold)
        if hold.order_hold_id:
            oid = hold.order_hold_id
            key = expiry_key(oid)
            lines = self._lines_of.get(oid, ())
            self._seen(StockRequest("ExpireOrder", None, key, key, _order_touches(oid, lines), hold, oid=oid, lines=lines), outcome)
            return outcome
        key = expiry_key(hold.reservation_id)
        self._seen(_background("Expire", key, hold), outcome)
        return outcome

    async def recover_intent(self, intent: Reservation) -> Outcome:
        outcome = await super().recover_intent(intent)
        key = idempotency_key(RECOVERY_METHOD, (intent.reservation_id, intent.state.name, intent.retry_count))
        self._seen(_background("Recover", key, intent), outcome)
        return outcome


def _background(method: str, key: bytes, hold: Reservation) -> StockRequest:
    return StockRequest(method, None, key, key, (hold.reservation_id, hold.sku_id), hold, sku=hold.sku_id, rid=hold.reservation_id)


# -- the books: inventory's own tables as the simulation's store committed them -----------


def stock_of(books: Books, sku_id: str) -> Stock | None:
    return books.rows.of(STOCK).get(sku_id)


def reservation_of(books: Books, reservation_id: str) -> Reservation | None:
    return books.rows.of(RESERVATIONS).get(reservation_id)


def all_stock(books: Books) -> Iterable[Stock]:
    return books.rows.of(STOCK).values()


def all_reservations(books: Books) -> Iterable[Reservation]:
    return books.rows.of(RESERVATIONS).values()


def order_hold_of(books: Books, order_hold_id: str) -> OrderHold | None:
    return books.rows.of(ORDER_HOLDS).get(order_hold_id)


def all_order_holds(books: Books) -> Iterable[OrderHold]:
    return books.rows.of(ORDER_HOLDS).values()


# -- the auditor ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Held:
    """The model's reservation: its latest known state and version."""

    sku_id: str
    quantity: int
    state: State
    version: int
    expires_at_ms: int
    expired: bool  # released by the reaper, not the client
    confirmed: int = 0  # the units a partial confirm sold (0: the whole hold, when CONFIRMED)

    def sold(self) -> int:
        return (self.confirmed or self.quantity) if self.state is State.CONFIRMED else 0


@dataclass(slots=True)
class _Order:
    """The model's order hold: its lines (reservation ids, in the request's
    order), its latest known state and version, which are every line's."""

    order_id: str
    lines: tuple[str, ...]
    state: State
    version: int
    expires_at_ms: int
    expired: bool


@dataclass(slots=True)
class _Sku:
    total: int = 0
    total_version: int = 0  # the stock version of the PutStock answer `total` came from
    held: int = 0
    sold: int = 0


@dataclass
class StockAuditor(Auditor):
    """Stock, holds and order holds as the answers say they are."""

    skus: dict[str, _Sku] = field(default_factory=dict)
    holds: dict[str, _Held] = field(default_factory=dict)
    orders: dict[str, _Order] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)  # reservation id of an order's line -> its order hold
    # Highest version seen per entity (a hold or an order hold): in fresh answers, and in the store.
    fresh_versions: dict[str, int] = field(default_factory=dict)
    store_versions: dict[str, int] = field(default_factory=dict)
    stock_versions: dict[str, int] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)  # the model's RESERVED holds (an order's lines among them)
    reserved_orders: set[str] = field(default_factory=set)  # the model's RESERVED order holds
    reclaims: Reclaims = field(default_factory=dict)  # filled by _ObservedInventory, taken in by `answered`
    # Expiries answered since the last check, (key, hold, reply): the store
    # must hold each one's record as the reaper's move makes it, whoever
    # expired the hold (the reaper, or a Reserve that reclaimed it).
    expiries: list[tuple[bytes, str, bytes]] = field(default_factory=list)

    READS = frozenset({"GetStock", "GetReservation", "GetOrder"})

    # -- answers ---------------------------------------------------------------------

    def answered(self, request: Request, outcome: Outcome | None) -> None:
        """A Reserve's reclaimed expiries happened in its move, before it
        took its stock: they are taken in first, as the reaper's answers."""
        for expiry, answer in self.reclaims.pop(request.key, ()):
            super().answered(expiry, answer)
        super().answered(request, outcome)

    def predict(self, request: StockRequest) -> set[AnyReason | None] | None:
        message = request.message
        if request.method == "PutStock":
            sku = self.skus.get(request.sku)
            committed = 0 if sku is None else sku.held + sku.sold
            return {None} if message.total >= committed else {InventoryReason.STOCK_BELOW_COMMITTED}
        if request.method == "Reserve":
            if message.quantity <= 0:
                return {Reason.INVALID_REQUEST}
            return self._reserve_answers(request.sku, message.quantity)
        if request.method == "ReserveOrder":
            return {self._order_refused(message)}
        if request.method in ("Confirm", "Release"):
            held = self.holds.get(request.rid)
            if held is None:
                return {InventoryReason.RESERVATION_NOT_FOUND}
            # A snapshot behind the store (a commit that failed after applying)
            # makes any move on the reservation compensate first.
            if request.rid in self.lines:
                return {Reason.VERSION_CONFLICT, Reason.INVALID_TRANSITION}  # a line never moves alone
            release = request.method == "Release"
            allowed = _settles(held, release, 0 if release else message.expected_version, self.now_window_ms)
            if not release and message.quantity > held.quantity and None in allowed:
                # More than the hold has: the client's mistake, answered after the hold's state.
                allowed = (allowed - {None}) | {Reason.INVALID_REQUEST}
            return {Reason.VERSION_CONFLICT} | allowed
        if request.method in ("ConfirmOrder", "ReleaseOrder"):
            found = self.orders.get(request.oid)
            if found is None:
                return {InventoryReason.RESERVATION_NOT_FOUND}
            release = request.method == "ReleaseOrder"
            expected = 0 if release else message.expected_version
            return {Reason.VERSION_CONFLICT} | _settles(found, release, expected, self.now_window_ms)
        return None

    def _short_of(self, sku_id: str, quantity: int) -> AnyReason | None:
        """Why `quantity` units of `sku_id` cannot be held now (None: they can)."""
        sku = self.skus.get(sku_id)
        if sku is None or sku.total_version == 0:
            return InventoryReason.SKU_NOT_FOUND
        return None if sku.total - sku.held - sku.sold >= quantity else InventoryReason.INSUFFICIENT_STOCK

    def _reserve_answers(self, sku_id: str, quantity: int) -> set[AnyReason | None]:
        """A Reserve holds its units, reclaiming what it must (docs/reclaim.md):
        refused INSUFFICIENT_STOCK only when the oldest RECLAIM_MAX lone holds
        expired by its time cannot make up the shortfall. Its time is within
        `now_window_ms`: a hold expiring inside the window may or may not count."""
        short = self._short_of(sku_id, quantity)
        if short is not InventoryReason.INSUFFICIENT_STOCK:
            return {short}
        sku = self.skus[sku_id]
        missing = quantity - (sku.total - sku.held - sku.sold)
        earliest_ms, latest_ms = self.now_window_ms
        expired = sorted((self.holds[rid].expires_at_ms, rid) for rid in self.reserved
                         if rid not in self.lines and self.holds[rid].sku_id == sku_id and self.holds[rid].expires_at_ms <= latest_ms)
        units = 0
        for expires_at_ms, rid in expired[:RECLAIM_MAX]:
            units += self.holds[rid].quantity
            if units >= missing:
                return {None} if expires_at_ms <= earliest_ms else {None, InventoryReason.INSUFFICIENT_STOCK}
        return {InventoryReason.INSUFFICIENT_STOCK}

    def _order_refused(self, message: pb.ReserveOrderRequest) -> AnyReason | None:
        """An order is held whole or refused for its first line that cannot be."""
        lines = message.lines
        skus = [line.sku_id for line in lines]
        if not lines or len(lines) > LINES_MAX or len(set(skus)) < len(skus) or any(not s for s in skus) \
                or any(line.quantity <= 0 for line in lines):
            return Reason.INVALID_REQUEST
        for line in lines:
            short = self._short_of(line.sku_id, line.quantity)
            if short is not None:
                return short
        return None

    def apply(self, request: StockRequest, outcome: Outcome) -> None:
        if not outcome.ok:
            return  # inventory's recorded refusals change nothing
        if request.method == "PutStock":
            reply = pb.StockReply.FromString(outcome.payload)
            _check_reply(reply)
            require(reply.sku_id == request.sku and reply.total == request.message.total, f"PutStock answered {reply}")
            sku = self.skus.setdefault(reply.sku_id, _Sku())
            if reply.version > sku.total_version:
                sku.total, sku.total_version = reply.total, reply.version
            return
        if request.method in ORDER_METHODS:
            self._apply_order(request, outcome)
            return
        reply = pb.ReservationReply.FromString(outcome.payload)
        state = State(reply.state)
        require(reply.reservation_id == request.rid and reply.sku_id == request.sku, f"{request.method} answered for {reply.reservation_id}")
        require(state in SETTLES_TO[request.method], f"{request.method} of {request.rid} left it {state.name}")
        if request.method == "Confirm":
            asked = request.message.quantity
            require((reply.confirmed_quantity, reply.returned_quantity) == (asked, reply.quantity - asked if asked else 0),
                    lambda: f"Confirm of {asked} of {request.rid} answered {reply}")
        self._fresh(request.rid, reply.version, outcome)
        self._settle(request.rid, reply, request.method == "Expire")
        if request.method == "Expire":
            self.expiries.append((request.key, reply.reservation_id, outcome.payload))

    def _apply_order(self, request: StockRequest, outcome: Outcome) -> None:
        """An order's move answered: the order hold and every line, in one state and version."""
        reply = pb.OrderReply.FromString(outcome.payload)
        state = State(reply.state)
        oid = request.oid
        require(reply.order_hold_id == oid, f"{request.method} of {oid} answered for {reply.order_hold_id}")
        require(state in SETTLES_TO[request.method], f"{request.method} of {oid} left it {state.name}")
        answered = tuple((line.reservation_id, line.sku_id, line.quantity) for line in reply.lines)
        require(answered == request.lines, lambda: f"{request.method} of {oid} answered lines {answered}, the order has {request.lines}")
        for line in reply.lines:
            require((line.state, line.version, line.order_id, line.expires_at_ms) == (reply.state, reply.version, reply.order_id, reply.expires_at_ms)
                    and not line.confirmed_quantity and not line.returned_quantity,
                    lambda: f"{request.method} of {oid}: line {line.reservation_id} is not where its order is: {line} vs {reply}")
        self._fresh(oid, reply.version, outcome)
        self._settle_order(oid, reply, request.method == "ExpireOrder")

    def _fresh(self, entity_id: str, version: int, outcome: Outcome) -> None:
        if not outcome.replayed:
            last = self.fresh_versions.get(entity_id, 0)
            require(version > last, f"{entity_id}: version went from {last} to {version}")
            self.fresh_versions[entity_id] = version

    def _settle(self, rid: str, reply: pb.ReservationReply, expired: bool) -> None:
        """Moves the model's reservation to `state` unless it already knows a later version."""
        held = self.holds.get(rid)
        if held is not None and held.version >= reply.version:
            return
        state = State(reply.state)
        sku = self.skus.setdefault(reply.sku_id, _Sku())
        if held is not None:
            _count(sku, held, -1)
        held = self.holds[rid] = _Held(reply.sku_id, reply.quantity, state, reply.version, reply.expires_at_ms, expired,
                                       reply.confirmed_quantity)
        _count(sku, held, +1)
        (self.reserved.add if state is State.RESERVED else self.reserved.discard)(rid)

    def _settle_order(self, oid: str, reply: pb.OrderReply, expired: bool) -> None:
        """The order hold and all its lines move together, unless a later version is known."""
        found = self.orders.get(oid)
        if found is not None and found.version >= reply.version:
            return
        for line in reply.lines:
            self.lines[line.reservation_id] = oid
            self._settle(line.reservation_id, line, expired)
        state = State(reply.state)
        lines = tuple(line.reservation_id for line in reply.lines)
        self.orders[oid] = _Order(reply.order_id, lines, state, reply.version, reply.expires_at_ms, expired)
        (self.reserved_orders.add if state is State.RESERVED else self.reserved_orders.discard)(oid)

    def read(self, request: StockRequest, outcome: Outcome | None) -> None:
        if outcome is None or outcome.reason in TRANSIENT:
            return
        if request.method == "GetStock":
            self._read_stock(request.sku, outcome)
        elif request.method == "GetOrder":
            self._read_order(request, outcome)
        elif request.rid not in self.uncertain():
            held = self.holds.get(request.rid)
            if held is None:
                require(outcome.reason is InventoryReason.RESERVATION_NOT_FOUND, f"GetReservation of unknown {request.rid}: {outcome.reason}")
            else:
                require(outcome.ok, f"GetReservation of {request.rid} answered {outcome.reason}")
                reply = pb.ReservationReply.FromString(outcome.payload)
                require((State(reply.state), reply.version, reply.confirmed_quantity) == (held.state, held.version, held.confirmed),
                        f"GetReservation of {request.rid}: {reply} vs {held}")

    def _read_order(self, request: StockRequest, outcome: Outcome) -> None:
        if outcome.ok:
            reply = pb.OrderReply.FromString(outcome.payload)
            require(all((line.state, line.version) == (reply.state, reply.version) for line in reply.lines),
                    f"GetOrder of {request.oid}: its lines are not where it is: {reply}")
        if not self.uncertain().isdisjoint(request.touches):
            return
        found = self.orders.get(request.oid)
        if found is None:
            require(outcome.reason is InventoryReason.RESERVATION_NOT_FOUND, f"GetOrder of unknown {request.oid}: {outcome.reason}")
            return
        require(outcome.ok, f"GetOrder of {request.oid} answered {outcome.reason}")
        seen = (State(reply.state), reply.version, tuple(line.reservation_id for line in reply.lines))
        require(seen == (found.state, found.version, found.lines), f"GetOrder of {request.oid}: {reply} vs {found}")

    def _read_stock(self, sku_id: str, outcome: Outcome) -> None:
        if outcome.ok:
            _check_reply(pb.StockReply.FromString(outcome.payload))
        if sku_id in self.uncertain():
            return
        sku = self.skus.get(sku_id)
        if sku is None or sku.total_version == 0:
            require(outcome.reason is InventoryReason.SKU_NOT_FOUND, f"GetStock of unknown {sku_id}: {outcome.reason}")
            return
        require(outcome.ok, f"GetStock of {sku_id} answered {outcome.reason}")
        reply = pb.StockReply.FromString(outcome.payload)
        require((reply.total, reply.held, reply.sold) == (sku.total, sku.held, sku.sold), f"GetStock of {sku_id}: {reply} vs {sku}")

    # -- the store ----------------------------------------------------------------------

    def check(self, books: Books, changes: Changes, requests: Iterable[Request] = ()) -> None:
        requests = list(requests)
        skus = changes.of(STOCK.name) | {r.sku for r in requests if r.sku} | {s for r in requests for _, s, _ in r.lines}
        rids = changes.of(RESERVATIONS.name) | {r.rid for r in requests if r.rid} | {rid for r in requests for rid, _, _ in r.lines}
        oids = changes.of(ORDER_HOLDS.name) | {r.oid for r in requests if r.oid}
        self._check(books, sorted(skus), sorted(rids), sorted(oids))
        self._check_expiries(books)

    def _check_expiries(self, books: Books) -> None:
        """Each expiry answered is recorded under its key as the reaper's move
        records it (its key as fingerprint, the hold's row as entity), so a
        later expiry of the hold replays it rather than moving it again."""
        for key, rid, payload in self.expiries:
            found = books.rows.outcomes.get(key)
            seen = None if found is None else (found.fingerprint, found.reason, found.payload, found.entity)
            require(seen == (key, None, payload, f"{RESERVATIONS.name}:{rid}"),
                    lambda: f"the expiry of {rid} answered {payload.hex()}, the store recorded {seen}")
        self.expiries.clear()

    def _check(self, books: Books, skus: Iterable[str], rids: Iterable[str], oids: Iterable[str] = ()) -> None:
        """Every invariant, for the SKUs, reservations and order holds named."""
        uncertain = self.uncertain()
        for sku_id in skus:
            self._check_stock(stock_of(books, sku_id), sku_id, exact=sku_id not in uncertain)
        for rid in rids:
            self._check_reservation(books, reservation_of(books, rid), rid, exact=rid not in uncertain)
        for oid in oids:
            self._check_order(books, order_hold_of(books, oid), oid, exact=oid not in uncertain)

    def sweep(self, books: Books) -> None:
        """Every invariant, for every row, including the store's own sums
        (held == RESERVED quantities, sold == what CONFIRMED holds sold)."""
        held: dict[str, int] = {}
        sold: dict[str, int] = {}
        rids = set(self.holds)
        for r in all_reservations(books):
            rids.add(r.reservation_id)
            if r.state is State.RESERVED:
                held[r.sku_id] = held.get(r.sku_id, 0) + r.quantity
            elif r.state is State.CONFIRMED:
                sold[r.sku_id] = sold.get(r.sku_id, 0) + r.sold()
        skus = set(self.skus)
        for s in all_stock(books):
            skus.add(s.sku_id)
            require((s.held, s.sold) == (held.get(s.sku_id, 0), sold.get(s.sku_id, 0)), f"stock of {s.sku_id} disagrees with its reservations: {s}")
        require(set(held) | set(sold) <= skus, "reservations hold stock of a SKU that has none")
        oids = set(self.orders) | {o.order_hold_id for o in all_order_holds(books)}
        self._check(books, sorted(skus), sorted(rids), sorted(oids))

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

    def _check_reservation(self, books: Books, found: Reservation | None, rid: str, exact: bool) -> None:
        if found is not None:
            require(found.state not in INTENTS, lambda: f"{rid} rests in intent {found.state.name}")
            last = self.store_versions.get(rid, 0)
            require(found.version >= last, lambda: f"{rid}: the store's version went back from {last} to {found.version}")
            self.store_versions[rid] = found.version
            require(0 <= found.confirmed_quantity <= found.quantity, lambda: f"{rid} sold {found.confirmed_quantity} of a hold of {found.quantity}")
            if found.order_hold_id:
                order = order_hold_of(books, found.order_hold_id)
                require(order is not None and rid in order.lines, lambda: f"{rid} is a line of order hold {found.order_hold_id}, which does not list it: {order}")
        if not exact:
            return
        held = self.holds.get(rid)
        if held is None:
            require(found is None, lambda: f"the store has reservation {rid} that no answer created")
            return
        require(found is not None, lambda: f"reservation {rid} vanished")
        actual = (found.sku_id, found.quantity, found.state, found.version, found.confirmed_quantity, found.order_hold_id)
        expected = (held.sku_id, held.quantity, held.state, held.version, held.confirmed, self.lines.get(rid, ""))
        require(actual == expected, lambda: f"{rid} is {actual}, answers say {expected}")

    def _check_order(self, books: Books, found: OrderHold | None, oid: str, exact: bool) -> None:
        """An order hold holds every line or none: each line is there, a line
        of it, of its own SKU, in the order's state and at its version."""
        if found is not None:
            require(found.state in (State.RESERVED, State.CONFIRMED, State.RELEASED), lambda: f"order hold {oid} rests in {found.state.name}")
            last = self.store_versions.get(oid, 0)
            require(found.version >= last, lambda: f"{oid}: the store's version went back from {last} to {found.version}")
            self.store_versions[oid] = found.version
            lines = [reservation_of(books, rid) for rid in found.lines]
            require(len({line.sku_id for line in lines if line is not None}) == len(lines) > 0,
                    lambda: f"order hold {oid} lacks a line, or holds a SKU twice: {lines}")
            for line in lines:
                require(line is not None and line.order_hold_id == oid and line.order_id == found.order_id
                        and (line.state, line.version, line.expires_at_ms) == (found.state, found.version, found.expires_at_ms),
                        lambda: f"a line of order hold {oid} is not where its order is: {line} vs {found}")
        if not exact:
            return
        model = self.orders.get(oid)
        if model is None:
            require(found is None, lambda: f"the store has order hold {oid} that no answer created")
            return
        require(found is not None, lambda: f"order hold {oid} vanished")
        actual = (found.state, found.version, found.lines)
        require(actual == (model.state, model.version, model.lines), lambda: f"order hold {oid} is {actual}, answers say {model}")


def _settles(held: _Held | _Order, release: bool, expected: int, now_window_ms: tuple[int, int]) -> set[AnyReason | None]:
    """What a Confirm (expecting version `expected`, 0: any) or a Release of a
    hold, or of an order hold, may answer from its model alone."""
    if held.state is State.RELEASED and held.expired:
        return {Reason.HOLD_EXPIRED}
    if release:
        return {None} if held.state is State.RESERVED else {Reason.INVALID_TRANSITION}
    if expected and expected != held.version:
        return {Reason.VERSION_CONFLICT}
    if held.state is not State.RESERVED:
        return {Reason.INVALID_TRANSITION}
    earliest_ms, latest_ms = now_window_ms
    if held.expires_at_ms <= earliest_ms:
        return {Reason.HOLD_EXPIRED}
    return {None} if held.expires_at_ms > latest_ms else {None, Reason.HOLD_EXPIRED}


def _count(sku: _Sku, held: _Held, sign: int) -> None:
    if held.state is State.RESERVED:
        sku.held += sign * held.quantity
    elif held.state is State.CONFIRMED:
        sku.sold += sign * held.sold()


def _check_reply(reply: pb.StockReply) -> None:
    require(reply.available + reply.held + reply.sold == reply.total, f"a StockReply that does not add up: {reply}")
