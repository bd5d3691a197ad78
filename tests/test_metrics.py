"""The metrics of DESIGN.md ("Metrics"), each seen moving as it should.

Values are read from the process-global Prometheus registry as before/after
deltas (other suites in this process move the same counters), around real
calls over real gRPC. The deterministic ratio is cumulative since process
start, so its "1.0 on a clean load" is checked in a fresh `holdfast serve`
process, which is also where `holdfast stats` reads its table from.

A note on timeout fallbacks: the server answers one (BUDGET_EXCEEDED,
counted in holdfast_timeout_fallback_total) when the call's budget, counted
from its arrival at the server, runs out before the move or read can start:
whether a fault file's delay (a slow server) or a busy store spent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.request
from typing import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import metrics, stats
from holdfast.server import Config, Running, start
from tests.process import free_port, run_holdfast, start_server
from tests.support import BUILT_IN_APPS, failure_of

SERVICE = "/holdfast.inventory.v1.InventoryService"
RESERVE = f"{SERVICE}/Reserve"
CONFIRM = f"{SERVICE}/Confirm"
GET_STOCK = f"{SERVICE}/GetStock"
SKU = "sku-1"
TIMEOUT_S = 10.0  # every client deadline here: far past any contract's 2 s


def sample(name: str, **labels: str) -> float:
    """A sample's current value; a series nothing has touched yet reads 0."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reserve(order_id: str, quantity: int = 1, timestamp_ms: int = 1) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order_id, sku_id=SKU, quantity=quantity, timestamp_ms=timestamp_ms)


async def stocked(stub, total: int = 10) -> None:
    await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=total, request_id="init"), timeout=TIMEOUT_S)


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Running, pb_grpc.InventoryServiceStub]]:
    running = await start(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.InventoryServiceStub(channel)
    finally:
        await running.stop(0)


# -- replays, compensations, contract violations, latency, consistency -----------------


async def test_a_replay_raises_the_replay_count_once(stub):
    await stocked(stub)
    first = await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
    before = sample("holdfast_replays_total", method=RESERVE)
    again = await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
    assert again == first
    assert sample("holdfast_replays_total", method=RESERVE) - before == 1
    # A new key is no replay.
    await stub.Reserve(reserve("order-2"), timeout=TIMEOUT_S)
    assert sample("holdfast_replays_total", method=RESERVE) - before == 1


async def test_a_snapshot_mismatch_raises_the_compensation_count(server, stub):
    await stocked(stub)
    held = await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
    await server.engine.snapshot.reset(held.reservation_id, 7)  # the snapshot now runs ahead of the store
    before = sample("holdfast_compensations_total")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id), timeout=TIMEOUT_S)
    assert (caught.value.code(), failure_of(caught.value).reason) == (grpc.StatusCode.ABORTED, "VERSION_CONFLICT")
    assert sample("holdfast_compensations_total") - before == 1
    # The compensation reset the snapshot to the store's version: the retry goes through, uncounted.
    confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id), timeout=TIMEOUT_S)
    assert confirmed.state == pb.RESERVATION_STATE_CONFIRMED
    assert sample("holdfast_compensations_total") - before == 1


async def test_a_contract_violation_raises_its_count_for_its_method(stub):
    before = sample("holdfast_contract_violations_total", method=RESERVE)
    before_confirm = sample("holdfast_contract_violations_total", method=CONFIRM)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Reserve(pb.ReserveRequest(sku_id=SKU, quantity=1, timestamp_ms=1), timeout=TIMEOUT_S)  # no order_id
    assert failure_of(caught.value).reason == "CONTRACT_VIOLATION"
    assert sample("holdfast_contract_violations_total", method=RESERVE) - before == 1
    # An invalid value is not a contract violation; nor is another method's call.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Reserve(reserve("order-1", quantity=-1), timeout=TIMEOUT_S)
    assert failure_of(caught.value).reason == "INVALID_REQUEST"
    assert sample("holdfast_contract_violations_total", method=RESERVE) - before == 1
    assert sample("holdfast_contract_violations_total", method=CONFIRM) == before_confirm


async def test_latency_is_observed_per_method_and_consistency_per_written_move(stub):
    await stocked(stub)
    reserves = sample("holdfast_request_seconds_count", method=RESERVE)
    reads = sample("holdfast_request_seconds_count", method=GET_STOCK)
    written = sample("holdfast_state_transition_consistency_seconds_count")
    await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
    await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)  # a replay: answered, nothing written
    await stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=TIMEOUT_S)
    assert sample("holdfast_request_seconds_count", method=RESERVE) - reserves == 2
    assert sample("holdfast_request_seconds_count", method=GET_STOCK) - reads == 1
    assert sample("holdfast_state_transition_consistency_seconds_count") - written == 1
    assert sample("holdfast_state_transition_consistency_seconds_sum") > 0


async def test_an_unreachable_redis_counts_snapshot_degradations(tmp_path):
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", snapshot=f"redis://127.0.0.1:{free_port()}",
        apps=BUILT_IN_APPS,
    )
    before = sample("holdfast_snapshot_degradations_total")
    async with serving(config) as (_, stub):
        await stocked(stub)
        held = await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
        confirmed = await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id), timeout=TIMEOUT_S)
        assert confirmed.state == pb.RESERVATION_STATE_CONFIRMED  # the store's compare-and-set alone guards it
        assert sample("holdfast_snapshot_degraded") == 1
    assert sample("holdfast_snapshot_degradations_total") - before >= 2  # at least the two moves' reads


# -- timeout fallbacks ---------------------------------------------------------------


def fault_file(tmp_path, delay_ms: int) -> str:
    path = tmp_path / "faults.toml"
    path.write_text(f'["{RESERVE.lstrip("/")}"]\ndelay_ms = {delay_ms}\n', encoding="utf-8")
    return str(path)


async def test_a_fault_delay_past_the_budget_is_a_counted_fallback(tmp_path):
    """Reserve's budget is 2000 ms from the call's arrival; a 2500 ms injected
    delay spends it, so the move never starts: the server answers
    BUDGET_EXCEEDED (before the client's 10 s deadline), counts one fallback,
    and nothing changes."""
    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", faults=fault_file(tmp_path, 2500),
                    apps=BUILT_IN_APPS)
    async with serving(config) as (_, stub):
        await stocked(stub)
        fallbacks = sample("holdfast_timeout_fallback_total", method=RESERVE)
        injected = sample("holdfast_faults_injected_total", method=RESERVE)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S)
        found = failure_of(caught.value)
        assert (found.code, found.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "BUDGET_EXCEEDED")
        stock = await stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=TIMEOUT_S)
        assert (stock.available, stock.held) == (10, 0), "the refused call changed nothing"

        assert sample("holdfast_faults_injected_total", method=RESERVE) - injected == 1
        assert sample("holdfast_timeout_fallback_total", method=RESERVE) - fallbacks == 1


async def test_a_budget_spent_waiting_for_the_store_is_a_counted_fallback(server, stub):
    """The store's one writer is held busy past Reserve's 2000 ms budget (and
    GetStock's 500 ms): both answer BUDGET_EXCEEDED with holdfast details
    long before the client's deadline, each counted once for its method, and
    nothing changes."""
    await stocked(stub)
    fallbacks = {m: sample("holdfast_timeout_fallback_total", method=m) for m in (RESERVE, GET_STOCK)}
    busy = threading.Event()

    def hold_the_writer(txn) -> None:
        busy.set()
        time.sleep(3.0)

    blocker = asyncio.ensure_future(server.engine.store.transact(hold_the_writer))
    while not busy.is_set():
        await asyncio.sleep(0.01)
    results = await asyncio.gather(
        stub.Reserve(reserve("order-1"), timeout=TIMEOUT_S),
        stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=TIMEOUT_S),
        return_exceptions=True,
    )
    await blocker
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError), result
        failure = failure_of(result)
        assert (failure.code, failure.reason, failure.domain) == (
            grpc.StatusCode.DEADLINE_EXCEEDED, "BUDGET_EXCEEDED", "holdfast"
        )
    for method, before in fallbacks.items():
        assert sample("holdfast_timeout_fallback_total", method=method) - before == 1, method
    stock = await stub.GetStock(pb.GetStockRequest(sku_id=SKU), timeout=TIMEOUT_S)
    assert (stock.total, stock.available, stock.held) == (10, 10, 0)


# -- the deterministic ratio ------------------------------------------------------------


def test_the_ratio_counts_every_answer_but_dependency_unavailable():
    registry = CollectorRegistry()  # a private counter: the global one belongs to every suite
    outcomes = Counter("outcomes", "answers", ["method", "reason"], registry=registry)
    assert metrics.deterministic_ratio(outcomes) == 1.0  # nothing answered, nothing guessed
    outcomes.labels(RESERVE, "OK").inc(6)
    outcomes.labels(RESERVE, "INSUFFICIENT_STOCK").inc()
    outcomes.labels(RESERVE, "BUDGET_EXCEEDED").inc()  # nothing changed: the client knows that
    assert metrics.deterministic_ratio(outcomes) == 1.0
    outcomes.labels(CONFIRM, "DEPENDENCY_UNAVAILABLE").inc(2)
    assert metrics.deterministic_ratio(outcomes) == 0.8


def outcome_counts() -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in metrics.OUTCOMES.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                counts[s.labels["reason"]] = counts.get(s.labels["reason"], 0.0) + s.value
    return counts


async def clean_load(stub) -> int:
    """Successes, recorded refusals, replays, invalid and unknown: every
    ordinary answer a healthy server gives. Returns how many calls it made."""
    calls = 0

    async def call(method, request) -> None:
        nonlocal calls
        calls += 1
        with contextlib.suppress(grpc.aio.AioRpcError):
            await method(request, timeout=TIMEOUT_S)

    await call(stub.PutStock, pb.PutStockRequest(sku_id=SKU, total=20, request_id="init"))
    holds = []
    for n in range(25):  # 20 holds, then INSUFFICIENT_STOCK
        calls += 1
        with contextlib.suppress(grpc.aio.AioRpcError):
            holds.append(await stub.Reserve(reserve(f"order-{n}"), timeout=TIMEOUT_S))
    for n in range(5):
        await call(stub.Reserve, reserve(f"order-{n}"))  # replays
    for hold in holds[:8]:
        await call(stub.Confirm, pb.ConfirmRequest(reservation_id=hold.reservation_id))
    for hold in holds[8:14]:
        await call(stub.Release, pb.ReleaseRequest(reservation_id=hold.reservation_id, reason="changed my mind"))
    await call(stub.Confirm, pb.ConfirmRequest(reservation_id=holds[9].reservation_id))  # INVALID_TRANSITION
    await call(stub.GetReservation, pb.GetReservationRequest(reservation_id="rsv_nope"))
    await call(stub.GetStock, pb.GetStockRequest(sku_id="no-such-sku"))
    await call(stub.Reserve, reserve("", quantity=1))  # CONTRACT_VIOLATION
    await call(stub.Reserve, reserve("order-x", quantity=0))  # INVALID_REQUEST
    await call(stub.GetStock, pb.GetStockRequest(sku_id=SKU))
    return calls


async def test_the_ratio_does_not_move_on_a_clean_load(stub):
    counts = outcome_counts()
    ratio = sample("holdfast_deterministic_ratio")
    calls = await clean_load(stub)
    after = outcome_counts()
    answered = sum(after.values()) - sum(counts.values())
    assert answered == calls
    assert after.get("DEPENDENCY_UNAVAILABLE", 0) == counts.get("DEPENDENCY_UNAVAILABLE", 0)
    assert sample("holdfast_deterministic_ratio") >= ratio  # only deterministic answers were added
    assert sample("holdfast_deterministic_ratio") == pytest.approx(metrics.deterministic_ratio())


# -- a real server process: /metrics and `holdfast stats` --------------------------------


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def test_holdfast_stats_prints_a_fresh_servers_metrics_after_a_clean_load(tmp_path):
    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    server = start_server(f"sqlite:///{tmp_path}/holdfast.db", extra=("--metrics-port", str(metrics_port)))
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            calls = await clean_load(pb_grpc.InventoryServiceStub(channel))
        families = scrape(url)
        assert [s.value for s in families["holdfast_deterministic_ratio"]] == [1.0]
        assert sum(s.value for s in families["holdfast_outcomes"] if s.name.endswith("_total")) == calls
        assert sum(s.value for s in families["holdfast_replays"] if s.name.endswith("_total")) == 5

        done = run_holdfast("stats", "--metrics", url)
        assert done.returncode == 0, done.stderr
        table = done.stdout
        assert "deterministic answers: 100.00%" in table
        rows = {tuple(line.split()[:3]) for line in table.splitlines()}
        assert ("holdfast_replays_total", "Reserve", "5") in rows, table
        assert ("holdfast_contract_violations_total", "Reserve", "1") in rows, table
        assert ("holdfast_outcomes_total", "Reserve", "reason=INSUFFICIENT_STOCK") in rows, table
        latency = [line.split() for line in table.splitlines() if line.startswith("holdfast_request_seconds ")]
        assert {row[1] for row in latency} == {"PutStock", "Reserve", "Confirm", "Release", "GetReservation", "GetStock",
                                               "ReserveOrder", "ConfirmOrder", "ReleaseOrder", "GetOrder", "CreateWaybill", "Dispatch", "Acknowledge", "Fail", "GetWaybill"}
        reserve_row = next(row for row in latency if row[1] == "Reserve")
        assert reserve_row[2] == "32" and reserve_row[-1] == "ms", reserve_row  # count, then mean and p99 in ms
        assert "holdfast_state_transition_consistency_seconds" in table
        assert "_created" not in table  # prometheus_client's start times are no values
    finally:
        server.stop()
        server.close()


def test_holdfast_stats_exits_1_with_one_line_when_unreachable():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    done = run_holdfast("stats", "--metrics", url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"holdfast stats: cannot read {url}: ")


def test_holdfast_stats_reads_its_default_url_from_the_environment(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}/metrics"
    monkeypatch.setenv("HOLDFAST_METRICS_URL", url)
    assert stats.main([]) == 1
    assert url in capsys.readouterr().err


def test_quantile_estimates_like_histogram_quantile():
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert stats.quantile(0.5, buckets) == 0.001
    assert stats.quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 0.9)
    assert stats.quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1  # in +Inf: the last finite bound
    assert stats.quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)]) != stats.quantile(0.99, [(0.1, 0.0), (float("inf"), 0.0)])
