"""The `holdfast` pytest plugin, used exactly as README.md shows it.

The first test below is the README's example, character for character;
`test_the_readme_example_is_this_file` keeps the two from drifting apart.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc


@pytest.fixture
def holdfast_apps():
    return ["holdfast.apps.inventory:Inventory"]  # what holdfast_server hosts


@pytest.fixture
def holdfast_stub():
    return pb_grpc.InventoryServiceStub  # what holdfast_client is


@pytest.mark.asyncio
async def test_an_expired_hold_replays(holdfast_server, holdfast_client, replay_journal):
    await holdfast_client.PutStock(pb.PutStockRequest(sku_id="sku-1", total=5, request_id="restock-1"))
    hold = await holdfast_client.Reserve(
        pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=2, timestamp_ms=1, hold_ms=1_000)
    )
    assert hold.state == pb.RESERVATION_STATE_RESERVED

    holdfast_server.clock.advance(1_000)  # business time moves only when the test says so
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await holdfast_client.Confirm(pb.ConfirmRequest(reservation_id=hold.reservation_id))
    assert expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # HOLD_EXPIRED

    replay_journal(holdfast_server.journal)  # every answer again, byte for byte, on a fresh instance


# -- the plugin itself --------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_example() -> str:
    section = README.read_text().split("## Testing your service", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_is_this_file() -> None:
    example = _readme_example()
    assert example.strip(), "README.md lost its plugin example"
    assert example in Path(__file__).read_text()


def test_the_plugin_is_registered_by_its_entry_point(pytestconfig: pytest.Config) -> None:
    import holdfast.pytest_plugin

    assert pytestconfig.pluginmanager.get_plugin("holdfast") is holdfast.pytest_plugin


async def test_the_server_fixture_names_where_it_listens(holdfast_server, holdfast_client) -> None:
    assert holdfast_server.target == f"127.0.0.1:{holdfast_server.port}"
    reply = await holdfast_client.PutStock(pb.PutStockRequest(sku_id="sku-2", total=3, request_id="r"))
    assert reply.available == 3
    kinds = [json.loads(line)["kind"] for line in holdfast_server.journal.read_text().splitlines()]
    assert kinds == ["start", "call"]


async def test_replay_journal_fails_the_test_with_the_first_difference(
    holdfast_server, holdfast_client, replay_journal, tmp_path: Path
) -> None:
    await holdfast_client.PutStock(pb.PutStockRequest(sku_id="sku-3", total=4, request_id="r"))
    await holdfast_client.GetStock(pb.GetStockRequest(sku_id="sku-3"))
    lines = holdfast_server.journal.read_text().splitlines()
    entry = json.loads(lines[2])
    reply = bytearray(base64.b64decode(entry["reply"]))
    reply[0] ^= 0x01
    entry["reply"] = base64.b64encode(bytes(reply)).decode()
    altered = tmp_path / "altered.jsonl"
    altered.write_text("\n".join([*lines[:2], json.dumps(entry)]) + "\n")

    assert replay_journal(holdfast_server.journal).identical
    with pytest.raises(pytest.fail.Exception, match=r"line 3: GetStock: reply differs"):
        replay_journal(altered)


# -- what is hosted: holdfast_apps, holdfast_services; holdfast_channel ---------------------


TABLES = Path(__file__).resolve().parents[1] / "examples" / "tables"


@pytest.fixture
def tables_project(monkeypatch):
    """The tables example's folder importable, as it is for a team that runs
    pytest in its own project's folder."""
    monkeypatch.syspath_prepend(str(TABLES))


def tables_service(engine):
    from tables import Tables

    return Tables(engine)


async def test_the_server_hosts_the_apps_the_test_names(holdfast_apps, holdfast_services, holdfast_server) -> None:
    """This module's `holdfast_apps` (the README's): inventory alone, which
    the journal's start line names, so a replay hosts it again."""
    assert tuple(holdfast_services) == ()
    assert set(holdfast_server.running.services) == {"holdfast.inventory.v1.InventoryService"}
    start = json.loads(holdfast_server.journal.read_text().splitlines()[0])
    assert start["apps"] == list(holdfast_apps) == ["holdfast.apps.inventory:Inventory"]


async def test_the_channel_fixture_is_a_channel_to_the_server(holdfast_server, holdfast_channel) -> None:
    from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

    assert isinstance(holdfast_channel, grpc.aio.Channel)
    stub = pb_grpc.InventoryServiceStub(holdfast_channel)
    reply = await stub.PutStock(pb.PutStockRequest(sku_id="sku-4", total=2, request_id="r"))
    assert (reply.sku_id, reply.available, reply.version) == ("sku-4", 2, 1)


@pytest.mark.parametrize(("holdfast_apps", "holdfast_services"), [((), [tables_service])])
async def test_overridden_services_are_hosted_alone(
    tables_project, holdfast_server, holdfast_channel, holdfast_client
) -> None:
    """A test (or a conftest.py) that overrides holdfast_services and names
    no app gets a server with those services alone."""
    from restaurant.tables.v1 import tables_pb2, tables_pb2_grpc

    assert list(holdfast_server.running.services) == ["restaurant.tables.v1.TableService"]
    tables = tables_pb2_grpc.TableServiceStub(holdfast_channel)
    booked = await tables.Book(tables_pb2.BookRequest(
        table_id="table-1", slot_start_ms=holdfast_server.clock.now_ms() + 60_000, party_size=2, guest="Ada",
    ))
    assert (booked.state, booked.version) == (tables_pb2.BOOKING_STATE_BOOKED, 1)
    with pytest.raises(grpc.aio.AioRpcError) as unserved:
        await holdfast_client.GetStock(pb.GetStockRequest(sku_id="sku-1"))
    assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_plugin_names_no_app_so_a_test_says_what_to_host_and_which_stub(tmp_path: Path) -> None:
    """Without `holdfast_apps` or `holdfast_services` the server fixture says
    what to override, and so does the client fixture without `holdfast_stub`."""
    (tmp_path / "test_unnamed.py").write_text(
        "import pytest\n\n\n"
        "@pytest.mark.asyncio\n"
        "async def test_nothing_is_named(holdfast_server):\n    pass\n\n\n"
        "@pytest.mark.asyncio\n"
        "@pytest.mark.parametrize('holdfast_apps', [['holdfast.apps.inventory:Inventory']])\n"
        "async def test_no_stub_is_named(holdfast_client):\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_unnamed.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert "2 errors" in done.stdout, done.stdout + done.stderr
    assert "holdfast_server hosts nothing: override holdfast_apps" in done.stdout, done.stdout
    assert "holdfast_client needs a stub class: override holdfast_stub" in done.stdout, done.stdout
