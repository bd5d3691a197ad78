"""Duplicates that wait: the contract's `on_duplicate`.

A call whose key is running now is refused (REQUEST_IN_FLIGHT) under
ON_DUPLICATE_REFUSE, the default; under ON_DUPLICATE_WAIT it waits, within
its own budget, for the running call and answers what that call recorded,
byte for byte and marked replayed. On one instance the engine hands the
record over; across instances the store orders the two calls, and the one
that lost answers the winner's record. Tests: the engine with a toy move
(one row per outcome), the tables example over real gRPC, and two real
servers on PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from holdfast.call import Call, idempotency_key, serving
from holdfast.clock import SystemClock
from holdfast.contracts.contract import Contract, OnDuplicate, Retry
from holdfast.engine import Engine, Move
from holdfast.backends import open_store
from holdfast.memory_snapshot import MemorySnapshot
from holdfast.outcome import Reason, failure, success
from holdfast.server import Config, start
from tests.process import ROOT, ServerProcess

TABLES = ROOT / "examples" / "tables"
SERVICE = "/restaurant.tables.v1.TableService"
HOUR_MS = 60 * 60 * 1000


# -- the engine, with a toy move ---------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path):
    store = open_store(f"sqlite:///{tmp_path}/toy.db")
    await store.open()
    snapshot = MemorySnapshot()
    made = Engine(store, snapshot, SystemClock())
    await snapshot.open(lambda: _no_pages())
    yield made
    await store.close()


async def _no_pages():
    return
    yield


class Gate:
    """Holds a move inside its store transaction until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self, answer):
        def apply(txn, now_ms):
            self.entered.set()
            assert self.release.wait(10), "the test never let the move go"
            return answer

        return apply

    async def running(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


KEY = hashlib.sha256(b"toy-key").digest()


def toy(apply, on_duplicate: OnDuplicate | None, fingerprint: bytes = b"fp") -> Move:
    return Move("/toy.v1.Toy/Do", KEY, fingerprint, None, apply, on_duplicate=on_duplicate)


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def answered(text: bytes):
    return lambda txn, now_ms: success(text)


async def race(engine: Engine, gate: Gate, first_answer, duplicate: Move, duplicate_deadline: float | None = None):
    """Runs a held first move, then `duplicate` while it runs; lets the first
    go once the duplicate has had time to answer or wait."""
    first = asyncio.create_task(engine.move(toy(gate.hold(first_answer), OnDuplicate.WAIT), soon(10)))
    await gate.running()
    second = asyncio.create_task(engine.move(duplicate, duplicate_deadline or soon(10)))
    await asyncio.sleep(0.2)
    early = second.done()
    gate.release.set()
    return await first, await second, early


async def test_a_waiting_duplicate_answers_the_running_moves_bytes_replayed(engine):
    first, second, early = await race(engine, Gate(), success(b"reply bytes"), toy(answered(b"other"), OnDuplicate.WAIT))
    assert not early, "the duplicate answered before the running move had"
    assert (first.reason, first.payload, first.replayed) == (None, b"reply bytes", False)
    assert (second.reason, second.payload, second.replayed) == (None, b"reply bytes", True)
    again = await engine.move(toy(answered(b"other"), OnDuplicate.WAIT), soon(10))  # and the store agrees
    assert (again.payload, again.replayed) == (b"reply bytes", True)


async def test_a_waiting_duplicate_replays_a_recorded_refusal_byte_for_byte(engine):
    refusal = failure(Reason.INVALID_TRANSITION, "recorded under the key")
    first, second, _ = await race(engine, Gate(), refusal, toy(answered(b"other"), OnDuplicate.WAIT))
    assert (second.reason, second.payload, second.replayed) == (Reason.INVALID_TRANSITION, first.payload, True)


async def test_a_waiting_duplicate_with_another_payload_is_told_the_key_was_reused(engine):
    duplicate = toy(answered(b"other"), OnDuplicate.WAIT, fingerprint=b"another payload")
    first, second, early = await race(engine, Gate(), success(b"reply bytes"), duplicate)
    assert not early and first.ok
    assert second.reason is Reason.IDEMPOTENCY_KEY_REUSED


async def test_a_waiting_duplicates_own_budget_ends_its_wait_with_budget_exceeded(engine):
    gate = Gate()
    duplicate = toy(answered(b"other"), OnDuplicate.WAIT)
    first, second, early = await race(engine, gate, success(b"reply bytes"), duplicate, soon(0.05))
    assert early, "the duplicate waited past its own budget"
    assert (second.reason, second.replayed) == (Reason.BUDGET_EXCEEDED, False)
    assert (first.reason, first.payload) == (None, b"reply bytes")


async def test_a_running_move_that_recorded_nothing_lets_the_waiter_run_its_own(engine):
    unrecorded = failure(Reason.ENTITY_NOT_FOUND, "not recorded: the waiter must not copy it")
    first, second, early = await race(engine, Gate(), unrecorded, toy(answered(b"the waiter's own"), OnDuplicate.WAIT))
    assert not early and first.reason is Reason.ENTITY_NOT_FOUND
    assert (second.reason, second.payload, second.replayed) == (None, b"the waiter's own", False)


@pytest.mark.parametrize("on_duplicate", [OnDuplicate.REFUSE, None])
async def test_a_refusing_duplicate_is_refused_in_flight_at_once(engine, on_duplicate):
    first, second, early = await race(engine, Gate(), success(b"reply bytes"), toy(answered(b"other"), on_duplicate))
    assert early and first.ok
    assert (second.reason, second.replayed) == (Reason.REQUEST_IN_FLIGHT, False)


def _contract(on_duplicate: OnDuplicate) -> Contract:
    return Contract("/toy.v1.Toy/Do", 2000, ("id",), Retry(1, 0, ()), 0, "toy", True, on_duplicate)


async def test_a_move_of_the_current_call_follows_its_contract(engine):
    """Move.on_duplicate None: the contract of the call being served decides
    for the call's own key (how an app that builds its Moves by hand, as the
    inventory does, gets its contract's choice)."""
    call = Call(_contract(OnDuplicate.WAIT), KEY, b"fp", "ctx", soon(10))
    with serving(call):
        first, second, early = await race(engine, Gate(), success(b"reply bytes"), toy(answered(b"other"), None))
    assert not early and (second.payload, second.replayed) == (b"reply bytes", True)


# -- the tables example over real gRPC: Book waits -------------------------------------------------


def _raw(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


async def _call(channel: grpc.aio.Channel, method: str, request: bytes) -> tuple[str, bytes, str]:
    """(status name, reply or status-details bytes, holdfast-replayed)."""
    call = _raw(channel, method)(request, timeout=10)
    try:
        reply = await call
        code, body = "OK", reply
    except grpc.aio.AioRpcError as error:
        trailing = dict(error.trailing_metadata() or ())
        return error.code().name, trailing.get("grpc-status-details-bin", b""), trailing.get("holdfast-replayed", "")
    trailing = dict(await call.trailing_metadata() or ())
    return code, body, trailing["holdfast-replayed"]


def _book(pb, table_id: str) -> bytes:
    slot_ms = (time.time_ns() // 1_000_000 // HOUR_MS + 24) * HOUR_MS
    return pb.BookRequest(table_id=table_id, slot_start_ms=slot_ms, party_size=2, guest="Ada").SerializeToString()


@pytest.fixture
def tables_pb(monkeypatch):
    monkeypatch.syspath_prepend(str(TABLES))
    from restaurant.tables.v1 import tables_pb2

    return tables_pb2


async def test_a_duplicate_book_over_grpc_waits_and_gets_the_first_answers_bytes(tmp_path, tables_pb):
    running = await start(Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/t.db", snapshot="memory://",
                                 apps=("tables:Tables",)))
    store = running.engine.store
    transact, held, release = store.transact, asyncio.Event(), asyncio.Event()

    request = _book(tables_pb, "table-9")
    parsed = tables_pb.BookRequest.FromString(request)
    key = idempotency_key(f"{SERVICE}/Book", (parsed.table_id, parsed.slot_start_ms))

    async def slow_first(work, deadline=None, prefetch=None):
        if prefetch is not None and key in prefetch.keys and not held.is_set():  # the first Book's move waits
            held.set()
            await release.wait()
        return await transact(work, deadline, prefetch)

    store.transact = slow_first  # type: ignore[method-assign]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            first = asyncio.create_task(_call(channel, "Book", request))
            await asyncio.wait_for(held.wait(), 10)
            second = asyncio.create_task(_call(channel, "Book", request))
            await asyncio.sleep(0.2)
            assert not second.done(), "the duplicate did not wait"
            release.set()
            (code, body, replayed), (code2, body2, replayed2) = await first, await second
    finally:
        store.transact = transact  # type: ignore[method-assign]
        await running.stop(0)
    assert (code, replayed) == ("OK", "false")
    assert (code2, body2, replayed2) == ("OK", body, "true")
    assert tables_pb.BookingReply.FromString(body).state == tables_pb.BOOKING_STATE_BOOKED


def test_the_built_in_apis_keep_refusing_and_the_example_waits():
    from holdfast.apps.fulfillment import Dispatch
    from holdfast.apps.inventory import Inventory
    from holdfast.contracts.contract import of_service

    for service in (Inventory, Dispatch):
        assert {c.on_duplicate for c in of_service(service.DESCRIPTOR).values()} == {OnDuplicate.REFUSE}


# -- across instances: two servers on PostgreSQL + Redis ----------------------------------------------


def _serve(store: str, snapshot: str) -> ServerProcess:
    server = ServerProcess(store, snapshot=snapshot, extra=("--app", "tables:Tables"), cwd=TABLES)
    server.wait_ready()
    return server


def _waiting_on_locks(url: str, count: int, timeout_s: float = 5.0) -> bool:
    """True once `count` other backends wait for a row lock."""
    end = time.monotonic() + timeout_s
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < end:
            (waiting,) = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()
            if waiting >= count:
                return True
            time.sleep(0.02)
    return False


async def test_duplicates_on_two_instances_answer_one_outcome_byte_for_byte(postgres_url, redis_url, tables_pb):
    """The same Seat sent to two instances at once. The test holds the
    booking's row lock until both wait for it, so the race is the worst one:
    both have looked for a record under the key (none yet) and read the
    snapshot's version; one then moves the booking, and the other finds it
    moved on. Under WAIT that other one answers the winner's record,
    replayed, rather than VERSION_CONFLICT."""
    servers = [_serve(postgres_url, redis_url) for _ in range(2)]
    try:
        channels = [grpc.aio.insecure_channel(server.target) for server in servers]
        code, body, _ = await _call(channels[0], "Book", _book(tables_pb, "table-7"))
        assert code == "OK"
        booking_id = tables_pb.BookingReply.FromString(body).booking_id
        seat = tables_pb.SeatRequest(booking_id=booking_id).SerializeToString()
        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT version FROM entity WHERE entity_id = %s FOR UPDATE", (booking_id,))
            answers = [asyncio.create_task(_call(channel, "Seat", seat)) for channel in channels]
            both_wait = await asyncio.to_thread(_waiting_on_locks, postgres_url, 2)
            holder.commit()
        results = await asyncio.gather(*answers)
        for channel in channels:
            await channel.close()
    finally:
        for server in servers:
            server.close()
    assert both_wait, "the two Seats did not both reach the row lock"
    (code_a, body_a, replayed_a), (code_b, body_b, replayed_b) = results
    assert (code_a, code_b) == ("OK", "OK"), results
    assert body_a == body_b
    assert sorted((replayed_a, replayed_b)) == ["false", "true"]
    assert tables_pb.BookingReply.FromString(body_a).state == tables_pb.BOOKING_STATE_SEATED


# -- the option as the runtime reads it -----------------------------------------------------------


@pytest.mark.parametrize(("key", "number", "refused"), [
    (("id",), 1, None),
    ((), 0, None),
    ((), 1, "on_duplicate WAIT needs idempotency_key fields"),
    (("id",), 7, "on_duplicate 7 is not one this holdfast knows"),
])
def test_the_runtime_reads_the_option_and_refuses_what_it_cannot_serve(key, number, refused):
    from google.protobuf import descriptor_pb2, descriptor_pool

    from holdfast.contract.v1 import contract_pb2
    from holdfast.contracts.contract import of_service

    name = f"toy{number}{len(key)}"
    proto = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package=name, syntax="proto3",
                                               dependency=["google/protobuf/descriptor.proto",
                                                           contract_pb2.DESCRIPTOR.name])
    proto.message_type.add(name="Req").field.add(name="id", number=1, type=9, label=1)
    method = proto.service.add(name="Toy").method.add(name="Do", input_type=f".{name}.Req", output_type=f".{name}.Req")
    option = method.options.Extensions[contract_pb2.contract]
    option.timeout_ms, option.sla, option.on_duplicate = 1000, "toy", number
    option.idempotency_key.extend(key)
    pool = descriptor_pool.Default()
    service = pool.FindFileByName(pool.AddSerializedFile(proto.SerializeToString()).name).services_by_name["Toy"]
    if refused is None:
        (contract,) = of_service(service).values()
        assert contract.on_duplicate is OnDuplicate(number)
    else:
        with pytest.raises(ValueError, match=refused):
            of_service(service)
