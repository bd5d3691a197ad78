"""Fault injection files (service/faults.py): parsing and validation, seeded
decisions, and the interceptor in front of a real server over real gRPC.

The deadline and retry behaviour a client sees through injected faults is in
tests/test_client.py; these tests are about the file and the interceptor.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from holdfast import cli, faults
from holdfast.server import Config, Running, start
from tests.process import run_holdfast
from tests.support import BUILT_IN_APPS, failure_of

SERVICE = "holdfast.inventory.v1.InventoryService"
# The methods a fault may name on a server hosting inventory alone.
INVENTORY_METHODS = frozenset(f"/{SERVICE}/{method.name}" for method in pb.DESCRIPTOR.services_by_name["InventoryService"].methods)
RESERVE = f"{SERVICE}/Reserve"
GET_STOCK = f"{SERVICE}/GetStock"
CLIENT_TIMEOUT_S = 10.0  # well past every contract's timeout


def fault_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "faults.toml"
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, text: str) -> AsyncIterator[tuple[Running, pb_grpc.InventoryServiceStub]]:
    """An embedded server with `text` as its fault file, and a plain stub
    (no service config: every attempt here is one call)."""
    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", apps=BUILT_IN_APPS,
                    faults=str(fault_file(tmp_path, text)))
    running = await start(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.InventoryServiceStub(channel)
    finally:
        await running.stop(0)


# -- parsing ---------------------------------------------------------------------


def test_the_documented_example_parses_into_frozen_faults(tmp_path):
    path = fault_file(tmp_path, f'''
["{RESERVE}"]
delay_ms = 2500          # optional, slept before the call runs
status = "UNAVAILABLE"   # optional gRPC status code name answered instead of running the call
probability = 0.5        # optional, 0..1, default 1
seed = 7                 # optional, per method, makes the fault sequence deterministic

["{GET_STOCK}"]
status = "ABORTED"
''')
    plan = faults.load(path, INVENTORY_METHODS)
    assert plan.source == str(path)
    assert plan.faults == {
        f"/{RESERVE}": faults.Fault(f"/{RESERVE}", 2500, grpc.StatusCode.UNAVAILABLE, 0.5, 7),
        f"/{GET_STOCK}": faults.Fault(f"/{GET_STOCK}", 0, grpc.StatusCode.ABORTED, 1.0, None),
    }
    with pytest.raises(AttributeError):
        plan.faults[f"/{RESERVE}"].delay_ms = 1  # type: ignore[misc]


def test_an_empty_file_injects_nothing():
    assert faults.parse("", "empty.toml").faults == {}


# One row per way a file can be wrong: (table body, the key the error names, words it says).
INVALID = [
    ('delay_ms = -1', "delay_ms", "0 or more"),
    ('delay_ms = 1.5', "delay_ms", "integer"),
    ('delay_ms = true', "delay_ms", "integer"),
    ('status = "UNAVALABLE"', "status", "unknown gRPC status code 'UNAVALABLE'"),
    ('status = "OK"', "status", "OK is not a fault"),
    ('status = 14', "status", "status code name"),
    ('status = "UNAVAILABLE"\nprobability = 1.5', "probability", "from 0 to 1, got 1.5"),
    ('status = "UNAVAILABLE"\nprobability = -0.1', "probability", "from 0 to 1"),
    ('status = "UNAVAILABLE"\nprobability = nan', "probability", "from 0 to 1"),
    ('status = "UNAVAILABLE"\nprobability = "half"', "probability", "number"),
    ('status = "UNAVAILABLE"\nseed = "seven"', "seed", "integer"),
    ('status = "UNAVAILABLE"\ndelay = 100', "delay", "unknown key"),
    ('probability = 0.5', "", "injects nothing"),
]


@pytest.mark.parametrize(("body", "key", "words"), INVALID, ids=[row[0].replace("\n", " ") for row in INVALID])
def test_an_invalid_table_is_a_value_error_naming_the_file_and_key(tmp_path, body, key, words):
    path = fault_file(tmp_path, f'["{RESERVE}"]\n{body}\n')
    with pytest.raises(ValueError) as raised:
        faults.load(path, INVENTORY_METHODS)
    message = str(raised.value)
    assert message.startswith(f'{path}: ["{RESERVE}"]{"." + key if key else ""}:'), message
    assert words in message


@pytest.mark.parametrize(
    "name",
    [f"{SERVICE}/Reserv", f"/{RESERVE}", "holdfast.inventory.v1.Other/Reserve", "Reserve"],
)
def test_an_unknown_method_is_named_with_the_known_ones(tmp_path, name):
    path = fault_file(tmp_path, f'["{name}"]\nstatus = "UNAVAILABLE"\n')
    with pytest.raises(ValueError, match="unknown method") as raised:
        faults.load(path, INVENTORY_METHODS)
    assert str(raised.value).startswith(f'{path}: ["{name}"]: ')
    assert RESERVE in str(raised.value)  # the known methods are listed


def test_a_value_that_is_not_a_table_or_not_toml_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^x\.toml: \[\"delay_ms\"\]: expected a table"):
        faults.parse("delay_ms = 5\n", "x.toml")
    with pytest.raises(ValueError, match=r"^x\.toml: not valid TOML"):
        faults.parse("[unterminated\n", "x.toml")


def test_a_missing_file_is_an_os_error_naming_it(tmp_path):
    with pytest.raises(OSError, match="cannot read fault file .*nope.toml"):
        faults.load(tmp_path / "nope.toml")


def test_methods_can_be_given_for_another_service():
    plan = faults.parse('["pkg.Other/Call"]\ndelay_ms = 1\n', "x.toml", methods={"/pkg.Other/Call"})
    assert set(plan.faults) == {"/pkg.Other/Call"}


# -- seeded decisions -------------------------------------------------------------


def decisions(seed: int | None, probability: float, count: int = 200) -> list[bool]:
    decider = faults.Decider(faults.Fault(f"/{RESERVE}", status=grpc.StatusCode.UNAVAILABLE, probability=probability, seed=seed))
    return [decider.draw() for _ in range(count)]


def test_the_same_seed_gives_the_same_sequence_of_faults():
    first = decisions(7, 0.5)
    assert first == decisions(7, 0.5)
    assert first != decisions(8, 0.5)
    assert 40 < sum(first) < 160  # a coin, not a constant (binomial(200, 0.5) is far inside this)


def test_probability_one_always_and_zero_never_injects():
    assert all(decisions(None, 1.0)) and not any(decisions(None, 0.0))


async def test_a_seeded_fault_file_injects_the_same_calls_on_every_run(tmp_path):
    text = f'["{GET_STOCK}"]\nstatus = "UNAVAILABLE"\nprobability = 0.5\nseed = 11\n'
    runs = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        async with serving(folder, text) as (_, stub):
            seen = []
            for _ in range(30):
                try:
                    await stub.GetStock(pb.GetStockRequest(sku_id="nope"), timeout=CLIENT_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    seen.append(error.code().name)
            runs.append(seen)
    assert runs[0] == runs[1]
    expected = ["UNAVAILABLE" if hit else "NOT_FOUND" for hit in decisions(11, 0.5, 30)]
    assert runs[0] == expected


# -- the interceptor over real gRPC -----------------------------------------------


async def test_an_injected_unavailable_carries_the_real_error_details(tmp_path):
    async with serving(tmp_path, f'["{RESERVE}"]\nstatus = "UNAVAILABLE"\n') as (_, stub):
        request = pb.ReserveRequest(order_id="o", sku_id="s", quantity=1, timestamp_ms=1)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Reserve(request, timeout=CLIENT_TIMEOUT_S)
        failure = failure_of(raised.value)
        assert failure.code == grpc.StatusCode.UNAVAILABLE
        assert (failure.reason, failure.domain) == ("DEPENDENCY_UNAVAILABLE", "holdfast")
        assert "fault injected" in failure.message
        # Other methods are untouched: the gateway and engine answer them.
        reply = await stub.PutStock(pb.PutStockRequest(sku_id="s", total=3, request_id="r"), timeout=CLIENT_TIMEOUT_S)
        assert reply.available == 3


async def test_a_status_with_no_matching_reason_is_sent_plainly(tmp_path):
    async with serving(tmp_path, f'["{GET_STOCK}"]\nstatus = "RESOURCE_EXHAUSTED"\n') as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetStock(pb.GetStockRequest(sku_id="s"), timeout=CLIENT_TIMEOUT_S)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fault injected" in raised.value.details()
        assert "grpc-status-details-bin" not in dict(raised.value.trailing_metadata() or ())


async def test_a_delay_only_fault_slows_the_call_and_then_runs_it(tmp_path):
    async with serving(tmp_path, f'["{GET_STOCK}"]\ndelay_ms = 300\n') as (_, stub):
        await stub.PutStock(pb.PutStockRequest(sku_id="s", total=2, request_id="r"), timeout=CLIENT_TIMEOUT_S)
        started = time.monotonic()
        reply = await stub.GetStock(pb.GetStockRequest(sku_id="s"), timeout=CLIENT_TIMEOUT_S)
        assert time.monotonic() - started >= 0.3 * 0.9  # at least the delay (clock slack only)
        assert reply.total == 2


async def test_a_delay_spends_the_clients_deadline_before_the_gateway(tmp_path):
    """Outermost: the delay runs on the client's clock, as a slow network
    would, so a deadline shorter than the delay ends the call before any
    servicer (or the gateway's own budget) is reached."""
    async with serving(tmp_path, f'["{GET_STOCK}"]\ndelay_ms = 5000\n') as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetStock(pb.GetStockRequest(sku_id="s"), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# -- start-up and the command line --------------------------------------------------


async def test_a_bad_fault_file_stops_the_start_before_any_backend_opens(tmp_path):
    config = Config(
        listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path}/holdfast.db",
        apps=BUILT_IN_APPS,
        faults=str(fault_file(tmp_path, f'["{RESERVE}"]\nstatus = "NOPE"\n')),
    )
    with pytest.raises(ValueError, match="unknown gRPC status code 'NOPE'"):
        await start(config)
    assert not (tmp_path / "holdfast.db").exists()


def test_serve_with_a_bad_fault_file_exits_2_naming_it(tmp_path):
    path = fault_file(tmp_path, f'["{RESERVE}"]\nprobability = 2\nstatus = "ABORTED"\n')
    done = run_holdfast("serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/h.db", "--faults", str(path))
    assert done.returncode == 2
    assert f'{path}: ["{RESERVE}"].probability: must be from 0 to 1, got 2' in done.stderr


def test_serve_reads_the_fault_file_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("HOLDFAST_FAULTS", raising=False)
    assert cli._parser().parse_args(["serve"]).faults == ""
    assert cli._parser().parse_args(["serve", "--faults", "f.toml"]).faults == "f.toml"
    monkeypatch.setenv("HOLDFAST_FAULTS", "env.toml")
    assert cli._parser().parse_args(["serve"]).faults == "env.toml"


# -- the hosted methods, whatever the app -----------------------------------------------

DISPATCH_GET = "holdfast.fulfillment.v1.DispatchService/GetWaybill"
TABLES = Path(__file__).resolve().parents[1] / "examples" / "tables"


async def test_a_fault_on_a_method_not_hosted_stops_the_start_naming_the_hosted_ones(tmp_path):
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", apps=("holdfast.apps.inventory:Inventory",),
        faults=str(fault_file(tmp_path, f'["{DISPATCH_GET}"]\nstatus = "ABORTED"\n')),
    )
    with pytest.raises(ValueError, match=f"unknown method '{DISPATCH_GET}'") as raised:
        await start(config)
    assert RESERVE in str(raised.value)


def test_serve_checks_a_fault_file_against_the_services_it_hosts(tmp_path):
    path = fault_file(tmp_path, f'["{DISPATCH_GET}"]\nstatus = "ABORTED"\n')
    store = f"sqlite:///{tmp_path}/h.db"
    done = run_holdfast("serve", "--listen", "127.0.0.1:0", "--store", store, "--services", "inventory", "--faults", str(path))
    assert done.returncode == 2
    assert f"holdfast: {path}: [\"{DISPATCH_GET}\"]: unknown method '{DISPATCH_GET}' (known: {SERVICE}/" in done.stderr
    assert not (tmp_path / "h.db").exists()


async def test_fulfillments_methods_take_faults_when_it_is_hosted(tmp_path):
    from holdfast.fulfillment.v1 import fulfillment_pb2 as fpb
    from holdfast.fulfillment.v1 import fulfillment_pb2_grpc as fpb_grpc

    async with serving(tmp_path, f'["{DISPATCH_GET}"]\nstatus = "UNAVAILABLE"\n') as (running, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await fpb_grpc.DispatchServiceStub(channel).GetWaybill(
                    fpb.GetWaybillRequest(waybill_id="wb_1"), timeout=CLIENT_TIMEOUT_S
                )
    assert failure_of(raised.value).reason == "DEPENDENCY_UNAVAILABLE"


async def test_a_teams_methods_take_faults_when_its_app_is_hosted(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TABLES))
    get_booking = "restaurant.tables.v1.TableService/GetBooking"
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", apps=("tables:Tables",),
        faults=str(fault_file(tmp_path, f'["{get_booking}"]\nstatus = "UNAVAILABLE"\n')),
    )
    from holdfast.server import check

    check(config)  # the app is a Service class: its methods are known before anything opens
    running = await start(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            call = channel.unary_unary(f"/{get_booking}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"\n\x04bk_1", timeout=CLIENT_TIMEOUT_S)
    finally:
        await running.stop(0)
    assert failure_of(raised.value).reason == "DEPENDENCY_UNAVAILABLE"
