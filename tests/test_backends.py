"""The real backends of tests/backends.py answer, and the private ones can be
killed and brought back on the same port."""

from __future__ import annotations

import psycopg
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.backends import PostgresServer, RedisServer, cluster_to_redis_url


def test_postgres_url_is_a_fresh_database(postgres_url: str) -> None:
    assert "/holdfast_test_" in postgres_url
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("create table t (x int)")


def test_redis_url_answers(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping() is True
        assert client.dbsize() == 0
        client.set("holdfast:answer", "42")
        assert client.get("holdfast:answer") == b"42"


async def test_redis_cluster_spreads_keys_over_three_masters(redis_cluster_url: str) -> None:
    assert redis_cluster_url.startswith("redis+cluster://")
    cluster = RedisCluster.from_url(cluster_to_redis_url(redis_cluster_url))
    try:
        await cluster.initialize()
        masters = {node.name for node in cluster.get_primaries()}
        assert len(masters) == 3
        # One key per master: walk key names until every master owns one.
        by_node: dict[str, str] = {}
        for i in range(1000):
            key = f"holdfast:{i}"
            by_node.setdefault(cluster.get_node_from_key(key).name, key)
            if len(by_node) == 3:
                break
        assert set(by_node) == masters
        keys = list(by_node.values())
        assert len({cluster.keyslot(key) for key in keys}) == 3
        for key in keys:
            assert await cluster.set(key, f"value of {key}")
        for node, key in by_node.items():
            assert await cluster.get(key) == f"value of {key}".encode()
            # ...and the key really lives on that master.
            host, port = node.rsplit(":", 1)
            with redis.Redis(host=host, port=int(port)) as direct:
                assert direct.get(key) == f"value of {key}".encode()
    finally:
        await cluster.aclose()


def test_private_redis_kill_and_restart_on_the_same_port(private_redis: RedisServer) -> None:
    port = private_redis.port
    with private_redis.client() as client:
        client.set("k", "v")
        assert client.get("k") == b"v"
    private_redis.kill()
    assert not private_redis.running()
    with private_redis.client(socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as client, \
            pytest.raises(redis.ConnectionError):
        client.ping()
    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.url == f"redis://127.0.0.1:{port}/0"
    with private_redis.client() as client:
        assert client.ping() is True
        assert client.dbsize() == 0  # nothing is persisted


def test_private_postgres_stop_start_and_crash(private_postgres: PostgresServer) -> None:
    url = private_postgres.create_database("faults")
    port = private_postgres.port
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table t (x int)")
        conn.execute("insert into t values (1)")

    private_postgres.stop()
    assert not private_postgres.running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)

    private_postgres.start()
    assert private_postgres.port == port
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("select x from t").fetchall() == [(1,)]
        conn.execute("insert into t values (2)")

    private_postgres.kill()  # a crash: committed rows survive recovery
    assert not private_postgres.running()
    private_postgres.start()
    with psycopg.connect(url) as conn:
        assert conn.execute("select x from t order by x").fetchall() == [(1,), (2,)]
