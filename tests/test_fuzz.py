"""Hostile input over real gRPC: every call gets a defined answer, and a
refused call changes nothing.

A seeded generator (set HOLDFAST_FUZZ_SEED to explore, the failure message
names the seed and the exact request bytes) sends about 2,300 calls per
run to a real server, one at a time, each as raw wire bytes
(`request_serializer=None`), on the embedded pair, on PostgreSQL + Redis and
on PostgreSQL + Redis Cluster:

* well-formed requests with hostile field values: int64 and uint64 edges,
  zero, -1, huge quantities, hold_ms edges, control characters and NUL,
  unicode of every plane, over-long and look-alike ids, mixed with sane
  values so calls get past the first check and into the engine;
* malformed bodies: random bytes, truncated messages, invalid UTF-8 in
  string fields, wrong wire types, unknown fields, bad varints and lengths,
  invalid tags, deep groups;
* oversized strings in every string field, up to about 1 MB (gRPC's default
  limit is 4 MB);
* the order RPCs (ReserveOrder, ConfirmOrder, ReleaseOrder, GetOrder) like
  the others, their `lines` too: no line, 100, 101 and thousands of lines,
  the same SKU twice, int64 quantities at the edges, NUL and over-long SKU
  ids, malformed lines inside a valid body.

For each call: the status is defined (never INTERNAL or UNKNOWN, and a
client timeout of 10 s is a failure, so no hang either); an error carries a
holdfast ErrorInfo whose reason maps to that status (DESIGN.md's error
table); a body the client-side protobuf cannot parse is INVALID_REQUEST and
one it can parse is never called undecodable; a missing key field is a
CONTRACT_VIOLATION. The store (stock, reservations and recorded outcomes,
read inside a store transaction) is compared before and after every call:
a refusal that is not recorded under its key changes nothing at all, a
recorded refusal (or a replay) changes nothing but, at most, its own outcome
record. After every call the books hold together: each SKU's `available +
held + sold == total`, `held` and `sold` equal to what its RESERVED and
CONFIRMED reservations hold and sold, every order hold's lines there, lines
of it, in its state and at its version, and no line without its order; an
order's reply has every line in the order's state. At the end the server
still answers its health check and a valid call.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Callable

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.apps.inventory import LINE_VIOLATIONS_SHOWN_MAX
from holdfast.apps.inventory_machine import State
from holdfast.outcome import DOMAIN, Reason, reason_named
from holdfast.server import Config, Running
from tests.conftest import BACKENDS
from tests.support import BUILT_IN_APPS, failure_of

SEED = int(os.environ.get("HOLDFAST_FUZZ_SEED", "20261126"))
SERVICE = "/holdfast.inventory.v1.InventoryService"
TIMEOUT_S = 10.0
MAX_HOLD_MS = 7 * 24 * 60 * 60 * 1000
UNDECODABLE = "could not be decoded"
REPORTED_FAILURES_MAX = 10

# method -> (request class, reply class, its fields as name -> kind)
METHODS: dict[str, tuple[type, type, dict[str, str]]] = {
    "PutStock": (pb.PutStockRequest, pb.StockReply, {"sku_id": "sku", "total": "int64", "request_id": "text"}),
    "GetStock": (pb.GetStockRequest, pb.StockReply, {"sku_id": "sku"}),
    "Reserve": (
        pb.ReserveRequest,
        pb.ReservationReply,
        {"order_id": "text", "sku_id": "sku", "quantity": "int64", "timestamp_ms": "int64", "hold_ms": "hold"},
    ),
    "Confirm": (
        pb.ConfirmRequest, pb.ReservationReply, {"reservation_id": "rid", "expected_version": "uint64", "quantity": "int64"}
    ),
    "Release": (pb.ReleaseRequest, pb.ReservationReply, {"reservation_id": "rid", "reason": "text"}),
    "GetReservation": (pb.GetReservationRequest, pb.ReservationReply, {"reservation_id": "rid"}),
    "ReserveOrder": (
        pb.ReserveOrderRequest, pb.OrderReply, {"order_id": "text", "lines": "lines", "timestamp_ms": "int64", "hold_ms": "hold"}
    ),
    "ConfirmOrder": (pb.ConfirmOrderRequest, pb.OrderReply, {"order_hold_id": "oid", "expected_version": "uint64"}),
    "ReleaseOrder": (pb.ReleaseOrderRequest, pb.OrderReply, {"order_hold_id": "oid", "reason": "text"}),
    "GetOrder": (pb.GetOrderRequest, pb.OrderReply, {"order_hold_id": "oid"}),
}
ORDER_METHODS = frozenset({"ReserveOrder", "ConfirmOrder", "ReleaseOrder", "GetOrder"})
KEY_FIELDS = {
    "PutStock": ("sku_id", "request_id"),
    "Reserve": ("order_id", "sku_id", "timestamp_ms"),
    "Confirm": ("reservation_id",),
    "Release": ("reservation_id",),
    "ReserveOrder": ("order_id", "timestamp_ms"),
    "ConfirmOrder": ("order_hold_id",),
    "ReleaseOrder": ("order_hold_id",),
}
STRING_KINDS = ("sku", "rid", "oid", "text")
LINES_MAX = 100

INT64_EDGES = (
    -(2**63), -(2**63) + 1, -(2**31) - 1, -(2**31), -1000, -1, 0, 1, 2, 3, 10, 2**31 - 1, 2**31,
    2**32, 2**53, 2**53 + 1, 2**62, 2**63 - 2, 2**63 - 1,
)
UINT64_EDGES = (0, 1, 2, 3, 4, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1)
HOLD_EDGES = (-(2**63), -1, 0, 1, 999, 60_000, MAX_HOLD_MS - 1, MAX_HOLD_MS, MAX_HOLD_MS + 1, 2**62, 2**63 - 1)
HOSTILE_TEXT = (
    "", " ", "a", "\x00", "a\x00b", "\x00" * 64, "\t", "\n", "\r\n", "\x1b[31mred\x1b[0m", "\x7f", "\x08",
    "\u0085", "\u00a0", "\u200b", "\u200d", "\u202e\u202d", "\ufeff", "\ufffd", "\uffff", "\U0010ffff",
    "\U0001f600" * 40, "e\u0301" * 50, "ß" * 64, "é" * 129, "x" * 127, "x" * 128, "x" * 129, "x" * 512,
    "x" * 513, "x" * 4096, "%s%n%x", "{}", "{0}", "'; DROP TABLE stock; --", "\\", '"', "' OR '1'='1",
    "null", "NaN", "-1", "0", "../../etc/passwd", "rsv_" + "0" * 24, "RSV_", "sku-1\x00", " sku-1", "sku-1 ",
    "SKU-1", "ſku-1", "sku\u20111",
)
BAD_UTF8 = (
    b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"abc\xfe", b"sku-1\xff", b"\xf0\x9f\x98",
)
# Unicode without the surrogates protobuf cannot carry: ASCII, controls,
# Latin-1, the BMP and the astral planes.
ALPHABET_RANGES = ((0x00, 0x7F), (0x00, 0x1F), (0x80, 0xFF), (0x100, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF))

WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_START, WIRE_END, WIRE_FIXED32 = 0, 1, 2, 3, 4, 5


# -- wire encoding, by hand: what a protobuf library would never send ---------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negatives as two's complement, as int64 does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, WIRE_LEN) + varint(len(payload)) + payload


def field_number(request_class: type, name: str) -> int:
    return request_class.DESCRIPTOR.fields_by_name[name].number


# -- the world each run starts from ---------------------------------------------------


@dataclass
class World:
    """Known ids, so a share of hostile calls hits real entities."""

    skus: list[str] = field(default_factory=lambda: ["sku-1", "sku-2", "sku-3"])
    reservations: list[str] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)  # order hold ids


@pytest.fixture(params=["embedded", "postgres+redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Hostile strings reach SQLite and PostgreSQL (NUL bytes, odd unicode),
    so both run. These two are tests/test_fuzz_dispatch.py's, which imports
    this fixture; this suite's tests name their pairs (ACROSS)."""
    return request.param


# Every pair of tests/conftest.py: SQLite + memory, PostgreSQL + Redis and
# PostgreSQL + Redis Cluster, whose snapshot reads and advances versions by
# single-key pipelines over the nodes (holdfast.redis_snapshot), not by MGET.
ACROSS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def config(tmp_path, backend: str, request: pytest.FixtureRequest) -> Config:
    """The server of tests/conftest.py, with a reaper that never fires during
    the run: a fuzzed 1 ms hold expiring between two snapshots would look
    like a refused call changing state."""
    if backend == "embedded":
        store, snapshot = f"sqlite:///{tmp_path}/holdfast.db", "memory://"
    else:
        store = request.getfixturevalue("postgres_url")
        snapshot = request.getfixturevalue("redis_cluster_url" if backend.endswith("cluster") else "redis_url")
    return Config(listen="127.0.0.1:0", store=store, snapshot=snapshot, reaper_interval_ms=3_600_000, apps=BUILT_IN_APPS)


def dump(txn) -> tuple[tuple, tuple, dict]:
    """Everything the store holds. Test-only: reads the tables with the
    store's own cursor, inside one of its transactions, so it is ordered
    with the moves (SQLite and PostgreSQL speak the same SQL here)."""
    stock = tuple(txn._execute("SELECT * FROM stock ORDER BY sku_id").fetchall())
    reservations = tuple(txn._execute("SELECT * FROM reservation ORDER BY reservation_id").fetchall())
    outcomes = {bytes(row[0]): tuple(row[1:]) for row in txn._execute("SELECT key, fingerprint, reason, payload FROM outcome")}
    return stock, reservations, outcomes


def dump_orders(txn) -> tuple[tuple, tuple, dict, tuple, tuple]:
    """`dump`, then the order holds, then the books' columns by name (stock,
    and each reservation's sku, quantity, state, version, confirmed quantity
    and order hold): what `books_broken` reads."""
    order_holds = tuple(txn._execute(
        "SELECT order_hold_id, order_id, state, version, expires_at_ms, line_ids, release_reason"
        " FROM order_hold ORDER BY order_hold_id").fetchall())
    books = (
        tuple(txn._execute("SELECT sku_id, total, available, held, sold FROM stock ORDER BY sku_id").fetchall()),
        tuple(txn._execute(
            "SELECT reservation_id, sku_id, quantity, state, version, confirmed_quantity, order_hold_id, order_id, expires_at_ms"
            " FROM reservation ORDER BY reservation_id").fetchall()),
    )
    return (*dump(txn), order_holds, books)


def books_broken(state: tuple) -> str | None:
    """Why the books of a `dump_orders` state do not hold together, or None."""
    order_holds, (stock, reservations) = state[3], state[4]
    held: dict[str, int] = {}
    sold: dict[str, int] = {}
    lines: dict[str, tuple] = {}
    for rid, sku_id, quantity, rstate, version, confirmed, oid, order_id, expires_at_ms in reservations:
        if not 0 <= confirmed <= quantity or quantity <= 0:
            return f"reservation {rid!r} sold {confirmed} of a hold of {quantity}"
        if rstate == State.RESERVED:
            held[sku_id] = held.get(sku_id, 0) + quantity
        elif rstate == State.CONFIRMED:
            sold[sku_id] = sold.get(sku_id, 0) + (confirmed or quantity)
        if oid:
            lines[rid] = (oid, order_id, rstate, version, expires_at_ms, sku_id)
    for sku_id, total, available, held_now, sold_now in stock:
        if available + held_now + sold_now != total or min(available, held_now, sold_now) < 0:
            return f"stock of {sku_id!r} does not add up: {(total, available, held_now, sold_now)}"
        if (held_now, sold_now) != (held.pop(sku_id, 0), sold.pop(sku_id, 0)):
            return f"stock of {sku_id!r} holds {held_now} and sold {sold_now}, not what its reservations say"
    if held or sold:
        return f"reservations hold or sold stock of SKUs with none: {sorted(held | sold)}"
    listed: set[str] = set()
    for oid, order_id, ostate, version, expires_at_ms, line_ids, _ in order_holds:
        ids = line_ids.split(",")
        listed.update(ids)
        found = [lines.get(rid) for rid in ids]
        if any(line is None or line[:5] != (oid, order_id, ostate, version, expires_at_ms) for line in found):
            return f"order hold {oid!r} ({State(ostate).name} v{version}) has a line missing or elsewhere: {found}"
        if len({line[5] for line in found}) != len(found):
            return f"order hold {oid!r} holds a SKU on two lines"
    if set(lines) - listed:
        return f"lines without their order hold: {sorted(set(lines) - listed)[:5]}"
    return None


@dataclass
class Fuzzer:
    SERVICE_PATH = SERVICE  # the service the fuzzed methods belong to

    server: Running
    channel: grpc.aio.Channel
    rng: random.Random
    world: World = field(default_factory=World)
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)

    method_answers: dict[str, int] = field(default_factory=dict)  # "ReserveOrder OK", "GetOrder RESERVATION_NOT_FOUND"

    async def state(self) -> tuple[tuple, tuple, dict, tuple, tuple]:
        return await self.server.engine.store.transact(dump_orders)

    async def setup(self) -> None:
        """sku-1 with 1,000 units, sku-2 with none, sku-3 with 500; a
        RESERVED, a CONFIRMED and a RELEASED reservation, all on sku-1, and
        a partly confirmed one; a RESERVED, a CONFIRMED and a RELEASED
        order hold, each with a line of sku-1 and one of sku-3."""
        stub = self._unary
        await stub("PutStock", pb.PutStockRequest(sku_id="sku-1", total=1000, request_id="init").SerializeToString())
        await stub("PutStock", pb.PutStockRequest(sku_id="sku-2", total=0, request_id="init").SerializeToString())
        await stub("PutStock", pb.PutStockRequest(sku_id="sku-3", total=500, request_id="init").SerializeToString())
        for n in range(4):
            body = pb.ReserveRequest(order_id=f"order-{n}", sku_id="sku-1", quantity=2, timestamp_ms=n + 1)
            reply = pb.ReservationReply.FromString(await stub("Reserve", body.SerializeToString()))
            self.world.reservations.append(reply.reservation_id)
        await stub("Confirm", pb.ConfirmRequest(reservation_id=self.world.reservations[1]).SerializeToString())
        await stub("Release", pb.ReleaseRequest(reservation_id=self.world.reservations[2]).SerializeToString())
        await stub("Confirm", pb.ConfirmRequest(reservation_id=self.world.reservations[3], quantity=1).SerializeToString())
        for n in range(3):
            lines = [pb.OrderLine(sku_id="sku-3", quantity=1), pb.OrderLine(sku_id="sku-1", quantity=2)]
            body = pb.ReserveOrderRequest(order_id=f"cart-{n}", lines=lines, timestamp_ms=n + 1)
            reply = pb.OrderReply.FromString(await stub("ReserveOrder", body.SerializeToString()))
            self.world.orders.append(reply.order_hold_id)
            self.world.reservations.append(reply.lines[0].reservation_id)  # a line: moving it alone is refused
        await stub("ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=self.world.orders[1]).SerializeToString())
        await stub("ReleaseOrder", pb.ReleaseOrderRequest(order_hold_id=self.world.orders[2]).SerializeToString())
        assert books_broken(await self.state()) is None

    def _unary(self, method: str, body: bytes):
        rpc = self.channel.unary_unary(f"{self.SERVICE_PATH}/{method}", request_serializer=None, response_deserializer=None)
        return rpc(body, timeout=TIMEOUT_S)

    async def send(self, method: str, body: bytes, what: str) -> None:
        """One hostile call, checked; a broken expectation is collected with
        its reproducer, not raised, so one run reports every kind found."""
        self.calls += 1
        before = await self.state()
        call = self._unary(method, body)
        try:
            reply = await call
            error = None
        except grpc.aio.AioRpcError as raised:
            reply, error = None, raised
        after = await self.state()
        problem = self._judge(method, body, reply, error, before, after, dict(await call.trailing_metadata() or ()))
        if problem is not None:
            shown = body if len(body) <= 160 else body[:160] + b"..."
            answer = "OK" if error is None else f"{error.code().name} {error.details()[:200]!r}"
            self.failures.append(
                f"{problem}\n    method {method} ({what}), {len(body)} bytes: {shown!r}\n    answered {answer}\n"
                f"    reproduce: channel.unary_unary('{self.SERVICE_PATH}/{method}', request_serializer=None)(body)"
            )
        return "OK" if error is None else _reason_of(error)

    def _intact(self, method: str, reply: bytes | None, after: tuple) -> str | None:
        """The books after any call, and an order's reply: why not intact, or None."""
        broken = books_broken(after)
        if broken is not None:
            return "the books broke: " + broken
        if method in ORDER_METHODS and reply is not None:
            order = pb.OrderReply.FromString(reply)
            lines = [(line.state, line.version, line.order_id) for line in order.lines]
            if not order.lines or any(line != (order.state, order.version, order.order_id) for line in lines):
                return f"an order's reply has lines not where the order is: {order}"
            skus = [line.sku_id for line in order.lines]
            if len(set(skus)) != len(skus) or len(skus) > LINES_MAX:
                return f"an order's reply holds {len(skus)} lines, {len(skus) - len(set(skus))} of a SKU already held"
        return None

    def _unchanged(self, before, after, outcomes_may_grow: bool) -> str | None:
        """`_changed`, and the order holds too."""
        problem = _changed(before, after, outcomes_may_grow)
        if problem is None and before[3] != after[3]:
            gone, came = sorted(set(before[3]) - set(after[3])), sorted(set(after[3]) - set(before[3]))
            problem = f"order_hold rows changed: {_short(gone)} -> {_short(came)}"
        return problem

    def _tally(self, method: str, answer: str) -> None:
        self.answers[answer] = self.answers.get(answer, 0) + 1
        self.method_answers[f"{method} {answer}"] = self.method_answers.get(f"{method} {answer}", 0) + 1

    def _judge(self, method, body, reply, error, before, after, trailing) -> str | None:
        """The call's answer judged, then the books after it."""
        return self._judge_call(method, body, reply, error, before, after, trailing) or self._intact(method, reply, after)

    def _judge_call(self, method, body, reply, error, before, after, trailing) -> str | None:
        request_class, reply_class, _ = METHODS[method]
        try:
            request = request_class.FromString(body)
        except DecodeError:
            request = None
        if error is None:
            self._tally(method, "OK")
            if request is None:
                return "an undecodable body was answered OK"
            try:
                reply_class.FromString(reply)
            except DecodeError:
                return "the reply does not parse as " + reply_class.__name__
            missing = [n for n in KEY_FIELDS.get(method, ()) if getattr(request, n) in ("", 0)]
            if missing:
                return f"key fields {missing} missing, yet answered OK"
            if trailing.get("holdfast-replayed") == "true" or method.startswith("Get"):
                return self._unchanged(before, after, outcomes_may_grow=False)
            return None
        code = error.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return f"{code.name}: {error.details()!r}"
        try:
            failure = failure_of(error)
        except AssertionError:
            return f"{code.name} without google.rpc.Status details (a client timeout is a hang): {error.details()!r}"
        except ValueError as mismatch:  # details of another status: trailers past the client's metadata limit
            return f"{code.name} whose google.rpc.Status does not match it: {mismatch}"
        self._tally(method, failure.reason)
        try:
            reason = reason_named(failure.reason) if failure.domain == DOMAIN else None
        except KeyError:
            reason = None
        if reason is None:
            return f"{code.name} with ErrorInfo {failure.domain!r}/{failure.reason!r}, not a holdfast reason"
        if reason.code != code:
            return f"reason {reason.name} answered as {code.name}, the table says {reason.code.name}"
        undecodable = reason is Reason.INVALID_REQUEST and UNDECODABLE in failure.message
        if (request is None) != undecodable:
            return f"the client {'cannot' if request is None else 'can'} parse the body, the server said {reason.name}: {failure.message!r}"
        if request is not None:
            missing = [n for n in KEY_FIELDS.get(method, ()) if getattr(request, n) in ("", 0)]
            if missing and reason is not Reason.CONTRACT_VIOLATION:
                return f"key fields {missing} missing, answered {reason.name} instead of CONTRACT_VIOLATION"
            if "holdfast-context-id" not in trailing:
                return "no holdfast-context-id on a decoded call"
        if "holdfast-replayed" not in trailing:
            return "no holdfast-replayed trailer"
        return self._unchanged(before, after, outcomes_may_grow=reason.recorded)

    async def survives(self) -> None:
        """The server is up and answers a valid call after the run."""
        health = health_pb2_grpc.HealthStub(self.channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        reply = pb.StockReply.FromString(
            await self._unary("GetStock", pb.GetStockRequest(sku_id="sku-1").SerializeToString())
        )
        assert reply.available + reply.held + reply.sold == reply.total and reply.available >= 0

    def verdict(self, minimum: int) -> None:
        assert self.calls >= minimum, f"only {self.calls} hostile calls"
        shown = "\n".join(self.failures[:REPORTED_FAILURES_MAX])
        assert not self.failures, f"{len(self.failures)} of {self.calls} calls broke expectations (seed {SEED}):\n{shown}"

    # -- values -----------------------------------------------------------------

    def text(self) -> str:
        if self.rng.random() < 0.5:
            return self.rng.choice(HOSTILE_TEXT)
        size = self.rng.choice((1, 2, 5, 16, 64, 127, 128, 129, 300))
        low, high = self.rng.choice(ALPHABET_RANGES)
        return "".join(chr(self.rng.randint(low, high)) for _ in range(size))

    def value(self, kind: str):
        sane = self.rng.random() < 0.4
        rng = self.rng
        if kind == "sku":
            return rng.choice(self.world.skus) if sane else self.text()
        if kind == "rid":
            return rng.choice(self.world.reservations) if sane else self.text()
        if kind == "oid":  # an order hold's look-alikes besides the hostile text
            return rng.choice(self.world.orders) if sane else rng.choice((self.text(), "ord_" + "0" * 24, "ord_"))
        if kind == "lines":
            return self.lines()
        if kind == "text":
            return f"id-{rng.randrange(50)}" if sane else self.text()
        if kind == "int64":
            return rng.randint(1, 5) if sane else (rng.choice(INT64_EDGES) if rng.random() < 0.8 else rng.randint(-(2**63), 2**63 - 1))
        if kind == "uint64":
            return rng.randint(0, 3) if sane else (rng.choice(UINT64_EDGES) if rng.random() < 0.8 else rng.randint(0, 2**64 - 1))
        if kind == "hold":
            return rng.choice((0, 60_000)) if sane else rng.choice(HOLD_EDGES)
        raise AssertionError(kind)

    def lines(self) -> list[pb.OrderLine]:
        """An order's lines: mostly one to four, hostile SKUs and quantities
        among sane ones; now and then none, 100, 101 or thousands of them,
        or a SKU repeated."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            return []
        if roll < 0.14:  # one SKU a line, now and then every other one of quantity 0: more bad lines than are named
            count, bad = rng.choice((LINES_MAX, LINES_MAX + 1, 5_000)), rng.random() < 0.3
            return [pb.OrderLine(sku_id=self.world.skus[n] if n < 3 else f"sku-{n}", quantity=0 if bad and n % 2 else 1)
                    for n in range(count)]
        if roll < 0.4:  # sane lines, so orders get held and their moves reach the engine
            return [pb.OrderLine(sku_id=sku, quantity=rng.randint(1, 3)) for sku in rng.sample(self.world.skus, rng.randint(1, 3))]
        lines = []
        for _ in range(rng.randint(1, 4)):
            values = {name: self.value(kind) for name, kind in (("sku_id", "sku"), ("quantity", "int64")) if rng.random() < 0.9}
            lines.append(pb.OrderLine(**values))
        if rng.random() < 0.15:
            lines.insert(rng.randrange(len(lines) + 1), pb.OrderLine(sku_id=lines[0].sku_id, quantity=rng.choice((1, 2**63 - 1))))
        return lines

    def request(self, method: str):
        request_class, _, fields = METHODS[method]
        values = {name: self.value(kind) for name, kind in fields.items() if self.rng.random() < 0.9}
        return request_class(**values)


def _reason_of(error: grpc.aio.AioRpcError) -> str:
    try:
        return failure_of(error).reason
    except (AssertionError, ValueError):
        return error.code().name


def _changed(before, after, outcomes_may_grow: bool) -> str | None:
    """Why `after` is not what a call that changed nothing may leave, or None."""
    for table, old, new in (("stock", before[0], after[0]), ("reservation", before[1], after[1])):
        if old != new:
            gone, came = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            return f"{table} rows changed: {_short(gone)} -> {_short(came)}"
    added = after[2].keys() - before[2].keys()
    if after[2].keys() < before[2].keys() or any(after[2][k] != v for k, v in before[2].items() if k in after[2]):
        return "recorded outcomes were lost or rewritten"
    if len(added) > (1 if outcomes_may_grow else 0):
        return f"{len(added)} outcomes recorded by a call that may record {1 if outcomes_may_grow else 0}"
    return None


def _short(rows: list) -> str:
    text = repr(rows)
    return text if len(text) <= 400 else text[:400] + "..."


@pytest.fixture
async def fuzzer(server: Running, channel: grpc.aio.Channel, request: pytest.FixtureRequest) -> Fuzzer:
    fuzzer = Fuzzer(server, channel, random.Random(f"{SEED}:{request.node.name}"))
    await fuzzer.setup()
    return fuzzer


# -- 1. well-formed requests, hostile values -----------------------------------------------


@ACROSS
async def test_hostile_field_values_get_defined_answers_and_refusals_change_nothing(fuzzer: Fuzzer):
    methods = list(METHODS)
    for _ in range(1200):
        method = fuzzer.rng.choice(methods)
        request = fuzzer.request(method)
        await fuzzer.send(method, request.SerializeToString(), "hostile values")
    await fuzzer.survives()
    fuzzer.verdict(1200)
    # The mix reached past the first check: validation, the engine and the moves all answered.
    assert {"OK", "CONTRACT_VIOLATION", "INVALID_REQUEST", "SKU_NOT_FOUND", "RESERVATION_NOT_FOUND"} <= fuzzer.answers.keys(), fuzzer.answers
    # ... and so did the order RPCs'.
    assert {
        "ReserveOrder OK", "ReserveOrder INVALID_REQUEST", "ReserveOrder INSUFFICIENT_STOCK", "ReserveOrder SKU_NOT_FOUND",
        "ReserveOrder CONTRACT_VIOLATION", "ConfirmOrder RESERVATION_NOT_FOUND", "ReleaseOrder RESERVATION_NOT_FOUND",
        "GetOrder OK", "GetOrder RESERVATION_NOT_FOUND",
    } <= fuzzer.method_answers.keys(), sorted(fuzzer.method_answers)


def _lines(*lines: tuple[str, int]) -> list[pb.OrderLine]:
    return [pb.OrderLine(sku_id=sku_id, quantity=quantity) for sku_id, quantity in lines]


# (what, lines) -> the answer: each sent through the fuzzer, so every call's checks hold too.
ORDER_EDGES = [
    ("no line", [], "INVALID_REQUEST"),
    ("101 lines", _lines(*((f"sku-{n}", 1) for n in range(LINES_MAX + 1))), "INVALID_REQUEST"),
    ("5,000 lines", _lines(*(("sku-1", 1) for _ in range(5_000))), "INVALID_REQUEST"),
    ("100 lines of unknown SKUs", _lines(*((f"sku-x{n}", 1) for n in range(LINES_MAX))), "SKU_NOT_FOUND"),
    ("the same SKU twice", _lines(("sku-1", 1), ("sku-3", 1), ("sku-1", 1)), "INVALID_REQUEST"),
    ("look-alike SKUs are other SKUs", _lines(("sku-1", 1), ("sku-1 ", 1)), "SKU_NOT_FOUND"),
    ("a NUL in a SKU", _lines(("sku-1\x00", 1)), "INVALID_REQUEST"),
    ("a SKU of 129 characters", _lines(("x" * 129, 1)), "INVALID_REQUEST"),
    ("a SKU of 1 MB", _lines(("x" * 1_000_000, 1)), "INVALID_REQUEST"),
    ("an empty SKU", _lines(("", 1)), "INVALID_REQUEST"),
    ("quantity 0", _lines(("sku-1", 0)), "INVALID_REQUEST"),
    ("quantity int64 min", _lines(("sku-1", -(2**63))), "INVALID_REQUEST"),
    ("quantity int64 max", _lines(("sku-1", 2**63 - 1)), "INSUFFICIENT_STOCK"),
    ("a second line past the stock", _lines(("sku-1", 1), ("sku-3", 2**63 - 1)), "INSUFFICIENT_STOCK"),
    ("lines whose sum passes int64", _lines(("sku-1", 2**62), ("sku-3", 2**62), ("sku-2", 2**62)), "INSUFFICIENT_STOCK"),
    ("a SKU with no units", _lines(("sku-3", 1), ("sku-2", 1)), "INSUFFICIENT_STOCK"),
    ("an unknown SKU after a good line", _lines(("sku-1", 1), ("sku-unknown", 1)), "SKU_NOT_FOUND"),
    ("every unit of two SKUs", _lines(("sku-1", 991), ("sku-3", 498)), "OK"),  # what setup left available
    ("then one more", _lines(("sku-3", 1)), "INSUFFICIENT_STOCK"),
]


@ACROSS
async def test_order_lines_at_the_edges_get_their_answers_and_hold_all_or_nothing(fuzzer: Fuzzer):
    for n, (what, lines, answer) in enumerate(ORDER_EDGES):
        body = pb.ReserveOrderRequest(order_id=f"edge-{n}", lines=lines, timestamp_ms=n + 1).SerializeToString()
        for _ in range(2):  # again: a recorded refusal replays, an unrecorded one answers the same
            assert await fuzzer.send("ReserveOrder", body, what) == answer, what
    held, line = fuzzer.world.orders[0], fuzzer.world.reservations[-3]  # a RESERVED order hold and its sku-3 line
    ids = [
        ("an unknown order hold", "ord_" + "0" * 24, "RESERVATION_NOT_FOUND"),
        ("a NUL in the id", held + "\x00", "RESERVATION_NOT_FOUND"),
        ("an id of 100 kB", "ord_" + "x" * 100_000, "RESERVATION_NOT_FOUND"),
        ("no id", "", "CONTRACT_VIOLATION"),
    ]
    for what, oid, answer in ids:
        for method, request in (("ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=oid)),
                                ("ReleaseOrder", pb.ReleaseOrderRequest(order_hold_id=oid))):
            assert await fuzzer.send(method, request.SerializeToString(), what) == answer, (method, what)
        expected = "INVALID_REQUEST" if answer == "CONTRACT_VIOLATION" else answer
        assert await fuzzer.send("GetOrder", pb.GetOrderRequest(order_hold_id=oid).SerializeToString(), what) == expected, what
    # A line never moves alone, whatever the Confirm asks (recorded: another
    # quantity under its key is a reused key); its order's moves take every line.
    alone = pb.ConfirmRequest(reservation_id=line, quantity=2**63 - 1).SerializeToString()
    assert await fuzzer.send("Confirm", alone, "a line alone") == "INVALID_TRANSITION"
    other = pb.ConfirmRequest(reservation_id=line).SerializeToString()
    assert await fuzzer.send("Confirm", other, "a line alone, another quantity") == "IDEMPOTENCY_KEY_REUSED"
    assert await fuzzer.send("Release", pb.ReleaseRequest(reservation_id=line).SerializeToString(), "a line alone") == "INVALID_TRANSITION"
    stale = pb.ConfirmOrderRequest(order_hold_id=held, expected_version=2**64 - 1).SerializeToString()
    assert await fuzzer.send("ConfirmOrder", stale, "expected version uint64 max") == "VERSION_CONFLICT"
    assert await fuzzer.send("ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=held).SerializeToString(), "the order") == "OK"
    assert await fuzzer.send("ReleaseOrder", pb.ReleaseOrderRequest(order_hold_id=held).SerializeToString(), "confirmed") == "INVALID_TRANSITION"
    await fuzzer.survives()
    fuzzer.verdict(2 * len(ORDER_EDGES) + 3 * len(ids) + 6)


@ACROSS
async def test_an_order_of_many_bad_lines_is_an_invalid_request_the_client_can_read(fuzzer: Fuzzer):
    for count in (LINES_MAX, 60, 40):
        lines = _lines(*(("sku-1", 0) for _ in range(count)))
        body = pb.ReserveOrderRequest(order_id=f"bad-{count}", lines=lines, timestamp_ms=1).SerializeToString()
        for _ in range(3):
            assert await fuzzer.send("ReserveOrder", body, f"{count} bad lines") == "INVALID_REQUEST"
    fuzzer.verdict(9)


def _quantity_zero(n: int) -> tuple[str, str]:
    return f"lines[{n}].quantity", f"lines[{n}].quantity must be positive, got 0"


SHOWN = LINE_VIOLATIONS_SHOWN_MAX
# lines -> the violations answered: whole bad lines while at most SHOWN are named, then the rest counted.
BOUNDED_LINES = [
    ("60 bad lines", _lines(*((f"sku-{n}", 0) for n in range(60))),
     [*map(_quantity_zero, range(SHOWN)), ("lines", f"and {60 - SHOWN} more lines are invalid")]),
    ("one bad line more than shown", _lines(*((f"sku-{n}", 0) for n in range(SHOWN + 1))),
     [*map(_quantity_zero, range(SHOWN)), ("lines", "and 1 more line is invalid")]),
    ("as many bad lines as shown", _lines(*((f"sku-{n}", 0) for n in range(SHOWN))), [*map(_quantity_zero, range(SHOWN))]),
    ("a line of two violations across the bound", _lines(*((f"sku-{n}", 0) for n in range(SHOWN - 1)), ("", 0)),
     [*map(_quantity_zero, range(SHOWN - 1)), ("lines", "and 1 more line is invalid")]),
    ("bad lines among good ones", _lines(*((f"sku-{n}", n % 2) for n in range(2 * SHOWN + 6))),
     [*(_quantity_zero(n) for n in range(0, 2 * SHOWN, 2)), ("lines", "and 3 more lines are invalid")]),
]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # refused before the store is read: one pair will do
@pytest.mark.parametrize("what, lines, violations", BOUNDED_LINES, ids=[what for what, _, _ in BOUNDED_LINES])
async def test_an_order_names_its_first_bad_lines_and_counts_the_rest(channel: grpc.aio.Channel, what, lines, violations):
    rpc = channel.unary_unary(f"{SERVICE}/ReserveOrder", request_serializer=None, response_deserializer=None)
    body = pb.ReserveOrderRequest(order_id="bad", lines=lines, timestamp_ms=1).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rpc(body, timeout=TIMEOUT_S)
    refused = failure_of(raised.value)
    assert (refused.code, refused.domain, refused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, DOMAIN, "INVALID_REQUEST")
    assert list(refused.violations) == violations
    assert refused.message == "invalid request: " + "; ".join(why for _, why in violations)
    # The message and every trailer: far from the client's 8 KiB metadata limit.
    trailers = len(refused.message.encode()) + sum(len(key) + len(value) for key, value in refused.trailing.items())
    assert trailers < 4096, trailers


@ACROSS
async def test_an_order_move_naming_a_reservation_is_not_found_and_leaves_the_reservation_alone(fuzzer: Fuzzer):
    held, line = fuzzer.world.reservations[0], fuzzer.world.reservations[-3]
    for rid in (held, line):
        for method, request in (("ConfirmOrder", pb.ConfirmOrderRequest(order_hold_id=rid)),
                                ("ReleaseOrder", pb.ReleaseOrderRequest(order_hold_id=rid))):
            assert await fuzzer.send(method, request.SerializeToString(), "a reservation's id") == "RESERVATION_NOT_FOUND"
    assert await fuzzer.send("Confirm", pb.ConfirmRequest(reservation_id=fuzzer.world.orders[0]).SerializeToString(),
                             "an order hold's id") == "RESERVATION_NOT_FOUND"
    assert await fuzzer.send("Confirm", pb.ConfirmRequest(reservation_id=held).SerializeToString(), "the hold") == "OK"
    fuzzer.verdict(6)


# -- 2. malformed bodies -------------------------------------------------------------------


def malformed(
    rng: random.Random, method: str, valid: bytes, methods: dict = METHODS,
    hostile: Callable[[random.Random, str], object] | None = None,
) -> tuple[str, bytes]:
    """One malformed (or merely unusual) body, and what kind it is. Another
    service's suite passes its own `methods` (the shape of METHODS, string
    fields of kind "sku", "rid" or "text") and `hostile(rng, kind)` for
    kinds of its own (tests/test_fuzz_dispatch.py)."""
    hostile = hostile or hostile_value
    request_class, _, fields = methods[method]
    names = list(fields)
    name = rng.choice(names)
    number = field_number(request_class, name)
    strings = [n for n in names if fields[n] in STRING_KINDS]
    kind = rng.randrange(12)
    if kind == 0:
        return "random bytes", rng.randbytes(rng.choice((1, 2, 3, 8, 32, 64, 512, 4096)))
    if kind == 1 and len(valid) > 1:
        return "truncated", valid[: rng.randrange(1, len(valid))]
    if kind == 2 and strings:
        target = field_number(request_class, rng.choice(strings))
        bad = length_delimited(target, rng.choice(BAD_UTF8))
        if "lines" in fields and rng.random() < 0.5:  # inside a line: its sku_id
            bad = length_delimited(field_number(request_class, "lines"), length_delimited(1, rng.choice(BAD_UTF8)) + varint(16) + varint(1))
            return "invalid UTF-8 in a line", valid + bad
        return "invalid UTF-8", (valid + bad) if rng.random() < 0.5 else (bad + valid)
    if kind == 3:
        wrong = {
            "sku": (WIRE_VARINT, WIRE_FIXED32, WIRE_FIXED64), "rid": (WIRE_VARINT, WIRE_FIXED64),
            "text": (WIRE_VARINT, WIRE_FIXED32), "oid": (WIRE_VARINT, WIRE_FIXED32),
            "lines": (WIRE_VARINT, WIRE_FIXED32, WIRE_FIXED64),
        }.get(fields[name], (WIRE_LEN, WIRE_FIXED32, WIRE_FIXED64))
        if fields[name] == "lines" and rng.random() < 0.5:  # a line whose quantity is a string
            line = length_delimited(2, b"abc") + length_delimited(1, b"sku-1")
            return "wrong wire type inside a line", valid + length_delimited(number, line)
        wire = rng.choice(wrong)
        payload = {
            WIRE_VARINT: varint(rng.choice(INT64_EDGES)), WIRE_FIXED32: rng.randbytes(4),
            WIRE_FIXED64: rng.randbytes(8), WIRE_LEN: varint(3) + b"abc",
        }[wire]
        return f"wrong wire type {wire} for {name}", valid + tag(number, wire) + payload
    if kind == 4:
        unknown = rng.choice((6, 7, 15, 16, 100, 1000, 50_000, 2**29 - 1))
        wire = rng.choice((WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32))
        payload = {
            WIRE_VARINT: varint(rng.getrandbits(64)), WIRE_FIXED64: rng.randbytes(8),
            WIRE_LEN: varint(5) + rng.randbytes(5), WIRE_FIXED32: rng.randbytes(4),
        }[wire]
        return f"unknown field {unknown}", valid + tag(unknown, wire) + payload
    if kind == 5:
        return "overlong varint", tag(number, WIRE_VARINT) + b"\xff" * rng.choice((10, 11, 16)) + b"\x01"
    if kind == 6:
        claimed = rng.choice((5, 100, 2**31 - 1, 2**32, 2**63, 2**64 - 1))
        return "length past the end", tag(number, WIRE_LEN) + varint(claimed) + b"abc"
    if kind == 7:
        bad_tag = rng.choice((b"\x00", b"\x06", b"\x07", b"\x0e", b"\x0f", varint((2**29) << 3), b"\x80"))
        return "invalid tag", valid + bad_tag + b"\x01"
    if kind == 8:
        depth = rng.choice((1, 10, 99, 100, 101, 1000))
        groups = tag(9, WIRE_START) * depth + (tag(9, WIRE_END) * depth if rng.random() < 0.5 else b"")
        return f"groups nested {depth} deep", valid + groups
    if kind == 9:
        return "unmatched end group", valid + tag(rng.choice((1, 9)), WIRE_END)
    if kind == 10:
        again = request_class()
        value = hostile(rng, fields[name])
        if isinstance(value, list):  # a repeated field: its elements are appended, not replaced
            getattr(again, name).extend(value)
        else:
            setattr(again, name, value)
        return f"{name} repeated (last wins)", valid + again.SerializeToString()
    return "empty body", b""


def hostile_value(rng: random.Random, kind: str) -> object:
    if kind in STRING_KINDS:
        return rng.choice(HOSTILE_TEXT)
    if kind == "lines":
        return [pb.OrderLine(sku_id=rng.choice(HOSTILE_TEXT), quantity=rng.choice(INT64_EDGES)) for _ in range(rng.randint(1, 3))]
    if kind == "uint64":
        return rng.choice(UINT64_EDGES)
    return rng.choice(INT64_EDGES)


@ACROSS
async def test_malformed_bodies_are_invalid_requests_and_change_nothing(fuzzer: Fuzzer):
    methods = list(METHODS)
    for _ in range(1000):
        method = fuzzer.rng.choice(methods)
        valid = fuzzer.request(method).SerializeToString()
        what, body = malformed(fuzzer.rng, method, valid)
        await fuzzer.send(method, body, what)
    await fuzzer.survives()
    fuzzer.verdict(1000)
    assert fuzzer.answers.get("INVALID_REQUEST", 0) >= 300, fuzzer.answers


# -- 3. oversized strings ----------------------------------------------------------------------


SIZES = (4096, 65_536, 1_000_000)
FILLERS: tuple[Callable[[int], str], ...] = (
    lambda n: "x" * n,
    lambda n: "é" * (n // 2),  # two bytes each: about n bytes on the wire
    lambda n: "\x00" * n,
    lambda n: "\U0001f600" * (n // 4),
)


@ACROSS
async def test_oversized_strings_in_every_string_field_get_defined_answers(fuzzer: Fuzzer):
    for method, (request_class, _, fields) in METHODS.items():
        for name, kind in fields.items():
            if kind not in (*STRING_KINDS, "lines"):
                continue
            for size in SIZES:
                for fill in FILLERS:
                    request = fuzzer.request(method)
                    if kind == "lines":  # a line's sku_id, among sane lines
                        request.lines.add(sku_id=fill(size), quantity=1)
                    else:
                        setattr(request, name, fill(size))
                    await fuzzer.send(method, request.SerializeToString(), f"{name} of {size} bytes")
                # The same size, ending in a byte that is not UTF-8.
                number = field_number(request_class, name)
                text = b"x" * (size - 1) + b"\xff"
                body = length_delimited(number, length_delimited(1, text) if kind == "lines" else text)
                await fuzzer.send(method, body, f"{name} of {size} bytes, bad UTF-8 at the end")
            # A megabyte of unknown field next to a valid request.
            body = fuzzer.request(method).SerializeToString() + length_delimited(77, b"\x00" * 1_000_000)
            await fuzzer.send(method, body, "a 1 MB unknown field")
    await fuzzer.survives()
    fuzzer.verdict(9 * len(SIZES) * (len(FILLERS) + 1))
