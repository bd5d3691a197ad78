"""`holdfast simulate`: seeded simulation of the real engine and domain under
injected faults, checked by the auditor after every step (after TigerBeetle's
VOPR).

One process, one event loop, no network and no wall clock: the store is an
in-memory `Txn` implementation (`SimStore`) that fails, stalls and tears
commits when the seed says so; the clock is a `ManualClock`; the client loses
replies, delivers requests twice and out of order, and retries what it never
heard back about; the process crashes and restarts from the store's
persisted state, running recovery. Everything random comes from one
`random.Random(seed)`, and every step is awaited to the end before the next
begins, so a seed replays exactly: same seed and code, same trace hash.

Requests go through the real servicer (`holdfast.apps.inventory.Inventory`) with
the gateway's own `Call` (key, fingerprint) set in its context variable, so
keys, fingerprints, reservation ids and reply bytes are the production ones.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, TypeVar

from holdfast.inventory.v1 import inventory_pb2 as pb

from google.protobuf.message import Message

from holdfast.contracts import contract as contracts
from holdfast.contracts.contract import Contract
from holdfast.auditor import Auditor, Kind, Request, Violation
from holdfast.clock import ManualClock
from holdfast.engine import Engine
from holdfast.gateway import Call, idempotency_key, serving
from holdfast.apps.inventory import REAPER_METHOD, RECOVERY_METHOD, SERVICE, Holds, Inventory, reservation_id
from holdfast.machine import INTENTS, State
from holdfast.outcome import Outcome
from holdfast.reaper import Reaper
from holdfast.snapshot import MemorySnapshot
from holdfast.store import Prefetch, Record, Reservation, Stock, StoreUnavailable, Txn

T = TypeVar("T")
CONTRACTS = {c.method.rsplit("/", 1)[1]: c for c in contracts.of_service(SERVICE).values()}
SWEEP_EVERY = 500  # steps between full sweeps of every entity (touched ones are checked every step)
SKUS = tuple(f"sku-{n}" for n in range(6))


# -- faults ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities per store transaction (`store`, `commit`, `delay`), per
    delivery (`lost`, `duplicate`, `reorder`) and per step (`crash`)."""

    store: float = 0.03  # the store fails before the move runs: nothing changed
    commit: float = 0.02  # the commit fails: the move may or may not have committed
    delay: float = 0.05  # the store stalls while business time passes
    lost: float = 0.04  # the reply never reaches the client
    duplicate: float = 0.05  # a request is delivered twice at once
    reorder: float = 0.10  # a group is delivered shuffled, or an old request arrives late
    crash: float = 0.002  # the process dies after a step's deliveries, losing their replies

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """`default`, `none`, or `name=probability,...` over the defaults (`lost=0.1,crash=0`)."""
        if spec == "default":
            return cls()
        if spec == "none":
            return cls(**{f.name: 0.0 for f in fields(cls)})
        values = {}
        for item in filter(None, spec.split(",")):
            name, _, value = item.partition("=")
            if name not in {f.name for f in fields(cls)}:
                raise ValueError(f"unknown fault {name!r} (known: {', '.join(f.name for f in fields(cls))})")
            probability = float(value)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"fault {name} must be a probability within 0..1, got {value}")
            values[name] = probability
        return replace(cls(), **values)

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


NO_FAULTS = Faults.parse("none")


# -- the store ----------------------------------------------------------------------


class _State:
    """The store's persisted rows: what survives a crash."""

    def __init__(self) -> None:
        self.stock: dict[str, Stock] = {}
        self.reservations: dict[str, Reservation] = {}
        self.outcomes: dict[bytes, Record] = {}
        self.reserved: set[str] = set()  # an index, so the reaper's scan stays small
        # What commits changed since the auditor last looked.
        self.touched_skus: set[str] = set()
        self.touched_rids: set[str] = set()


class MemTxn:
    """`Txn` over the persisted rows, writing to an overlay that `commit` applies.
    Rows are copied in and out, so nothing uncommitted leaks into the rows."""

    def __init__(self, rows: _State) -> None:
        self._rows = rows
        self._stock: dict[str, Stock] = {}
        self._reservations: dict[str, Reservation] = {}
        self._outcomes: dict[bytes, Record] = {}
        self.written: dict[str, int] = {}

    def recorded(self, key: bytes) -> Record | None:
        return self._outcomes.get(key) or self._rows.outcomes.get(key)

    def record(self, key: bytes, record: Record, now_ms: int) -> None:
        assert self.recorded(key) is None, "moves run one at a time here, so no key is recorded twice"
        self._outcomes[key] = record

    def stock(self, sku_id: str) -> Stock | None:
        found = self._stock.get(sku_id) or self._rows.stock.get(sku_id)
        return None if found is None else _copy_stock(found)

    def put_stock(self, stock: Stock) -> None:
        stock.check()
        self._stock[stock.sku_id] = _copy_stock(stock)

    def take_stock(self, sku_id: str, quantity: int) -> bool:
        assert quantity > 0
        s = self.stock(sku_id)
        if s is None or s.available < quantity:
            return False
        self.put_stock(replace(s, available=s.available - quantity, held=s.held + quantity, version=s.version + 1))
        return True

    def settle_stock(self, sku_id: str, quantity: int, sold: bool) -> None:
        s = self.stock(sku_id)
        assert s is not None and s.held >= quantity, f"settling {quantity} of {sku_id} that is not held"
        back = 0 if sold else quantity
        self.put_stock(replace(s, held=s.held - quantity, available=s.available + back, sold=s.sold + quantity - back, version=s.version + 1))

    def reservation(self, reservation_id: str) -> Reservation | None:
        found = self._reservations.get(reservation_id) or self._rows.reservations.get(reservation_id)
        return None if found is None else _copy_reservation(found)

    def save_reservation(self, r: Reservation, expected_version: int) -> None:
        assert r.version == expected_version + 1, "a move advances the version by exactly one"
        current = self.reservation(r.reservation_id)
        assert (0 if current is None else current.version) == expected_version, "moves run one at a time here"
        self._reservations[r.reservation_id] = _copy_reservation(r)
        self.written[r.reservation_id] = r.version

    def due_holds(self, now_ms: int, limit: int) -> list[Reservation]:
        candidates = (self.reservation(rid) for rid in sorted(self._rows.reserved | set(self._reservations)))
        due = [r for r in candidates if r.state is State.RESERVED and r.expires_at_ms <= now_ms]
        return sorted(due, key=lambda r: (r.expires_at_ms, r.reservation_id))[:limit]

    def intents(self, limit: int) -> list[Reservation]:
        found = [_copy_reservation(r) for r in self._all() if r.state in INTENTS]
        return sorted(found, key=lambda r: r.reservation_id)[:limit]

    def versions(self, after: str, limit: int) -> list[tuple[str, int]]:
        return sorted((r.reservation_id, r.version) for r in self._all() if r.reservation_id > after)[:limit]

    def _all(self) -> Iterable[Reservation]:
        """Every row as this transaction sees it; a full scan, which only recovery makes."""
        return {**self._rows.reservations, **self._reservations}.values()

    def commit(self) -> tuple[set[str], set[str]]:
        """Applies the overlay; returns the SKUs and reservations it changed."""
        self._rows.stock.update(self._stock)
        self._rows.reservations.update(self._reservations)
        for r in self._reservations.values():
            (self._rows.reserved.add if r.state is State.RESERVED else self._rows.reserved.discard)(r.reservation_id)
        self._rows.outcomes.update(self._outcomes)
        return set(self._stock), set(self._reservations)


def _copy_stock(s: Stock) -> Stock:
    """A copy, so a move never edits a committed row in place (dataclasses.replace is slow)."""
    return Stock(s.sku_id, s.total, s.available, s.held, s.sold, s.version)


def _copy_reservation(r: Reservation) -> Reservation:
    return Reservation(r.reservation_id, r.order_id, r.sku_id, r.quantity, r.state, r.version, r.expires_at_ms, r.retry_count, r.release_reason)


class SimStore:
    """A `Store` whose transactions run one at a time on the event loop and
    fail when the seed says so. It yields to the loop before each transaction,
    so moves gathered together interleave the way they would on a server."""

    def __init__(self, rows: _State, rng: random.Random, faults: Faults, clock: ManualClock) -> None:
        self.rows = rows
        self._rng = rng
        self.faults = faults
        self._clock = clock

    def describe(self) -> str:
        return "sim://memory"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def transact(self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None) -> T:
        """`deadline` and `prefetch` are ignored: budgets are wall-clock time, which a simulation never reads."""
        await asyncio.sleep(0)
        if self._rng.random() < self.faults.delay:
            self._clock.advance(self._rng.randrange(1, 5_000))
        if self._rng.random() < self.faults.store:
            raise StoreUnavailable("injected: the store did not answer")
        txn = MemTxn(self.rows)
        result = work(txn)
        if self._rng.random() < self.faults.commit:
            if self._rng.random() < 0.5:
                self._committed(txn)
            raise StoreUnavailable("injected: the commit failed; it may have applied")
        self._committed(txn)
        return result

    def _committed(self, txn: MemTxn) -> None:
        skus, rids = txn.commit()
        self.rows.touched_skus |= skus
        self.rows.touched_rids |= rids

    # -- the auditor's `Truth`: committed rows, read without faults ----------------------

    def stock(self, sku_id: str) -> Stock | None:
        return self.rows.stock.get(sku_id)

    def reservation(self, reservation_id: str) -> Reservation | None:
        return self.rows.reservations.get(reservation_id)

    def all_stock(self) -> Iterable[Stock]:
        return self.rows.stock.values()

    def all_reservations(self) -> Iterable[Reservation]:
        return self.rows.reservations.values()


def _call_of(contract: Contract, message: Message) -> Call:
    """The `Call` the gateway would hand the servicer: its key and fingerprint
    from the same public derivation (`idempotency_key`, sha256 of the
    deterministic encoding). No deadline: budgets are wall-clock time, which a
    simulation never reads, and the simulated store ignores them."""
    fingerprint = hashlib.sha256(message.SerializeToString(deterministic=True)).digest()
    values = tuple(getattr(message, name) for name in contract.idempotency_key)
    assert all(value not in ("", 0) for value in values), "the simulated client always sets its key fields"
    key = idempotency_key(contract.method, values)
    return Call(contract, key, fingerprint, hashlib.sha256(b"context:" + key).hexdigest()[:32], float("inf"))


class _ObservedInventory(Inventory):
    """The real servicer, with the reaper's answers (expiry, recovery) reported
    to the simulation: they change reservations as much as a client's moves do."""

    def __init__(self, engine: Engine, seen: Callable[[str, bytes, Reservation, Outcome], None]) -> None:
        super().__init__(engine, Holds())
        self._seen = seen

    async def expire(self, hold: Reservation) -> Outcome:
        outcome = await super().expire(hold)
        self._seen("Expire", idempotency_key(REAPER_METHOD, (hold.reservation_id,)), hold, outcome)
        return outcome

    async def recover_intent(self, intent: Reservation) -> Outcome:
        outcome = await super().recover_intent(intent)
        key = idempotency_key(RECOVERY_METHOD, (intent.reservation_id, intent.state.name, intent.retry_count))
        self._seen("Recover", key, intent, outcome)
        return outcome


# -- the simulation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    seed: int
    steps: int
    trace: str
    failure: str | None = None
    failed_step: int | None = None
    recovered: int = 0  # intents recovery drove forward after a torn crash


class Simulation:
    """One seeded world: the store's rows, a process over them, a client, the auditor."""

    def __init__(self, seed: int, faults: Faults = Faults()) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.clock = ManualClock()
        self.rows = _State()
        self.auditor = Auditor()
        self.step = 0
        self._trace = hashlib.sha256()
        self._orders = 0
        self._sku_of: dict[str, str | None] = {}  # reservation id -> the SKU its Reserve named
        self._reserves: list[str] = []  # every reservation id a Reserve named, in order
        self._decided: dict[tuple[str, str], Request] = {}
        self._calls: dict[tuple[str, bytes], Call] = {}
        self._sent: list[Request] = []  # recent requests, for late (reordered) deliveries
        self._background: list[tuple[Request, Outcome]] = []  # the reaper's answers, as they come
        self.recovered = 0
        self._start()

    # -- the process -------------------------------------------------------------------

    def _start(self) -> None:
        """A fresh process over the persisted rows: new engine, empty snapshot, nothing in flight."""
        self.store = SimStore(self.rows, random.Random(self.rng.getrandbits(64)), self.faults, self.clock)
        self.engine = Engine(self.store, MemorySnapshot(), self.clock)
        self.inventory = _ObservedInventory(self.engine, self._observed)
        self.reaper = Reaper(self.engine, (self.inventory,))

    async def restart(self, torn: bool = False) -> None:
        """The process crashed: start over from the store and recover its intents.
        Recovery must finish before serving, so it runs on a store that answers.
        `torn` leaves one intent behind, as a writer that persists its intent
        before its effect would when it dies between the two."""
        if torn:
            self._tear()
        self._start()
        self.store.faults = NO_FAULTS
        self._background.clear()
        self.recovered += await self.reaper.recover()
        self.auditor.now_window_ms = (self.clock.now_ms(), self.clock.now_ms())
        for request, outcome in self._background:
            self._answered(request, outcome)
        self.store.faults = self.faults

    def _tear(self) -> None:
        """A RESERVED hold whose state the answers fix exactly is left CONFIRMING
        or RELEASING (stock still held, as the intent's contract says)."""
        uncertain = self.auditor.uncertain_rids()
        candidates = sorted(rid for rid in self.auditor.reserved if rid not in uncertain)
        if not candidates:
            return
        found = self.rows.reservations[self.rng.choice(candidates)]
        intent = self.rng.choice((State.CONFIRMING, State.RELEASING))
        torn = replace(found, state=intent, version=found.version + 1)
        self.rows.reservations[found.reservation_id] = torn
        self.rows.reserved.discard(found.reservation_id)
        self.rows.touched_rids.add(found.reservation_id)

    # -- requests, built as a client would ---------------------------------------------

    def request(self, method: str, message: object) -> Request:
        """A request with the gateway's key and fingerprint, and what it may touch."""
        call = _call_of(CONTRACTS[method], message)
        self._calls[(method, call.fingerprint)] = call
        sku = getattr(message, "sku_id", None) or None
        rid = getattr(message, "reservation_id", None) or None
        if method == "Reserve":
            rid = reservation_id(call.key)
        elif rid is not None:
            sku = self._sku_of.get(rid)
        if method == "Reserve" and rid not in self._sku_of:
            self._sku_of[rid] = sku
            self._reserves.append(rid)
        return Request(method, message, call.key, call.fingerprint, sku, rid)

    def put_stock(self, sku_id: str, total: int) -> Request:
        self._orders += 1
        return self.request("PutStock", pb.PutStockRequest(sku_id=sku_id, total=total, request_id=f"put-{self._orders}"))

    def reserve(self, sku_id: str, quantity: int, hold_ms: int = 0) -> Request:
        self._orders += 1
        message = pb.ReserveRequest(
            order_id=f"ord-{self._orders}", sku_id=sku_id, quantity=quantity, timestamp_ms=self.clock.now_ms(), hold_ms=hold_ms
        )
        return self.request("Reserve", message)

    def confirm(self, rid: str, expected_version: int = 0) -> Request:
        return self.request("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=expected_version))

    def release(self, rid: str, reason: str = "") -> Request:
        return self.request("Release", pb.ReleaseRequest(reservation_id=rid, reason=reason))

    # -- deliveries ----------------------------------------------------------------------

    async def deliver(self, requests: list[Request], lost: list[bool] | None = None) -> list[Outcome | None]:
        """Runs the requests concurrently; answers reach the auditor in the order
        the moves finished, which is the order they ran. `lost[i]` drops a reply."""
        lost = lost or [False] * len(requests)
        finished: list[tuple[int, Outcome]] = []
        earliest_ms = self.clock.now_ms()

        async def one(n: int) -> None:
            finished.append((n, await self._call(requests[n])))

        await asyncio.gather(*(one(n) for n in range(len(requests))))
        self.auditor.now_window_ms = (earliest_ms, self.clock.now_ms())
        answers: list[Outcome | None] = [None] * len(requests)
        for n, outcome in finished:
            answers[n] = None if lost[n] else outcome
            self._answered(requests[n], answers[n])
        self._sent.extend(r for r in requests if r.method != "Expire")
        del self._sent[:-64]
        return answers

    async def _call(self, request: Request) -> Outcome:
        if request.method == "Expire":
            assert request.hold is not None
            return await self.inventory.expire(request.hold)
        with serving(self._calls[(request.method, request.fingerprint)]):
            return await getattr(self.inventory, request.method)(request.message, None)

    def _answered(self, request: Request, outcome: Outcome | None) -> None:
        reason = "LOST" if outcome is None else ("OK" if outcome.ok else outcome.reason.name)
        payload = b"" if outcome is None else outcome.payload
        for part in (str(self.step).encode(), request.method.encode(), request.wire(), reason.encode(), payload):
            self._trace.update(len(part).to_bytes(8, "big") + part)
        self.auditor.answered(request, outcome)

    def _observed(self, method: str, key: bytes, hold: Reservation, outcome: Outcome) -> None:
        self._background.append((Request(method, None, key, key, hold.sku_id, hold.reservation_id, hold), outcome))

    async def tick(self, delta_ms: int) -> None:
        """Business time passes and the reaper runs one round, as ordinary moves."""
        self.clock.advance(delta_ms)
        self._background.clear()
        try:
            await self.reaper.reap()
        except StoreUnavailable:
            pass  # the round's read failed; the next round reads again
        self.auditor.now_window_ms = (self.clock.now_ms() - delta_ms, self.clock.now_ms())
        for request, outcome in self._background:
            self._answered(request, outcome)

    # -- checks ----------------------------------------------------------------------------

    def check(self, requests: Iterable[Request] = ()) -> None:
        """The auditor's invariants over everything this step touched."""
        skus = self.rows.touched_skus | {r.sku for r in requests if r.sku}
        rids = self.rows.touched_rids | {r.rid for r in requests if r.rid}
        self.rows.touched_skus, self.rows.touched_rids = set(), set()
        self.auditor.check(self.store, sorted(skus), sorted(rids))

    def trace(self) -> str:
        return self._trace.hexdigest()

    # -- the seeded workload ---------------------------------------------------------------

    async def run(self, ops: int) -> None:
        for self.step in range(ops):
            await self._one_step()
            if self.step % SWEEP_EVERY == SWEEP_EVERY - 1:
                self.auditor.sweep(self.store)
        self.step = ops
        await self.settle()

    async def settle(self) -> None:
        """The faults stop; the client retries until every answer is known, then
        the whole store must equal what the answers say."""
        self.faults = NO_FAULTS
        await self.restart()
        for _ in range(10):
            pending = list(self.auditor.pending.values())
            if not pending:
                break
            await self.deliver(pending)
        assert not self.auditor.pending, "retries without faults must resolve every key"
        self.check()
        self.auditor.sweep(self.store)

    async def _one_step(self) -> None:
        rng = self.rng
        if rng.random() < 0.08:
            await self.tick(rng.choice((100, 1_000, 10_000, 60_000)))
            self.check()
            return
        requests = [self._new_request() for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        requests += [r for r in self.auditor.pending.values() if rng.random() < 0.5]
        requests = self._misdeliver(requests)
        crash = rng.random() < self.faults.crash
        lost = [crash or rng.random() < self.faults.lost for _ in requests]
        cut = rng.randrange(len(requests) + 1) if crash else len(requests)
        await self.deliver(requests[:cut], lost[:cut])
        for request in requests[cut:]:  # still on the wire when the process died
            self._answered(request, None)
        if crash:
            await self.restart(torn=rng.random() < 0.5)
        self.check(requests)

    def _misdeliver(self, requests: list[Request]) -> list[Request]:
        rng = self.rng
        if requests and rng.random() < self.faults.duplicate:
            requests.append(rng.choice(requests))
        if rng.random() < self.faults.reorder:
            if self._sent and rng.random() < 0.5:
                requests.append(rng.choice(self._sent))  # an old request, arriving late
            rng.shuffle(requests)
        return requests

    def _new_request(self) -> Request:
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

    def _once(self, what: tuple[str, str], build: Callable[[], Request]) -> Request:
        """A client's Confirm (or Release) of a reservation is one request, sent
        again as it is: two payloads under one unresolved key could never be told apart."""
        request = self._decided.get(what)
        if request is None:
            request = self._decided[what] = build()
        return request

    def _expected(self, rid: str) -> int:
        held = self.auditor.holds.get(rid)
        return held.version if held is not None and self.rng.random() < 0.3 else 0

    def _odd_request(self) -> Request:
        """Reads, unknown ids, bad input, a key reused with another payload."""
        rng = self.rng
        roll = rng.random()
        rids = self._reserves
        if roll < 0.3:
            return self.request("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS + ("sku-unknown",))))
        if roll < 0.5 and rids:
            return self.request("GetReservation", pb.GetReservationRequest(reservation_id=rng.choice(rids)))
        if roll < 0.6:
            return self.confirm("rsv_" + "0" * 24)
        if roll < 0.7:
            return self.reserve(rng.choice(SKUS), -1)
        if roll < 0.8 and rids:
            reused = self.release(rng.choice(rids), "again")
        else:
            reused = self._reuse(rng.choice(self._sent)) if self._sent else None
        if reused is not None and self.auditor.condition(reused.key) is Kind.RECORDED:
            return reused  # only a recorded key is reused: an unresolved one would stay ambiguous forever
        return self.request("GetStock", pb.GetStockRequest(sku_id=rng.choice(SKUS)))

    def _reuse(self, sent: Request) -> Request | None:
        """The same key with another payload."""
        if sent.method != "Reserve":
            return None
        other = pb.ReserveRequest()
        other.CopyFrom(sent.message)
        other.quantity += 1
        return self.request("Reserve", other)


# -- entry points ----------------------------------------------------------------------


def run(seed: int, ops: int, faults: Faults = Faults()) -> Result:
    """One seeded run; a broken invariant is reported with its step, never raised."""
    simulation = Simulation(seed, faults)
    try:
        asyncio.run(simulation.run(ops))
    except (Violation, AssertionError) as error:
        return Result(seed, simulation.step, simulation.trace(), f"{type(error).__name__}: {error}", simulation.step)
    return Result(seed, ops, simulation.trace(), recovered=simulation.recovered)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holdfast simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the seed every random choice derives from")
    parser.add_argument("--ops", type=int, default=10_000, help="steps to run (default 10000)")
    parser.add_argument("--faults", default="default", help="default | none | name=probability,... (store, commit, delay, lost, duplicate, reorder, crash)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        faults = Faults.parse(args.faults)
    except ValueError as error:
        print(f"holdfast simulate: {error}", file=sys.stderr)
        return 2
    result = run(args.seed, args.ops, faults)
    if result.failure is not None:
        print(f"FAILED seed={result.seed} step={result.failed_step}: {result.failure}")
        print(f"reproduce: holdfast simulate --seed {result.seed} --ops {args.ops} --faults {faults.describe()}")
        return 1
    print(f"seed={result.seed} ops={result.steps} faults={faults.describe()} trace={result.trace}")
    return 0
