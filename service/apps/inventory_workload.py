"""Inventory's workload for `holdfast simulate` (holdfast.workload): a
client of six SKUs that stocks, reserves, confirms and releases, with reads,
unknown ids, bad input and reused keys among them; and `StockAuditor`, the
model of stock and holds every answer and row is checked against.

The books must satisfy, at every step: each SKU's `available + held + sold
== total`, none of them negative (never oversold), `held` and `sold` equal
to the quantities of its RESERVED and CONFIRMED holds; a version (of a hold
or of stock) never goes back; no hold rests in an intent (recovery settles
what a crash left); and, where no key is pending, stock and holds are
exactly what the answers say. A refusal the model says is wrong (stock
refused that is there, a hold confirmed after it expired) is as much a
violation as an oversale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.apps.inventory import REAPER_METHOD, RECOVERY_METHOD, Holds, Inventory, InventoryReason, reservation_id
from holdfast.auditor import TRANSIENT, Auditor, Books, Kind, Request, require
from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.call import idempotency_key, serving
from holdfast.apps.inventory_machine import INTENTS, State
from holdfast.memory import Changes, MemTxn, Rows
from holdfast.outcome import AnyReason, Outcome, Reason
from holdfast.apps.inventory_store import RESERVATIONS, STOCK, TABLES, Reservation, Stock, save_reservation
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
}


@dataclass(frozen=True, slots=True)
class StockRequest(Request):
    """A request of inventory's: the SKU and the reservation it may touch (None: none)."""

    sku: str | None = None
    rid: str | None = None


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
        self._decided: dict[tuple[str, str], StockRequest] = {}

    def host(self, engine: Engine, seen: Seen) -> Sequence[Service]:
        self.inventory = _ObservedInventory(engine, seen)
        return (self.inventory,)

    async def call(self, request: Request) -> Outcome:
        assert self.inventory is not None, "hosted before it is called"
        if request.method == "Expire":
            return await self.inventory.expire(request.subject)
        with serving(request.call):
            return await getattr(self.inventory, request.method)(request.message, None)

    def tear(self, rows: Rows) -> Changes:
        """A RESERVED hold whose state the answers fix exactly is left CONFIRMING
        or RELEASING (stock still held, as the intent's contract says)."""
        uncertain = self.auditor.uncertain_rids()
        candidates = sorted(rid for rid in self.auditor.reserved if rid not in uncertain)
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

    def put_stock(self, sku_id: str, total: int) -> StockRequest:
        self._orders += 1
        return self.build("PutStock", pb.PutStockRequest(sku_id=sku_id, total=total, request_id=f"put-{self._orders}"))

    def reserve(self, sku_id: str, quantity: int, hold_ms: int = 0) -> StockRequest:
        self._orders += 1
        message = pb.ReserveRequest(
            order_id=f"ord-{self._orders}", sku_id=sku_id, quantity=quantity, timestamp_ms=self.clock.now_ms(), hold_ms=hold_ms
        )
        return self.build("Reserve", message)

    def confirm(self, rid: str, expected_version: int = 0) -> StockRequest:
        return self.build("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=expected_version))

    def release(self, rid: str, reason: str = "") -> StockRequest:
        return self.build("Release", pb.ReleaseRequest(reservation_id=rid, reason=reason))

    # -- the seeded client ---------------------------------------------------------------

    def request(self) -> StockRequest:
        rng = self.rng
        roll = rng.random()
        known = sorted(self.auditor.reserved)
        if roll < 0.10 or not self.auditor.skus:
            sku_id = rng.choice(SKUS)
            held = self.auditor.skus.get(sku_id)
            floor = 0 if held is None else held.held + held.sold
            return self.put_stock(sku_id, max(0, floor + rng.randrange(-3, 40)))
        if roll < 0.50:
            hold_ms = rng.choice((0, 0, 500, 5_000, 30_000, 120_000))
            return self.reserve(rng.choice(SKUS), rng.choice((1, 1, 2, 3, 5, 8)), hold_ms)
        if roll < 0.70 and known:
            rid = rng.choice(known)
            return self._once(("Confirm", rid), lambda: self.confirm(rid, self._expected(rid)))
        if roll < 0.85 and known:
            rid = rng.choice(known)
            return self._once(("Release", rid), lambda: self.release(rid, rng.choice(("", "customer cancelled"))))
        return self._odd_request()

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

    def _odd_request(self) -> StockRequest:
        """Reads, unknown ids, bad input, a key reused with another payload."""
        rng = self.rng
        roll = rng.random()
        rids = self._reserves
        if roll < 0.3:
            return self.build("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS + ("sku-unknown",))))
        if roll < 0.5 and rids:
            return self.build("GetReservation", pb.GetReservationRequest(reservation_id=rng.choice(rids)))
        if roll < 0.6:
            return self.confirm("rsv_" + "0" * 24)
        if roll < 0.7:
            return self.reserve(rng.choice(SKUS), -1)
        sent = self.client.sent
        if roll < 0.8 and rids:
            reused = self.release(rng.choice(rids), "again")
        else:
            reused = self._reuse(rng.choice(sent)) if sent else None
        if reused is not None and self.auditor.condition(reused.key) is Kind.RECORDED:
            return reused  # only a recorded key is reused: an unresolved one would stay ambiguous forever
        return self.build("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS)))

    def _reuse(self, sent: Request) -> StockRequest | None:
        """The same key with another payload."""
        if sent.method != "Reserve":
            return None
        other = pb.ReserveRequest()
        other.CopyFrom(sent.message)
        other.quantity += 1
        return self.build("Reserve", other)


class _ObservedInventory(Inventory):
    """The real servicer, with the reaper's answers (expiry, recovery) reported
    to the simulation: they change reservations as much as a client's moves do."""

    def __init__(self, engine: Engine, seen: Seen) -> None:
        super().__init__(engine, Holds())
        self._seen = seen

    async def expire(self, hold: Reservation) -> Outcome:
        outcome = await super().expire(hold)
        key = idempotency_key(REAPER_METHOD, (hold.reservation_id,))
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


@dataclass(slots=True)
class _Sku:
    total: int = 0
    total_version: int = 0  # the stock version of the PutStock answer `total` came from
    held: int = 0
    sold: int = 0


@dataclass
class StockAuditor(Auditor):
    """Stock and holds as the answers say they are."""

    skus: dict[str, _Sku] = field(default_factory=dict)
    holds: dict[str, _Held] = field(default_factory=dict)
    # Highest version seen per entity: in fresh answers, and in the store.
    fresh_versions: dict[str, int] = field(default_factory=dict)
    store_versions: dict[str, int] = field(default_factory=dict)
    stock_versions: dict[str, int] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)  # the model's RESERVED holds

    READS = frozenset({"GetStock", "GetReservation"})

    def uncertain_skus(self) -> set[str]:
        return {r.sku for r in self.pending.values() if r.sku is not None}

    def uncertain_rids(self) -> set[str]:
        return {r.rid for r in self.pending.values() if r.rid is not None}

    # -- answers ---------------------------------------------------------------------

    def predict(self, request: StockRequest) -> set[AnyReason | None] | None:
        message = request.message
        if request.method == "PutStock":
            sku = self.skus.get(request.sku)
            committed = 0 if sku is None else sku.held + sku.sold
            return {None} if message.total >= committed else {InventoryReason.STOCK_BELOW_COMMITTED}
        if request.method == "Reserve":
            if message.quantity <= 0:
                return {Reason.INVALID_REQUEST}
            sku = self.skus.get(request.sku)
            if sku is None or sku.total_version == 0:
                return {InventoryReason.SKU_NOT_FOUND}
            available = sku.total - sku.held - sku.sold
            return {None} if available >= message.quantity else {InventoryReason.INSUFFICIENT_STOCK}
        if request.method in ("Confirm", "Release"):
            held = self.holds.get(request.rid)
            if held is None:
                return {InventoryReason.RESERVATION_NOT_FOUND}
            # A snapshot behind the store (a commit that failed after applying)
            # makes any move on the reservation compensate first.
            return {Reason.VERSION_CONFLICT} | self._settles(request, held)
        return None

    def _settles(self, request: StockRequest, held: _Held) -> set[AnyReason | None]:
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

    def read(self, request: StockRequest, outcome: Outcome | None) -> None:
        if outcome is None or outcome.reason in TRANSIENT:
            return
        if request.method == "GetStock":
            self._read_stock(request.sku, outcome)
        elif request.rid not in self.uncertain_rids():
            held = self.holds.get(request.rid)
            if held is None:
                require(outcome.reason is InventoryReason.RESERVATION_NOT_FOUND, f"GetReservation of unknown {request.rid}: {outcome.reason}")
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
            require(outcome.reason is InventoryReason.SKU_NOT_FOUND, f"GetStock of unknown {sku_id}: {outcome.reason}")
            return
        require(outcome.ok, f"GetStock of {sku_id} answered {outcome.reason}")
        reply = pb.StockReply.FromString(outcome.payload)
        require((reply.total, reply.held, reply.sold) == (sku.total, sku.held, sku.sold), f"GetStock of {sku_id}: {reply} vs {sku}")

    # -- the store ----------------------------------------------------------------------

    def check(self, books: Books, changes: Changes, requests: Iterable[Request] = ()) -> None:
        requests = list(requests)
        skus = changes.of(STOCK.name) | {r.sku for r in requests if r.sku}
        rids = changes.of(RESERVATIONS.name) | {r.rid for r in requests if r.rid}
        self._check(books, sorted(skus), sorted(rids))

    def _check(self, books: Books, skus: Iterable[str], rids: Iterable[str]) -> None:
        """Every invariant, for the SKUs and reservations named."""
        uncertain_skus, uncertain_rids = self.uncertain_skus(), self.uncertain_rids()
        for sku_id in skus:
            self._check_stock(stock_of(books, sku_id), sku_id, exact=sku_id not in uncertain_skus)
        for rid in rids:
            self._check_reservation(reservation_of(books, rid), rid, exact=rid not in uncertain_rids)

    def sweep(self, books: Books) -> None:
        """Every invariant, for every row, including the store's own sums
        (held == RESERVED quantities, sold == CONFIRMED quantities)."""
        held: dict[str, int] = {}
        sold: dict[str, int] = {}
        rids = set(self.holds)
        for r in all_reservations(books):
            rids.add(r.reservation_id)
            if r.state is State.RESERVED:
                held[r.sku_id] = held.get(r.sku_id, 0) + r.quantity
            elif r.state is State.CONFIRMED:
                sold[r.sku_id] = sold.get(r.sku_id, 0) + r.quantity
        skus = set(self.skus)
        for s in all_stock(books):
            skus.add(s.sku_id)
            require((s.held, s.sold) == (held.get(s.sku_id, 0), sold.get(s.sku_id, 0)), f"stock of {s.sku_id} disagrees with its reservations: {s}")
        require(set(held) | set(sold) <= skus, "reservations hold stock of a SKU that has none")
        self._check(books, sorted(skus), sorted(rids))

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
