"""Client channels carry the contracts (service/client.py): the generated
service config gives a call with no deadline the contract's deadline, and a
retryable status its retries, against a real server whose fault file slows
or fails the method; a team's own generated config (examples/tables) does
the same through `holdfast.channel`, against a bare gRPC server.

Every attempt is counted where it lands, on the server, by the fault
interceptor's holdfast_faults_injected_total. Times are asserted loosely
(0.5x to 3x of the contract's timeout): nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import prometheus_client
import pytest

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

import holdfast
from holdfast.contracts import codegen, contract, service_config
from holdfast import client
from holdfast.apps.fulfillment import SERVICE as DISPATCH_SERVICE
from holdfast.apps.inventory import SERVICE
from holdfast.server import Config, Running, start
from tests.process import ROOT
from tests.support import BUILT_IN_APPS, failure_of

# Every service the generated code holds, in the order codegen writes them (by proto file).
SERVICES = (DISPATCH_SERVICE, SERVICE)
CONTRACTS = {path: found for service in SERVICES for path, found in contract.of_service(service).items()}
RESERVE = CONTRACTS[f"/{SERVICE.full_name}/Reserve"]
GET_STOCK = CONTRACTS[f"/{SERVICE.full_name}/GetStock"]
OUTER_TIMEOUT_S = 60.0  # a guard on the test itself, never on the service


def injected(method: str) -> float:
    """The server's count of fault-hit calls (every attempt, with probability 1)."""
    value = prometheus_client.REGISTRY.get_sample_value("holdfast_faults_injected_total", {"method": method})
    return value or 0.0


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, faults: str) -> AsyncIterator[Running]:
    path = tmp_path / "faults.toml"
    path.write_text(faults)
    running = await start(Config(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/holdfast.db", faults=str(path),
                                 apps=BUILT_IN_APPS))
    try:
        yield running
    finally:
        await running.stop(0)


def reserve_request() -> pb.ReserveRequest:
    return pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=1, timestamp_ms=1_700_000_000_000)


# -- deadlines ------------------------------------------------------------------


async def test_a_call_with_no_deadline_gets_the_contracts_deadline(tmp_path):
    # Delayed far past the contract (and past 3x it), so only the client's
    # deadline from the service config can end the call in the window below.
    delay_ms = RESERVE.timeout_ms * 5
    faults = f'["{RESERVE.method.lstrip("/")}"]\ndelay_ms = {delay_ms}\n'
    async with serving(tmp_path, faults) as running:
        async with client.aio_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.InventoryServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _guarded(stub.Reserve(reserve_request()))  # no timeout= on purpose
            elapsed = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 * RESERVE.timeout_s <= elapsed <= 3 * RESERVE.timeout_s, f"{elapsed:.2f} s for a {RESERVE.timeout_ms} ms contract"


async def test_a_shorter_deadline_of_the_caller_still_wins(tmp_path):
    faults = f'["{RESERVE.method.lstrip("/")}"]\ndelay_ms = {RESERVE.timeout_ms * 5}\n'
    async with serving(tmp_path, faults) as running:
        async with client.aio_channel(f"127.0.0.1:{running.port}") as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pb_grpc.InventoryServiceStub(channel).Reserve(reserve_request(), timeout=RESERVE.timeout_s / 10)
            elapsed = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.5 * RESERVE.timeout_s


# -- retries --------------------------------------------------------------------


async def test_a_retryable_fault_is_tried_exactly_max_attempts_times(tmp_path):
    assert RESERVE.retry.max_attempts == 3 and "UNAVAILABLE" in RESERVE.retry.retryable_codes
    faults = f'["{RESERVE.method.lstrip("/")}"]\nstatus = "UNAVAILABLE"\nprobability = 1\n'
    async with serving(tmp_path, faults) as running:
        before = injected(RESERVE.method)
        async with client.aio_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _guarded(pb_grpc.InventoryServiceStub(channel).Reserve(reserve_request()))
        attempts = injected(RESERVE.method) - before
    assert attempts == RESERVE.retry.max_attempts
    # The last attempt's answer reaches the caller, details and all.
    failure = failure_of(raised.value)
    assert (failure.code, failure.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")


async def test_a_plain_channel_tries_once(tmp_path):
    """The retries above come from the service config, not from gRPC defaults."""
    faults = f'["{RESERVE.method.lstrip("/")}"]\nstatus = "UNAVAILABLE"\n'
    async with serving(tmp_path, faults) as running:
        before = injected(RESERVE.method)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.InventoryServiceStub(channel).Reserve(reserve_request(), timeout=OUTER_TIMEOUT_S)
        assert injected(RESERVE.method) - before == 1


async def test_a_status_outside_the_retryable_codes_is_not_retried(tmp_path):
    assert "FAILED_PRECONDITION" not in RESERVE.retry.retryable_codes
    faults = f'["{RESERVE.method.lstrip("/")}"]\nstatus = "FAILED_PRECONDITION"\n'
    async with serving(tmp_path, faults) as running:
        before = injected(RESERVE.method)
        async with client.aio_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _guarded(pb_grpc.InventoryServiceStub(channel).Reserve(reserve_request()))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert injected(RESERVE.method) - before == 1


async def test_the_blocking_channel_applies_the_contracts_too(tmp_path):
    faults = f'["{GET_STOCK.method.lstrip("/")}"]\nstatus = "UNAVAILABLE"\n'
    async with serving(tmp_path, faults) as running:
        before = injected(GET_STOCK.method)

        # On a thread: a blocking call would stall this loop, and the server with it.
        def call() -> grpc.StatusCode:
            with client.channel(f"127.0.0.1:{running.port}") as channel:
                try:
                    pb_grpc.InventoryServiceStub(channel).GetStock(pb.GetStockRequest(sku_id="s"))
                except grpc.RpcError as error:
                    return error.code()
            raise AssertionError("an injected UNAVAILABLE was answered OK")

        code = await asyncio.wait_for(asyncio.to_thread(call), OUTER_TIMEOUT_S)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert injected(GET_STOCK.method) - before == GET_STOCK.retry.max_attempts


async def _guarded(call):
    """A bound on the test, far past anything the contracts allow."""
    return await asyncio.wait_for(call, OUTER_TIMEOUT_S)


# -- a team's service config ------------------------------------------------------

# What `holdfast codegen` wrote for the tutorial's TableService (a team's protos).
TABLES_CONFIG = ROOT / "examples" / "tables" / "service_config.json"
TABLES_SERVICE = "restaurant.tables.v1.TableService"
BOOK = f"/{TABLES_SERVICE}/Book"


def tables_entry(method: str) -> dict:
    """The service config's entry of one TableService method, as written."""
    for entry in json.loads(TABLES_CONFIG.read_text())["methodConfig"]:
        if entry["name"] == [{"service": TABLES_SERVICE, "method": method}]:
            return entry
    raise AssertionError(f"{TABLES_CONFIG} has no entry for {method}")


BOOK_TIMEOUT_S = float(tables_entry("Book")["timeout"].removesuffix("s"))
BOOK_RETRY = tables_entry("Book")["retryPolicy"]


@contextlib.asynccontextmanager
async def bare_server(service: str, handlers: dict) -> AsyncIterator[str]:
    """A plain grpc.aio server (no holdfast, no stubs: bytes in, bytes out)
    answering `service`'s methods with `handlers`; yields its target."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(behaviour) for method, behaviour in handlers.items()},
    ),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_a_teams_config_ends_a_slow_call_at_its_contract_deadline_not_early():
    """grpcio fires a service config's own `timeout` a second or two early;
    through holdfast.channel the call lasts the whole contract's timeout."""
    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(BOOK_TIMEOUT_S * 10)
        return b""

    async with bare_server(TABLES_SERVICE, {"Book": slow}) as target:
        async with holdfast.aio_channel(target, service_config=TABLES_CONFIG) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _guarded(channel.unary_unary(BOOK)(b""))  # no timeout= on purpose
            elapsed = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert BOOK_TIMEOUT_S - 0.2 <= elapsed <= 3 * BOOK_TIMEOUT_S, f"{elapsed:.2f} s for a {BOOK_TIMEOUT_S} s contract"


# One row per outcome: what the handler answers each attempt, then how many
# attempts the server sees and what the caller gets.
RETRIES = [
    pytest.param(["UNAVAILABLE"] * 5, BOOK_RETRY["maxAttempts"], "UNAVAILABLE", id="retryable-every-time"),
    pytest.param(["ABORTED", "ABORTED", "OK"], 3, "OK", id="retryable-then-answered"),
    pytest.param(["FAILED_PRECONDITION", "OK"], 1, "FAILED_PRECONDITION", id="not-retryable"),
]


@pytest.mark.parametrize(("answers", "attempts", "code"), RETRIES)
async def test_a_teams_retry_policy_retries_its_retryable_codes_only(answers, attempts, code):
    assert BOOK_RETRY["maxAttempts"] == 3 and {"UNAVAILABLE", "ABORTED"} <= set(BOOK_RETRY["retryableStatusCodes"])
    assert "FAILED_PRECONDITION" not in BOOK_RETRY["retryableStatusCodes"]
    seen: list[str] = []

    async def flaky(request: bytes, context) -> bytes:
        answer = answers[len(seen)]
        seen.append(answer)
        if answer != "OK":
            await context.abort(grpc.StatusCode[answer], f"attempt {len(seen)}")
        return b"booked"

    async with bare_server(TABLES_SERVICE, {"Book": flaky}) as target:
        async with holdfast.aio_channel(target, service_config=str(TABLES_CONFIG)) as channel:
            try:
                reply, got = await _guarded(channel.unary_unary(BOOK)(b"")), "OK"
            except grpc.aio.AioRpcError as error:
                reply, got = None, error.code().name
    assert (len(seen), got) == (attempts, code)
    assert reply == (b"booked" if code == "OK" else None)


async def test_a_service_wide_or_default_name_sets_the_deadline_of_every_method_it_covers():
    """gRPC's own matching: the method's entry, else its service's, else the
    default (a name with no service). Read server side, where the deadline lands."""
    config = json.dumps({"methodConfig": [
        {"name": [{"service": "pkg.Narrow", "method": "Exact"}], "timeout": "0.400000000s"},
        {"name": [{"service": "pkg.Narrow"}], "timeout": "1.200000000s"},
        {"name": [{}], "timeout": "3.000000000s"},
    ]})

    async def remaining(request: bytes, context) -> bytes:
        return str(context.time_remaining()).encode()

    async with bare_server("pkg.Narrow", {"Exact": remaining, "Other": remaining}) as narrow, \
            bare_server("pkg.Wide", {"Any": remaining}) as wide:

        # The blocking channel, on a thread: a blocking call would stall the servers' loop.
        def left(target: str, method: str) -> float:
            with holdfast.channel(target, service_config=config) as channel:
                return float(channel.unary_unary(method)(b""))

        found = {method: await asyncio.wait_for(asyncio.to_thread(left, target, method), OUTER_TIMEOUT_S)
                 for target, method in ((narrow, "/pkg.Narrow/Exact"), (narrow, "/pkg.Narrow/Other"), (wide, "/pkg.Wide/Any"))}
    # Loose: the wire rounds a deadline up, and the call took some of it.
    assert 0 < found["/pkg.Narrow/Exact"] <= 0.5
    assert 0.5 < found["/pkg.Narrow/Other"] <= 1.3
    assert 1.3 < found["/pkg.Wide/Any"] <= 3.1


def test_a_teams_config_reads_the_same_from_its_path_its_text_or_a_relative_path(monkeypatch):
    monkeypatch.chdir(TABLES_CONFIG.parent)
    expected = {f"/{TABLES_SERVICE}/{m}": float(tables_entry(m)["timeout"].removesuffix("s"))
                for m in ("Book", "Seat", "Cancel", "GetBooking")}
    for given in (TABLES_CONFIG, str(TABLES_CONFIG), TABLES_CONFIG.read_text(), "service_config.json"):
        assert client.deadlines(given) == expected
        assert client.service_config(given) == TABLES_CONFIG.read_text()


def test_several_configs_merge_into_one_channels_deadlines_and_retries():
    both = [client.SERVICE_CONFIG, TABLES_CONFIG]
    assert client.deadlines(both) == {**client.deadlines(), **client.deadlines(TABLES_CONFIG)}
    retries = json.loads(dict(client.options(service_config=both))["grpc.service_config"])["methodConfig"]
    assert [e["name"] for e in retries] == [
        e["name"] for path in both for e in json.loads(path.read_text())["methodConfig"]
    ]
    assert all("timeout" not in e and "retryPolicy" in e for e in retries)


def test_a_method_in_two_merged_configs_is_refused_naming_it():
    with pytest.raises(ValueError, match=f"{BOOK} is configured in {TABLES_CONFIG} already"):
        client.deadlines([TABLES_CONFIG, TABLES_CONFIG.read_text()])


@pytest.mark.parametrize(("text", "error", "words"), [
    (None, OSError, "cannot read it"),
    ("{not json", ValueError, "not a JSON service config"),
    ('{"methodConfig": {}}', ValueError, "a `methodConfig` list"),
    ('{"methodConfig": [{"name": [{"service": "s"}], "timeout": "500ms"}]}', ValueError, "'500ms'"),
], ids=["missing", "not-json", "no-method-list", "bad-timeout"])
def test_a_config_that_cannot_be_read_fails_the_channel_saying_why(tmp_path, text, error, words):
    path = tmp_path / "service_config.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=words):
        holdfast.channel("127.0.0.1:1", service_config=path)


# -- the generated service config -------------------------------------------------


def test_the_generated_config_is_the_contracts_as_compiled():
    written = json.loads((codegen.GENERATED / codegen.SERVICE_CONFIG_NAME).read_text())
    assert written == service_config.build(SERVICES)
    assert client.service_config() == (codegen.GENERATED / codegen.SERVICE_CONFIG_NAME).read_text()
    entries = {f"/{e['name'][0]['service']}/{e['name'][0]['method']}": e for e in written["methodConfig"]}
    assert entries.keys() == CONTRACTS.keys()
    for method, found in CONTRACTS.items():
        entry = entries[method]
        assert entry["timeout"] == service_config.duration(found.timeout_ms)
        assert entry["retryPolicy"] == {
            "maxAttempts": found.retry.max_attempts,
            "initialBackoff": service_config.duration(found.retry.fixed_delay_ms),
            "maxBackoff": service_config.duration(found.retry.fixed_delay_ms),
            "backoffMultiplier": 1,
            "retryableStatusCodes": list(found.retry.retryable_codes),
        }


@pytest.mark.parametrize(("ms", "text"), [
    (2000, "2.000000000s"), (500, "0.500000000s"), (50, "0.050000000s"), (1, "0.001000000s"),
    (2500, "2.500000000s"), (60000, "60.000000000s"),
])
def test_durations_are_protobuf_json_with_nine_fractional_digits(ms, text):
    """Nine digits, as grpc-js needs them (it reads "0.5s" as 5 ns)."""
    assert service_config.duration(ms) == text


def with_retry(max_attempts: int, fixed_delay_ms: int = 100, codes: tuple[str, ...] = ("UNAVAILABLE",)) -> contract.Contract:
    return contract.Contract(
        method="/pkg.Service/Call", timeout_ms=1000, idempotency_key=(),
        retry=contract.Retry(max_attempts, fixed_delay_ms, codes), lock_ttl_ms=0, sla="", mutating=False,
    )


@pytest.mark.parametrize("max_attempts", [0, 1])
def test_fewer_than_two_attempts_means_no_retry_policy(max_attempts):
    # gRPC requires maxAttempts >= 2 in a retryPolicy.
    entry = service_config.method_config(with_retry(max_attempts, fixed_delay_ms=0, codes=()))
    assert entry == {"name": [{"service": "pkg.Service", "method": "Call"}], "timeout": "1.000000000s"}


@pytest.mark.parametrize(
    ("found", "words"),
    [
        (with_retry(3, fixed_delay_ms=0), "fixed_delay_ms must be positive"),
        (with_retry(3, codes=()), "retryable_codes is empty"),
        (with_retry(3, codes=("UNAVAILABLE", "FLAKY")), "FLAKY"),
        (with_retry(3, codes=("OK",)), "OK"),
        (with_retry(6), "cap of 5"),
    ],
)
def test_a_retry_grpc_would_reject_fails_codegen_naming_the_method(found, words):
    with pytest.raises(ValueError, match="/pkg.Service/Call: retry") as raised:
        service_config.method_config(found)
    assert words in str(raised.value)


def test_the_channel_deadlines_are_the_contracts():
    assert client.deadlines() == {method: found.timeout_s for method, found in CONTRACTS.items()}


def test_grpc_gets_the_retry_policies_and_the_interceptor_the_timeouts():
    """grpcio starts a service-config timeout from a wrong clock (it fires
    early), so the channel's config carries the retries only."""
    given = json.loads(dict(client.options())["grpc.service_config"])
    written = json.loads(client.service_config())
    assert [{k: v for k, v in e.items() if k != "timeout"} for e in written["methodConfig"]] == given["methodConfig"]
    assert all("timeout" in e for e in written["methodConfig"])


def test_caller_options_are_kept_and_win_on_a_shared_key():
    merged = dict(client.options([("grpc.max_receive_message_length", 1024), ("grpc.enable_retries", 0)]))
    assert "retryPolicy" in merged["grpc.service_config"]
    assert merged["grpc.max_receive_message_length"] == 1024
    assert merged["grpc.enable_retries"] == 0


def test_codegen_builds_the_config_from_the_protos_it_compiles(tmp_path):
    """Into a copy, from a copied proto with Reserve's timeout changed: the
    config follows the proto just compiled, not the modules this process
    imported; and a hand edit afterwards is stale like any generated file."""
    protos, out = tmp_path / "protos", tmp_path / "generated"
    shutil.copytree(codegen.PROTOS, protos, ignore=shutil.ignore_patterns("__pycache__"))
    proto = protos / "holdfast/inventory/v1/inventory.proto"
    text = proto.read_text()
    reserve_at = text.index("rpc Reserve(")
    changed = text[:reserve_at] + text[reserve_at:].replace("timeout_ms: 2000", "timeout_ms: 2500", 1)
    proto.write_text(changed)

    written = codegen.generate(protos=protos, out=out)
    assert out / codegen.SERVICE_CONFIG_NAME in written
    assert not codegen.check(protos=protos, out=out)
    entries = json.loads((out / codegen.SERVICE_CONFIG_NAME).read_text())["methodConfig"]
    timeouts = {e["name"][0]["method"]: e["timeout"] for e in entries}
    assert timeouts["Reserve"] == "2.500000000s" and timeouts["Confirm"] == "2.000000000s"

    with (out / codegen.SERVICE_CONFIG_NAME).open("a") as config:
        config.write(" ")
    stale = codegen.check(protos=protos, out=out)
    assert stale.files == (str(out / codegen.SERVICE_CONFIG_NAME),) and "changed" in stale.reasons[0]
