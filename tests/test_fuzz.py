"""Hostile input over real gRPC: every call gets a defined answer, and a
refused call changes nothing.

A seeded generator (set HOLDFAST_FUZZ_SEED to explore, the failure message
names the seed and the exact request bytes) sends about 2,300 calls per
run to a real server, one at a time, each as raw wire bytes
(`request_serializer=None`), on the embedded pair and on PostgreSQL + Redis:

* well-formed requests with hostile field values: int64 and uint64 edges,
  zero, -1, huge quantities, hold_ms edges, control characters and NUL,
  unicode of every plane, over-long and look-alike ids, mixed with sane
  values so calls get past the first check and into the engine;
* malformed bodies: random bytes, truncated messages, invalid UTF-8 in
  string fields, wrong wire types, unknown fields, bad varints and lengths,
  invalid tags, deep groups;
* oversized strings in every string field, up to about 1 MB (gRPC's default
  limit is 4 MB).

For each call: the status is defined (never INTERNAL or UNKNOWN, and a
client timeout of 10 s is a failure, so no hang either); an error carries a
holdfast ErrorInfo whose reason maps to that status (DESIGN.md's error
table); a body the client-side protobuf cannot parse is INVALID_REQUEST and
one it can parse is never called undecodable; a missing key field is a
CONTRACT_VIOLATION. The store (stock, reservations and recorded outcomes,
read inside a store transaction) is compared before and after every call:
a refusal that is not recorded under its key changes nothing at all, a
recorded refusal (or a replay) changes nothing but, at most, its own outcome
record. At the end the server still answers its health check and a valid call.
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

from holdfast.outcome import DOMAIN, Reason, reason_named
from holdfast.server import Config, Running
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
    "Confirm": (pb.ConfirmRequest, pb.ReservationReply, {"reservation_id": "rid", "expected_version": "uint64"}),
    "Release": (pb.ReleaseRequest, pb.ReservationReply, {"reservation_id": "rid", "reason": "text"}),
    "GetReservation": (pb.GetReservationRequest, pb.ReservationReply, {"reservation_id": "rid"}),
}
KEY_FIELDS = {
    "PutStock": ("sku_id", "request_id"),
    "Reserve": ("order_id", "sku_id", "timestamp_ms"),
    "Confirm": ("reservation_id",),
    "Release": ("reservation_id",),
}

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

    skus: list[str] = field(default_factory=lambda: ["sku-1", "sku-2"])
    reservations: list[str] = field(default_factory=list)


@pytest.fixture(params=["embedded", "postgres+redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Hostile strings reach SQLite and PostgreSQL (NUL bytes, odd unicode), so both run."""
    return request.param


@pytest.fixture
def config(tmp_path, backend: str, request: pytest.FixtureRequest) -> Config:
    """The server of tests/conftest.py, with a reaper that never fires during
    the run: a fuzzed 1 ms hold expiring between two snapshots would look
    like a refused call changing state."""
    if backend == "embedded":
        store, snapshot = f"sqlite:///{tmp_path}/holdfast.db", "memory://"
    else:
        store, snapshot = request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url")
    return Config(listen="127.0.0.1:0", store=store, snapshot=snapshot, reaper_interval_ms=3_600_000, apps=BUILT_IN_APPS)


def dump(txn) -> tuple[tuple, tuple, dict]:
    """Everything the store holds. Test-only: reads the tables with the
    store's own cursor, inside one of its transactions, so it is ordered
    with the moves (SQLite and PostgreSQL speak the same SQL here)."""
    stock = tuple(txn._execute("SELECT * FROM stock ORDER BY sku_id").fetchall())
    reservations = tuple(txn._execute("SELECT * FROM reservation ORDER BY reservation_id").fetchall())
    outcomes = {bytes(row[0]): tuple(row[1:]) for row in txn._execute("SELECT key, fingerprint, reason, payload FROM outcome")}
    return stock, reservations, outcomes


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

    async def state(self) -> tuple[tuple, tuple, dict]:
        return await self.server.engine.store.transact(dump)

    async def setup(self) -> None:
        """sku-1 with 1,000 units, sku-2 with none; a RESERVED, a CONFIRMED
        and a RELEASED reservation, all on sku-1."""
        stub = self._unary
        await stub("PutStock", pb.PutStockRequest(sku_id="sku-1", total=1000, request_id="init").SerializeToString())
        await stub("PutStock", pb.PutStockRequest(sku_id="sku-2", total=0, request_id="init").SerializeToString())
        for n in range(3):
            body = pb.ReserveRequest(order_id=f"order-{n}", sku_id="sku-1", quantity=2, timestamp_ms=n + 1)
            reply = pb.ReservationReply.FromString(await stub("Reserve", body.SerializeToString()))
            self.world.reservations.append(reply.reservation_id)
        await stub("Confirm", pb.ConfirmRequest(reservation_id=self.world.reservations[1]).SerializeToString())
        await stub("Release", pb.ReleaseRequest(reservation_id=self.world.reservations[2]).SerializeToString())

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

    def _judge(self, method, body, reply, error, before, after, trailing) -> str | None:
        request_class, reply_class, _ = METHODS[method]
        try:
            request = request_class.FromString(body)
        except DecodeError:
            request = None
        if error is None:
            self.answers["OK"] = self.answers.get("OK", 0) + 1
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
                return _changed(before, after, outcomes_may_grow=False)
            return None
        code = error.code()
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return f"{code.name}: {error.details()!r}"
        try:
            failure = failure_of(error)
        except AssertionError:
            return f"{code.name} without google.rpc.Status details (a client timeout is a hang): {error.details()!r}"
        self.answers[failure.reason] = self.answers.get(failure.reason, 0) + 1
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
        return _changed(before, after, outcomes_may_grow=reason.recorded)

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
        if kind == "text":
            return f"id-{rng.randrange(50)}" if sane else self.text()
        if kind == "int64":
            return rng.randint(1, 5) if sane else (rng.choice(INT64_EDGES) if rng.random() < 0.8 else rng.randint(-(2**63), 2**63 - 1))
        if kind == "uint64":
            return rng.randint(0, 3) if sane else (rng.choice(UINT64_EDGES) if rng.random() < 0.8 else rng.randint(0, 2**64 - 1))
        if kind == "hold":
            return rng.choice((0, 60_000)) if sane else rng.choice(HOLD_EDGES)
        raise AssertionError(kind)

    def request(self, method: str):
        request_class, _, fields = METHODS[method]
        values = {name: self.value(kind) for name, kind in fields.items() if self.rng.random() < 0.9}
        return request_class(**values)


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
    strings = [n for n in names if fields[n] in ("sku", "rid", "text")]
    kind = rng.randrange(12)
    if kind == 0:
        return "random bytes", rng.randbytes(rng.choice((1, 2, 3, 8, 32, 64, 512, 4096)))
    if kind == 1 and len(valid) > 1:
        return "truncated", valid[: rng.randrange(1, len(valid))]
    if kind == 2 and strings:
        target = field_number(request_class, rng.choice(strings))
        bad = length_delimited(target, rng.choice(BAD_UTF8))
        return "invalid UTF-8", (valid + bad) if rng.random() < 0.5 else (bad + valid)
    if kind == 3:
        wrong = {
            "sku": (WIRE_VARINT, WIRE_FIXED32, WIRE_FIXED64), "rid": (WIRE_VARINT, WIRE_FIXED64),
            "text": (WIRE_VARINT, WIRE_FIXED32),
        }.get(fields[name], (WIRE_LEN, WIRE_FIXED32, WIRE_FIXED64))
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
        setattr(again, name, hostile(rng, fields[name]))
        return f"{name} repeated (last wins)", valid + again.SerializeToString()
    return "empty body", b""


def hostile_value(rng: random.Random, kind: str) -> object:
    if kind in ("sku", "rid", "text"):
        return rng.choice(HOSTILE_TEXT)
    if kind == "uint64":
        return rng.choice(UINT64_EDGES)
    return rng.choice(INT64_EDGES)


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


async def test_oversized_strings_in_every_string_field_get_defined_answers(fuzzer: Fuzzer):
    for method, (request_class, _, fields) in METHODS.items():
        for name, kind in fields.items():
            if kind not in ("sku", "rid", "text"):
                continue
            for size in SIZES:
                for fill in FILLERS:
                    request = fuzzer.request(method)
                    setattr(request, name, fill(size))
                    await fuzzer.send(method, request.SerializeToString(), f"{name} of {size} bytes")
                # The same size, ending in a byte that is not UTF-8.
                number = field_number(request_class, name)
                body = length_delimited(number, b"x" * (size - 1) + b"\xff")
                await fuzzer.send(method, body, f"{name} of {size} bytes, bad UTF-8 at the end")
            # A megabyte of unknown field next to a valid request.
            body = fuzzer.request(method).SerializeToString() + length_delimited(77, b"\x00" * 1_000_000)
            await fuzzer.send(method, body, "a 1 MB unknown field")
    await fuzzer.survives()
    fuzzer.verdict(9 * len(SIZES) * (len(FILLERS) + 1))
