"""OpenTelemetry traces of the calls (service/tracing.py, service/spans.py).

The server exports to a real OTLP/gRPC endpoint: a gRPC server in the test
implementing the collector's TraceService (opentelemetry-proto), on a free
port, which keeps the ExportTraceServiceRequests it receives, exactly as the
exporter sent them over the wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the otel extra: pip install 'holdfast[otel]'")

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: E402

from holdfast.inventory.v1 import inventory_pb2 as pb  # noqa: E402
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc  # noqa: E402

from holdfast import spans, tracing  # noqa: E402
from holdfast.server import Config, Running, start  # noqa: E402

CONTEXT_ID = "holdfast-context-id"
RESERVE = "/holdfast.inventory.v1.InventoryService/Reserve"
PHASES = {spans.SNAPSHOT_READ, spans.STORE_TRANSACT, spans.SNAPSHOT_ADVANCE}
# A client's W3C trace context: the call's span must continue this trace.
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return [
                span
                for request in self.requests
                for resource in request.resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]

    def service_names(self) -> set[str]:
        with self._lock:
            return {
                attribute.value.string_value
                for request in self.requests
                for resource in request.resource_spans
                for attribute in resource.resource.attributes
                if attribute.key == "service.name"
            }


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    kept = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(kept, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield kept, port
    server.stop(0)


@pytest.fixture
async def traced(config: Config, receiver: tuple[Receiver, int]) -> AsyncIterator[tuple[Running, Receiver]]:
    kept, port = receiver
    running = await start(dataclasses.replace(config, otlp_endpoint=f"127.0.0.1:{port}"))
    try:
        yield running, kept
    finally:
        await running.stop(0)
        tracing.shutdown()


def _attributes(span: trace_pb2.Span) -> dict[str, object]:
    found: dict[str, object] = {}
    for attribute in span.attributes:
        value = attribute.value
        found[attribute.key] = getattr(value, value.WhichOneof("value"))
    return found


async def _reserve(port: int, order_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, dict]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        await stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=10, request_id="init"))
        call = stub.Reserve(
            pb.ReserveRequest(order_id=order_id, sku_id="sku-1", quantity=3, timestamp_ms=1), metadata=metadata
        )
        try:
            await call
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), dict(await call.trailing_metadata())


async def test_a_call_is_a_span_with_its_phases_as_children(traced) -> None:
    running, kept = traced
    assert spans.tracer is not None
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    code, trailing = await _reserve(running.port, "order-1", (("traceparent", traceparent),))
    assert code is grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
    assert tracing.force_flush(10_000)

    received = kept.spans()
    calls = [span for span in received if span.name == RESERVE]
    assert len(calls) == 1, [span.name for span in received]
    call = calls[0]
    # The client's context continues: same trace, the client's span the parent.
    assert call.trace_id.hex() == CLIENT_TRACE and call.parent_span_id.hex() == CLIENT_SPAN
    assert call.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attributes = _attributes(call)
    assert attributes[spans.CONTEXT_ID] == trailing[CONTEXT_ID]
    assert attributes[spans.METHOD] == RESERVE
    assert attributes[spans.REASON] == "OK"
    assert attributes[spans.REPLAYED] is False

    children = [span for span in received if span.parent_span_id == call.span_id]
    assert sorted(span.name for span in children) == sorted(PHASES)
    for child in children:
        assert child.trace_id == call.trace_id
        assert _attributes(child)[spans.CONTEXT_ID] == trailing[CONTEXT_ID]
        assert call.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= call.end_time_unix_nano
    read, transact, advance = (next(s for s in children if s.name == name) for name in (
        spans.SNAPSHOT_READ, spans.STORE_TRANSACT, spans.SNAPSHOT_ADVANCE))
    assert read.end_time_unix_nano <= transact.start_time_unix_nano
    assert transact.end_time_unix_nano <= advance.start_time_unix_nano
    # The PutStock before it is a trace of its own (the client sent no context).
    put = next(span for span in received if span.name.endswith("/PutStock"))
    assert put.trace_id != call.trace_id and not put.parent_span_id
    assert kept.service_names() == {"holdfast"}
    # Health checks and reflection are not hosted services: no spans of theirs.
    assert all(span.name.startswith("/holdfast.") or span.name.startswith("holdfast.") for span in received)


async def test_a_refused_call_names_its_reason(traced) -> None:
    running, kept = traced
    code, trailing = await _reserve(running.port, "order-big")
    assert code is grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        call = stub.Reserve(pb.ReserveRequest(order_id="order-2", sku_id="sku-1", quantity=100, timestamp_ms=2))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        refused, refused_code = dict(await call.trailing_metadata()), await call.code()
    calls = await _call_spans(kept, (refused[CONTEXT_ID], trailing[CONTEXT_ID]))
    assert _attributes(calls[refused[CONTEXT_ID]])[spans.REASON] == "INSUFFICIENT_STOCK"
    # The instrumentation names the gRPC status; by OpenTelemetry's conventions a
    # server span's status is an error only for the server's own faults (INTERNAL,
    # UNAVAILABLE, ...), not for a refusal the client caused.
    assert _attributes(calls[refused[CONTEXT_ID]])["rpc.grpc.status_code"] == refused_code.value[0] != 0
    assert calls[refused[CONTEXT_ID]].status.code == trace_pb2.Status.STATUS_CODE_UNSET
    assert _attributes(calls[trailing[CONTEXT_ID]])[spans.REASON] == "OK"
    # Every phase is a call's (PutStock's or Reserve's) child: none orphaned.
    by_id = {s.span_id: s for s in kept.spans()}
    for span in kept.spans():
        if span.name in PHASES:
            parent = by_id[span.parent_span_id]
            assert parent.kind == trace_pb2.Span.SPAN_KIND_SERVER and parent.trace_id == span.trace_id


async def _call_spans(kept: Receiver, context_ids: tuple[str, ...], timeout_s: float = 10.0) -> dict:
    """The Reserve spans received, by context id, once those of `context_ids`
    are among them: a refused call's client hears its status before the
    server's interceptor has ended its span, so one flush may come too early."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        assert tracing.force_flush(10_000)
        calls = {_attributes(s)[spans.CONTEXT_ID]: s for s in kept.spans() if s.name == RESERVE}
        if all(context_id in calls for context_id in context_ids):
            return calls
        assert asyncio.get_running_loop().time() < deadline, f"no span for {context_ids} within {timeout_s} s"
        await asyncio.sleep(0.05)


async def test_tracing_off_exports_nothing(config: Config, receiver: tuple[Receiver, int]) -> None:
    kept, _ = receiver
    assert not config.otlp_endpoint
    running = await start(config)
    try:
        assert spans.tracer is None
        code, trailing = await _reserve(running.port, "order-1")
        assert code is grpc.StatusCode.OK and trailing[CONTEXT_ID]
        assert spans.tracer is None
        assert not tracing.force_flush(1_000), "no provider exists to flush"
    finally:
        await running.stop(0)
    assert kept.requests == []


async def test_a_stopped_server_turns_the_hook_off(config: Config, receiver: tuple[Receiver, int]) -> None:
    _, port = receiver
    running = await start(dataclasses.replace(config, otlp_endpoint=f"127.0.0.1:{port}"))
    assert spans.tracer is not None
    await running.stop(0)
    assert spans.tracer is None
    tracing.shutdown()  # again: nothing left to stop
    assert spans.tracer is None


def test_serve_without_the_packages_exits_2_naming_the_extra(tmp_path) -> None:
    """A fresh interpreter in which OpenTelemetry cannot be imported."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"  # every `import opentelemetry...` now fails
        "from holdfast.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/t.db",
         "--otlp-endpoint", "127.0.0.1:4317"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        env={**os.environ, "HOLDFAST_OTLP_ENDPOINT": ""},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'holdfast[otel]'" in done.stderr, done.stderr
    assert "--otlp-endpoint" in done.stderr
