"""What an operator relies on: health, reflection, clear refusal of bad config."""

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from holdfast.server import Config, start
from holdfast.store import StoreUnavailable
from tests.support import BUILT_IN_APPS


async def test_health_reports_serving_for_the_inventory_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "holdfast.inventory.v1.InventoryService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_inventory_service(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in reflection.ServerReflectionInfo(requests()):
        names = {s.name for s in reply.list_services_response.service}
        assert "holdfast.inventory.v1.InventoryService" in names
        break


async def test_unusable_store_path_fails_start_up_with_its_reason(tmp_path):
    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/missing/dir/h.db", apps=BUILT_IN_APPS)
    with pytest.raises(StoreUnavailable, match="unable to open database file"):
        await start(config)


async def test_port_in_use_fails_start_up_and_releases_the_store(server, tmp_path):
    taken = Config(listen=f"127.0.0.1:{server.port}", store=f"sqlite:///{tmp_path}/other.db", apps=BUILT_IN_APPS)
    with pytest.raises(OSError, match="cannot listen"):
        await start(taken)


async def test_the_server_hosts_no_app_unless_told(tmp_path):
    """The server layer names no app: Config hosts nothing by default, and a
    start with nothing to host is refused before any backend opens."""
    assert Config().apps == ()
    with pytest.raises(ValueError, match="no service to host"):
        await start(Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/h.db"))
    assert not (tmp_path / "h.db").exists()
