"""`holdfast serve --workers N` as a real process group on real PostgreSQL and
Redis: one port served by every worker, stock exact across them, a clean
stop on a signal, a dead worker stopping the group, and what it refuses.

Which worker answered is read from each worker's own /metrics (worker i on
the metrics port + i - 1). Many channels, each with a subchannel pool of its
own, open many TCP connections, which the kernel spreads over the workers.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc
from tests.backends import create_database, drop_database
from tests.process import ServerProcess, free_port, run_holdfast, start_server
from tests.support import failure_of, pb

WORKERS = 2
CHANNELS = 24  # the chance that all land on one of two workers is 2**-23
READY = re.compile(r" on (?P<target>\S+) with (?P<n>\d+) workers \(pids (?P<pids>[\d, ]+);")
SERVICE_PATH = "/holdfast.inventory.v1.InventoryService/"
_DATABASES = itertools.count(1)


def _metrics_ports(count: int) -> int:
    """A port P with P .. P+count-1 all free right now."""
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no run of free ports found")


class Group:
    """A started `holdfast serve --workers N`, its worker pids and metrics ports."""

    def __init__(self, store: str, snapshot: str, workers: int = WORKERS) -> None:
        self.metrics_port = _metrics_ports(workers)
        self.server = start_server(
            store, snapshot=snapshot, extra=("--workers", str(workers), "--metrics-port", str(self.metrics_port))
        )
        match = READY.search(self.server.ready_line or "")
        assert match, self.server.output()
        assert match["target"] == self.server.target and int(match["n"]) == workers, self.server.ready_line
        self.pids = [int(pid) for pid in match["pids"].split(", ")]
        self.target = self.server.target

    def answered(self, method: str) -> list[float]:
        """Per worker, the answers (any reason) it gave to `method`."""
        counts = []
        for port in range(self.metrics_port, self.metrics_port + len(self.pids)):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            counts.append(sum(
                sample.value
                for family in text_string_to_metric_families(text) if family.name == "holdfast_outcomes"
                for sample in family.samples
                if sample.name.endswith("_total") and sample.labels["method"] == SERVICE_PATH + method
            ))
        return counts

    def close(self) -> None:
        self.server.close()


def _database(admin_url: str) -> str:
    name = f"holdfast_workers_{os.getpid()}_{next(_DATABASES)}"
    create_database(admin_url, name)
    return name


def _url(admin_url: str, name: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


@pytest.fixture
def store(postgres_server: str):
    name = _database(postgres_server)
    try:
        yield _url(postgres_server, name)
    finally:
        drop_database(postgres_server, name)


@pytest.fixture(scope="module")
def group(postgres_server: str, redis_server: str):
    """One group for the suites that only call it (each uses SKUs of its own)."""
    import redis

    with redis.Redis.from_url(redis_server, socket_timeout=10) as client:
        client.flushdb()  # as the redis_url fixture does, once for the module
    name = _database(postgres_server)
    group = Group(_url(postgres_server, name), redis_server)
    try:
        yield group
    finally:
        group.close()
        drop_database(postgres_server, name)


def _channels(target: str, count: int) -> list[grpc.aio.Channel]:
    """Channels that do not share a connection: each its own subchannel pool."""
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


async def _close(channels: list[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(channel.close() for channel in channels))


# -- one port, every worker -------------------------------------------------------------


async def test_every_worker_answers_on_the_one_port(group):
    assert len(set(group.pids)) == WORKERS and group.server.proc.pid not in group.pids
    before = group.answered("GetStock")
    channels = _channels(group.target, CHANNELS)
    try:
        for channel in channels:  # one call each: a connection per channel, spread by the kernel
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku_id="no-such-sku"), timeout=10)
            assert failure_of(missing.value).reason == "SKU_NOT_FOUND"
    finally:
        await _close(channels)
    served = [after - earlier for after, earlier in zip(group.answered("GetStock"), before)]
    assert sum(served) == CHANNELS, served
    assert all(count > 0 for count in served), f"a worker answered nothing: {served}"


async def test_stock_is_exact_across_workers(group):
    total, attempts = 30, 64
    channels = _channels(group.target, 16)
    stubs = [pb_grpc.InventoryServiceStub(channel) for channel in channels]
    try:
        await stubs[0].PutStock(pb.PutStockRequest(sku_id="sku-shared", total=total, request_id="stock-1"), timeout=10)

        async def reserve(n: int):
            request = pb.ReserveRequest(order_id=f"order-{n}", sku_id="sku-shared", quantity=1, timestamp_ms=n + 1)
            try:
                return await stubs[n % len(stubs)].Reserve(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                return failure_of(error).reason

        answers = await asyncio.gather(*(reserve(n) for n in range(attempts)))
        held = [a for a in answers if isinstance(a, pb.ReservationReply)]
        refused = [a for a in answers if not isinstance(a, pb.ReservationReply)]
        assert len(held) == total and len({h.reservation_id for h in held}) == total
        assert refused == ["INSUFFICIENT_STOCK"] * (attempts - total)  # contention never shows as an error

        # Each hold confirmed on another connection than the one that took it,
        # so across workers: their shared snapshot agrees with the store.
        confirmed = await asyncio.gather(*(
            stubs[(n + 1) % len(stubs)].Confirm(pb.ConfirmRequest(reservation_id=h.reservation_id), timeout=30)
            for n, h in enumerate(held)
        ))
        assert {c.state for c in confirmed} == {pb.RESERVATION_STATE_CONFIRMED}
        stock = await stubs[-1].GetStock(pb.GetStockRequest(sku_id="sku-shared"), timeout=10)
        assert (stock.total, stock.available, stock.held, stock.sold) == (total, 0, 0, total)
    finally:
        await _close(channels)


def test_a_taken_port_is_refused(group, redis_server: str, tmp_path):
    # Another group must not join this one through SO_REUSEPORT (its port is
    # checked before its store is opened), nor a lone server take it.
    others = {
        "group": ("--workers", "2", "--store", "postgresql://postgres@127.0.0.1:1/never-opened", "--snapshot", redis_server),
        "lone": ("--workers", "1", "--store", f"sqlite:///{tmp_path}/lone.db", "--snapshot", "memory://"),
    }
    for other, flags in others.items():
        done = run_holdfast("serve", "--listen", group.target, *flags)
        assert done.returncode == 2, (other, done.stdout, done.stderr)
        assert f"holdfast: cannot listen on {group.target}" in done.stderr, done.stderr
        assert "holdfast serving" not in done.stdout
    assert group.server.running()
    still = run_holdfast("stock", "get", "no-such-sku", "--target", group.target)
    assert still.returncode == 1 and "SKU_NOT_FOUND" in still.stderr, still.stderr


# -- stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_worker_and_the_supervisor_exits_0(store, redis_url, sig):
    group = Group(store, redis_url)
    try:
        assert run_holdfast("stock", "put", "sku-stop", "5", "--target", group.target).returncode == 0
        assert group.server.stop(sig) == 0, group.server.output()
        assert group.server.stdout.lines[-1] == "holdfast stopped", group.server.output()
        assert "Traceback" not in group.server.stderr.text(), group.server.output()
        for pid in group.pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        group.close()
    # The port is free again: a lone server takes it and finds what the group stored.
    again = start_server(store, port=int(group.target.rpartition(":")[2]), snapshot=redis_url)
    try:
        done = run_holdfast("stock", "get", "sku-stop", "--target", again.target)
        assert done.stdout.startswith("sku-stop: total 5, available 5"), done.stdout + done.stderr
    finally:
        again.close()


def test_a_worker_that_dies_stops_the_group(store, redis_url):
    group = Group(store, redis_url)
    try:
        os.kill(group.pids[0], signal.SIGKILL)
        code = group.server.wait()
        assert code == 1, group.server.output()
        assert f"worker 1 (pid {group.pids[0]}) exited with signal SIGKILL while serving; stopping the group" \
            in group.server.stderr.text(), group.server.output()
        with pytest.raises(ProcessLookupError):
            os.kill(group.pids[1], 0)
    finally:
        group.close()


# -- refused: what N processes cannot share ---------------------------------------------------

PG = "postgresql://postgres@127.0.0.1:1/never-opened"
REDIS = "redis://127.0.0.1:1/0"
REFUSED = [
    # (store, snapshot, more flags) -> what the error says
    ("memory-snapshot", PG, "memory://", (), "--workers 2 needs a shared snapshot (redis:// or redis+cluster://)"),
    ("sqlite-store", "sqlite:///./never.db", REDIS, (), "--workers 2 needs a PostgreSQL store (postgresql://)"),
    ("journal", PG, REDIS, ("--journal", "never.jsonl"), "--journal records one process's calls in order"),
    ("metrics-port-0", PG, REDIS, ("--metrics-listen", "127.0.0.1:0"), "needs a port: worker i serves"),
]


@pytest.mark.parametrize("store,snapshot,extra,message", [row[1:] for row in REFUSED], ids=[row[0] for row in REFUSED])
def test_what_workers_cannot_share_is_refused_before_anything_starts(tmp_path, store, snapshot, extra, message):
    done = run_holdfast("serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}",
                        "--store", store, "--snapshot", snapshot, *extra, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.startswith("holdfast: ") and message in done.stderr, done.stderr
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no store file, no journal


def test_a_port_of_0_is_resolved_once_for_every_worker(store, redis_url):
    server = ServerProcess(store, port=0, snapshot=redis_url, extra=("--workers", "2"))
    try:
        line = server.wait_ready()
        match = READY.search(line)
        assert match and not match["target"].endswith(":0"), line
        done = run_holdfast("stock", "get", "no-such-sku", "--target", match["target"])
        assert done.returncode == 1 and "SKU_NOT_FOUND" in done.stderr
        assert server.stop() == 0, server.output()
    finally:
        server.close()


def test_a_worker_that_cannot_start_stops_the_group_with_exit_2(store, redis_url):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        metrics_port = taken.getsockname()[1] - 1  # worker 2's metrics port is the taken one
        done = run_holdfast("serve", "--workers", "2", "--listen", f"127.0.0.1:{free_port()}", "--store", store,
                            "--snapshot", redis_url, "--metrics-port", str(metrics_port))
    finally:
        taken.close()
    assert done.returncode == 2, done
    assert f"holdfast: worker 2: cannot serve metrics on 127.0.0.1:{metrics_port + 1}" in done.stderr, done.stderr
    assert "before it served; stopping the group" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
