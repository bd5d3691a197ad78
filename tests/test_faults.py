"""Faults over real processes: `holdfast serve` instances sharing one
PostgreSQL database and one Redis, under concurrent load, while a dependency
or an instance dies.

1. Two instances, one store, one snapshot: 2,000 racing Reserves of 1 on a
   stock of 500 give exactly 500 holds and 1,500 INSUFFICIENT_STOCK, the
   stock adds up on both instances, each hold replays byte for byte on the
   other instance, and Redis holds the store's version of every reservation.
2. Redis SIGKILLed mid-load: every call still answers from the store alone,
   nothing is oversold, the degradation shows on /metrics, and after Redis
   restarts (empty, same port) the snapshot is rebuilt to the store's versions.
3. PostgreSQL stopped mid-load: calls answer UNAVAILABLE / DEPENDENCY_UNAVAILABLE
   (or BUDGET_EXCEEDED) within their budget, never hang, the server stays up;
   once PostgreSQL is back calls succeed with no restart, and retrying every
   refused call replays or commits it exactly once.
4. One of two instances SIGKILLed mid-load and restarted: every acknowledged
   move replays byte for byte, calls in flight at the kill commit exactly once
   on retry, no intent is left, the books balance.

Every wait is bounded and generous; nothing here times the service.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import signal
import time

import grpc

from holdfast.inventory.v1 import inventory_pb2 as pb

from tests.load import (
    CONFIRMED,
    RELEASED,
    RESERVED,
    Answer,
    Instance,
    check_books,
    eventually,
    open_instances,
    scrape,
    snapshot_mismatches,
    start_instance,
    start_postgres,
    stop_postgres,
    store_stock,
)

CLIENT_TIMEOUT_S = 10.0  # well past every contract's timeout_ms (2 s at most)
PHASE_TIMEOUT_S = 30.0  # how long any phase of a load may take, at most
RECOVERY_TIMEOUT_S = 30.0  # how long a dependency may take to be usable again
TIMESTAMP_MS = 1_700_000_000_000

INSUFFICIENT = "FAILED_PRECONDITION/INSUFFICIENT_STOCK"
DEPENDENCY_UNAVAILABLE = "UNAVAILABLE/DEPENDENCY_UNAVAILABLE"
BUDGET_EXCEEDED = "DEADLINE_EXCEEDED/BUDGET_EXCEEDED"


def reserve(order: str, sku: str, quantity: int = 1, timestamp_ms: int = TIMESTAMP_MS) -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id=order, sku_id=sku, quantity=quantity, timestamp_ms=timestamp_ms)


def outcomes(answers) -> collections.Counter:
    return collections.Counter(f"{a.method} {a.outcome}" for a in answers)


async def bounded(coroutines, limit: int = 64):
    """Runs the coroutines with at most `limit` at once, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.wait_for(asyncio.gather(*(one(c) for c in coroutines)), PHASE_TIMEOUT_S)


async def assert_replays(instance: Instance, first: Answer) -> Answer:
    """Sends `first`'s request again to `instance`: the identical answer, marked replayed."""
    again = await instance.call(first.method, first.request, CLIENT_TIMEOUT_S)
    assert again.code == first.code, (first.describe(), again.describe())
    assert again.replayed, f"not a replay on {instance.name}: {again.describe()} {again.trailing}"
    if first.context_id is not None:
        assert again.context_id == first.context_id, (first.describe(), again.trailing)
    if first.ok:
        assert again.reply == first.reply, f"{first.method} replayed other bytes on {instance.name}"
    else:
        assert again.status_details == first.status_details, f"{first.method} replayed another error on {instance.name}"
    return again


async def close_all(instances: list[Instance]) -> None:
    for instance in instances:
        try:
            await instance.close()
        except Exception:  # noqa: BLE001 - best effort in `finally`
            pass


# ---------------------------------------------------------------------------------------------
# 1. Two instances, one PostgreSQL database, one Redis.

SHARED_SKU = "sku-shared"
SHARED_TOTAL = 500
SHARED_RESERVES = 2_000
SHARED_IN_FLIGHT = 128
STORM_SKU = "sku-storm"
STORM_TOTAL = 300
STORM_RESERVES = 1_000


async def test_two_instances_share_stock_exactly_and_replay_each_others_answers(postgres_url, redis_url):
    instances: list[Instance] = []
    try:
        a, b = await open_instances(["a", "b"], postgres_url, redis_url, opened=instances)
        put = await a.ok("PutStock", pb.PutStockRequest(sku_id=SHARED_SKU, total=SHARED_TOTAL, request_id="stock-1"))
        assert (put.total, put.available, put.version) == (SHARED_TOTAL, SHARED_TOTAL, 1)

        in_flight = max_in_flight = 0
        gate = asyncio.Semaphore(SHARED_IN_FLIGHT)

        async def one(i: int) -> Answer:
            nonlocal in_flight, max_in_flight
            async with gate:
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                try:
                    return await (a, b)[i % 2].call("Reserve", reserve(f"order-{i}", SHARED_SKU), CLIENT_TIMEOUT_S)
                finally:
                    in_flight -= 1

        answers: list[Answer] = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(SHARED_RESERVES))), PHASE_TIMEOUT_S
        )
        assert max_in_flight >= 64, f"only {max_in_flight} calls were ever in flight at once"
        seen = outcomes(answers)
        assert seen == {"Reserve OK": SHARED_TOTAL, f"Reserve {INSUFFICIENT}": SHARED_RESERVES - SHARED_TOTAL}, (
            f"{seen}\n" + "\n".join(x.describe() for x in answers if not x.ok and x.reason != "INSUFFICIENT_STOCK")[:3000]
        )
        held = [x for x in answers if x.ok]
        for x in held:
            reply = x.parsed()
            assert not x.replayed, x.describe()
            assert (reply.state, reply.version, reply.quantity, reply.sku_id) == (
                pb.RESERVATION_STATE_RESERVED, 1, 1, SHARED_SKU
            ), reply
            assert reply.order_id == x.request.order_id
        ids = {x.parsed().reservation_id for x in held}
        assert len(ids) == SHARED_TOTAL, "two holds share a reservation id"
        print(f"holds won by instance: {collections.Counter(x.target for x in held)}; max in flight {max_in_flight}")

        # Both instances read the same stock, and it adds up.
        stocks = [await i.call("GetStock", pb.GetStockRequest(sku_id=SHARED_SKU)) for i in (a, b)]
        assert stocks[0].ok and stocks[0].reply == stocks[1].reply, [s.describe() for s in stocks]
        stock = stocks[0].parsed()
        assert (stock.total, stock.available, stock.held, stock.sold) == (SHARED_TOTAL, 0, SHARED_TOTAL, 0), stock
        assert stock.version == 1 + SHARED_TOTAL, stock  # one stock move per hold, none lost or doubled

        # Every answer replays on the OTHER instance: identical bytes (or error), marked replayed.
        other = {"a": b, "b": a}
        await bounded(assert_replays(other[x.target], x) for x in answers)

        # The store holds exactly the acknowledged holds...
        (total, available, held_units, sold, _), stored = await asyncio.to_thread(check_books, postgres_url, SHARED_SKU)
        assert (total, available, held_units, sold) == (SHARED_TOTAL, 0, SHARED_TOTAL, 0)
        assert set(stored) == ids
        assert {(r.state, r.version) for r in stored.values()} == {(RESERVED, 1)}

        # ... and Redis holds the store's version of each one.
        async def snapshot_matches():
            mismatches = await asyncio.to_thread(snapshot_mismatches, postgres_url, redis_url)
            return not mismatches, dict(list(mismatches.items())[:5])

        await eventually(snapshot_matches, RECOVERY_TIMEOUT_S)

        # A retry storm across instances: each Reserve sent to both at once
        # commits once; both answers are the same bytes, exactly one is not a replay.
        await a.ok("PutStock", pb.PutStockRequest(sku_id=STORM_SKU, total=STORM_TOTAL, request_id="stock-1"))

        async def both(i: int) -> tuple[Answer, Answer]:
            request = reserve(f"storm-{i}", STORM_SKU)
            return tuple(await asyncio.gather(*(x.call("Reserve", request, CLIENT_TIMEOUT_S) for x in (a, b))))

        pairs = await bounded((both(i) for i in range(STORM_RESERVES)), SHARED_IN_FLIGHT // 2)
        for x, y in pairs:
            assert x.code == y.code and x.reply == y.reply and x.status_details == y.status_details, (x.describe(), y.describe())
            assert x.replayed != y.replayed, (x.describe(), y.describe(), "both or neither replayed")
        seen = outcomes(x for x, _ in pairs)
        assert seen == {"Reserve OK": STORM_TOTAL, f"Reserve {INSUFFICIENT}": STORM_RESERVES - STORM_TOTAL}, seen
        (total, available, held_units, sold, version), _ = await asyncio.to_thread(check_books, postgres_url, STORM_SKU)
        assert (total, available, held_units, sold, version) == (STORM_TOTAL, 0, STORM_TOTAL, 0, 1 + STORM_TOTAL)
        await eventually(snapshot_matches, RECOVERY_TIMEOUT_S)
    finally:
        await close_all(instances)


# ---------------------------------------------------------------------------------------------
# 2. Redis SIGKILLed mid-load, restarted empty on the same port.

REDIS_SKU = "sku-redis-outage"
REDIS_TOTAL = 1_200
REDIS_RESERVES = 1_600
REDIS_WORKERS = 48
KILL_REDIS_AFTER = 400  # Reserves answered
RESTART_REDIS_AFTER = 1_000
CONFIRM_SHARE = 0.3


async def test_redis_sigkill_mid_load_degrades_then_rebuilds(postgres_url, private_redis):
    instances: list[Instance] = []
    redis_url, redis_port = private_redis.url, private_redis.port
    try:
        a, b = await open_instances(["a", "b"], postgres_url, redis_url, metrics=True, opened=instances)
        await a.ok("PutStock", pb.PutStockRequest(sku_id=REDIS_SKU, total=REDIS_TOTAL, request_id="stock-1"))

        answers: list[Answer] = []
        reserves_answered = 0
        kill_now, restart_now = asyncio.Event(), asyncio.Event()
        indices = itertools.count()

        async def worker(w: int) -> None:
            nonlocal reserves_answered
            rng = random.Random(w)
            while (i := next(indices)) < REDIS_RESERVES:
                first, second = (a, b) if i % 2 == 0 else (b, a)
                held = await first.call("Reserve", reserve(f"order-{i}", REDIS_SKU), CLIENT_TIMEOUT_S)
                answers.append(held)
                reserves_answered += 1
                if reserves_answered >= KILL_REDIS_AFTER:
                    kill_now.set()
                if reserves_answered >= RESTART_REDIS_AFTER:
                    restart_now.set()
                if held.ok and rng.random() < CONFIRM_SHARE:
                    rid = held.parsed().reservation_id
                    answers.append(await second.call("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=1), CLIENT_TIMEOUT_S))

        workers = [asyncio.create_task(worker(w)) for w in range(REDIS_WORKERS)]
        try:
            await asyncio.wait_for(kill_now.wait(), PHASE_TIMEOUT_S)
            private_redis.kill()
            killed_at = time.monotonic()

            # The outage is seen by both instances and counted on their /metrics.
            async def degraded_everywhere():
                samples = [await asyncio.to_thread(scrape, i.metrics_port) for i in (a, b)]
                done = all(
                    s.get("holdfast_snapshot_degraded") == 1 and s.get("holdfast_snapshot_degradations_total", 0) > 0
                    for s in samples
                )
                return done, samples

            await eventually(degraded_everywhere, RECOVERY_TIMEOUT_S)
            await asyncio.wait_for(restart_now.wait(), PHASE_TIMEOUT_S)
            restarting_at = time.monotonic()
            await asyncio.to_thread(private_redis.start)  # empty: nothing is persisted
            assert private_redis.port == redis_port
            await asyncio.wait_for(asyncio.gather(*workers), PHASE_TIMEOUT_S)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        # Every call answered from the store alone: no oversell, nothing refused for Redis.
        seen = outcomes(answers)
        allowed = {"Reserve OK", f"Reserve {INSUFFICIENT}", "Confirm OK"}
        assert set(seen) <= allowed, f"{seen}\n" + "\n".join(x.describe() for x in answers if x.outcome not in ("OK", INSUFFICIENT))[:3000]
        assert seen["Reserve OK"] == REDIS_TOTAL, seen  # 1,600 holds of 1 on 1,200: exactly 1,200 win
        assert seen[f"Reserve {INSUFFICIENT}"] == REDIS_RESERVES - REDIS_TOTAL, seen
        during = [x for x in answers if killed_at <= x.started and x.finished <= restarting_at]
        assert len(during) >= 100, f"only {len(during)} calls ran while Redis was down"
        assert any(x.ok and x.method == "Confirm" for x in during), "no Confirm ran while Redis was down"
        assert all(not x.replayed for x in answers), "a first call answered as a replay"

        # Every acknowledged move is in the store, as far as it was acknowledged.
        holds = {x.parsed().reservation_id: x for x in answers if x.method == "Reserve" and x.ok}
        confirms = {x.request.reservation_id: x for x in answers if x.method == "Confirm"}

        async def present(rid: str) -> None:
            now = await a.call("GetReservation", pb.GetReservationRequest(reservation_id=rid))
            expected = confirms.get(rid, holds[rid])
            assert now.ok and now.reply == expected.reply, (rid, now.describe(), now.parsed() if now.ok else None)

        await bounded(present(rid) for rid in holds)
        (total, available, held_units, sold, version), stored = await asyncio.to_thread(check_books, postgres_url, REDIS_SKU)
        assert set(stored) == set(holds)
        assert held_units + sold == REDIS_TOTAL and available == 0 and total == REDIS_TOTAL
        assert sold == len(confirms)
        assert version == 1 + len(holds) + len(confirms)

        # Degradations were counted; once Redis is back the snapshot is rebuilt and trusted.
        async def caught_up():
            samples = [await asyncio.to_thread(scrape, i.metrics_port) for i in (a, b)]
            mismatches = await asyncio.to_thread(snapshot_mismatches, postgres_url, redis_url)
            done = not mismatches and all(s.get("holdfast_snapshot_degraded") == 0 for s in samples)
            return done, (samples, len(mismatches), dict(list(mismatches.items())[:5]))

        samples, _, _ = await eventually(caught_up, RECOVERY_TIMEOUT_S)
        for instance, sample in zip((a, b), samples):
            assert sample["holdfast_snapshot_degradations_total"] > 0, (instance.name, sample)
            assert sample["holdfast_snapshot_rebuilds_total"] >= 2, (instance.name, sample)  # start-up, then after the outage

        # The rebuilt snapshot agrees with the store: moves on it find no conflict.
        unconfirmed = sorted(set(holds) - set(confirms))[:20]
        for n, rid in enumerate(unconfirmed):
            done = await (a, b)[n % 2].call("Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=1), CLIENT_TIMEOUT_S)
            assert done.ok and done.parsed().state == pb.RESERVATION_STATE_CONFIRMED, done.describe()
        assert not await asyncio.to_thread(snapshot_mismatches, postgres_url, redis_url)
        for instance in (a, b):
            assert instance.server.running(), instance.server.output()
        print(f"{len(during)} calls while Redis was down; outcomes {dict(seen)}; "
              f"degradations a={samples[0]['holdfast_snapshot_degradations_total']:.0f}"
              f" b={samples[1]['holdfast_snapshot_degradations_total']:.0f}")
    finally:
        await close_all(instances)


# ---------------------------------------------------------------------------------------------
# 3. PostgreSQL stopped mid-load, started again.

PG_SKU = "sku-pg-outage"
PG_TOTAL = 100_000
PG_WORKERS = 24
PG_ACKED_BEFORE_STOP = 200
PG_OUTAGE_CALLS = 150
PG_OK_AFTER_START = 100
PG_CALLS_PER_WORKER = 2_000  # a bound on the load, never reached in a healthy run
REFUSED_PAUSE_S = 0.01


async def test_postgres_outage_answers_unavailable_quickly_and_recovers(private_postgres, redis_url):
    instances: list[Instance] = []
    store = private_postgres.create_database("holdfast_faults")
    try:
        (a,) = await open_instances(["a"], store, redis_url, opened=instances)
        await a.ok("PutStock", pb.PutStockRequest(sku_id=PG_SKU, total=PG_TOTAL, request_id="stock-1"))

        answers: list[Answer] = []  # moves
        reads: list[Answer] = []
        stop = False
        progress = asyncio.Event()

        async def worker(w: int) -> None:
            rng = random.Random(w)
            for n in range(PG_CALLS_PER_WORKER):
                if stop:
                    return
                if n % 8 == 7:  # reads share the store's path and its failures
                    reads.append(await a.call("GetStock", pb.GetStockRequest(sku_id=PG_SKU), CLIENT_TIMEOUT_S))
                held = await a.call("Reserve", reserve(f"order-{w}-{n}", PG_SKU, rng.randint(1, 3)), CLIENT_TIMEOUT_S)
                answers.append(held)
                progress.set()
                if held.ok and rng.random() < CONFIRM_SHARE:
                    rid = held.parsed().reservation_id
                    answers.append(confirmed := await a.call("Confirm", pb.ConfirmRequest(reservation_id=rid), CLIENT_TIMEOUT_S))
                    held = confirmed
                if not held.ok:
                    await asyncio.sleep(REFUSED_PAUSE_S)  # no busy loop against a refusing server

        async def until(predicate, what: str) -> None:
            deadline = time.monotonic() + PHASE_TIMEOUT_S
            while not predicate():
                assert time.monotonic() < deadline, f"{what} not reached within {PHASE_TIMEOUT_S} s: {outcomes(answers)}"
                assert a.server.running(), a.server.output()
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        workers = [asyncio.create_task(worker(w)) for w in range(PG_WORKERS)]
        try:
            await until(lambda: sum(x.ok for x in answers) >= PG_ACKED_BEFORE_STOP, "load before the outage")
            stopping_at = time.monotonic()
            await asyncio.to_thread(stop_postgres, private_postgres)  # pg_ctl stop -m fast
            down_at = time.monotonic()
            await until(lambda: sum(x.started >= down_at for x in answers) >= PG_OUTAGE_CALLS, "calls during the outage")
            assert a.server.running(), a.server.output()
            starting_at = time.monotonic()
            await asyncio.to_thread(start_postgres, private_postgres)

            # Back without restarting holdfast (a first call per stale connection may still fail).
            async def serving():
                answer = await a.call("GetStock", pb.GetStockRequest(sku_id=PG_SKU), CLIENT_TIMEOUT_S)
                return answer.ok, answer.describe()

            await eventually(serving, RECOVERY_TIMEOUT_S, interval=0.2)
            back_at = time.monotonic()
            await until(lambda: sum(x.ok and x.started >= back_at for x in answers) >= PG_OK_AFTER_START, "load after the outage")
            stop = True
            await asyncio.wait_for(asyncio.gather(*workers), PHASE_TIMEOUT_S)
        finally:
            stop = True
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        assert a.server.running(), a.server.output()

        # Every call got the server's own answer, within its budget: no hang, no bare transport error.
        slowest = max(answers + reads, key=lambda x: x.latency)
        assert slowest.latency < CLIENT_TIMEOUT_S, slowest.describe()
        seen = outcomes(answers + reads)
        allowed = {"OK", DEPENDENCY_UNAVAILABLE, BUDGET_EXCEEDED}
        strange = [x for x in answers + reads if x.outcome not in allowed or (not x.ok and x.domain != "holdfast")]
        assert not strange, f"{seen}\n" + "\n".join(x.describe() for x in strange[:20])
        during = [x for x in answers + reads if x.started >= down_at and x.finished <= starting_at]
        assert len(during) >= PG_OUTAGE_CALLS // 2, f"only {len(during)} calls ran entirely inside the outage"
        assert all(x.outcome in (DEPENDENCY_UNAVAILABLE, BUDGET_EXCEEDED) for x in during), outcomes(during)
        assert any(x.outcome == DEPENDENCY_UNAVAILABLE and x.method == "Reserve" for x in during), outcomes(during)
        assert any(x.outcome == DEPENDENCY_UNAVAILABLE and x.method == "GetStock" for x in during), outcomes(during)

        # Acknowledged before the outage: all there, as acknowledged (nothing else touched them).
        before = [x for x in answers if x.ok and x.finished <= stopping_at]
        later_confirmed = {x.request.reservation_id for x in answers if x.method == "Confirm"}
        for x in before:
            rid = x.parsed().reservation_id
            if x.method == "Reserve" and rid in later_confirmed:
                continue  # a Confirm (acknowledged or not) followed it
            now = await a.call("GetReservation", pb.GetReservationRequest(reservation_id=rid))
            assert now.ok and now.reply == x.reply, (x.describe(), now.describe())

        # Retry every refused call: it replays (its COMMIT did land) or commits now, once.
        final: dict[tuple[str, bytes], Answer] = {x.key(): x for x in answers if x.ok}
        assert len(final) == sum(x.ok for x in answers), "one request acknowledged twice"
        refused = [x for x in answers if not x.ok]
        landed = 0
        for x in refused:
            for _ in range(10):  # a stale pooled connection may refuse once more
                retry = await a.call(x.method, x.request, CLIENT_TIMEOUT_S)
                if retry.outcome != DEPENDENCY_UNAVAILABLE:
                    break
                await asyncio.sleep(0.2)
            assert retry.ok, (x.describe(), retry.describe())
            landed += retry.replayed
            assert x.key() not in final
            final[x.key()] = retry
        # ... exactly once: every call now replays its one answer.
        await bounded(assert_replays(a, x) for x in final.values())

        # The books balance exactly against every call ever sent.
        reserves = [x for x in final.values() if x.method == "Reserve"]
        confirms = [x for x in final.values() if x.method == "Confirm"]
        (total, available, held_units, sold, version), stored = await asyncio.to_thread(check_books, store, PG_SKU)
        assert set(stored) == {x.parsed().reservation_id for x in reserves}
        assert held_units + sold == sum(x.request.quantity for x in reserves)
        assert sold == sum(stored[x.request.reservation_id].quantity for x in confirms)
        assert {stored[x.request.reservation_id].state for x in confirms} <= {CONFIRMED}
        assert version == 1 + len(reserves) + len(confirms), (version, len(reserves), len(confirms))
        stock = await a.ok("GetStock", pb.GetStockRequest(sku_id=PG_SKU))
        assert (stock.total, stock.available, stock.held, stock.sold, stock.version) == (total, available, held_units, sold, version)
        print(f"{len(during)} calls inside the outage, slowest call {slowest.latency:.3f} s ({slowest.outcome});"
              f" {len(refused)} refused calls retried, {landed} had committed; outcomes {dict(seen)}")
    finally:
        await close_all(instances)
        # Stopped here, by signal: the fixture's pg_ctl would fork() (see tests/load.py).
        await asyncio.to_thread(stop_postgres, private_postgres)


# ---------------------------------------------------------------------------------------------
# 4. One of two instances SIGKILLed mid-load, then restarted.

CRASH_SKU = "sku-instance-crash"
CRASH_TOTAL = 100_000
CRASH_WORKERS = 48
CRASH_ACKED_BEFORE_KILL = 300
CRASH_ACKED_BY_SURVIVOR = 200
CRASH_ACKED_BY_RESTARTED = 200
CRASH_CALLS_PER_WORKER = 500  # a bound on the load, never reached in a healthy run


async def test_sigkill_of_one_instance_mid_load_loses_nothing(postgres_url, redis_url):
    instances: list[Instance] = []
    try:
        a, b = await open_instances(["a", "b"], postgres_url, redis_url, opened=instances)
        await a.ok("PutStock", pb.PutStockRequest(sku_id=CRASH_SKU, total=CRASH_TOTAL, request_id="stock-1"))

        live: list[Instance] = [a, b]
        acked: list[Answer] = []
        unknown: list[Answer] = []  # in flight to the killed instance: committed or not, nobody knows
        strange: list[Answer] = []
        in_flight = collections.Counter()
        killed: str | None = None
        stop = False
        progress = asyncio.Event()

        async def send(instance: Instance, method: str, request) -> Answer | None:
            in_flight[instance.name] += 1
            try:
                answer = await instance.call(method, request, CLIENT_TIMEOUT_S)
            finally:
                in_flight[instance.name] -= 1
            progress.set()
            if answer.ok:
                assert not answer.replayed, answer.describe()
                acked.append(answer)
                return answer
            if answer.target == killed and not answer.reason:  # no Status from the server: the connection died
                unknown.append(answer)
            else:
                strange.append(answer)
            return None

        async def worker(w: int) -> None:
            rng = random.Random(w)
            for n in range(CRASH_CALLS_PER_WORKER):
                if stop:
                    return
                first = live[(w + n) % len(live)]
                held = await send(first, "Reserve", reserve(f"order-{w}-{n}", CRASH_SKU, rng.randint(1, 3)))
                if held is None:
                    continue
                rid = held.parsed().reservation_id
                second = live[(w + n + 1) % len(live)]  # the other instance, while there are two
                follow = rng.random()
                if follow < 0.25:
                    await send(second, "Confirm", pb.ConfirmRequest(reservation_id=rid, expected_version=1))
                elif follow < 0.40:
                    await send(second, "Release", pb.ReleaseRequest(reservation_id=rid, reason="changed mind"))

        async def until(predicate, what: str) -> None:
            deadline = time.monotonic() + PHASE_TIMEOUT_S
            while not predicate():
                assert time.monotonic() < deadline, f"{what} not reached within {PHASE_TIMEOUT_S} s: {len(acked)} acked"
                assert not strange, "\n".join(x.describe() for x in strange[:10])
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        workers = [asyncio.create_task(worker(w)) for w in range(CRASH_WORKERS)]
        try:
            await until(lambda: len(acked) >= CRASH_ACKED_BEFORE_KILL, "load on both instances")
            killed = a.name
            live.remove(a)  # new calls go to the survivor
            in_flight_at_kill = in_flight[a.name]
            a.server.send(signal.SIGKILL)
            assert await asyncio.to_thread(a.server.wait) == -signal.SIGKILL
            await until(lambda: sum(x.target == b.name for x in acked) >= CRASH_ACKED_BY_SURVIVOR + CRASH_ACKED_BEFORE_KILL // 2,
                        "load on the survivor")
            # Restart it on the same store and snapshot while the survivor carries the load.
            server, _ = await asyncio.to_thread(start_instance, "a2", postgres_url, redis_url)
            a2 = Instance("a2", server, grpc.aio.insecure_channel(server.target))
            instances.append(a2)
            live.append(a2)
            await until(lambda: sum(x.target == a2.name for x in acked) >= CRASH_ACKED_BY_RESTARTED, "load on the restarted instance")
            stop = True
            await asyncio.wait_for(asyncio.gather(*workers), PHASE_TIMEOUT_S)
        finally:
            stop = True
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        assert not strange, "\n".join(x.describe() for x in strange[:10])
        assert in_flight_at_kill > 0, "the kill must land while calls are in flight"
        assert unknown, "no call was in flight at the kill"
        assert "Traceback" not in b.server.stderr.text(), b.server.output()

        # Every acknowledged move replays, byte for byte, on both running instances.
        await bounded(assert_replays(instance, x) for x in acked for instance in (b, a2))

        # Calls in flight at the kill: they replay (committed before it) or commit now, exactly once.
        final: dict[tuple[str, bytes], Answer] = {x.key(): x for x in acked}
        assert len(final) == len(acked), "one request acknowledged twice"
        landed = 0
        for x in unknown:
            retry = await a2.call(x.method, x.request, CLIENT_TIMEOUT_S)
            assert retry.ok, (x.describe(), retry.describe())
            landed += retry.replayed
            final[x.key()] = retry
            await assert_replays(b, retry)

        # What the clients know about each reservation is what the store holds.
        holds = {x.parsed().reservation_id: x for x in final.values() if x.method == "Reserve"}
        follow_ups = {x.request.reservation_id: x for x in final.values() if x.method in ("Confirm", "Release")}
        for rid, x in holds.items():
            now = await b.call("GetReservation", pb.GetReservationRequest(reservation_id=rid))
            assert now.ok and now.reply == follow_ups.get(rid, x).reply, (rid, now.describe())

        (total, available, held_units, sold, version), stored = await asyncio.to_thread(check_books, postgres_url, CRASH_SKU)
        assert set(stored) == set(holds)
        states = collections.Counter(r.state for r in stored.values())
        assert set(states) <= {RESERVED, CONFIRMED, RELEASED}, states
        assert states[CONFIRMED] == sum(x.method == "Confirm" for x in follow_ups.values())
        assert states[RELEASED] == sum(x.method == "Release" for x in follow_ups.values())
        assert held_units + sold == sum(r.quantity for r in stored.values() if r.state != RELEASED)
        assert version == 1 + len(holds) + len(follow_ups), (version, len(holds), len(follow_ups))
        stocks = [await i.call("GetStock", pb.GetStockRequest(sku_id=CRASH_SKU)) for i in (a2, b)]
        assert stocks[0].ok and stocks[0].reply == stocks[1].reply, [s.describe() for s in stocks]
        assert store_stock(postgres_url, CRASH_SKU)[:4] == (total, available, held_units, sold)

        # The restart rebuilt the snapshot: Redis holds the store's version of every reservation.
        async def snapshot_matches():
            mismatches = await asyncio.to_thread(snapshot_mismatches, postgres_url, redis_url)
            return not mismatches, dict(list(mismatches.items())[:5])

        await eventually(snapshot_matches, RECOVERY_TIMEOUT_S)
        print(f"acknowledged {len(acked)} moves, {in_flight_at_kill} in flight at the kill,"
              f" {landed} of {len(unknown)} unacknowledged had committed")
    finally:
        await close_all(instances)


# -- 5. PostgreSQL frozen (SIGSTOP): answers come within the budget, never a hang ----

FROZEN_SKU = "sku-pg-frozen"
FROZEN_CALLS = 16
RESERVE_BUDGET_S = 2.0  # Reserve's timeout_ms in inventory.proto


def _cluster_pids(postmaster_pid: int) -> list[int]:
    """The postmaster and every process it forked (backends, writers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == postmaster_pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return [postmaster_pid, *children]


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a short-lived child already gone
            os.kill(pid, signum)


async def test_frozen_postgres_answers_within_budget_and_commits_at_most_once(private_postgres, redis_url):
    instances: list[Instance] = []
    store = private_postgres.create_database("holdfast_frozen")
    try:
        (a,) = await open_instances(["a"], store, redis_url, opened=instances)
        await a.ok("PutStock", pb.PutStockRequest(sku_id=FROZEN_SKU, total=1_000, request_id="stock-1"))
        pids = _cluster_pids(private_postgres.proc.pid)
        _signal_all(pids, signal.SIGSTOP)
        try:
            frozen = await asyncio.gather(
                *(a.call("Reserve", reserve(f"frozen-{n}", FROZEN_SKU), CLIENT_TIMEOUT_S) for n in range(FROZEN_CALLS))
            )
        finally:
            _signal_all(pids, signal.SIGCONT)
        for answer in frozen:
            assert answer.outcome in (BUDGET_EXCEEDED, DEPENDENCY_UNAVAILABLE), answer.describe()
            assert answer.latency < CLIENT_TIMEOUT_S / 2, answer.describe()  # the budget, not the client, ended it
        assert min(answer.latency for answer in frozen) >= RESERVE_BUDGET_S * 0.9

        async def retried():
            again = await asyncio.gather(*(a.call("Reserve", answer.request, CLIENT_TIMEOUT_S) for answer in frozen))
            return all(answer.ok for answer in again), again

        again = await eventually(retried, RECOVERY_TIMEOUT_S)
        total, available, held, sold, _ = store_stock(store, FROZEN_SKU)
        assert (total, available, held, sold) == (1_000, 1_000 - FROZEN_CALLS, FROZEN_CALLS, 0)
        assert len({answer.parsed().reservation_id for answer in again}) == FROZEN_CALLS
    finally:
        await close_all(instances)
