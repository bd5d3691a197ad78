"""Journals and replay: a recorded mixed load replays identically on a fresh
instance, and a journal with one altered reply makes `holdfast replay` fail,
naming that call.

The load runs in lanes over one channel: each lane owns its SKUs and orders
and sends its calls one at a time, so lanes commute and the journal's order
(the order answers were made) is an order the calls could have run in. Time
is a ManualClock that moves only between rounds; after each move the test
waits for the reaper to expire every due hold, so expiries sit between
rounds in the journal, as they did in the store.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast import replay
from holdfast.clock import ManualClock
from holdfast.server import Config, start
from holdfast.apps.inventory_store import due_holds
from tests.process import run_holdfast, start_server
from tests.support import BUILT_IN_APPS

SERVICE = "/holdfast.inventory.v1.InventoryService/"
LANES = 8
ROUNDS = 25
CALLS_PER_ROUND = 25  # per lane: 8 x 25 x 25 = 5,000 calls
REAPER_INTERVAL_MS = 5


class Lane:
    """One client's share of the load: its own SKUs, orders and holds."""

    def __init__(self, channel: grpc.aio.Channel, n: int, outcomes: Counter) -> None:
        self.channel, self.n, self.outcomes = channel, n, outcomes
        self.random = random.Random(n)
        self.skus = [f"lane{n}-sku{i}" for i in range(3)]
        self.puts: list[pb.PutStockRequest] = []
        self.reserves: list[pb.ReserveRequest] = []
        self.holds: list[str] = []
        self.serial = 0

    async def call(self, method: str, request) -> None:
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        rpc = self.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        try:
            reply = await rpc(payload, timeout=30)
        except grpc.aio.AioRpcError as error:
            self.outcomes[error.code().name] += 1
            return
        self.outcomes["OK"] += 1
        if method == "Reserve":
            self.holds.append(pb.ReservationReply.FromString(reply).reservation_id)

    async def run(self, calls: int) -> None:
        for _ in range(calls):
            await self.call(*self.next_call())

    def next_call(self) -> tuple[str, object]:
        roll = self.random.random()
        if roll < 0.12 or not self.puts:
            return "PutStock", self._put_stock()
        if roll < 0.45:
            return "Reserve", self._reserve()
        if roll < 0.60:
            return "Confirm", pb.ConfirmRequest(reservation_id=self._hold())
        if roll < 0.72:
            return "Release", pb.ReleaseRequest(reservation_id=self._hold(), reason="changed my mind")
        if roll < 0.82:
            return "GetStock", pb.GetStockRequest(sku_id=self.random.choice([*self.skus, "no-such-sku"]))
        if roll < 0.95:
            return "GetReservation", pb.GetReservationRequest(reservation_id=self._hold())
        return self._invalid()

    def _put_stock(self) -> pb.PutStockRequest:
        roll = self.random.random()
        if self.puts and roll < 0.2:  # a retry: replayed
            return self.random.choice(self.puts)
        if self.puts and roll < 0.3:  # the same key, another total: IDEMPOTENCY_KEY_REUSED
            again = pb.PutStockRequest()
            again.CopyFrom(self.random.choice(self.puts))
            again.total += 1
            return again
        self.serial += 1
        request = pb.PutStockRequest(sku_id=self.random.choice(self.skus), total=self.random.randint(5, 40), request_id=f"put-{self.serial}")
        self.puts.append(request)
        return request

    def _reserve(self) -> pb.ReserveRequest:
        roll = self.random.random()
        if self.reserves and roll < 0.2:  # a retry of the same key: replayed
            return self.random.choice(self.reserves)
        if self.reserves and roll < 0.28:  # the same key, another quantity: IDEMPOTENCY_KEY_REUSED
            again = pb.ReserveRequest()
            again.CopyFrom(self.random.choice(self.reserves))
            again.quantity += 1
            return again
        self.serial += 1
        sku = self.random.choice([*self.skus, "no-such-sku"] if roll > 0.95 else self.skus)
        quantity = self.random.choice([1, 2, 3, 5, 8, 60])  # 60: INSUFFICIENT_STOCK
        request = pb.ReserveRequest(
            order_id=f"lane{self.n}-order{self.serial}", sku_id=sku, quantity=quantity,
            timestamp_ms=1_000 + self.serial, hold_ms=self.random.choice([0, 50, 120, 400, 2_000]),
        )
        self.reserves.append(request)
        return request

    def _hold(self) -> str:
        if not self.holds or self.random.random() < 0.08:
            return f"rsv_unknown{self.random.randint(0, 99)}"  # NOT_FOUND
        return self.random.choice(self.holds)

    def _invalid(self) -> tuple[str, object]:
        roll = self.random.random()
        if roll < 0.4:
            return "Reserve", pb.ReserveRequest(order_id=f"lane{self.n}-bad", sku_id=self.skus[0], quantity=0, timestamp_ms=7)
        if roll < 0.7:
            return "GetReservation", pb.GetReservationRequest()
        if roll < 0.85:
            return "Confirm", b"\xff\xff\xff"  # does not parse: INVALID_REQUEST, no context id
        return "PutStock", pb.PutStockRequest(sku_id=self.skus[0], total=-1, request_id="bad")


async def _reaped(running, clock: ManualClock) -> None:
    """Waits until the reaper has expired every due hold and finished its round
    (its journal lines written) before the next round's calls go out."""
    now_ms = clock.now_ms()
    while await running.engine.store.transact(lambda txn: due_holds(txn, now_ms, 1)):
        await asyncio.sleep(REAPER_INTERVAL_MS / 1000)
    await asyncio.sleep(4 * REAPER_INTERVAL_MS / 1000)


async def _record(folder: Path) -> tuple[Path, Counter]:
    clock = ManualClock()
    journal = folder / "journal.jsonl"
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{folder}/recorded.db", snapshot="memory://",
        reaper_interval_ms=REAPER_INTERVAL_MS, journal=str(journal), apps=BUILT_IN_APPS,
    )
    running = await start(config, clock=clock)
    outcomes: Counter = Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            lanes = [Lane(channel, n, outcomes) for n in range(LANES)]
            rounds = random.Random(99)
            for _ in range(ROUNDS):
                await asyncio.gather(*(lane.run(CALLS_PER_ROUND) for lane in lanes))
                clock.advance(rounds.choice([0, 30, 80, 150, 500]))
                await _reaped(running, clock)
    finally:
        await running.stop(0)
    return journal, outcomes


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter]:
    return asyncio.run(_record(tmp_path_factory.mktemp("journal")))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_load_is_mixed(recorded: tuple[Path, Counter]) -> None:
    journal, outcomes = recorded
    lines = _lines(journal)
    calls = [line for line in lines if line["kind"] == "call"]
    assert len(calls) == LANES * ROUNDS * CALLS_PER_ROUND == 5_000
    assert lines[0]["kind"] == "start"
    assert sum(1 for line in lines if line["kind"] == "timeout" and line["reason"] is None) > 20
    reasons = Counter(_reason(call) for call in calls)
    for reason in ("INSUFFICIENT_STOCK", "IDEMPOTENCY_KEY_REUSED", "RESERVATION_NOT_FOUND", "SKU_NOT_FOUND",
                   "INVALID_REQUEST", "HOLD_EXPIRED"):
        assert reasons[reason] > 0, f"no {reason} in the load: {reasons}"
    assert sum(1 for call in calls if call["replayed"] == "true") > 100
    assert {call["method"].rsplit("/", 1)[1] for call in calls} == {
        "PutStock", "GetStock", "Reserve", "Confirm", "Release", "GetReservation"}
    assert sum(outcomes.values()) == 5_000


def _reason(call: dict) -> str:
    if call["details"] is None:
        return call["code"]
    from google.rpc import error_details_pb2, status_pb2

    for detail in status_pb2.Status.FromString(base64.b64decode(call["details"])).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return call["code"]


def test_a_recorded_load_replays_identically_on_a_fresh_instance(recorded: tuple[Path, Counter]) -> None:
    journal, _ = recorded
    report = replay.replay(journal)
    assert report.identical, "\n".join(d.describe() for d in report.differences[:5])
    assert report.calls == 5_000
    assert report.timeouts > 20


def test_an_altered_reply_fails_the_replay_naming_the_call(recorded: tuple[Path, Counter], tmp_path: Path) -> None:
    journal, _ = recorded
    lines = journal.read_text().splitlines()
    target = next(n for n, line in enumerate(lines) if '"method":"' + SERVICE + 'Reserve"' in line and '"code":"OK"' in line
                  and n > len(lines) // 2)
    entry = json.loads(lines[target])
    reply = bytearray(base64.b64decode(entry["reply"]))
    reply[-1] ^= 0x01
    entry["reply"] = base64.b64encode(bytes(reply)).decode()
    lines[target] = json.dumps(entry)
    altered = tmp_path / "altered.jsonl"
    altered.write_text("\n".join(lines) + "\n")

    result = run_holdfast("replay", str(altered), timeout=120)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"line {target + 1}: Reserve: reply differs" in result.stdout
    assert "1 differ" in result.stdout
    assert "[#" not in result.stdout  # no progress bar when output is not a terminal


def test_serve_journal_on_the_system_clock_replays_identically(tmp_path: Path) -> None:
    """`holdfast serve --journal` as shipped: real time, a default hold (its
    `expires_at_ms` depends on the time the engine used, pinned per call),
    a retry, an error; the journal replays identically and survives the stop."""
    journal = tmp_path / "served.jsonl"
    server = start_server(f"sqlite:///{tmp_path}/served.db", extra=("--journal", str(journal)))
    try:
        steps = [
            ("stock", "put", "sku-9", "4", "--request-id", "r1"),
            ("reserve", "o1", "sku-9", "3", "--timestamp-ms", "5"),
            ("reserve", "o1", "sku-9", "3", "--timestamp-ms", "5"),
            ("reserve", "o2", "sku-9", "3", "--timestamp-ms", "6"),
            ("stock", "get", "sku-9"),
        ]
        codes = [run_holdfast(*step, "--target", server.target).returncode for step in steps]
        assert codes == [0, 0, 0, 1, 0]
    finally:
        assert server.stop() == 0, server.output()
        server.close()
    assert [line["kind"] for line in _lines(journal)] == ["start"] + ["call"] * 5

    result = run_holdfast("replay", str(journal))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "replayed 5 calls and 0 timeouts" in result.stdout and "identical" in result.stdout

    # Against a running instance: times cannot be injected, and the summary says so.
    stock_only = tmp_path / "stock-only.jsonl"
    stock_only.write_text("\n".join(journal.read_text().splitlines()[:2]) + "\n")
    other = start_server(f"sqlite:///{tmp_path}/other.db")
    try:
        result = run_holdfast("replay", str(stock_only), "--target", other.target)
    finally:
        other.stop()
        other.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"against running instance {other.target}: identical" in result.stdout
    assert "recorded times were not injected" in result.stdout


def test_a_call_cancelled_before_it_answered_is_sent_but_not_compared(recorded: tuple[Path, Counter], tmp_path: Path) -> None:
    journal, _ = recorded
    lines = journal.read_text().splitlines()[:40]
    target = next(n for n, line in enumerate(lines) if '"code":"OK"' in line and "Reserve" in line)
    entry = json.loads(lines[target])
    entry.update(answered=False, code="CANCELLED", reply=None, replayed=None, context_id=None)
    lines[target] = json.dumps(entry)
    cancelled = tmp_path / "cancelled.jsonl"
    cancelled.write_text("\n".join(lines) + "\n")

    report = replay.replay(cancelled)

    # It is still sent, so the calls after it see its hold as the recording did.
    assert report.identical, "\n".join(d.describe() for d in report.differences[:5])
    assert report.unanswered == 1
    assert "1 calls were cancelled before they answered" in report.summary()


def test_a_journal_that_is_not_one_is_a_usage_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"kind":"call","method":"/x/Y"}\n{"kind":"call"}\n')

    result = run_holdfast("replay", str(broken))

    assert result.returncode == 2
    assert f"{broken}:1: a call line without time_ms, request, code" in result.stderr



def _as_format_1(lines: list[str]) -> list[str]:
    """A journal as format 1 wrote it: a start line naming no apps (holdfast's
    built-in ones were hosted) with the default hold, and each hold's expiry
    as an `expire` line naming its reservation, with no service or version."""
    old = [json.dumps({"kind": "start", "format": 1, "hold_default_ms": 15 * 60 * 1000, "hold_max_ms": 7 * 86_400_000})]
    for line in lines[1:]:
        entry = json.loads(line)
        if entry["kind"] == "timeout":
            entry = {"kind": "expire", "reservation_id": entry["entity_id"], "time_ms": entry["time_ms"],
                     "reason": entry["reason"], "payload": entry["payload"], "replayed": entry["replayed"]}
        old.append(json.dumps(entry))
    return old


def test_a_format_1_journal_replays_identically_on_the_built_in_apps(recorded: tuple[Path, Counter], tmp_path: Path) -> None:
    """`holdfast replay` hosts the built-in apps for a journal that names
    none, and inventory reads its `expire` lines (Service.legacy_timeouts)."""
    journal, _ = recorded
    lines = journal.read_text().splitlines()
    timeouts = [n for n, line in enumerate(lines) if '"kind":"timeout"' in line]
    prefix = lines[: timeouts[4] + 1]  # five expiries, and the calls around them
    old = tmp_path / "format-1.jsonl"
    old.write_text("\n".join(_as_format_1(prefix)) + "\n")
    calls = sum(1 for line in prefix if '"kind":"call"' in line)

    result = run_holdfast("replay", str(old), timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"replayed {calls} calls and 5 timeouts from {old}" in result.stdout and ": identical" in result.stdout
    # Called as a library, replay names no app: a journal naming none needs them given.
    with pytest.raises(replay.JournalError, match=r"names no apps \(format 1 named none\): give them with --app"):
        replay.replay(old)
    assert replay.replay(old, default_apps=BUILT_IN_APPS).identical


def test_a_line_of_a_kind_no_hosted_app_wrote_is_refused(recorded: tuple[Path, Counter], tmp_path: Path) -> None:
    journal, _ = recorded
    lines = journal.read_text().splitlines()[:3]
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join([*lines, '{"kind":"expire","time_ms":5}', '{"kind":"mystery"}']) + "\n")
    with pytest.raises(replay.JournalError, match=r"odd.jsonl:4: a expire line without reservation_id"):
        replay.replay(odd)
    odd.write_text("\n".join([*lines, '{"kind":"mystery"}']) + "\n")
    with pytest.raises(replay.JournalError, match=r"odd.jsonl:4: unknown line kind 'mystery'"):
        replay.replay(odd)
