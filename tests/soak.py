"""A soak run: `holdfast serve` as a real process under steady Reserve +
Confirm load, sampled every few seconds for what it keeps: the store's size
(SQLite: its live pages; PostgreSQL: its rows and their bytes), the Redis
snapshot's keys and memory, and the server's RSS. What tests/test_soak.py
asserts flat once the retention has passed, and what

    python -m tests.soak --seconds 60 [--retention-ms 0] [--postgres URL --redis URL]

prints for the figures of docs/retention.md (with `--retention-ms 0`, the
store keeps everything, as before retention).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import psycopg
import redis

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from tests.process import ServerProcess, start_server
from tests.support import failure_of

HOLD_MS = 300  # every hold settles soon: confirmed, or expired by the reaper
IN_FLIGHT = 8
SKUS = 50


@dataclass(frozen=True, slots=True)
class Sample:
    at_s: float
    calls: int
    store_bytes: int
    store_rows: int
    redis_keys: int
    redis_bytes: int
    rss_bytes: int


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def sqlite_size(path: str) -> tuple[int, int]:
    """(bytes of the live pages, rows of outcome + reservation) of a SQLite store."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
        size = pages * db.execute("PRAGMA page_size").fetchone()[0]
        rows = sum(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("outcome", "reservation"))
    return size, rows


def postgres_size(url: str) -> tuple[int, int]:
    """(bytes of outcome + reservation, their rows) of a PostgreSQL store,
    after a VACUUM so dead rows do not count as kept."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("VACUUM outcome, reservation")
        rows = sum(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("outcome", "reservation"))
        size = db.execute("SELECT pg_total_relation_size('outcome') + pg_total_relation_size('reservation')").fetchone()[0]
    return size, rows


async def _load(target: str, stop: asyncio.Event, counter: list[int]) -> None:
    """IN_FLIGHT clients, each Reserve then (every other one) Confirm, on SKUS SKUs."""
    orders = itertools.count()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        for n in range(SKUS):
            await stub.PutStock(pb.PutStockRequest(sku_id=f"sku-{n}", total=10**9, request_id="soak"), timeout=10)

        async def client() -> None:
            while not stop.is_set():
                n = next(orders)
                held = await stub.Reserve(pb.ReserveRequest(order_id=f"o{n}", sku_id=f"sku-{n % SKUS}", quantity=1,
                                                            timestamp_ms=1, hold_ms=HOLD_MS), timeout=10)
                counter[0] += 1
                if n % 2 == 0:
                    try:
                        await stub.Confirm(pb.ConfirmRequest(reservation_id=held.reservation_id), timeout=10)
                    except grpc.aio.AioRpcError as error:
                        # A loaded machine can take longer than HOLD_MS between the two calls:
                        # the hold then settles by expiring, which is the soak's other way out.
                        if failure_of(error).reason != "HOLD_EXPIRED":
                            raise
                    counter[0] += 1

        await asyncio.gather(*(client() for _ in range(IN_FLIGHT)))


async def soak(server: ServerProcess, seconds: float, every_s: float, sqlite_path: str = "",
               postgres_url: str = "", redis_url: str = "") -> list[Sample]:
    stop, counter = asyncio.Event(), [0]
    load = asyncio.create_task(_load(server.target, stop, counter))
    snapshot = redis.Redis.from_url(redis_url) if redis_url else None
    samples: list[Sample] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            await asyncio.sleep(every_s)
            elapsed = time.monotonic() - started
            assert not load.done(), load.exception()
            size, rows = await asyncio.to_thread(sqlite_size if sqlite_path else postgres_size, sqlite_path or postgres_url)
            keys = snapshot.dbsize() if snapshot is not None else 0
            memory = snapshot.info("memory")["used_memory"] if snapshot is not None else 0
            samples.append(Sample(round(elapsed, 1), counter[0], size, rows, keys, memory, rss_of(server.proc.pid)))
    finally:
        stop.set()
        await load
        if snapshot is not None:
            snapshot.close()
    return samples


def serve(store: str, snapshot: str, retention_ms: int, tombstone_ms: int) -> ServerProcess:
    return start_server(store, snapshot=snapshot, extra=(
        "--retention-ms", str(retention_ms), "--tombstone-ms", str(tombstone_ms), "--services", "inventory",
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--every", type=float, default=5)
    parser.add_argument("--retention-ms", type=int, default=2000)
    parser.add_argument("--tombstone-ms", type=int, default=2000)
    parser.add_argument("--postgres", default="", help="a PostgreSQL URL (an empty database); else SQLite in /tmp")
    parser.add_argument("--redis", default="", help="a Redis URL for the snapshot; else the in-process one")
    args = parser.parse_args()
    path = f"/tmp/holdfast-soak-{time.time_ns()}.db"
    store = args.postgres or f"sqlite:///{path}"
    server = serve(store, args.redis or "memory://", args.retention_ms, args.tombstone_ms)
    try:
        samples = asyncio.run(soak(server, args.seconds, args.every, "" if args.postgres else path, args.postgres, args.redis))
    finally:
        server.stop()
        server.close()
    for sample in samples:
        print(json.dumps(asdict(sample)))
    first, last = samples[0], samples[-1]
    calls = last.calls - first.calls
    print(f"over {calls} calls after the first sample: store {(last.store_bytes - first.store_bytes) / calls:.1f} B/call,"
          f" rows {(last.store_rows - first.store_rows) / calls:.3f}/call,"
          f" redis {(last.redis_bytes - first.redis_bytes) / calls:.1f} B/call,"
          f" rss {(last.rss_bytes - first.rss_bytes) / calls:.1f} B/call")


if __name__ == "__main__":
    main()
