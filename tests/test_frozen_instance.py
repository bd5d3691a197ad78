"""One of two instances frozen mid-batch (SIGSTOP) holds up the other only
within the stated bound, and loses nothing (holdfast.postgres, docs/locks.md).

Two `holdfast serve` processes share one PostgreSQL and one Redis, under a
load of Reserves on a hot SKU (both instances) and on SKUs only the second
one touches. The first is stopped while its store session sits `idle in
transaction`, holding the hot SKU's row. For the whole pause:

* the healthy instance answers every move on the other SKUs, within its
  budget: the moves that name the held row wait on the waiter, not in
  their batch;
* the server ends the frozen session once its batch's budgets are spent
  (IDLE_MAX_MS at most), and from then on the healthy instance's hot-SKU
  moves succeed.

After SIGCONT every Reserve sent is retried with its key until it answers,
and each SKU holds exactly one unit per Reserve: nothing acknowledged was
lost, nothing the frozen instance had in flight committed twice.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from dataclasses import dataclass

import grpc
import psycopg

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc
from holdfast.postgres import IDLE_MAX_MS
from tests.process import ServerProcess, start_server
from tests.support import failure_of

HOT = "frozen-hot"
COLD = tuple(f"frozen-cold-{n}" for n in range(8))
STOCK = 1_000_000
FREEZE_S = 6.0
BOUND_S = IDLE_MAX_MS / 1000
# The slack a 2-core machine running both servers, the load, PostgreSQL and
# Redis needs past the bound before the healthy instance's first answer.
SLACK_S = 1.5
CALL_TIMEOUT_S = 30.0


@dataclass
class Sent:
    request: pb.ReserveRequest
    instance: str
    started: float
    code: grpc.StatusCode | None = None
    reason: str = ""


async def reserve(stub: pb_grpc.InventoryServiceStub, request: pb.ReserveRequest) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.Reserve(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code(), failure_of(error).reason
    return grpc.StatusCode.OK, ""


def holding_sessions(url: str, pid: int) -> set[int]:
    """The backends of `pid`'s store sessions sitting idle inside a
    transaction that holds row locks (a transaction id of its own)."""
    with psycopg.connect(url, autocommit=True) as connection:
        found = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND state LIKE 'idle in transaction%%' AND backend_xid IS NOT NULL",
            (f"holdfast-{pid}",),
        ).fetchall()
    return {row[0] for row in found}


def freeze_mid_batch(server: ServerProcess, url: str) -> set[int]:
    """SIGSTOPs `server` at a moment one of its store sessions is inside a
    transaction holding rows; answers those sessions' backends."""
    for _ in range(300):
        server.send(signal.SIGSTOP)
        time.sleep(0.02)
        if held := holding_sessions(url, server.proc.pid):
            return held
        server.send(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the loaded instance was never caught inside a transaction holding rows")


def alive(url: str, backends: set[int]) -> set[int]:
    with psycopg.connect(url, autocommit=True) as connection:
        found = connection.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (list(backends),)).fetchall()
    return {row[0] for row in found}


async def test_a_frozen_instance_delays_the_other_only_on_its_rows_and_only_within_the_bound(postgres_url, redis_url):
    frozen = start_server(postgres_url, snapshot=redis_url)
    healthy = start_server(postgres_url, snapshot=redis_url)
    sent: list[Sent] = []
    ids = itertools.count()
    stop = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(frozen.target) as fc, grpc.aio.insecure_channel(healthy.target) as hc:
            stubs = {"frozen": pb_grpc.InventoryServiceStub(fc), "healthy": pb_grpc.InventoryServiceStub(hc)}
            for sku in (HOT, *COLD):
                await stubs["healthy"].PutStock(pb.PutStockRequest(sku_id=sku, total=STOCK, request_id="stock"))

            async def worker(instance: str, skus: tuple[str, ...]) -> None:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    i = next(ids)
                    request = pb.ReserveRequest(order_id=f"o{i}", sku_id=skus[n % len(skus)], quantity=1, timestamp_ms=i + 1)
                    call = Sent(request, instance, time.monotonic())
                    sent.append(call)
                    call.code, call.reason = await reserve(stubs[instance], request)

            workers = [asyncio.create_task(worker("frozen", (HOT,))) for _ in range(8)]
            workers += [asyncio.create_task(worker("healthy", (HOT,))) for _ in range(3)]
            workers += [asyncio.create_task(worker("healthy", COLD)) for _ in range(3)]
            await asyncio.sleep(1.5)

            held = await asyncio.to_thread(freeze_mid_batch, frozen, postgres_url)
            frozen_at = time.monotonic()
            await asyncio.sleep(BOUND_S + SLACK_S)
            # The frozen sessions were ended: their row locks are gone with them.
            assert not await asyncio.to_thread(alive, postgres_url, held), healthy.output()
            await asyncio.sleep(FREEZE_S - BOUND_S - SLACK_S)
            thawed_at = time.monotonic()
            frozen.send(signal.SIGCONT)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), CALL_TIMEOUT_S * 2)

            during = [s for s in sent if s.instance == "healthy" and frozen_at <= s.started < thawed_at]
            cold = [s for s in during if s.request.sku_id != HOT]
            hot = [s for s in during if s.request.sku_id == HOT]
            assert len(cold) > 20 and len(hot) > 5, (len(cold), len(hot))
            refused = [(s.request.sku_id, s.code, s.reason) for s in cold if s.code is not grpc.StatusCode.OK]
            assert not refused, f"moves on SKUs the frozen instance never held were refused: {refused[:5]}"
            late = [s for s in hot if s.started >= frozen_at + BOUND_S + SLACK_S]
            assert late, "no hot-SKU call was made after the bound"
            stuck = [(round(s.started - frozen_at, 2), s.code, s.reason) for s in late if s.code is not grpc.StatusCode.OK]
            assert not stuck, f"hot-SKU moves past the bound (s after the freeze, code, reason): {stuck[:5]}"
            early = {(s.code, s.reason) for s in hot if s.code is not grpc.StatusCode.OK}
            assert early <= {(grpc.StatusCode.DEADLINE_EXCEEDED, "BUDGET_EXCEEDED")}, early

            # Every Reserve sent, retried under its key until it answers: one unit held each.
            for call in (s for s in sent if s.code is not grpc.StatusCode.OK):
                for _ in range(10):
                    call.code, call.reason = await reserve(stubs["healthy"], call.request)
                    if call.code is grpc.StatusCode.OK:
                        break
                assert call.code is grpc.StatusCode.OK, (call.request, call.code, call.reason)
            for sku in (HOT, *COLD):
                stock = await stubs["healthy"].GetStock(pb.GetStockRequest(sku_id=sku))
                reserved = sum(1 for s in sent if s.request.sku_id == sku)
                assert (stock.held, stock.available, stock.sold) == (reserved, STOCK - reserved, 0), (sku, stock, reserved)
    finally:
        frozen.send(signal.SIGCONT)
        for server in (frozen, healthy):
            server.close()
