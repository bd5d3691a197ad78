"""Fixtures: a real holdfast server over real gRPC, started inside the test.

Backends come from HOLDFAST_TEST_STORE / HOLDFAST_TEST_SNAPSHOT when set;
the default is the embedded pair, SQLite in the test's temporary folder and
the in-process snapshot.
"""

from __future__ import annotations

import os
from typing import AsyncIterator, Callable

import grpc
import pytest

import service.generated  # noqa: F401
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from service.server import Config, Running, start

pytest_plugins = ["tests.backends"]


@pytest.fixture
def config(tmp_path) -> Config:
    return Config(
        listen="127.0.0.1:0",
        store=os.environ.get("HOLDFAST_TEST_STORE", f"sqlite:///{tmp_path}/holdfast.db"),
        snapshot=os.environ.get("HOLDFAST_TEST_SNAPSHOT", "memory://"),
        reaper_interval_ms=20,
    )


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
