"""A server killed with SIGKILL mid-load restarts with every acknowledged move
present and the stock invariant intact.

`holdfast serve` runs as a real process on a SQLite file. A load of concurrent
Reserves (plus Confirms and Releases of acknowledged holds) runs against it;
every acknowledged (OK) reply is recorded with its exact bytes. Once enough
moves are acknowledged the process is SIGKILLed while calls are in flight,
and a new server is started on the same file. Then:

* every acknowledged move replays with identical reply bytes and
  `holdfast-replayed: true`, and the store reads at least the state it had;
* calls that were in flight at the kill (never acknowledged) either replay
  (they committed before the kill) or commit now, exactly once;
* the stock adds up: available + held + sold == total, held and sold are the
  quantities of the RESERVED and CONFIRMED reservations, and the stock's
  version counts every stock move exactly once.
"""

from __future__ import annotations

import asyncio
import random
import signal
from dataclasses import dataclass, field

import grpc

from holdfast.inventory.v1 import inventory_pb2 as pb

from tests.process import ServerProcess, start_server
from tests.support import failure_of

SERVICE = "/holdfast.inventory.v1.InventoryService/"
SKU = "sku-crash"
TOTAL = 100_000
WORKERS = 64
ACKED_BEFORE_KILL = 300
CALL_TIMEOUT_S = 15.0
LOAD_TIMEOUT_S = 30.0

REPLY_TYPES = {
    "PutStock": pb.StockReply,
    "GetStock": pb.StockReply,
    "Reserve": pb.ReservationReply,
    "Confirm": pb.ReservationReply,
    "Release": pb.ReservationReply,
    "GetReservation": pb.ReservationReply,
}


@dataclass
class Ack:
    method: str
    request: object
    reply: bytes
    context_id: str


@dataclass
class Ledger:
    """What the clients sent and what the server acknowledged."""

    sent: list[tuple[str, object]] = field(default_factory=list)
    acked: list[Ack] = field(default_factory=list)
    early_failures: list[tuple[str, object, str]] = field(default_factory=list)
    late_failures: list[grpc.StatusCode] = field(default_factory=list)
    in_flight: int = 0
    killed: bool = False


async def call(channel: grpc.aio.Channel, method: str, request) -> tuple[bytes, dict]:
    """One unary call; the reply's exact bytes and the trailing metadata."""
    rpc = channel.unary_unary(
        SERVICE + method, request_serializer=type(request).SerializeToString, response_deserializer=None
    )
    pending = rpc(request, timeout=CALL_TIMEOUT_S)
    reply = await pending
    return reply, dict(await pending.trailing_metadata())


async def reply_of(channel: grpc.aio.Channel, method: str, request):
    reply, _ = await call(channel, method, request)
    return REPLY_TYPES[method].FromString(reply)


async def run_load(channel: grpc.aio.Channel, server: ServerProcess, ledger: Ledger) -> int:
    """Runs the load until enough moves are acknowledged, SIGKILLs the server
    with calls in flight, and returns how many calls were in flight then."""
    enough = asyncio.Event()
    stop = False

    async def attempt(method: str, request) -> bytes | None:
        if stop:
            return None
        ledger.sent.append((method, request))
        ledger.in_flight += 1
        try:
            reply, trailing = await call(channel, method, request)
        except grpc.aio.AioRpcError as error:
            if ledger.killed:
                ledger.late_failures.append(error.code())
            else:
                ledger.early_failures.append((method, request, f"{error.code().name}: {error.details()}"))
            return None
        finally:
            ledger.in_flight -= 1
        assert trailing.get("holdfast-replayed") == "false", f"first {method} call answered as a replay"
        ledger.acked.append(Ack(method, request, reply, trailing["holdfast-context-id"]))
        if len(ledger.acked) >= ACKED_BEFORE_KILL:
            enough.set()
        return reply

    async def worker(w: int) -> None:
        rng = random.Random(w)
        n = 0
        while not stop:
            n += 1
            reserve = pb.ReserveRequest(
                order_id=f"order-{w}-{n}", sku_id=SKU, quantity=rng.randint(1, 3), timestamp_ms=1_700_000_000_000 + n
            )
            reply = await attempt("Reserve", reserve)
            if reply is None:
                return
            rid = pb.ReservationReply.FromString(reply).reservation_id
            follow = rng.random()
            if follow < 0.25:
                if await attempt("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=1)) is None:
                    return
            elif follow < 0.45:
                if await attempt("Release", pb.ReleaseRequest(reservation_id=rid, reason="changed mind")) is None:
                    return

    workers = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
    try:
        await asyncio.wait_for(enough.wait(), LOAD_TIMEOUT_S)
        assert not ledger.early_failures, ledger.early_failures[:5]
        in_flight = ledger.in_flight
        stop = True
        ledger.killed = True
        server.send(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*workers), LOAD_TIMEOUT_S)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return in_flight


def check_stock(stock: pb.StockReply) -> None:
    assert stock.total == TOTAL
    assert stock.available + stock.held + stock.sold == stock.total, stock
    assert min(stock.available, stock.held, stock.sold) >= 0, stock


async def test_sigkill_mid_load_loses_no_acknowledged_move(tmp_path):
    store = f"sqlite:///{tmp_path}/h.db"
    ledger = Ledger()
    servers: list[ServerProcess] = []
    try:
        # -- load, then SIGKILL with calls in flight ------------------------------
        first = start_server(store)
        servers.append(first)
        async with grpc.aio.insecure_channel(first.target) as channel:
            put = await reply_of(channel, "PutStock", pb.PutStockRequest(sku_id=SKU, total=TOTAL, request_id="stock-1"))
            assert (put.total, put.available, put.version) == (TOTAL, TOTAL, 1)
            in_flight_at_kill = await run_load(channel, first, ledger)
        assert in_flight_at_kill > 0, "the kill must land while calls are in flight"
        assert first.wait() == -signal.SIGKILL, first.output()
        assert not ledger.early_failures, ledger.early_failures[:5]

        acked = {(a.method, a.request.SerializeToString(deterministic=True)): a for a in ledger.acked}
        assert len(acked) == len(ledger.acked), "two acknowledged calls with one request"
        unacked = [
            (method, request)
            for method, request in ledger.sent
            if (method, request.SerializeToString(deterministic=True)) not in acked
        ]
        assert len(ledger.acked) >= ACKED_BEFORE_KILL
        assert len(ledger.acked) + len(unacked) == len(ledger.sent)

        # What the clients know about each reservation.
        reserves: dict[str, Ack] = {}  # acknowledged, by reservation id
        followed: dict[str, tuple[str, object]] = {}  # Confirm/Release sent, acknowledged or not
        follow_acks: dict[str, Ack] = {}
        for ack in ledger.acked:
            if ack.method == "Reserve":
                reserves[pb.ReservationReply.FromString(ack.reply).reservation_id] = ack
        for method, request in ledger.sent:
            if method in ("Confirm", "Release"):
                assert request.reservation_id in reserves, "a follow-up is sent only for an acknowledged hold"
                followed[request.reservation_id] = (method, request)
        for ack in ledger.acked:
            if ack.method in ("Confirm", "Release"):
                follow_acks[ack.request.reservation_id] = ack
        assert any(a.method == "Confirm" for a in follow_acks.values()), "the load acknowledged no Confirm"
        assert any(a.method == "Release" for a in follow_acks.values()), "the load acknowledged no Release"

        # -- restart on the same file ----------------------------------------------
        second = start_server(store)
        servers.append(second)
        async with grpc.aio.insecure_channel(second.target) as channel:
            stock = await reply_of(channel, "GetStock", pb.GetStockRequest(sku_id=SKU))
            check_stock(stock)
            qty = {rid: ack.request.quantity for rid, ack in reserves.items()}
            # Held or sold for sure: acknowledged holds nobody tried to release.
            surely_taken = sum(q for rid, q in qty.items() if followed.get(rid, ("",))[0] != "Release")
            surely_sold = sum(qty[rid] for rid, a in follow_acks.items() if a.method == "Confirm")
            # At most: every Reserve sent, less the acknowledged releases.
            sent_quantity = sum(r.quantity for m, r in ledger.sent if m == "Reserve")
            surely_released = sum(qty[rid] for rid, a in follow_acks.items() if a.method == "Release")
            assert stock.held + stock.sold >= surely_taken, (stock, surely_taken)
            assert stock.sold >= surely_sold, (stock, surely_sold)
            assert stock.held + stock.sold <= sent_quantity - surely_released, (stock, sent_quantity, surely_released)

            # Every acknowledged reservation is in the store, at least as far as acknowledged.
            for rid, ack in reserves.items():
                now_bytes, _ = await call(channel, "GetReservation", pb.GetReservationRequest(reservation_id=rid))
                now = pb.ReservationReply.FromString(now_bytes)
                if rid in follow_acks:
                    assert now_bytes == follow_acks[rid].reply, (rid, now)
                elif rid in followed:  # a Confirm/Release was in flight: it may or may not have committed
                    target = pb.RESERVATION_STATE_CONFIRMED if followed[rid][0] == "Confirm" else pb.RESERVATION_STATE_RELEASED
                    if now.state == pb.RESERVATION_STATE_RESERVED:
                        assert now_bytes == ack.reply, (rid, now)
                    else:
                        assert (now.state, now.version) == (target, 2), (rid, now)
                else:
                    assert now_bytes == ack.reply, (rid, now)

            # Every acknowledged move replays byte for byte, under the same context id.
            for ack in ledger.acked:
                reply, trailing = await call(channel, ack.method, ack.request)
                assert reply == ack.reply, (ack.method, ack.request)
                assert trailing.get("holdfast-replayed") == "true", (ack.method, ack.request, trailing)
                assert trailing.get("holdfast-context-id") == ack.context_id

            # Calls in flight at the kill: committed before it (replay) or commit now.
            committed_before = 0
            unacked_replies: dict[tuple[str, bytes], bytes] = {}
            for method, request in unacked:
                try:
                    reply, trailing = await call(channel, method, request)
                except grpc.aio.AioRpcError as error:
                    raise AssertionError(f"retrying an in-flight {method} failed: {failure_of(error)}") from error
                committed_before += trailing.get("holdfast-replayed") == "true"
                unacked_replies[(method, request.SerializeToString(deterministic=True))] = reply
                answer = pb.ReservationReply.FromString(reply)
                if method == "Reserve":
                    assert (answer.state, answer.version, answer.quantity) == (
                        pb.RESERVATION_STATE_RESERVED, 1, request.quantity
                    )
                    reserves.setdefault(answer.reservation_id, Ack(method, request, reply, ""))
                    qty[answer.reservation_id] = request.quantity
                else:
                    target = pb.RESERVATION_STATE_CONFIRMED if method == "Confirm" else pb.RESERVATION_STATE_RELEASED
                    assert (answer.state, answer.version) == (target, 2), (method, answer)
            # ... and exactly once: a second retry is a replay of the same bytes.
            for method, request in unacked:
                reply, trailing = await call(channel, method, request)
                assert trailing.get("holdfast-replayed") == "true"
                assert reply == unacked_replies[(method, request.SerializeToString(deterministic=True))]

            # Now every call ever sent has committed exactly once: the books balance.
            states: dict[int, int] = {}
            sums: dict[int, int] = {}
            for rid in reserves:
                now = await reply_of(channel, "GetReservation", pb.GetReservationRequest(reservation_id=rid))
                assert now.quantity == qty[rid] and now.sku_id == SKU
                states[now.state] = states.get(now.state, 0) + 1
                sums[now.state] = sums.get(now.state, 0) + now.quantity
            assert set(states) <= {
                pb.RESERVATION_STATE_RESERVED, pb.RESERVATION_STATE_CONFIRMED, pb.RESERVATION_STATE_RELEASED
            }, states
            assert states.get(pb.RESERVATION_STATE_CONFIRMED, 0) == sum(1 for m, _ in ledger.sent if m == "Confirm")
            assert states.get(pb.RESERVATION_STATE_RELEASED, 0) == sum(1 for m, _ in ledger.sent if m == "Release")
            assert len(reserves) == sum(1 for m, _ in ledger.sent if m == "Reserve")

            final = await reply_of(channel, "GetStock", pb.GetStockRequest(sku_id=SKU))
            check_stock(final)
            held = sums.get(pb.RESERVATION_STATE_RESERVED, 0)
            sold = sums.get(pb.RESERVATION_STATE_CONFIRMED, 0)
            assert (final.held, final.sold, final.available) == (held, sold, TOTAL - held - sold), final
            # One stock version per stock move: PutStock, each Reserve, each Confirm and Release.
            settled = states.get(pb.RESERVATION_STATE_CONFIRMED, 0) + states.get(pb.RESERVATION_STATE_RELEASED, 0)
            assert final.version == 1 + len(reserves) + settled, final

        assert second.stop() == 0, second.output()
        assert second.stdout.lines[-1] == "holdfast stopped"
        assert "Traceback" not in second.stderr.text(), second.output()
        print(
            f"acknowledged {len(ledger.acked)} moves, {in_flight_at_kill} in flight at the kill,"
            f" {committed_before} of {len(unacked)} unacknowledged had committed"
        )
    finally:
        for server in servers:
            server.close()
