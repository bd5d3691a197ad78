"""The snapshot contract, one suite for every backend (memory, Redis, Redis
Cluster), then what only the Redis backend promises: its script's contract,
NOSCRIPT recovery, one slot per entity, degradation and rebuilding."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import AsyncIterator, Awaitable, Callable, Mapping

import pytest
from prometheus_client import REGISTRY
from redis.crc import key_slot

from holdfast.backends import open_snapshot
from holdfast.memory_snapshot import MemorySnapshot
from holdfast.redis_snapshot import RedisSnapshot, snapshot_key
from holdfast.snapshot import Snapshot
from tests.process import free_port

RECOVERY_TIMEOUT_S = 30.0


def pages_of(store: Mapping[str, int], page: int = 3):
    """A `rebuild_from` over a dict standing in for the store, `page` entries a page."""

    async def pages() -> AsyncIterator[dict[str, int]]:
        rows = sorted(store.items())
        for start in range(0, len(rows), page):
            yield dict(rows[start : start + page])

    return pages


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., Awaitable[Snapshot]]]:
    """Opens snapshots (over a dict standing in for the store, or `pages`)
    and closes them after the test, whatever happened."""
    snapshots: list[Snapshot] = []

    async def open_(url: str, store: Mapping[str, int] | None = None, pages=None) -> Snapshot:
        snapshot = open_snapshot(url)
        snapshots.append(snapshot)
        await snapshot.open(pages or pages_of(store or {}))
        return snapshot

    yield open_
    for snapshot in snapshots:
        await snapshot.close()


async def wait_trusted(snapshot: RedisSnapshot, timeout_s: float = RECOVERY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while snapshot.degraded:
        assert time.monotonic() < deadline, f"snapshot still degraded after {timeout_s} s"
        await asyncio.sleep(0.05)


def backend_url(request, backend: str) -> str:
    if backend == "memory":
        return "memory://"
    return request.getfixturevalue({"redis": "redis_url", "cluster": "redis_cluster_url"}[backend])


@pytest.fixture(params=["memory", "redis", "cluster"])
async def snapshot(request, opened) -> Snapshot:
    return await opened(backend_url(request, request.param))


@pytest.fixture(params=["redis", "cluster"])
async def redis_snapshot(request, opened) -> RedisSnapshot:
    snapshot = await opened(backend_url(request, request.param))
    assert isinstance(snapshot, RedisSnapshot)
    assert not snapshot.degraded
    return snapshot


# -- the contract every backend passes ---------------------------------------


async def test_unknown_entity_is_none(snapshot):
    assert await snapshot.version("r-unknown") is None


async def test_advance_only_moves_forward(snapshot):
    await snapshot.advance({"r1": 3})
    await snapshot.advance({"r1": 2})
    assert await snapshot.version("r1") == 3
    await snapshot.advance({"r1": 3})
    assert await snapshot.version("r1") == 3
    await snapshot.advance({"r1": 4})
    assert await snapshot.version("r1") == 4


async def test_reset_overwrites_even_downward(snapshot):
    await snapshot.advance({"r1": 5})
    await snapshot.reset("r1", 2)
    assert await snapshot.version("r1") == 2
    await snapshot.reset("r1", 9)
    assert await snapshot.version("r1") == 9
    await snapshot.reset("r-new", 1)
    assert await snapshot.version("r-new") == 1
    # The store holds no such reservation: the compensation writes its 0.
    await snapshot.reset("r-gone", 0)
    assert await snapshot.version("r-gone") == 0
    await snapshot.advance({"r-gone": 1})
    assert await snapshot.version("r-gone") == 1


async def test_forget_drops_the_entries_of_pruned_entities_and_leaves_the_others(snapshot):
    await snapshot.advance({f"r{i}": i + 1 for i in range(1200)})  # past one DEL's chunk on Redis
    await snapshot.forget([f"r{i}" for i in range(1, 1200)] + ["r-never-seen"])
    assert await snapshot.version("r0") == 1
    assert [await snapshot.version(f"r{i}") for i in (1, 600, 1199)] == [None, None, None]
    await snapshot.forget([])
    await snapshot.advance({"r1": 7})  # an id used again starts afresh
    assert await snapshot.version("r1") == 7


async def test_advance_of_many_entities_at_once(snapshot):
    await snapshot.advance({"r0": 4})
    await snapshot.advance({f"r{i}": i + 1 for i in range(20)})
    assert [await snapshot.version(f"r{i}") for i in range(20)] == [4, *range(2, 21)]


async def test_concurrent_advances_keep_the_highest_version(snapshot):
    writes = [{f"r{i % 7}": v, f"s{i % 3}": v} for i, v in enumerate([5, 1, 9, 3, 9, 2, 8, 7, 4, 6] * 3)]
    await asyncio.gather(*(snapshot.advance(w) for w in writes))
    expected: dict[str, int] = {}
    for write in writes:
        for entity, version in write.items():
            expected[entity] = max(version, expected.get(entity, 0))
    assert {entity: await snapshot.version(entity) for entity in expected} == expected


# -- URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, backend",
    [
        ("memory://", MemorySnapshot),
        ("redis://127.0.0.1:6379", RedisSnapshot),
        ("redis://127.0.0.1:6379/3", RedisSnapshot),
        ("redis+cluster://127.0.0.1:7000", RedisSnapshot),
    ],
)
def test_supported_urls_open_without_connecting(url, backend):
    assert isinstance(open_snapshot(url), backend)


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "unsupported snapshot URL"),
        ("memcached://127.0.0.1:11211", "unsupported snapshot URL"),
        ("redis://", "unsupported snapshot URL"),
        ("redis://:6379/0", "names no host"),
        ("redis://127.0.0.1:port/0", "bad snapshot URL"),
        ("redis://127.0.0.1:6379/db", "bad snapshot URL"),
        ("redis+cluster://127.0.0.1:7000/2", "only database 0"),
    ],
)
def test_unsupported_urls_are_refused_clearly(url, message):
    with pytest.raises(ValueError, match=message) as refused:
        open_snapshot(url)
    assert "redis+cluster://HOST:PORT" in str(refused.value) or "database 0" in str(refused.value)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://app:s3cret@127.0.0.1:6379/2", "redis://app@127.0.0.1:6379/2"),
        ("redis+cluster://app:s3cret@10.0.0.1:7000", "redis+cluster://app@10.0.0.1:7000"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_describe_shows_no_password(url, shown):
    assert open_snapshot(url).describe() == shown


# -- Redis only: the script, NOSCRIPT, slots ---------------------------------


async def test_script_reports_whether_this_call_applied(redis_snapshot):
    key = snapshot_key("r1")
    script = redis_snapshot.advance_script
    assert await script(keys=[key], args=[3]) == [1]
    assert await script(keys=[key], args=[3]) == [0]  # a retry of the same call: no change
    assert await script(keys=[key], args=[2]) == [0]
    assert await script(keys=[key], args=[4]) == [1]
    assert await redis_snapshot.version("r1") == 4


async def test_advance_survives_a_script_flush(redis_snapshot):
    await redis_snapshot.advance({"r1": 1})
    assert await redis_snapshot.client.script_flush()  # every master, in a cluster
    await redis_snapshot.advance({f"r{i}": 2 for i in range(10)})
    assert [await redis_snapshot.version(f"r{i}") for i in range(10)] == [2] * 10
    assert not redis_snapshot.degraded
    assert await redis_snapshot.client.script_flush()
    assert await redis_snapshot.advance_script(keys=[snapshot_key("r1")], args=[3]) == [1]


@pytest.mark.parametrize("entity", ["r1", "0f3a9c", "order/42:sku-7", "with{braces}"])
async def test_an_entity_lives_in_one_slot(redis_cluster_url, opened, entity):
    snapshot = await opened(redis_cluster_url)
    key = snapshot_key(entity)
    tag = key[key.index("{") + 1 : key.index("}")]
    assert key_slot(key.encode()) == key_slot(tag.encode())
    assert await snapshot.client.cluster_keyslot(key) == key_slot(key.encode())
    await snapshot.advance({entity: 7})
    assert await snapshot.version(entity) == 7


def _count_round_trips(snapshot: RedisSnapshot, monkeypatch) -> list[str]:
    """Every way the snapshot can send to Redis, logged by name as it is called."""
    sent: list[str] = []
    for name in ("pipeline", "evalsha", "mget", "mget_nonatomic", "get"):
        if not hasattr(snapshot.client, name):
            continue
        original = getattr(snapshot.client, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            sent.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(snapshot.client, name, counting)
    return sent


async def test_concurrent_advances_share_one_round_trip(redis_snapshot, monkeypatch):
    sent = _count_round_trips(redis_snapshot, monkeypatch)
    await asyncio.gather(*(redis_snapshot.advance({f"r{i}": i + 1}) for i in range(50)))
    # plain Redis: one EVALSHA over all 50 keys; Cluster: one pipeline of single-key calls
    assert sent == (["pipeline"] if redis_snapshot.client.__class__.__name__ == "RedisCluster" else ["evalsha"])
    assert [await redis_snapshot.version(f"r{i}") for i in range(50)] == list(range(1, 51))


async def test_concurrent_reads_share_one_round_trip(redis_snapshot, monkeypatch):
    await redis_snapshot.advance({f"r{i}": i + 1 for i in range(50)})
    sent = _count_round_trips(redis_snapshot, monkeypatch)
    found = await asyncio.gather(*(redis_snapshot.version(f"r{i}") for i in range(60)))
    assert found == [*range(1, 51), *[None] * 10]
    # plain Redis: one MGET; Cluster: mget_nonatomic, which is one pipeline of GETs
    cluster = redis_snapshot.client.__class__.__name__ == "RedisCluster"
    assert sent == (["mget_nonatomic", "pipeline"] if cluster else ["mget"])


async def test_open_catches_up_with_the_store(redis_url, opened):
    snapshot = await opened(redis_url, {"r1": 4, "r2": 1, "r3": 2, "r4": 9})
    await snapshot.advance({"r1": 2})
    assert [await snapshot.version(e) for e in ("r1", "r2", "r3", "r4")] == [4, 1, 2, 9]


# -- Redis only: degradation and recovery ------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
async def test_no_redis_degrades_without_failing_or_waiting(scheme, opened):
    before = sample("holdfast_snapshot_degradations_total")
    started = time.monotonic()
    snapshot = await opened(f"{scheme}://127.0.0.1:{free_port()}", {"r1": 1})
    assert await snapshot.version("r1") is None
    await snapshot.advance({"r1": 2})
    await snapshot.reset("r1", 2)
    assert time.monotonic() - started < 0.5
    assert snapshot.degraded
    assert sample("holdfast_snapshot_degraded") == 1
    assert sample("holdfast_snapshot_degradations_total") == before + 3


async def test_a_hung_redis_costs_one_socket_timeout(private_redis, opened):
    snapshot = await opened(private_redis.url)
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await snapshot.version("r1") is None  # waits out the socket timeout
        assert await snapshot.version("r1") is None  # then answers at once
        await snapshot.advance({"r1": 1})
        assert time.monotonic() - started < 0.9
        assert snapshot.degraded
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)


def test_a_closed_connection_on_uvloop_degrades_instead_of_failing(redis_url):
    """holdfast serves on uvloop, where a write to a connection Redis has just
    dropped raises RuntimeError, not ConnectionError: still an outage, never
    an error answered to the caller (a Redis SIGKILL mid-load showed it)."""
    import uvloop

    async def scenario() -> tuple[int | None, int | None, bool]:
        snapshot = open_snapshot(redis_url)
        await snapshot.open(pages_of({}))
        try:
            await snapshot.advance({"uv1": 3})
            for connection in snapshot.client.connection_pool._available_connections:
                connection._writer.transport.close()  # what a reset by the peer leaves
            await asyncio.sleep(0)
            during = await snapshot.version("uv1")
            degraded = snapshot.degraded
            await wait_trusted(snapshot)
            return during, await snapshot.version("uv1"), degraded
        finally:
            await snapshot.close()

    during, after, degraded = uvloop.run(scenario())
    # Either the snapshot saw the outage and degraded, or the client
    # reconnected before the read (redis-py does on a transport it finds
    # closing, in the versions this machine now resolves): never an error,
    # never a wrong version.
    assert (during, degraded) in ((None, True), (3, False))
    assert after == 3


class Outage:
    """One Redis to take down and bring back: a private server, or one master
    of a private cluster (it rejoins with its slots, keys lost)."""

    def __init__(self, server) -> None:
        self.server = server
        self.node = server.nodes[0] if hasattr(server, "nodes") else server
        self.url = server.url

    def kill(self) -> None:
        self.node.kill()

    def restart(self) -> None:
        self.node.restart()
        if hasattr(self.server, "wait_ok"):
            self.server.wait_ok()


@pytest.fixture(params=["redis", "cluster"])
def outage(request) -> Outage:
    return Outage(request.getfixturevalue({"redis": "private_redis", "cluster": "private_redis_cluster"}[request.param]))


async def test_rebuilds_from_the_store_when_redis_returns(outage, opened):
    store = {f"r{i}": 1 for i in range(1, 13)}
    snapshot = await opened(outage.url, store)
    rebuilds = sample("holdfast_snapshot_rebuilds_total")
    assert await snapshot.version("r2") == 1

    outage.kill()
    degradations = sample("holdfast_snapshot_degradations_total")
    # Moves commit in the store; their snapshot writes are lost, not raised.
    for i in range(1, 13):
        store[f"r{i}"] = 2
        await snapshot.advance({f"r{i}": 2})
    for entity, version in {"n1": 1, "n2": 5}.items():
        store[entity] = version
        await snapshot.advance({entity: version})
    assert snapshot.degraded
    assert sample("holdfast_snapshot_degraded") == 1
    # In a cluster, writes to the live masters land until one hits the dead one.
    assert sample("holdfast_snapshot_degradations_total") - degradations in range(1, 12 + 2 + 1)
    degradations = sample("holdfast_snapshot_degradations_total")
    await snapshot.reset("r2", 2)
    assert await snapshot.version("r1") is None
    assert sample("holdfast_snapshot_degradations_total") == degradations + 2

    outage.restart()
    await wait_trusted(snapshot)
    assert {entity: await snapshot.version(entity) for entity in store} == store
    assert sample("holdfast_snapshot_rebuilds_total") >= rebuilds + 1
    assert sample("holdfast_snapshot_degraded") == 0
    await snapshot.advance({"r1": 3})
    assert await snapshot.version("r1") == 3


async def test_writes_during_a_rebuild_are_not_rolled_back(private_redis, opened):
    """The rebuild replays store pages that may be older than a move committing
    meanwhile: forward-only writes keep the newer version either way."""
    store = {f"r{i}": 1 for i in range(40)}
    gate = asyncio.Event()

    async def slow_pages() -> AsyncIterator[dict[str, int]]:
        rows = sorted(store.items())
        for start in range(0, len(rows), 10):
            yield dict(rows[start : start + 10])
            await gate.wait()

    gate.set()
    snapshot = await opened(private_redis.url, pages=slow_pages)
    private_redis.kill()
    await snapshot.advance({"r0": 2})  # lost: Redis is down
    store["r0"] = 2
    gate.clear()
    private_redis.restart()
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    # Wait until the rebuild is under way (the first page written), then move.
    while await _raw_version(private_redis, "r0") != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    store["r35"] = 6
    await snapshot.advance({"r35": 6})
    assert await _raw_version(private_redis, "r35") == 6  # written, though not trusted yet
    assert snapshot.degraded
    assert await snapshot.version("r0") is None
    gate.set()
    await wait_trusted(snapshot)
    assert await snapshot.version("r35") == 6
    assert await snapshot.version("r0") == 2


async def _raw_version(server, entity: str) -> int | None:
    """The entry as Redis holds it, read behind the snapshot's back."""

    def get() -> bytes | None:
        with server.client(socket_timeout=1) as client:
            return client.get(snapshot_key(entity))

    raw = await asyncio.to_thread(get)
    return None if raw is None else int(raw)
