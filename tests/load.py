"""Load and verification helpers for suites that drive real `holdfast serve`
processes over real PostgreSQL and Redis (tests/test_faults.py).

* `invoke()` makes one unary call and turns whatever comes back (a reply, a
  server error with its `google.rpc.Status`, or a transport failure with
  none) into an `Answer`: exact bytes, trailing metadata, ErrorInfo reason,
  latency. It never raises for an RPC error.
* `Instance` pairs a server process with its client channel.
* `store_*` read the store of record directly with psycopg, `snapshot_versions`
  reads Redis directly, `scrape()` reads a server's Prometheus /metrics.
* `eventually()` polls a check generously; nothing here measures speed.

Blocking helpers (psycopg, redis-py, urllib, server start-up) are meant to run
through `asyncio.to_thread` while a load runs on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import grpc
from google.rpc import error_details_pb2, status_pb2

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast.redis_snapshot import snapshot_key
from tests.process import ServerProcess, free_port, start_server

SERVICE = "/holdfast.inventory.v1.InventoryService/"
STATUS_DETAILS = "grpc-status-details-bin"
REPLAYED = "holdfast-replayed"
CONTEXT_ID = "holdfast-context-id"

REPLY_TYPES = {
    "PutStock": pb.StockReply,
    "GetStock": pb.StockReply,
    "Reserve": pb.ReservationReply,
    "Confirm": pb.ReservationReply,
    "Release": pb.ReservationReply,
    "GetReservation": pb.ReservationReply,
}

# Reservation states as the store keeps them (service/machine.py State values).
RESERVING, RESERVED, CONFIRMING, CONFIRMED, RELEASING, RELEASED = 2, 3, 4, 5, 6, 7
INTENT_STATES = (RESERVING, CONFIRMING, RELEASING)


# -- calls -------------------------------------------------------------------------


@dataclass
class Answer:
    """One finished call, whatever its outcome."""

    method: str
    request: object
    target: str
    started: float  # time.monotonic()
    finished: float
    code: grpc.StatusCode
    reply: bytes | None = None  # the exact reply bytes on OK
    reason: str = ""  # "OK", the ErrorInfo reason, or "" when the error carries no Status
    domain: str = ""
    message: str = ""
    status_details: bytes | None = None  # grpc-status-details-bin, as sent
    trailing: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def latency(self) -> float:
        return self.finished - self.started

    @property
    def replayed(self) -> bool:
        return self.trailing.get(REPLAYED) == "true"

    @property
    def context_id(self) -> str | None:
        return self.trailing.get(CONTEXT_ID)

    @property
    def outcome(self) -> str:
        """`OK`, `<CODE>/<REASON>` for a server answer, `<CODE>/-` for a bare transport error."""
        return "OK" if self.ok else f"{self.code.name}/{self.reason or '-'}"

    def parsed(self):
        assert self.reply is not None, f"{self.method} did not succeed: {self.describe()}"
        return REPLY_TYPES[self.method].FromString(self.reply)

    def key(self) -> tuple[str, bytes]:
        return self.method, self.request.SerializeToString(deterministic=True)

    def describe(self) -> str:
        return f"{self.method} to {self.target}: {self.outcome} {self.message!r} after {self.latency:.3f} s"


async def invoke(channel: grpc.aio.Channel, target: str, method: str, request, timeout: float) -> Answer:
    """One unary call with a client deadline of `timeout`; never raises an RPC error."""
    rpc = channel.unary_unary(
        SERVICE + method, request_serializer=type(request).SerializeToString, response_deserializer=None
    )
    started = time.monotonic()
    call = rpc(request, timeout=timeout)
    try:
        reply = await call
        trailing = dict(await call.trailing_metadata() or ())
        return Answer(method, request, target, started, time.monotonic(), grpc.StatusCode.OK, reply=reply,
                      reason="OK", trailing=trailing)
    except grpc.aio.AioRpcError as error:
        finished = time.monotonic()
        trailing = dict(error.trailing_metadata() or ())
        answer = Answer(method, request, target, started, finished, error.code(), message=error.details() or "",
                        trailing=trailing)
        raw = trailing.get(STATUS_DETAILS)
        if raw:
            answer.status_details = bytes(raw)
            status = status_pb2.Status.FromString(answer.status_details)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    answer.reason, answer.domain = info.reason, info.domain
        return answer


@dataclass
class Instance:
    """A `holdfast serve` process and a channel to it."""

    name: str
    server: ServerProcess
    channel: grpc.aio.Channel
    metrics_port: int | None = None

    @property
    def target(self) -> str:
        return self.server.target

    async def call(self, method: str, request, timeout: float = 30.0) -> Answer:
        return await invoke(self.channel, self.name, method, request, timeout)

    async def ok(self, method: str, request, timeout: float = 30.0):
        """The parsed reply of a call that must succeed."""
        answer = await self.call(method, request, timeout)
        assert answer.ok, f"{answer.describe()}\n{self.server.output()[-4000:]}"
        return answer.parsed()

    async def close(self) -> None:
        await self.channel.close()
        await asyncio.to_thread(self.server.close)


def start_instance(name: str, store: str, snapshot: str, metrics: bool = False, pool: int = 2) -> tuple[ServerProcess, int | None]:
    """Blocking: starts `holdfast serve` (with /metrics on a free port when asked)."""
    metrics_port = free_port() if metrics else None
    extra = ("--store-pool", str(pool))
    if metrics_port is not None:
        extra += ("--metrics-listen", f"127.0.0.1:{metrics_port}")
    return start_server(store, snapshot=snapshot, extra=extra), metrics_port


async def open_instances(names: Iterable[str], store: str, snapshot: str, metrics: bool = False,
                         opened: list[Instance] | None = None) -> list[Instance]:
    """Starts one server per name concurrently; each is appended to `opened` as
    soon as it serves (so a `finally` can close what did start)."""
    opened = [] if opened is None else opened
    names = list(names)
    results = await asyncio.gather(
        *(asyncio.to_thread(start_instance, name, store, snapshot, metrics) for name in names), return_exceptions=True
    )
    started = []
    for name, result in zip(names, results):
        if isinstance(result, BaseException):
            continue
        server, metrics_port = result
        instance = Instance(name, server, grpc.aio.insecure_channel(server.target), metrics_port)
        opened.append(instance)
        started.append(instance)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return started


# -- polling -------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[tuple[bool, object]]], timeout: float, interval: float = 0.1) -> object:
    """Runs `check` until it says done (returning its detail) or `timeout`
    seconds pass (then fails with the last detail)."""
    deadline = time.monotonic() + timeout
    while True:
        done, detail = await check()
        if done:
            return detail
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached within {timeout} s: {detail}")
        await asyncio.sleep(interval)


# -- PostgreSQL outages ----------------------------------------------------------------
#
# tests/backends.py's PostgresServer.stop() and .start() run pg_ctl and the
# postmaster with subprocess's `user=` (the tests run as root, PostgreSQL may
# not), which makes subprocess fork() rather than vfork(). A fork() while this
# process has gRPC calls in flight runs gRPC core's fork handlers, and the
# child then often dies of SIGSEGV before it execs (pg_ctl "fails", the
# postmaster "does not start"). These two do the same to the same server
# object without a fork(): a signal to stop it, and `setpriv` (exec, no
# fork) to drop to the postgres user so that subprocess may vfork().


def stop_postgres(server, timeout: float = 30.0) -> None:
    """`pg_ctl stop -m fast`, as a signal: SIGINT to the postmaster, then wait for it."""
    if not server.running():
        return
    server.proc.send_signal(signal.SIGINT)
    server.proc.wait(timeout)


def start_postgres(server, timeout: float = 30.0) -> None:
    """Starts `server` again on its data directory and port; returns once it
    accepts connections. Keeps `server.proc` current, so the fixture's own
    stop / kill / close still work."""
    if server.running():
        return
    command = [str(server.bindir / "postgres"), "-D", str(server.data)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:  # no way around the fork(): the fixture's own start
            server.start(timeout)
            return
        command = [setpriv, "--reuid=postgres", "--regid=postgres", "--clear-groups", *command]
    with open(server.log, "ab") as log:
        server.proc = subprocess.Popen(
            command, cwd=server.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "LC_ALL": "C"}, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _connect(server.url, 2):
                return
        except Exception as error:  # noqa: BLE001 - starting up, or not yet listening
            last = error
        if server.proc.poll() is not None or time.monotonic() >= deadline:
            tail = "\n".join(server.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"PostgreSQL did not come back on {server.url} (exit {server.proc.poll()}): {last}\n{tail}")
        time.sleep(0.05)


# -- the store, read directly ----------------------------------------------------------


def _connect(url: str, timeout: int = 10):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=timeout)


@dataclass(frozen=True)
class StoredReservation:
    reservation_id: str
    sku_id: str
    quantity: int
    state: int
    version: int


def store_reservations(url: str) -> dict[str, StoredReservation]:
    with _connect(url) as conn:
        rows = conn.execute("SELECT reservation_id, sku_id, quantity, state, version FROM reservation").fetchall()
    return {row[0]: StoredReservation(*row) for row in rows}


def store_versions(url: str) -> dict[str, int]:
    with _connect(url) as conn:
        return dict(conn.execute("SELECT reservation_id, version FROM reservation").fetchall())


def store_stock(url: str, sku_id: str) -> tuple[int, int, int, int, int]:
    """(total, available, held, sold, version) of one SKU, straight from the table."""
    with _connect(url) as conn:
        row = conn.execute("SELECT total, available, held, sold, version FROM stock WHERE sku_id = %s", (sku_id,)).fetchone()
    assert row is not None, f"no stock row for {sku_id}"
    return tuple(row)


def check_books(url: str, sku_id: str) -> tuple[tuple[int, int, int, int, int], dict[str, StoredReservation]]:
    """The stock row adds up and matches the reservations exactly: held is the
    sum of RESERVED quantities, sold of CONFIRMED ones; no intent is left."""
    reservations = store_reservations(url)
    total, available, held, sold, version = stock = store_stock(url, sku_id)
    assert available + held + sold == total, f"stock does not add up: {stock}"
    assert min(available, held, sold) >= 0, f"negative stock: {stock}"
    intents = [r for r in reservations.values() if r.state in INTENT_STATES]
    assert not intents, f"reservations left in an -ING state: {intents[:5]}"
    mine = [r for r in reservations.values() if r.sku_id == sku_id]
    assert held == sum(r.quantity for r in mine if r.state == RESERVED), (stock, "held != sum of RESERVED")
    assert sold == sum(r.quantity for r in mine if r.state == CONFIRMED), (stock, "sold != sum of CONFIRMED")
    return stock, reservations


# -- the snapshot, read directly ---------------------------------------------------------


def snapshot_versions(redis_url: str, reservation_ids: Iterable[str]) -> dict[str, int | None]:
    """Each reservation's version as the Redis snapshot holds it (None: no key)."""
    import redis

    ids = list(reservation_ids)
    result: dict[str, int | None] = {}
    with redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5) as client:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for rid, raw in zip(chunk, client.mget([snapshot_key(rid) for rid in chunk])):
                result[rid] = None if raw is None else int(raw)
    return result


def snapshot_mismatches(store_url: str, redis_url: str) -> dict[str, tuple[int, int | None]]:
    """Reservations whose Redis version differs from the store's: {id: (store, redis)}."""
    store = store_versions(store_url)
    snapshot = snapshot_versions(redis_url, store)
    return {rid: (v, snapshot[rid]) for rid, v in store.items() if snapshot[rid] != v}


# -- metrics ---------------------------------------------------------------------------------


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Unlabelled samples of a server's /metrics, by name."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples
