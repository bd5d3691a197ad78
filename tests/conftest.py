"""Fixtures: a real holdfast server over real gRPC, started inside the test.

The server's backends are a `backend` pair. Suites named in ACROSS_BACKENDS
run unchanged against every pair, with real PostgreSQL and Redis started by
tests/backends.py; the rest run on the embedded pair (SQLite in the test's
temporary folder and the in-process snapshot).
"""

from __future__ import annotations

import os

# Fixtures start servers as another user (a fork from this process); gRPC's
# fork handlers can crash such a child while calls are in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from typing import AsyncIterator  # noqa: E402

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast.server import Config, Running, start
from tests.support import BUILT_IN_APPS

pytest_plugins = ["tests.backends"]

BACKENDS = ("embedded", "postgres+redis", "postgres+redis-cluster")
ACROSS_BACKENDS = frozenset({"test_api", "test_fulfillment"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.module.__name__.rpartition(".")[2] in ACROSS_BACKENDS:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """Each store-of-record backend in turn: a fresh SQLite file, or a fresh
    database on the test PostgreSQL (tests/backends.py)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "embedded")


@pytest.fixture
def config(tmp_path, backend: str, request: pytest.FixtureRequest) -> Config:
    if backend == "embedded":
        store, snapshot = f"sqlite:///{tmp_path}/holdfast.db", "memory://"
    else:
        store = request.getfixturevalue("postgres_url")
        snapshot = request.getfixturevalue("redis_cluster_url" if backend.endswith("cluster") else "redis_url")
    return Config(listen="127.0.0.1:0", store=store, snapshot=snapshot, reaper_interval_ms=20, apps=BUILT_IN_APPS)


@pytest.fixture
async def server(config: Config) -> AsyncIterator[Running]:
    running = await start(config)
    yield running
    await running.stop(0)


@pytest.fixture
async def channel(server: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.InventoryServiceStub:
    return pb_grpc.InventoryServiceStub(channel)
