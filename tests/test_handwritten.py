"""The hand-written baseline (holdfast.handwritten), run as the benchmark runs it:
`python -m holdfast.handwritten` as a child process on a free port, over real
PostgreSQL and Redis (tests/backends.py), driven over real gRPC.

It must be what a team would write instead, not a straw man: exact stock
figures, a duplicate key answered with the first call's bytes and held once,
no oversell under concurrent Reserves, and the statuses holdfast answers.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from holdfast.apps.inventory import reservation_id
from holdfast.call import idempotency_key
from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc
from tests.process import ROOT, _Lines, child_env, free_port

pytest.importorskip("asyncpg")

READY_LINE = "handwritten serving "
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
PREFIX = "/holdfast.inventory.v1.InventoryService/"


class Handwritten:
    """The baseline as a child process, up once it printed its ready line."""

    def __init__(self, postgres_url: str, redis_url: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "holdfast.handwritten",
                     "--listen", self.target, "--postgres", postgres_url, "--redis", redis_url]
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)

    def wait_ready(self) -> str:
        line = self.stdout.wait_for(lambda l: l.startswith(READY_LINE), START_TIMEOUT_S)
        assert line is not None, f"not serving within {START_TIMEOUT_S} s:\n{self.output()}"
        return line

    def output(self) -> str:
        return f"$ {' '.join(self.args)}\n--- stdout\n{self.stdout.text()}\n--- stderr\n{self.stderr.text()}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(STOP_TIMEOUT_S)
        self.stdout.join(STOP_TIMEOUT_S)
        self.stderr.join(STOP_TIMEOUT_S)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def handwritten(postgres_url: str, redis_url: str) -> Iterator[Handwritten]:
    server = Handwritten(postgres_url, redis_url)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@pytest.fixture
async def stub(handwritten: Handwritten):
    async with grpc.aio.insecure_channel(handwritten.target) as channel:
        yield pb_grpc.InventoryServiceStub(channel)


def reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError(f"no ErrorInfo in {status}")


def stock_figures(reply: pb.StockReply) -> tuple[int, int, int, int]:
    return reply.total, reply.available, reply.held, reply.sold


async def test_reserve_then_confirm_gives_exact_stock_figures(stub, handwritten: Handwritten) -> None:
    put = await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=10, request_id="r1"))
    assert (stock_figures(put), put.version) == ((10, 10, 0, 0), 1)

    request = pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=3, timestamp_ms=1000)
    held = await stub.Reserve(request)
    # The id holdfast derives from the same key: the bench names it without reading the reply.
    expected_id = reservation_id(idempotency_key(PREFIX + "Reserve", ("order-1", "sku-1", 1000)))
    assert held.reservation_id == expected_id
    assert (held.order_id, held.sku_id, held.quantity, held.version) == ("order-1", "sku-1", 3, 1)
    assert held.state == pb.RESERVATION_STATE_RESERVED
    assert held.expires_at_ms > 0
    assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (10, 7, 3, 0)

    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id))
    assert (confirmed.state, confirmed.version, confirmed.quantity) == (pb.RESERVATION_STATE_CONFIRMED, 2, 3)
    assert confirmed.expires_at_ms == held.expires_at_ms
    after = await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))
    assert (stock_figures(after), after.version) == ((10, 7, 0, 3), 3)

    # A Release returns what it held; a confirmed reservation cannot be released.
    other = await stub.Reserve(pb.ReserveRequest(order_id="order-2", sku_id="sku-1", quantity=2, timestamp_ms=1000))
    assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (10, 5, 2, 3)
    released = await stub.Release(pb.ReleaseRequest(reservation_id=other.reservation_id, reason="changed mind"))
    assert (released.state, released.version) == (pb.RESERVATION_STATE_RELEASED, 2)
    assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (10, 7, 0, 3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Release(pb.ReleaseRequest(reservation_id=held.reservation_id))
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION")

    # A new total keeps what is sold: available is the rest.
    put = await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=20, request_id="r2"))
    assert stock_figures(put) == (20, 17, 0, 3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=2, request_id="r3"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_same_reserve_twice_replays_its_bytes_and_holds_once(stub, handwritten: Handwritten) -> None:
    await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=100, request_id="r1"))
    async with grpc.aio.insecure_channel(handwritten.target) as channel:
        reserve = channel.unary_unary(PREFIX + "Reserve", request_serializer=pb.ReserveRequest.SerializeToString)
        request = pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=4, timestamp_ms=7)
        first = await reserve(request)
        second = await reserve(request)
        assert isinstance(first, bytes) and first == second
        assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (100, 96, 4, 0)

        # Duplicates in flight at once: one holds, every one answers its bytes.
        racing = pb.ReserveRequest(order_id="order-2", sku_id="sku-1", quantity=5, timestamp_ms=7)
        answers = await asyncio.gather(*(reserve(racing) for _ in range(20)))
        assert len(set(answers)) == 1
        assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (100, 91, 9, 0)

        # The same key with another request is refused, and holds nothing.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reserve(pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=6, timestamp_ms=7))
        assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")

        # A Confirm repeated is answered the first Confirm's bytes; it sells once.
        confirm = channel.unary_unary(PREFIX + "Confirm", request_serializer=pb.ConfirmRequest.SerializeToString)
        rid = pb.ReservationReply.FromString(first).reservation_id
        once = await confirm(pb.ConfirmRequest(reservation_id=rid))
        assert await confirm(pb.ConfirmRequest(reservation_id=rid)) == once
        assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="sku-1"))) == (100, 91, 5, 4)


async def test_concurrent_reserves_never_oversell(stub) -> None:
    await stub.PutStock(pb.PutStockRequest(sku_id="hot", total=10, request_id="r1"))

    async def one(n: int) -> str:
        try:
            await stub.Reserve(pb.ReserveRequest(order_id=f"order-{n}", sku_id="hot", quantity=1, timestamp_ms=1))
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}/{reason(error)}"
        return "OK"

    answers = await asyncio.gather(*(one(n) for n in range(50)))
    assert answers.count("OK") == 10, answers
    assert answers.count("FAILED_PRECONDITION/INSUFFICIENT_STOCK") == 40, answers
    assert stock_figures(await stub.GetStock(pb.GetStockRequest(sku_id="hot"))) == (10, 0, 10, 0)


async def test_refusals_are_grpc_statuses(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Confirm(pb.ConfirmRequest(reservation_id="rsv_nobody"))
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetStock(pb.GetStockRequest(sku_id="no-such-sku"))
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.NOT_FOUND, "SKU_NOT_FOUND")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="no-such-sku", quantity=1, timestamp_ms=1))
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.NOT_FOUND, "SKU_NOT_FOUND")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Reserve(pb.ReserveRequest(order_id="o", sku_id="sku-1", quantity=0, timestamp_ms=1))
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReserveOrder(pb.ReserveOrderRequest(order_id="o"))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_it_prints_one_ready_line_and_stops_cleanly_on_sigterm(handwritten: Handwritten) -> None:
    assert handwritten.stop() == 0, handwritten.output()
    lines = handwritten.stdout.lines
    assert len(lines) == 1 and lines[0].startswith(f"{READY_LINE}InventoryService on {handwritten.target} "), lines
